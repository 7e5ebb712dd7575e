"""Nothing a shard source holds runs as a command, grows without bound or hangs (issue 19,
findings 1 and 3): file names that spell ``pipe:``, a ``tlm`` deflate bomb, a streamed
member declaring hundreds of megabytes, a server that drips, absurd manifest counts, and
a timed-out ``pipe:`` command's children. Real CLIs in subprocesses (peak RSS of that
child from ``os.wait4``), a real http.server on 127.0.0.1, real shell commands."""

from __future__ import annotations

import functools
import http.server
import io
import json
import struct
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_measured
from test_labeling import _label_args, teacher_file  # noqa: F401 (fixture)
from test_pipeline import JPEG, write_shards

from lvvit.data.cli import main as shards_main
from lvvit.data.labelmap import HEADER_SIZE
from lvvit.data.source import Access, ShardUnavailable, open_url, resolve
from lvvit.errors import DataError
from lvvit.labeling.cli import main as label_main
from lvvit.train.config import open_source

MiB = 1 << 20


def _shards_cli(*argv: str) -> tuple[int, str, float]:
    """``lvvit-shards`` in a child process: exit status, output, its peak RSS in MiB."""
    code, output, peak = run_measured([str(Path(sys.executable).parent / "lvvit-shards"), *argv])
    return code, output, peak / MiB


@pytest.fixture(scope="module")
def baseline_peak(tmp_path_factory) -> float:
    """Peak RSS (MiB) of ``lvvit-shards info`` on a small, sound shard folder."""
    code, _, peak = _shards_cli("info", str(write_shards(tmp_path_factory.mktemp("sound"), [2])))
    assert code == 0
    return peak


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- names are never commands


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """``work/shards``: one real shard and two files whose names are shell commands that
    would touch markers in ``work`` (the parent) and ``work/shards``."""
    folder = write_shards(tmp_path / "work" / "shards", [2], tlm=False)
    (folder / "manifest.json").unlink()
    for name in ("pipe:cd ..;touch PWNED;echo a.tar b.tar", "pipe:touch X;.tar"):
        (folder / name).write_bytes(b"not a tar")
    return folder


def _no_markers(folder: Path) -> None:
    assert not (folder.parent / "PWNED").exists()
    assert not (folder / "X").exists() and not (folder / "classes.json").exists()


def _info(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        shards_main(["info", *argv])
    return exited.value.code


def test_file_names_in_a_folder_never_run(hostile_folder: Path, tmp_path: Path, teacher_file,  # noqa: F811
                                          monkeypatch) -> None:
    monkeypatch.chdir(hostile_folder)
    assert _info(".") == 1  # the two non-tars are damaged shards, read as files
    source = open_source("--train-shards", ".", None, Access(5, 0))  # what train.py resolves --train-shards with
    assert all(url.startswith(str(hostile_folder)) for url in source.urls)
    assert label_main(_label_args(".", tmp_path / "labeled", "smallcnn", teacher_file)) != 0
    _no_markers(hostile_folder)


def test_a_manifest_name_never_runs(hostile_folder: Path, monkeypatch) -> None:
    names = ["s-000000.tar", "pipe:touch X"]
    (hostile_folder / names[1]).write_bytes(b"not a tar")
    (hostile_folder / "manifest.json").write_text(json.dumps({"shards": [{"name": n, "samples": 0} for n in names]}))
    monkeypatch.chdir(hostile_folder)
    assert _info(".") == 1
    _no_markers(hostile_folder)


# ---------------------------------------------------------------- bytes


def _deflate_bomb(size: int) -> bytes:
    packer = zlib.compressobj(1)
    return b"".join([*(packer.compress(bytes(MiB)) for _ in range(size // MiB)), packer.flush()])


def test_a_tlm_bomb_is_refused_from_its_header(tmp_path: Path, baseline_peak: float) -> None:
    payload = _deflate_bomb(512 * MiB)  # ~2.3 MB that inflates to 512 MiB; the header allows 4.9 KB
    header = struct.pack("<4sBBHHH4fHHII", b"LVTL", 1, 1, 5, 18, 18, 0, 0, 1, 1, 10, 0, len(payload),
                         zlib.crc32(payload))
    assert len(header) == HEADER_SIZE
    folder = tmp_path / "bomb"
    folder.mkdir()
    _tar(folder / "s-000000.tar", {"k0.jpg": JPEG, "k0.cls": b"0", "k0.tlm": header + payload})
    code, err, peak = _shards_cli("info", str(folder))
    assert code == 1
    assert "'k0'" in err and "inflates past the 4880 bytes" in err
    assert peak < baseline_peak + 64, f"peak RSS {peak:.0f} MiB, {baseline_peak:.0f} on sound shards"  # was +512


def test_a_streamed_member_is_refused_by_its_declared_size(tmp_path: Path, baseline_peak: float) -> None:
    info = tarfile.TarInfo("k0.jpg")
    info.size = 400_000_000  # over the 160 MB an image of --max-pixels 40 MP may take
    header = tmp_path / "header.bin"
    header.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT))
    start = time.monotonic()
    code, err, peak = _shards_cli("info", f"pipe:cat {header} /dev/zero", "--shard-retries", "0")
    assert code == 1
    assert "member k0.jpg declares 400,000,000 bytes" in err and f"cat {header}" in err
    assert peak < baseline_peak + 64, f"peak RSS {peak:.0f} MiB, {baseline_peak:.0f} on sound shards"  # was +400
    assert time.monotonic() - start < 60



_TRAIN_ON = ("import sys\n"
             "from lvvit.loader.pipeline import train_loader\n"
             "loader = train_loader(sys.argv[1], 2, 32, num_workers=0, steps_per_epoch=1, randaugment=None,\n"
             "                      label_maps=False)\n"
             "next(iter(loader))")
"""One training batch from the shard spec in argv[1], read in the process itself."""


def test_the_training_loader_refuses_a_streamed_member_by_its_declared_size(
        tmp_path: Path, baseline_peak: float) -> None:
    """The loaders read through the same bounded tar reader as ``lvvit-shards``: the shard is
    skipped by its member's header, every draw of it, until the loader gives up naming it."""
    info = tarfile.TarInfo("k0.jpg")
    info.size = 400_000_000
    header = tmp_path / "header.bin"
    header.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT))
    code, err, peak = run_measured([sys.executable, "-c", _TRAIN_ON, f"pipe:cat {header} /dev/zero"])
    peak /= MiB
    assert code == 1
    assert "shards in a row gave no sample" in err and "member k0.jpg declares 400,000,000 bytes" in err
    assert peak < baseline_peak + 64, f"peak RSS {peak:.0f} MiB, {baseline_peak:.0f} on sound shards"  # was +800


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize(("samples", "message"), [(10**18, "the most one shard may hold"),
                                                  (1000, "bytes can hold")])
def test_absurd_manifest_counts_are_refused(tmp_path: Path, samples: int, message: str) -> None:
    folder = write_shards(tmp_path / "s", [2], tlm=False, manifest_counts=[samples])
    with pytest.raises(DataError, match=message) as refused:
        open_source("--train-shards", str(folder), None, Access(5, 0))
    assert "manifest.json" in str(refused.value) and "s-000000.tar" in str(refused.value)


# ---------------------------------------------------------------- time


class Drip(http.server.BaseHTTPRequestHandler):
    """Sends its response one byte every 0.2 s: headers too (``/headers/...``) or only
    the body, never slow enough for a per-read timeout to trip."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        head = b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n"
        try:
            if self.path.startswith("/headers/"):
                self._drip(head)
            else:
                self.wfile.write(head)
            self._drip(b"{" * 100000)
        except OSError:  # the reader gave up
            pass

    def _drip(self, data: bytes) -> None:
        for byte in data:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)


@pytest.fixture(scope="module")
def drip_url() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Drip))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_dripping_manifest_trips_the_shard_deadline(drip_url: str, part: str, capsys) -> None:
    start = time.monotonic()
    assert _info(f"{drip_url}/{part}/", "--shard-timeout", "1", "--shard-retries", "0", "--shard-deadline", "2") == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert f"{drip_url}/{part}/manifest.json" in err and "2 s deadline" in err


def test_a_dripping_pipe_trips_the_deadline() -> None:
    start = time.monotonic()
    stream = open_url("pipe:while true; do printf x; sleep 0.2; done", Access(timeout=1, retries=3, deadline=2))
    with stream, pytest.raises(ShardUnavailable, match="2 s deadline"):
        stream.read()
    assert time.monotonic() - start < 10


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone too
    except FileNotFoundError:
        return True


def test_a_timed_out_pipe_ends_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleep.pid"
    stream = open_url(f"pipe:sleep 60 & echo $! > {pid_file}; wait", Access(timeout=1, retries=0))
    with stream, pytest.raises(ShardUnavailable, match="no output"):
        stream.read()
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid), f"sleep {pid} outlived its timed-out pipe"


def test_a_pipe_the_user_typed_still_runs(tmp_path: Path) -> None:
    shard = write_shards(tmp_path / "s", [2], tlm=False) / "s-000000.tar"
    source = resolve(f"pipe:cat {shard}", access=Access(timeout=5, retries=0))
    with source.open(source.urls[0]) as stream:
        assert stream.read() == shard.read_bytes()
