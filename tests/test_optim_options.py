"""Optimizer options computed in C where the step runs: Nesterov momentum, label smoothing,
gradient clipping by global norm, frozen layers, per-batch learning rates.  Each is compared
with PyTorch over a few steps from the same weights and batches."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, build, reference_model
from test_training_smoke import EQUIV, patterns

torch = pytest.importorskip("torch")
F = torch.nn.functional

STEPS, BATCH = 5, 8


def batches(seed: int = 3):
    rng = np.random.default_rng(seed)
    return [patterns(BATCH, rng) for _ in range(STEPS)]


def torch_steps(net, data, make_opt, smoothing: float = 0.0, clip: float = 0.0, frozen=(), lrs=None):
    model = reference_model(net, EQUIV).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[0] not in frozen)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    losses = []
    for k, (xb, yb) in enumerate(data):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[k]
        opt.zero_grad()
        out = model(torch.as_tensor(xb, dtype=torch.float64))
        loss = F.cross_entropy(out, torch.as_tensor(yb, dtype=torch.long), label_smoothing=smoothing)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        losses.append(loss.item())
    return np.array(losses), {k: v.detach().numpy() for k, v in model.state_dict().items()}


def compare(net, losses, ref, what, rtol=1e-9):
    assert_close(losses, ref[0], rtol, f"{what}: losses")
    for k, v in net.state_dict().items():
        assert_close(v, ref[1][k], rtol, f"{what}: {k}")


def test_nesterov_equals_torch():
    net = build(EQUIV, "float64", 2)
    net.init(5)
    data = batches()
    net.set_optimizer("momentum", lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    ref = torch_steps(net, data, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01,
                                                            nesterov=True))
    plain = torch_steps(net, data, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01))
    losses = [net.train_step(x, y) for x, y in data]
    compare(net, losses, ref, "nesterov")
    assert any(not np.allclose(ref[1][k], plain[1][k]) for k in net.params), "nesterov changes nothing here"


def test_nesterov_needs_momentum():
    net = build(EQUIV, "float64")
    with pytest.raises(ValueError, match="nesterov needs optimizer 'momentum'"):
        net.set_optimizer("sgd", lr=0.1, nesterov=True)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_equals_torch(eps):
    net = build(EQUIV, "float64", 1)
    net.init(6)
    data = batches(4)
    net.set_optimizer("adam", lr=0.01)
    net.set_label_smoothing(eps)
    try:
        ref = torch_steps(net, data, lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0), smoothing=eps)
        losses = [net.train_step(x, y) for x, y in data]
    finally:
        net.set_label_smoothing(0.0)
    compare(net, losses, ref, f"label smoothing {eps}")


def test_label_smoothing_gradient_equals_torch():
    net = build(EQUIV, "float64", 1)
    net.init(2)
    x, y = batches(9)[0]
    model = reference_model(net, EQUIV).train()
    loss = F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y, dtype=torch.long), label_smoothing=0.2)
    loss.backward()
    net.set_label_smoothing(0.2)
    try:
        ours, grads = net.loss_and_grad(x, y)
    finally:
        net.set_label_smoothing(0.0)
    assert_close(ours, loss.item(), 1e-12, "loss")
    for k, p in model.named_parameters():
        assert_close(grads[k], p.grad.numpy(), 1e-9, f"grad {k}")


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_clip_grad_norm_equals_torch(kind):
    net = build(EQUIV, "float64", 2)
    net.init(8)
    data = batches(5)
    clip = 0.05  # well below the gradients' norm: every step clips
    if kind == "momentum":
        net.set_optimizer("momentum", lr=0.1, momentum=0.9, clip_grad_norm=clip)
        make = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    else:
        net.set_optimizer("adam", lr=0.01, weight_decay=0.05, clip_grad_norm=clip)
        make = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05)  # noqa: E731
    _, g = net.loss_and_grad(*data[0])
    assert np.sqrt(sum(float((v ** 2).sum()) for v in g.values())) > 5 * clip
    ref = torch_steps(net, data, make, clip=clip)
    losses = [net.train_step(x, y) for x, y in data]
    net.set_optimizer(kind, lr=0.01)
    compare(net, losses, ref, f"clip {kind}")


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_frozen_layers_stay_bit_for_bit_and_others_equal_torch(kind):
    net = build(EQUIV, "float64", 2)
    net.init(9)
    names = [l.name for l in net.network.layers if l.params]
    frozen = (names[0], names[-1])
    data = batches(6)
    if kind == "momentum":
        net.set_optimizer("momentum", lr=0.1, momentum=0.9, weight_decay=0.01, clip_grad_norm=0.5)
        make = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)  # noqa: E731
    else:
        net.set_optimizer("adam", lr=0.01, weight_decay=0.1, clip_grad_norm=0.5)
        make = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)  # noqa: E731
    start = net.state_dict()
    net.freeze(frozen)
    try:
        ref = torch_steps(net, data, make, clip=0.5, frozen=frozen)
        losses = [net.train_step(x, y) for x, y in data]
        state = net.optimizer_state()
    finally:
        net.freeze(())
    compare(net, losses, ref, f"freeze {kind}")
    at = 0  # the moments are packed: the parameters back to back in plan order
    for t in net.plan.params:
        layer = t.name.rsplit(".", 1)[0]
        same = np.array_equal(net.params[t.name], start[t.name])
        assert same == (layer in frozen), f"{t.name}: frozen {layer in frozen}, unchanged {same}"
        if layer in frozen:  # no optimizer state either
            assert not state["m"][at:at + t.size].any(), t.name
            assert not state["v"][at:at + t.size].any(), t.name
        at += t.size
    assert at == state["m"].size


def test_freeze_unknown_layer_is_an_error():
    net = build(EQUIV, "float64")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        net.freeze(["nope"])


def test_train_batches_per_batch_lrs_equal_torch():
    net = build(EQUIV, "float64", 2)
    net.init(10)
    rng = np.random.default_rng(12)
    x, y = patterns(40, rng)
    order = rng.permutation(40)
    lrs = np.array([0.01, 0.05, 0.1, 0.02, 0.001])
    data = [(x[order[i:i + 8]], y[order[i:i + 8]]) for i in range(0, 40, 8)]
    net.set_optimizer("momentum", lr=0.3, momentum=0.9)
    ref = torch_steps(net, data, lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9), lrs=lrs)
    losses, _ = net.train_batches(x, y, order, 8, lrs=lrs)
    compare(net, losses, ref, "per-batch lrs")
    assert net.lr == lrs[-1]
