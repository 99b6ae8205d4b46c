"""Files being written beside their destination (``<name>.partial-<pid>``), and the clean-up of those that a
killed writer left: shared by the CLI's atomic JSON writes and model exports."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
from pathlib import Path

PARTIAL = ".partial-"


def partial_path(path: Path, hidden: bool = False) -> Path:
    """Where this process writes ``path`` before renaming it into place (``hidden``: a dot in front)."""
    return path.with_name(f"{'.' if hidden else ''}{path.name}{PARTIAL}{os.getpid()}")


def remove_stale_partials(path: Path, hidden: bool = False) -> list[Path]:
    """Delete what earlier writers of ``path`` left when killed (a full disk, SIGKILL): ``partial_path`` names
    whose process is gone; a live writer's file, and anything not named so, is kept. Returns what went."""
    prefix = f"{'.' if hidden else ''}{path.name}{PARTIAL}"
    removed = []
    for leftover in path.parent.glob(glob.escape(prefix) + "*"):
        pid = leftover.name.removeprefix(prefix)
        if not pid.isdigit() or _alive(int(pid)):
            continue
        mode = leftover.lstat().st_mode
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(mode):
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive, and not ours to clean
        return True
    return True
