"""`netc train`, `netc eval`, `netc predict` end to end on a small synthetic data set."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import TINY, assert_same_weights, make_case, quadrants

import netcompiler.train
from netcompiler import weights as W
from netcompiler.cli import main
from netcompiler.train import read_metrics

FILES = {"spec.yaml", "normalization.json", "metrics.csv", "weights.npz", "checkpoint.npz", "best.npz", ".netc.lock"}


def netc(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch run: (dir, spec, data, run dir, stdout)."""
    d = tmp_path_factory.mktemp("cli")
    spec, data = make_case(d)
    run = d / "run"
    rc = main(["train", spec, "--data", data, "--out", str(run), "--threads", "1"])
    assert rc == 0
    return d, spec, data, run


def test_train_writes_the_run_directory(trained, capsys):
    d, spec, data, run = trained
    assert {p.name for p in run.iterdir()} == FILES  # no temporary files left behind
    assert (run / "spec.yaml").read_text() == TINY
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s", "lr"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    for r in rows[1:]:
        loss, acc, vloss, vacc, secs, ips, lr = map(float, r[1:])
        assert loss > 0 and 0 <= acc <= 1 and vloss >= 0 and 0 <= vacc <= 1 and secs > 0 and ips > 0 and lr == 0.01
    assert float(rows[-1][4]) > 0.9  # the quadrant task is easy
    norm = json.loads((run / "normalization.json").read_text())
    assert norm["source"] == "computed on the 200 training images" and 0 < norm["std"] < 1
    weights = W.load_npz(run / "weights.npz")
    assert {"conv1.weight", "bn1.running_mean", "fc1.bias", "__meta__/mean", "__meta__/std"} <= set(weights)
    assert float(weights["__meta__/mean"]) == norm["mean"]
    ckpt = W.load_npz(run / "checkpoint.npz")
    assert {"__optim__/m", "__optim__/v", "__optim__/step", "__optim__/dropout_counter", "__meta__/rng",
            "__meta__/spec_hash", "__meta__/settings"} <= set(ckpt)


def test_train_output(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "r", "--epochs", 1,
                        "--batch-size", 50, "--optimizer", "momentum", "--threads", 1)
    assert rc == 0, err
    assert "momentum lr 0.01 momentum 0.9, batch 50, 1 epochs, seed 0" in out  # flags win over the spec
    assert "validating on the test set (60 images)" in out
    assert "\r" not in out  # no progress bar when stdout is not a terminal
    epoch = [l for l in out.splitlines() if l.startswith("epoch")]
    assert len(epoch) == 1 and "train loss" in epoch[0] and "test loss" in epoch[0] and "img/s" in epoch[0]


def test_val_split_and_no_test_set(tmp_path, capsys):
    spec, data = make_case(tmp_path, test=False)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "a", "--epochs", 1,
                        "--threads", 1)
    assert rc == 0 and "validating on nothing (the data has no test set; use --val-split)" in out
    with open(tmp_path / "a" / "metrics.csv") as f:
        assert next(csv.DictReader(f))["val_acc"] == ""
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "b", "--epochs", 1,
                        "--val-split", 0.25, "--threads", 1, "--limit", 120)
    assert rc == 0 and "data: quad: 90 training images; validating on a validation split of 30 training" in out
    assert "| val loss" in out


def test_existing_run_needs_resume_or_force(trained, tmp_path, capsys):
    d, spec, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", copy)
    assert rc == 1 and "already holds a checkpoint: pass --resume" in err
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", copy, "--resume")
    assert rc == 0 and "already trained 3 epochs" in out
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", copy, "--resume", "--lr", 0.5,
                        "--batch-size", 8)
    assert rc == 1
    assert "these options differ: --batch-size 8 (the run used 16), --lr 0.5 (the run used 0.01)" in err
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", copy, "--force", "--epochs", 1,
                        "--threads", 1)
    assert rc == 0 and len((copy / "metrics.csv").read_text().splitlines()) == 2


def test_resume_refuses_another_spec_or_data(trained, tmp_path, capsys):
    d, spec, data, run = trained
    shutil.copytree(run, tmp_path / "run")
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("out_channels: 4", "out_channels: 5"))
    rc, out, err = netc(capsys, "train", other, "--data", data, "--out", tmp_path / "run", "--resume")
    assert rc == 1 and "was written for a different spec" in err
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "run", "--resume",
                        "--epochs", 4, "--limit", 100)
    assert rc == 1 and "--limit 100 (the run used None)" in err
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "none", "--resume")
    assert rc == 1 and "--resume: no checkpoint" in err


def test_interrupt_exit_status_and_resume(trained, tmp_path, capsys, monkeypatch):
    d, spec, data, run = trained
    calls = {"n": 0}
    update = netcompiler.train.Progress.update

    def interrupting_update(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the second chunk (the first has 2 batches)
            raise KeyboardInterrupt
        return update(self, *a, **kw)

    monkeypatch.setattr(netcompiler.train.Progress, "update", interrupting_update)
    args = ["train", spec, "--data", data, "--out", tmp_path / "run", "--threads", 1]
    rc, out, err = netc(capsys, *args)
    assert rc == 130
    assert "checkpoint saved at epoch" in err and "--resume" in err and "netc: interrupted" in err
    monkeypatch.setattr(netcompiler.train.Progress, "update", update)
    rc, out, err = netc(capsys, *args, "--resume")
    assert rc == 0 and "resuming" in out
    assert_same_weights(run, tmp_path / "run")


def test_non_finite_loss_stops_training(tmp_path, capsys):
    # inputs scaled up 10^30 times (std 1e-30): the first sgd step overflows float32
    spec, data = make_case(tmp_path, spec=TINY.replace("  - batchnorm2d\n", "").replace(
        "lr: 0.01}", "lr: 0.01, mean: 0, std: 1.0e-30}"))
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "r", "--optimizer", "sgd",
                        "--threads", 1)
    assert rc == 1
    assert err.startswith("netc: error: training stopped: the loss is") and "at epoch 1, batch" in err
    assert "Traceback" not in err


# ---- eval ---------------------------------------------------------------------------------------
def test_eval_text(trained, capsys):
    d, spec, data, run = trained
    rc, out, err = netc(capsys, "eval", spec, run / "weights.npz", "--data", data, "--threads", 1)
    assert rc == 0, err
    assert "tiny on quad test set: 60 images; normalisation: mean" in out and "(stored in weights.npz)" in out
    assert "top-2 accuracy" in out and "per-class accuracy:" in out
    assert "confusion matrix (rows: true class, columns: predicted class):" in out
    assert len(out.splitlines()) == 2 + 2 + 4 + 2 + 1 + 4


def test_eval_json(trained, capsys):
    d, spec, data, run = trained
    rc, out, err = netc(capsys, "eval", spec, run / "weights.npz", "--data", data, "--format", "json",
                        "--batch-size", 7, "--threads", 1)
    assert rc == 0, err
    m = json.loads(out)
    assert {"samples", "loss", "accuracy", "top2_accuracy", "per_class", "confusion_matrix", "class_names",
            "normalization", "split", "network", "data"} <= set(m)
    cm = np.array(m["confusion_matrix"])
    y_test = np.load(data)["y_test"]
    assert m["samples"] == 60 and cm.shape == (4, 4) and cm.sum() == 60
    assert list(cm.sum(axis=1)) == list(np.bincount(y_test, minlength=4))
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 60)
    assert m["top2_accuracy"] >= m["accuracy"]
    assert [c["count"] for c in m["per_class"]] == list(cm.sum(axis=1))
    with open(run / "metrics.csv") as f:  # the same numbers as the last epoch's validation
        last = list(csv.DictReader(f))[-1]
    assert m["accuracy"] == pytest.approx(float(last["val_acc"]), abs=1e-6)
    assert m["loss"] == pytest.approx(float(last["val_loss"]), rel=1e-4, abs=1e-9)
    rc, out, err = netc(capsys, "eval", spec, run / "checkpoint.npz", "--data", data, "--format", "json",
                        "--split", "train", "--limit", 50, "--threads", 1)
    assert rc == 0 and json.loads(out)["samples"] == 50 and json.loads(out)["split"] == "train"


def test_eval_normalisation_from_the_run_directory(trained, tmp_path, capsys):
    """Weights without metadata next to a normalization.json use it."""
    d, spec, data, run = trained
    state = W.split(W.load_npz(run / "weights.npz"))[0]
    W.save_npz(tmp_path / "plain.npz", state)
    rc, out, err = netc(capsys, "eval", spec, tmp_path / "plain.npz", "--data", data, "--format", "json")
    assert json.loads(out)["normalization"]["mean"] is None  # nothing known: no normalisation
    shutil.copy(run / "normalization.json", tmp_path)
    rc, out, err = netc(capsys, "eval", spec, tmp_path / "plain.npz", "--data", data, "--format", "json")
    plain = json.loads(out)
    rc, out, err = netc(capsys, "eval", spec, run / "weights.npz", "--data", data, "--format", "json")
    stored = json.loads(out)
    assert plain["normalization"]["source"].startswith("from ") and plain["accuracy"] == stored["accuracy"]
    assert plain["confusion_matrix"] == stored["confusion_matrix"]


def test_eval_plot(trained, tmp_path, capsys):
    d, spec, data, run = trained
    png = tmp_path / "cm.png"
    rc, out, err = netc(capsys, "eval", spec, run / "weights.npz", "--data", data, "--plot", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 1 and "pip install matplotlib" in err and not png.exists()
        return
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "a_file").write_text("mine\n")
    rc, out, err = netc(capsys, "eval", spec, run / "weights.npz", "--data", data, "--plot",
                        tmp_path / "a_file" / "cm.png")
    assert rc == 1 and err == (f"netc: error: {tmp_path}/a_file: File exists (a file is in the way: a "
                               f"directory is needed there)\n")


# ---- predict ------------------------------------------------------------------------------------
def test_predict_npy(trained, tmp_path, capsys):
    d, spec, data, run = trained
    x, y = quadrants(5, np.random.default_rng(99))
    np.save(tmp_path / "one.npy", x[0])  # (8, 8)
    np.save(tmp_path / "batch.npy", x[1:, None])  # (4, 1, 8, 8)
    rc, out, err = netc(capsys, "predict", spec, run / "weights.npz", tmp_path / "one.npy",
                        tmp_path / "batch.npy", "--format", "json")
    assert rc == 0, err
    preds = json.loads(out)["predictions"]
    assert [p["input"].rsplit("/", 1)[-1] for p in preds] == ["one.npy"] + [f"batch.npy[{i}]" for i in range(4)]
    for p, label in zip(preds, y):
        assert sum(p["probabilities"]) == pytest.approx(1) and len(p["top"]) == 3
        assert p["predicted"] == label == p["top"][0]["class"]
        assert p["top"][0]["probability"] >= p["top"][1]["probability"] >= p["top"][2]["probability"]
    rc, out, err = netc(capsys, "predict", spec, run / "weights.npz", tmp_path / "one.npy", "--top", 2)
    assert rc == 0 and out.count("class ") == 2 and out.startswith(str(tmp_path / "one.npy") + ": class ")


def test_predict_binary_cross_entropy_gives_sigmoid_probabilities(tmp_path, capsys):
    """Each output of a binary cross-entropy network is its own probability: sigmoid(logit)."""
    bce = TINY.replace("loss: cross_entropy", "loss: binary_cross_entropy").replace("epochs: 3", "epochs: 1")
    spec, data = make_case(tmp_path, spec=bce)
    assert main(["train", spec, "--data", data, "--out", str(tmp_path / "run"), "--threads", "1"]) == 0
    x = np.random.default_rng(5).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "one.npy", x)
    capsys.readouterr()
    rc, out, err = netc(capsys, "predict", spec, tmp_path / "run" / "weights.npz", tmp_path / "one.npy", "--raw",
                        "--format", "json", "--top", 4)
    assert rc == 0, err
    import netcompiler as nc
    from netcompiler import weights as W

    net = nc.compile(spec, threads=1)
    net.load_state_dict(W.split(W.load_npz(tmp_path / "run" / "weights.npz"))[0])
    want = 1 / (1 + np.exp(-net.forward(x)[0].astype(np.float64)))
    probs = json.loads(out)["predictions"][0]["probabilities"]
    assert probs == pytest.approx(want.tolist(), rel=1e-5)


def test_predict_errors(trained, tmp_path, capsys):
    d, spec, data, run = trained
    np.save(tmp_path / "bad.npy", np.zeros((3, 9, 9), np.uint8))
    rc, out, err = netc(capsys, "predict", spec, run / "weights.npz", tmp_path / "bad.npy")
    assert rc == 1 and "array of shape (3, 9, 9) does not fit the spec's input; expected (1, 8, 8)" in err
    (tmp_path / "x.txt").write_text("hi")
    rc, out, err = netc(capsys, "predict", spec, run / "weights.npz", tmp_path / "x.txt")
    assert rc == 1 and "unsupported file type '.txt'" in err
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rc, out, err = netc(capsys, "predict", spec, run / "weights.npz", tmp_path / "img.png")
    assert rc == 1
    try:
        import PIL  # noqa: F401
    except ImportError:
        assert "needs Pillow, which is not installed: pip install Pillow" in err
    else:
        assert "cannot read the image" in err


# ---- corrupt weights ----------------------------------------------------------------------------
def _corrupt(kind: str, run: Path, path: Path) -> None:
    good = (run / "weights.npz").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif kind == "pickled":
        np.savez(path, **{"conv1.weight": np.array([None, 1], dtype=object)})
    else:
        state = W.split(W.load_npz(run / "weights.npz"))[0]
        if kind == "wrong_shape":
            state["fc1.weight"] = np.zeros((4, 99), np.float32)
        else:  # missing
            del state["bn1.running_var"]
        W.save_npz(path, state)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "corrupt or truncated weights file"),
    ("random", "not an .npz archive"),
    ("pickled", "pickled (object) arrays, which are refused"),
    ("wrong_shape", "'fc1.weight' has shape (4, 99), the network needs (4, 144)"),
    ("missing", "missing 'bn1.running_var' (4,)"),
])
def test_corrupt_weights(trained, tmp_path, capsys, kind, message):
    d, spec, data, run = trained
    path = tmp_path / "w.npz"
    _corrupt(kind, run, path)
    for cmd in (["eval", spec, path, "--data", data], ["predict", spec, path, data]):
        rc, out, err = netc(capsys, *cmd)
        assert rc == 1 and err.startswith(f"netc: error: {path}") and message in err, err


def test_corrupt_checkpoint_on_resume(trained, tmp_path, capsys):
    d, spec, data, run = trained
    shutil.copytree(run, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.npz"
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "run", "--resume")
    assert rc == 1 and "corrupt or truncated checkpoint" in err


def test_no_traceback_from_the_real_command(trained, tmp_path):
    d, spec, data, run = trained
    path = tmp_path / "w.npz"
    _corrupt("truncated", run, path)
    p = subprocess.run([sys.executable, "-m", "netcompiler", "eval", spec, str(path), "--data", data],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"netc: error: {path}: corrupt or truncated weights file")


def test_closed_pipe_is_not_an_error(trained):
    d, spec, data, run = trained
    cmd = [sys.executable, "-m", "netcompiler", "eval", spec, str(run / "weights.npz"), "--data", data]
    p = subprocess.run(" ".join(f"'{c}'" for c in cmd) + " | true", shell=True, capture_output=True, text=True,
                       timeout=300)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_swapped_spec_and_weights(trained, capsys):
    d, spec, data, run = trained
    weights = str(run / "weights.npz")
    np.save(d / "one.npy", np.zeros((8, 8), np.uint8))
    for argv in (["eval", weights, spec, "--data", data], ["predict", weights, spec, d / "one.npy"]):
        rc, out, err = netc(capsys, *argv)
        order = "netc eval SPEC WEIGHTS ..." if argv[0] == "eval" else "netc predict SPEC WEIGHTS FILE..."
        assert (rc, out) == (1, "")
        assert err == f"netc: error: '{weights}' is a weights file, not a spec: the order is {order}\n"
    rc, out, err = netc(capsys, "eval", spec, spec, "--data", data)  # a spec where the weights go
    assert rc == 1 and err == (f"netc: error: '{spec}' is a spec (YAML), not a weights file: the order is "
                               f"netc eval SPEC WEIGHTS ...\n")
    rc, out, err = netc(capsys, "eval", d / "one.npy", weights, "--data", data)
    assert rc == 1 and "one.npy' is a weights file, not a spec" in err


# ---- divergence ---------------------------------------------------------------------------------
def test_diverging_loss_is_warned_once(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "r", "--optimizer", "sgd",
                        "--lr", 10, "--epochs", 2, "--threads", 1)
    assert rc == 0  # a warning, the run goes on
    warnings = [l for l in err.splitlines() if "warning" in l]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("netc: warning: the loss is diverging: mean ")
    assert " over epoch 1, batches 1-2 of 13, against " in warnings[0]
    assert warnings[0].endswith("try a lower --lr (this run: 10)")
    first = read_metrics(tmp_path / "r" / "metrics.csv")[0]["train_loss"]
    assert first > 100  # it did diverge: chance level is log(4) = 1.39


@pytest.mark.parametrize("loss, start, chunks, diverging", [
    ("cross_entropy", 1.2, [[1.2, 5.0], [12.0, 14.0]], [False, True]),  # mean 13 > 10 x 1.2 and > log 4 + 1
    ("cross_entropy", 0.05, [[0.05, 0.6], [2.0, 2.2]], [False, False]),  # 42x, but under log 4 + 1 = 2.39
    ("cross_entropy", 0.05, [[0.05], [2.5]], [False, True]),
    ("mse", 0.01, [[0.01, 0.1], [0.9]], [False, False]),  # 90x, but under 1 (all-zero outputs: 0.25)
    ("mse", 0.01, [[0.01], [1.5]], [False, True]),
])
def test_divergence_rule(tmp_path, loss, start, chunks, diverging):
    spec, data = make_case(tmp_path, spec=TINY.replace("loss: cross_entropy", f"loss: {loss}"))
    run = netcompiler.train.Run(netcompiler.train.TrainOptions(spec, data))
    assert [run.diverging(np.array(c)) for c in chunks] == diverging
    assert run._start_loss == start  # the first batch's loss is the reference


def test_converging_run_is_not_warned(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    rc, out, err = netc(capsys, "train", spec, "--data", data, "--out", tmp_path / "r", "--epochs", 1,
                        "--threads", 1)
    assert rc == 0 and err == ""


# ---- optimizers -----------------------------------------------------------------------------------
def test_adamw_trains_as_adam_and_resumes(tmp_path, capsys):
    spec, data = make_case(tmp_path)
    common = ["train", spec, "--data", data, "--threads", 1, "--weight-decay", 0.1]
    rc, out, err = netc(capsys, *common, "--optimizer", "adam", "--epochs", 2, "--out", tmp_path / "adam")
    assert rc == 0, err
    rc, out, err = netc(capsys, *common, "--optimizer", "adamw", "--epochs", 1, "--out", tmp_path / "adamw")
    assert rc == 0, err
    assert "; adamw lr 0.01 weight decay 0.1," in out
    rc, out, err = netc(capsys, *common, "--optimizer", "adamw", "--epochs", 2, "--out", tmp_path / "adamw",
                        "--resume")
    assert rc == 0, err
    ckpt = tmp_path / "adamw" / "checkpoint.npz"
    assert W.from_json_array(W.split(W.load_npz(ckpt))[1], "settings", ckpt)["optimizer"] == "adamw"
    assert_same_weights(tmp_path / "adam", tmp_path / "adamw")
