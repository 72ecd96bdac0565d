"""MNIST loading: IDX parsing, checksums, clear errors, batching and augmentation."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
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
            "import sys, training.train_cli as t; sys.exit(t.main(['--store', sys.argv[1]]))",
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
    assert "tried http://127.0.0.1:9/" in proc.stderr  # and why each mirror failed
    assert not (tmp_path / "store").exists()  # a failed run leaves no empty folders


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
        (["--dropout", "1.5"], "argument --dropout: '1.5' is not a number from 0"),
        (["--lr", "nan"], "argument --lr: 'nan' is not a number from 1e-30"),
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


def write_idx(folder, stem: str, array: np.ndarray, *, dims: tuple[int, ...] | None = None) -> None:
    """An IDX file of unsigned bytes; ``dims`` overrides what the header claims."""
    dims = array.shape if dims is None else dims
    header = (0x0800 + len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    (folder / stem).write_bytes(header + array.astype(np.uint8).tobytes())


def write_md5sums(folder) -> None:
    """MD5SUMS for the folder's test files, as ``md5sum`` writes it in binary mode."""
    lines = []
    for stem in data.FILES["test"]:
        raw = (folder / stem).read_bytes()
        lines.append(f"{hashlib.md5(raw).hexdigest()} *{stem}\n")
    (folder / "MD5SUMS").write_text("".join(lines))


def test_a_custom_set_with_its_own_md5sums_loads(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path, "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", np.arange(5))
    write_md5sums(tmp_path)  # "<md5> *<file>": md5sum -b's format is accepted
    split = load_split("test", tmp_path, download=False)
    np.testing.assert_array_equal(split.images, images)
    assert split.labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (((3, 28, 27), None), ((3,), None), "images are 28x27, MNIST's are 28x28"),
        (((0, 28, 28), None), ((0,), None), "holds no items"),
        (((2, 28, 28), (2**32 - 1, 28, 28)), ((2,), None), "header promises 3367254359280"),
        (((3, 28, 28), None), ((3,), [1, 10, 255]), "label 255 found; MNIST's are 0 to 9"),
        (((3, 28, 28), None), ((4,), None), "3 images but 4 labels"),
    ],
)
def test_idx_files_that_are_not_mnist_shaped_are_clear_errors(tmp_path, images, labels, message):
    (image_shape, image_dims), (label_shape, label_values) = images, labels
    write_idx(tmp_path, "t10k-images-idx3-ubyte", np.zeros(image_shape), dims=image_dims)
    values = np.zeros(label_shape) if label_values is None else np.array(label_values)
    write_idx(tmp_path, "t10k-labels-idx1-ubyte", values)
    write_md5sums(tmp_path)  # the sums match: the check is the shape, not the checksum
    with pytest.raises(DataError, match=message):
        load_split("test", tmp_path, download=False)


def test_a_corrupt_gzip_stream_is_a_clear_error(tmp_path):
    good = gzip.compress(b"\x00" * 4096)
    corrupt = good[:12] + bytes(b ^ 0x5A for b in good[12:-8]) + good[-8:]  # header intact
    for stem in data.FILES["test"]:
        (tmp_path / f"{stem}.gz").write_bytes(corrupt)
    with pytest.raises(DataError, match="is not a readable gzip file"):
        load_split("test", tmp_path, checksums=None, download=False)


def test_a_folder_in_place_of_a_data_file_is_named(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").mkdir()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is not a file"):
        load_split("test", tmp_path, download=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("d41d8cd98f00b204e9800998ecf8427e\n", "line 1: not '<md5>  <file name>'"),
        ("not-a-sum  t10k-images-idx3-ubyte\n", "line 1: not '<md5>  <file name>'"),
        (b"\xff\xfe\x00junk", "cannot read"),
        ("d41d8cd98f00b204e9800998ecf8427e  other-file\n", "has no checksum for t10k-images"),
    ],
)
def test_a_bad_md5sums_file_is_a_clear_error(tmp_path, content, message):
    shutil.copytree(SAMPLE_DIR, tmp_path / "d")
    path = tmp_path / "d" / "MD5SUMS"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        load_split("test", tmp_path / "d", download=False)


def test_a_folder_that_cannot_be_searched_is_a_clear_error(tmp_path, monkeypatch):
    # chmod cannot show this to root (tests may run as root): fail the lookup as the OS does.
    real_exists = pathlib.Path.exists

    def exists(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", exists)
    with pytest.raises(DataError, match="Permission denied"):
        load_split("test", tmp_path, download=False)
    with pytest.raises(DataError, match="Permission denied"):
        load_split("test", tmp_path, checksums=None, download=False)


DIMS = st.one_of(st.integers(0, 40), st.sampled_from([28, 2**31, 2**32 - 1]))


@settings(max_examples=300, deadline=None)
@given(
    magic=st.one_of(st.sampled_from([0x0801, 0x0803]), st.integers(0, 2**32 - 1)),
    dims=st.lists(DIMS, max_size=4),
    body=st.one_of(st.binary(max_size=64), st.none()),
    ndim=st.sampled_from([1, 3]),
)
@example(magic=0x0803, dims=[2, 28, 28], body=None, ndim=3)  # valid files parse
@example(magic=0x0801, dims=[5], body=None, ndim=1)
def test_the_idx_parser_returns_mnist_shapes_or_a_data_error(magic, dims, body, ndim):
    """Any bytes: an array MNIST-shaped and as long as the header says, or DataError."""
    if body is None:  # a body of exactly the promised size, when that is small
        size = int(np.prod(dims, dtype=object)) if dims else 0
        body = bytes(size % 251 for _ in range(size)) if size <= 20_000 else b""
    raw = b"".join(v.to_bytes(4, "big") for v in [magic, *dims]) + body
    try:
        array = data._parse_idx(raw, "f", ndim)
    except DataError:
        return
    assert array.dtype == np.uint8 and array.ndim == ndim and len(array) > 0
    assert array.shape == tuple(dims[:ndim]) and array.tobytes() == raw[4 + 4 * ndim :]
    if ndim == 3:
        assert array.shape[1:] == (28, 28)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_md5sums_parse_or_give_a_data_error(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("sums")
    (folder / "MD5SUMS").write_text(text, encoding="utf-8")
    try:
        sums = read_md5sums(folder)
    except DataError:
        return
    assert all(len(md5) == 32 and int(md5, 16) >= 0 for md5 in sums.values())


def test_a_file_as_the_data_folder_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile is not a folder"):
        load_split("test", tmp_path / "afile", download=False)


def test_md5sums_in_the_forms_md5sum_writes(tmp_path):
    shutil.copytree(SAMPLE_DIR, tmp_path / "d")
    sums = read_md5sums(SAMPLE_DIR)
    (tmp_path / "d" / "MD5SUMS").write_text(
        "".join(f"{md5.upper()}  ./{stem}\n" for stem, md5 in sums.items())
    )
    assert len(load_split("test", tmp_path / "d", download=False)) == 500
    (tmp_path / "d" / "MD5SUMS").write_text(
        "".join(f"{md5}  {stem}.gz\n" for stem, md5 in sums.items())
    )
    with pytest.raises(DataError, match="the sums must be of the uncompressed files"):
        load_split("test", tmp_path / "d", download=False)


def test_a_file_missing_from_md5sums_is_named_before_anything_is_read(tmp_path):
    shutil.copytree(SAMPLE_DIR, tmp_path / "d")
    sums = (tmp_path / "d" / "MD5SUMS").read_text().splitlines()
    (tmp_path / "d" / "MD5SUMS").write_text("\n".join(s for s in sums if "t10k-labels" not in s))
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has no checksum for t10k-labels-idx1-ubyte$"):
        load_split("test", tmp_path / "d", download=False)


def test_a_custom_set_missing_a_file_is_not_filled_from_the_mirrors(tmp_path, monkeypatch):
    """The mirrors serve MNIST, which can never match a custom set's own MD5SUMS."""
    shutil.copytree(SAMPLE_DIR, tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setattr(data, "_download", lambda *args: pytest.fail("downloaded"))
    with pytest.raises(DataError, match="the MNIST mirrors were not tried"):
        load_split("test", tmp_path / "d")
