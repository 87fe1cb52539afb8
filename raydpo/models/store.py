"""Where raydpo keeps the model folders it builds (the presets): ``cache_dir()/models``, each
folder finished with a marker file written last."""

from __future__ import annotations

import json
from pathlib import Path

MARKER = "raydpo_model.json"  # written last into every folder raydpo builds


def models_dir() -> Path:
    from ..evaluation.encoders import cache_dir  # (importing raydpo.evaluation is slow; only when needed)

    return cache_dir() / "models"


def is_built(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def marker_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("key")
    except (OSError, ValueError):
        return None


__all__ = ["MARKER", "is_built", "marker_key", "models_dir"]
