"""Networks at the edges of what a spec allows: no layer that computes (only flatten), no
parameters, one layer, 1-D inputs; and the limit on the number of layers."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import build, spec
from netcompiler.check import MAX_LAYERS, check_text
from netcompiler.errors import SpecErrors


@pytest.mark.parametrize("input_shape, layers", [
    ((2, 2, 3), ["flatten"]),
    ((2, 2, 3), ["flatten", "flatten"]),
    ((5,), ["flatten"]),
])
def test_a_network_of_only_flatten_layers_builds_and_returns_its_input(input_shape, layers):
    # every layer aliases the input: no stage ran, and rendering died on stages[0]
    net = build(spec(input_shape, layers, loss="mse"), "float64")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, *input_shape))
    y = rng.standard_normal((3, int(np.prod(input_shape))))
    assert np.array_equal(net.forward(x), x.reshape(3, -1))
    loss, grads = net.loss_and_grad(x, y)
    assert grads == {}
    assert loss == pytest.approx(np.mean((x.reshape(3, -1) - y) ** 2), rel=1e-12)
    assert net.train_step(x, y) == pytest.approx(loss, rel=1e-12)


def test_flatten_only_with_cross_entropy():
    net = build(spec((2, 1, 2), ["flatten"], loss="cross_entropy"), "float64")
    x = np.array([[[[0.0, 1.0]], [[2.0, 3.0]]]])
    z = x.reshape(1, 4)
    expected = np.log(np.exp(z).sum()) - z[0, 2]
    loss, grads = net.loss_and_grad(x, np.array([2], np.int32))
    assert grads == {} and loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("input_shape, layers, loss", [
    ((4,), ["relu"], "mse"),
    ((4,), ["dropout"], "mse"),
    ((1, 2, 2), ["dropout: {p: 0}", "flatten"], "cross_entropy"),
    ((1, 3, 3), ["sigmoid"], "mse"),
    ((1,), ["linear: {out_features: 1, bias: false}"], "mse"),
    ((2, 1, 1), ["conv2d: {out_channels: 2, kernel_size: 1}"], "mse"),
    ((1, 4, 4), ["maxpool2d: {kernel_size: 2}"], "mse"),
])
def test_small_and_parameter_free_networks_train(input_shape, layers, loss):
    net = build(spec(input_shape, layers, loss=loss), "float32")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, *input_shape)).astype(np.float32)
    y = (np.array([0, 1], np.int32) if loss == "cross_entropy"
         else rng.standard_normal((2, *net.network.output_shape)).astype(np.float32))
    assert np.isfinite(net.forward(x)).all()
    loss_value, grads = net.loss_and_grad(x, y)
    assert np.isfinite(loss_value) and set(grads) == set(net.network.param_shapes())
    assert np.isfinite(net.train_step(x, y))


def test_too_many_layers_is_a_located_error():
    n = MAX_LAYERS + 1
    text = "input: [4]\nlayers:\n" + "  - relu\n" * n + "loss: mse\n"
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "deep.yaml")
    # the first layer past the limit: line 3 holds layer 1
    assert str(exc.value) == (f"deep.yaml:{3 + MAX_LAYERS}:5: error: layer {n:,} of {n:,}: a network has at most "
                              f"{MAX_LAYERS} layers (the C compiler's time grows faster than the number of layers)")
    text = "input: [4]\nlayers:\n" + "  - relu\n" * MAX_LAYERS + "loss: mse\n"
    assert len(check_text(text, "deep.yaml").layers) == MAX_LAYERS


def test_twenty_thousand_layers_are_refused_quickly():
    text = "input: [4]\nlayers:\n" + "  - relu\n" * 20_000 + "loss: mse\n"  # 0.2 MB
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "deep.yaml")
    assert len(exc.value.diagnostics) == 1 and f"layer {MAX_LAYERS + 1} of 20,000" in str(exc.value)


# 24 conv/activation layers and a max-pool run sample by sample in both modes: more than a
# stage holds (plan.MAX_STAGE_LAYERS), so they are split into several parallel loops
DEEP = spec((2, 4, 4), ["conv2d: {out_channels: 2, kernel_size: 3, padding: 1}", "tanh"] * 6
            + ["conv2d: {out_channels: 2, kernel_size: 1}", "leaky_relu"] * 6
            + ["maxpool2d: {kernel_size: 2}", "flatten", "linear: {out_features: 3}"], loss="cross_entropy")


def test_long_chains_are_split_into_stages():
    from netcompiler.plan import MAX_STAGE_LAYERS, make_plan

    plan = make_plan(check_text(DEEP, "deep.yaml"))
    # flatten runs nothing; linear runs on each thread's range of samples, a stage of its own
    assert [len(st.layers) for st in plan.eval_stages] == [16, 9, 1]
    assert [len(st.layers) for st in plan.train_stages] == [16, 9, 1]
    assert [st.ranged for st in plan.train_stages] == [False, False, True]
    assert all(len(st.layers) <= MAX_STAGE_LAYERS for st in plan.eval_stages + plan.train_stages)


@pytest.mark.parametrize("threads", [1, 2])
def test_split_stages_match_torch(threads):
    import torch

    from conftest import assert_close, reference_loss_and_grad, reference_model

    net = build(DEEP, "float64", threads=threads, file="deep.yaml")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2, 4, 4))
    y = rng.integers(0, 3, 5).astype(np.int32)
    with torch.no_grad():
        ref = reference_model(net, DEEP).eval()(torch.as_tensor(x)).numpy()
    assert_close(net.forward(x), ref, 1e-9, "eval forward")
    state = net.state_dict()
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, DEEP, x, y, None, state)
    assert abs(loss - rl) <= 1e-9 * abs(rl)
    assert set(grads) == set(rg)
    for k in rg:
        assert_close(grads[k], rg[k], 1e-9, f"d{k}", atol=1e-12)
