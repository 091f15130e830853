"""weights.py: atomic .npz writes, pickle-free loads, and clear errors for bad files."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import netcompiler as nc
from netcompiler import weights as W
from netcompiler.check import check_text
from netcompiler.errors import WeightsError

SPEC = """name: wnet
input: [1, 6, 6]
layers:
  - conv2d: {out_channels: 2, kernel_size: 3}
  - batchnorm2d
  - relu
  - flatten
  - linear: {out_features: 3}
loss: cross_entropy
"""


@pytest.fixture(scope="module")
def net():
    return nc.compile(check_text(SPEC, "wnet.yaml"), threads=1)


def leftovers(d) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def test_roundtrip_with_metadata(net, tmp_path):
    net.init(3)
    path = tmp_path / "w.npz"
    W.save_weights(path, net, {"mean": np.float64(0.25), "std": np.float64(0.5),
                               "class_names": np.array(["a", "b", "c"])})
    saved = net.state_dict()
    net.init(4)
    meta = W.load_weights(path, net)
    for k, v in saved.items():
        assert np.array_equal(net.state_dict()[k], v), k
    assert W.meta_float(meta, "mean") == 0.25 and W.meta_float(meta, "std") == 0.5
    assert W.meta_strings(meta, "class_names") == ["a", "b", "c"]
    arrays = np.load(path, allow_pickle=False)
    assert "conv1.weight" in arrays.files and "bn1.running_var" in arrays.files
    assert "__meta__/mean" in arrays.files
    assert leftovers(tmp_path) == []
    assert stat.S_IMODE(path.stat().st_mode) == W.FILE_MODE


def test_checkpoint_arrays_split(net):
    arrays = W.with_meta(net.state_dict(), {"epoch": np.int64(2)}, net.optimizer_state())
    state, meta, optim = W.split(arrays)
    assert set(state) == set(net.state_dict())
    assert int(meta["epoch"]) == 2
    assert set(optim) == {"m", "v", "step", "dropout_seed", "dropout_counter"}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "w.npz"
    W.save_npz(path, {"a": np.arange(3)})
    before = path.read_bytes()

    def broken(f):
        f.write(b"half a file")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        W.atomic_write(path, broken)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_object_arrays_are_not_saved(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        W.save_npz(tmp_path / "w.npz", {"a": np.array([{"x": 1}], dtype=object)})


def _write_bad(tmp_path, kind: str):
    path = tmp_path / f"{kind}.npz"
    good = tmp_path / "good.npz"
    W.save_npz(good, {"a": np.ones(1000)})
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled":
        np.savez(path, a=np.array([{"x": 1}], dtype=object))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones(3))
    elif kind == "corrupt_member":
        path.write_bytes(data.replace(np.ones(1000).tobytes()[:64], b"\x07" * 64, 1))
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", "corrupt or truncated"),
    ("random", "not an .npz archive"),
    ("empty", "the file is empty"),
    ("pickled", "pickled (object) arrays, which are refused"),
    ("npy", "single .npy array"),
    ("corrupt_member", "corrupt or truncated"),
    ("missing", "no such weights file"),
])
def test_bad_files_are_weights_errors(tmp_path, kind, message):
    path = tmp_path / "missing.npz" if kind == "missing" else _write_bad(tmp_path, kind)
    with pytest.raises(WeightsError) as exc:
        W.load_npz(path)
    assert str(path) in str(exc.value) and message in str(exc.value)


def test_mismatches_are_all_listed(net, tmp_path):
    state = net.state_dict()
    state["conv1.weight"] = np.zeros((3, 1, 3, 3))  # wrong shape
    del state["fc1.bias"]  # missing
    state["fc9.weight"] = np.zeros(2)  # unexpected
    path = tmp_path / "w.npz"
    W.save_npz(path, W.with_meta(state, {"mean": np.float64(0)}))
    before = net.state_dict()
    with pytest.raises(WeightsError) as exc:
        W.load_weights(path, net)
    text = str(exc.value)
    assert text.startswith(str(path))
    assert "missing 'fc1.bias' (3,)" in text
    assert "unexpected 'fc9.weight'" in text
    assert "'conv1.weight' has shape (3, 1, 3, 3), the network needs (2, 1, 3, 3)" in text
    assert "__meta__" not in text  # metadata is not a parameter
    for k, v in before.items():  # nothing was loaded
        assert np.array_equal(net.state_dict()[k], v)


def test_only_metadata_is_an_error(net, tmp_path):
    path = tmp_path / "w.npz"
    W.save_npz(path, {"__meta__/mean": np.float64(0.1)})
    with pytest.raises(WeightsError, match="holds no weights"):
        W.load_weights(path, net)


def test_string_metadata_needs_no_pickle(tmp_path):
    path = tmp_path / "w.npz"
    W.save_npz(path, {"__meta__/rng": W.json_array({"state": 2**100})})
    meta = W.split(W.load_npz(path))[1]
    assert W.from_json_array(meta, "rng", path) == {"state": 2**100}
    with pytest.raises(WeightsError, match="lacks '__meta__/order'"):
        W.from_json_array(meta, "order", path)


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = tmp_path / "w.npz"
    W.save_npz(path, {"a": np.ones(2)})
    path.chmod(0)
    with pytest.raises(WeightsError, match="cannot read"):
        W.load_npz(path)
