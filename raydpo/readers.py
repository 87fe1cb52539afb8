"""Reading input files robustly: every failure is one :class:`~raydpo.errors.DataError` line
that names the file (and, where it can, the record, field or key path).

Covered for every file raydpo reads: a missing path, a folder where a file is expected, a file
that cannot be opened (permissions, I/O errors), text that is not UTF-8, malformed JSON or YAML,
JSON nested too deeply to parse, and duplicate keys in a JSON object or a YAML mapping (the
later value would silently replace the earlier one, so both formats refuse them).

    read_text(path)          str, UTF-8 (a BOM is accepted)
    read_json(path)          the parsed JSON; duplicate keys are an error naming the key path
    read_yaml(path)          the parsed YAML (safe loader); duplicate keys are an error
    check_file(path)         a readable regular file (for readers that open it themselves,
                             e.g. Parquet/CSV through pyarrow)
    one_line(text)           collapse a multi-line library message into one line
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DataError


def one_line(text: object, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _os_reason(e: OSError) -> str:
    return one_line(e.strerror or e.__class__.__name__)


def check_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path if it is an existing, readable regular file; else a DataError naming it."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{what} not found", path=p) from None
    except NotADirectoryError:
        raise DataError(f"{what} not found (a parent of the path is a file)", path=p) from None
    except OSError as e:
        raise DataError(f"cannot read the {what}: {_os_reason(e)}", path=p) from None
    import stat as _stat

    if _stat.S_ISDIR(st.st_mode):
        raise DataError(f"is a folder; expected a {what}", path=p)
    if not _stat.S_ISREG(st.st_mode):
        raise DataError(f"is not a regular file; expected a {what}", path=p)
    try:
        with open(p, "rb") as f:
            f.read(0)
    except OSError as e:
        raise DataError(f"cannot read the {what}: {_os_reason(e)}", path=p) from None
    return p


def check_folder(path: str | Path, what: str = "folder") -> Path:
    """``path`` as a Path if it is an existing, listable folder; else a DataError naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found", path=p)
    if not p.is_dir():
        raise DataError(f"is a file; expected a {what}", path=p)
    try:
        next(iter(os.scandir(p)), None)
    except OSError as e:
        raise DataError(f"cannot read the {what}: {_os_reason(e)}", path=p) from None
    return p


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    p = check_file(path, what)
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read the {what}: {_os_reason(e)}", path=p) from None


def decode_utf8(data: bytes, path: str | Path) -> str:
    """UTF-8 text (a leading BOM is dropped); an invalid byte is a DataError naming its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text: invalid byte 0x{data[e.start]:02x} at line {line} "
                        f"(byte offset {e.start})", path=path) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's text, strictly UTF-8; every failure is one DataError line naming the file."""
    return decode_utf8(read_bytes(path, what), path)


# --- JSON -----------------------------------------------------------------------------------------


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs (to locate a duplicate key)."""


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey
    return d


def _key_path(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _find_duplicate(obj: Any) -> tuple[list, str] | None:
    """``(path parts of the object, duplicated key)`` of the first duplicate key (iterative walk)."""
    stack: list[tuple[Any, list]] = [(obj, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Pairs):
            seen: set[str] = set()
            for k, _ in node:
                if k in seen:
                    return path, k
                seen.add(k)
            stack.extend((v, path + [k]) for k, v in reversed(node))
        elif isinstance(node, list):
            stack.extend((v, path + [i]) for i, v in reversed(list(enumerate(node))))
    return None


def loads_json(text: str, path: str | Path, *, duplicate_keys: str = "error") -> Any:
    """Parse JSON text read from ``path``; errors name the file (line, column, key path)."""
    hook = _no_duplicates if duplicate_keys == "error" else None
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=path) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", path=path) from None
    except _DuplicateKey:
        pass
    try:
        found = _find_duplicate(json.loads(text, object_pairs_hook=_Pairs))
    except RecursionError:  # pragma: no cover - the first parse got through
        found = None
    if found is None:  # pragma: no cover
        raise DataError("duplicate key in a JSON object", path=path)
    parts, key = found
    msg = f"duplicate key {key!r} (a later value would silently replace the earlier one)"
    if parts and isinstance(parts[0], int):  # a list of records: name the record and the field
        raise DataError(msg, path=path, record=parts[0], field=_key_path(parts[1:] + [key]))
    raise DataError(msg, path=path, field=_key_path(parts + [key]))


def read_json(path: str | Path, *, duplicate_keys: str = "error", what: str = "file") -> Any:
    """Read a JSON file: one DataError line naming the file for every failure (missing, folder,
    unreadable, not UTF-8, malformed, nested too deeply, duplicate key with its key path)."""
    return loads_json(read_text(path, what), path, duplicate_keys=duplicate_keys)


def read_json_pairs(path: str | Path, what: str = "file") -> list[tuple[str, Any]]:
    """A JSON object's (key, value) pairs in file order, duplicates kept (the caller reports them)."""
    text = read_text(path, what)
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", path=path) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", path=path) from None
    if not isinstance(obj, _Pairs):
        raise DataError(f"expected a JSON object, got a JSON {_json_kind(obj)}", path=path)

    def plain(v: Any) -> Any:  # nested objects back to dicts (iteratively deep enough for data files)
        if isinstance(v, _Pairs):
            return {k: plain(x) for k, x in v}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    try:
        return [(k, plain(v)) for k, v in obj]
    except RecursionError:
        raise DataError("JSON nested too deeply to read", path=path) from None


def _json_kind(obj: Any) -> str:
    if isinstance(obj, (dict, _Pairs)):
        return "object"
    if isinstance(obj, list):
        return "list"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, bool):
        return "boolean"
    if obj is None:
        return "null"
    return "number"


def json_kind(obj: Any) -> str:
    """``object``, ``list``, ``string``, ``number``, ``boolean`` or ``null`` (for messages)."""
    return _json_kind(obj)


# --- YAML -----------------------------------------------------------------------------------------


def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (naming its key path)."""

    def construct_mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found an unhashable key",
                    key_node.start_mark) from None
            if key in seen:
                path = getattr(loader, "_raydpo_path", {}).get(id(node), "")
                raise _YAMLDuplicate(key, path, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        loader.flatten_mapping(node)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


class _YAMLDuplicate(Exception):
    def __init__(self, key, path: str, line: int, first_line: int) -> None:
        self.key, self.path, self.line, self.first_line = key, path, line, first_line


def _annotate_paths(node, prefix: str, out: dict) -> None:
    """Map every mapping node's id to its dotted key path (iterative)."""
    import yaml

    stack = [(node, prefix)]
    while stack:
        n, p = stack.pop()
        if isinstance(n, yaml.MappingNode):
            out[id(n)] = p
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else "?"
                stack.append((v, f"{p}.{key}" if p else str(key)))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                stack.append((v, f"{p}[{i}]"))


def yaml_error_line(e: Exception) -> str:
    """A PyYAML error as one line: the problem and where (line, column)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    context = getattr(e, "context", None)
    if problem:
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        ctx = f" ({context})" if context else ""
        return one_line(f"{problem}{where}{ctx}")
    return one_line(e)


def loads_yaml(text: str, path: str | Path, *, what: str = "YAML") -> Any:
    """Parse YAML text (safe loader, duplicate keys refused); errors are one DataError line."""
    import yaml

    Loader = _yaml_loader()
    try:
        loader = Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            paths: dict = {}
            _annotate_paths(node, "", paths)
            loader._raydpo_path = paths
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except _YAMLDuplicate as d:
        where = f"{d.path}.{d.key}" if d.path else str(d.key)
        raise DataError(f"{where}: duplicate key {d.key!r} (lines {d.first_line} and {d.line}); "
                        "a later value would silently replace the earlier one", path=path) from None
    except yaml.YAMLError as e:
        raise DataError(f"invalid {what}: {yaml_error_line(e)}", path=path) from None
    except RecursionError:
        raise DataError(f"{what} nested too deeply to read", path=path) from None


def read_yaml(path: str | Path, *, what: str = "YAML file") -> Any:
    """Read a YAML file (see :func:`loads_yaml`); missing, folder, unreadable and not-UTF-8 files
    are one DataError line naming the file."""
    return loads_yaml(read_text(path, what), path, what="YAML")


__all__ = ["check_file", "check_folder", "decode_utf8", "json_kind", "loads_json", "loads_yaml", "one_line",
           "read_bytes", "read_json", "read_json_pairs", "read_text", "read_yaml", "yaml_error_line"]
