"""The training loop: settings precedence, metrics, and exact resume after an interrupt.

Small synthetic data (which quadrant of an 8x8 image is bright) and a small net with
batch-norm and dropout, so that buffers and the dropout counter must survive a resume.
"""
from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from netcompiler import weights as W
from netcompiler.check import TRAIN_KEYS, check_text
from netcompiler.data import FASHION_MNIST_DIR
from netcompiler.errors import DataError
from netcompiler.progress import Progress
from netcompiler.train import (METRICS_COLUMNS, TrainingDiverged, TrainOptions, classification_metrics, loss_of,
                               read_metrics, resolve_settings, train)

ROOT = Path(__file__).resolve().parents[1]

TINY = """name: tiny
input: [1, 8, 8]
layers:
  - conv2d: {out_channels: 4, kernel_size: 3}
  - batchnorm2d
  - relu
  - dropout: {p: 0.2}
  - flatten
  - linear: {out_features: 4}
loss: cross_entropy
train: {epochs: 3, batch_size: 16, lr: 0.01}
"""


def quadrants(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 90, (n, 8, 8)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 120
    return x, y


def make_case(d: Path, n_train: int = 200, n_test: int = 60, spec: str = TINY, test: bool = True) -> tuple[str, str]:
    """Write tiny.yaml and quad.npz into `d`; return their paths."""
    rng = np.random.default_rng(7)
    x, y = quadrants(n_train, rng)
    arrays = {"x": x, "y": y}
    if test:
        arrays["x_test"], arrays["y_test"] = quadrants(n_test, rng)
    np.savez(d / "quad.npz", **arrays)
    (d / "tiny.yaml").write_text(spec)
    return str(d / "tiny.yaml"), str(d / "quad.npz")


def final_state(run_dir) -> dict[str, np.ndarray]:
    return W.split(W.load_npz(Path(run_dir) / "weights.npz"))[0]


def assert_same_weights(a, b) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), f"{k} differs"


def assert_same_metrics(a, b) -> None:
    ma, mb = read_metrics(Path(a) / "metrics.csv"), read_metrics(Path(b) / "metrics.csv")
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb):
        for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[k] == rb[k], (k, ra, rb)


def options(spec, data, out, **kw) -> TrainOptions:
    kw.setdefault("threads", 1)  # 2-thread runs: test_ctrl_c_stops_at_a_chunk_boundary
    return TrainOptions(spec=spec, data=data, out=str(out), **kw)


class Interrupt:
    """An on_chunk hook raising KeyboardInterrupt after `k` chunks."""

    def __init__(self, k: int):
        self.k, self.seen = k, 0

    def __call__(self, info):
        self.seen += 1
        if self.seen == self.k:
            raise KeyboardInterrupt


# ---- settings -------------------------------------------------------------------------------
def test_settings_precedence():
    net = check_text(TINY, "tiny.yaml")
    s = resolve_settings(net, TrainOptions("tiny.yaml", "d"))
    assert (s["epochs"], s["batch_size"], s["lr"]) == (3, 16, 0.01)  # the spec's train: section
    assert s["optimizer"] == TRAIN_KEYS["optimizer"][1] and s["seed"] == TRAIN_KEYS["seed"][1]  # built-in
    s = resolve_settings(net, TrainOptions("tiny.yaml", "d", epochs=1, lr=0.5, optimizer="sgd"))
    assert (s["epochs"], s["batch_size"], s["lr"], s["optimizer"]) == (1, 16, 0.5, "sgd")  # flags win


# ---- metrics ----------------------------------------------------------------------------------
def test_classification_metrics():
    z = np.array([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 0.0, 1.0]])
    y = np.array([0, 1, 1, 1])
    m = classification_metrics(z, y, "cross_entropy", 3, ["a", "b", "c"])
    assert m["samples"] == 4
    assert m["accuracy"] == 0.5
    assert m["top2_accuracy"] == 0.75  # sample 3: top-2 is (0, 2)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert [c["accuracy"] for c in m["per_class"]] == [1.0, 1 / 3, None]
    assert m["per_class"][1]["name"] == "b"
    lse = np.log(np.exp(z).sum(axis=1))
    assert m["loss"] == pytest.approx(np.mean(lse - z[np.arange(4), y]))


def test_mse_loss_is_mean_over_elements():
    z = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert loss_of("mse", z, np.array([0, 0])) == pytest.approx((0 + 0 + 0.25 + 0.25) / 4)


def test_binary_cross_entropy_loss_is_torchs_on_one_hot_targets():
    torch = pytest.importorskip("torch")
    z = np.array([[3.0, -1.0, 0.0], [-40.0, 2.5, 800.0]])
    y = np.array([1, 2])
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y), 3).double()
    want = torch.nn.BCEWithLogitsLoss()(torch.as_tensor(z), onehot).item()
    assert loss_of("binary_cross_entropy", z, y) == pytest.approx(want, rel=1e-12)


# ---- training -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(spec, data, reference run dir): 3 uninterrupted epochs, 3 batches per chunk."""
    d = tmp_path_factory.mktemp("case")
    spec, data = make_case(d)
    train(options(spec, data, d / "full", chunk_batches=3))
    return spec, data, d / "full"


def test_chunk_size_does_not_change_results(case, tmp_path):
    spec, data, full = case
    train(options(spec, data, tmp_path / "auto"))  # adaptive chunks
    assert_same_weights(full, tmp_path / "auto")
    assert_same_metrics(full, tmp_path / "auto")


# 13 batches per epoch, 3 per chunk (5 chunks): mid-epoch 1, the end of epoch 1's batches (before its
# validation), mid-epoch 2, and mid-epoch 3
@pytest.mark.parametrize("k", [1, 5, 7, 13])
def test_interrupt_and_resume_is_identical(case, tmp_path, k):
    spec, data, full = case
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(options(spec, data, run, chunk_batches=3), on_chunk=Interrupt(k))
    ckpt = W.split(W.load_npz(run / "checkpoint.npz"))[1]
    assert "order" in ckpt  # a mid-epoch checkpoint
    with pytest.raises(KeyboardInterrupt):  # interrupted again, once, after resuming
        train(options(spec, data, run, chunk_batches=2, resume=True), on_chunk=Interrupt(2))
    train(options(spec, data, run, chunk_batches=5, resume=True))
    assert_same_weights(full, run)
    assert_same_metrics(full, run)
    a = W.split(W.load_npz(full / "checkpoint.npz"))[2]
    b = W.split(W.load_npz(run / "checkpoint.npz"))[2]
    for key in a:  # optimizer moments, step and dropout counter too
        assert np.array_equal(a[key], b[key]), key


def test_more_epochs_continue_a_finished_run(case, tmp_path):
    spec, data, full = case
    train(options(spec, data, tmp_path / "run", epochs=2))
    train(options(spec, data, tmp_path / "run", epochs=3, resume=True))
    assert_same_weights(full, tmp_path / "run")
    assert_same_metrics(full, tmp_path / "run")


def test_ctrl_c_stops_at_a_chunk_boundary(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    full, run = tmp_path / "full", tmp_path / "run"
    train(options(spec, data, full, epochs=2, chunk_batches=4, threads=2))

    def press_ctrl_c(info):
        if info.epoch == 1 and info.chunks == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only asks the loop to stop

    with pytest.raises(KeyboardInterrupt):
        train(options(spec, data, run, epochs=2, chunk_batches=4, threads=2), on_chunk=press_ctrl_c)
    err = capsys.readouterr().err
    assert "stopping after the current chunk" in err and "checkpoint saved at epoch 1, after sample 128" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    train(options(spec, data, run, epochs=2, resume=True, threads=2))
    assert_same_weights(full, run)


def test_progress_bar_on_a_terminal():
    buf = io.StringIO()
    bar = Progress(1000, "epoch 1/2", buf, enabled=True)
    bar.update(250, loss=0.5, acc=0.75)
    text = buf.getvalue()
    assert text.startswith("\repoch 1/2 [") and "250/1000" in text and "img/s" in text
    assert "loss 0.5000" in text and "acc 75.00%" in text
    bar.close()
    assert buf.getvalue().endswith("\r") and buf.getvalue().rsplit("\r", 2)[-2].strip() == ""
    quiet = io.StringIO()
    bar = Progress(1000, "epoch 1/2", quiet, enabled=None)  # not a terminal
    bar.update(500, 0.1, 0.9)
    bar.close()
    assert quiet.getvalue() == ""


def test_labels_beyond_the_outputs(tmp_path):
    spec, data = make_case(tmp_path, spec=TINY.replace("out_features: 4", "out_features: 3"))
    with pytest.raises(DataError, match="labels go up to 3, but network 'tiny' has 3 outputs"):
        train(options(spec, data, tmp_path / "run"))


def test_mse_network_trains_on_one_hot_targets(tmp_path):
    flat = TINY.replace("loss: cross_entropy", "loss: mse").replace("input: [1, 8, 8]", "input: [64]")
    flat = flat.replace("  - conv2d: {out_channels: 4, kernel_size: 3}\n  - batchnorm2d\n", "")
    spec, data = make_case(tmp_path, spec=flat)
    out = train(options(spec, data, tmp_path / "run", epochs=2))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert np.isnan(rows[-1]["train_acc"])  # C counts correct predictions for cross-entropy only
    assert rows[-1]["val_acc"] > 0.5 and rows[-1]["val_loss"] < rows[0]["train_loss"]
    assert out["history"][-1][0] == 2


def test_binary_cross_entropy_network_trains_on_one_hot_targets(tmp_path):
    """netc train on labelled images: one-hot float targets, one per class (multi-label style)."""
    spec, data = make_case(tmp_path, spec=TINY.replace("loss: cross_entropy", "loss: binary_cross_entropy"))
    train(options(spec, data, tmp_path / "run", epochs=2))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert np.isnan(rows[-1]["train_acc"])  # C counts correct predictions for cross-entropy only
    assert rows[-1]["val_acc"] > 0.5 and rows[-1]["val_loss"] < rows[0]["train_loss"]


def test_history_and_files(tmp_path):
    spec, data = make_case(tmp_path)
    out = train(options(spec, data, tmp_path / "run", epochs=2, val_split=0.25))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list(rows[0]) == list(METRICS_COLUMNS)
    assert all(0 <= r["val_acc"] <= 1 and r["images_per_s"] > 0 for r in rows)
    assert out["history"][-1][0] == 2
    meta = W.split(W.load_npz(tmp_path / "run" / "weights.npz"))[1]
    assert W.meta_float(meta, "mean") == pytest.approx(out["settings"]["mean"])


def test_diverging_loss_stops_and_keeps_the_checkpoint(tmp_path):
    spec, data = make_case(tmp_path)
    run = tmp_path / "run"
    train(options(spec, data, run, epochs=1))
    arrays = W.load_npz(run / "checkpoint.npz")
    arrays["fc1.weight"] = np.full_like(arrays["fc1.weight"], 3e38)  # logits overflow to inf
    W.save_npz(run / "checkpoint.npz", arrays)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(TrainingDiverged) as exc:
        train(options(spec, data, run, epochs=2, resume=True))
    assert "at epoch 2, batch 1 of 13" in str(exc.value)
    assert f"the last good checkpoint is kept in {run / 'checkpoint.npz'}" in str(exc.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_diverging_in_the_first_epoch(tmp_path):
    # inputs scaled up 10^30 times (std 1e-30): the first sgd step overflows float32
    spec, data = make_case(tmp_path, spec=TINY.replace("  - batchnorm2d\n", "").replace(
        "lr: 0.01}", "lr: 0.01, mean: 0, std: 1.0e-30}"))
    with pytest.raises(TrainingDiverged, match=r"epoch 1, batch \d+ of 13 .*no checkpoint was written"):
        train(options(spec, data, tmp_path / "run", optimizer="sgd"))
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_lenet5_learns_fashion_mnist(tmp_path, capsys):
    from netcompiler.cli import main
    from netcompiler.data import load_dataset

    spec, run = str(ROOT / "specs/lenet5.yaml"), tmp_path / "run"
    out = train(options(spec, "fashion-mnist", run, epochs=1, limit=12000, threads=2), progress=False)
    epoch, train_loss, train_acc, val_loss, val_acc = out["history"][-1][:5]
    assert epoch == 1 and val_acc > 0.70, f"test accuracy {val_acc:.3f} after one epoch on 12000 images"
    capsys.readouterr()
    assert main(["eval", spec, str(run / "weights.npz"), "--data", "fashion-mnist", "--limit", "2000",
                 "--format", "json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["class_names"][0] == "T-shirt/top" and m["per_class"][9]["name"] == "Ankle boot"
    assert m["accuracy"] > 0.70 and sum(map(sum, m["confusion_matrix"])) == 2000
    ds = load_dataset("fashion-mnist")
    np.save(tmp_path / "x.npy", ds.test_x[:20])
    assert main(["predict", spec, str(run / "weights.npz"), str(tmp_path / "x.npy"), "--format", "json"]) == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert np.mean([p["predicted"] == y for p, y in zip(preds, ds.test_y[:20])]) > 0.5
    assert preds[0]["top"][0]["name"] in ds.class_names


def test_ctrl_c_during_validation_saves_the_finished_epoch(tmp_path, capsys, monkeypatch):
    from netcompiler import train as T

    spec, data = make_case(tmp_path)  # has test images: every epoch ends with their evaluation
    evaluate = T.Run._evaluate

    def press_ctrl_c(self, x, labels):
        os.kill(os.getpid(), signal.SIGINT)  # the handler only asks the loop to stop
        return evaluate(self, x, labels)

    monkeypatch.setattr(T.Run, "_evaluate", press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(options(spec, data, tmp_path / "run", epochs=2))
    err = capsys.readouterr().err
    assert "netc: interrupted; checkpoint saved after epoch 1 in " in err, err
    assert "order" not in W.split(W.load_npz(tmp_path / "run" / "checkpoint.npz"))[1]  # an epoch-end checkpoint
