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
