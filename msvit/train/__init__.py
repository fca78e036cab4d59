"""``msvit train``: train or fine-tune an MSViT and its gate for a task (``--task``).

    from msvit.train import parse_args, train
    metrics = train(parse_args(["--task", "segmentation", "--epochs", "1", "--out", "runs/seg"]))

The loop (``loop``) is shared by every task; a task (``tasks``: ``classify``, ``segment``) says
what differs: data, model, loss target, evaluation, checkpoint format.
"""

from msvit.train.cli import main
from msvit.train.loop import train
from msvit.train.options import parse_args

__all__ = ["main", "parse_args", "train"]
