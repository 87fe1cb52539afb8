"""Where outputs live: one storage root that outlives jobs and clusters, and which Ray cluster runs.

The storage root is ``ray.storage_path`` of the config, else ``$RAYDPO_STORAGE``: a folder (on a
cluster, a shared mount such as EFS/NFS that every node sees) or an object-store URI
(``s3://bucket/prefix``; any S3-compatible server through ``AWS_ENDPOINT_URL``). Under it::

    runs/<run>/<stage>/<key>/   pipeline run folders: the stage caches (config ``run_dir``)
    train/<stage>-<key>/        Ray Train runs and their checkpoints
    tune/<search>/              a search: trials.csv, pareto.*, study.journal (Optuna), mlflow.db,
                                and experiment/ (Ray Tune's state, what ``--resume`` restores)
    data/goodreads/             datasets fetched on demand (``data.fetch``)

Relative output paths (``run_dir``, ``--out``) resolve against the root. With an object-store
root, Ray writes Train checkpoints and the Tune experiment there itself; the files raydpo
writes (stage caches, search results, the Optuna journal) are written to a local mirror
(``$RAYDPO_STORAGE_CACHE``, default ``~/.cache/raydpo/storage``) and uploaded when a stage or a
search finishes; a later run on any machine downloads finished stages instead of recomputing
them. A multi-node run also needs its run folder on a mount every node sees: before any work,
:func:`check_nodes_share` has one task per node read a nonce the driver wrote there.

A Ray job runs in a copy of its working dir that Ray deletes (``.../runtime_resources/
working_dir_files/_ray_pkg_<hash>``): there, relative outputs without a storage root are
refused instead of written where they would be lost.

The storage root is a trust boundary: resuming unpickles what is stored there (optimizer and
DeepSpeed states, Tune's experiment state). raydpo records a SHA-256 of every file of each
Train checkpoint it writes (:func:`write_manifest`) and refuses to resume from a checkpoint
that does not match (:func:`verify_manifests`); that catches corrupted and partial copies, not
a writer who can rewrite the manifest too. Give write access to the root only to whoever may
run code on the cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import RaydpoError
from .io import sha256_file

ENV = "RAYDPO_STORAGE"
CACHE_ENV = "RAYDPO_STORAGE_CACHE"
JOB_DIR_MARK = ("runtime_resources", "working_dir_files")
MANIFEST_PREFIX = "raydpo_sha256"
NO_ROOT_IN_JOB = ("running as a Ray job in Ray's temporary copy of the working dir ({wd}), which Ray "
                  "deletes, and no storage root is set: set RAYDPO_STORAGE (runtime_env env_vars) or "
                  "ray.storage_path to a shared folder or an s3:// URI, or give absolute output paths")


# --- the storage root -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageRoot:
    """``uri``: the root as Ray and the user see it (an absolute folder or ``s3://...``);
    ``local``: the folder raydpo writes its own files to (the root itself, or the local mirror
    of an object-store root); ``source``: where the setting came from."""

    uri: str
    local: Path
    remote: bool
    source: str

    def join(self, *parts: str) -> str:
        """A location under the root, as a URI for Ray (``storage_path``) or a folder."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    def remote_of(self, local_path: str | Path) -> str | None:
        """The object-store URI of a path in the local mirror (None for a folder root or a path
        outside the mirror)."""
        if not self.remote:
            return None
        try:
            rel = Path(local_path).resolve().relative_to(self.local.resolve())
        except ValueError:
            return None
        return self.join(rel.as_posix())

    def describe(self) -> str:
        if self.remote:
            return f"{self.uri} (from {self.source}; local mirror {self.local})"
        return f"{self.uri} (from {self.source})"


def _mirror_dir(uri: str) -> Path:
    scheme, _, rest = uri.partition("://")
    base = Path(os.environ.get(CACHE_ENV) or Path("~/.cache/raydpo/storage").expanduser())
    safe = [p for p in rest.split("?")[0].split("/") if p and p not in (".", "..")]
    return base.joinpath(scheme, *safe)


def storage_root(configured: str | None = None) -> StorageRoot | None:
    """The storage root: ``configured`` (``ray.storage_path``), else ``$RAYDPO_STORAGE``, else None."""
    value, source = (configured, "ray.storage_path") if configured else (os.environ.get(ENV), ENV)
    if not value:
        return None
    value = value.strip()
    if value.startswith("file://"):
        value = value[len("file://"):]
    if "://" in value:
        return StorageRoot(uri=value.rstrip("/"), local=_mirror_dir(value), remote=True, source=source)
    p = Path(value).expanduser()
    if not p.is_absolute():
        wd = job_working_dir()
        if wd is not None:
            raise RaydpoError(f"{source}: {value!r} is a relative path inside Ray's temporary copy of the "
                              f"working dir ({wd}); give an absolute shared folder or an s3:// URI")
        p = p.resolve()
    return StorageRoot(uri=str(p), local=p, remote=False, source=source)


def job_working_dir(cwd: str | Path | None = None) -> Path | None:
    """Ray's unpacked working dir of a job (``.../runtime_resources/working_dir_files/
    _ray_pkg_<hash>``) when ``cwd`` (default: the current dir) lies inside one, else None."""
    parts = Path(cwd or os.getcwd()).resolve().parts
    for i in range(len(parts) - 1):
        if (parts[i], parts[i + 1]) == JOB_DIR_MARK:
            return Path(*parts[: min(len(parts), i + 3)])
    return None


def output_path(path: str | Path, root: StorageRoot | None, what: str = "output") -> Path:
    """Where a (possibly relative) output path goes: absolute paths as given; relative ones
    under the storage root (its local mirror for an object store), else under the current dir,
    except inside a job's temporary working dir, where that is refused."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if root is not None:
        return root.local / p
    wd = job_working_dir()
    if wd is not None:
        raise RaydpoError(f"{what} {str(path)!r}: " + NO_ROOT_IN_JOB.format(wd=wd))
    return p.resolve()


def input_path(path: str | Path, root: StorageRoot | None) -> Path:
    """Where a relative input path is found: under the storage root when it exists there,
    else relative to the current dir (a file shipped in the working dir), else under the root
    (where a fetch puts it)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if root is not None:
        under = root.local / p
        if under.exists() or not p.exists():
            return under
    return p.resolve()


def resolve_config(cfg):
    """``cfg`` with ``run_dir`` and ``data.path`` made absolute against the storage root and
    ``ray.storage_path`` set to it (so Ray Train and Tune write there). Idempotent."""
    from .config import with_overrides

    root = storage_root(cfg.ray.storage_path)
    updates: dict[str, Any] = {"run_dir": str(output_path(cfg.run_dir, root, "run_dir"))}
    if root is not None:
        updates["ray.storage_path"] = root.uri
    if cfg.data.path:
        updates["data.path"] = str(input_path(cfg.data.path, root))
    return with_overrides(cfg, updates, source="<storage>")


# --- object-store mirror ----------------------------------------------------------------------------


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def remote_exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local: str | Path, uri: str, last: Iterable[str] = ("_SUCCESS",)) -> int:
    """Upload every file under ``local`` to ``uri`` (the names in ``last`` after all others, so
    that a copy that looks finished is complete); returns the number of files."""
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file() and ".tmp-" not in p.name),
                   key=lambda p: (p.name in set(last), str(p)))
    fs, base = _fs(uri)
    for p in files:
        _put(fs, p, f"{base.rstrip('/')}/{p.relative_to(local).as_posix()}")
    return len(files)


def _put(fs, local: Path, dest: str) -> None:
    fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(dest) as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)


def upload_file(local: str | Path, uri: str) -> None:
    fs, dest = _fs(uri)
    _put(fs, Path(local), dest)


def delete_remote(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def download_dir(uri: str, local: str | Path) -> int:
    """Download every object under ``uri`` into ``local`` (atomically: a temporary folder renamed
    into place); returns the number of files."""
    import pyarrow.fs as pafs

    from .io import atomic_path

    fs, base = _fs(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File]
    with atomic_path(Path(local)) as tmp:
        tmp.mkdir(parents=True)
        for info in infos:
            rel = info.path[len(base.rstrip("/")) + 1:]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    return len(infos)


def download_file(uri: str, local: str | Path) -> bool:
    """Download one object if it exists; returns whether it did."""
    from .io import atomic_path

    if not remote_exists(uri):
        return False
    fs, path = _fs(uri)
    with atomic_path(Path(local)) as tmp, fs.open_input_stream(path) as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)
    return True


# --- which Ray cluster ------------------------------------------------------------------------------


def ray_init(address: str | None = None, *, log_to_driver: bool = True, quiet: bool = False) -> str:
    """Start or join Ray the way Ray does (``address``, else ``RAY_ADDRESS``, else a cluster
    already running on this machine, else a new local instance; ``"local"`` always starts a new
    one) and print which cluster it is. Returns that line. No-op when Ray is up."""
    import ray

    if ray.is_initialized():
        return ""
    source = "ray.address" if address else ("RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else None)
    target = address or os.environ.get("RAY_ADDRESS") or None
    joining = None
    try:
        from ray._private.services import canonicalize_bootstrap_address

        joining = canonicalize_bootstrap_address(target) if not (target or "").startswith("ray://") else target
    except Exception:  # noqa: BLE001 - Ray reports a bad address itself below
        joining = target
    ray.init(address=target, include_dashboard=False, log_to_driver=log_to_driver)
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    what = f"{nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
    if joining:
        line = f"ray: joined the Ray cluster at {joining} ({source or 'the cluster running on this machine'}): {what}"
    else:
        line = f"ray: started a new local Ray instance: {what}"
    if not quiet:
        print(line, flush=True)
    return line


_checked: set[str] = set()


def check_nodes_share(folder: str | Path, timeout_s: float = 300.0) -> int:
    """On a multi-node cluster, check that every alive node sees ``folder``: the driver writes a
    nonce there and one task per node (pinned to it) reads it. Raises one line naming the
    first node that does not; returns the number of nodes checked (once per folder and process)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(folder)
    if str(folder) in _checked:
        return 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return len(nodes)
    folder.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(16)
    probe_file = folder / f".raydpo-node-check-{nonce[:12]}"
    probe_file.write_text(nonce)

    @ray.remote(num_cpus=0, max_retries=0)
    def _read(path: str) -> tuple[str, str | None]:
        try:
            return socket.gethostname(), Path(path).read_text()
        except OSError:
            return socket.gethostname(), None

    try:
        refs = [(n, _read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(str(probe_file))) for n in nodes]
        for node, ref in refs:
            try:
                host, seen = ray.get(ref, timeout=timeout_s)
            except Exception as e:  # noqa: BLE001
                raise RaydpoError(f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]}) could not be "
                                  f"checked for the shared run folder {folder}: {type(e).__name__}: {e}") from None
            if seen != nonce:
                raise RaydpoError(f"node {node.get('NodeManagerAddress')} ({host}, {node['NodeID'][:8]}) does not see "
                                  f"the run folder {folder} the driver wrote: put the storage root (or run_dir) on a "
                                  "mount every node shares, e.g. EFS/NFS at /mnt/shared")
    finally:
        probe_file.unlink(missing_ok=True)
    _checked.add(str(folder))
    print(f"storage: all {len(nodes)} nodes see {folder}", flush=True)
    return len(nodes)


# --- checkpoint manifests ------------------------------------------------------------------------------


def write_manifest(folder: str | Path, rank: int = 0) -> Path:
    """Record the SHA-256 of every file this rank wrote to a checkpoint folder
    (``raydpo_sha256-r<rank>.json``), before Ray uploads it."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)}
    out = folder / f"{MANIFEST_PREFIX}-r{rank}.json"
    out.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    return out


def verify_manifests(folder: str | Path) -> int:
    """Check a downloaded checkpoint against its manifests before anything in it is loaded:
    every file listed with a matching SHA-256, and no file that no manifest lists. Raises a
    RaydpoError naming the first offending file; returns the number of files checked."""
    folder = Path(folder)
    manifests = sorted(folder.glob(f"{MANIFEST_PREFIX}-r*.json"))
    if not manifests:
        raise RaydpoError(f"checkpoint {folder}: no {MANIFEST_PREFIX} manifest; refusing to resume from a "
                          "checkpoint raydpo did not write (the storage root is a trust boundary)")
    known: dict[str, set[str]] = {}
    for m in manifests:
        try:
            for rel, digest in json.loads(m.read_text())["files"].items():
                known.setdefault(rel, set()).add(digest)
        except (ValueError, KeyError, TypeError):
            raise RaydpoError(f"checkpoint {folder}: unreadable manifest {m.name}; refusing to resume") from None
    present = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*")
               if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)}
    for rel in sorted(set(known) - set(present)):
        raise RaydpoError(f"checkpoint {folder}: {rel} is missing; refusing to resume")
    for rel, p in sorted(present.items()):
        if rel not in known:
            raise RaydpoError(f"checkpoint {folder}: {rel} is not in the checkpoint's manifest; refusing to resume")
        if sha256_file(p) not in known[rel]:
            raise RaydpoError(f"checkpoint {folder}: {rel} does not match its recorded SHA-256; refusing to resume "
                              "(the file changed after raydpo wrote it)")
    return len(present)


__all__ = [
    "ENV", "StorageRoot", "check_nodes_share", "download_dir", "download_file", "input_path", "job_working_dir",
    "output_path", "ray_init", "remote_exists", "resolve_config", "storage_root", "upload_dir", "upload_file",
    "verify_manifests", "write_manifest",
]
