"""MNIST loading: IDX parsing, checksums, clear errors, batching and augmentation."""

from __future__ import annotations

import gzip
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import data
from training.data import DataError, load_split, random_shift, read_md5sums

from .conftest import ROOT, SAMPLE_DIR


def test_sample_loads_with_its_checksums(sample_train, sample_test):
    assert sample_train.images.shape == (1000, 28, 28) and sample_train.images.dtype == np.uint8
    assert sample_test.images.shape == (500, 28, 28)
    assert set(np.unique(sample_train.labels)) == set(range(10))


def test_full_mnist_verifies(full_test):
    assert len(full_test) == 10_000
    assert full_test.md5["t10k-images-idx3-ubyte"] == data.MNIST_MD5["t10k-images-idx3-ubyte"]


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    shutil.copytree(SAMPLE_DIR, tmp_path / "d")
    with pytest.raises(DataError, match=r"MD5 .* does not match .*MNIST_DIR"):
        load_split("test", tmp_path / "d", checksums=data.MNIST_MD5, download=False)
    (tmp_path / "d" / "MD5SUMS").unlink()  # without its own sums a subset is not MNIST
    with pytest.raises(DataError, match="does not match"):
        load_split("test", tmp_path / "d", download=False)
    shutil.copy(
        SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz", tmp_path / "d" / "t10k-images-idx3-ubyte.gz"
    )
    shutil.copy(SAMPLE_DIR / "MD5SUMS", tmp_path / "d")
    with pytest.raises(DataError, match="does not match"):
        load_split("test", tmp_path / "d", download=False)  # a swapped file fails its sum


def test_uncompressed_files_are_read_too(tmp_path):
    for stem in data.FILES["test"]:
        raw = gzip.decompress((SAMPLE_DIR / f"{stem}.gz").read_bytes())
        (tmp_path / stem).write_bytes(raw)
    split = load_split("test", tmp_path, checksums=read_md5sums(SAMPLE_DIR), download=False)
    assert len(split) == 500


def test_missing_files_name_the_folder_and_variable(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("train", tmp_path, download=False)
    assert str(tmp_path) in str(err.value) and "$MNIST_DIR" in str(err.value)


def test_download_falls_back_to_the_clear_error(tmp_path, monkeypatch):
    # Mirrors that refuse connections (a closed port on loopback): no traceback, DataError.
    monkeypatch.setattr(data, "MIRRORS", ("http://127.0.0.1:9/", "http://127.0.0.1:9/x/"))
    with pytest.raises(DataError, match="could not be downloaded"):
        load_split("test", tmp_path, timeout=2)


@pytest.mark.parametrize("corrupt", [b"", b"\x00\x00\x08\x03" + b"\x00" * 8, b"not gzip"])
def test_corrupt_idx_is_a_clear_error(tmp_path, corrupt):
    for stem in data.FILES["test"]:
        (tmp_path / stem).write_bytes(corrupt)
    with pytest.raises(DataError):
        load_split("test", tmp_path, checksums=None, download=False)


def test_training_cli_without_data_exits_2_without_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MNIST_DIR": str(tmp_path / "nowhere"), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import training.data as d; d.MIRRORS = ('http://127.0.0.1:9/',);"
            "import sys, training.train as t; sys.exit(t.main(['--store', sys.argv[1]]))",
            str(tmp_path / "store"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and "MNIST_DIR" in proc.stderr
    assert not (tmp_path / "store" / "mnist").exists() or not any(
        (tmp_path / "store" / "mnist").iterdir()
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shift=st.integers(0, 3))
def test_random_shift_moves_without_losing_ink(seed, shift):
    rng = np.random.default_rng(seed)
    images = np.zeros((8, 28, 28), dtype=np.uint8)
    images[:, 6:22, 6:22] = rng.integers(0, 256, (8, 16, 16), dtype=np.uint8)
    shifted = random_shift(images, np.random.default_rng(seed), shift)
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    # The ink has a 6-pixel margin, so a shift of up to 3 keeps every pixel.
    np.testing.assert_array_equal(shifted.sum(axis=(1, 2)), images.sum(axis=(1, 2)))
    if shift == 0:
        np.testing.assert_array_equal(shifted, images)


def test_batches_cover_the_split_once(sample_test):
    seen = []
    for x, y in data.batches(sample_test, 64, mean=0.13, std=0.31, rng=np.random.default_rng(0)):
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
        seen.append(y)
    assert sorted(np.concatenate(seen)) == sorted(sample_test.labels)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad Name"], "invalid model name"),
        (["--dropout", "1.5"], "--dropout must be"),
        (["--min-accuracy", "99"], "--min-accuracy must be"),
        (["--store", "/proc/no-store-here"], "cannot publish into"),
    ],
)
def test_training_cli_refuses_bad_arguments_before_training(tmp_path, args, message):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--epochs", "1", "--no-progress", *args],
        cwd=ROOT,
        env={**os.environ, "MNIST_DIR": str(SAMPLE_DIR), "DIGITSERVE_STORE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "epoch" not in proc.stdout  # refused before any training
    assert time.monotonic() - started < 60


def test_a_download_cut_short_is_the_clear_error_not_a_traceback(tmp_path, monkeypatch):
    """A mirror that promises 1,000 bytes and hangs up after 10 (IncompleteRead)."""

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 8)
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(data, "MIRRORS", (f"http://127.0.0.1:{server.server_port}/",))
        with pytest.raises(DataError, match="could not be downloaded"):
            load_split("train", tmp_path / "empty", download=True)
    finally:
        server.shutdown()
        server.server_close()
