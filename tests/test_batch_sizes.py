"""Batch sizes that exercise every path of the batch-level kernels.

test_gradients.py uses a batch of 3.  Linear layers in training run over the whole batch
with register tiles of several samples (full tiles, a tail of single samples, and below
a threshold the per-sample kernel), and their tiles of outputs and inputs have vector and
scalar tails.  Here loss and gradients are compared with PyTorch at batch sizes that hit
each of those paths, with 1 and 2 threads, in float64 and float32.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, build, random_batch, reference_loss_and_grad, spec

torch = pytest.importorskip("torch")

# sizes chosen for the tiles: 400 inputs (25 whole vectors), 37 (2 vectors + 5), 120 -> 84
# (outputs not a multiple of 16), 10 outputs (one partial vector), no bias, a conv before
CASES = {
    "mlp_tails": spec([37], ["linear: {out_features: 120}", "relu", "linear: {out_features: 84, bias: false}",
                             "tanh", "linear: {out_features: 10}"]),
    "conv_then_fc": spec([1, 12, 12], ["conv2d: {out_channels: 4, kernel_size: 3, padding: 1}", "relu",
                                       "maxpool2d: {kernel_size: 2}", "flatten", "linear: {out_features: 50}",
                                       "gelu", "linear: {out_features: 7}"]),
    "wide_fc": spec([400], ["linear: {out_features: 120}", "relu", "linear: {out_features: 33}"], "mse"),
    # fewer outputs than one forward tile has rows (5, 1): only the tile of the last outputs
    "narrow_fc": spec([20], ["linear: {out_features: 5}", "relu", "linear: {out_features: 1}"], "mse"),
}
BATCHES = [1, 2, 7, 8, 13, 64]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_sizes_match_torch_float64(case, n, threads):
    net = build(CASES[case], "float64", threads)
    rng = np.random.default_rng(n)
    net.init(int(rng.integers(1000)))
    x, y = random_batch(net, n, rng)
    state = net.state_dict()
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, rout, _ = reference_loss_and_grad(net, CASES[case], x, y, None, state)
    assert abs(loss - rl) <= 1e-9 * abs(rl) + 1e-14, f"{case}, batch {n}: loss {loss!r}, torch {rl!r}"
    for k in rg:
        assert_close(grads[k], rg[k], 1e-9, f"{case}, batch {n}: d{k}")
    # the training forward (batch-level tiles) and the evaluation forward (per sample) agree
    off = net.plan.out_offset
    train_out = net._acts[:n, off:off + net.plan.out_size].copy()
    assert_close(train_out, net.forward(x).reshape(n, -1), 1e-12, f"{case}, batch {n}: train vs eval forward")


@pytest.mark.parametrize("n", [8, 13, 64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_sizes_match_torch_float32(case, n):
    net = build(CASES[case], "float32", 2)
    rng = np.random.default_rng(n)
    net.init(int(rng.integers(1000)))
    x, y = random_batch(net, n, rng)
    x = x.astype(np.float32)
    state = net.state_dict()
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, CASES[case], x, y, None, state)
    assert abs(loss - rl) <= 1e-5 * abs(rl) + 1e-6, f"{case}, batch {n}: loss {loss!r}, torch {rl!r}"
    for k in rg:
        assert_close(grads[k], rg[k], 1e-4, f"{case}, batch {n}: d{k} (float32)",
                     atol=1e-6 * max(float(np.max(np.abs(g))) for g in rg.values()))


def test_thread_count_does_not_change_linear_gradients():
    """Threads own whole rows of dW in the batch-level backward: bit-identical sums."""
    grads = []
    for threads in (1, 2):
        net = build(CASES["wide_fc"], "float32", threads)
        x, y = random_batch(net, 64, np.random.default_rng(5))
        grads.append(net.loss_and_grad(x.astype(np.float32), y)[1])
    for k in grads[0]:
        if k.startswith("fc"):
            assert np.array_equal(grads[0][k], grads[1][k]), f"{k} differs between 1 and 2 threads"
