import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYDPO_SHARED", ROOT.parent / "shared"))
GOODREADS = SHARED / "data" / "goodreads"
ORACLE = SHARED / "oracle"
# dtype "auto" is fp32 on every CPU in the tests (not bf16 on CPUs with AVX512-BF16/AMX), so that
# their numbers do not depend on the machine; tests of the choice itself set it themselves
os.environ.setdefault("RAYDPO_CPU_BF16", "0")


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


@pytest.fixture(autouse=True)
def _strategy_registry_restored():
    """Plugin strategies a test loads (directly, or through a config's ``sampling.plugins``) are
    removed after it, so no later test sees them in ``strategy_names()``."""
    from raydpo.sampling import strategies

    registry = dict(strategies._REGISTRY)
    loaded = dict(strategies._LOADED_FILES)
    yield
    strategies._REGISTRY.clear()
    strategies._REGISTRY.update(registry)
    strategies._LOADED_FILES.clear()
    strategies._LOADED_FILES.update(loaded)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    # keep the user's cache out of tests, but share one cache across the session
    os.environ.setdefault("RAYDPO_CACHE_DIR", str(tmp_path_factory.mktemp("raydpo-cache")))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance per test session (starting Ray costs seconds), always its own
    (``address="local"``): never a cluster already running on this machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic dataset saved to disk (300 users, 150 items)."""
    from raydpo.data.synthetic import SyntheticConfig, generate

    ds = generate(SyntheticConfig(n_users=300, n_items=150, seed=3))
    path = tmp_path_factory.mktemp("synthetic") / "data"
    ds.save(path)
    return ds, path


@pytest.fixture(scope="session")
def tiny_model(synthetic_small):
    from raydpo.models import load_model

    ds, _ = synthetic_small
    model, tok = load_model("tiny", catalog=ds.catalog)
    return model, tok
