import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYDPO_SHARED", ROOT.parent / "shared"))
GOODREADS = SHARED / "data" / "goodreads"
ORACLE = SHARED / "oracle"


def require_shared() -> None:
    if not GOODREADS.exists():
        pytest.skip(f"shared Goodreads data not found at {GOODREADS} (set RAYDPO_SHARED)")


@pytest.fixture(scope="session")
def goodreads():
    require_shared()
    from raydpo.data import load_dataset

    return load_dataset(GOODREADS)


@pytest.fixture
def goodreads_copy(tmp_path):
    """A writable copy of the Goodreads folder, for corrupting."""
    require_shared()
    dst = tmp_path / "goodreads"
    shutil.copytree(GOODREADS, dst)
    return dst


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    # keep the user's cache out of tests, but share one cache across the session
    os.environ.setdefault("RAYDPO_CACHE_DIR", str(tmp_path_factory.mktemp("raydpo-cache")))
    yield
