"""`netc verify`: does the generated code compute the right thing for this network?

Compiles the float64 and the float32 build (or one of them), runs a training-mode forward
and backward on random inputs, and compares every parameter gradient (and the eval-mode
outputs and loss) with the PyTorch twin in float64 with the same weights, inputs and dropout
masks, when torch is installed; the float64 build also with central finite differences of
its own loss (finite differences in float32 would measure rounding, not the formulas).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TORCH_RTOL = {
    # float64 against float64: only summation order differs
    "float64": 1e-8,
    # float32 against the float64 reference: each sum of K products is off by up to about
    # sqrt(K) float32 roundings (2^-24 = 6e-8) relative to the sum of magnitudes, and a
    # gradient goes through a few such sums, with K up to ~2,400 in the shipped specs
    # (measured: <= 5.1e-7 of the tensor's largest element on lenet5, alphabet and cifar); 1e-4
    # leaves room for cancellation and deeper nets, and a gradient off by 0.1% still fails
    "float32": 1e-4,
}
FD_RTOL = 1e-4  # central differences with h = 1e-6 on float64
FD_ATOL = 1e-7
# A coordinate that fails at h is measured again at each smaller step h * FD_RETRY[i] until it
# passes: in a deep, wide ReLU network a step of 1e-6 in an early weight moves some of the
# millions of ReLU inputs across 0, and the central difference then measures the kink, not the
# gradient (mobilenetv2_cifar, conv1.weight: off by 1.5e-3 at h = 1e-6, the one-sided
# differences 2.5e-3 apart, 2.4e-8 at 1e-7; densenet_cifar's: 1.4e-4 at 1e-6, 6.2e-5 at 1e-7,
# 2.2e-8 at 1e-8, where float64 rounding is still below 1e-7).  A wrong gradient fails at every step.
FD_RETRY = (0.1, 0.01)
DTYPES = ("float64", "float32")


@dataclass
class Row:
    dtype: str  # the build compared
    tensor: str
    reference: str  # "torch" or "finite-diff"
    max_abs: float
    max_rel: float
    ok: bool
    checked: int  # elements compared


GRAD_FLOOR = 1e-2  # see compare_torch


def _rel(a: np.ndarray, b: np.ndarray, floor: float = 1e-300) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(max |b|, floor)): the error relative to the tensor's
    scale (or to `floor`, when the tensor is smaller than that)."""
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max(initial=0.0))
    return diff, diff / max(float(np.abs(b).max(initial=0.0)), floor)


def random_batch(net, n: int, rng):
    """n standard-normal inputs and random labels (cross_entropy) or targets (mse: standard normal;
    binary_cross_entropy: uniform in [0, 1])."""
    x = rng.standard_normal((n, *net.network.input_shape))
    if net.network.loss == "cross_entropy":
        y = rng.integers(0, net.network.num_classes, n)
    elif net.network.loss == "binary_cross_entropy":
        y = rng.uniform(0, 1, (n, *net.network.output_shape))
    else:
        y = rng.standard_normal((n, *net.network.output_shape))
    return x, y


def dropout_masks(net, n: int) -> dict[str, np.ndarray]:
    """The masks the last training forward drew, by layer name (for the torch twin)."""
    masks = {}
    for t in net.plan.activations:
        if t.name.endswith(".mask"):
            layer = t.name[: -len(".mask")]
            lp = next(lp for lp in net.plan.layers if lp.layer.name == layer)
            masks[layer] = net._acts[:n, t.offset:t.offset + t.size].reshape(n, *lp.layer.out_shape).copy()
    return masks


def compare_torch(net, x, y, state, buffers_before) -> list[Row]:
    """The build's loss, gradients, running statistics and eval outputs against the float64
    torch twin, given the build's own weights and inputs (exactly representable in float64)."""
    import torch

    from .torchref import torch_loss, torch_model

    dtype = net.dtype.name
    tol = TORCH_RTOL[dtype]
    rows = []
    n = x.shape[0]
    loss, grads = net.loss_and_grad(x, y)
    masks = dropout_masks(net, n)
    full = {k: np.asarray(v, np.float64) for k, v in {**state, **buffers_before}.items()}
    model = torch_model(net.network, full)
    for name, mask in masks.items():
        *path, leaf = name.split(".")
        setattr(model.get_submodule(".".join(path)), leaf, _FixedMask(torch.as_tensor(mask, dtype=torch.float64)))
    model.train()
    x64 = torch.as_tensor(np.asarray(x, net.dtype), dtype=torch.float64)
    out = model(x64)
    tloss = torch_loss(net.network, out, y)
    tloss.backward()
    a, r = _rel(np.array([loss]), np.array([tloss.item()]))
    rows.append(Row(dtype, "loss", "torch", a, r, r <= tol, 1))
    ref_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    # A gradient that is zero in exact arithmetic (a conv bias right before batch norm) is
    # rounding noise in both builds: gradients are measured against GRAD_FLOOR times the
    # largest gradient of the network when they are smaller than that.  1e-2: on resnet8 (a
    # conv bias before each batch norm, 4 x 32x32 pixels summed) the float32 build's noise
    # was 2.6e-8 and PyTorch's own float32 9.6e-8, with a largest gradient of 0.18; 1e-3 of
    # that scale (tolerance 1.8e-8) would fail both.
    floor = GRAD_FLOOR * max((float(np.abs(g).max(initial=0.0)) for g in ref_grads.values()), default=0.0)
    for k, g in ref_grads.items():
        a, r = _rel(grads[k], g, max(floor, 1e-300))
        rows.append(Row(dtype, k, "torch", a, r, r <= tol, grads[k].size))
    sd = model.state_dict()
    for k in net.buffers:
        a, r = _rel(net.buffers[k], sd[k].numpy())
        rows.append(Row(dtype, k, "torch", a, r, r <= tol, net.buffers[k].size))
    # evaluation mode outputs
    model.eval()
    with torch.no_grad():
        ref = model(x64).numpy()
    a, r = _rel(net.forward(x), ref)
    rows.append(Row(dtype, "outputs (eval)", "torch", a, r, r <= tol, ref.size))
    return rows


class _FixedMask:  # a torch module multiplying by a saved dropout mask in training mode, as dropout does
    def __new__(cls, mask):
        import torch.nn as nn

        class FixedMask(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.register_buffer("mask", m, persistent=False)

            def forward(self, t):
                return t * self.mask if self.training else t

        return FixedMask(mask)


def finite_differences(net, x, y, per_tensor: int, seed: int, h: float = 1e-6) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    buffers = {k: v.copy() for k, v in net.buffers.items()}

    def loss_at() -> float:
        net.seed(seed)  # same dropout masks on every evaluation
        for k, v in buffers.items():
            net.buffers[k][...] = v  # running statistics do not affect training-mode loss
        return net.loss_and_grad(x, y)[0]

    net.seed(seed)
    grads = net.loss_and_grad(x, y)[1]
    for name, p in net.params.items():
        flat = p.reshape(-1)
        # half the coordinates where the gradient is largest (a zero gradient, e.g. behind a
        # dead ReLU, would hide a wrong formula), the rest at random
        g = np.abs(grads[name].reshape(-1))
        top = np.argsort(-g, kind="stable")[: max(1, per_tensor // 2)]
        rest = np.setdiff1d(np.arange(flat.size), top)
        idx = np.concatenate([top, rng.choice(rest, size=min(per_tensor - top.size, rest.size), replace=False)])

        def central(i: int, step: float) -> float:
            old = flat[i]
            flat[i] = old + step
            up = loss_at()
            flat[i] = old - step
            down = loss_at()
            flat[i] = old
            return (up - down) / (2 * step)

        ana = grads[name].reshape(-1)[idx]
        num = np.array([central(i, h) for i in idx])
        for factor in FD_RETRY:  # a ReLU kink within h? (see FD_RETRY)
            for j in np.flatnonzero(np.abs(num - ana) > FD_ATOL + FD_RTOL * np.abs(ana)):
                num[j] = central(idx[j], h * factor)
        diff = np.abs(num - ana)
        ok = bool(np.all(diff <= FD_ATOL + FD_RTOL * np.abs(ana)))
        a, r = _rel(num, ana)
        rows.append(Row(net.dtype.name, name, "finite-diff", a, r, ok, idx.size))
    return rows


def verify(spec, batch: int = 4, seed: int = 0, per_tensor: int = 6, use_torch: bool = True,
           threads: int | None = None, dtypes=DTYPES) -> tuple[list[Row], str | None]:
    """Returns the comparison rows of every build in dtypes and a note (e.g. why torch was
    skipped)."""
    rows: list[Row] = []
    note = None
    for dtype in dtypes:
        more, note = _verify_build(spec, dtype, batch, seed, per_tensor, use_torch, threads)
        rows += more
    return rows, note


def _verify_build(spec, dtype, batch, seed, per_tensor, use_torch, threads) -> tuple[list[Row], str | None]:
    import netcompiler as nc

    net = nc.compile(spec, dtype=dtype, threads=threads)
    net.init(seed)
    # perturb batch-norm affine parameters and running statistics away from 1/0
    rng = np.random.default_rng(seed + 1)
    for k, v in net.buffers.items():
        v[...] = rng.uniform(0.5, 1.5, v.shape) if k.endswith("running_var") else rng.normal(0, 0.1, v.shape)
    x, y = random_batch(net, batch, np.random.default_rng(seed))
    state = {k: v.copy() for k, v in net.params.items()}
    buffers_before = {k: v.copy() for k, v in net.buffers.items()}
    rows: list[Row] = []
    note = None
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            note = "torch is not installed: compared with finite differences only (pip install torch)"
        else:
            net.seed(seed)
            rows += compare_torch(net, x, y, state, buffers_before)
            for k, v in buffers_before.items():
                net.buffers[k][...] = v
    else:
        note = "torch comparison skipped (--no-torch)"
    if dtype == "float64":
        rows += finite_differences(net, x, y, per_tensor, seed)
    return rows, note


def format_rows(rows: list[Row]) -> str:
    """One table per build, each under a line with its tolerances."""
    parts = []
    for dtype in dict.fromkeys(r.dtype for r in rows):
        parts += [f"{dtype} build: {tolerances(dtype)}", _table([r for r in rows if r.dtype == dtype]), ""]
    return "\n".join(parts).rstrip("\n")


def _table(rows: list[Row]) -> str:
    head = ("tensor", "reference", "checked", "max abs err", "max rel err", "")
    body = [(r.tensor, r.reference, str(r.checked), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", "ok" if r.ok else "MISMATCH")
            for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def tolerances(dtype: str) -> str:
    """The pass conditions of one build's rows (max rel err: relative to the tensor's largest element)."""
    torch_part = f"torch (float64) max rel err <= {TORCH_RTOL[dtype]:g}"
    if dtype == "float64":
        return (f"{torch_part}; finite differences (h=1e-6, float64; "
                f"{', then '.join(f'{f * 1e-6:g}' for f in FD_RETRY)} where that fails) "
                f"|fd - grad| <= {FD_ATOL:g} + {FD_RTOL:g}*|grad|")
    return f"{torch_part} (float32 rounding); no finite differences (float32 rounding would swamp them)"

