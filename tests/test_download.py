"""Downloads through a real HTTP server on 127.0.0.1: hashes, cache, atomicity, errors, concurrency."""

import hashlib
import io
import os
import random
import subprocess
import sys
import threading

import pytest

from tfgcvit.weights import download
from tfgcvit.weights.download import DownloadError, cache_dir, fetch, mirrored
from weights_helpers import REPO, FileServer

# Seeded, so that parallel test workers (pytest-xdist) collect the same test ids.
PAYLOAD = random.Random(0).randbytes(3 * 1024 * 1024 + 17)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "gcvit_test.pth.tar"
URL_PATH = f"/files/{NAME}"


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TFGCVIT_HOME", str(home))
    monkeypatch.delenv("TFGCVIT_MIRROR", raising=False)
    return home


def _cache_listing(home):
    directory = home / "checkpoints"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TFGCVIT_HOME", str(tmp_path / "x"))
    assert cache_dir() == str(tmp_path / "x")
    monkeypatch.delenv("TFGCVIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / ".cache" / "tfgcvit")


def test_fetch_verifies_and_caches(cache_home):
    with FileServer({URL_PATH: PAYLOAD}) as server:
        path = fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256)
        assert path == str(cache_home / "checkpoints" / NAME)
        assert open(path, "rb").read() == PAYLOAD
        assert open(path + ".sha256").read().split()[0] == PAYLOAD_SHA256
        # Cached: no second request.
        assert fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256) == path
        assert server.requests == [URL_PATH]
    assert _cache_listing(cache_home) == [NAME, NAME + ".lock", NAME + ".sha256"]


def test_progress_is_shown_on_a_terminal_only(monkeypatch):
    with FileServer({URL_PATH: PAYLOAD}, {URL_PATH: "slow"}) as server:
        terminal = _FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256, filename="a.pth")
        shown = terminal.getvalue()
        assert "Downloading a.pth: 100%" in shown and f"{len(PAYLOAD) / 1e6:.2f}M/{len(PAYLOAD) / 1e6:.2f}M" in shown
        assert "B/s" in shown and "\r" in shown
        server.modes[URL_PATH] = "ok"

        terminal = _FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256, filename="b.pth", progress=False)
        assert "Downloading" not in terminal.getvalue()

        pipe = io.StringIO()  # not a terminal
        monkeypatch.setattr(sys, "stderr", pipe)
        fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256, filename="c.pth")
        assert "Downloading" not in pipe.getvalue()


def test_unpinned_hash_is_recorded_and_checked_later(cache_home, capsys):
    with FileServer({URL_PATH: PAYLOAD}) as server:
        path = fetch(server.url(URL_PATH))
        message = capsys.readouterr().err
        assert message.count("no published sha256") == 1 and PAYLOAD_SHA256 in message
        assert open(path + ".sha256").read().split()[0] == PAYLOAD_SHA256

        # The cached file gets corrupted on disk: the recorded digest catches it.
        with open(path, "r+b") as file:
            file.seek(1000)
            file.write(b"\x00\x01\x02")
        assert fetch(server.url(URL_PATH)) == path
        assert "deleting it and downloading again" in capsys.readouterr().err
        assert open(path, "rb").read() == PAYLOAD
        assert server.requests == [URL_PATH, URL_PATH]


def test_wrong_cached_file_is_replaced(cache_home):
    (cache_home / "checkpoints").mkdir(parents=True)
    (cache_home / "checkpoints" / NAME).write_bytes(b"stale")
    with FileServer({URL_PATH: PAYLOAD}) as server:
        path = fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256)
    assert open(path, "rb").read() == PAYLOAD


@pytest.mark.parametrize("mode, message", [
    ("truncate", r"truncated|connection closed early"),
    ("corrupt", r"has sha256 [0-9a-f]{64}, expected " + PAYLOAD_SHA256),
    ("error500", r"HTTP error 500"),
    ("close", r"Could not download"),
])
def test_failed_download_leaves_nothing(cache_home, mode, message):
    with FileServer({URL_PATH: PAYLOAD}, {URL_PATH: mode}) as server:
        url = server.url(URL_PATH)
        with pytest.raises(DownloadError, match=message) as error:
            fetch(url, sha256=PAYLOAD_SHA256)
    text = str(error.value)
    assert url in text and str(cache_home) in text
    assert f"weights='/path/to/{NAME}'" in text and "TFGCVIT_MIRROR" in text
    # Nothing a later run could trust: no file, no temporary file, no digest.
    assert _cache_listing(cache_home) == [NAME + ".lock"]


def test_unreachable_server(cache_home):
    server = FileServer({})
    url = server.url(URL_PATH)
    server.stop()  # the port is closed now: connection refused
    with pytest.raises(DownloadError, match="cannot reach the server") as error:
        fetch(url)
    assert isinstance(error.value, OSError)
    assert str(cache_home) in str(error.value)


def test_missing_file_is_an_http_error():
    with FileServer({}) as server:
        with pytest.raises(DownloadError, match="HTTP error 404"):
            fetch(server.url("/nothing.pth"))


def test_mirror_url_and_directory(monkeypatch, tmp_path):
    official = "https://huggingface.co/nvidia/GCViT/resolve/main/gcvit_1k_tiny.pth.tar"
    assert mirrored(official) == official
    monkeypatch.setenv("TFGCVIT_MIRROR", "http://127.0.0.1:9/weights/")
    assert mirrored(official) == "http://127.0.0.1:9/weights/gcvit_1k_tiny.pth.tar"
    monkeypatch.setenv("TFGCVIT_MIRROR", str(tmp_path))
    assert mirrored(official) == str(tmp_path / "gcvit_1k_tiny.pth.tar")

    # A directory mirror is used in place, and the hash still applies.
    (tmp_path / NAME).write_bytes(PAYLOAD)
    assert fetch(str(tmp_path / NAME), sha256=PAYLOAD_SHA256) == str(tmp_path / NAME)
    with pytest.raises(DownloadError, match="expected 0+"):
        fetch(str(tmp_path / NAME), sha256="0" * 64)
    with pytest.raises(DownloadError, match="must hold"):
        fetch(str(tmp_path / "absent.pth"))


_FETCH_IN_A_PROCESS = """
import importlib.util, sys
# download.py needs only the standard library: load it alone, without TensorFlow.
spec = importlib.util.spec_from_file_location("download", "tfgcvit/weights/download.py")
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)
print(download.fetch(sys.argv[1], sha256=sys.argv[2]))
"""


def test_two_processes_fetch_the_same_file(cache_home):
    with FileServer({URL_PATH: PAYLOAD}, {URL_PATH: "slow"}) as server:
        processes = [
            subprocess.Popen([sys.executable, "-c", _FETCH_IN_A_PROCESS, server.url(URL_PATH), PAYLOAD_SHA256],
                             cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=60) for process in processes]
        requests = list(server.requests)
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert stdout.strip() == str(cache_home / "checkpoints" / NAME)
    assert open(cache_home / "checkpoints" / NAME, "rb").read() == PAYLOAD
    assert requests == [URL_PATH]  # the lock made the second process wait and reuse the file
    assert _cache_listing(cache_home) == [NAME, NAME + ".lock", NAME + ".sha256"]


def test_concurrent_fetches_without_locking_still_leave_one_good_file(cache_home, monkeypatch):
    """Where fcntl is missing (Windows), both download, and os.replace keeps the result whole."""
    monkeypatch.setattr(download, "fcntl", None)
    results, errors = [], []

    def fetch_once():
        try:
            results.append(fetch(server.url(URL_PATH), sha256=PAYLOAD_SHA256, progress=False))
        except Exception as error:  # reported below
            errors.append(error)

    with FileServer({URL_PATH: PAYLOAD}, {URL_PATH: "slow"}) as server:
        threads = [threading.Thread(target=fetch_once) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(server.requests) == 2
    assert not errors
    assert results == [str(cache_home / "checkpoints" / NAME)] * 2
    assert open(results[0], "rb").read() == PAYLOAD
    assert _cache_listing(cache_home) == [NAME, NAME + ".sha256"]
