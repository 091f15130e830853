"""Element-wise activations: one table row per kind (forward and derivative in C).

Each row gives the C expression of the forward value `y` of input `x`, and of dy/dx in
terms of `x` and `y`, plus the FLOPs those expressions cost (every add, multiply,
compare, exp, erf and tanh counts as one).  Constants are integers or cast to real_t: a
double constant such as 0.5 turns a float build's loop into double arithmetic, and gcc
then leaves it scalar.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Layer, LayerKind, Option


@dataclass(frozen=True)
class Elementwise:
    forward: str  # C expression of y in x
    derivative: str  # C expression of dy/dx in x and y
    fwd_flops: int
    bwd_flops: int  # including the multiply by the incoming gradient


# the math functions net.c.j2 supplies as macros (in the float build, inline versions that
# are emitted only where a layer's expressions name them)
MATH_MACROS = frozenset({"EXP", "ERF", "TANH"})


class Activation(LayerKind):
    template = "activation.c.j2"

    def formula(self, layer: Layer) -> Elementwise:
        raise NotImplementedError

    @property
    def prefix(self) -> str:  # relu -> relu1, relu2...
        return self.kind

    def flops(self, layer: Layer) -> tuple[int, int]:
        f = self.formula(layer)
        return (f.fwd_flops * layer.out_size, f.bwd_flops * layer.out_size)

    def render_context(self, layer: Layer) -> dict:
        f = self.formula(layer)
        return dict(N=layer.out_size, forward=f.forward, derivative=f.derivative,
                    uses_y="y" in _idents(f.derivative), uses_x="x" in _idents(f.derivative),
                    math=_idents(f.forward + " " + f.derivative) & MATH_MACROS)


def _idents(expr: str) -> set[str]:
    import re

    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))


class ReLU(Activation):
    kind = "relu"
    doc = "max(0, x)"

    def formula(self, layer):
        return Elementwise("x > 0 ? x : 0", "x > 0 ? 1 : 0", 1, 1)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.ReLU()


class LeakyReLU(Activation):
    kind = "leaky_relu"
    doc = "x if x > 0 else negative_slope * x"
    options = (Option("negative_slope", "float", 0.01, "slope for x < 0", minimum=-1e6, maximum=1e6),)

    def formula(self, layer):
        a = _c_real(layer.opts["negative_slope"])
        return Elementwise(f"x > 0 ? x : {a} * x", f"x > 0 ? 1 : {a}", 2, 2)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.LeakyReLU(layer.opts["negative_slope"])


class GELU(Activation):
    kind = "gelu"
    doc = "x * Phi(x) (exact, with erf) or its tanh approximation"
    options = (Option("approximate", "choice", "none", "'none' (erf) or 'tanh'", choices=("none", "tanh")),)

    def formula(self, layer):
        if layer.opts["approximate"] == "none":
            # y = x Phi(x), Phi(x) = (1 + erf(x/sqrt2)) / 2 (x (1 + erf) would overflow near
            # FLT_MAX); dy/dx = Phi(x) + x phi(x), with Phi(x) = y / x from the saved output
            # (no second erf); below |x| = 1e-20, Phi(x) is 1/2 to float precision and y / x
            # would lose it to subnormal rounding
            return Elementwise("x * ((1 + ERF(x * M_SQRT1_2_R)) / 2)",
                               "(x < (real_t)1e-20 && x > (real_t)-1e-20 ? (real_t)0.5 : y / x)"
                               " + x * M_1_SQRT2PI_R * EXP(-x * x / 2)", 5, 11)
        # y = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        return Elementwise(
            "x * ((1 + TANH(M_SQRT2_PI_R * (x + (real_t)0.044715 * x * x * x))) / 2)",
            "gelu_tanh_grad(x)", 9, 16)

    def render_context(self, layer):
        ctx = super().render_context(layer)
        ctx["needs_gelu_tanh_grad"] = layer.opts["approximate"] == "tanh"
        return ctx

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.GELU(approximate=layer.opts["approximate"])


class Tanh(Activation):
    kind = "tanh"
    doc = "hyperbolic tangent"

    def formula(self, layer):
        return Elementwise("TANH(x)", "1 - y * y", 1, 3)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.Tanh()


class Sigmoid(Activation):
    kind = "sigmoid"
    doc = "1 / (1 + exp(-x))"

    def formula(self, layer):
        return Elementwise("1 / (1 + EXP(-x))", "y * (1 - y)", 4, 3)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.Sigmoid()


class ReLU6(Activation):
    kind = "relu6"
    prefix = "relu6_"  # relu6_1, not relu61
    doc = "min(max(0, x), 6)"

    def formula(self, layer):
        # as PyTorch, NaN stays NaN and -0 stays -0 (both compares are false for them); the
        # derivative (hardtanh's) is 1 strictly inside (0, 6), else 0
        return Elementwise("x < 0 ? 0 : (x > 6 ? 6 : x)", "x > 0 && x < 6 ? 1 : 0", 2, 3)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.ReLU6()


class Hardswish(Activation):
    kind = "hardswish"
    doc = "x * relu6(x + 3) / 6"

    def formula(self, layer):
        # PyTorch's derivative: 0 up to -3 (included), x / 3 + 1/2 strictly between -3 and 3,
        # 1 from 3 on (tests/test_gradients.py, test_activation_derivatives_at_the_kinks_match_torch)
        return Elementwise("x * (x + 3 > 0 ? (x + 3 < 6 ? x + 3 : 6) : 0) / 6",
                           "x <= -3 ? 0 : (x < 3 ? x / 3 + (real_t)0.5 : 1)", 5, 5)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.Hardswish()


class SiLU(Activation):
    kind = "silu"
    aliases = ("swish",)
    doc = "x * sigmoid(x) (swish)"

    def formula(self, layer):
        # y = x s, s = 1 / (1 + e^-x); dy/dx = s (1 + x (1 - s)) = s (1 + x - y): one exp
        return Elementwise("x / (1 + EXP(-x))", "(1 + x - y) / (1 + EXP(-x))", 4, 7)

    def torch_module(self, layer):
        import torch.nn as nn

        return nn.SiLU()


def _c_real(v: float) -> str:
    """A float literal C reads exactly (repr round-trips) and that is typed by real_t."""
    return f"(real_t){float(v)!r}"
