"""netc train's recipe options end to end: schedules in metrics.csv, augmentation in C
(seeded, resumable bit for bit), best.npz and early stopping, fine-tuning with --init and
--freeze, curves.png."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import build, spec
from netcompiler import weights as W
from netcompiler.cli import main
from netcompiler.errors import NetcError
from netcompiler.train import read_metrics, train
from test_train import (TINY, Interrupt, assert_same_metrics, assert_same_weights, final_state, make_case,
                        options)

RECIPE = dict(optimizer="momentum", lr=0.05, momentum=0.9, nesterov=True, lr_schedule="onecycle",
              label_smoothing=0.1, clip_grad_norm=1.0, augment="shift=2,hflip,erase=0.5", epochs=3)


def lrs_of(run) -> list[float]:
    return [r["lr"] for r in read_metrics(Path(run) / "metrics.csv")]


# ---- schedules ----------------------------------------------------------------------------------
def test_metrics_record_each_epochs_lr(tmp_path):
    spec_, data = make_case(tmp_path)
    train(options(spec_, data, tmp_path / "r", lr_schedule="step", step_size=1, gamma=0.5, warmup_epochs=1,
                  epochs=4))
    assert lrs_of(tmp_path / "r") == pytest.approx([0.005, 0.01, 0.005, 0.0025])


def test_a_schedule_reaches_the_training_call(tmp_path):
    """gamma 1 is the constant rate through the per-batch path: the same bits as no schedule;
    gamma 0.5 changes the weights."""
    spec_, data = make_case(tmp_path)
    train(options(spec_, data, tmp_path / "plain"))
    train(options(spec_, data, tmp_path / "one", lr_schedule="step", step_size=1, gamma=1.0))
    train(options(spec_, data, tmp_path / "half", lr_schedule="step", step_size=1, gamma=0.5))
    assert_same_weights(tmp_path / "plain", tmp_path / "one")
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "half")
    assert not np.array_equal(a["conv1.weight"], b["conv1.weight"])


def test_bad_schedule_is_one_line(tmp_path, capsys):
    spec_, data = make_case(tmp_path)
    assert main(["train", spec_, "--data", data, "--out", str(tmp_path / "r"), "--lr-schedule", "step"]) == 1
    assert capsys.readouterr().err.strip() == ("netc: error: --lr-schedule step needs --step-size N (epochs between "
                                               "decays)")


# ---- a whole recipe resumes bit for bit ------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    spec_, data = make_case(d)
    train(options(spec_, data, d / "full", chunk_batches=3, **RECIPE))
    return spec_, data, d / "full"


def test_recipe_chunking_does_not_change_results(recipe_case, tmp_path):
    spec_, data, full = recipe_case
    train(options(spec_, data, tmp_path / "auto", **RECIPE))
    assert_same_weights(full, tmp_path / "auto")
    assert_same_metrics(full, tmp_path / "auto")


@pytest.mark.parametrize("k", [2, 7])  # mid-epoch 1, mid-epoch 2
def test_recipe_interrupt_and_resume_is_identical(recipe_case, tmp_path, k):
    spec_, data, full = recipe_case
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(options(spec_, data, run, chunk_batches=3, **RECIPE), on_chunk=Interrupt(k))
    train(options(spec_, data, run, chunk_batches=2, resume=True))
    assert_same_weights(full, run)
    assert_same_metrics(full, run)
    assert lrs_of(run) == lrs_of(full)


def test_augmentation_changes_training(recipe_case, tmp_path):
    spec_, data, full = recipe_case
    train(options(spec_, data, tmp_path / "noaug", chunk_batches=3, **{**RECIPE, "augment": None}))
    a, b = final_state(full), final_state(tmp_path / "noaug")
    assert not np.array_equal(a["conv1.weight"], b["conv1.weight"])


def test_resume_refuses_another_recipe(recipe_case, tmp_path):
    spec_, data, full = recipe_case
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(options(spec_, data, run, chunk_batches=3, **RECIPE), on_chunk=Interrupt(2))
    with pytest.raises(NetcError, match="--augment shift=1"):
        train(options(spec_, data, run, resume=True, augment="shift=1"))


# ---- the augmentation itself (C) ---------------------------------------------------------------------
AUG = spec([2, 6, 7], ["flatten", "linear: {out_features: 3}"], name="aug")


def augmented_inputs(net, x, rows):
    """The training forward's input of rows `rows` of x, as C left it in the activations."""
    off = next(t.offset for t in net.plan.activations if t.name == "input")
    y = np.zeros(len(x), np.int32)
    net.train_batches(x, y, np.asarray(rows), len(rows))
    return net._acts[:len(rows), off:off + x[0].size].reshape(len(rows), *x.shape[1:]).copy()


def test_shift_and_flip_are_shifted_flipped_copies():
    net = build(AUG, "float64")
    net.set_optimizer("sgd", lr=0.0)
    x = np.random.default_rng(0).standard_normal((40, 2, 6, 7))
    net.set_augment(shift=2, hflip=True, fill=-7.0, seed=3, epoch=0)
    got = augmented_inputs(net, x, np.arange(40))
    seen = set()
    for i in range(40):
        found = None
        for flip in (False, True):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    want = np.full_like(x[i], -7.0)  # out[r, c] = in[r + dy, (flipped c) + dx]
                    for r in range(6):
                        for c in range(7):
                            sr, sc = r + dy, (6 - c if flip else c) + dx
                            if 0 <= sr < 6 and 0 <= sc < 7:
                                want[:, r, c] = x[i][:, sr, sc]
                    if np.array_equal(got[i], want):
                        found = (flip, dy, dx)
        assert found is not None, f"sample {i} is not a shifted/flipped copy"
        seen.add(found)
    assert len(seen) > 10  # the draws vary


def test_augmentation_depends_on_seed_epoch_and_row_only():
    net = build(AUG, "float64")
    net.set_optimizer("sgd", lr=0.0)
    x = np.random.default_rng(1).standard_normal((30, 2, 6, 7))
    net.set_augment(shift=1, hflip=True, erase=0.5, fill=-7.0, seed=5, epoch=2)
    a = augmented_inputs(net, x, np.arange(30))
    b = augmented_inputs(net, x, np.arange(30)[::-1])[::-1]  # same rows, other batch positions
    assert np.array_equal(a, b)
    erased = [(a[i] == 0).sum() for i in range(30)]
    assert 5 < sum(e > 0 for e in erased) < 25  # erase=0.5
    net.set_augment(shift=1, hflip=True, erase=0.5, fill=-7.0, seed=5, epoch=3)
    assert not np.array_equal(a, augmented_inputs(net, x, np.arange(30)))
    net.set_augment(shift=1, hflip=True, erase=0.5, fill=-7.0, seed=6, epoch=2)
    assert not np.array_equal(a, augmented_inputs(net, x, np.arange(30)))
    net.set_augment()
    assert np.array_equal(augmented_inputs(net, x, np.arange(30)), x)  # off: the inputs as they are
    net.set_augment(shift=1, hflip=True, erase=0.5, fill=-7.0, seed=5, epoch=2)
    assert np.array_equal(net.forward(x), net.forward(x))  # evaluation forwards are never augmented
    out = net.forward(x)
    net.set_augment()
    assert np.array_equal(out, net.forward(x))


# ---- best.npz and early stopping ------------------------------------------------------------------------
def noisy_case(d: Path) -> tuple[str, str]:
    """Random training labels: the validation loss rises once the net memorises them."""
    spec_, data = make_case(d, n_train=96, n_test=60)
    arrays = dict(np.load(data))
    arrays["y"] = np.random.default_rng(0).integers(0, 4, len(arrays["y"]))
    np.savez(data, **arrays)
    return spec_, data


def test_best_npz_is_the_best_epochs_weights(tmp_path, capsys):
    spec_, data = noisy_case(tmp_path)
    run = tmp_path / "r"
    epochs = 6
    per_epoch = {}
    for e in range(1, epochs + 1):  # one epoch per session, keeping each epoch's weights
        train(options(spec_, data, run, epochs=e, lr=0.05, resume=e > 1))
        per_epoch[e] = final_state(run)
    rows = read_metrics(run / "metrics.csv")
    best = min(range(epochs), key=lambda i: rows[i]["val_loss"]) + 1
    assert best < epochs, "the validation loss never rose: the test shows nothing"
    got = W.split(W.load_npz(run / "best.npz"))[0]
    for k, v in per_epoch[best].items():
        assert np.array_equal(got[k], v), k
    capsys.readouterr()
    assert main(["eval", spec_, str(run / "best.npz"), "--data", data, "--format", "json"]) == 0
    import json

    m = json.loads(capsys.readouterr().out)
    assert m["accuracy"] == pytest.approx(rows[best - 1]["val_acc"], abs=1e-6)


def test_patience_stops_and_resume_keeps_its_state(tmp_path):
    spec_, data = noisy_case(tmp_path)
    full = tmp_path / "full"
    train(options(spec_, data, full, epochs=12, lr=0.05, patience=2))
    rows = read_metrics(full / "metrics.csv")
    losses = [r["val_loss"] for r in rows]
    best = int(np.argmin(losses))
    assert len(rows) == best + 3 < 12  # two epochs without improvement, then stop
    part = tmp_path / "part"
    train(options(spec_, data, part, epochs=best + 2, lr=0.05, patience=2))  # one epoch short of the stop
    train(options(spec_, data, part, epochs=12, resume=True, patience=2))
    assert_same_weights(full, part)
    assert len(read_metrics(part / "metrics.csv")) == len(rows)
    result = train(options(spec_, data, part, epochs=12, resume=True, patience=2))  # already stopped
    assert len(result["history"]) == len(rows)


def test_patience_needs_validation_data(tmp_path):
    spec_, data = make_case(tmp_path, test=False)
    with pytest.raises(NetcError, match="--patience needs validation data"):
        train(options(spec_, data, tmp_path / "r", patience=2))


# ---- fine-tuning ------------------------------------------------------------------------------------------
def test_init_and_freeze(tmp_path):
    spec_, data = make_case(tmp_path)
    train(options(spec_, data, tmp_path / "base", epochs=1))
    base = final_state(tmp_path / "base")
    train(options(spec_, data, tmp_path / "tuned", epochs=2, init=str(tmp_path / "base" / "weights.npz"),
                  freeze=["conv1"], optimizer="adamw", weight_decay=0.1))
    tuned = final_state(tmp_path / "tuned")
    for k in ("conv1.weight", "conv1.bias"):
        assert np.array_equal(tuned[k], base[k]), f"{k} changed"
    for k in ("fc1.weight", "bn1.weight"):
        assert not np.array_equal(tuned[k], base[k]), f"{k} did not train"
    # --init alone starts from those weights: lr 0 keeps every parameter as it was
    train(options(spec_, data, tmp_path / "same", epochs=1, lr=0.0, init=str(tmp_path / "base" / "weights.npz")))
    same = final_state(tmp_path / "same")
    for k in ("conv1.weight", "fc1.weight", "fc1.bias", "bn1.weight"):
        assert np.array_equal(same[k], base[k]), k


def test_bad_freeze_and_init_are_one_line(tmp_path, capsys):
    spec_, data = make_case(tmp_path)
    assert main(["train", spec_, "--data", data, "--out", str(tmp_path / "r"), "--freeze", "conv9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("netc: error: --freeze: no layer 'conv9' in network 'tiny'") and "\n" not in err
    assert main(["train", spec_, "--data", data, "--out", str(tmp_path / "r2"), "--init", str(tmp_path / "no.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("netc: error: ") and "no.npz" in err and "\n" not in err


# ---- curves.png ---------------------------------------------------------------------------------------------
def test_plot_writes_curves_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    spec_, data = make_case(tmp_path)
    train(options(spec_, data, tmp_path / "r", epochs=2, plot=True))
    with Image.open(tmp_path / "r" / "curves.png") as img:
        img.load()
        assert img.format == "PNG" and img.width >= 800 and img.height >= 250
        assert len(np.unique(np.asarray(img.convert("L")))) > 20  # something is drawn
