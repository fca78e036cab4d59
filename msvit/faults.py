"""Test-only fault injection: ``MSVIT_KILL_AT=<point>`` makes the process SIGKILL itself at that point.

The crash-safety tests set it to prove that a kill at any step of a checkpoint write (inside the
weight file, between files, before the manifest) leaves a loadable, resumable run folder. Unset
(always, outside tests) ``crash_point`` costs one dictionary lookup.
"""
import os
import signal

ENV = "MSVIT_KILL_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if ``MSVIT_KILL_AT`` names this point (nothing is flushed or cleaned up)."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
