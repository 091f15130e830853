"""weights.py: atomic .npz writes, pickle-free loads, and clear errors for bad files."""
from __future__ import annotations

import json
import os
import stat
import zipfile
import zlib

import numpy as np
import pytest

import netcompiler as nc
from netcompiler import npyfile
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
    info = W.read_meta(meta, path, 3)
    assert (info.mean, info.std, info.class_names) == (0.25, 0.5, ["a", "b", "c"])
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


# ---- bounded reads: sizes checked before anything is allocated -----------------------------
def _npy_header(shape, descr="<f8") -> bytes:
    """A forged .npy v1.0 header (no data follows)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


def _zip(path, members: dict[str, bytes], method=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def no_data_read(*args):
    raise AssertionError("array data were read (and allocated) before the sizes were checked")


def test_zip_bomb_member_is_refused_before_inflating(net, tmp_path, monkeypatch):
    # a metadata entry may hold MAX_META_BYTES (here lowered to 1 MiB); 16 MiB of zeros that
    # deflate to 16 KiB are refused from the archive's record, before one byte is inflated
    monkeypatch.setattr(W, "MAX_META_BYTES", 1 << 20)
    path = tmp_path / "bomb.npz"
    net.save_weights(path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z:
        with z.open("__meta__/order.npy", "w") as m:
            m.write(_npy_header((2 << 20,)))
            m.write(bytes(16 << 20))
    assert path.stat().st_size < 64 << 10
    monkeypatch.setattr(npyfile, "read_data", no_data_read)
    with pytest.raises(WeightsError, match=r"member '__meta__/order': array of 16,777,216 bytes exceeds the limit "
                                           r"of 1,048,576"):
        net.load_weights(path)


def test_a_parameter_may_not_be_larger_than_the_network_needs(net, tmp_path, monkeypatch):
    monkeypatch.setattr(npyfile, "read_data", no_data_read)
    path = tmp_path / "big.npz"
    W.save_npz(path, {**net.state_dict(), "fc1.weight": np.zeros(100_000)})
    with pytest.raises(WeightsError, match=r"'fc1.weight' has shape \(100000,\), the network needs \(3, 32\)"):
        net.load_weights(path)  # from the header: the 800 KB are not read
    W.save_npz(path, {**net.state_dict(), "fc1.weight": np.zeros((3, 32), np.complex256)})
    with pytest.raises(WeightsError, match=r"'fc1.weight' has dtype complex256"):
        net.load_weights(path)


def test_huge_compression_ratio_is_refused_as_a_zip_bomb(tmp_path):
    from netcompiler.npyfile import INFLATION_FREE_BYTES

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as m:
            m.write(_npy_header((INFLATION_FREE_BYTES // 8 + 1 << 20,)))
            zeros = bytes(1 << 20)
            for _ in range(INFLATION_FREE_BYTES // (1 << 20) + 8):
                m.write(zeros)
    with pytest.raises(WeightsError, match="likely zip bomb"):
        W.load_npz(path, cap=1 << 40)


@pytest.mark.parametrize("shape", [(10**13,), (10**7, 10**6)])
def test_forged_npy_header_in_npz_is_refused_without_allocating(tmp_path, shape, monkeypatch):
    monkeypatch.setattr(npyfile, "read_data", no_data_read)
    path = _zip(tmp_path / "forged.npz", {"a.npy": _npy_header(shape) + bytes(64)})
    with pytest.raises(WeightsError, match=r"member 'a': its header declares shape .* but the data hold 64 bytes"):
        W.load_npz(path)


def test_weights_of_the_wrong_size_are_refused_from_the_header(net, tmp_path):
    state = net.state_dict()
    path = tmp_path / "w.npz"
    W.save_npz(path, {**state, "fc1.weight": np.zeros((3, 1000))})
    with pytest.raises(WeightsError, match=r"'fc1.weight' has shape \(3, 1000\), the network needs \(3, 32\)"):
        net.load_weights(path)


@pytest.mark.parametrize("content, message", [
    (b"mean,std\n0.1,0.3\n", "not an .npz archive"),
    (b"", "the file is empty"),
])
def test_a_text_file_named_npz_is_not_called_pickled(net, tmp_path, content, message):
    path = tmp_path / "w.npz"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as exc:
        net.load_weights(path)
    assert message in str(exc.value) and "pickle" not in str(exc.value)


def test_a_fifo_is_refused_without_reading(net, tmp_path):
    path = tmp_path / "w.npz"
    os.mkfifo(path)  # nobody writes: opening it for reading would hang
    with pytest.raises(WeightsError, match="not a regular file"):
        net.load_weights(path)


def test_member_that_is_not_an_npy_array(net, tmp_path):
    good = tmp_path / "good.npz"
    net.save_weights(good)
    with zipfile.ZipFile(good) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    for name, data, message in (("__meta__/mean", b"0.5", "member '__meta__/mean' is not an .npy array"),
                                ("__meta__/mean.npy", b"0.5", "member '__meta__/mean': not a valid .npy array")):
        path = _zip(tmp_path / "raw.npz", {**members, name: data})
        with pytest.raises(WeightsError, match=message):
            net.load_weights(path)


# ---- damaged metadata and checkpoints: one line, exit 1, never a traceback -----------------
TINY = SPEC.replace("name: wnet", "name: dmg") + "train: {epochs: 2, batch_size: 8, lr: 0.01}\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run interrupted in its second epoch: a checkpoint with history, order and losses."""
    from netcompiler.train import TrainOptions, train

    d = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, (64, 6, 6), dtype=np.uint8), y=rng.integers(0, 3, 64),
             x_test=rng.integers(0, 256, (16, 6, 6), dtype=np.uint8), y_test=rng.integers(0, 3, 16))
    (d / "dmg.yaml").write_text(TINY)
    seen = []

    def interrupt(info):
        seen.append(info)
        if info.epoch == 2:
            raise KeyboardInterrupt

    opts = TrainOptions(spec=str(d / "dmg.yaml"), data=str(d / "data.npz"), out=str(d / "run"), threads=1,
                        chunk_batches=2)
    with pytest.raises(KeyboardInterrupt):
        train(opts, on_chunk=interrupt, progress=False)
    ckpt = d / "run" / "checkpoint.npz"
    return {"dir": d, "spec": str(d / "dmg.yaml"), "data": str(d / "data.npz"),
            "arrays": dict(np.load(ckpt, allow_pickle=False)), "weights": (d / "run" / "weights.npz").read_bytes()}


def netc(*argv) -> tuple[int, str]:
    import contextlib
    import io

    from netcompiler import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main([str(a) for a in argv])
    return rc, err.getvalue()


def one_line_error(rc: int, err: str, expected: str) -> None:
    assert rc == 1, err
    assert err.startswith("netc: error: ") and err.count("\n") == 1, err
    assert expected in err, err


def tamper_json(arrays, key, change):
    value = json.loads(str(arrays[f"__meta__/{key}"]))
    arrays[f"__meta__/{key}"] = np.array(json.dumps(change(value)))
    return arrays


def _set(d, **kw):
    return {**d, **kw}


CHECKPOINT_DAMAGE = {
    "batch_size 0": (lambda a: tamper_json(a, "settings", lambda s: _set(s, batch_size=0)),
                     "setting 'batch_size' is 0: must be a positive integer"),
    "batch_size 'x'": (lambda a: tamper_json(a, "settings", lambda s: _set(s, batch_size="x")),
                       "setting 'batch_size' is \"x\": must be a positive integer"),
    "unknown optimizer": (lambda a: tamper_json(a, "settings", lambda s: _set(s, optimizer="rmsprop")),
                          "setting 'optimizer' is \"rmsprop\", expected one of"),
    "lr -1": (lambda a: tamper_json(a, "settings", lambda s: _set(s, lr=-1)),
              "setting 'lr' is -1: must be a number in [0, 1000]"),
    "std 0": (lambda a: tamper_json(a, "settings", lambda s: _set(s, std=0)), "setting 'std' is 0"),
    "dtype": (lambda a: tamper_json(a, "settings", lambda s: _set(s, dtype="float16")), "setting 'dtype'"),
    "settings a list": (lambda a: tamper_json(a, "settings", lambda s: [1]), "settings are list, not a mapping"),
    "target": (lambda a: tamper_json(a, "settings", lambda s: _set(s, target="noise")),
               "setting 'target' is \"noise\", expected labels or input"),
    "perturb a number": (lambda a: tamper_json(a, "settings", lambda s: _set(s, perturb=3)),
                         "setting 'perturb' is 3, expected null or a --perturb list"),
    "perturb unknown": (lambda a: tamper_json(a, "settings", lambda s: _set(s, perturb="blur=1")),
                        "setting 'perturb' is \"blur=1\""),
    "epoch a string": (lambda a: tamper_json(a, "position", lambda p: _set(p, epoch="1")),
                       "position 'epoch' is \"1\", expected an integer >= 0"),
    "epoch 0.5": (lambda a: tamper_json(a, "position", lambda p: _set(p, epoch=0.5)),
                  "position 'epoch' is 0.5, expected an integer >= 0"),
    "pos beyond the data": (lambda a: tamper_json(a, "position", lambda p: _set(p, pos=10**6)), "position 'pos'"),
    "order out of range": (lambda a: {**a, "__meta__/order": a["__meta__/order"] + 1000},
                           "the saved sample order holds indices outside 0..63"),
    "order of strings": (lambda a: {**a, "__meta__/order": a["__meta__/order"].astype(str)},
                         "the saved sample order is <U"),
    "order repeats": (lambda a: {**a, "__meta__/order": np.zeros_like(a["__meta__/order"])}, "or repeats"),
    "losses missing": (lambda a: {k: v for k, v in a.items() if k != "__meta__/epoch_losses"},
                       "the saved batch losses are missing"),
    "empty history row": (lambda a: tamper_json(a, "history", lambda h: [[]]), "history row 1 is []"),
    "history of the wrong length": (lambda a: tamper_json(a, "history", lambda h: h * 2),
                                    "history has 2 rows for 1 completed epochs"),
    "settings not JSON": (lambda a: {**a, "__meta__/settings": np.array("{")}, "is not valid JSON"),
    "settings nested too deep": (lambda a: {**a, "__meta__/settings": np.array("[" * 100_000)}, "is not valid JSON"),
    "settings raw bytes": (lambda a: {**a, "__meta__/settings": np.frombuffer(b"{}", np.uint8)},
                           "checkpoint lacks '__meta__/settings'"),
    "class names of the wrong length": (lambda a: {**a, "__meta__/class_names": np.array(["a", "b"])},
                                        "2 names for a network of 3 classes"),
    "optimizer step a float": (lambda a: {**a, "__optim__/step": np.float64(2.5)},
                               "optimizer state 'step' must be one integer"),
    "optimizer moment of 1e300": (lambda a: {**a, "__optim__/m": np.full(a["__optim__/m"].shape, 1e300)},
                                  "optimizer state 'm' must hold real numbers finite in float32"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_one_line_on_resume(run, tmp_path, case):
    damage, expected = CHECKPOINT_DAMAGE[case]
    out = tmp_path / "run"
    out.mkdir()
    np.savez(out / "checkpoint.npz", **damage(dict(run["arrays"])))
    rc, err = netc("train", run["spec"], "--data", run["data"], "--out", out, "--resume", "--threads", 1,
                   "--no-progress")
    one_line_error(rc, err, expected)
    assert "damaged" in err or "lacks" in err or "optimizer state" in err


def test_undamaged_checkpoint_resumes(run, tmp_path):
    """The cases above differ from this one only by their damage."""
    out = tmp_path / "run"
    out.mkdir()
    np.savez(out / "checkpoint.npz", **run["arrays"])
    rc, err = netc("train", run["spec"], "--data", run["data"], "--out", out, "--resume", "--threads", 1,
                   "--no-progress")
    assert rc == 0, err


def _with_raw_member(path, name: str, data: bytes):
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(name, data)


WEIGHTS_DAMAGE = {
    "meta stored as raw bytes": (lambda p: _with_raw_member(p, "__meta__/note", b"raw"),
                                 "member '__meta__/note' is not an .npy array"),
    "meta .npy member of raw bytes": (lambda p: _with_raw_member(p, "__meta__/note.npy", b"raw"),
                                      "member '__meta__/note': not a valid .npy array"),
    "class names of the wrong length": (lambda p: W.save_npz(p, {**dict(np.load(p)), "__meta__/class_names":
                                                                 np.array(["a"] * 5)}),
                                        "damaged metadata '__meta__/class_names': 5 names for a network of 3"),
    "class names not strings": (lambda p: W.save_npz(p, {**dict(np.load(p)), "__meta__/class_names":
                                                         np.arange(3)}),
                                "'__meta__/class_names': expected a list of strings"),
    "mean a string": (lambda p: W.save_npz(p, {**dict(np.load(p)), "__meta__/mean": np.array("0.5")}),
                      "damaged metadata '__meta__/mean': expected a finite number"),
    "std negative": (lambda p: W.save_npz(p, {**dict(np.load(p)), "__meta__/std": np.float64(-1)}),
                     "damaged metadata '__meta__/std': expected a finite number > 0"),
    "pad a number": (lambda p: W.save_npz(p, {**dict(np.load(p)), "__meta__/pad": np.float64(1)}),
                     "'__meta__/pad': expected a boolean"),
    "weight of 1e300": (lambda p: W.save_npz(p, {**dict(np.load(p)), "fc1.weight": np.full((3, 32), 1e300)}),
                        "'fc1.weight' has values up to 1e+300, beyond the range of float32"),
    "text file": (lambda p: p.write_text("conv1.weight,0.5\n"), "not an .npz archive"),
}


@pytest.mark.parametrize("case", list(WEIGHTS_DAMAGE))
def test_damaged_weights_are_one_line_in_eval(run, tmp_path, case):
    damage, expected = WEIGHTS_DAMAGE[case]
    path = tmp_path / "weights.npz"
    path.write_bytes(run["weights"])
    damage(path)
    rc, err = netc("eval", run["spec"], path, "--data", run["data"], "--threads", 1)
    one_line_error(rc, err, expected)


def test_undamaged_weights_evaluate(run, tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(run["weights"])
    rc, err = netc("eval", run["spec"], path, "--data", run["data"], "--threads", 1)
    assert rc == 0, err


# ---- netc predict: bounded inputs, and the same numbers as Net.predict --------------------------
def _png(width: int, height: int) -> bytes:
    """A greyscale PNG whose IHDR declares width x height; its IDAT holds a few rows only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(_png(30000, 30000)), "image too large"),
    (lambda p: p.write_bytes(_png(9000, 9000)), "image too large: 9000x9000 pixels, the limit is 67,108,864"),
    (lambda p: p.write_bytes(b"not an image"), "cannot read the image"),
])
def test_predict_refuses_bad_images_in_one_line(run, tmp_path, make, message):
    weights = tmp_path / "w.npz"
    weights.write_bytes(run["weights"])
    img = tmp_path / "big.png"
    make(img)
    assert img.stat().st_size < 1024
    rc, err = netc("predict", run["spec"], weights, img, "--threads", 1)
    one_line_error(rc, err, message)


def _forged_npy(path, shape, data: bytes = b""):
    import io

    from numpy.lib import format as npformat

    header = io.BytesIO()
    npformat.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    path.write_bytes(header.getvalue() + data)


@pytest.mark.parametrize("make, message", [
    (lambda p: _forged_npy(p, (10**13,), bytes(16)), "its header declares shape (10000000000000,)"),
    (lambda p: _forged_npy(p, (2, 6, 6), bytes(16)), "but the data hold 16 bytes"),
    (lambda p: p.write_text("0.1 0.2 0.3\n"), "not an .npy array (no NUMPY magic; a text file?)"),
    (lambda p: np.savez(p.with_suffix(""), a=np.zeros(2)) or p.with_suffix(".npz").rename(p), "is an .npz archive"),
])
def test_predict_refuses_bad_npy_in_one_line(run, tmp_path, make, message, monkeypatch):
    read_data = npyfile.read_data
    monkeypatch.setattr(npyfile, "read_data", lambda f, h, where, e: no_data_read() if where.endswith("x.npy")
                        else read_data(f, h, where, e))
    weights = tmp_path / "w.npz"
    weights.write_bytes(run["weights"])
    arr = tmp_path / "x.npy"
    make(arr)
    rc, err = netc("predict", run["spec"], weights, arr, "--threads", 1)
    one_line_error(rc, err, message)


def test_netc_predict_gives_net_predict_probabilities_of_saved_weights(run, tmp_path, capsys):
    net = nc.compile(check_text(TINY, "dmg.yaml"), threads=1)
    net.init(9)
    net.set_normalization(0.4, 0.2)
    net.class_names = ["a", "b", "c"]
    path = tmp_path / "saved.npz"
    net.save_weights(path)
    img = np.random.default_rng(1).integers(0, 256, (2, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    rc, err = netc("predict", run["spec"], path, tmp_path / "img.npy", "--format", "json", "--threads", 1)
    assert rc == 0, err
    from netcompiler import cli

    capsys.readouterr()
    assert cli.main(["predict", run["spec"], str(path), str(tmp_path / "img.npy"), "--format", "json",
                     "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["normalization"]["mean"] == 0.4 and out["class_names"] == ["a", "b", "c"]
    got = np.array([r["probabilities"] for r in out["predictions"]])
    z = net.forward(((img[:, None] / 255.0 - 0.4) / 0.2).astype(np.float32))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(net.predict(img), got, rtol=1e-6)


@pytest.mark.parametrize("compressed", [False, True])
def test_bounded_reader_reads_what_numpy_wrote(tmp_path, compressed):
    rng = np.random.default_rng(0)
    arrays = {"f": np.asfortranarray(rng.random((3, 4))), "be": rng.random(5).astype(">f4"),
              "u": np.array(["ab", "c"]), "e": np.zeros((0, 3)), "s": np.float64(2.5), "b": np.bool_(True),
              "big": rng.integers(0, 255, 300_000, dtype=np.uint8)}
    path = tmp_path / "a.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    got = W.load_npz(path, cap=1 << 20)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k
    one = tmp_path / "one.npy"
    np.save(one, arrays["f"])
    assert np.array_equal(npyfile.read_npy(one, WeightsError), arrays["f"])
