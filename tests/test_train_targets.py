"""`netc train` / `netc eval` with float targets: `--target input` (an autoencoder reproduces
its input images, `--perturb` makes it a denoising one) and an .npz whose `y` holds float
targets of the output's shape."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import netcompiler as nc
from conftest import ROOT
from netcompiler import weights as W
from netcompiler.cli import main
from netcompiler.train import read_metrics

AE = str(ROOT / "specs" / "conv_autoencoder.yaml")
FASHION = Path("/usr/share/datasets/fashion-mnist")
# a small autoencoder: 1x8x8 -> 1x8x8
TINY_AE = """
name: tiny_ae
input: [1, 8, 8]
layers:
  - conv2d: {out_channels: 4, kernel_size: 3, padding: 1}
  - relu
  - maxpool2d: {kernel_size: 2}
  - upsample: {scale_factor: 2}
  - conv2d: {out_channels: 1, kernel_size: 3, padding: 1}
loss: binary_cross_entropy
"""


def netc(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _eval_loss(capsys, spec, weights, *options) -> float:
    rc, out, err = netc(capsys, "eval", spec, weights, *options, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST is not installed (dataset-fashion-mnist)")
def test_conv_autoencoder_trains_to_denoise_fashion_mnist(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = netc(capsys, "train", AE, "--data", "fashion-mnist", "--target", "input", "--perturb", "noise=0.3",
                        "--limit", 512, "--epochs", 1, "--out", run, "--no-progress")
    assert rc == 0, err
    assert "perturbed once (noise=0.3); targets: the clean input images" in out
    (row,) = read_metrics(run / "metrics.csv")
    assert np.isnan(row["train_acc"]) and np.isnan(row["val_acc"])  # no classes
    # the loss against the clean images of the untrained network (the same initialisation) and
    # of the trained one, on the first 512 test images with the same noise
    untrained = nc.compile(AE)
    untrained.init(0)
    np.savez(run / "init.npz", **untrained.state_dict())  # normalised as the run (normalization.json)
    opts = ("--data", "fashion-mnist", "--target", "input", "--limit", 512, "--perturb", "noise=0.3")
    before = _eval_loss(capsys, AE, run / "init.npz", *opts)
    after = _eval_loss(capsys, AE, run / "weights.npz", *opts)
    assert before["targets"] == "input" and before["samples"] == 512
    assert after["perturbed"]["loss"] < 0.85 * before["perturbed"]["loss"], (before, after)
    assert after["loss"] < 0.85 * before["loss"]
    assert before["loss"] > 0.6  # about log 2: logits near 0


def _npz(path: Path, y, n=64, y_test=None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    arrays = {"x": x, "y": y(x) if callable(y) else y}
    if y_test is not None:
        arrays |= {"x_test": x[:16], "y_test": y_test}
    np.savez(path, **arrays)
    return path


def test_npz_float_targets_train_and_evaluate(tmp_path, capsys):
    spec = tmp_path / "tiny_ae.yaml"
    spec.write_text(TINY_AE)
    # the target: the image flipped left-right, on the 0..1 scale, of the output's shape
    target = lambda x: (x[:, None, :, ::-1] / 255).astype(np.float32)  # noqa: E731
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (64, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=target(x), x_test=x[:16], y_test=target(x[:16]))
    run = tmp_path / "run"
    rc, out, err = netc(capsys, "train", spec, "--data", tmp_path / "d.npz", "--epochs", 3, "--batch-size", 16,
                        "--lr", 0.01, "--out", run, "--no-progress", "--threads", 1)
    assert rc == 0, err
    rows = read_metrics(run / "metrics.csv")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    m = _eval_loss(capsys, spec, run / "weights.npz", "--data", tmp_path / "d.npz")
    assert m["targets"] == "float" and m["samples"] == 16 and m["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)


@pytest.mark.parametrize("y,message", [
    (lambda x: np.zeros((len(x), 10), np.float32),
     "error: {data} (training labels): targets are 10 per sample, but network 'tiny_ae' outputs 1x8x8"),
    (lambda x: np.full((len(x), 1, 8, 8), 2.0, np.float32),
     "error: {data} (training labels): targets must be in [0, 1] for loss binary_cross_entropy, found 2.0"),
    (lambda x: np.full((len(x), 8, 8), np.nan, np.float32),
     "error: {data}['y']: float targets must be finite, found nan"),
])
def test_float_targets_that_do_not_fit_are_one_line_errors(tmp_path, capsys, y, message):
    spec = tmp_path / "tiny_ae.yaml"
    spec.write_text(TINY_AE)
    data = _npz(tmp_path / "d.npz", y)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--epochs", 1, "--out", tmp_path / "run",
                        "--no-progress")
    assert rc == 1 and err.strip() == "netc: " + message.format(data=data), err
    assert "Traceback" not in err


def test_target_input_needs_an_output_of_the_inputs_shape(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", lambda x: np.arange(len(x)) % 3)
    spec = tmp_path / "mlp.yaml"
    spec.write_text("input: [1, 8, 8]\nlayers:\n  - flatten\n  - linear: {out_features: 3}\nloss: mse\n")
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--target", "input", "--out", tmp_path / "run")
    assert rc == 1
    assert err.strip() == ("netc: error: --target input trains network 'mlp' to reproduce its input (1x8x8), "
                           "but it outputs 3")


def test_float_targets_with_cross_entropy_are_refused(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", lambda x: np.zeros((len(x), 3), np.float32))
    spec = tmp_path / "mlp.yaml"
    spec.write_text("input: [1, 8, 8]\nlayers:\n  - flatten\n  - linear: {out_features: 3}\nloss: cross_entropy\n")
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "run")
    assert rc == 1
    assert err.strip() == (f"netc: error: {data} (training labels): float targets need loss mse or "
                           f"binary_cross_entropy; network 'mlp' uses cross_entropy, which takes class labels (N,)")


def test_train_refuses_a_bad_perturbation(tmp_path, capsys):
    spec = tmp_path / "tiny_ae.yaml"
    spec.write_text(TINY_AE)
    data = _npz(tmp_path / "d.npz", lambda x: np.zeros((len(x), 1, 8, 8), np.float32))
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--perturb", "blur=2", "--out", tmp_path / "run")
    assert rc == 1 and err.startswith("netc: error: --perturb: unknown perturbation 'blur'"), err


def test_npz_with_float_targets_in_train_and_labels_in_test_is_refused(tmp_path):
    from netcompiler.data import load_dataset
    from netcompiler.errors import DataError

    data = _npz(tmp_path / "d.npz", lambda x: np.zeros((len(x), 1, 8, 8), np.float32), y_test=np.zeros(16, np.int64))
    with pytest.raises(DataError, match=r"d.npz\['y_test'\] has shape \(\) per sample"):
        load_dataset(str(data))


def test_resume_keeps_the_runs_target(tmp_path, capsys):
    spec = tmp_path / "tiny_ae.yaml"
    spec.write_text(TINY_AE)
    data = _npz(tmp_path / "d.npz", lambda x: np.zeros((len(x), 1, 8, 8), np.float32))
    run = tmp_path / "run"
    assert netc(capsys, "train", spec, "--data", data, "--target", "input", "--epochs", 1, "--out", run,
                "--no-progress")[0] == 0
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--target", "labels", "--epochs", 2, "--out", run,
                        "--resume", "--no-progress")
    assert rc == 1 and "--target labels (the run used input)" in err
    assert W.load_npz(run / "checkpoint.npz")  # untouched
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--epochs", 2, "--out", run, "--resume",
                        "--no-progress")
    assert rc == 0, err
    assert len(read_metrics(run / "metrics.csv")) == 2


def test_a_checkpoint_from_before_target_resumes_with_labels(tmp_path, capsys):
    spec = tmp_path / "tiny_ae.yaml"
    spec.write_text(TINY_AE)
    data = _npz(tmp_path / "d.npz", lambda x: (x[:, None] / 255).astype(np.float32))
    run = tmp_path / "run"
    assert netc(capsys, "train", spec, "--data", data, "--epochs", 1, "--out", run, "--no-progress")[0] == 0
    arrays = dict(np.load(run / "checkpoint.npz", allow_pickle=False))
    settings = json.loads(str(arrays["__meta__/settings"]))
    assert (settings.pop("target"), settings.pop("perturb")) == ("labels", None)
    arrays["__meta__/settings"] = np.array(json.dumps(settings))
    np.savez(run / "checkpoint.npz", **arrays)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--epochs", 2, "--out", run, "--resume",
                        "--no-progress")
    assert rc == 0, err
    assert len(read_metrics(run / "metrics.csv")) == 2
