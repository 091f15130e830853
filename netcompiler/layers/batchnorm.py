"""batchnorm2d and batchnorm1d: per-channel batch normalisation, as torch.nn.BatchNorm2d
and torch.nn.BatchNorm1d.

Training mode normalises with the batch statistics (biased variance) and updates the
running statistics (unbiased variance) with `momentum`; evaluation mode uses the running
statistics.  Training mode needs the whole batch, so it runs as a batch-level step: over
the whole batch's tensors when a batch-level or ranged stage is next to it, else split
(plan.py, split_layers): the stage before sums each sample's plane as it finishes the
sample, the batch-level step combines those sums into the batch statistics, and the stage
after normalises each sample before it reads it (backward the same in reverse, the input
gradient's coefficients kept in the stats).
batchnorm1d is the same computation on (features,) samples: each feature a channel of
one value per sample (the template's HW is 1).
"""
from __future__ import annotations

import math

import numpy as np

from .base import Layer, LayerKind, Option, Shape, fmt_shape
from ..target import current


class BatchNorm2d(LayerKind):
    kind = "batchnorm2d"
    prefix = "bn"
    doc = "batch normalisation over (N, H, W) per channel, as torch.nn.BatchNorm2d"
    template = "batchnorm2d.c.j2"
    aliases = ("batch_normalization", "batchnorm", "batch_norm")
    batch_level_in_training = True
    options = (
        Option("eps", "float", 1e-5, "added to the variance", minimum=0, maximum=1),
        Option("momentum", "float", 0.1, "running statistics: new = (1-momentum)*old + momentum*batch",
               minimum=0, maximum=1),
    )

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        if len(in_shape) != 3:
            error(f"{layer.where()}: needs a 3-D input (channels, height, width), got {fmt_shape(in_shape)}", None)
            return None
        return in_shape

    def param_shapes(self, layer: Layer) -> dict[str, Shape]:
        c = layer.in_shape[0]
        return {"weight": (c,), "bias": (c,)}

    def buffer_shapes(self, layer: Layer) -> dict[str, Shape]:
        c = layer.in_shape[0]
        return {"running_mean": (c,), "running_var": (c,)}

    def flops(self, layer: Layer) -> tuple[int, int]:
        # eval forward: (x - mean) * rstd * gamma + beta = 4 per element;
        # backward (training formula): 2 reductions (2 each) + 5 per element for dx.
        return (4 * layer.out_size, 9 * layer.out_size)

    def train_forward_extra_flops(self, layer: Layer) -> int:
        # batch mean (1 add) and variance (sub, square, add) per element
        return 4 * layer.out_size

    def batch_stats(self, layer: Layer, split: bool = False) -> int:
        # per channel: a value of the channel k, batch mean - k, 1/sqrt(var + eps); split, also the
        # input gradient's coefficients a, b, e (the template's backward) for the per-sample dx pass
        return (6 if split else 3) * layer.in_shape[0]

    def split_sums(self, layer: Layer) -> int:
        # per channel: the sample's two sums (forward: of x - k_s and its square, k_s the sample's
        # first value of the channel; backward: of dy and of dy (x - mean))
        return 2 * layer.in_shape[0]

    def input_grad_flops(self, layer: Layer) -> int:
        return 5 * layer.out_size  # dx per element; the reductions feed dgamma/dbeta too

    def eval_affine(self, layer: Layer) -> bool:
        return True

    def applies_relu(self, layer: Layer) -> bool:
        return True

    def masks_relu_dout(self, layer: Layer) -> bool:
        return True

    def render_context(self, layer: Layer) -> dict:
        c, hw = layer.in_shape[0], math.prod(layer.in_shape[1:])
        # HWV: the whole vectors of a channel's plane, the vector loops' end; a scalar tail does the rest
        # C2: where rstd starts in stats (after k and mean - k)
        vec = current().vec
        return dict(C=c, C2=2 * c, HW=hw, HWV=hw - hw % vec, VEC=vec, eps=repr(layer.opts["eps"]),
                    momentum=repr(layer.opts["momentum"]))

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        return nn.BatchNorm2d(layer.in_shape[0], eps=layer.opts["eps"], momentum=layer.opts["momentum"])

    def init_params(self, layer: Layer, rng) -> dict:
        c = layer.in_shape[0]
        return {"weight": np.ones(c), "bias": np.zeros(c), "running_mean": np.zeros(c), "running_var": np.ones(c)}


class BatchNorm1d(BatchNorm2d):
    kind = "batchnorm1d"
    aliases = ()  # batch_normalization and the like stay batchnorm2d's
    doc = "batch normalisation over the batch per feature, as torch.nn.BatchNorm1d on (N, features)"

    def infer(self, layer: Layer, in_shape: Shape, error) -> Shape | None:
        if len(in_shape) != 1:
            error(f"{layer.where()}: needs a 1-D input (features), got {fmt_shape(in_shape)}: use batchnorm2d "
                  f"for (channels, height, width), or flatten first", None)
            return None
        return in_shape

    def torch_module(self, layer: Layer):
        import torch.nn as nn

        return nn.BatchNorm1d(layer.in_shape[0], eps=layer.opts["eps"], momentum=layer.opts["momentum"])
