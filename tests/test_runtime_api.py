"""The Python API contract of a compiled network (runtime.Net)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import netcompiler as nc
from conftest import assert_close, build, reference_loss_and_grad, reference_model, spec
from netcompiler.check import check_text
from netcompiler.errors import WeightsError

torch = pytest.importorskip("torch")

CE = spec([2, 6, 5], [
    "conv2d: {out_channels: 3, kernel_size: 3, padding: 1}",
    "batchnorm2d",
    "relu",
    "maxpool2d: {kernel_size: 2, ceil_mode: true}",
    "dropout: {p: 0.2}",
    "flatten",
    "linear: {out_features: 7}",
    "linear: {name: head, out_features: 4, bias: false}",
], name="api_ce")
MSE = spec([5], ["linear: {out_features: 3}", "tanh", "linear: {out_features: 2}"], "mse", name="api_mse")
BN_1X1 = spec([2, 3, 3], ["conv2d: {out_channels: 2, kernel_size: 3}", "batchnorm2d", "flatten",
                          "linear: {out_features: 2}"], name="api_bn1x1")


@pytest.fixture
def ce():
    return build(CE, "float32")


@pytest.fixture
def ce64():
    return build(CE, "float64")


@pytest.fixture
def mse():
    return build(MSE, "float64")


def x_for(net, n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *net.network.input_shape))


# ---- parameters ------------------------------------------------------------------------------
def test_param_names_and_shapes_are_pytorchs(ce):
    model = reference_model(ce, CE)  # independent nn.Sequential with the same layer names
    torch_state = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = {k: tuple(v.shape) for k, v in {**ce.params, **ce.buffers}.items()}
    assert ours == torch_state
    assert list(ce.params) == [k for k, _ in model.named_parameters()], "parameters are not in PyTorch's order"
    assert set(ce.buffers) == {"bn1.running_mean", "bn1.running_var"}
    assert "head.weight" in ce.params and "head.bias" not in ce.params


def test_param_names_match_torchref_twin(ce):
    from netcompiler.torchref import torch_model

    twin = torch_model(ce.network, ce.state_dict())
    assert {k: tuple(v.shape) for k, v in twin.state_dict().items() if not k.endswith("num_batches_tracked")} == \
        {k: v.shape for k, v in ce.state_dict().items()}


def test_params_are_views(ce):
    x = x_for(ce)
    before = ce.forward(x)
    ce.params["head.weight"][...] = 0
    assert np.array_equal(ce.forward(x), np.zeros_like(before)), "writing into net.params did not change forward"
    ce.params["head.weight"][0, 0] = 1.0
    out = ce.forward(x)
    assert np.any(out[:, 0] != 0) and np.all(out[:, 1:] == 0)
    ce.buffers["bn1.running_mean"][...] = 100.0
    assert not np.array_equal(ce.forward(x), out), "writing into net.buffers did not change forward"


def test_state_dict_is_a_copy(ce):
    x = x_for(ce)
    before = ce.forward(x)
    sd = ce.state_dict()
    for v in sd.values():
        v[...] = 0
    assert np.array_equal(ce.forward(x), before)


def test_load_state_dict_roundtrip(ce64):
    x = x_for(ce64)
    sd = ce64.state_dict()
    out = ce64.forward(x)
    ce64.init(99)
    assert not np.array_equal(ce64.forward(x), out)
    ce64.load_state_dict(sd)
    assert np.array_equal(ce64.forward(x), out)
    # torch tensors and float32 arrays are accepted and converted
    ce64.load_state_dict({k: torch.as_tensor(v.astype(np.float32)) for k, v in sd.items()})
    assert_close(ce64.forward(x), out, 1e-5, "forward after loading float32 weights")


def test_load_state_dict_strict_errors_name_every_problem(ce):
    sd = ce.state_dict()
    bad = dict(sd)
    del bad["fc1.bias"]
    bad["extra.weight"] = np.zeros(3)
    bad["conv1.weight"] = np.zeros((3, 2, 3, 2))
    before = ce.state_dict()
    with pytest.raises(WeightsError) as exc:
        ce.load_state_dict(bad)
    msg = str(exc.value)
    assert "missing 'fc1.bias'" in msg
    assert "unexpected 'extra.weight'" in msg
    assert "'conv1.weight' has shape (3, 2, 3, 2)" in msg and "(3, 2, 3, 3)" in msg
    assert isinstance(exc.value, ValueError)
    for k, v in ce.state_dict().items():  # nothing was loaded
        assert np.array_equal(v, before[k]), f"{k} changed although loading failed"


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, "infinity"), ("abc", "dtype")])
def test_load_state_dict_rejects_bad_values(ce, value, what):
    sd = ce.state_dict()
    sd["fc1.bias"] = np.full(sd["fc1.bias"].shape, value, dtype=object if isinstance(value, str) else float)
    with pytest.raises(WeightsError, match=what):
        ce.load_state_dict(sd)


def test_init_is_deterministic_and_pytorch_distributed(ce64):
    ce64.init(3)
    a = ce64.state_dict()
    ce64.init(3)
    b = ce64.state_dict()
    ce64.init(4)
    c = ce64.state_dict()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"init(3) twice gave different {k}"
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    model = reference_model(ce64, CE)
    for name, p in model.named_parameters():
        v = a[name]
        if name.startswith("bn"):
            expected = 1.0 if name.endswith("weight") else 0.0
            assert np.all(v == expected), f"{name} should start at {expected} as in PyTorch"
            continue
        weight = dict(model.named_parameters())[name.rsplit(".", 1)[0] + ".weight"]
        fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in)
        assert np.all(np.abs(v) <= bound), f"{name}: values beyond +-1/sqrt(fan_in) = {bound}"
        if v.size >= 20:  # uniform over the whole range, not a narrower one
            assert np.max(np.abs(v)) > 0.7 * bound, f"{name}: max |value| {np.max(np.abs(v))} << bound {bound}"
            assert abs(np.std(v) - bound / math.sqrt(3)) < 0.35 * bound / math.sqrt(3), f"{name}: std {np.std(v)}"
    assert np.all(a["bn1.running_mean"] == 0) and np.all(a["bn1.running_var"] == 1)


def test_init_resets_gradients_and_optimizer(ce64):
    ce64.set_optimizer("adam", lr=0.01)
    x = x_for(ce64, 4)
    ce64.train_step(x, np.arange(4) % 4)
    assert ce64.step == 1
    ce64.init(0)
    assert ce64.step == 0
    st = ce64.optimizer_state()
    assert not np.any(st["m"]) and not np.any(st["v"])


# ---- input checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 2, 6)), "shape"),
    (np.zeros((3, 2, 5, 6)), "shape"),
    (np.zeros((2, 6, 5)), "shape"),
    (np.zeros((0, 2, 6, 5)), "at least one sample"),
    (np.zeros((3, 2, 6, 5), complex), "real"),
    (np.zeros((3, 2, 6, 5), object), "real"),
    (np.full((3, 2, 6, 5), "a"), "real"),
    (np.zeros((3, 2, 6, 5), bool), "real"),
    ([[1, 2]], "shape"),
])
def test_bad_x_is_a_clear_value_error(ce, bad, message):
    with pytest.raises(ValueError, match=message) as exc:
        ce.forward(bad)
    assert "got" in str(exc.value), f"the message should say what it got: {exc.value}"
    with pytest.raises(ValueError, match=message):
        ce.loss_and_grad(bad, np.zeros(len(bad) if len(np.shape(bad)) else 0, np.int64))


@pytest.mark.parametrize("bad, message", [
    (np.array([0.0, 1.0, 2.0]), "integer"),
    (np.array([0, 1]), r"shape \(3,\)"),
    (np.array([[0], [1], [2]]), r"shape \(3,\)"),
    (np.array([0, 1, 4]), "0..3"),
    (np.array([0, -1, 2]), "0..3"),
    (np.array(["a", "b", "c"]), "integer"),
])
def test_bad_labels_are_a_clear_value_error(ce, bad, message):
    x = x_for(ce)
    with pytest.raises(ValueError, match=message):
        ce.loss_and_grad(x, bad)
    with pytest.raises(ValueError, match=message):
        ce.train_step(x, bad)
    assert ce.step == 0, "a rejected batch must not take an optimizer step"


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 3)), "shape"),
    (np.zeros((3,)), "shape"),
    (np.zeros((3, 2), complex), "real"),
])
def test_bad_mse_targets_are_a_clear_value_error(mse, bad, message):
    with pytest.raises(ValueError, match=message):
        mse.loss_and_grad(x_for(mse), bad)


BCE = spec([3, 4, 4], ["conv2d: {out_channels: 2, kernel_size: 3, padding: 1}", "silu",
                      "conv2d: {out_channels: 3, kernel_size: 3, padding: 1}"], "binary_cross_entropy", name="api_bce")


@pytest.mark.parametrize("bad, message", [
    (np.full((3, 2, 4, 4), 0.5), "shape"),
    (np.full((3, 3, 4, 4), 1.5), r"targets must be in \[0, 1\] for loss binary_cross_entropy, found 1.5"),
    (np.full((3, 3, 4, 4), -0.25), r"in \[0, 1\].*found -0.25"),
    (np.full((3, 3, 4, 4), np.nan), r"in \[0, 1\].*found nan"),
    (np.full((3, 3, 4, 4), 0.5, complex), "real"),
])
def test_bad_binary_cross_entropy_targets_are_a_clear_value_error(bad, message):
    net = build(BCE, "float64")
    with pytest.raises(ValueError, match=message):
        net.loss_and_grad(x_for(net, 3), bad)
    with pytest.raises(ValueError, match=message):
        net.train_step(x_for(net, 3), bad)
    assert net.step == 0


def test_binary_cross_entropy_trains_an_autoencoder_from_python():
    """Targets are the inputs themselves, as images in [0, 1] (integer 0/1 targets are taken
    too); a few Adam steps lower the loss."""
    net = build(BCE, "float32")
    net.set_optimizer("adam", lr=0.01)
    rng = np.random.default_rng(3)
    x = (rng.uniform(0, 1, (16, 3, 4, 4)) > 0.5).astype(np.float32)
    first = net.train_step(x, x)
    losses = [net.train_step(x, x.astype(np.int64)) for _ in range(30)]
    assert np.isfinite(first) and losses[-1] < 0.8 * first, (first, losses[-1])
    out, _ = net.train_batches(net.check_x(x), net.check_y(x, 16), np.arange(16), 4)
    assert len(out) == 4 and np.all(np.isfinite(out))


def test_float64_input_to_float32_net_is_converted(ce):
    x = x_for(ce)
    assert_close(ce.forward(x), ce.forward(x.astype(np.float32)), 0, "float64 vs float32 input")
    assert ce.forward(x).dtype == np.float32
    xi = np.arange(3 * 60).reshape(3, 2, 6, 5) % 7 - 3  # integers are reals too
    assert_close(ce.forward(xi), ce.forward(xi.astype(np.float32)), 0, "int input")


def test_non_contiguous_input_works(ce64):
    x = x_for(ce64, 6)
    views = [x[::2], x[:, :, ::-1], np.asfortranarray(x), x.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)]
    for v in views:
        assert not v.flags.c_contiguous or v is views[-1]
        assert_close(ce64.forward(v), ce64.forward(np.ascontiguousarray(v)), 0, "non-contiguous input")
    y = np.arange(6)[::2] % 4
    l1, g1 = ce64.loss_and_grad(x[::2], y)
    ce64.seed(0)
    ce64.init(0)
    l2, g2 = ce64.loss_and_grad(np.ascontiguousarray(x[::2]), np.ascontiguousarray(y))
    assert l1 == l2


def test_forward_output_is_a_fresh_array(ce64):
    x = x_for(ce64)
    out = ce64.forward(x)
    out[...] = 123
    assert not np.any(ce64.forward(x) == 123)


def test_batch_larger_than_before_grows_buffers(ce64):
    small = x_for(ce64, 2, seed=1)
    big = x_for(ce64, 9, seed=2)
    a = ce64.forward(small)
    b = ce64.forward(big)
    assert b.shape == (9, 4)
    assert_close(ce64.forward(small), a, 0, "forward after growing")
    assert_close(ce64.forward(big[:2]), b[:2], 1e-12, "rows of a big batch")


# ---- threads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7])
def test_threads_do_not_change_results(ce64, n):
    x = x_for(ce64, n, seed=n)
    y = np.arange(n) % 4
    results = []
    for threads in (1, 2, 3):
        ce64.init(0)
        ce64.seed(5)
        ce64.threads = threads
        loss, grads = ce64.loss_and_grad(x, y)
        results.append((loss, grads, ce64.forward(x), {k: v.copy() for k, v in ce64.buffers.items()}))
    (l1, g1, o1, b1) = results[0]
    floor = 1e-12 * max(float(np.max(np.abs(v))) for v in g1.values())  # conv1.bias feeds batch norm: ~0
    for threads, (l, g, o, b) in zip((2, 3), results[1:]):
        assert abs(l - l1) <= 1e-12 * abs(l1), f"loss with {threads} threads"
        for k in g1:
            assert_close(g[k], g1[k], 1e-12, f"d{k} with {threads} threads vs 1", atol=floor)
        assert_close(o, o1, 1e-12, f"forward with {threads} threads")
        for k in b1:
            assert_close(b[k], b1[k], 1e-12, f"{k} with {threads} threads")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count(ce, bad):
    with pytest.raises(ValueError, match="threads"):
        ce.threads = bad


# ---- batch norm needs more than one value per channel -------------------------------------------
def test_batchnorm_batch_of_one_with_1x1_maps_is_a_value_error():
    net = build(BN_1X1, "float64")
    x = x_for(net, 1)
    with pytest.raises(ValueError, match="more than one value per channel"):
        net.loss_and_grad(x, np.array([0]))
    with pytest.raises(ValueError, match="more than one value per channel"):
        net.train_step(x, np.array([0]))
    xs = x_for(net, 5)
    with pytest.raises(ValueError, match="more than one value per channel"):  # last batch of 5 in 2s has 1
        net.train_batches(net.check_x(xs), net.check_y(np.zeros(5, int), 5), np.arange(5), 2)
    assert net.step == 0
    assert np.all(np.isfinite(net.forward(x)))  # evaluation uses running statistics: fine
    loss, _ = net.loss_and_grad(x_for(net, 2), np.array([0, 1]))  # two samples: fine
    assert np.isfinite(loss)


def test_batchnorm1d_batch_of_one_is_a_value_error():
    net = build(spec([4], ["linear: {out_features: 3}", "batchnorm1d", "linear: {out_features: 2}"]), "float64")
    with pytest.raises(ValueError, match=r"batchnorm1d 'bn1' needs more than one value per channel in training "
                                         r"\(batch of 1\)"):
        net.loss_and_grad(x_for(net, 1), np.array([0]))
    loss, _ = net.loss_and_grad(x_for(net, 2), np.array([0, 1]))
    assert np.isfinite(loss)


# ---- training entry points -------------------------------------------------------------------
def test_train_step_equals_loss_and_grad_plus_update(mse):
    x, y = x_for(mse, 4), np.random.default_rng(1).standard_normal((4, 2))
    mse.set_optimizer("sgd", lr=0.1)
    start = mse.state_dict()
    loss, grads = mse.loss_and_grad(x, y)
    mse.load_state_dict(start)
    step_loss = mse.train_step(x, y)
    assert step_loss == loss
    for k, v in mse.params.items():
        assert_close(v, start[k] - 0.1 * grads[k], 1e-12, f"{k} after one SGD step")


def test_non_finite_loss_skips_the_update(mse):
    x = x_for(mse, 2)
    start = mse.state_dict()
    loss = mse.train_step(x, np.array([[np.inf, 0.0], [0.0, 0.0]]))
    assert not math.isfinite(loss)
    for k, v in mse.params.items():
        assert np.array_equal(v, start[k]), f"{k} changed after a non-finite loss"


def test_train_batches_equals_train_steps_and_counts_correct():
    text = spec([6], ["linear: {out_features: 5}", "relu", "linear: {out_features: 3}"], name="api_tb")
    a = build(text, "float64", 2)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((11, 6)), rng.integers(0, 3, 11)
    order = rng.permutation(11)
    a.set_optimizer("momentum", lr=0.1, momentum=0.9)
    losses, correct = a.train_batches(a.check_x(x), a.check_y(y, 11), order, 4)
    after = a.state_dict()
    b = build(text, "float64", 1)  # the same library, reset to init(0)
    b.set_optimizer("momentum", lr=0.1, momentum=0.9)
    exp_losses, exp_correct = [], []
    for i in range(0, 11, 4):
        rows = order[i:i + 4]
        exp_correct.append(int(np.sum(np.argmax(b.forward(x[rows]), axis=1) == y[rows])))
        exp_losses.append(b.train_step(x[rows], y[rows]))
    assert_close(losses, exp_losses, 1e-12, "train_batches losses")
    assert list(correct) == exp_correct
    for k, v in b.state_dict().items():
        assert_close(after[k], v, 1e-12, f"{k} after train_batches vs train_step")


def test_set_optimizer_rejects_bad_values(ce):
    with pytest.raises(ValueError, match="optimizer"):
        ce.set_optimizer("rmsprop")
    for kw in ({"lr": -1}, {"lr": float("nan")}, {"momentum": float("inf")}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError):
            ce.set_optimizer("sgd", **kw)


def test_dropout_masks_repeat_after_seed(ce64):
    x, y = x_for(ce64, 4), np.arange(4) % 4
    ce64.seed(9)
    l1, g1 = ce64.loss_and_grad(x, y)
    l2, _ = ce64.loss_and_grad(x, y)
    ce64.init(0)
    ce64.seed(9)
    l3, g3 = ce64.loss_and_grad(x, y)
    assert l1 == l3 and l1 != l2
    for k in g1:
        assert np.array_equal(g1[k], g3[k])


# ---- train_batches trusts arrays that did not come from check_x / check_y --------------------------
def _unchecked_cases():
    rng = np.random.default_rng(0)
    ce = spec([5], ["linear: {out_features: 3}"], name="api_ce1")
    return {
        # targets with too few columns: read past their end
        "mse targets (4, 1)": (MSE, rng.standard_normal((4, 5)), np.ones((4, 1))),
        # labels out of range: the loss reads logits[label] outside the output (kept a few
        # elements out, so the stray read stays inside mapped memory)
        "label 5": (ce, rng.standard_normal((4, 5)), np.array([0, 1, 2, 5], np.int32)),
        "label -2": (ce, rng.standard_normal((4, 5)), np.array([0, 1, 2, -2], np.int32)),
        # x of the right dtype but too few features: read past its end
        "x (4, 3)": (ce, rng.standard_normal((4, 3)), np.array([0, 1, 2, 0], np.int32)),
    }


def test_train_batches_converts_float32_targets_on_a_float64_net():
    """float32 targets once were read as doubles; now they are converted like in train_step."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5))
    t32 = rng.standard_normal((4, 2)).astype(np.float32)
    la, _ = build(MSE, "float64").train_batches(x, t32, np.arange(4), 4)
    lb = build(MSE, "float64").train_step(x, t32.astype(np.float64))  # build() resets the net
    assert la[0] == pytest.approx(lb, rel=1e-12)


def test_train_batches_converts_int64_labels_like_train_step():
    """int64 labels (numpy's default) are converted, as everywhere else in the API."""
    rng = np.random.default_rng(3)
    ce = spec([5], ["linear: {out_features: 3}"], name="api_ce1")
    x = rng.standard_normal((4, 5))
    results = []
    for labels in (np.array([0, 1, 2, 0], np.int64), np.array([0, 1, 2, 0], np.int32)):
        net = build(ce, "float64")
        losses, _ = net.train_batches(x, labels, np.arange(4), 2)
        results.append((losses, net.state_dict()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for k in results[0][1]:
        np.testing.assert_array_equal(results[0][1][k], results[1][1][k])


@pytest.mark.parametrize("case", list(_unchecked_cases()))
def test_train_batches_rejects_arrays_that_check_x_y_would_reject(case):
    text, x, y = _unchecked_cases()[case]
    net = build(text, "float64")
    x = np.ascontiguousarray(x, np.float64)
    start = net.state_dict()
    try:
        net.train_batches(x, y, np.arange(4), 2)
    except ValueError:
        pass
    else:
        pytest.fail(f"train_batches accepted {case} without a ValueError")
    for k, v in net.state_dict().items():
        assert np.array_equal(v, start[k]), f"{k} was updated from unchecked data"


# ---- the cache of transformed weights (Winograd convolutions) ---------------------------------
WINO = spec([16, 6, 7], [
    "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
    "relu",
    "conv2d: {out_channels: 16, kernel_size: 3}",
    "flatten",
    "linear: {out_features: 3}",
], name="api_wino")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_winograd_cache_follows_every_change_of_the_weights(dtype):
    """The transformed weights are kept between calls; every way of changing a weight must show
    in the next forward: an in-place write to a params view, load_state_dict, init, training."""
    net = build(WINO, dtype)
    assert all(lp.c["WINO"] for lp in net.plan.layers if lp.kind == "conv2d")
    rtol = 1e-9 if dtype == "float64" else 1e-4
    x = np.random.default_rng(0).standard_normal((2, 16, 6, 7)).astype(net.dtype)

    def expect_torch(what):
        with torch.no_grad():
            ref = reference_model(net, WINO).eval()(torch.as_tensor(x.astype(np.float64))).numpy()
        assert_close(net.forward(x), ref, rtol, what)

    expect_torch("first forward")
    net.forward(x)  # the cache is valid now
    net.params["conv2.weight"][3, 5, 1, 2] += 0.5
    expect_torch("after one weight changed in place")
    net.params["conv1.weight"][...] *= -1
    expect_torch("after a whole tensor changed in place")
    other = nc.compile(check_text(WINO), dtype=dtype, threads=1)  # a second Net of the same library
    other.init(123)
    net.load_state_dict(other.state_dict())
    expect_torch("after load_state_dict")
    net.init(7)
    expect_torch("after init")
    net.set_optimizer("momentum", lr=0.1)
    net.train_step(x, np.array([0, 2], np.int32))
    expect_torch("after a train step")


WINO_DX = spec([16, 6, 7], [
    "conv2d: {out_channels: 16, kernel_size: 1}",
    "conv2d: {out_channels: 20, kernel_size: 3, padding: 1}",
    "flatten",
    "linear: {out_features: 3}",
], name="api_wino_dx")


def test_winograd_input_gradient_follows_every_change_of_the_weights():
    """The Winograd input gradient (winograd_dw_dx here) reads transformed flipped weights from the
    cache: after an in-place change of the weights and after a train step the gradients still
    match torch (conv1's weight gradient is made from conv2's input gradient)."""
    net = build(WINO_DX, "float64")
    assert [lp.kernel.path.name for lp in net.plan.layers if lp.kind == "conv2d"] == ["pointwise", "winograd_dw_dx"]
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3, 16, 6, 7)), np.array([0, 2, 1], np.int32)

    def expect_torch(what):
        state = net.state_dict()
        loss, grads = net.loss_and_grad(x, y)
        _, ref, _, _ = reference_loss_and_grad(net, WINO_DX, x, y, None, state)
        for k in ref:
            assert_close(grads[k], ref[k], 1e-9, f"{what}: d{k}")

    expect_torch("first step")
    net.params["conv2.weight"][4, 7, 0, 2] += 0.5
    expect_torch("after one weight changed in place")
    net.set_optimizer("momentum", lr=0.1)
    net.train_step(x, y)
    expect_torch("after a train step")


def test_winograd_cache_is_per_net():
    """Two nets of one library keep separate caches."""
    a, b = (nc.compile(check_text(WINO), dtype="float64", threads=1) for _ in range(2))
    b.init(99)
    x = np.random.default_rng(1).standard_normal((1, 16, 6, 7))
    ya, yb = a.forward(x).copy(), b.forward(x).copy()
    assert not np.allclose(ya, yb)
    assert_close(a.forward(x), ya, 1e-15, "net a after net b ran")


# ---- values: one rule each ---------------------------------------------------------------------
def test_load_state_dict_with_netc_train_metadata_points_to_load_weights(ce):
    state = {**ce.state_dict(), "__meta__/mean": np.float64(0.3), "__meta__/std": np.float64(0.3)}
    with pytest.raises(WeightsError) as exc:
        ce.load_state_dict(state)
    text = str(exc.value)
    assert "written by netc train; load it with net.load_weights(path)" in text
    assert "'__meta__/mean'" in text and "unexpected '__meta__" not in text


def test_values_beyond_the_builds_range_are_refused(ce, ce64):
    state = ce.state_dict()
    state["head.weight"] = np.full(state["head.weight"].shape, 1e300)
    before = ce.state_dict()
    with pytest.raises(WeightsError, match=r"'head.weight' has values up to 1e\+300, beyond the range of float32"):
        ce.load_state_dict(state)
    assert all(np.array_equal(v, ce.state_dict()[k]) for k, v in before.items())
    ce64.load_state_dict(state)  # finite in float64
    assert ce64.params["head.weight"].max() == 1e300


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1, -1e-9, True, "0.1", None])
def test_lr_follows_the_rule_of_set_optimizer(ce, bad):
    ce.lr = 0.25
    with pytest.raises(ValueError, match=r"lr must be a number in \[0, 1000\]"):
        ce.lr = bad
    with pytest.raises(ValueError, match=r"lr must be a number in \[0, 1000\]"):
        ce.set_optimizer("sgd", lr=bad)
    assert ce.lr == 0.25
    ce.lr = np.float32(0.5)
    assert ce.lr == 0.5


def test_adam_betas_must_be_below_one(ce):
    for betas in ((1.0, 0.999), (0.9, 1.0), (0.9, float("nan"))):
        with pytest.raises(ValueError, match="beta"):
            ce.set_optimizer("adam", betas=betas)


# ---- predict: images in, as netc predict takes them -------------------------------------------------
def _images(net, n=5, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (n, *net.network.input_shape), dtype=np.uint8)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_scales_normalises_and_returns_probabilities(ce64):
    ce64.set_normalization(0.25, 0.5)
    img = _images(ce64)
    expected = _softmax(ce64.forward((img / 255.0 - 0.25) / 0.5))
    p = ce64.predict(img)
    assert_close(p, expected, 1e-12, "predict vs forward of (x/255 - mean)/std")
    assert np.allclose(p.sum(axis=1), 1)
    assert_close(ce64.predict(img / 255.0), expected, 1e-12, "float images on the 0..1 scale")
    assert_close(ce64.predict(img[0]), expected[:1], 1e-12, "one image (C, H, W)")
    ce64.set_normalization()  # none: x/255 only
    assert_close(ce64.predict(img), _softmax(ce64.forward(img / 255.0)), 1e-12, "no normalisation")


def test_predict_takes_one_channel_images_without_the_channel_axis():
    net = build(BN_1X1.replace("[2, 3, 3]", "[1, 3, 3]").replace("api_bn1x1", "api_gray"), "float64")
    net.set_normalization(0.5, 0.25)
    img = _images(net, 4)
    expected = _softmax(net.forward((img / 255.0 - 0.5) / 0.25))
    assert_close(net.predict(img[:, 0]), expected, 1e-12, "(N, H, W)")
    assert_close(net.predict(img[0, 0]), expected[:1], 1e-12, "(H, W)")


def test_predict_of_an_mse_network_is_its_raw_output(mse):
    mse.set_normalization()
    x = np.random.default_rng(0).random((3, 5))
    assert_close(mse.predict(x), mse.forward(x), 1e-12, "mse predict")


@pytest.mark.parametrize("bad, message", [
    (np.full((1, 2, 6, 5), 300), "integer pixels must lie in 0..255"),
    (np.full((1, 2, 6, 5), np.nan), "NaN or infinite"),
    (np.zeros((1, 6, 5)), "do not fit the spec's input"),
    (np.array([["a"]]), "do not fit"),
])
def test_predict_bad_images_are_value_errors(ce, bad, message):
    with pytest.raises(ValueError, match=message):
        ce.predict(bad)


def test_set_normalization_rejects_bad_values(ce):
    for kw in ({"std": 0}, {"std": -1}, {"mean": float("nan")}, {"std": "1"}):
        with pytest.raises(ValueError, match="normalisation"):
            ce.set_normalization(**kw)


def test_save_weights_then_load_weights_keeps_weights_and_normalisation(ce64, tmp_path):
    ce64.init(5)
    ce64.set_normalization(0.1, 0.7, pad=False)
    ce64.class_names = ["a", "b", "c", "d"]
    saved = ce64.state_dict()
    path = tmp_path / "w.npz"
    ce64.save_weights(path)
    ce64.init(6)
    ce64.set_normalization()
    ce64.class_names = None
    info = ce64.load_weights(path)
    assert info == {"mean": 0.1, "std": 0.7, "pad": False, "source": "stored in w.npz",
                    "class_names": ["a", "b", "c", "d"]}
    assert ce64.normalization == {"mean": 0.1, "std": 0.7, "pad": False}
    assert all(np.array_equal(v, ce64.state_dict()[k]) for k, v in saved.items())
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]  # atomic: no temporary left


def test_load_weights_falls_back_to_normalization_json(ce64, tmp_path):
    path = tmp_path / "w.npz"
    ce64.set_normalization()
    ce64.save_weights(path)  # no mean/std inside
    (tmp_path / "normalization.json").write_text('{"mean": 0.2, "std": 0.4}')
    info = ce64.load_weights(path)
    assert (info["mean"], info["std"]) == (0.2, 0.4) and "normalization.json" in info["source"]


@pytest.mark.parametrize("text", ['{"mean": 0.2}', '{"mean": 0.2, "std": 0}', '{"mean": "a", "std": 1}',
                                  "[" * 70000, "not json"])
def test_load_weights_refuses_a_damaged_normalization_json(ce64, tmp_path, text):
    path = tmp_path / "w.npz"
    ce64.set_normalization()
    ce64.save_weights(path)
    (tmp_path / "normalization.json").write_text(text)
    with pytest.raises(WeightsError, match="normalization.json: (unreadable normalisation file|normalisation must)"):
        ce64.load_weights(path)


def test_load_weights_changes_nothing_when_the_metadata_is_damaged(ce64, tmp_path):
    from netcompiler import weights as W

    ce64.init(1)
    path = tmp_path / "w.npz"
    ce64.set_normalization(0.5, 0.5)
    ce64.save_weights(path)
    W.save_npz(path, {**dict(np.load(path)), "__meta__/std": np.float64(-1)})
    ce64.init(2)
    ce64.set_normalization(0.1, 0.2)
    before = ce64.state_dict()
    with pytest.raises(WeightsError, match="__meta__/std"):
        ce64.load_weights(path)
    assert all(np.array_equal(v, ce64.state_dict()[k]) for k, v in before.items())
    assert ce64.normalization == {"mean": 0.1, "std": 0.2, "pad": False}


@pytest.mark.parametrize("which", ["ce", "mse"])
def test_backward_batch_then_optimizer_step_is_train_step(which):
    """The two halves data-parallel training calls around its allreduce make one train_step:
    the same loss, update, batch-norm statistics and dropout stream; and correct counts."""
    text = CE if which == "ce" else MSE
    a = build(text, "float64", 1)
    rng = np.random.default_rng(5)
    n = 9
    x = rng.standard_normal((n, *a.network.input_shape))
    y = rng.integers(0, 4, n) if which == "ce" else rng.standard_normal((n, 2))
    rows = np.array([7, 2, 5, 0, 8])
    X, Y = a.check_x(x), a.check_y(y, n)

    def run(halves: bool):
        net = build(text, "float64", 1)  # the same library, reset to init(0)
        net.set_optimizer("adam", lr=0.01)
        net.seed(3)
        losses, rights = [], []
        for _ in range(2):
            if halves:
                loss, right = net.backward_batch(X, Y, rows)
                grads = net.grad_buffer[:-2].copy()
                net.optimizer_step()
            else:
                right = None
                loss = net.train_step(x[rows], y[rows])
                grads = net.grad_buffer[:-2].copy()
            losses.append(loss)
            rights.append(right)
        return losses, rights, grads, net.state_dict(), net

    la, ra, ga, sa, net = run(True)
    assert net.grad_buffer.size == net.flat_params.size + 2
    lb, _, gb, sb, _ = run(False)
    assert la == lb
    assert np.array_equal(ga, gb)
    for k, v in sb.items():
        assert np.array_equal(sa[k], v), k
    if which == "mse":
        assert ra == [0, 0]


def test_backward_batch_counts_correct_as_train_batches():
    a = build(CE, "float64", 1)
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((8, 2, 6, 5)), rng.integers(0, 4, 8)
    X, Y = a.check_x(x), a.check_y(y, 8)
    rights = []
    for _ in range(3):
        rights.append(a.backward_batch(X, Y, np.arange(8))[1])
        a.optimizer_step()
    a = build(CE, "float64", 1)
    _, correct = a.train_batches(X, Y, np.tile(np.arange(8), 3), 8)  # counted in C before each update
    assert rights == list(correct)


def test_backward_batch_rejects_bad_rows(ce):
    x = ce.check_x(np.zeros((3, 2, 6, 5)))
    y = ce.check_y(np.zeros(3, int), 3)
    for rows in (np.array([], np.int64), np.array([3]), np.array([-1]), np.zeros((1, 1), np.int64)):
        with pytest.raises(ValueError, match="rows must be a non-empty 1-D array"):
            ce.backward_batch(x, y, rows)
