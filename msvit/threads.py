"""``--threads N``: the torch CPU threads of every command that computes (msvit train, visualize,
the demo, the bench scripts), one option spelled and applied one way.

torch starts one thread per core it sees. On a machine whose cores other work shares, that many
threads wait on each other: the issue-29 segmentation recipe projected 90 min at the default and
took 9.5 min with ``--threads 1`` on 2 shared cores. ``docs/timing.md`` says when to lower it.
"""

import argparse
from typing import Optional

import torch

HELP = (
    "torch CPU threads (default: torch's, one per core it sees). On a machine whose cores other work "
    "shares, fewer threads (1 or 2) run faster and time more steadily; docs/timing.md"
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {value}")
    return value


def add_threads_argument(parser) -> None:
    """Add ``--threads N`` (default None: leave torch's choice) to an argparse parser or group."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help=HELP)


def use_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads to ``threads`` (None: keep torch's); returns the count in use."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
