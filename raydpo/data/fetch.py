"""``raydpo data fetch goodreads``: download the public Goodreads sample of SPRec/ClusterExposure-DPO.

The seven files are fetched into a temporary folder, validated by loading them as a dataset,
and only then renamed into place: an interrupted download never leaves a folder that looks
complete. ``--base-url`` fetches every file from ``BASE/<file>`` instead (a mirror, or a local
server in tests).

What is downloaded is pinned: the sources are fixed commits (never a moving branch), every file
must have its published SHA-256 and size, and a download that grows past that size is aborted
while streaming. Only ``https://`` URLs are fetched, plus local files (``file://`` or a path) and
``http://`` on the loopback interface (a local mirror); a redirect must stay within those rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import RaydpoError
from ..io import atomic_path

# pinned source revisions (the commits whose files have the checksums below)
CE_COMMIT = "590c2cc02513e5b79ad47485bcaf51d3ce776b10"  # flora0110/ClusterExposure-DPO
SPREC_COMMIT = "5fec95b793379167caf5ae07787975d3dc413365"  # RegionCh/SPRec
CE = f"https://raw.githubusercontent.com/flora0110/ClusterExposure-DPO/{CE_COMMIT}/data"
SPREC = f"https://raw.githubusercontent.com/RegionCh/SPRec/{SPREC_COMMIT}/eval/Goodreads"


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str
    size: int  # bytes; a download is aborted as soon as it grows past this


GOODREADS_FILES = {
    "train.json": RemoteFile(f"{CE}/sampled/Goodreads/train.json",
                             "89abe5a80264613f538771e5c4afc6299a9139d3529297a599a86217ff00dfdd", 695070),
    "valid.json": RemoteFile(f"{CE}/sampled/Goodreads/valid.json",
                             "f4c608a3e27cb15e30f177344b6e97079ef6aaa40f9f1a178407a28633dfb575", 174770),
    "test.json": RemoteFile(f"{CE}/sampled/Goodreads/test.json",
                            "0479870687d016a7a92fe1eaab47b8c2079bfe92e8aa528f7ef02b7fcf4a0ea8", 702948),
    "id2name.json": RemoteFile(f"{SPREC}/id2name.json",
                               "2c275735eb004f08ccd3464cfd98530ae7b3e446a05ff829550d5e30bf1b23b1", 174061),
    "name2id.json": RemoteFile(f"{SPREC}/name2id.json",
                               "1ab171e265a45e752d27fce638950913f8fc32291db9e564592fd4e1858cee19", 165945),
    "name2genre.json": RemoteFile(f"{SPREC}/name2genre.json",
                                  "50f2bfb2156f5172ea048ea98fc4c351d3c5d7e1f494ba6ebe56ca2a3d8874d9", 412521),
    "genre_dict.json": RemoteFile(f"{SPREC}/genre_dict.json",
                                  "7dbc35402f611e24d2068326edb1cccd182fc63fbf16bbd84d1020334f7daa71", 193),
}
DATASETS = {"goodreads": GOODREADS_FILES}
CHUNK = 1 << 16


def check_url(url: str) -> str:
    """``url`` if it may be fetched: https, a local file, or http on the loopback interface."""
    from ..readers import one_line

    if not isinstance(url, str) or not url.strip():
        raise RaydpoError(f"--base-url: expected a URL, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return url
    if scheme == "file" or (scheme == "" and not url.startswith("//")):
        return url
    if scheme == "http" and parts.hostname and _loopback(parts.hostname):
        return url
    if scheme == "http":
        raise RaydpoError(f"{one_line(url, 200)}: plain http is refused (only https, local files, or http on "
                          "127.0.0.1/localhost for a local mirror)")
    raise RaydpoError(f"{one_line(url, 200)}: unsupported URL scheme {scheme or '(none)'!r}; only https, local "
                      "files and http on 127.0.0.1/localhost are fetched")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL that :func:`check_url` allows (no https -> http downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        if urllib.parse.urlsplit(req.full_url).scheme == "https" and urllib.parse.urlsplit(newurl).scheme != "https":
            raise RaydpoError(f"{req.full_url}: redirected to {newurl}, which is not https; refusing")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _source(base_url: str | None, fname: str, remote: RemoteFile) -> str:
    if not base_url:
        return remote.url
    base = base_url.rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme == "" and not base.startswith("//"):  # a local folder
        return Path(base, fname).resolve().as_uri()
    return f"{base}/{fname}"


def download(src: str, dest: Path, remote: RemoteFile, timeout: float = 60.0) -> None:
    """Stream ``src`` into ``dest``: abort past ``remote.size`` bytes; check the size and SHA-256."""
    from ..readers import one_line

    check_url(src)
    opener = urllib.request.build_opener(_CheckedRedirects)
    h = hashlib.sha256()
    n = 0
    try:
        with opener.open(src, timeout=timeout) as r, open(dest, "wb") as f:
            length = r.headers.get("Content-Length") if getattr(r, "headers", None) is not None else None
            if length and length.isdigit() and int(length) > remote.size:
                raise RaydpoError(f"{src}: {int(length)} bytes announced but the pinned file has {remote.size}; "
                                  "refusing to download it")
            while True:
                chunk = r.read(CHUNK)
                if not chunk:
                    break
                n += len(chunk)
                if n > remote.size:
                    raise RaydpoError(f"{src}: larger than the pinned file ({remote.size} bytes); download aborted")
                h.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise RaydpoError(f"could not download {src}: {one_line(reason)}") from None
    if n != remote.size:
        raise RaydpoError(f"{src}: {n} bytes but the pinned file has {remote.size} (incomplete or another file)")
    if h.hexdigest() != remote.sha256:
        raise RaydpoError(f"{src}: SHA-256 {h.hexdigest()} does not match the pinned {remote.sha256} "
                          "(a changed or tampered file)")


def fetch(name: str, out: str | Path, base_url: str | None = None, timeout: float = 60.0,
          progress: bool = True) -> Path:
    if name not in DATASETS:
        raise RaydpoError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if base_url is not None:
        check_url(base_url)  # before anything is written
    from tqdm.auto import tqdm

    from . import load_dataset

    out = Path(out)
    files = DATASETS[name]
    with atomic_path(out, kind="dataset") as tmp:
        tmp.mkdir(parents=True)
        with tqdm(total=len(files), desc=f"fetch {name}", unit="file", disable=not progress) as bar:
            for fname, remote in files.items():  # the bar ends its line before an error is printed
                download(_source(base_url, fname, remote), tmp / fname, remote, timeout=timeout)
                bar.update(1)
        ds = load_dataset(tmp)  # validates every file before the folder appears
        counts = ds.samples.frame["split"].value_counts().to_dict()
    print(f"fetched {name} into {out}: {len(ds.catalog)} items, samples {counts}")
    return out
