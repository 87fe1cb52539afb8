"""`raydpo data fetch goodreads` against a local HTTP server serving the shared sample."""

import functools
import http.server
import threading

import pytest

from conftest import GOODREADS, require_shared
from raydpo.cli import main


@pytest.fixture
def server():
    require_shared()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(GOODREADS))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_goodreads_from_a_mirror(server, tmp_path, capsys):
    out = tmp_path / "gr"
    assert main(["data", "fetch", "goodreads", "--out", str(out), "--base-url", server]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != ".raydpo-output.json") == sorted(
        ["train.json", "valid.json", "test.json", "id2name.json", "name2id.json", "name2genre.json", "genre_dict.json"])
    assert (out / "test.json").read_bytes() == (GOODREADS / "test.json").read_bytes()
    assert "4058 items" in capsys.readouterr().out


def test_fetch_failure_leaves_nothing(server, tmp_path, capsys):
    out = tmp_path / "gr"
    rc = main(["data", "fetch", "goodreads", "--out", str(out), "--base-url", server + "/missing"])
    assert rc == 2
    assert "could not download" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sources_are_pinned_with_checksums_and_sizes():
    from raydpo.data.fetch import GOODREADS_FILES

    require_shared()
    import hashlib

    for name, remote in GOODREADS_FILES.items():
        assert "/main/" not in remote.url and "/master/" not in remote.url
        assert remote.url.startswith("https://")
        data = (GOODREADS / name).read_bytes()  # the shared copy is the published sample
        assert hashlib.sha256(data).hexdigest() == remote.sha256 and len(data) == remote.size


def test_fetch_from_a_local_folder(tmp_path, capsys):
    require_shared()
    out = tmp_path / "gr"
    assert main(["data", "fetch", "goodreads", "--out", str(out), "--base-url", str(GOODREADS)]) == 0
    assert (out / "train.json").read_bytes() == (GOODREADS / "train.json").read_bytes()


@pytest.mark.parametrize("url,match", [
    ("http://example.com/data", "plain http is refused"),
    ("ftp://example.com/data", "unsupported URL scheme 'ftp'"),
    ("gopher://127.0.0.1/x", "unsupported URL scheme 'gopher'"),
])
def test_fetch_refuses_other_schemes(tmp_path, capsys, url, match):
    out = tmp_path / "gr"
    assert main(["data", "fetch", "goodreads", "--out", str(out), "--base-url", url]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tampered(tmp_path):
    require_shared()
    import shutil

    d = tmp_path / "mirror"
    shutil.copytree(GOODREADS, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def test_fetch_refuses_a_changed_file(tampered, tmp_path, capsys):
    p = tampered / "valid.json"
    data = bytearray(p.read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")  # same size, another checksum
    p.write_bytes(bytes(data))
    out = tmp_path / "gr"
    assert main(["data", "fetch", "goodreads", "--out", str(out), "--base-url", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert "valid.json: SHA-256" in err and "does not match the pinned" in err
    assert not out.exists()


def test_fetch_aborts_a_file_larger_than_pinned(tampered, tmp_path, capsys):
    with open(tampered / "genre_dict.json", "ab") as f:
        f.write(b" " * 10_000_000)
    out = tmp_path / "gr"
    assert main(["data", "fetch", "goodreads", "--out", str(out), "--base-url", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert "genre_dict.json: 10000193 bytes announced but the pinned file has 193" in err
    assert not out.exists()


def test_download_aborts_while_streaming_past_the_size(tmp_path, monkeypatch):
    """A server that announces no length: the stream is cut as soon as it passes the pinned size."""
    import io
    import urllib.request

    from raydpo.data import fetch as F
    from raydpo.errors import RaydpoError

    class Endless(io.RawIOBase):
        headers = {}
        served = 0

        def read(self, n=-1):
            Endless.served += F.CHUNK
            return b"x" * F.CHUNK

    class Opener:
        def open(self, url, timeout=None):
            return _Ctx(Endless())

    class _Ctx:
        def __init__(self, r):
            self.r, self.headers = r, {}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, n):
            return self.r.read(n)

    monkeypatch.setattr(urllib.request, "build_opener", lambda *a: Opener())
    remote = F.RemoteFile("https://example.org/f.json", "0" * 64, 100_000)
    with pytest.raises(RaydpoError, match="larger than the pinned file"):
        F.download(remote.url, tmp_path / "f.json", remote)
    assert Endless.served <= 100_000 + 2 * F.CHUNK
