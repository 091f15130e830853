"""Learning-rate schedules and augmentation settings (netcompiler/recipe.py): the rate of every
batch equals torch.optim.lr_scheduler's, stepped as torch steps each scheduler."""
from __future__ import annotations

import numpy as np
import pytest

from netcompiler import recipe
from netcompiler.check import TRAIN_KEYS

torch = pytest.importorskip("torch")
S = torch.optim.lr_scheduler

EPOCHS, BATCHES, LR = 9, 7, 0.1


def settings(**kw):
    s = {k: d for k, (_, d) in TRAIN_KEYS.items()}
    s.update(epochs=EPOCHS, lr=LR, **kw)
    return s


def ours(s):
    return np.concatenate([recipe.lrs(s, e, 0, BATCHES, BATCHES) for e in range(EPOCHS)])


def torch_lrs(make, per_batch=False, warmup=0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    sched = make(opt)
    if warmup:
        sched = S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1 / (warmup + 1), total_iters=warmup), sched],
                               milestones=[warmup])
    out = []
    for _ in range(EPOCHS):
        for _ in range(BATCHES):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_batch:
                sched.step()
        if not per_batch:
            sched.step()
    return np.array(out)


CASES = {
    "none": (dict(), lambda o: S.LambdaLR(o, lambda e: 1.0)),
    "step": (dict(lr_schedule="step", step_size=3, gamma=0.5), lambda o: S.StepLR(o, 3, gamma=0.5)),
    "multistep": (dict(lr_schedule="multistep", milestones=[2, 5], gamma=0.2),
                  lambda o: S.MultiStepLR(o, [2, 5], gamma=0.2)),
    "cosine": (dict(lr_schedule="cosine", min_lr=0.001), lambda o: S.CosineAnnealingLR(o, EPOCHS, eta_min=0.001)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("warmup", [0, 3])
def test_per_epoch_schedules_equal_torch(name, warmup):
    kw, make = CASES[name]
    s = settings(warmup_epochs=warmup, **kw)
    if name == "cosine" and warmup:
        make = lambda o: S.CosineAnnealingLR(o, EPOCHS - warmup, eta_min=0.001)  # noqa: E731
    assert recipe.check_schedule(s) is None
    expected = torch_lrs(make, warmup=warmup)
    assert len(set(expected)) > 1 or name == "none"
    np.testing.assert_allclose(ours(s), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kw", [dict(), dict(max_lr=0.5, pct_start=0.25, div_factor=10.0, final_div_factor=100.0)])
def test_onecycle_per_batch_equals_torch(kw):
    s = settings(lr_schedule="onecycle", **kw)
    top = kw.get("max_lr", LR)
    expected = torch_lrs(lambda o: S.OneCycleLR(
        o, max_lr=top, total_steps=EPOCHS * BATCHES, pct_start=kw.get("pct_start", 0.3),
        div_factor=kw.get("div_factor", 25.0), final_div_factor=kw.get("final_div_factor", 1e4),
        cycle_momentum=False), per_batch=True)
    np.testing.assert_allclose(ours(s), expected, rtol=1e-12)


def test_chunks_of_an_epoch_give_the_epochs_rates():
    s = settings(lr_schedule="onecycle")
    whole = recipe.lrs(s, 4, 0, BATCHES, BATCHES)
    parts = np.concatenate([recipe.lrs(s, 4, 0, 3, BATCHES), recipe.lrs(s, 4, 3, 4, BATCHES)])
    assert np.array_equal(whole, parts)


@pytest.mark.parametrize("kw, message", [
    (dict(lr_schedule="step"), "needs --step-size"),
    (dict(lr_schedule="multistep"), "needs --milestones"),
    (dict(lr_schedule="onecycle", warmup_epochs=2), "warms up by itself"),
    (dict(lr_schedule="cosine", warmup_epochs=EPOCHS), "leaves no epochs"),
])
def test_bad_schedule_settings(kw, message):
    assert message in recipe.check_schedule(settings(**kw))


def test_parse_augment():
    assert recipe.parse_augment("shift=2,hflip,erase=0.25") == {"shift": 2, "hflip": True, "erase": 0.25}
    assert recipe.parse_augment(None) == {"shift": 0, "hflip": False, "erase": 0.0}
    for bad, msg in (("shift", "needs an integer"), ("flip", "unknown augmentation 'flip'"),
                     ("erase=2", "probability"), ("hflip=1", "takes no value")):
        with pytest.raises(ValueError, match=msg):
            recipe.parse_augment(bad)
