"""The tasks ``msvit train --task`` knows. A task is a module that says what differs between
tasks; the epoch loop (``msvit.train.loop``) does the rest the same way for all of them:

  DESCRIPTION, DEFAULTS          help text; defaults of shared flags that differ for the task
  add_options(group), check(parser, args)   the task's own flags; refusal of meaningless ones
  build_data(args, show)         -> DataBundle (train/val datasets, classes, normalisation)
  build_model(args, bundle)      -> (model, checkpoint config); the model has ``.gate``
  tokenizer(model), gate_trains(args), forward(net, images, args, mode, mask) -> output with
      ``logits``, ``gate`` (GateDecision) and ``tokens``
  IGNORE_INDEX                   target value the loss skips
  evaluate(model, loader, bundle, args, device) -> metrics; PROGRESS: the held-out metrics
      the progress line shows (``msvit.train.epochs.progress_line``, one format for every task)
  save(folder, model, config, point)          writes the checkpoint's weights and config
"""

from msvit.train import classify, segment

TASKS = {"classification": classify, "segmentation": segment}


def task_of(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]
