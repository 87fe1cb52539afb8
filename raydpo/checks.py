"""Checks shared by every config loader, run when a config loads (before Ray starts or a model
is touched). Each raises ``ValueError`` with a message that pydantic reports under the key path.

    check_name(value, what)        a name that becomes a path component (stage, run, search)
    check_model_name(name)         a preset, a hub id ``owner/name`` or an existing local folder
    check_deepspeed(value)         None, a preset (zero2, zero3) or an existing JSON file
    check_strategy(name)           a registered negative-sampling strategy (load plugins first)
    load_plugins(specs)            import strategy plugins (errors name the plugin)
    check_loss(name)               a TRL loss type, ``sdpo`` or ``dsdpo``
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

#: A name that becomes one path component: letters, digits, '_', '.', '-', starting with a letter
#: or digit (so never empty, '.', '..', absolute, or holding a separator).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_PRESETS = ("tiny", "smollm2-135m", "smollm2-135m-instruct")
DEEPSPEED_PRESETS = ("zero2", "zero3")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(value: str | None, what: str = "name") -> str | None:
    """``value`` if it is safe as one path component (None passes)."""
    if value is None:
        return value
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a safe name: use 1-128 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit (no '..', path separators or absolute paths)")
    return value


def looks_like_path(name: str) -> bool:
    """A model name written as a local path (``./x``, ``../x``, ``/x``, ``~/x``, ``C:\\x``, ``x\\y``)."""
    return (name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", "..")
            or bool(re.match(r"^[A-Za-z]:[\\/]", name)) or "\\" in name)


def check_model_name(name: str) -> str:
    """A preset, an existing local Hugging Face model folder, or a hub id ``owner/name``.

    A name written as a path must exist; a hub id that happens not to exist locally stays
    allowed (it is resolved online or from the local Hugging Face cache when loaded)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"expected a model name, got {name!r}")
    if name.lower() in MODEL_PRESETS:
        return name
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"model path {name!r} is a file, not a model folder")
        if not (p / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json (not a Hugging Face model folder)")
        return name
    if looks_like_path(name):
        raise ValueError(f"model folder {name!r} does not exist")
    if _HUB_ID.match(name) and ".." not in name and not name.endswith((".", "-")):
        return name
    raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(MODEL_PRESETS[:2])}), not an existing "
                     "local folder, and not a hub id of the form 'owner/name'")


def check_deepspeed(value: str | None) -> str | None:
    if value is None or value in DEEPSPEED_PRESETS:
        return value
    p = Path(str(value)).expanduser()
    if not p.is_file():
        raise ValueError(f"deepspeed must be one of {', '.join(DEEPSPEED_PRESETS)}, null or an existing JSON "
                         f"file; {value!r} is none of these")
    return value


def load_plugins(specs: Iterable[str]) -> None:
    from .errors import RaydpoError
    from .sampling.strategies import load_plugin

    for spec in specs:
        try:
            load_plugin(spec)
        except RaydpoError as e:
            raise ValueError(str(e)) from None


def check_strategy(name: str) -> str:
    from .sampling.strategies import strategy_names

    known = strategy_names()
    if name not in known:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(known)} "
                         "(strategies of plugins are known once sampling.plugins load them)")
    return name


def check_loss(name: str) -> str:
    from .training.config import OUR_LOSSES, TRL_LOSSES

    if name not in TRL_LOSSES + OUR_LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(TRL_LOSSES + OUR_LOSSES)}")
    return name


__all__ = ["MODEL_PRESETS", "NAME_RE", "check_deepspeed", "check_loss", "check_model_name", "check_name",
           "check_strategy", "load_plugins", "looks_like_path"]
