"""Runs ``msvit train`` in forked children on request, for tests/test_crash_safety.py.

Forking a process that has run a multi-threaded torch op deadlocks the child (the OpenMP pool does
not survive fork), and starting a fresh interpreter per kill costs seconds. This worker imports
everything once, never computes itself, and forks one single-threaded child per request, so all
runs (killed, resumed, reference) share one thread count and their weights compare bit for bit.

Protocol: one JSON request per stdin line, ``{"argv": [...], "kill_at": point or null, "after":
seconds or null}``; one JSON reply per line, ``{"killed": bool, "code": int or null}``.
"""

import json
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)  # before any torch op: no OpenMP pool exists to break in the children

import timm  # noqa: E402,F401  the lazy imports of a run, done once here rather than in every child
from torchvision.transforms import v2  # noqa: E402,F401

from msvit.data.digits import _digits  # noqa: E402
from msvit.io.faults import ENV  # noqa: E402
from msvit.train import main  # noqa: E402

_digits()  # numpy only: the source digits every child would load again


def run(argv, kill_at, after) -> dict:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sys.stdout = sys.stderr  # the reply channel stays clean
            if kill_at:
                os.environ[ENV] = kill_at
            main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 2
            print(stop, file=sys.stderr)
        except BaseException as error:
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
        finally:
            os._exit(code)
    if after is not None:
        time.sleep(after)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"killed": os.WTERMSIG(status) == signal.SIGKILL, "code": None}
    return {"killed": False, "code": os.WEXITSTATUS(status)}


if __name__ == "__main__":
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(run(request["argv"], request.get("kill_at"), request.get("after"))), flush=True)
