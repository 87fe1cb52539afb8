"""``raydpo data fetch goodreads``: download the public Goodreads sample of SPRec/ClusterExposure-DPO.

The seven files are fetched into a temporary folder, validated by loading them as a dataset,
and only then renamed into place: an interrupted download never leaves a folder that looks
complete. ``--base-url`` fetches every file from ``BASE/<file>`` instead (a mirror, or a local
server in tests).
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import RaydpoError
from ..io import atomic_path

CE = "https://raw.githubusercontent.com/flora0110/ClusterExposure-DPO/main/data"
SPREC = "https://raw.githubusercontent.com/RegionCh/SPRec/main/eval/Goodreads"
GOODREADS_FILES = {
    "train.json": f"{CE}/sampled/Goodreads/train.json",
    "valid.json": f"{CE}/sampled/Goodreads/valid.json",
    "test.json": f"{CE}/sampled/Goodreads/test.json",
    "id2name.json": f"{SPREC}/id2name.json",
    "name2id.json": f"{SPREC}/name2id.json",
    "name2genre.json": f"{SPREC}/name2genre.json",
    "genre_dict.json": f"{SPREC}/genre_dict.json",
}
DATASETS = {"goodreads": GOODREADS_FILES}


def fetch(name: str, out: str | Path, base_url: str | None = None, timeout: float = 60.0,
          progress: bool = True) -> Path:
    if name not in DATASETS:
        raise RaydpoError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    from tqdm.auto import tqdm

    from . import load_dataset

    out = Path(out)
    files = DATASETS[name]
    with atomic_path(out, kind="dataset") as tmp:
        tmp.mkdir(parents=True)
        for fname, url in tqdm(files.items(), desc=f"fetch {name}", unit="file", disable=not progress):
            src = f"{base_url.rstrip('/')}/{fname}" if base_url else url
            try:
                with urllib.request.urlopen(src, timeout=timeout) as r, open(tmp / fname, "wb") as f:
                    shutil.copyfileobj(r, f)
            except (urllib.error.URLError, OSError) as e:
                raise RaydpoError(f"could not download {src}: {e}") from None
        ds = load_dataset(tmp)  # validates every file before the folder appears
        counts = ds.samples.frame["split"].value_counts().to_dict()
    print(f"fetched {name} into {out}: {len(ds.catalog)} items, samples {counts}")
    return out
