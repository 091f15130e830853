"""Per-channel input normalisation (--normalize channel): statistics computed on the training
images, stored with the weights, applied the same way by netc eval, netc predict and
Net.predict; grey inputs and weights files with one mean/std keep working as before.
Expected values are computed here with numpy, not by netcompiler."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import netcompiler as nc
from conftest import build, spec
from netcompiler import weights as W
from netcompiler.check import load
from netcompiler.cli import main
from netcompiler.data import dataset_stats, prepare_inputs
from netcompiler.errors import DataError, NetcError, WeightsError
from netcompiler.train import TrainOptions, train
from test_train import TINY, make_case
from test_train_recipes import augmented_inputs

COLOUR = TINY.replace("name: tiny", "name: colour").replace("input: [1, 8, 8]", "input: [3, 8, 8]")


def colour_images(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Which quadrant is bright, in three channels of very different brightness and spread."""
    y = rng.integers(0, 4, n)
    x = np.empty((n, 3, 8, 8), np.uint8)
    x[:, 0] = rng.integers(0, 40, (n, 8, 8))
    x[:, 1] = rng.integers(150, 200, (n, 8, 8))
    x[:, 2] = rng.integers(0, 120, (n, 8, 8))
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 2, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 130
    return x, y


def numpy_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = x.astype(np.float64) / 255
    return f.mean(axis=(0, 2, 3)), f.std(axis=(0, 2, 3))


def by_hand(x: np.ndarray, mean, std) -> np.ndarray:
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if m.ndim:
        m, s = m[:, None, None], s[:, None, None]
    return ((x.astype(np.float64) / 255 - m) / s).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- the statistics and their application -------------------------------------------------------
def test_dataset_stats_per_channel_are_numpys():
    rng = np.random.default_rng(0)
    x, _ = colour_images(300, rng)
    mean, std = dataset_stats(x, per_channel=True)
    want_m, want_s = numpy_stats(x)
    assert isinstance(mean, list) and len(mean) == 3
    np.testing.assert_allclose(mean, want_m, rtol=1e-12)
    np.testing.assert_allclose(std, want_s, rtol=1e-12)
    f = rng.random((20, 2, 5, 5))  # float images on the 0..1 scale are taken as they are
    mean, std = dataset_stats(f, per_channel=True)
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-12)
    g = rng.integers(0, 256, (30, 6, 6)).astype(np.uint8)  # grey (N, H, W): one channel
    mean, std = dataset_stats(g, per_channel=True)
    assert mean == pytest.approx([g.mean() / 255], rel=1e-12) and std == pytest.approx([(g / 255).std()], rel=1e-12)
    assert dataset_stats(g) == pytest.approx((g.mean() / 255, (g / 255).std()), rel=1e-12)  # global: two floats


def test_prepare_inputs_applies_one_mean_and_std_per_channel():
    x, _ = colour_images(10, np.random.default_rng(1))
    mean, std = [0.1, 0.7, 0.4], [0.05, 0.1, 0.3]
    got = prepare_inputs(x, (3, 8, 8), mean=mean, std=std)
    np.testing.assert_allclose(got, by_hand(x, mean, std), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prepare_inputs(x, (3, 8, 8), mean=0.3, std=0.2), by_hand(x, 0.3, 0.2),
                               rtol=1e-5, atol=1e-5)  # one number: every channel
    with pytest.raises(DataError, match="normalisation mean has 2 values for images of 3 channels"):
        prepare_inputs(x, (3, 8, 8), mean=[0.1, 0.2], std=0.2)
    with pytest.raises(DataError, match="normalisation std must be a positive number"):
        prepare_inputs(x, (3, 8, 8), mean=mean, std=[0.1, 0.0, 0.2])


# ---- netc train --normalize channel, then eval, predict and Net.predict ---------------------------------
@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(7)
    x, y = colour_images(200, rng)
    tx, ty = colour_images(60, rng)
    np.savez(d / "colour.npz", x=x, y=y, x_test=tx, y_test=ty)
    (d / "colour.yaml").write_text(COLOUR)
    run = d / "run"
    assert main(["train", str(d / "colour.yaml"), "--data", str(d / "colour.npz"), "--out", str(run),
                 "--threads", "1", "--normalize", "channel", "--augment", "shift=1"]) == 0
    return d, x, tx, ty, run


def test_train_stores_per_channel_statistics(colour_run, capsys):
    d, x, _, _, run = colour_run
    want_m, want_s = numpy_stats(x)
    norm = json.loads((run / "normalization.json").read_text())
    np.testing.assert_allclose(norm["mean"], want_m, rtol=1e-12)
    np.testing.assert_allclose(norm["std"], want_s, rtol=1e-12)
    assert norm["source"] == "computed per channel on the 200 training images"
    for name in ("weights.npz", "best.npz", "checkpoint.npz"):
        meta = W.split(W.load_npz(run / name))[1]
        assert meta["mean"].shape == (3,) and meta["std"].shape == (3,)
        np.testing.assert_allclose(meta["mean"], want_m, rtol=1e-12)
        np.testing.assert_allclose(meta["std"], want_s, rtol=1e-12)


def test_eval_predict_and_net_predict_apply_the_stored_statistics(colour_run, capsys):
    d, x, tx, ty, run = colour_run
    want_m, want_s = numpy_stats(x)
    net = nc.compile(load(str(d / "colour.yaml")), threads=1)
    net.load_weights(run / "weights.npz")
    probs = softmax(net.forward(by_hand(tx, want_m, want_s)).astype(np.float64))
    assert main(["eval", str(d / "colour.yaml"), str(run / "weights.npz"), "--data", str(d / "colour.npz"),
                 "--format", "json", "--threads", "1"]) == 0
    m = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(m["normalization"]["mean"], want_m, rtol=1e-12)
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == ty).mean()))
    np.save(d / "five.npy", tx[:5])
    assert main(["predict", str(d / "colour.yaml"), str(run / "weights.npz"), str(d / "five.npy"),
                 "--format", "json", "--threads", "1"]) == 0
    got = np.array([r["probabilities"] for r in json.loads(capsys.readouterr().out)["predictions"]])
    np.testing.assert_allclose(got, probs[:5], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.predict(tx[:5]), probs[:5], rtol=1e-4, atol=1e-6)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(tx[0].transpose(1, 2, 0), "RGB").save(d / "one.png")  # an RGB PNG: the same pixels
    assert main(["predict", str(d / "colour.yaml"), str(run / "weights.npz"), str(d / "one.png"),
                 "--format", "json", "--threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"][0]["probabilities"]
    np.testing.assert_allclose(got, probs[0], rtol=1e-4, atol=1e-6)
    assert main(["eval", str(d / "colour.yaml"), str(run / "weights.npz"), "--data", str(d / "colour.npz"),
                 "--threads", "1"]) == 0
    assert "normalisation: mean [" in capsys.readouterr().out


def test_resume_keeps_the_per_channel_statistics(colour_run, tmp_path):
    d, x, *_ = colour_run
    opts = dict(spec=str(d / "colour.yaml"), data=str(d / "colour.npz"), out=str(tmp_path / "r"), threads=1,
                normalize="channel")
    train(TrainOptions(**opts, epochs=1))
    train(TrainOptions(**opts, epochs=2, resume=True))
    meta = W.split(W.load_npz(tmp_path / "r" / "weights.npz"))[1]
    np.testing.assert_allclose(meta["mean"], numpy_stats(x)[0], rtol=1e-12)
    with pytest.raises(NetcError, match="normalize"):  # a resumed run keeps its settings
        train(TrainOptions(**{**opts, "normalize": "global"}, epochs=3, resume=True))


def test_saved_per_channel_weights_round_trip_and_wrong_lengths_are_refused(tmp_path):
    net = nc.compile(load_text(tmp_path, COLOUR), threads=1)
    net.set_normalization([0.1, 0.5, 0.3], [0.2, 0.25, 0.5])
    net.save_weights(tmp_path / "w.npz")
    other = nc.compile(load_text(tmp_path, COLOUR), threads=1)
    info = other.load_weights(tmp_path / "w.npz")
    assert (info["mean"], info["std"]) == ([0.1, 0.5, 0.3], [0.2, 0.25, 0.5])
    x, _ = colour_images(4, np.random.default_rng(3))
    want = softmax(other.forward(by_hand(x, [0.1, 0.5, 0.3], [0.2, 0.25, 0.5])).astype(np.float64))
    np.testing.assert_allclose(other.predict(x), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one per channel: 3"):
        net.set_normalization([0.1, 0.2], 0.5)
    arrays = W.load_npz(tmp_path / "w.npz")
    arrays["__meta__/mean"] = np.array([0.1, 0.2])
    W.save_npz(tmp_path / "two.npz", arrays)
    with pytest.raises(WeightsError, match="the normalisation mean has 2 values .* takes 3 channels"):
        other.load_weights(tmp_path / "two.npz")
    arrays["__meta__/mean"] = np.array([[0.1, 0.2, 0.3]])
    W.save_npz(tmp_path / "flat.npz", arrays)
    with pytest.raises(WeightsError, match="damaged metadata '__meta__/mean'"):
        other.load_weights(tmp_path / "flat.npz")


def load_text(d: Path, text: str):
    (d / "net.yaml").write_text(text)
    return load(str(d / "net.yaml"))


# ---- what keeps working as before ---------------------------------------------------------------------
def test_grey_inputs_keep_one_mean_and_std(tmp_path):
    spec_, data = make_case(tmp_path)
    train(TrainOptions(spec=spec_, data=data, out=str(tmp_path / "g"), threads=1, epochs=1))
    meta = W.split(W.load_npz(tmp_path / "g" / "weights.npz"))[1]
    x = np.load(data)["x"] / 255
    assert meta["mean"].shape == () and float(meta["mean"]) == pytest.approx(x.mean(), rel=1e-12)
    assert float(meta["std"]) == pytest.approx(x.std(), rel=1e-12)
    train(TrainOptions(spec=spec_, data=data, out=str(tmp_path / "c"), threads=1, epochs=1, normalize="channel"))
    meta = W.split(W.load_npz(tmp_path / "c" / "weights.npz"))[1]
    assert meta["mean"].shape == (1,) and float(meta["mean"][0]) == pytest.approx(x.mean(), rel=1e-12)


def test_weights_with_one_mean_and_std_load_into_a_colour_net(tmp_path):
    """A file written before per-channel normalisation: scalar '__meta__/mean' and 'std'."""
    net = nc.compile(load_text(tmp_path, COLOUR), threads=1)
    arrays = W.with_meta(net.state_dict(), {"mean": np.float64(0.3), "std": np.float64(0.2), "pad": np.bool_(False)})
    W.save_npz(tmp_path / "old.npz", arrays)
    info = net.load_weights(tmp_path / "old.npz")
    assert (info["mean"], info["std"]) == (0.3, 0.2)
    x, _ = colour_images(4, np.random.default_rng(4))
    want = softmax(net.forward(by_hand(x, 0.3, 0.2)).astype(np.float64))
    np.testing.assert_allclose(net.predict(x), want, rtol=1e-4, atol=1e-6)
    (tmp_path / "normalization.json").write_text('{"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.25]}')
    W.save_npz(tmp_path / "bare.npz", net.state_dict())  # no metadata: the json next to it
    info = net.load_weights(tmp_path / "bare.npz")
    assert (info["mean"], info["std"]) == ([0.1, 0.2, 0.3], [0.5, 0.5, 0.25])


def test_an_old_checkpoint_without_the_setting_resumes(tmp_path):
    spec_, data = make_case(tmp_path)
    opts = dict(spec=spec_, data=data, out=str(tmp_path / "r"), threads=1)
    train(TrainOptions(**opts, epochs=1))
    ckpt = tmp_path / "r" / "checkpoint.npz"
    arrays = W.load_npz(ckpt)
    settings = json.loads(str(arrays["__meta__/settings"]))
    del settings["normalize"]
    arrays["__meta__/settings"] = W.json_array(settings)
    W.save_npz(ckpt, arrays)
    train(TrainOptions(**opts, epochs=2, resume=True))
    assert len(W.split(W.load_npz(ckpt))[1]) and (tmp_path / "r" / "weights.npz").exists()


def test_channel_mode_needs_an_image_input(tmp_path):
    vec = "name: vec\ninput: [64]\nlayers:\n  - linear: {out_features: 4}\nloss: cross_entropy\n"
    spec_, data = make_case(tmp_path, spec=vec)
    with pytest.raises(NetcError, match="--normalize channel needs an image input"):
        train(TrainOptions(spec=spec_, data=data, out=str(tmp_path / "v"), threads=1, epochs=1, normalize="channel"))


# ---- augmentation's padding is black in every channel ------------------------------------------------
def test_shift_fills_each_channel_with_its_own_black():
    net = build(spec([3, 6, 7], ["flatten", "linear: {out_features: 3}"], name="fill3"), "float64")
    net.set_optimizer("sgd", lr=0.0)
    x = np.random.default_rng(5).standard_normal((30, 3, 6, 7)) + 10  # never equal to a fill value
    fill = [-1.5, -2.5, -3.5]
    net.set_augment(shift=2, fill=fill, seed=1, epoch=0)
    got = augmented_inputs(net, x, np.arange(30))
    filled = 0
    for ch in range(3):
        outside = got[:, ch] < 5
        assert np.all(got[:, ch][outside] == fill[ch])
        filled += outside.sum()
    assert filled > 0  # some samples were shifted
    with pytest.raises(ValueError, match=r"one per channel \(3\)"):
        net.set_augment(shift=1, fill=[0.0, 1.0])


MEAN3, STD3 = [0.1, 0.5, 0.3], [0.2, 0.25, 0.5]


def _colour_weights(tmp_path, stored: bool = True):
    network = load_text(tmp_path, COLOUR)
    net = nc.compile(network, threads=1)
    net.set_normalization(MEAN3, STD3)
    if stored:
        net.save_weights(tmp_path / "w.npz")
    else:  # bare weights, the statistics in the normalization.json beside them (as netc train writes)
        W.save_npz(tmp_path / "w.npz", net.state_dict())
        (tmp_path / "normalization.json").write_text(json.dumps({"mean": MEAN3, "std": STD3}))
    return network, net


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "json-beside"])
def test_export_finds_the_per_channel_normalisation(tmp_path, stored):
    from netcompiler.export import load_state

    network, net = _colour_weights(tmp_path, stored)
    state, norm = load_state(network, tmp_path / "w.npz")
    assert norm == (MEAN3, STD3) and set(state) == set(net.state_dict())


def test_exported_header_defines_one_value_per_channel(tmp_path):
    """The header's initialisers compile and hold the float32 values (read back by a C program)."""
    import shutil
    import subprocess

    from netcompiler.export import export_c, export_int8, load_state

    cc = shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    network, _ = _colour_weights(tmp_path)
    state, norm = load_state(network, tmp_path / "w.npz")
    floats = export_c(network, state, normalisation=norm)
    int8 = export_int8(network, state, np.zeros((4, 3, 8, 8), np.float32), normalisation=norm)
    for kind, e in (("float", floats), ("int8", int8)):
        d = tmp_path / kind
        e.write(d)
        assert "COLOUR_INPUT_CHANNELS 3" in e.header and "in channel c (x - mean[c]) / std[c]" in e.header
        (d / "main.c").write_text(
            '#include <stdio.h>\n#include "colour.h"\n'
            "static const float mean[COLOUR_INPUT_CHANNELS] = COLOUR_INPUT_MEAN;\n"
            "static const float std_[COLOUR_INPUT_CHANNELS] = COLOUR_INPUT_STD;\n"
            'int main(void) { for (int c = 0; c < COLOUR_INPUT_CHANNELS; c++) printf("%.9g %.9g\\n", mean[c], std_[c]);'
            " return 0; }\n")
        exe = d / "main"
        r = subprocess.run([cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", f"-I{d}", str(d / "main.c"),
                            "-o", str(exe)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = np.loadtxt(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines())
        assert np.array_equal(got.astype(np.float32), np.float32([MEAN3, STD3]).T)  # %.9g reads back exactly


def test_onnx_metadata_holds_the_per_channel_lists(tmp_path, capsys):
    pytest.importorskip("onnx")
    import onnx

    _colour_weights(tmp_path)
    out = tmp_path / "colour.onnx"
    assert main(["export", str(tmp_path / "net.yaml"), str(tmp_path / "w.npz"), "--format", "onnx", "-o", str(out)]) == 0
    assert "in channel c: (x - [0.1, 0.5, 0.3][c]) / [0.2, 0.25, 0.5][c]" in capsys.readouterr().out
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["netc.mean"]) == MEAN3 and json.loads(props["netc.std"]) == STD3


def test_int8_calibration_images_are_normalised_per_channel(tmp_path):
    from netcompiler.export import calibration_inputs

    network, _ = _colour_weights(tmp_path)
    x, y = colour_images(20, np.random.default_rng(3))
    np.savez(tmp_path / "colour.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    got = calibration_inputs(network, str(tmp_path / "colour.npz"), 8, (MEAN3, STD3))
    assert np.allclose(got, by_hand(x[:8], MEAN3, STD3), rtol=1e-6, atol=1e-6)
