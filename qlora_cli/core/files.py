"""Atomic writes, for every writer of the project: a reader (or a crash) never sees half a file or half a
folder. A file or folder is written under a hidden name beside its target and renamed into place when complete;
files written inside a staged folder are published with it. (The JSONL logs, appended a record at a time, are
core/jsonl_log.py's.)
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def staging_path(target: Path) -> Path:
    """A hidden name beside `target`, private to this process: the ranks of a distributed run may
    write the same target at once. The suffix is kept, as `numpy.savez` insists on its own."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}{target.suffix}")


def remove_abandoned_staging(target: Path) -> list[Path]:
    """Remove what processes that no longer run on this machine left staged for `target` (a kill -9 or
    the OOM killer gives `staged` no chance to clean up; a merge leaves gigabytes). Only for targets that
    one process on this machine writes at a time: another machine's process would look dead from here.

    Returns:
        the paths removed.
    """
    removed = []
    prefix = f".{target.name}.tmp-"
    for path in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].removesuffix(target.suffix)
        if pid.isdigit() and int(pid) != os.getpid() and not _process_runs(int(pid)):
            _remove(path)
            removed.append(path)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(staging: Path, target: Path, *, replace: bool = True) -> bool:
    """Move a finished file or folder to `target` in one rename; returns whether it was put in place.

    Args:
        replace: an existing target is replaced (a folder is first renamed aside and then removed, as a
            rename cannot replace a non-empty folder); otherwise an existing target wins and `staging`
            is discarded, for caches that another process may have filled first.
    """
    if not replace and target.exists():
        _remove(staging)
        return False
    if staging.is_dir() and target.is_dir():
        previous = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(previous)
        target.rename(previous)
        staging.rename(target)
        _remove(previous)
        return True
    try:
        staging.replace(target)
    except OSError:
        if replace or not target.exists():
            raise
        _remove(staging)  # another process published the same target first
        return False
    return True


@contextmanager
def staged(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Write into the yielded path, then have it published as `target` (see `publish`).

    On any exception (Ctrl-C included) what was written is removed and `target` is left as it was.
    """
    staging = staging_path(target)
    _remove(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    publish(staging, target, replace=replace)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a whole file, or leave the previous one untouched."""
    with staged(path) as staging:
        if isinstance(content, bytes):
            staging.write_bytes(content)
        else:
            staging.write_text(content, encoding="utf-8")


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
