"""`netc verify`: does the generated code compute the right thing for this network?

Compiles the float64 build, runs a training-mode forward and backward on random inputs,
and compares every parameter gradient (and the eval-mode outputs and loss) with
(a) the PyTorch twin with the same weights and the same dropout masks, when torch is
installed, and (b) central finite differences of the loss on the float64 build.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TORCH_RTOL = 1e-8  # float64 against float64: only summation order differs
FD_RTOL = 1e-4  # central differences with h = 1e-6 on float64
FD_ATOL = 1e-7


@dataclass
class Row:
    tensor: str
    reference: str  # "torch" or "finite-diff"
    max_abs: float
    max_rel: float
    ok: bool
    checked: int  # elements compared


def _rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|): the error relative to the tensor's scale."""
    diff = float(np.abs(np.asarray(a) - np.asarray(b)).max(initial=0.0))
    return diff, diff / max(float(np.abs(b).max(initial=0.0)), 1e-300)


def random_batch(net, n: int, rng):
    """n standard-normal inputs and random labels (cross_entropy) or targets (mse)."""
    x = rng.standard_normal((n, *net.network.input_shape))
    if net.network.loss == "cross_entropy":
        y = rng.integers(0, net.network.num_classes, n)
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
    import torch

    from .torchref import torch_loss, torch_model

    rows = []
    n = x.shape[0]
    loss, grads = net.loss_and_grad(x, y)
    masks = dropout_masks(net, n)
    full = {**state, **buffers_before}
    model = torch_model(net.network, full)
    for name, mask in masks.items():
        *path, leaf = name.split(".")
        setattr(model.get_submodule(".".join(path)), leaf, _FixedMask(torch.as_tensor(mask)))
    model.train()
    out = model(torch.as_tensor(x))
    tloss = torch_loss(net.network, out, y)
    tloss.backward()
    a, r = _rel(np.array([loss]), np.array([tloss.item()]))
    rows.append(Row("loss", "torch", a, r, r <= TORCH_RTOL, 1))
    for k, p in model.named_parameters():
        a, r = _rel(grads[k], p.grad.numpy())
        rows.append(Row(k, "torch", a, r, r <= TORCH_RTOL, grads[k].size))
    sd = model.state_dict()
    for k in net.buffers:
        a, r = _rel(net.buffers[k], sd[k].numpy())
        rows.append(Row(k, "torch", a, r, r <= TORCH_RTOL, net.buffers[k].size))
    # evaluation mode outputs
    model.eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    a, r = _rel(net.forward(x), ref)
    rows.append(Row("outputs (eval)", "torch", a, r, r <= TORCH_RTOL, ref.size))
    return rows


class _FixedMask:  # a torch module multiplying by a saved dropout mask
    def __new__(cls, mask):
        import torch.nn as nn

        class FixedMask(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.register_buffer("mask", m, persistent=False)

            def forward(self, t):
                return t * self.mask

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
        num = np.empty(idx.size)
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + h
            up = loss_at()
            flat[i] = old - h
            down = loss_at()
            flat[i] = old
            num[j] = (up - down) / (2 * h)
        ana = grads[name].reshape(-1)[idx]
        diff = np.abs(num - ana)
        ok = bool(np.all(diff <= FD_ATOL + FD_RTOL * np.abs(ana)))
        a, r = _rel(num, ana)
        rows.append(Row(name, "finite-diff", a, r, ok, idx.size))
    return rows


def verify(spec, batch: int = 4, seed: int = 0, per_tensor: int = 6, use_torch: bool = True,
           threads: int | None = None) -> tuple[list[Row], str | None]:
    """Returns the comparison rows and a note (e.g. why torch was skipped)."""
    import netcompiler as nc

    net = nc.compile(spec, dtype="float64", threads=threads)
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
    rows += finite_differences(net, x, y, per_tensor, seed)
    return rows, note


def format_rows(rows: list[Row]) -> str:
    head = ("tensor", "reference", "checked", "max abs err", "max rel err", "")
    body = [(r.tensor, r.reference, str(r.checked), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", "ok" if r.ok else "MISMATCH")
            for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def tolerances() -> str:
    return (f"tolerances: torch max rel err <= {TORCH_RTOL:g} (float64 both sides); finite differences "
            f"(h=1e-6) |fd - grad| <= {FD_ATOL:g} + {FD_RTOL:g}*|grad|")

