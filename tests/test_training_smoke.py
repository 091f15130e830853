"""Training end to end: a small learnable problem is learnt, and k optimizer steps equal the
same k steps in PyTorch (same initial weights, same batches) for every optimizer."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, build, reference_model, spec

torch = pytest.importorskip("torch")
F = torch.nn.functional

CLASSES = 4


def patterns(n: int, rng, noise: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """1x8x8 images of 4 classes: horizontal stripes, vertical stripes, checkerboard and a
    centred square, each with a random sign-free phase jitter and Gaussian noise."""
    yy, xx = np.mgrid[0:8, 0:8]
    base = np.stack([
        (yy % 2).astype(float),
        (xx % 2).astype(float),
        ((yy + xx) % 2).astype(float),
        ((abs(yy - 3.5) < 2) & (abs(xx - 3.5) < 2)).astype(float),
    ])
    y = rng.integers(0, CLASSES, n)
    x = base[y] * rng.uniform(0.7, 1.3, (n, 1, 1)) + noise * rng.standard_normal((n, 8, 8))
    return x[:, None].astype(np.float64), y


LEARN = spec([1, 8, 8], [
    "conv2d: {out_channels: 4, kernel_size: 3, padding: 1}",
    "relu",
    "maxpool2d: {kernel_size: 2}",
    "flatten",
    f"linear: {{out_features: {CLASSES}}}",
], name="smoke")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_problem_is_learnt(dtype):
    net = build(LEARN, dtype, threads=2)
    rng = np.random.default_rng(0)
    x, y = patterns(512, rng)
    xt, yt = patterns(256, rng)
    net.set_optimizer("adam", lr=0.01)
    first = np.mean([net.loss_and_grad(x[i:i + 32], y[i:i + 32])[0] for i in range(0, 512, 32)])
    losses = []
    for step in range(300):
        i = rng.integers(0, 512, 32)
        losses.append(net.train_step(x[i], y[i]))
    last = float(np.mean(losses[-20:]))
    assert first > 1.0, f"initial loss {first}: the problem is too easy for a smoke test"
    assert last < 0.1 * first, f"loss went from {first:.3f} only to {last:.3f}"
    accuracy = float(np.mean(np.argmax(net.forward(xt), axis=1) == yt))
    assert accuracy > 0.95, f"held-out accuracy {accuracy:.3f}"
    assert net.step == 300


# ---- k steps equal PyTorch's ------------------------------------------------------------------
EQUIV = spec([1, 8, 8], [
    "conv2d: {out_channels: 3, kernel_size: 3, bias: false}",  # no bias before batch norm: its
    "batchnorm2d",                                             # exact gradient is 0, and Adam
    "relu",                                                    # would amplify rounding noise
    "maxpool2d: {kernel_size: 2, ceil_mode: true}",
    "flatten",
    "linear: {out_features: 6}",
    "tanh",
    f"linear: {{out_features: {CLASSES}}}",
], name="equiv")

OPTIMIZERS = {
    "sgd": (dict(kind="sgd", lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_weight_decay": (dict(kind="sgd", lr=0.1, weight_decay=0.05),
                         lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05)),
    "sgd_momentum_weight_decay": (dict(kind="momentum", lr=0.05, momentum=0.9, weight_decay=0.01),
                                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "adamw": (dict(kind="adam", lr=0.01, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8),
              lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    "adamw_name": (dict(kind="adamw", lr=0.01, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8),
                   lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    "adam_betas": (dict(kind="adam", lr=0.003, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-8),
                   lambda p: torch.optim.AdamW(p, lr=0.003, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0)),
}
STEPS = 6
BATCH = 8


def torch_run(net, batches, make_opt):
    model = reference_model(net, EQUIV).train()
    opt = make_opt(model.parameters())
    losses = []
    for xb, yb in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.as_tensor(xb, dtype=torch.float64)), torch.as_tensor(yb, dtype=torch.long))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _compare(net, losses, ref_losses, ref_state, what, rtol=1e-9):
    assert_close(losses, ref_losses, rtol, f"{what}: losses per step")
    for k, v in net.state_dict().items():
        assert_close(v, ref_state[k], rtol, f"{what}: {k} after {len(losses)} steps")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_k_steps_equal_torch(name, threads):
    net = build(EQUIV, "float64", threads)
    rng = np.random.default_rng(3)
    net.init(7)
    start = net.state_dict()
    batches = [patterns(BATCH, rng) for _ in range(STEPS)]
    ours, make_opt = OPTIMIZERS[name]
    ours = dict(ours)
    net.set_optimizer(ours.pop("kind"), **ours)
    ref_losses, ref_state = torch_run(net, batches, make_opt)
    losses = np.array([net.train_step(xb, yb) for xb, yb in batches])
    _compare(net, losses, ref_losses, ref_state, name)
    assert net.step == STEPS
    assert all(not np.array_equal(v, start[k]) for k, v in net.params.items()), "a parameter never moved"


@pytest.mark.parametrize("name", ["sgd_momentum_weight_decay", "adamw"])
def test_train_batches_equals_torch(name):
    """train_batches (one C call over shuffled rows, last batch smaller) = torch over the
    same rows in the same batches."""
    net = build(EQUIV, "float64", 2)
    rng = np.random.default_rng(4)
    net.init(11)
    x, y = patterns(45, rng)
    order = rng.permutation(45)
    bs = 10
    batches = [(x[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, 45, bs)]
    ours, make_opt = OPTIMIZERS[name]
    ours = dict(ours)
    net.set_optimizer(ours.pop("kind"), **ours)
    ref_losses, ref_state = torch_run(net, batches, make_opt)
    losses, correct = net.train_batches(net.check_x(x), net.check_y(y, 45), order, bs)
    _compare(net, losses, ref_losses, ref_state, f"train_batches {name}")
    assert correct.shape == (5,) and np.all((0 <= correct) & (correct <= bs))


def test_float32_steps_follow_torch_loosely():
    net = build(EQUIV, "float32", 2)
    rng = np.random.default_rng(5)
    net.init(7)
    batches = [(xb.astype(np.float32), yb) for xb, yb in (patterns(BATCH, rng) for _ in range(STEPS))]
    net.set_optimizer("momentum", lr=0.05, momentum=0.9, weight_decay=0.01)
    ref_losses, ref_state = torch_run(net, batches, OPTIMIZERS["sgd_momentum_weight_decay"][1])
    losses = np.array([net.train_step(xb, yb) for xb, yb in batches])
    _compare(net, losses, ref_losses, ref_state, "float32 momentum", rtol=1e-4)
