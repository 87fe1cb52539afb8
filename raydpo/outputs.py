"""Output paths that can never destroy a user's data.

Every command that writes to a path the user names checks it with :func:`check_output` before
any work starts. The rules:

* ``/``, the home folder and the working folder itself are never an output.
* An output that is, contains or lies inside one of the command's inputs is refused.
* A folder output may land on a missing path or an empty folder. An existing non-empty folder
  is accepted only when raydpo wrote it as an output of the same kind (its marker file
  ``.raydpo-output.json`` says so), and then only with ``--overwrite`` (or, for resumable
  outputs such as candidate generation, to resume it).
* A file output may replace an existing file only with ``--overwrite`` and only when raydpo
  wrote that file, unchanged since: each folder keeps a ledger (``.raydpo-outputs.json``) of the
  files raydpo wrote into it, with their sha256.
* A file where a folder is expected (or below a file) is refused.

Every refusal is one line naming the path, raised as :class:`OutputError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import RaydpoError
from .io import sha256_file

MARKER = ".raydpo-output.json"
LEDGER = ".raydpo-outputs.json"


class OutputError(RaydpoError, ValueError):
    """An output path raydpo refuses to write."""


def _resolve(p: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def protected_folders() -> dict[Path, str]:
    out = {Path("/"): "the filesystem root", _resolve(Path.home()): "your home folder",
           _resolve(Path.cwd()): "the working folder"}
    return out


def marker_kind(folder: str | Path) -> str | None:
    """The kind of output raydpo recorded in ``folder`` (``None``: not a raydpo output)."""
    m = Path(folder) / MARKER
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("written_by") == "raydpo" else None


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark ``folder`` as a raydpo output of ``kind`` (plain write: the folder is still private)."""
    (Path(folder) / MARKER).write_text(json.dumps({"written_by": "raydpo", "kind": kind}) + "\n", encoding="utf-8")


def claim_folder(folder: str | Path, kind: str) -> Path:
    """Create ``folder`` (checked beforehand) and mark it as raydpo's output of ``kind``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if marker_kind(folder) is None:
        from .io import write_json

        write_json(folder / MARKER, {"written_by": "raydpo", "kind": kind}, indent=None)
    return folder


def _read_ledger(folder: Path) -> dict:
    try:
        data = json.loads((folder / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_file(path: str | Path, kind: str) -> None:
    """Remember that raydpo wrote ``path`` (a file output), so that ``--overwrite`` may replace it."""
    from .io import write_json

    path = _resolve(path)
    if not path.is_file():
        return
    ledger = _read_ledger(path.parent)  # a lost entry only means --overwrite is refused later
    ledger[path.name] = {"kind": kind, "sha256": sha256_file(path)}
    write_json(path.parent / LEDGER, ledger)


def recorded_kind(path: str | Path) -> str | None:
    """The kind raydpo recorded for file ``path`` if raydpo wrote it and it is unchanged since."""
    path = _resolve(path)
    entry = _read_ledger(path.parent).get(path.name)
    if not isinstance(entry, dict):
        return None
    try:
        return entry.get("kind") if entry.get("sha256") == sha256_file(path) else None
    except OSError:
        return None


def _related(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "lies inside"
    return None


def check_output(path: str | Path, *, kind: str, folder: bool, inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False, resumable: bool = False, option: str = "--out") -> Path:
    """Refuse (one line, :class:`OutputError`) an output path that could destroy data.

    Returns the path as given. ``resumable``: an earlier output of the same kind is continued
    rather than replaced (no ``--overwrite`` needed).
    """
    given = Path(path)
    p = _resolve(path)
    label = f"{option} {given}"
    for prot, what in protected_folders().items():
        if p == prot:
            raise OutputError(f"{label}: refusing to write into {what} ({prot}); name a new folder")
    for inp in inputs:
        if inp is None:
            continue
        q = _resolve(inp)
        rel = _related(p, q)
        if rel:
            raise OutputError(f"{label}: the output {rel} the input {inp}; choose another output path")
        # also through symlinks
        try:
            rel = _related(p.resolve(), q.resolve())
        except OSError:
            rel = None
        if rel:
            raise OutputError(f"{label}: the output {rel} the input {inp} (through a link); choose another path")
    for anc in p.parents:
        if anc.exists():
            if not anc.is_dir():
                raise OutputError(f"{label}: {anc} is a file, not a folder")
            break
    if not p.exists() and not p.is_symlink():
        return given
    if folder:
        if not p.is_dir():
            raise OutputError(f"{label}: exists and is a file; expected a folder")
        try:
            empty = not any(p.iterdir())
        except OSError as e:
            raise OutputError(f"{label}: cannot read the folder: {e.strerror or e}") from None
        if empty:
            return given
        found = marker_kind(p)
        if found is None:
            raise OutputError(f"{label}: the folder exists, is not empty and was not written by raydpo; "
                              "refusing to replace it (choose a new folder)")
        if found != kind:
            raise OutputError(f"{label}: the folder holds a raydpo {found} output, not a {kind}; choose another folder")
        if resumable or overwrite:
            return given
        raise OutputError(f"{label}: the folder holds an earlier raydpo {kind} output; pass --overwrite to "
                          "replace it, or choose a new folder")
    if p.is_dir():
        raise OutputError(f"{label}: exists and is a folder; expected a file")
    found = recorded_kind(p)
    if found == kind and overwrite:
        return given
    if found == kind:
        raise OutputError(f"{label}: the file exists (an earlier raydpo {kind} output); pass --overwrite to "
                          "replace it, or choose another path")
    raise OutputError(f"{label}: the file exists and was not written by raydpo (or was changed since); "
                      "refusing to replace it")
