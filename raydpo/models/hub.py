"""Resolving a model name: a preset (``tiny``, ``smollm2-135m``, built on first use), a local
Hugging Face folder, or a hub id ``owner/name``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RaydpoError
from .smollm2 import SMOLLM2_135M, smollm2_135m_path
from .tiny import TINY, build_tiny_model

if TYPE_CHECKING:  # pragma: no cover
    from ..data.schema import Catalog

PRESETS = (TINY, SMOLLM2_135M)
_ALIASES = {
    "tiny": TINY,
    "smollm2-135m": SMOLLM2_135M,
    "smollm2-135m-instruct": SMOLLM2_135M,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(name: str) -> bool:
    """A plausible Hugging Face hub id: ``owner/name`` (letters, digits, ``_.-``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_model_path(name_or_path: str, *, catalog: "Catalog | None" = None) -> str:
    """The folder (or hub id) ``from_pretrained`` should read for ``name_or_path``; builds a
    preset on first use. Raises a RaydpoError for an unknown name before any loading."""
    name = str(name_or_path)
    preset = _ALIASES.get(name.lower())
    if preset == TINY:
        if catalog is None:
            raise RaydpoError("model 'tiny' needs the catalog (its tokenizer is trained on the titles): "
                              "pass catalog=")
        return str(build_tiny_model(catalog))
    if preset == SMOLLM2_135M:
        return str(smollm2_135m_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RaydpoError(f"model path {str(path)!r} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise RaydpoError(f"model folder {str(path)!r} has no config.json (not a Hugging Face model folder)")
        return str(path)
    if is_hub_id(name):
        return name
    raise RaydpoError(
        f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), not an existing local folder, "
        "and not a hub id of the form 'owner/name'"
    )


__all__ = ["PRESETS", "is_hub_id", "resolve_model_path"]
