"""The evaluation forward's work block (plan._eval_copies).

In evaluation a per-sample stage runs each of a chunk's samples in one block of the thread's
scratch instead of in the sample's own block of acts, copying in what it reads from earlier
stages and copying out what later stages (or the caller) read.  A missing or wrong copy gives
a wrong output for every sample but the first of a chunk, so these tests run batches against
the same samples one at a time (which run in their own blocks), and against PyTorch.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, build, randomize_batchnorm, reference_model, spec
from netcompiler.check import check_text
from netcompiler.plan import _intersect, _subtract, _union, make_plan

# 18 layers before the add: its skip path (r0) crosses the 16-layer stage boundary; `early`
# and the network input are concat parts read in the last per-sample stage (`early` is
# written in place into the concat's slot, a view)
CHAIN = [f"conv2d: {{name: m{i}, out_channels: 4, kernel_size: 1}}" if i % 2 == 0 else f"tanh: {{name: t{i}}}"
         for i in range(18)]
CROSSING = spec([2, 6, 6], [
    "conv2d: {name: c0, out_channels: 4, kernel_size: 3, padding: 1}",
    "relu: {name: r0}",
    "conv2d: {name: early, out_channels: 3, kernel_size: 1}",
    "conv2d: {name: first, out_channels: 4, kernel_size: 1, inputs: [r0]}",
    *CHAIN,
    "add: {name: sum, inputs: [t17, r0]}",
    "batchnorm2d: {name: bn}",
    "relu: {name: r1}",
    "concat: {name: cat, inputs: [r1, early, input]}",
    "flatten",
    "linear: {name: fc, out_features: 3}",
])
# a linear (one GEMM over a range of samples, in acts) between per-sample stages, and a skip
# around it
AROUND_RANGE = spec([12], [
    "linear: {name: fc1, out_features: 8}",
    "batchnorm1d: {name: bn1}",
    "tanh: {name: t1}",
    "linear: {name: fc2, out_features: 8}",
    "silu: {name: s2}",
    "add: {name: sum, inputs: [s2, t1]}",
    "linear: {name: fc3, out_features: 4}",
])
CASES = {"crossing": CROSSING, "around_range": AROUND_RANGE}


def test_interval_sets_match_python_sets():
    rng = np.random.default_rng(0)

    def draw():
        out = []
        for _ in range(rng.integers(0, 5)):
            lo = int(rng.integers(0, 40))
            out.append((lo, lo + int(rng.integers(1, 10))))
        return _union([], out)

    def points(iv):
        return {p for lo, hi in iv for p in range(lo, hi)}

    for _ in range(500):
        a, b = draw(), draw()
        for got, want in ((_union(a, b), points(a) | points(b)), (_subtract(a, b), points(a) - points(b)),
                          (_intersect(a, b), points(a) & points(b))):
            assert points(got) == want, (a, b, got)
            assert all(lo < hi for lo, hi in got) and all(x[1] < y[0] for x, y in zip(got, got[1:])), got


def test_copies_cover_the_tensors_crossing_stages():
    plan = make_plan(check_text(CROSSING, "crossing.yaml"))
    first, second = plan.eval_stages[0], plan.eval_stages[1]
    assert first.copy_in == [] and not first.ranged and not second.ranged
    # the first stage ends at t11 (16 layers); r0 is the skip, the input and early concat parts
    assert [lp.layer.name for lp in first.layers][-1] == "t11"
    assert {m for m, _, _ in first.copy_out} == {"OFF_r0_out", "OFF_t11_out", "OFF_input", "OFF_cat_out"}
    # early is 3 of the concat's 9 channels, at channel 4: its slice goes out to the sample's block,
    # and the second stage, whose concat does not read its view, neither copies it in nor out
    assert ("OFF_cat_out", 4 * 36, 3 * 36) in first.copy_out
    assert second.copy_in == [p for p in first.copy_out if p[0] != "OFF_cat_out"]
    assert second.copy_out == [("OFF_cat_out", 0, 4 * 36), ("OFF_cat_out", 7 * 36, 2 * 36)]
    slots = {t.macro: t for t in plan.activations}
    for m, at, size in first.copy_out + second.copy_in + second.copy_out:
        assert 0 <= at and at + size <= slots[m].size, (m, at, size)
    out = plan.eval_stages[-1]
    assert out.ranged and out.copy_in == out.copy_out == []
    assert plan.eval_work + plan.acts_per_sample <= plan.scratch_per_thread


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_evaluation_matches_one_sample_at_a_time_and_torch(case, threads):
    import torch

    net = build(CASES[case], "float64", threads, file=f"{case}.yaml")
    rng = np.random.default_rng(5)
    randomize_batchnorm(net, rng)
    x = rng.standard_normal((7, *net.network.input_shape))
    one = np.concatenate([net.forward(x[i:i + 1]).copy() for i in range(len(x))])
    net._scratch[:] = np.nan  # whatever the work block holds must not reach an output
    got = net.forward(x)
    np.testing.assert_array_equal(got, one, err_msg=f"{case}: a batch differs from its samples one at a time")
    with torch.no_grad():
        ref = reference_model(net, CASES[case]).eval()(torch.as_tensor(x)).numpy()
    assert_close(got, ref, 1e-10, f"{case}: eval forward", atol=1e-12)
    # a second batch reuses the work blocks: nothing of the first stays
    x2 = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(net.forward(x2), np.concatenate([net.forward(x2[i:i + 1]).copy() for i in range(7)]))
