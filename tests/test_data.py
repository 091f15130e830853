"""Tests for netcompiler.data: IDX reading, dataset loading, input preparation."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from netcompiler.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    Dataset,
    dataset_stats,
    load_dataset,
    prepare_inputs,
    read_idx,
    train_val_split,
)
import zipfile

from netcompiler import npyfile
from netcompiler.errors import DataError, NetcError, NetcWarning

# --------------------------------------------------------------------------- helpers

_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise `array` in the IDX format (big-endian)."""
    array = np.asarray(array)
    code = _TYPE_CODES[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file, gzipped when `path` ends with ``.gz``."""
    data = idx_bytes(array)
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_images(n: int, h: int = 4, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def write_mnist_dir(directory: Path, *, n_train: int = 12, n_test: int = 5, classes: int = 10,
                    gz: bool = False, prefix: str = "", test_word: str = "t10k",
                    train_x: np.ndarray | None = None, test_x: np.ndarray | None = None,
                    train_y: np.ndarray | None = None, test_y: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
    """Write a synthetic four-file IDX dataset; returns the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": make_images(n_train, seed=2) if train_x is None else train_x,
        "train-labels-idx1-ubyte": (rng.integers(0, classes, n_train).astype(np.uint8)
                                    if train_y is None else train_y),
        f"{test_word}-images-idx3-ubyte": make_images(n_test, seed=3) if test_x is None else test_x,
        f"{test_word}-labels-idx1-ubyte": (rng.integers(0, classes, n_test).astype(np.uint8)
                                           if test_y is None else test_y),
    }
    for name, arr in arrays.items():
        write_idx(directory / (prefix + name + (".gz" if gz else "")), arr)
    return arrays


def error_of(excinfo: pytest.ExceptionInfo) -> str:
    assert isinstance(excinfo.value, DataError)
    assert isinstance(excinfo.value, NetcError) and isinstance(excinfo.value, ValueError)
    return str(excinfo.value)


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip_uint8(tmp_path: Path, suffix: str) -> None:
    images = make_images(7, 3, 6)
    path = write_idx(tmp_path / f"imgs-idx3-ubyte{suffix}", images)
    got = read_idx(path)
    assert got.dtype == np.uint8
    assert got.shape == (7, 3, 6)
    np.testing.assert_array_equal(got, images)
    got[0, 0, 0] = 1  # writable


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip_all_types(tmp_path: Path, dtype: type, suffix: str) -> None:
    values = np.array([[-3, 0, 7], [100, -100, 1]], dtype=dtype)
    if np.issubdtype(dtype, np.floating):
        values = values + np.array(0.25, dtype=dtype)
    got = read_idx(write_idx(tmp_path / f"a{suffix}", values))
    assert got.dtype == np.dtype(dtype)  # native byte order
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_read_idx_labels_1d(tmp_path: Path) -> None:
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / "labels-idx1-ubyte", labels))
    assert got.shape == (5,)
    assert got.tolist() == [5, 0, 4, 1, 9]


def test_read_idx_big_endian_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2]) + b"\x01\x02\xff\xfe")
    assert read_idx(path).tolist() == [0x0102, -2]


def test_read_idx_empty_array(tmp_path: Path) -> None:
    got = read_idx(write_idx(tmp_path / "e", np.zeros((0, 28, 28), np.uint8)))
    assert got.shape == (0, 28, 28)


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    data = bytearray(idx_bytes(make_images(2)))
    data[0] = 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = error_of(e)
    assert str(path) in msg and "not an IDX file" in msg


def test_read_idx_unknown_type(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    data = bytearray(idx_bytes(make_images(2)))
    data[2] = 0x07
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"unknown IDX data type 0x07"):
        read_idx(path)


@pytest.mark.parametrize("keep", [0, 3, 4, 11, 15])
def test_read_idx_truncated_header(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "short"
    path.write_bytes(idx_bytes(make_images(2))[:keep])  # 3 dims: header is 16 bytes
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert "truncated IDX header" in error_of(e)
    assert str(path) in str(e.value)


def test_read_idx_zero_dims(tmp_path: Path) -> None:
    path = tmp_path / "z"
    path.write_bytes(bytes([0, 0, 8, 0]))
    with pytest.raises(DataError, match="0 dimensions"):
        read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated_data(tmp_path: Path, suffix: str) -> None:
    data = idx_bytes(make_images(3, 4, 5))[:-1]
    path = tmp_path / f"t{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = error_of(e)
    assert "truncated IDX data" in msg and "need 60 bytes, file has 59" in msg


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "trail"
    path.write_bytes(idx_bytes(make_images(3, 4, 5)) + b"\x00\x01\x02")
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = error_of(e)
    assert "3 trailing bytes" in msg and str(path) in msg


def test_read_idx_huge_dims_are_rejected_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 0xFFFFFFFF, 0xFFFFFFFF, 9))
    with pytest.raises(DataError, match="truncated IDX data"):
        read_idx(path)


def test_read_idx_gzip_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert "not a valid gzip file" in error_of(e)


def test_read_idx_gzip_corrupt_stream(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage-deflate-data-\xff\xfe" * 4)
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert "corrupt gzip data" in error_of(e)


def test_read_idx_gzip_truncated(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    compressed = gzip.compress(idx_bytes(make_images(50, 10, 10)))
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert "gzip data is truncated" in error_of(e)


def test_read_idx_gzip_bad_crc(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    compressed = bytearray(gzip.compress(idx_bytes(make_images(3))))
    compressed[-8] ^= 0xFF  # CRC32 of the member
    path.write_bytes(bytes(compressed))
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert "corrupt gzip data" in error_of(e)


def test_read_idx_plain_content_under_gz_name(tmp_path: Path) -> None:
    # Browsers sometimes decompress downloads but keep the .gz name.
    images = make_images(2)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(idx_bytes(images))
    np.testing.assert_array_equal(read_idx(path), images)


def test_read_idx_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope")
    assert "no such IDX file" in error_of(e) and "nope" in str(e.value)
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(tmp_path)


# --------------------------------------------------------------------------- load_dataset: IDX dirs


@pytest.mark.parametrize("gz", [False, True])
def test_load_standard_directory(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_dir(tmp_path / "mnist", gz=gz)
    ds = load_dataset(str(tmp_path / "mnist"))
    assert isinstance(ds, Dataset)
    assert ds.name == "mnist"
    np.testing.assert_array_equal(ds.train_x, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_x, arrays["t10k-images-idx3-ubyte"])
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    expected_classes = max(arrays["train-labels-idx1-ubyte"].max(),
                           arrays["t10k-labels-idx1-ubyte"].max()) + 1
    assert ds.num_classes == expected_classes
    assert ds.class_names is None
    assert ds.image_shape == (1, 4, 5)


def test_load_directory_mixed_plain_and_gz_and_dot_names(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write_idx(d / "train-images.idx3-ubyte", make_images(3))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2], np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", make_images(1))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.array([6], np.uint8))
    ds = load_dataset(str(d))
    assert ds.train_x.shape == (3, 4, 5) and ds.test_x.shape == (1, 4, 5)
    assert ds.num_classes == 7  # max label over train and test + 1


def test_load_directory_4d_images(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    write_mnist_dir(tmp_path / "c", n_train=6, train_x=x,
                    test_x=np.zeros((5, 3, 4, 4), np.uint8))
    ds = load_dataset(str(tmp_path / "c"))
    assert ds.train_x.shape == (6, 3, 4, 4)
    assert ds.image_shape == (3, 4, 4)


def test_load_directory_missing_files_lists_names(tmp_path: Path) -> None:
    d = tmp_path / "partial"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", make_images(2))
    write_idx(d / "train-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    msg = error_of(e)
    assert str(d) in msg
    assert "t10k-images-idx3-ubyte[.gz]" in msg
    assert "t10k-labels-idx1-ubyte[.gz]" in msg
    assert "train-images-idx3-ubyte" not in msg  # present files are not reported missing


def test_load_empty_directory_lists_all_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    msg = error_of(e)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "emnist-<split>"):
        assert name in msg


def test_load_nonexistent_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "no-such-thing"))
    assert "no such file or directory" in error_of(e)


def test_load_unsupported_file(tmp_path: Path) -> None:
    p = tmp_path / "data.csv"
    p.write_text("1,2,3\n")
    with pytest.raises(DataError, match="unsupported data file"):
        load_dataset(str(p))


def test_load_count_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_mnist_dir(d, n_train=5, train_y=np.array([0, 1, 2, 3], np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    msg = error_of(e)
    assert "has 5 images but" in msg and "has 4 labels" in msg
    assert "train-labels-idx1-ubyte" in msg


def test_load_negative_labels(tmp_path: Path) -> None:
    d = tmp_path / "neg"
    write_mnist_dir(d, n_train=3, train_y=np.array([0, -1, 2], np.int8))
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    assert "labels must be non-negative, found -1" in error_of(e)


def test_load_images_must_be_3d_or_4d(tmp_path: Path) -> None:
    d = tmp_path / "flat"
    write_mnist_dir(d, n_train=3, train_x=np.zeros((3, 20), np.uint8))
    with pytest.raises(DataError, match=r"images must be 3-D \(N,H,W\) or 4-D"):
        load_dataset(str(d))


def test_load_labels_must_be_1d(tmp_path: Path) -> None:
    d = tmp_path / "lab2d"
    write_mnist_dir(d, n_train=3, train_y=np.zeros((3, 2), np.uint8))
    with pytest.raises(DataError, match=r"labels must be 1-D"):
        load_dataset(str(d))


def test_load_train_test_shape_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "shapes"
    write_mnist_dir(d, test_x=make_images(5, 6, 6))
    with pytest.raises(DataError, match=r"test images .* have shape \(6, 6\)"):
        load_dataset(str(d))


def test_load_corrupt_file_in_directory_names_it(tmp_path: Path) -> None:
    d = tmp_path / "corrupt"
    write_mnist_dir(d, gz=True)
    bad = d / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    assert str(bad) in error_of(e)


# --------------------------------------------------------------------------- EMNIST


def _letters_arrays(n_train: int = 8, n_test: int = 4, h: int = 3, w: int = 5):
    """Upright images (h x w) and labels 1..26 as EMNIST letters would hold them."""
    rng = np.random.default_rng(7)
    upright_train = rng.integers(0, 256, (n_train, h, w), dtype=np.uint8)
    upright_test = rng.integers(0, 256, (n_test, h, w), dtype=np.uint8)
    y_train = np.array([1, 26, 5, 2, 3, 4, 5, 6][:n_train], np.uint8)
    y_test = np.array([26, 1, 13, 14][:n_test], np.uint8)
    return upright_train, upright_test, y_train, y_test


@pytest.mark.parametrize("gz", [False, True])
def test_emnist_letters_shift_and_transpose(tmp_path: Path, gz: bool) -> None:
    up_train, up_test, y_train, y_test = _letters_arrays()
    d = tmp_path / "emnist"
    d.mkdir()
    s = ".gz" if gz else ""
    # stored transposed: each image is (W, H) on disk
    write_idx(d / f"emnist-letters-train-images-idx3-ubyte{s}", up_train.transpose(0, 2, 1).copy())
    write_idx(d / f"emnist-letters-train-labels-idx1-ubyte{s}", y_train)
    write_idx(d / f"emnist-letters-test-images-idx3-ubyte{s}", up_test.transpose(0, 2, 1).copy())
    write_idx(d / f"emnist-letters-test-labels-idx1-ubyte{s}", y_test)
    ds = load_dataset(str(d))
    assert ds.train_x.shape == (8, 3, 5)
    np.testing.assert_array_equal(ds.train_x, up_train)
    np.testing.assert_array_equal(ds.test_x, up_test)
    assert ds.train_x.flags.c_contiguous
    assert ds.train_y.tolist() == [0, 25, 4, 1, 2, 3, 4, 5]
    assert ds.test_y.tolist() == [25, 0, 12, 13]
    assert ds.num_classes == 26
    assert ds.class_names is not None and ds.class_names[0] == "a" and ds.class_names[25] == "z"
    assert len(ds.class_names) == 26


def test_emnist_letters_flag_on_standard_names(tmp_path: Path) -> None:
    up_train, up_test, y_train, y_test = _letters_arrays()
    d = tmp_path / "plain"
    write_mnist_dir(d, n_train=8, n_test=4, train_x=up_train.transpose(0, 2, 1).copy(),
                    test_x=up_test.transpose(0, 2, 1).copy(), train_y=y_train, test_y=y_test)
    ds = load_dataset(str(d), emnist_letters=True)
    np.testing.assert_array_equal(ds.train_x, up_train)
    assert ds.train_y.min() == 0 and ds.train_y.max() == 25
    assert ds.num_classes == 26
    # without the flag nothing is shifted or transposed
    raw = load_dataset(str(d))
    assert raw.train_y.tolist() == y_train.tolist()
    assert raw.train_x.shape == (8, 5, 3)


def test_emnist_letters_flag_false_disables_shift(tmp_path: Path) -> None:
    up_train, up_test, y_train, y_test = _letters_arrays()
    d = tmp_path / "e"
    write_mnist_dir(d, n_train=8, n_test=4, prefix="emnist-letters-", test_word="test",
                    train_x=up_train.transpose(0, 2, 1).copy(),
                    test_x=up_test.transpose(0, 2, 1).copy(), train_y=y_train, test_y=y_test)
    ds = load_dataset(str(d), emnist_letters=False)
    assert ds.train_y.tolist() == y_train.tolist()
    assert ds.num_classes == 27
    np.testing.assert_array_equal(ds.train_x, up_train)  # EMNIST files are still transposed back


def test_emnist_letters_label_out_of_range(tmp_path: Path) -> None:
    up_train, up_test, y_train, y_test = _letters_arrays()
    y_train = y_train.copy()
    y_train[3] = 0
    d = tmp_path / "e"
    write_mnist_dir(d, n_train=8, n_test=4, prefix="emnist-letters-", test_word="test",
                    train_x=up_train, test_x=up_test, train_y=y_train, test_y=y_test)
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    msg = error_of(e)
    assert "EMNIST letters labels must be 1..26, found 0..26" in msg
    assert "emnist-letters-train-labels-idx1-ubyte" in msg


def test_emnist_other_split_transposed_not_shifted(tmp_path: Path) -> None:
    up = make_images(6, 3, 5)
    d = tmp_path / "digits"
    write_mnist_dir(d, n_train=6, prefix="emnist-digits-", test_word="test",
                    train_x=up.transpose(0, 2, 1).copy(),
                    test_x=make_images(5, 5, 3), train_y=np.array([0, 1, 2, 3, 4, 9], np.uint8))
    ds = load_dataset(str(d))
    np.testing.assert_array_equal(ds.train_x, up)
    assert ds.train_y.tolist() == [0, 1, 2, 3, 4, 9]
    assert ds.num_classes == 10
    assert ds.class_names is None


def test_emnist_several_splits_need_a_prefix(tmp_path: Path) -> None:
    d = tmp_path / "gzip"
    up_train, up_test, y_train, y_test = _letters_arrays()
    write_mnist_dir(d, n_train=8, n_test=4, prefix="emnist-letters-", test_word="test", gz=True,
                    train_x=up_train, test_x=up_test, train_y=y_train, test_y=y_test)
    write_mnist_dir(d, prefix="emnist-digits-", test_word="test", gz=True)
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    msg = error_of(e)
    assert "several EMNIST splits (digits, letters)" in msg
    assert str(d / "emnist-letters") in msg
    ds = load_dataset(str(d / "emnist-letters"))
    assert ds.num_classes == 26 and ds.name == "emnist-letters"
    assert ds.train_y.tolist() == (y_train - 1).tolist()
    digits = load_dataset(str(d / "emnist-digits"))
    assert digits.class_names is None and digits.train_x.shape == (12, 5, 4)


def test_emnist_missing_file_lists_names(tmp_path: Path) -> None:
    d = tmp_path / "e"
    write_mnist_dir(d, prefix="emnist-mnist-", test_word="test")
    (d / "emnist-mnist-test-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_dataset(str(d))
    assert "emnist-mnist-test-labels-idx1-ubyte[.gz]" in error_of(e)


# --------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "fm"
    arrays = write_mnist_dir(d, gz=True, train_y=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 0],
                                                          np.uint8),
                             test_y=np.array([1, 1, 1, 1, 1], np.uint8))
    monkeypatch.setenv("NETC_FASHION_MNIST_DIR", str(d))
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist"
    assert ds.num_classes == 10  # known, even though the test labels only use class 1
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.train_x, arrays["train-images-idx3-ubyte"])


def test_fashion_mnist_label_out_of_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "fm"
    write_mnist_dir(d, test_y=np.array([0, 1, 10, 2, 3], np.uint8))
    monkeypatch.setenv("NETC_FASHION_MNIST_DIR", str(d))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = error_of(e)
    assert "label 10 is out of range for fashion-mnist (10 classes" in msg
    assert "t10k-labels-idx1-ubyte" in msg


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "not-installed"
    monkeypatch.setenv("NETC_FASHION_MNIST_DIR", str(missing))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = error_of(e)
    assert "install it with `apt-get install -y dataset-fashion-mnist`" in msg
    assert str(missing) in msg


def test_fashion_mnist_incomplete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "fm"
    write_mnist_dir(d, gz=True)
    (d / "train-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("NETC_FASHION_MNIST_DIR", str(d))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = error_of(e)
    assert "train-labels-idx1-ubyte" in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_fashion_mnist_default_dir_constant() -> None:
    assert Path(FASHION_MNIST_DIR) == Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NETC_FASHION_MNIST_DIR", raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 28, 28) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (10000, 28, 28)
    assert ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    assert ds.num_classes == 10 and len(ds.class_names or []) == 10
    assert np.bincount(ds.train_y).tolist() == [6000] * 10
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.train_y[0] == 9  # the first training image is an ankle boot
    mean, std = dataset_stats(ds.train_x)
    assert mean == pytest.approx(0.2860, abs=1e-3)
    assert std == pytest.approx(0.3530, abs=1e-3)


# --------------------------------------------------------------------------- npz


def test_npz_train_only_has_empty_test(tmp_path: Path) -> None:
    p = tmp_path / "small.npz"
    x = make_images(6, 8, 8)
    np.savez(p, x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_dataset(str(p))
    assert ds.name == "small"
    np.testing.assert_array_equal(ds.train_x, x)
    assert ds.test_x.shape == (0, 8, 8) and ds.test_x.dtype == np.uint8
    assert ds.test_y.shape == (0,) and ds.test_y.dtype == np.int64
    assert ds.num_classes == 3


def test_npz_with_test_arrays_and_keras_keys(tmp_path: Path) -> None:
    p = tmp_path / "k.npz"
    np.savez_compressed(p, x_train=make_images(4), y_train=np.array([0, 1, 1, 0], np.uint8),
                        x_test=make_images(2), y_test=np.array([4, 0], np.uint8))
    ds = load_dataset(str(p))
    assert ds.train_x.shape == (4, 4, 5) and ds.test_x.shape == (2, 4, 5)
    assert ds.num_classes == 5


def test_npz_float_images_and_integral_float_labels(tmp_path: Path) -> None:
    p = tmp_path / "f.npz"
    x = np.random.default_rng(0).random((3, 2, 4, 4)).astype(np.float32)
    np.savez(p, x=x, y=np.array([0.0, 2.0, 1.0]))
    ds = load_dataset(str(p))
    assert ds.train_x.dtype == np.float32 and ds.train_y.tolist() == [0, 2, 1]


def test_npz_rejects_pickle(tmp_path: Path) -> None:
    p = tmp_path / "evil.npz"
    y = np.empty(2, dtype=object)
    y[0], y[1] = {"a": 1}, [2]
    np.savez(p, x=make_images(2), y=y)
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    msg = error_of(e)
    assert "pickled" in msg and str(p) in msg


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip", b"PK\x03\x04broken zip"])
def test_npz_corrupt(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.npz"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert str(p) in error_of(e)


def test_npz_truncated(tmp_path: Path) -> None:
    p = tmp_path / "t.npz"
    np.savez(p, x=make_images(50, 10, 10), y=np.zeros(50, np.uint8))
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert str(p) in error_of(e)


def test_npz_missing_keys(tmp_path: Path) -> None:
    p = tmp_path / "m.npz"
    np.savez(p, images=make_images(2), labels=np.zeros(2))
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert "it has: images, labels" in error_of(e)


def test_npz_test_arrays_must_come_in_pairs(tmp_path: Path) -> None:
    p = tmp_path / "p.npz"
    np.savez(p, x=make_images(2), y=np.zeros(2, np.uint8), x_test=make_images(1))
    with pytest.raises(DataError, match="has 'x_test' but no 'y_test'"):
        load_dataset(str(p))


def test_npz_validation(tmp_path: Path) -> None:
    p = tmp_path / "v.npz"
    np.savez(p, x=make_images(3), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"has 3 images but .* has 2 labels"):
        load_dataset(str(p))
    np.savez(p, x=make_images(2), y=np.array([0, -4]))
    with pytest.raises(DataError, match="non-negative, found -4"):
        load_dataset(str(p))
    np.savez(p, x=make_images(2), y=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((2, 4, 4), np.float32) + np.nan, y=np.array([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        load_dataset(str(p))
    np.savez(p, x=np.full((2, 4, 4), 300), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"0\.\.255"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((0, 4, 4), np.uint8), y=np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="no training images"):
        load_dataset(str(p))


def test_npz_int_images_in_byte_range_become_uint8(tmp_path: Path) -> None:
    p = tmp_path / "i.npz"
    np.savez(p, x=np.array([[[0, 255]], [[7, 8]]], dtype=np.int64), y=np.array([0, 1]))
    ds = load_dataset(str(p))
    assert ds.train_x.dtype == np.uint8 and ds.train_x[0].tolist() == [[0, 255]]


def test_npz_letters(tmp_path: Path) -> None:
    up_train, up_test, y_train, y_test = _letters_arrays()
    p = tmp_path / "emnist_letters.npz"
    np.savez(p, x=up_train.transpose(0, 2, 1), y=y_train,
             x_test=up_test.transpose(0, 2, 1), y_test=y_test)
    ds = load_dataset(str(p))
    np.testing.assert_array_equal(ds.train_x, up_train)
    assert ds.test_y.tolist() == (y_test.astype(int) - 1).tolist()
    assert ds.num_classes == 26


# --------------------------------------------------------------------------- prepare_inputs


def test_prepare_scales_uint8_and_adds_channel() -> None:
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = prepare_inputs(x, (1, 2, 2))
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(out[0, 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)


def test_prepare_leaves_float_unscaled_and_does_not_mutate() -> None:
    x = np.array([[[[2.0, -1.0]]]], dtype=np.float64)
    with pytest.warns(NetcWarning, match=r"float images hold values in -1..2, beyond \[0, 1\]"):
        out = prepare_inputs(x, (1, 1, 2), mean=1.0, std=2.0)
    np.testing.assert_allclose(out, [[[[0.5, -1.0]]]])
    assert x[0, 0, 0, 0] == 2.0


def test_prepare_normalises() -> None:
    x = np.full((2, 3, 3), 255, np.uint8)
    out = prepare_inputs(x, (1, 3, 3), mean=0.5, std=0.25, dtype=np.float64)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, 2.0)


def test_prepare_shape_mismatch_message() -> None:
    x = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(DataError) as e:
        prepare_inputs(x, (1, 32, 32))
    assert error_of(e) == ("data images are 1x28x28 but the spec's input is 1x32x32 "
                           "(use --pad to zero-pad)")


def test_prepare_channel_mismatch() -> None:
    with pytest.raises(DataError) as e:
        prepare_inputs(np.zeros((1, 3, 8, 8), np.uint8), (1, 8, 8), pad=True)
    assert error_of(e).startswith("data images are 3x8x8 but the spec's input is 1x8x8")


def test_prepare_channels_last_hint() -> None:
    with pytest.raises(DataError, match="channels-last"):
        prepare_inputs(np.zeros((1, 8, 8, 3), np.uint8), (3, 8, 8))


def test_prepare_pad_centered() -> None:
    x = np.full((2, 2, 3), 255, np.uint8)
    out = prepare_inputs(x, (1, 5, 6), pad=True)
    assert out.shape == (2, 1, 5, 6)
    expected = np.zeros((5, 6), np.float32)
    expected[1:3, 1:4] = 1.0  # top = (5-2)//2 = 1, left = (6-3)//2 = 1
    np.testing.assert_array_equal(out[0, 0], expected)
    np.testing.assert_array_equal(out[1, 0], expected)


def test_prepare_pad_then_normalise() -> None:
    out = prepare_inputs(np.full((1, 1, 1), 255, np.uint8), (1, 3, 3), pad=True,
                         mean=0.5, std=0.5)
    assert out[0, 0, 1, 1] == pytest.approx(1.0)
    assert out[0, 0, 0, 0] == pytest.approx(-1.0)


def test_prepare_pad_cannot_shrink() -> None:
    with pytest.raises(DataError) as e:
        prepare_inputs(np.zeros((1, 36, 36), np.uint8), (1, 32, 32), pad=True)
    msg = error_of(e)
    assert "1x36x36" in msg and "1x32x32" in msg and "--pad" not in msg
    with pytest.raises(DataError, match="1x20x40"):
        prepare_inputs(np.zeros((1, 20, 40), np.uint8), (1, 32, 32), pad=True)


def test_prepare_bad_inputs() -> None:
    with pytest.raises(DataError, match="3-D"):
        prepare_inputs(np.zeros((4, 4), np.uint8), (1, 4, 4))
    with pytest.raises(DataError, match="std"):
        prepare_inputs(np.zeros((1, 4, 4), np.uint8), (1, 4, 4), std=0.0)
    with pytest.raises(DataError, match="dtype int32"):
        prepare_inputs(np.zeros((1, 4, 4), np.int32), (1, 4, 4))


# --------------------------------------------------------------------------- split & stats


def test_split_is_deterministic_and_partitions() -> None:
    x = np.arange(100).reshape(100, 1, 1).astype(np.uint8)
    y = np.arange(100)
    a = train_val_split(x, y, 0.2, seed=3)
    b = train_val_split(x, y, 0.2, seed=3)
    c = train_val_split(x, y, 0.2, seed=4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    xt, yt, xv, yv = a
    assert len(xt) == 80 and len(xv) == 20
    assert sorted(yt.tolist() + yv.tolist()) == list(range(100))
    assert set(yt.tolist()).isdisjoint(yv.tolist())
    np.testing.assert_array_equal(xt[:, 0, 0], yt)  # images stay paired with labels
    assert yv.tolist() != c[3].tolist()  # another seed, another split
    assert yv.tolist() != list(range(80, 100))  # actually shuffled, not a tail slice


def test_split_zero_and_small_fractions() -> None:
    x, y = np.zeros((10, 2, 2)), np.arange(10)
    xt, yt, xv, yv = train_val_split(x, y, 0.0, seed=0)
    assert len(xt) == 10 and xv.shape == (0, 2, 2) and yv.shape == (0,)
    assert yt.tolist() == list(range(10))
    assert len(train_val_split(x, y, 0.01, seed=0)[3]) == 1


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError) as e:
        train_val_split(np.zeros((4, 2, 2)), np.zeros(4), fraction, seed=0)
    assert "[0, 1)" in error_of(e)


def test_split_length_mismatch() -> None:
    with pytest.raises(DataError, match="4 images with 3 labels"):
        train_val_split(np.zeros((4, 2, 2)), np.zeros(3), 0.5, seed=0)


def test_dataset_stats() -> None:
    x = np.array([[[0, 255]], [[0, 255]]], dtype=np.uint8)
    assert dataset_stats(x) == pytest.approx((0.5, 0.5))
    f = np.array([[[0.25, 0.75]]], dtype=np.float32)
    assert dataset_stats(f) == pytest.approx((0.5, 0.25))
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (3000, 28, 28), dtype=np.uint8)  # spans several chunks
    ref = big.astype(np.float64) / 255
    mean, std = dataset_stats(big)
    assert mean == pytest.approx(ref.mean(), rel=1e-12)
    assert std == pytest.approx(ref.std(), rel=1e-9)
    with pytest.raises(DataError, match="empty"):
        dataset_stats(np.zeros((0, 2, 2), np.uint8))


# --------------------------------------------------------------------------- the pixel-scale rule


def test_float_images_on_the_0_1_scale_give_no_warning(recwarn) -> None:
    x = np.random.default_rng(0).random((4, 3, 3))
    prepare_inputs(x, (1, 3, 3))
    prepare_inputs(np.full((1, 3, 3), 255, np.uint8), (1, 3, 3))
    assert not [w for w in recwarn if issubclass(w.category, NetcWarning)]


def test_float_images_on_the_0_255_scale_warn_in_train(tmp_path: Path, capsys) -> None:
    from netcompiler import cli

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", x=rng.integers(0, 256, (32, 6, 6)).astype(np.float32), y=rng.integers(0, 3, 32))
    (tmp_path / "s.yaml").write_text("name: f255\ninput: [1, 6, 6]\nlayers:\n  - flatten\n"
                                     "  - linear: {out_features: 3}\nloss: cross_entropy\n")
    rc = cli.main(["train", str(tmp_path / "s.yaml"), "--data", str(tmp_path / "f.npz"), "--epochs", "1",
                   "--out", str(tmp_path / "run"), "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "netc: warning: float images hold values in 0..255, beyond [0, 1]" in err, err
    assert "divide by 255" in err


# --------------------------------------------------------------------------- bounded reads


def no_data_read(*args):
    raise AssertionError("array data were read (and allocated) before the sizes were checked")


def test_read_idx_gzip_header_beyond_the_limit(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 10**5, 10**5)))
    with pytest.raises(DataError, match=r"IDX header declares 600,000,000,000,000 bytes .* beyond the limit"):
        read_idx(path)


def test_read_idx_gzip_bomb_reads_only_what_the_header_declares(tmp_path: Path) -> None:
    # a 4x4 header followed by 64 MiB of zeros: the inflation stops one byte after the data
    data = bytes([0, 0, 8, 2]) + struct.pack(">2I", 4, 4) + bytes(16)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
        for _ in range(64):
            f.write(bytes(1 << 20))
    with pytest.raises(DataError, match="trailing bytes after IDX data"):
        read_idx(path)


def test_read_idx_refuses_a_fifo(tmp_path: Path) -> None:
    import os

    path = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(path)
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(path)


def test_npz_data_zip_bomb_is_refused_before_inflating(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(npyfile, "read_data", no_data_read)
    p = tmp_path / "bomb.npz"
    header = b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (1024, 1024, 1024), }"
    header = header.ljust(127, b" ") + b"\n"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as m:
            m.write(header)
            for _ in range(80):
                m.write(bytes(1 << 20))
    # the member's record says 80 MiB (+ the header), compressed ~80 KB; the header says 1 GiB
    with pytest.raises(DataError, match="likely zip bomb"):
        load_dataset(str(p))


def test_npz_forged_header_is_refused_without_allocating(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(npyfile, "read_data", no_data_read)
    import io

    from numpy.lib import format as npformat

    header = io.BytesIO()
    npformat.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**13,)})
    p = tmp_path / "forged.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", header.getvalue() + bytes(18))
        z.writestr("y.npy", header.getvalue() + bytes(2))
    with pytest.raises(DataError, match=r"'x': its header declares shape \(10000000000000,\) .* the data hold 18 bytes"):
        load_dataset(str(p))


@pytest.mark.parametrize("content", [b"x,y\n1,2\n", b"# a text file\n"])
def test_npz_text_file_is_not_called_pickled(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "data.npz"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert "not an .npz archive" in error_of(e) and "pickle" not in str(e.value)


def test_load_dataset_refuses_a_fifo_or_device(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    for source in (fifo, Path("/dev/zero")):
        with pytest.raises(DataError) as e:
            load_dataset(str(source))
        assert "not a regular file or directory" in error_of(e)
