"""Crash-safe file writes: a reader sees the old file or the new one, never a torn mix.

Each file is written to a temporary name in the same folder (so the rename cannot cross file
systems), flushed and fsynced, then ``os.replace``d over the old name; the folder is fsynced so
the rename itself survives a power loss. A process killed mid-write leaves only a temporary file,
recognisable by ``TEMP_MARK`` and removed by ``remove_temporaries`` the next time the run starts.
"""

import os
import shutil
from pathlib import Path
from typing import Union

from msvit.io.faults import crash_point

TEMP_MARK = ".partial-"


def temporary_name(path: Path) -> Path:
    """``folder/.name.partial-<pid>``: hidden, unique per process, and easy to clean up."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    """Persist a rename or a new entry of ``folder`` (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Union[str, Path], data: bytes, point: str = "") -> Path:
    """Write ``data`` to ``path`` atomically. ``point`` names the crash points for the fault tests
    (``<point>:partial`` after half of the bytes, ``<point>:written`` after the rename)."""
    path = Path(path)
    temp = temporary_name(path)
    try:
        with open(temp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if point:
                f.flush()
                crash_point(f"{point}:partial")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    if point:
        crash_point(f"{point}:written")
    return path


def write_text(path: Union[str, Path], text: str, point: str = "") -> Path:
    return write_bytes(path, text.encode("utf-8"), point)


def replace_folder(staging: Path, final: Path) -> None:
    """Move a fully written (and fsynced) ``staging`` folder to ``final``, replacing any old one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_folder(final.parent)


def remove_temporaries(folder: Path) -> None:
    """Delete what killed writers left in ``folder``: ``.*.partial-<pid>`` files and folders."""
    for stale in folder.glob(f".*{TEMP_MARK}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
