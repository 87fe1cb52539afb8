"""Argument checking for the ``raydpo`` command line: every bad argument is ONE line on stderr,
``raydpo: error: ...``, with exit status 2 (argparse's usage block and tracebacks never show).

    RaydpoArgumentParser     argparse parser whose errors are one line naming the option
    int_at_least(n)          an ``type=`` for integers >= n
    number_above(x)          an ``type=`` for finite numbers > x
    share                    an ``type=`` for a share in (0, 1] (``nan`` and negatives refused)
    parse_sets(groups)       repeated ``--set K=V [K=V ...]`` flags, accumulated; a key twice is an error
    check_synth_memory(...)  refuse a synthetic dataset the machine cannot hold (with the estimate)
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, NoReturn

from .errors import RaydpoError


class RaydpoArgumentParser(argparse.ArgumentParser):
    """Errors are one line: ``raydpo: error: argument --k: must be an integer >= 1, got '0'``
    (``--help`` shows the usage). Sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        from .readers import one_line

        cmd = self.prog.removeprefix("raydpo").strip()
        where = f"{cmd}: " if cmd else ""
        self.exit(2, f"raydpo: error: {where}{one_line(message, 1000)} (see `{self.prog} --help`)\n")


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{why}, got {text!r}")
        return v

    parse.__name__ = f"integer>={minimum}"
    return parse


def number_above(minimum: float, inclusive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or (v < minimum if inclusive else v <= minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {minimum}, "
                                             f"got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


def share(text: str) -> float:
    """A share of items in (0, 1]."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0 < v <= 1):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text!r}")
    return v


def confidence_level(text: str) -> float:
    """A confidence level strictly between 0 and 1 (e.g. 0.95)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not (0 < v < 1):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (e.g. 0.95), got {text!r}")
    return v


def parse_sets(groups: list | None) -> dict[str, Any]:
    """``--set K=V [K=V ...]`` given any number of times, flattened in order. A value is parsed as
    YAML (``[1, 2]``, ``0.1``, ``true``); a malformed value or a key given twice is one error line
    naming the override."""
    import yaml

    from .readers import yaml_error_line

    items: list[str] = []
    for g in groups or []:
        items.extend(g if isinstance(g, list) else [g])
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RaydpoError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise RaydpoError(f"--set {item!r}: empty key")
        if k in out:
            raise RaydpoError(f"--set {k}: given twice ({k}={out[k]!r} and {item!r}); give each key once")
        try:
            out[k] = yaml.safe_load(v) if v.strip() else v
        except yaml.YAMLError as e:
            raise RaydpoError(f"--set {item!r}: the value is not valid YAML: {yaml_error_line(e)}") from None
    return out


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (None if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


#: Measured peak memory of ``data synth`` + save: about 0.8 KB per user plus 0.12 KB per history
#: item (CPython 3.12, pandas object columns); the estimate doubles it to leave headroom.
SYNTH_BYTES_PER_USER = 800
SYNTH_BYTES_PER_ITEM = 120
SYNTH_HEADROOM = 2.0


def synth_bytes(users: int, history_len: int) -> int:
    return int(SYNTH_HEADROOM * users * (SYNTH_BYTES_PER_USER + SYNTH_BYTES_PER_ITEM * (history_len + 1)))


def check_synth_memory(users: int, history_len: int, available: int | None = None) -> None:
    """Refuse a synthetic dataset whose estimated peak memory exceeds the available memory."""
    need = synth_bytes(users, history_len)
    have = available if available is not None else available_memory()
    if have is not None and need > have:
        raise RaydpoError(f"data synth: --users {users} with --history-len {history_len} needs about "
                          f"{_gb(need)} of memory (estimate) but {_gb(have)} is available; use fewer users")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report_unexpected(e: BaseException) -> str:
    """One line for an error no check anticipated (a last resort: the specific checks name the file)."""
    from .readers import one_line

    if isinstance(e, UnicodeDecodeError):
        return one_line(f"a file is not UTF-8 text ({e.reason} at byte {e.start}); run with -v for details")
    if isinstance(e, OSError):
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return one_line(f"{name}{e.strerror or type(e).__name__}")
    if isinstance(e, RecursionError):
        return "input nested too deeply to read"
    if isinstance(e, MemoryError):
        return "out of memory"
    return one_line(f"{type(e).__name__}: {e}")


def print_error(message: str) -> None:
    from .readers import one_line

    print(f"raydpo: error: {one_line(message, 4000)}", file=sys.stderr)


__all__ = ["RaydpoArgumentParser", "available_memory", "check_synth_memory", "int_at_least", "number_above",
           "parse_sets", "print_error", "report_unexpected", "share", "synth_bytes"]
