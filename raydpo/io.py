"""Atomic file output: write to a temporary path beside the target, then rename.

A crash or a kill never leaves a file that looks complete: either the old file (or none) is
there, or the whole new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


_HOST = socket.gethostname().replace("-", "_").replace(".", "_") or "host"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+(\.held)?$")


def _tmp_name(path: Path) -> Path:
    """``.NAME.tmp-HOST-PID-RANDOM`` beside ``path``: the host and PID say who may sweep it."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{next(tempfile._get_candidate_names())}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def sweep_stale(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove temporaries raydpo left in ``folder`` when a process was killed (its PID no longer
    alive on this host). Only names of raydpo's own temporary pattern are touched."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if not m or (name is not None and m["name"] != name) or m["host"] != _HOST:
            continue
        if int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            _remove(p)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by a killed run in %s", len(removed), folder)
    return removed


def _fault_hold(tmp: Path) -> None:
    """Fault injection for kill tests: ``RAYDPO_FAULT_HOLD_TMP=SECONDS`` waits with the temporary
    complete but not yet renamed, so a test can kill the process at exactly that point."""
    hold = os.environ.get("RAYDPO_FAULT_HOLD_TMP")
    if hold:
        import time

        flag = tmp.parent / f"{tmp.name}.held"
        flag.touch()
        try:
            time.sleep(float(hold))
        finally:
            flag.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path``, on error remove it.

    Temporaries of killed runs at the same place are swept first. A folder written here is marked
    as raydpo's output of ``kind`` (see :mod:`raydpo.outputs`); an existing folder is replaced only
    when raydpo marked it (or it is empty): a folder raydpo did not write is never removed.
    """
    from .outputs import MARKER, OutputError, marker_kind, write_marker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    tmp = _tmp_name(path)
    try:
        yield tmp
        _fault_hold(tmp)
        if tmp.is_dir():
            if kind is not None and not (tmp / MARKER).exists():
                write_marker(tmp, kind)
            if path.exists() or path.is_symlink():
                if not path.is_dir() or path.is_symlink():
                    raise OutputError(f"{path}: exists and is not a folder; refusing to replace it")
                if any(path.iterdir()) and marker_kind(path) is None:
                    raise OutputError(f"{path}: the folder exists and was not written by raydpo; "
                                      "refusing to replace it")
                old = _tmp_name(path)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            if path.is_dir() and not path.is_symlink():
                raise OutputError(f"{path}: exists and is a folder; expected a file")
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    """Read a JSON file; any problem (missing, a folder, unreadable, not UTF-8, malformed, too
    deep, duplicate keys) raises one DataError line naming the file (see :mod:`raydpo.readers`)."""
    from .readers import read_json as _read

    return _read(path)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX ``flock``; a no-op where unavailable), so that
    concurrent workers or trials build a shared artifact once instead of racing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
