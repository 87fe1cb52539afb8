"""The data layer: one internal representation, readers for the SPRec format and generic
interaction logs, a synthetic generator, and catalog statistics."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .schema import SPLITS, UNKNOWN_ITEM, Catalog, Dataset, Samples
from .interactions import read_interactions
from .sprec import is_sprec_folder, read_sprec


def load_dataset(path: str | Path) -> Dataset:
    """Load a dataset folder: raydpo's own format (``meta.json``) or the SPRec format (``id2name.json``)."""
    from ..readers import check_folder

    p = Path(path)
    if not p.exists():
        raise DataError("dataset folder not found", path=p)
    check_folder(p, "dataset folder")
    if (p / "meta.json").exists() or (p / "meta.json").is_symlink():
        return Dataset.load(p)
    if is_sprec_folder(p):
        return read_sprec(p)
    raise DataError("not a dataset folder: expected meta.json (raydpo) or id2name.json + train/valid/test.json "
                    "(SPRec format)", path=p)


__all__ = ["SPLITS", "UNKNOWN_ITEM", "Catalog", "Dataset", "DataError", "Samples", "load_dataset", "read_interactions", "read_sprec"]
