"""Test-only fault injection: ``MSVIT_KILL_AT=<point>[@<n>]`` makes the process SIGKILL itself the
n-th time (default: the first) it reaches that point.

The crash-safety tests set it to prove that a kill at any step of a checkpoint write (inside the
weight file, between files, before the manifest) leaves a loadable, resumable run folder. Unset
(always, outside tests) ``crash_point`` costs one dictionary lookup.
"""

import os
import signal
from collections import Counter

ENV = "MSVIT_KILL_AT"
_reached = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process if ``MSVIT_KILL_AT`` names this point (nothing is flushed or cleaned up)."""
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, nth = target.partition("@")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
