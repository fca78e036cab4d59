"""The flags of ``msvit train``, parsed once for the task that ``--task`` names.

``--task`` is read first (its own small parser: a real argparse choice); the full parser is then
built for that task (the shared options, the task's own, the task's defaults) and parses the
command line once, so ``msvit train --task segmentation --help`` lists the segmentation options.
A flag of another task is refused naming that task; each task rejects shared flags that have no
meaning for it (``Task.check``).
"""

import argparse
from typing import Optional, Tuple

from msvit.data.loaders import CROPS, DIGITS
from msvit.models.entropy_gate import APT_THREE_SCALE_THRESHOLDS, APT_THRESHOLD
from msvit.models.timm_compat import GATES
from msvit.threads import add_threads_argument
from msvit.train.flag_checks import check_gate_flags, check_scale_flags, check_train_flags
from msvit.train.resume_state import check_run_flags, resumed_args, with_task
from msvit.train.run_folder import recorded_flags_of
from msvit.train.tasks import TASKS, task_of
from msvit_kernels.entropy_kernel import BINNINGS, DEFAULT_BINS, MAX_BINS, MIN_BINS

# What each digits-only flag means for folder data.
DIGITS_ONLY = {
    "train_size": "folder data trains on every image of its train/",
    "val_size": "folder data evaluates on every image of its val/",
    "digit_scale": "folder data has no digits to scale",
    "shift": "only the digits have boxes that keep the object in frame",
}
DESCRIPTION = """fine-tune (or train) an MSViT with its gate, on one CPU/GPU or with torchrun.

Recipes from Appendix C: --opt sgd (ViT: lr 0.03, momentum 0.9, no weight decay, clipping 1.0)
or --opt adamw (DeiT: small lr, weight decay, label smoothing 0.1); cosine schedule with linear
warm-up, and a longer warm-up for the gate, trained from scratch (C.3). The loss is Eq. 6:
task loss + lambda * gate loss (L0, BaS or GBaS) on the soft gate outputs.
"""


def add_data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DIGITS, help=f"'{DIGITS}' or a folder with train/ and val/ (see the task)")
    g.add_argument("--image-size", type=int, default=64, help="training and evaluation image side in pixels")
    g.add_argument("--train-size", type=int, default=20000, help="cluttered digits: training images")
    g.add_argument("--val-size", type=int, default=2000, help="cluttered digits: held-out images")
    g.add_argument(
        "--digit-scale",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="cluttered digits: digit side as a fraction of the image (default: the dataset's, 0.1875 0.4375)",
    )
    g.add_argument("--crop", choices=sorted(CROPS), default="none", help="crop augmentation (paper: standard/light)")
    g.add_argument(
        "--shift",
        type=int,
        default=0,
        metavar="PX",
        help="cluttered digits: random translations of up to PX pixels per image and epoch that keep "
        "the digit inside the image (fights memorising the fixed renders)",
    )
    g.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=0,
        metavar="T",
        help="native resolution: images keep their own size and aspect ratio and a batch holds as many as "
        "fit T tokens (all-fine count, prefix included; --batch-size then caps the images of a batch); "
        "0: square images, --batch-size per batch",
    )
    g.add_argument(
        "--aspect-ratios",
        type=float,
        nargs="+",
        default=None,
        metavar="W/H",
        help="cluttered digits with --max-tokens-per-batch: each image is rendered at one of these aspect "
        "ratios (width / height) with about the area of --image-size squared (default: 0.5 1 2); "
        "folder data keeps each file's own aspect ratio",
    )
    g.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on for folder data, off for digits)",
    )


def add_model_options(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="vit_tiny_patch16_224", help="timm model name: a ViT, DeiT, EVA, NaFlexViT or Swin v1"
    )
    g.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm.create_model (patch_size, depth, ...)")
    g.add_argument(
        "--pretrained",
        default=None,
        help="local timm weights file to start from, no download (default: none, timm's random initialisation)",
    )
    g.add_argument(
        "--hub-pretrained", action="store_true", help="timm pretrained weights from the hub (needs internet)"
    )
    g.add_argument(
        "--init-from",
        default=None,
        metavar="CHECKPOINT",
        help="start from every weight (gate included) of an msvit checkpoint: a run or checkpoint folder, or "
        "a shipped name such as cluttered-digits; the flags must build the same architecture (fine-tuning, "
        "e.g. a square-trained model at native resolution)",
    )
    g.add_argument(
        "--coarse-patch", type=int, default=None, help="coarse patch size in pixels (default: 2x the patch size)"
    )
    g.add_argument(
        "--scales",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="every patch size, finest first, each the previous times one ratio: '16 32 64' is APT's three "
        "scales (a quadtree: a 64 px region is one token, or four 32 px nodes that may split again); "
        "default: two scales, the patch size and --coarse-patch",
    )
    g.add_argument("--gate-hidden", type=int, default=106, help="width of the gate's hidden layers")
    g.add_argument(
        "--gate-init-logit",
        type=float,
        default=3.0,
        help="initial gate logit (bias of its last layer): > 0 starts all-fine at eval, as in the paper; "
        "3 samples ~95%% of the regions fine in training, 1 about 73%%",
    )
    g.add_argument(
        "--gate",
        choices=GATES,
        default="learned",
        help="the scale gate: 'learned' (the paper's MLP, trained by the gate loss) or 'entropy' (APT's "
        "training-free rule: a region is fine when the entropy of its grey levels exceeds "
        "--entropy-threshold; it has no weights, so the gate-training options do not apply)",
    )
    g.add_argument(
        "--entropy-threshold",
        type=float,
        nargs="+",
        default=None,
        metavar="BITS",
        help="--gate entropy: a region stays fine (a node splits) when its grey-level entropy exceeds this "
        "many bits; one value per scale boundary, the finest first as APT orders them "
        f"(default: APT's {APT_THRESHOLD} for two scales, {' '.join(map(str, APT_THREE_SCALE_THRESHOLDS))} for three)",
    )
    g.add_argument(
        "--entropy-bins",
        type=int,
        choices=[2**i for i in range(MIN_BINS.bit_length() - 1, MAX_BINS.bit_length())],
        default=DEFAULT_BINS,
        metavar="N",
        help=f"--gate entropy: grey-level histogram bins, a power of two from {MIN_BINS} to {MAX_BINS} "
        "(APT's code: 512)",
    )
    g.add_argument(
        "--entropy-binning",
        choices=list(BINNINGS),
        default="apt",
        help="--gate entropy: 'apt' bins 8-bit grey levels as APT's released code (torch.histc) and splits "
        "at entropy >= threshold, so APT's thresholds keep APT's tokens; 'continuous' is the rule of runs "
        "saved before (no 8-bit rounding, entropy > threshold)",
    )
    g.add_argument(
        "--mode",
        choices=["packed", "trimmed", "masked"],
        default="packed",
        help="execution mode: packed tokens, adaptive trimming, or the paper's dense masking (Eq. 10)",
    )


def add_gate_options(p) -> None:
    g = p.add_argument_group("gate training")
    g.add_argument(
        "--gate-mode",
        choices=["packed", "trimmed", "masked"],
        default=None,
        help="execution mode once the gate trains (default: --mode). 'masked' gives the gate the "
        "exact Eq. 18 gradient comparing each region's coarse and fine tokens (Appendix F)",
    )
    g.add_argument(
        "--gate-mode-epochs",
        type=int,
        default=0,
        help="epochs (from --gate-start-epoch) that run in --gate-mode before training returns to --mode "
        "(0: until the end). A short masked phase places the gate; packed epochs after it are cheaper",
    )
    g.add_argument(
        "--gate-loss",
        choices=["gbas", "bas", "l0", "l0-two-sided", "none"],
        default="gbas",
        help="l0-two-sided pins the batch's fine rate at g* from both sides (msvit.losses.l0_loss)",
    )
    g.add_argument(
        "--gate-loss-input",
        choices=["samples", "probs"],
        default="samples",
        help="what the gate loss sees: the Gumbel-Sigmoid samples m (the paper), or the noise-free "
        "probabilities sigmoid(logit), whose gradient does not vanish where the samples saturate",
    )
    g.add_argument("--gate-lambda", type=float, default=4.0, help="lambda: weight of the gate loss in Eq. 6")
    g.add_argument("--gate-target", type=float, default=0.25, help="g*: target fraction of fine regions")
    g.add_argument("--gbas-sigma", type=float, default=0.1, help="GBaS: sigma of the priors' Gaussian hyperprior")
    g.add_argument(
        "--gbas-ctr-init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="initialise the GBaS priors higher at the centre, as the paper does (off for uncentred data)",
    )
    g.add_argument(
        "--gate-start-epoch",
        type=int,
        default=0,
        help="epochs before the gate trains; meanwhile random masks (fine rate ~U(g*, 1) per image) "
        "make a from-scratch backbone robust to mixed scales, like the pretrained ones the paper starts from",
    )
    g.add_argument(
        "--gate-lr",
        type=float,
        default=None,
        help="learning rate of the gate and the GBaS priors (default: --lr, as in the paper)",
    )
    g.add_argument("--gate-warmup-epochs", type=float, default=3.0, help="linear warm-up of the gate's learning rate")


def add_optimization_options(p) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--opt", choices=["sgd", "adamw"], default="adamw", help="optimizer (ViT recipe: sgd; DeiT: adamw)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the backbone (cosine schedule)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (--opt sgd)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--epochs", type=int, default=10, help="epochs of the run (a resume may raise it)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear learning-rate warm-up of the backbone")
    g.add_argument("--batch-size", type=int, default=128, help="images per batch and process")


def add_run_options(p) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes (0: load in this process)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    g.add_argument("--device", default="auto", help="torch device; auto: CUDA if available, else CPU")
    add_threads_argument(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the data order")
    g.add_argument("--out", default="runs/msvit", help="checkpoint and metrics folder")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete checkpoint, exactly as if never stopped; "
        "flags left off take the run's recorded values",
    )
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (deletes it)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit; for smoke runs)")


def task_option(p) -> None:
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="classification",
        help="what to train; 'msvit train --task T --help' lists the options of task T",
    )


def build_parser(task_name: str) -> argparse.ArgumentParser:
    task = task_of(task_name)
    p = argparse.ArgumentParser(
        prog="msvit train", description=DESCRIPTION + "\n" + task.DESCRIPTION, formatter_class=HelpFormatter
    )
    task_option(p)
    for add in (add_data_options, add_model_options, add_gate_options, add_optimization_options, add_run_options):
        add(p)
    task.add_options(p.add_argument_group(f"{task_name} task"))
    p.set_defaults(**task.DEFAULTS)
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default stated once: a help text that says its default itself (``default:
    --lr``, the dataset's) keeps its words, any other gets argparse's value appended. The task
    descriptions are kept as written (they hold folder layouts)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def selected_task(argv) -> Tuple[str, Optional[dict]]:
    """The task the full parser is built for and, with ``--resume``, the flags the run in ``--out``
    recorded (help and every other flag are left to the full parser): ``--task`` where typed, else
    the resumed run's (a resume with only ``--out`` may continue a segmentation run), else the
    default. A resume without a run to continue is refused here, naming the folder."""
    p = argparse.ArgumentParser(prog="msvit train", add_help=False)
    task_option(p)
    add_run_options(p)
    p.add_argument("-h", "--help", action="store_true")  # help needs no run: the full parser prints it
    known = p.parse_known_args(argv)[0]
    recorded = recorded_flags_of(known.out) if known.resume and not known.help else None
    if recorded is not None and "task" not in typed_flags(p, argv):
        return with_task(recorded)["task"], recorded
    return known.task, recorded


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """The flags of ``msvit train``. With ``--resume`` every flag left off takes the run's recorded
    value before any check that relates one flag to another (``--entropy-threshold`` to ``--gate``
    and ``--scales``, the task's refusals, ...), and a typed flag that changes the run is refused."""
    task_name, recorded = selected_task(argv)
    p = build_parser(task_name)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        refuse_unknown(p, task_name, unknown)
    args.typed = typed_flags(p, argv)
    if recorded is not None:
        args = resumed_args(recorded, args, args.out)
        check_run_flags(recorded, args, args.out)
    check_train_flags(p, args)
    check_gate_flags(p, args)
    check_scale_flags(p, args)
    given = [k for k in DIGITS_ONLY if getattr(args, k) != p.get_default(k)]
    if args.data != DIGITS and given:
        p.error(f"--{given[0].replace('_', '-')} needs --data {DIGITS}: {DIGITS_ONLY[given[0]]}")
    task_of(task_name).check(p, args)
    return args


def typed_flags(p, argv) -> tuple:
    """The flags (destinations) the command line sets itself, default values included: a resume
    keeps the recorded value of every other flag. Parsed into a namespace pre-filled with a
    sentinel, which argparse leaves in place of the defaults of flags it does not see."""
    unset = object()
    dests = {a.dest for a in p._actions if a.dest != argparse.SUPPRESS}
    seen = p.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))[0]
    return tuple(sorted(k for k, v in vars(seen).items() if v is not unset))


def refuse_unknown(p, task_name: str, unknown: list) -> None:
    """argparse's error for unknown flags, naming the task a flag belongs to where it has one."""
    for flag in (u.partition("=")[0] for u in unknown if u.startswith("--")):
        for other in sorted(set(TASKS) - {task_name}):
            if flag in build_parser(other)._option_string_actions:
                p.error(f"{flag} is an option of --task {other}, not of --task {task_name}")
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
