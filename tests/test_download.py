"""Verified downloads: every pinned file is checked by SHA-256 before use, downloads are renamed into
place only when whole and verified, a wrong file is moved aside with a one-line error, and the cache
can be seeded offline. Downloads are served by a local HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from gpt2lab import download
from gpt2lab.cli import main
from gpt2lab.download import GPT2_ENCODER, GPT2_MERGES, HELLASWAG_VAL, PINNED, TINYSHAKESPEARE, fetch
from gpt2lab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# The pinned files that ../shared/data holds a genuine copy of (HellaSwag's full val jsonl is not there).
GENUINE = {
    TINYSHAKESPEARE: "tinyshakespeare.txt",
    GPT2_ENCODER: "gpt2/encoder.json",
    GPT2_MERGES: "gpt2/vocab.bpe",
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path / "cache"


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test: files must come from the cache."""

    def urlopen(url, *args, **kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def genuine(pin: download.Pinned) -> Path:
    path = SHARED_DATA / GENUINE[pin]
    if not path.is_file():
        pytest.skip(f"shared test data not found at {path}")
    return path


def flip_one_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


class Server:
    """A local HTTP server: routes[path] = body bytes, or (body, declared length) for a cut transfer,
    or (first part, None) for a transfer that stalls after its first part."""

    def __init__(self):
        self.routes: dict[str, object] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        routes, requests, release = self.routes, self.requests, self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                body = routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                length = len(body) if isinstance(body, bytes) else body[1]
                data = body if isinstance(body, bytes) else body[0]
                self.send_response(200)
                self.send_header("Content-Length", str(length if length is not None else 2 * len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if length is None:
                    release.wait(30)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def pin(self, pin: download.Pinned, route: str) -> download.Pinned:
        return dataclasses.replace(pin, url=f"http://127.0.0.1:{self.httpd.server_port}{route}")

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.part-*")) if directory.is_dir() else []


# --- cached files: the genuine file passes, one changed byte is refused --------------------------


@pytest.mark.parametrize("pin", list(GENUINE), ids=lambda p: p.name)
def test_cached_file_is_verified_and_a_changed_byte_is_refused_and_moved_aside(pin, cache, no_network):
    src = genuine(pin)
    assert [p for _, p in download.add([src])] == [pin]
    path = cache / pin.name
    assert fetch(pin, "hint") == path  # the genuine file: used as it is, no download

    download._verified.clear()  # a fresh process: nothing known about the file
    flip_one_byte(path)
    bad = path.read_bytes()
    with pytest.raises(UserError) as e:
        fetch(pin, "hint")
    msg = one_line(e)
    actual = hashlib.sha256(bad).hexdigest()
    assert str(path) in msg and pin.sha256 in msg and actual in msg
    assert not path.exists()  # never used again: the next run downloads (or is seeded) afresh
    (aside,) = path.parent.glob(f"{path.name}.bad-*")
    assert aside.read_bytes() == bad and aside.name == f"{path.name}.bad-{actual[:12]}"


def test_a_changed_byte_in_the_cache_stops_the_quick_start_prepare_with_one_line(
    cache, no_network, tmp_path, capsys
):
    download.add([genuine(TINYSHAKESPEARE)])
    out = tmp_path / "data" / "shakespeare-char"
    argv = ["prepare", "shakespeare", "--tokenizer", "char", "--out", str(out)]
    assert main(argv) == 0  # offline: the cache is the one place the named dataset is looked up
    assert (out / "manifest.json").is_file()
    capsys.readouterr()

    download._verified.clear()
    flip_one_byte(cache / TINYSHAKESPEARE.name, at=500_000)
    other = tmp_path / "other"
    assert main([*argv[:-1], str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("gpt2lab prepare: error: ")
    assert TINYSHAKESPEARE.sha256 in err and "moved aside" in err
    assert not other.exists()  # nothing was written from the wrong text


def test_a_changed_byte_in_the_cached_gpt2_vocabulary_is_refused(cache, no_network):
    from gpt2lab.tokenizer import get_tokenizer

    download.add([genuine(GPT2_ENCODER), genuine(GPT2_MERGES)])
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    download._verified.clear()
    flip_one_byte(cache / GPT2_MERGES.name, at=300)
    with pytest.raises(UserError, match=f"expected {GPT2_MERGES.sha256}"):
        get_tokenizer("gpt2", backend="python")


def test_a_wrong_cached_hellaswag_file_is_refused(cache, no_network, shared_data):
    """The genuine 12 MB val jsonl is not in ../shared/data; a real HellaSwag file that is not it (the
    1000-record subset) stands in for a wrong copy, and is refused with both hashes."""
    from gpt2lab.evaluate import hellaswag_file

    path = cache / HELLASWAG_VAL.name
    path.parent.mkdir(parents=True)
    path.write_bytes((shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl").read_bytes())
    with pytest.raises(UserError) as e:
        hellaswag_file()
    msg = one_line(e)
    assert HELLASWAG_VAL.sha256 in msg and download.sha256_file(next(path.parent.glob("*.bad-*"))) in msg
    assert not path.exists()


# --- downloads: to a temporary name, renamed only when whole and verified ------------------------


def test_download_is_verified_then_renamed_and_then_comes_from_the_cache(cache, server):
    data = genuine(TINYSHAKESPEARE).read_bytes()
    server.routes["/input.txt"] = data
    pin = server.pin(TINYSHAKESPEARE, "/input.txt")
    path = fetch(pin, "hint")
    assert path == cache / pin.name and path.read_bytes() == data
    assert leftovers(path.parent) == [] and server.requests == ["/input.txt"]
    assert fetch(pin, "hint") == path and server.requests == ["/input.txt"]  # cached: not downloaded again


@pytest.mark.parametrize(
    "body",
    [b"<html><body>Please log in to the Wi-Fi</body></html>", "truncated", "one byte changed"],
)
def test_a_download_with_the_wrong_bytes_is_moved_aside_never_renamed_into_place(cache, server, body):
    data = genuine(TINYSHAKESPEARE).read_bytes()
    if body == "truncated":  # the server says it is complete: only the hash can tell
        body = data[: len(data) // 2]
    elif body == "one byte changed":
        body = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    server.routes["/input.txt"] = body
    pin = server.pin(TINYSHAKESPEARE, "/input.txt")
    with pytest.raises(UserError) as e:
        fetch(pin, "hint")
    msg = one_line(e)
    actual = download.sha256_file(next((cache / "data").glob("tinyshakespeare.txt.bad-*")))
    assert pin.url in msg and pin.sha256 in msg and actual in msg
    assert not (cache / pin.name).exists() and leftovers(cache / "data") == []


def test_a_cut_transfer_or_an_http_error_is_a_clear_error_and_leaves_nothing(cache, server):
    data = genuine(TINYSHAKESPEARE).read_bytes()
    server.routes["/cut.txt"] = (data[:1000], len(data))  # the connection closes early
    for route in ("/cut.txt", "/missing.txt"):
        pin = server.pin(TINYSHAKESPEARE, route)
        with pytest.raises(UserError) as e:
            fetch(pin, "offline, pass the file itself")
        msg = one_line(e)
        assert msg.startswith(f"could not download {pin.what} from {pin.url}")
        assert "offline, pass the file itself" in msg and "gpt2lab cache add FILE" in msg
        assert not (cache / pin.name).exists() and leftovers(cache / "data") == []


def test_a_download_killed_midway_leaves_no_file_under_its_name(cache, server):
    """SIGKILL during the transfer: only the temporary file exists; the next download removes it."""
    data = genuine(TINYSHAKESPEARE).read_bytes()
    server.routes["/stall.txt"] = (data[: len(data) // 2], None)  # half, then nothing more
    pin = server.pin(TINYSHAKESPEARE, "/stall.txt")
    code = (
        "import dataclasses\nfrom gpt2lab import download\n"
        f"download.fetch(dataclasses.replace(download.TINYSHAKESPEARE, url={pin.url!r}), 'hint')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
    part = cache / "data" / f".tinyshakespeare.txt.part-{proc.pid}"
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size > len(data) // 4) and time.monotonic() < deadline:
        time.sleep(0.02)  # the first half has arrived (read 64 KiB at a time); the rest never will
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert part.is_file() and not (cache / pin.name).exists()
    server.routes["/input.txt"] = data
    assert fetch(server.pin(TINYSHAKESPEARE, "/input.txt"), "hint").read_bytes() == data
    assert leftovers(cache / "data") == []  # the dead process's temporary file is gone


# --- seeding the cache offline -------------------------------------------------------------------


def test_cache_add_seeds_pinned_files_found_by_hash_and_cache_lists_their_state(
    cache, no_network, shared_data, tmp_path, capsys
):
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    for pin in PINNED:
        assert pin.name in listing and pin.sha256 in listing and pin.url in listing
    assert listing.count("missing") == len(PINNED)

    renamed = tmp_path / "seed" / "input.txt"  # found by content, whatever its name
    renamed.parent.mkdir()
    renamed.write_bytes((shared_data / "tinyshakespeare.txt").read_bytes())
    assert main(["cache", "add", str(renamed.parent), str(shared_data / "gpt2")]) == 0
    out = capsys.readouterr().out
    assert "3 pinned file(s) copied" in out
    for pin in GENUINE:
        assert download.sha256_file(cache / pin.name) == pin.sha256
    assert main(["cache", "add", str(shared_data / "names.txt")]) == 0
    assert "no pinned file found" in capsys.readouterr().out

    download._verified.clear()
    flip_one_byte(cache / GPT2_ENCODER.name)
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    line = next(row for row in listing.splitlines() if row.startswith(GPT2_ENCODER.name))
    assert "WRONG: sha256 " + download.sha256_file(cache / GPT2_ENCODER.name) in line
    assert main(["cache", "add", str(tmp_path / "nope")]) == 2


def test_a_given_vocabulary_is_remembered_only_when_it_is_openais(cache, no_network, shared_data, tmp_path):
    from gpt2lab.tokenizer import get_tokenizer

    other = tmp_path / "other"
    other.mkdir()
    (other / "encoder.json").write_bytes((shared_data / "gpt2" / "encoder.json").read_bytes())
    (other / "vocab.bpe").write_bytes((shared_data / "gpt2" / "vocab.bpe").read_bytes() + b"\n")
    get_tokenizer("gpt2", vocab_dir=other)
    assert not (cache / "gpt2").exists()
    get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2")
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]  # now from the cache


# --- Hugging Face: pinned revisions ----------------------------------------------------------------


def test_hub_weights_are_fetched_at_the_pinned_revision_and_checked(tmp_path, monkeypatch):
    """The hub client is replaced by one that lays out a snapshot as it does (files are symlinks to
    blobs); gpt2's config.json and model.safetensors are checked against their recorded SHA-256."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from gpt2lab.interop import hf as pretrained

    calls = []
    content = {"config.json": b"{}", "model.safetensors": b"not the weights"}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        snap = tmp_path / "hub" / "snapshots" / revision
        snap.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            blob = tmp_path / "hub" / "blobs" / name
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content.get(name, b""))  # tokenizer files too: their hashes are not on record
            (snap / name).unlink(missing_ok=True)
            (snap / name).symlink_to(blob)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(UserError) as e:
        pretrained.resolve("gpt2")
    msg = one_line(e)
    assert download.HUB_SHA256["openai-community/gpt2"]["config.json"] in msg
    assert calls == [("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e")]
    blobs = sorted(p.name for p in (tmp_path / "hub" / "blobs").iterdir())
    assert blobs[0].startswith("config.json.bad-")  # the blob moved aside: the client fetches it again
    assert not (tmp_path / "hub" / "snapshots" / calls[0][1] / "config.json").exists()
    # With the recorded hashes of these bytes, the same snapshot passes.
    hashes = {"openai-community/gpt2": {n: hashlib.sha256(b).hexdigest() for n, b in content.items()}}
    monkeypatch.setattr(download, "HUB_SHA256", hashes)
    assert pretrained.resolve("gpt2") == tmp_path / "hub" / "snapshots" / calls[0][1]
