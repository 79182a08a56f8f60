"""The download_cifar stage: fetch over http / file:// / a path, check, decode, and refuse bad archives cleanly."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from onecycle import data
from onecycle.config import DataParams
from onecycle.errors import UserError
from scripts.pipeline_repo import RECORD, add_member, cifar_members, write_archive

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_split(members: dict[str, bytes], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels decoded by hand from the raw records, the slow obvious way."""
    records = np.frombuffer(b"".join(members[f"cifar-10-batches-bin/{n}"] for n in names), np.uint8)
    records = records.reshape(-1, RECORD)
    images = np.stack([r[1:].reshape(3, 32, 32).transpose(1, 2, 0) for r in records])
    return images, records[:, 0].astype(np.int64)


def test_http_download_decodes_every_record(tiny_archive, http_dir, tmp_path):
    path, md5 = tiny_archive
    base, folder = http_dir
    (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "data" / "cifar10"
    data.prepare(DataParams(url=f"{base}/{path.name}", md5=md5), out, progress=False)

    members = cifar_members()
    train_images, train_labels = expected_split(members, [f"data_batch_{i}.bin" for i in range(1, 6)])
    test_images, test_labels = expected_split(members, ["test_batch.bin"])
    assert np.array_equal(np.load(out / "train_images.npy"), train_images)
    assert np.array_equal(np.load(out / "train_labels.npy"), train_labels)
    assert np.array_equal(np.load(out / "test_images.npy"), test_images)
    assert np.array_equal(np.load(out / "test_labels.npy"), test_labels)
    assert np.load(out / "train_images.npy").dtype == np.uint8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_images"] == 100 and meta["test_images"] == 40
    assert meta["md5"] == md5 and meta["source_url"].startswith("http://127.0.0.1:")
    assert meta["classes"][0] == "airplane" and len(meta["classes"]) == 10
    assert np.allclose(meta["mean"], train_images.reshape(-1, 3).mean(0))
    assert np.allclose(meta["std"], train_images.reshape(-1, 3).std(0))
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10"], "no temporary files left behind"


@pytest.mark.parametrize("form", ["file_url", "plain_path"])
def test_local_archive(tiny_archive, tmp_path, form):
    path, md5 = tiny_archive
    url = path.as_uri() if form == "file_url" else str(path)
    dataset = data.prepare(DataParams(url=url, md5=md5), tmp_path / "cifar10", progress=False)
    assert dataset.train.images.shape == (100, 32, 32, 3) and dataset.test.images.shape == (40, 32, 32, 3)


def test_limits_keep_the_first_images(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    full = data.prepare(DataParams(url=str(path), md5=md5), tmp_path / "full", progress=False)
    cut = data.prepare(
        DataParams(url=str(path), md5=md5, train_limit=30, test_limit=7), tmp_path / "cut", progress=False
    )
    assert np.array_equal(cut.train.images, full.train.images[:30])
    assert np.array_equal(cut.test.labels, full.test.labels[:7])
    assert json.loads((tmp_path / "cut" / "meta.json").read_text())["train_images"] == 30
    with pytest.raises(UserError, match="data.train_limit = 500"):
        data.prepare(DataParams(url=str(path), md5=md5, train_limit=500), tmp_path / "x", progress=False)


# ---- failures: each is refused with a clear message and leaves the earlier output exactly as it was


@pytest.fixture()
def earlier_output(tiny_archive, tmp_path) -> Path:
    path, md5 = tiny_archive
    out = tmp_path / "data" / "cifar10"
    data.prepare(DataParams(url=str(path), md5=md5), out, progress=False)
    return out


def bad_archive(tmp_path: Path, mutate) -> tuple[str, str]:
    members = cifar_members()
    extra = mutate(members)
    path = tmp_path / "bad.tar.gz"
    return str(path), write_archive(path, members, extra)


def _escape(members):
    return lambda tar: _add(tar, "cifar-10-batches-bin/../../evil.bin", b"x")


def _absolute(members):
    return lambda tar: _add(tar, "/etc/evil", b"x")


def _symlink(members):
    def extra(tar):
        info = tarfile.TarInfo("cifar-10-batches-bin/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    return extra


def _hardlink(members):
    def extra(tar):
        info = tarfile.TarInfo("cifar-10-batches-bin/hard")
        info.type, info.linkname = tarfile.LNKTYPE, "cifar-10-batches-bin/test_batch.bin"
        tar.addfile(info)

    return extra


def _unexpected(members):
    members["cifar-10-batches-bin/run_me.sh"] = b"#!/bin/sh\n"


def _record_size(members):
    members["cifar-10-batches-bin/data_batch_3.bin"] += b"\x00" * 100


def _label(members):
    blob = bytearray(members["cifar-10-batches-bin/test_batch.bin"])
    blob[5 * RECORD] = 10
    members["cifar-10-batches-bin/test_batch.bin"] = bytes(blob)


def _missing(members):
    del members["cifar-10-batches-bin/data_batch_5.bin"]


def _oversized(members):
    members["cifar-10-batches-bin/batches.meta.txt"] = b"x" * 5000


def _add(tar, name, payload):
    add_member(tar, name, payload)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_escape, "unsafe member 'cifar-10-batches-bin/../../evil.bin' lies outside"),
        (_absolute, "unsafe member '/etc/evil'"),
        (_symlink, "member 'cifar-10-batches-bin/link' is a link"),
        (_hardlink, "member 'cifar-10-batches-bin/hard' is a link"),
        (_unexpected, "unexpected member 'cifar-10-batches-bin/run_me.sh'"),
        (_record_size, r"data_batch_3.bin is 61560 bytes, not a whole number of 3073-byte records"),
        (_label, "test_batch.bin: record 5 has label 10, outside 0..9"),
        (_missing, "lacks cifar-10-batches-bin/data_batch_5.bin"),
        (_oversized, "batches.meta.txt' is 5000 bytes, more than the 4096"),
    ],
)
def test_bad_archive_is_refused(earlier_output, tmp_path, mutate, message):
    before = snapshot(earlier_output)
    url, md5 = bad_archive(tmp_path, mutate)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.prepare(DataParams(url=url, md5=md5), earlier_output, progress=False)
    assert snapshot(earlier_output) == before
    assert sorted(p.name for p in earlier_output.parent.iterdir()) == ["cifar10"], "no temporary files left behind"
    assert not Path("/tmp/evil.bin").exists()


def test_wrong_md5(earlier_output, tiny_archive):
    path, md5 = tiny_archive
    before = snapshot(earlier_output)
    wrong = "0" * 32
    with pytest.raises(UserError, match=f"md5 of {path} is {md5}, expected {wrong}"):
        data.prepare(DataParams(url=str(path), md5=wrong), earlier_output, progress=False)
    assert snapshot(earlier_output) == before


def test_truncated_archive(earlier_output, tiny_archive, tmp_path):
    path, _ = tiny_archive
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(earlier_output)
    with pytest.raises(UserError, match="is truncated or corrupt"):
        data.prepare(DataParams(url=str(cut), md5=data_md5(cut)), earlier_output, progress=False)
    assert snapshot(earlier_output) == before


def test_not_gzip(earlier_output, tmp_path):
    text = tmp_path / "page.html"
    text.write_text("<html>Not Found</html>")
    before = snapshot(earlier_output)
    with pytest.raises(UserError, match="is truncated or corrupt"):
        data.prepare(DataParams(url=str(text), md5=data_md5(text)), earlier_output, progress=False)
    assert snapshot(earlier_output) == before


def test_gzip_but_not_tar(earlier_output, tmp_path):
    blob = tmp_path / "x.tar.gz"
    blob.write_bytes(gzip.compress(b"just some bytes, not a tar"))
    with pytest.raises(UserError, match="is truncated or corrupt"):
        data.prepare(DataParams(url=str(blob), md5=data_md5(blob)), earlier_output, progress=False)


def test_closed_port(earlier_output):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"
    before = snapshot(earlier_output)
    with pytest.raises(UserError, match=f"cannot download {url}.*set data.url in params.yaml to its local path"):
        data.prepare(DataParams(url=url, md5="0" * 32), earlier_output, progress=False)
    assert snapshot(earlier_output) == before


def test_http_404(http_dir, tmp_path):
    base, _ = http_dir
    with pytest.raises(UserError, match="HTTP 404"):
        data.prepare(DataParams(url=f"{base}/nothing.tar.gz", md5="0" * 32), tmp_path / "c", progress=False)


def test_missing_local_file(tmp_path):
    with pytest.raises(UserError, match="no archive at"):
        data.prepare(DataParams(url=str(tmp_path / "absent.tar.gz"), md5="0" * 32), tmp_path / "c", progress=False)


def data_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run_stage(cwd: Path, params: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "download_cifar.py"), "--out", "data/cifar10"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_stage_prints_one_line_and_no_traceback(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    ok = run_stage(tmp_path, {"data": {"url": str(path), "md5": md5}})
    assert ok.returncode == 0, ok.stderr
    assert "wrote data/cifar10: 100 training and 40 test images" in ok.stdout

    bad = run_stage(tmp_path, {"data": {"url": str(path), "md5": "f" * 32}})
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: md5 of {path} is {md5}")

    typo = run_stage(tmp_path, {"data": {"ulr": str(path), "md5": md5}})
    assert typo.returncode == 1 and "Traceback" not in typo.stderr
    assert "unknown key data.ulr (did you mean 'url'?)" in typo.stderr


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Serves the one file it is given, 64 KiB every 50 ms, so that a test can kill the download midway."""

    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        for start in range(0, len(self.payload), 1 << 16):
            self.wfile.write(self.payload[start : start + (1 << 16)])
            time.sleep(0.05)

    def log_message(self, *args) -> None:
        pass


def test_a_download_killed_midway_loses_nothing_and_a_rerun_ends_well(small_archive, tiny_archive, tmp_path):
    tiny, tiny_md5 = tiny_archive
    assert run_stage(tmp_path, {"data": {"url": str(tiny), "md5": tiny_md5}}).returncode == 0
    out = tmp_path / "data" / "cifar10"
    before = snapshot(out)

    path, md5 = small_archive
    handler = type("Handler", (_SlowHandler,), {"payload": path.read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-binary.tar.gz"
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"url": url, "md5": md5}}))
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "stages" / "download_cifar.py"), "--out", "data/cifar10"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        partial = []
        while not partial and time.time() < deadline:
            partial = [p for p in out.parent.glob(".cifar10.tmp-*/cifar-10-binary.tar.gz") if p.stat().st_size > 0]
            time.sleep(0.02)
        assert partial and proc.poll() is None, "caught the stage while it downloads"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        server.shutdown()
        server.server_close()
    assert snapshot(out) == before

    rerun = run_stage(tmp_path, {"data": {"url": str(path), "md5": md5}})
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "meta.json").read_text())["train_images"] == 600
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10"], "the killed run's leftovers are gone"


def test_channel_stats_matches_numpy_and_ignores_chunking():
    images = np.random.default_rng(3).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    images[..., 2] //= 2  # channels must differ, so a mixed-up channel shows
    mean, std = data.channel_stats(images)
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(axis=0), rtol=1e-12)
    assert data.channel_stats(images, chunk=7) == (mean, std)
    assert data.channel_stats(np.full((3, 4, 4, 3), 9, dtype=np.uint8)) == ((9.0,) * 3, (0.0,) * 3)


def test_the_download_stage_s_library_imports_no_torch():
    """download_cifar writes no tensor: its modules leave torch (a second of imports) to the stages that train."""
    code = "import sys; import onecycle.data, onecycle.outputs, onecycle.config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
