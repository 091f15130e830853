"""Every layer kind and every option class against PyTorch and finite differences.

Each case is a small spec with the layer under test between other layers: a parameter
layer before it (so its *input* gradient is checked indirectly through that layer's
parameter gradients) and a head after it that the loss applies to.  Every case is
compiled in float64 and float32 and checked for
- the evaluation-mode forward against an independent PyTorch model (conftest.py builds it
  from the spec's raw YAML options, not from the compiler's own `torch_module`),
- the training-mode loss and every parameter gradient against PyTorch, with 1 and 2
  threads (float64, rtol 1e-9) and in float32 (rtol 1e-4),
- central finite differences of the loss `loss_and_grad` returns, for a few coordinates
  of each parameter tensor (float64; `seed` before every evaluation repeats the dropout
  masks).
Dropout draws its own masks, so the PyTorch reference multiplies by the mask the C code
saved (in `net._acts` at the '<layer>.mask' slot) instead of using nn.Dropout.

`COVERED` (kind -> option names set explicitly in some case) is derived from `CASES`;
tests/test_registry.py fails when a kind or an option is never exercised here.
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pytest

from conftest import (ROOT, assert_close, build, dropout_masks, prebuild, random_batch, randomize_batchnorm, raw_layers,
                      reference_loss_and_grad, reference_model, spec)
from netcompiler.check import check_text, force_kernels
from netcompiler.errors import SpecErrors
from netcompiler.layers.conv2d import WINOGRAD_DW_PATHS, WINOGRAD_DX_PATHS
from netcompiler.plan import make_plan
from netcompiler.render import render

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel",
                                        "ignore:.*requires_grad=True.*:UserWarning")

BATCH = 3  # odd: two threads split it unevenly
HEAD = ["flatten", "linear: {out_features: 3}"]
PRE_CONV = "conv2d: {out_channels: 3, kernel_size: 1}"  # a parameter layer before the layer under test


def around(layer, input_shape=(2, 7, 6), pre=PRE_CONV, head=HEAD, loss="cross_entropy"):
    layers = ([pre] if pre else []) + ([layer] if isinstance(layer, str) else list(layer)) + list(head)
    return spec(input_shape, layers, loss)


CASES: dict[str, str] = {
    # ---- conv2d ---------------------------------------------------------------------------
    "conv_basic": around("conv2d: {out_channels: 4, kernel_size: 3}"),
    "conv_first_layer": around("conv2d: {out_channels: 4, kernel_size: 3, in_channels: 2}", pre=None),
    "conv_stride2_pad1": around("conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: 1}"),
    "conv_pairs_nonsquare": around("conv2d: {out_channels: 2, kernel_size: [3, 2], stride: [2, 1], padding: [1, 2]}"),
    "conv_same_odd": around("conv2d: {out_channels: 3, kernel_size: 3, padding: same}"),
    "conv_same_even": around("conv2d: {out_channels: 3, kernel_size: [2, 4], padding: same}"),
    "conv_same_dilated": around("conv2d: {out_channels: 3, kernel_size: 3, dilation: 2, padding: same}"),
    "conv_same_even_dilated": around("conv2d: {out_channels: 2, kernel_size: [4, 2], dilation: [1, 3], "
                                     "padding: same}"),
    "conv_valid": around("conv2d: {out_channels: 3, kernel_size: [2, 3], padding: valid}"),
    "conv_dilation_stride": around("conv2d: {out_channels: 3, kernel_size: 2, dilation: [2, 3], stride: 2, "
                                   "padding: 2}"),
    "conv_groups2": around("conv2d: {out_channels: 6, kernel_size: 3, groups: 2, padding: 1}",
                           pre="conv2d: {out_channels: 4, kernel_size: 1}"),
    "conv_depthwise": around("conv2d: {out_channels: 3, kernel_size: 3, groups: 3}"),
    "conv_depthwise_x2": around("conv2d: {out_channels: 6, kernel_size: [3, 2], groups: 3, stride: [1, 2]}"),
    "conv_nobias": around(["conv2d: {out_channels: 4, kernel_size: 3, bias: false}",
                           "conv2d: {out_channels: 2, kernel_size: 2, bias: false}"],
                          pre="conv2d: {out_channels: 3, kernel_size: 1, bias: false}"),
    "conv_pad_over_kernel": around("conv2d: {out_channels: 2, kernel_size: 2, stride: 3, padding: 3}"),
    "conv_1x1_stride": around("conv2d: {out_channels: 4, kernel_size: 1, stride: 2}"),
    "conv_full_kernel": around("conv2d: {out_channels: 5, kernel_size: [7, 6]}"),
    "conv_stack": around(["conv2d: {out_channels: 4, kernel_size: 3, padding: 1}", "relu",
                          "conv2d: {out_channels: 3, kernel_size: 3, stride: 2}"], input_shape=(1, 9, 8)),
    # register blocking of the convolution GEMMs: several channel / pixel / tap blocks, a prime
    # channel count, exact multiples of the vector width
    "conv_gemm_blocks": around("conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", input_shape=(3, 9, 8)),
    "conv_gemm_prime": around("conv2d: {out_channels: 11, kernel_size: 5, padding: same}", input_shape=(2, 8, 8),
                              pre="conv2d: {out_channels: 2, kernel_size: 1}"),
    "conv_gemm_deep": around("conv2d: {out_channels: 12, kernel_size: 4, padding: 1}", input_shape=(8, 5, 5),
                             pre="conv2d: {out_channels: 8, kernel_size: 1}"),
    # im2col on the fly (pixel_gather): a cut last pixel block with 'same' padding, dilation with
    # groups, stride 2 with padding, two pixel vectors per tile, 16 channels per tile, the first
    # layer (the small cases above keep the im2col buffer: their input is under 2 vectors)
    "conv_gather_pad": around("conv2d: {out_channels: 6, kernel_size: 5, padding: 2}", input_shape=(2, 9, 12)),
    "conv_gather_dilated_groups": around("conv2d: {out_channels: 4, kernel_size: 3, dilation: [2, 1], groups: 2, "
                                         "padding: [0, 1]}", input_shape=(2, 11, 13),
                                         pre="conv2d: {out_channels: 4, kernel_size: 1}"),
    "conv_gather_stride": around("conv2d: {out_channels: 3, kernel_size: 3, stride: 2, padding: 1}",
                                 input_shape=(2, 6, 31)),
    "conv_gather_two_vectors": around("conv2d: {out_channels: 4, kernel_size: 3, padding: 1}", input_shape=(2, 16, 16)),
    "conv_gather_16ch": around("conv2d: {out_channels: 16, kernel_size: 5}", input_shape=(6, 14, 14),
                               pre="conv2d: {out_channels: 6, kernel_size: 1}"),
    "conv_gather_first": around("conv2d: {out_channels: 5, kernel_size: [3, 4], padding: same, in_channels: 1}",
                                input_shape=(1, 8, 9), pre=None),
    # the last pixels of a gathered forward as dot products over taps (dot_tail): 4 pixels with
    # groups, padding, dilation and no bias (72 taps: the last 8 in a shifted vector); 3 pixels
    # and 32 taps (whole vectors; 12 of vsum16's 16 sums)
    "conv_dottail_groups": around("conv2d: {out_channels: 32, kernel_size: 3, padding: 1, dilation: [1, 2], "
                                  "groups: 2, bias: false}", input_shape=(16, 6, 8),
                                  pre="conv2d: {out_channels: 16, kernel_size: 1}"),
    "conv_dottail_exact": around("conv2d: {out_channels: 16, kernel_size: 4}", input_shape=(2, 8, 10),
                                 pre="conv2d: {out_channels: 2, kernel_size: 1}"),
    # the weight gradient from gathered pixel vectors too (>= 16 vectors of pixels): a cut last
    # vector of pixels with groups and a cut last block of taps; stride in x and the first layer
    "conv_gatherdw_tail_groups": around("conv2d: {out_channels: 6, kernel_size: 3, padding: 1, groups: 2}",
                                        input_shape=(4, 17, 18), pre="conv2d: {out_channels: 4, kernel_size: 1}"),
    "conv_gatherdw_first_stride": around("conv2d: {out_channels: 4, kernel_size: 4, stride: [1, 2], padding: 1, "
                                         "in_channels: 1}", input_shape=(1, 19, 32), pre=None),
    # Winograd F(2x2, 3x3) forward (3x3, stride 1, >= 16 channels in and out): an odd output with a
    # cut last tile; zero padding with channels that are not whole vectors and no bias; 'same'
    # padding with three vectors of output channels
    "conv_winograd": around("conv2d: {out_channels: 16, kernel_size: 3}", input_shape=(2, 7, 9),
                            pre="conv2d: {out_channels: 16, kernel_size: 1}"),
    "conv_winograd_pad_nobias": around("conv2d: {out_channels: 20, kernel_size: 3, padding: 1, bias: false}",
                                       input_shape=(2, 6, 6), pre="conv2d: {out_channels: 17, kernel_size: 1}"),
    "conv_winograd_same": around("conv2d: {out_channels: 48, kernel_size: 3, padding: same}",
                                 input_shape=(2, 8, 8), pre="conv2d: {out_channels: 16, kernel_size: 1}"),
    # explicit padding [top, bottom, left, right]: TensorFlow's 'SAME' for kernel 3, stride 2 on an
    # even input; lopsided pads over a gathered im2col; a Winograd convolution
    "conv_pad4_tf_same_stride2": around("conv2d: {out_channels: 3, kernel_size: 3, stride: 2, padding: [0, 1, 0, 1]}",
                                        input_shape=(2, 8, 8)),
    "conv_pad4_gather": around("conv2d: {out_channels: 4, kernel_size: [5, 3], padding: [2, 0, 3, 1]}",
                               input_shape=(2, 9, 12)),
    "conv_winograd_pad4": around("conv2d: {out_channels: 16, kernel_size: 3, padding: [1, 0, 0, 2]}",
                                 input_shape=(2, 7, 9), pre="conv2d: {out_channels: 16, kernel_size: 1}"),
    # ---- maxpool2d ------------------------------------------------------------------------
    "maxpool_k2": around("maxpool2d: {kernel_size: 2}"),
    "maxpool_k3_s2_p1": around("maxpool2d: {kernel_size: 3, stride: 2, padding: 1}"),
    "maxpool_dilation": around("maxpool2d: {kernel_size: [3, 2], stride: [1, 2], padding: 1, dilation: 2}"),
    "maxpool_pairs": around("maxpool2d: {kernel_size: [3, 2], stride: [2, 1], padding: [1, 0], dilation: [2, 1]}"),
    "maxpool_ceil": around("maxpool2d: {kernel_size: 3, stride: 2, ceil_mode: true}"),
    "maxpool_ceil_pad": around("maxpool2d: {kernel_size: 2, stride: 2, padding: 1, ceil_mode: true}"),
    "maxpool_ceil_dilation": around("maxpool2d: {kernel_size: 2, stride: 3, dilation: 2, ceil_mode: true}"),
    "maxpool_overlap_s1": around("maxpool2d: {kernel_size: 3, stride: 1, padding: 1}"),
    "maxpool_relu_ties": around(["relu", "maxpool2d: {kernel_size: 2}"]),
    "maxpool_first_layer": around("maxpool2d: {kernel_size: 2, padding: 1}", pre=None,
                                  head=["conv2d: {out_channels: 2, kernel_size: 2}", *HEAD]),
    "maxpool_last_mse": around("maxpool2d: {kernel_size: [2, 3]}", head=[], loss="mse"),
    # the tiled path (stride = kernel, no padding, dilation 1), vectorised over output columns:
    # blocks of 4 and 8 columns (the last one overlapping), a row and a column in no window
    # (floor) or cut short (ceil), kernel 3, non-square, a single window per row, ties
    "maxpool_tiled_k3": around("maxpool2d: {kernel_size: 3, stride: 3}", input_shape=(2, 9, 12)),
    "maxpool_tiled_floor_odd": around("maxpool2d: {kernel_size: 2}", input_shape=(2, 9, 11)),
    "maxpool_tiled_ceil_odd": around("maxpool2d: {kernel_size: 2, ceil_mode: true}", input_shape=(2, 9, 11)),
    "maxpool_tiled_nonsquare": around("maxpool2d: {kernel_size: [2, 3], ceil_mode: true}", input_shape=(2, 7, 13)),
    "maxpool_tiled_one_window": around("maxpool2d: {kernel_size: 2, ceil_mode: true}", input_shape=(1, 40, 3)),
    "maxpool_tiled_relu_ties": around(["relu", "maxpool2d: {kernel_size: 2}"], input_shape=(2, 6, 20)),
    # the tiled path in scalar code (rows of one window and a cut one); vectorised over
    # channels (small planes), with cut windows
    "maxpool_tiled_scalar": around("maxpool2d: {kernel_size: 3, ceil_mode: true}", input_shape=(2, 7, 5)),
    "maxpool_tiled_channels_ceil": around("maxpool2d: {kernel_size: 3, ceil_mode: true}", input_shape=(2, 4, 4),
                                          pre="conv2d: {out_channels: 6, kernel_size: 1}"),
    # not tiled: stride > kernel leaves gaps between the windows
    "maxpool_gaps": around("maxpool2d: {kernel_size: 2, stride: 3}", input_shape=(2, 8, 9)),
    # explicit padding [top, bottom, left, right] (-inf): TensorFlow's 'SAME' for 2x2 windows on an
    # odd input, and a lopsided one with dilation
    "maxpool_pad4_tf_same": around("maxpool2d: {kernel_size: 2, padding: [0, 1, 0, 1]}", input_shape=(2, 7, 7)),
    "maxpool_pad4_dilation": around("maxpool2d: {kernel_size: 3, stride: 2, padding: [1, 0, 0, 1], dilation: [1, 2]}",
                                    input_shape=(2, 8, 9)),
    # ---- avgpool2d ------------------------------------------------------------------------
    "avgpool_k2": around("avgpool2d: {kernel_size: 2}"),
    "avgpool_pad_incl": around("avgpool2d: {kernel_size: 3, stride: 2, padding: 1}"),
    "avgpool_pad_excl": around("avgpool2d: {kernel_size: 3, stride: 2, padding: 1, count_include_pad: false}"),
    "avgpool_ceil_pad_incl": around("avgpool2d: {kernel_size: [3, 2], stride: 2, padding: 1, ceil_mode: true, "
                                    "count_include_pad: true}"),
    "avgpool_ceil_pad_excl": around("avgpool2d: {kernel_size: [3, 2], stride: [2, 1], padding: 1, ceil_mode: true, "
                                    "count_include_pad: false}"),
    "avgpool_ceil_nopad": around("avgpool2d: {kernel_size: 3, stride: 2, ceil_mode: true}"),
    "avgpool_first_layer": around("avgpool2d: {kernel_size: [2, 3], stride: 1, padding: [1, 0]}", pre=None,
                                  head=["conv2d: {out_channels: 2, kernel_size: 2}", *HEAD]),
    # explicit padding: the divisor with (TensorFlow's 'SAME': count_include_pad false) and without
    # the padding zeros
    "avgpool_pad4_excl": around("avgpool2d: {kernel_size: 3, stride: 2, padding: [0, 1, 0, 1], "
                                "count_include_pad: false}", input_shape=(2, 8, 8)),
    "avgpool_pad4_incl": around("avgpool2d: {kernel_size: [3, 2], stride: [2, 1], padding: [1, 0, 0, 1]}"),
    # ---- adaptive_avgpool2d, global_avgpool2d ----------------------------------------------
    # uneven, overlapping bins (7 -> 3 rows: [0, 3), [2, 5), [4, 7)), even bins, more outputs than
    # inputs (6 -> 8 columns), the first layer; global means before and after other layers
    "adaptive_uneven": around("adaptive_avgpool2d: {output_size: [3, 4]}"),
    "adaptive_int_even": around("adaptive_avgpool2d: {output_size: 2}", input_shape=(2, 8, 6)),
    "adaptive_upscale_first": around("adaptive_avgpool2d: {output_size: [5, 8]}", pre=None,
                                     head=["conv2d: {out_channels: 2, kernel_size: 2}", *HEAD]),
    "global_avgpool": around(["global_avgpool2d", "flatten", "linear: {out_features: 4}"]),
    "global_avgpool_first_mse": spec([3, 5, 4], ["global_avgpool2d", "conv2d: {out_channels: 2, kernel_size: 1}"], "mse"),
    # ---- linear -----------------------------------------------------------------------------
    "linear_bias": spec([5], ["linear: {out_features: 4, in_features: 5}", "tanh", "linear: {out_features: 3}"]),
    "linear_nobias": spec([5], ["linear: {out_features: 4, bias: false}", "relu",
                                "linear: {out_features: 3, bias: false}"]),
    "linear_vector_widths": spec([32], ["linear: {out_features: 8}", "relu", "linear: {out_features: 16}",
                                        "linear: {out_features: 1}"], "mse"),
    "linear_after_conv_mse": around(["flatten", "linear: {out_features: 4}"], head=[], loss="mse"),
    # ---- activations --------------------------------------------------------------------------
    "relu": around(["relu", "conv2d: {out_channels: 2, kernel_size: 2}", "relu"]),
    "leaky_relu": around(["leaky_relu: {negative_slope: 0.2}", "flatten", "linear: {out_features: 4}",
                          "leaky_relu"], head=["linear: {out_features: 3}"]),
    "leaky_relu_negative_slope": around("leaky_relu: {negative_slope: -0.5}"),
    "gelu": around(["gelu: {approximate: none}", "flatten", "linear: {out_features: 4}",
                    "gelu: {approximate: tanh}", "linear: {out_features: 3}", "gelu"], head=[]),
    "tanh_sigmoid": around(["tanh", "flatten", "linear: {out_features: 4}", "sigmoid"],
                           head=["linear: {out_features: 3}"]),
    "activations_first_and_last_mse": spec([6], ["sigmoid", "linear: {out_features: 4}", "tanh"], "mse"),
    "activations_first_gelu_tanh": spec([2, 4, 4], ["gelu: {approximate: tanh}",
                                                    "conv2d: {out_channels: 2, kernel_size: 3}",
                                                    "leaky_relu", *HEAD]),
    # relu6 and hardswish: inputs around their kinks (0 and 6, -3 and 3) come from a wide first layer
    "relu6_hardswish": around(["relu6", "flatten", "linear: {out_features: 6}", "hardswish"],
                              head=["linear: {out_features: 3}"]),
    "silu": around(["silu", "conv2d: {out_channels: 2, kernel_size: 2}", "silu"]),
    "silu_hardswish_relu6_first_mse": spec([7], ["silu", "linear: {out_features: 5}", "relu6", "hardswish"],
                                           "mse"),
    # ---- batchnorm2d ------------------------------------------------------------------------
    # a ReLU between conv2d/linear and maxpool2d/linear is fused (plan.fused_relus): the layer
    # before stores max(0, y), the layer after masks its input gradient; every pool path
    # (general, tiled over columns, over channels, scalar), Winograd, a cut pixel block and a
    # partial vector of linear inputs
    "relu_fused_pool_general": around(["conv2d: {out_channels: 3, kernel_size: 2}", "relu",
                                       "maxpool2d: {kernel_size: 3, stride: 1, padding: 1}"], input_shape=(2, 7, 7)),
    "relu_fused_pool_columns": around(["conv2d: {out_channels: 2, kernel_size: 3, padding: 1}", "relu",
                                       "maxpool2d: {kernel_size: 2, ceil_mode: true}"], input_shape=(2, 9, 21)),
    "relu_fused_pool_channels": around(["conv2d: {out_channels: 6, kernel_size: 1}", "relu",
                                        "maxpool2d: {kernel_size: 3, ceil_mode: true}"], input_shape=(2, 4, 4)),
    "relu_fused_pool_scalar": around(["conv2d: {out_channels: 2, kernel_size: 1}", "relu",
                                      "maxpool2d: {kernel_size: 3, ceil_mode: true}"], input_shape=(2, 7, 5)),
    "relu_fused_winograd": around(["conv2d: {out_channels: 16, kernel_size: 3}", "relu", "maxpool2d: {kernel_size: 2}"],
                                  input_shape=(2, 7, 9), pre="conv2d: {out_channels: 16, kernel_size: 1}"),
    "relu_fused_linear_tail": spec([9], ["linear: {out_features: 40}", "relu", "linear: {out_features: 20}", "relu",
                                        "linear: {out_features: 3}"]),
    "batchnorm": around(["batchnorm2d", "relu"]),
    "batchnorm_eps_momentum": around("batchnorm2d: {eps: 0.001, momentum: 0.3}"),
    "batchnorm_first_layer": around("batchnorm2d", pre=None,
                                    head=["conv2d: {out_channels: 2, kernel_size: 3}", *HEAD]),
    "batchnorm_1x1_maps": around(["conv2d: {out_channels: 4, kernel_size: [7, 6]}", "batchnorm2d"]),
    "batchnorm_twice_momentum_0_1": around(["batchnorm2d: {momentum: 0.0}", "batchnorm2d: {momentum: 1.0}",
                                            "maxpool2d: {kernel_size: 2}"]),
    "batchnorm_last_mse": around(["conv2d: {out_channels: 2, kernel_size: 3}", "batchnorm2d"], head=[],
                                 loss="mse"),
    # split (plan.py, split_layers): between two per-sample stages its passes run in their
    # loops, per sample; the cases above sit next to a batch-level or a ranged stage (linear)
    "batchnorm_split_relu": around(["batchnorm2d", "relu", "conv2d: {out_channels: 2, kernel_size: 1}"]),
    "batchnorm_split_eps_momentum": around(["batchnorm2d: {eps: 0.001, momentum: 0.3}",
                                            "conv2d: {out_channels: 2, kernel_size: 3}"]),
    "batchnorm_split_1x1_maps": around(["conv2d: {out_channels: 4, kernel_size: [7, 6]}", "batchnorm2d",
                                        "conv2d: {out_channels: 2, kernel_size: 1}"]),
    "batchnorm_split_one_channel": around(["conv2d: {out_channels: 1, kernel_size: 3}", "batchnorm2d", "relu",
                                           "conv2d: {out_channels: 2, kernel_size: 1}"]),
    # no trainable parameter before it: no input gradient, so no per-sample dx pass
    "batchnorm_split_no_input_grad": around(["batchnorm2d", "relu", "conv2d: {out_channels: 2, kernel_size: 1}"],
                                            pre="maxpool2d: {kernel_size: 2, ceil_mode: true}"),
    # ---- batchnorm1d --------------------------------------------------------------------------
    "batchnorm1d": spec([5], ["linear: {out_features: 6}", "batchnorm1d", "relu", "linear: {out_features: 3}"]),
    "batchnorm1d_eps_momentum_after_pool": around(["relu", "global_avgpool2d", "flatten",
                                                   "batchnorm1d: {eps: 0.01, momentum: 0.4}"]),
    "batchnorm1d_first_last_mse": spec([4], ["batchnorm1d: {momentum: 0.0}", "linear: {out_features: 3}",
                                             "batchnorm1d: {momentum: 1.0}"], "mse"),
    # ---- dropout ----------------------------------------------------------------------------
    "dropout_conv": around(["dropout: {p: 0.3}", "conv2d: {out_channels: 2, kernel_size: 2}"]),
    "dropout_default_two": around(["relu", "flatten", "dropout", "linear: {out_features: 5}", "dropout: {p: 0.25}"],
                                  head=["linear: {out_features: 3}"]),
    "dropout_first_layer": spec([8], ["dropout: {p: 0.2}", "linear: {out_features: 3}"]),
    "dropout_last_mse": spec([6], ["linear: {out_features: 5}", "dropout: {p: 0.4}"], "mse"),
    "dropout_p0": spec([6], ["linear: {out_features: 5}", "dropout: {p: 0.0}", "linear: {out_features: 3}"]),
    "batchnorm_dropout": around(["batchnorm2d", "dropout: {p: 0.5}"]),
    # ---- upsample ----------------------------------------------------------------------------
    "upsample_2": around(["upsample: {scale_factor: 2}", "conv2d: {out_channels: 2, kernel_size: 3, padding: 1}"]),
    "upsample_pair_mode_first": around("upsample: {scale_factor: [1, 3], mode: nearest}", pre=None,
                                       head=["conv2d: {out_channels: 2, kernel_size: 2}", *HEAD]),
    "upsample_last_mse": around("upsample: {scale_factor: [3, 2]}", head=[], loss="mse"),
    # ---- flatten and losses ---------------------------------------------------------------------
    "flatten_first_layer": spec([2, 3, 3], ["flatten", "linear: {out_features: 3}"]),
    "flatten_twice": around(["flatten", "flatten"], head=["linear: {out_features: 3}"]),
    "flatten_last_ce": around("conv2d: {out_channels: 4, kernel_size: [7, 6]}", head=["flatten"]),
    # binary cross-entropy on logits: a 3-D output (an autoencoder's image), a 1-D multi-label one
    "bce_image_output": around(["upsample: {scale_factor: 2}", "conv2d: {out_channels: 1, kernel_size: 3, "
                                "padding: 1}"], head=[], loss="binary_cross_entropy"),
    "bce_multilabel": spec([6], ["linear: {out_features: 5}", "silu", "linear: {out_features: 4}"],
                           "binary_cross_entropy"),
    "flatten_1d_mse": spec([5], ["flatten", "linear: {out_features: 2}", "flatten"], "mse"),
    # ---- graphs: add, concat, tensors with several readers ---------------------------------------
    # a residual block: x read by the branch and the add; the ReLU after the add is fused (the add
    # stores max(0, y), the max-pool masks its gradient)
    "graph_residual_fused_relu": around(["conv2d: {name: x, out_channels: 3, kernel_size: 3, padding: 1}",
                                         "conv2d: {out_channels: 3, kernel_size: 3, padding: 1, bias: false}",
                                         "batchnorm2d: {name: bn}", "add: {inputs: [bn, x]}", "relu",
                                         "maxpool2d: {kernel_size: 2}"]),
    # ReLUs fused into the layer before them alone (batch norm, add: their backward masks their
    # own output gradient): r read by three layers (two convolutions and an add), r2 after the
    # add by two (a convolution and an add), the last ReLU's by flatten, which masks nothing
    "graph_relu_self_masked_fanout": around(["conv2d: {name: a, out_channels: 4, kernel_size: 3, padding: 1}",
                                             "batchnorm2d: {name: bn}", "relu: {name: r}",
                                             "conv2d: {name: b, out_channels: 4, kernel_size: 3, padding: 1}",
                                             "conv2d: {name: c, out_channels: 4, kernel_size: 1, inputs: [r]}",
                                             "add: {name: s, inputs: [b, c, r]}", "relu: {name: r2}",
                                             "conv2d: {name: d, out_channels: 4, kernel_size: 1}",
                                             "add: {name: t, inputs: [d, r2]}", "relu: {name: r3}"]),
    # 1-D: batchnorm1d's ReLU read by two linear layers (so not the one reader masking it)
    "graph_bn1d_relu_two_readers": spec([5], ["linear: {name: x, out_features: 6}", "batchnorm1d: {name: bn}",
                                              "relu: {name: r}", "linear: {name: p, out_features: 4}",
                                              "linear: {name: q, out_features: 4, inputs: [r]}",
                                              "add: {inputs: [p, q]}", "linear: {out_features: 3}"]),
    # 1-D: a ReLU fused between two linear layers inside the branch, three inputs to one add
    "graph_add_three_1d": spec([6], ["linear: {name: x, out_features: 5}", "linear: {name: h, out_features: 5}",
                                     "relu", "linear: {name: y, out_features: 5}", "add: {inputs: [y, x, h]}",
                                     "linear: {out_features: 3}"]),
    # x read by three layers: a convolution (stores its gradient), a second one (into a slot then
    # added), and the add (adds)
    "graph_three_readers": around(["conv2d: {name: x, out_channels: 3, kernel_size: 1}",
                                   "conv2d: {name: p, out_channels: 3, kernel_size: 3, padding: 1, inputs: [x]}",
                                   "conv2d: {name: q, out_channels: 3, kernel_size: 1, inputs: [x]}",
                                   "add: {inputs: [p, q, x]}"], pre=None),
    # two readers that both store (linear layers, batch-level in training): one adds from a slot
    "graph_two_readers_linear": spec([6], ["linear: {name: x, out_features: 4}",
                                           "linear: {name: p, out_features: 3, inputs: [x]}",
                                           "linear: {name: q, out_features: 3, inputs: [x]}",
                                           "add: {inputs: [p, q]}", "linear: {out_features: 3}"]),
    # the same tensor twice in one add
    "graph_add_same_twice": around(["conv2d: {name: x, out_channels: 2, kernel_size: 3}", "add: {inputs: [x, x]}"]),
    # concat along channels: two convolutions written in place, the network input copied; the
    # first part is also read by a later layer (so it is copied too)
    "graph_concat_3d": around(["conv2d: {name: a, out_channels: 2, kernel_size: 3, padding: 1, inputs: [input]}",
                               "conv2d: {name: b, out_channels: 3, kernel_size: 1, inputs: [input]}",
                               "concat: {name: cat, inputs: [a, input, b]}", "batchnorm2d",
                               "conv2d: {name: c, out_channels: 2, kernel_size: 1, inputs: [b]}",
                               "concat: {inputs: [c, bn1]}"], pre=None),
    # concat of a concat (DenseNet-like growth): views of views
    "graph_concat_nested": around(["conv2d: {name: a, out_channels: 2, kernel_size: 1}",
                                   "conv2d: {name: b, out_channels: 2, kernel_size: 3, padding: 1}",
                                   "concat: {name: ab, inputs: [a, b]}",
                                   "conv2d: {name: c, out_channels: 3, kernel_size: 3, padding: 1}",
                                   "concat: {inputs: [ab, c]}"]),
    # concat of 1-D features: a linear layer's output and a flatten view
    "graph_concat_1d": spec([2, 3, 3], ["conv2d: {name: x, out_channels: 2, kernel_size: 2}", "flatten",
                                        "linear: {name: h, out_features: 4}", "relu",
                                        "concat: {inputs: [relu1, flatten1, h]}", "linear: {out_features: 3}"]),
}


# ---- conv2d kernel paths (layers/conv2d.py CONV_PATHS), each forced on the shape classes it
# applies to: case -> {layer: path}.  The layer under test is conv2 (conv1 is the layer before
# it), or conv1 when it reads the network input (no input gradient).
KERNELS: dict[str, dict[str, str]] = {}


def _forced(case: str, path: str, layer, input_shape, pre=PRE_CONV, target: str = "conv2", **kw) -> None:
    CASES[case] = around(layer, input_shape, pre, **kw)
    KERNELS[case] = {target: path}


def _pre(channels: int) -> str:
    return f"conv2d: {{out_channels: {channels}, kernel_size: 1}}"


# pointwise: 2 vectors of pixels per tile and a cut last vector (35 pixels); whole tiles only, no
# bias; a single vector after the tiles (48); exactly one vector (16); the first layer; a fused
# ReLU; a prime channel count (one channel per tile) over 12 inputs; and the GEMM paths on its shape
_forced("kpath_pointwise_tail", "pointwise", "conv2d: {out_channels: 5, kernel_size: 1}", (3, 5, 7))
_forced("kpath_pointwise_exact_nobias", "pointwise", "conv2d: {out_channels: 8, kernel_size: 1, bias: false}",
        (2, 4, 8))
_forced("kpath_pointwise_single_vectors", "pointwise", "conv2d: {out_channels: 3, kernel_size: 1}", (2, 6, 8))
_forced("kpath_pointwise_one_vector", "pointwise", "conv2d: {out_channels: 4, kernel_size: 1}", (2, 4, 4))
_forced("kpath_pointwise_first", "pointwise", "conv2d: {out_channels: 4, kernel_size: 1, in_channels: 2}",
        (2, 5, 5), pre=None, target="conv1")
_forced("kpath_pointwise_relu_fused", "pointwise", ["conv2d: {out_channels: 4, kernel_size: 1}", "relu",
                                                    "maxpool2d: {kernel_size: 2}"], (2, 6, 6))
_forced("kpath_pointwise_prime", "pointwise", "conv2d: {out_channels: 17, kernel_size: 1}", (12, 5, 4),
        pre=_pre(12))
# 16 pixels (one vector, no tail) with several blocks of channels and no bias; a tail of one pixel
# (17 = 16 + 1), also on the im2col path
_forced("kpath_pointwise_one_vector_blocks", "pointwise",
        "conv2d: {out_channels: 16, kernel_size: 1, bias: false}", (8, 4, 4), pre=_pre(8))
# two blocks of 12 channels (the widest forward tile) over 35 pixels
_forced("kpath_pointwise_blocks_of_12", "pointwise", "conv2d: {out_channels: 24, kernel_size: 1}", (3, 5, 7))
_forced("kpath_pointwise_tail_one", "pointwise", "conv2d: {out_channels: 4, kernel_size: 1}", (2, 1, 17))
_forced("kpath_pointwise_tail_one_as_im2col", "im2col", "conv2d: {out_channels: 4, kernel_size: 1}", (2, 1, 17))
_forced("kpath_pointwise_as_gather", "gather", "conv2d: {out_channels: 5, kernel_size: 1}", (3, 5, 7))
_forced("kpath_pointwise_as_im2col", "im2col", "conv2d: {out_channels: 5, kernel_size: 1}", (3, 5, 7))
# depthwise: stride 1 with rows shorter than a vector; a whole vector and a cut one per row (20);
# whole vectors only, no bias; stride 2 on odd sizes (output rows of 18, input rows of 35);
# stride 2 on even sizes; the first layer; a fused ReLU; and the GEMM paths on its shapes
_forced("kpath_depthwise_s1_short", "depthwise", "conv2d: {out_channels: 3, kernel_size: 3, padding: 1, groups: 3}",
        (3, 7, 6))
_forced("kpath_depthwise_s1_tail", "depthwise", "conv2d: {out_channels: 4, kernel_size: 3, padding: 1, groups: 4}",
        (4, 5, 20), pre=_pre(4))
_forced("kpath_depthwise_s1_exact_nobias", "depthwise",
        "conv2d: {out_channels: 2, kernel_size: 3, padding: 1, groups: 2, bias: false}", (2, 3, 16), pre=_pre(2))
_forced("kpath_depthwise_s2_odd", "depthwise",
        "conv2d: {out_channels: 3, kernel_size: 3, stride: 2, padding: 1, groups: 3}", (3, 9, 35))
_forced("kpath_depthwise_s2_even", "depthwise",
        "conv2d: {out_channels: 5, kernel_size: 3, stride: 2, padding: 1, groups: 5}", (5, 8, 8), pre=_pre(5))
_forced("kpath_depthwise_first", "depthwise",
        "conv2d: {out_channels: 2, kernel_size: 3, stride: 2, padding: 1, groups: 2, in_channels: 2}", (2, 6, 7),
        pre=None, target="conv1")
_forced("kpath_depthwise_relu_fused", "depthwise",
        ["conv2d: {out_channels: 3, kernel_size: 3, padding: 1, groups: 3}", "relu", "maxpool2d: {kernel_size: 2}"],
        (3, 6, 6))
# one output pixel per channel (stride 2 on 2x2), one input row (rows of 17: one vector and a tail of one)
_forced("kpath_depthwise_one_pixel", "depthwise",
        "conv2d: {out_channels: 3, kernel_size: 3, stride: 2, padding: 1, groups: 3}", (3, 2, 2))
_forced("kpath_depthwise_one_row", "depthwise",
        "conv2d: {out_channels: 3, kernel_size: 3, padding: 1, groups: 3}", (3, 1, 17))
# rows of WP = 10 and 6 pixels run as one flat run of vectors across rows (8x8: 78 outputs, 4x4: 22)
_forced("kpath_depthwise_s1_flat_8x8", "depthwise",
        "conv2d: {out_channels: 5, kernel_size: 3, padding: 1, groups: 5}", (5, 8, 8), pre=_pre(5))
_forced("kpath_depthwise_s1_flat_4x4", "depthwise",
        "conv2d: {out_channels: 6, kernel_size: 3, padding: 1, groups: 6}", (6, 4, 4), pre=_pre(6))
_forced("kpath_depthwise_one_pixel_as_im2col", "im2col",
        "conv2d: {out_channels: 3, kernel_size: 3, stride: 2, padding: 1, groups: 3}", (3, 2, 2))
_forced("kpath_depthwise_as_im2col", "im2col",
        "conv2d: {out_channels: 3, kernel_size: 3, padding: 1, groups: 3}", (3, 7, 6))
_forced("kpath_depthwise_as_gather", "gather",
        "conv2d: {out_channels: 4, kernel_size: 3, padding: 1, groups: 4}", (4, 5, 20), pre=_pre(4))
# a batch norm folded into the evaluation forward of the convolution before it (plan.py, eval_folds),
# with the ReLU after it: pointwise with a cut last vector, with a bias and no ReLU, one output
# channel; depthwise stride 2 on odd sizes, stride 1 with a tail and no bias, one channel (groups 1);
# a batch norm with two readers (folded, the ReLU not); Winograd with whole vectors of pixels
# and a scalar tail (rows of 20), with a cut vector of channels (20) and rows of 17, with no bias
# and only scalar stores (rows of 5); a 3x3 GEMM path (no fold)
BN_RELU = ["batchnorm2d", "relu"]
_forced("fold_pointwise_bn_relu", "pointwise", ["conv2d: {out_channels: 5, kernel_size: 1, bias: false}", *BN_RELU],
        (3, 5, 7))
_forced("fold_pointwise_bias_bn", "pointwise", ["conv2d: {out_channels: 5, kernel_size: 1}", "batchnorm2d"],
        (3, 5, 7))
_forced("fold_pointwise_one_channel", "pointwise",
        ["conv2d: {out_channels: 1, kernel_size: 1, bias: false}", *BN_RELU], (2, 4, 5))
_forced("fold_depthwise_s2_bn_relu", "depthwise",
        ["conv2d: {out_channels: 3, kernel_size: 3, stride: 2, padding: 1, groups: 3, bias: false}", *BN_RELU],
        (3, 7, 33))
_forced("fold_depthwise_s1_tail", "depthwise",
        ["conv2d: {out_channels: 4, kernel_size: 3, padding: 1, groups: 4}", *BN_RELU], (4, 5, 20), pre=_pre(4))
_forced("fold_depthwise_s1_flat_4x4", "depthwise",
        ["conv2d: {out_channels: 6, kernel_size: 3, padding: 1, groups: 6}", *BN_RELU], (6, 4, 4), pre=_pre(6))
_forced("fold_depthwise_one_channel", "depthwise",
        ["conv2d: {out_channels: 1, kernel_size: 3, padding: 1, bias: false}", *BN_RELU], (1, 6, 7),
        pre="conv2d: {out_channels: 1, kernel_size: 1}")
_forced("fold_bn_two_readers", "pointwise",
        ["conv2d: {out_channels: 3, kernel_size: 1, bias: false}", "batchnorm2d: {name: bn}", "relu",
         "add: {inputs: [relu1, bn]}"], (2, 5, 7))
_forced("fold_winograd_bn_relu", "winograd_dw_dx",
        ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", *BN_RELU], (2, 5, 20), pre=_pre(16))
_forced("fold_winograd_dx_cut_channels", "winograd_dx",
        ["conv2d: {out_channels: 20, kernel_size: 3, padding: 1}", *BN_RELU], (2, 4, 17), pre=_pre(16))
_forced("fold_winograd_nobias_bn", "winograd",
        ["conv2d: {out_channels: 20, kernel_size: 3, bias: false}", "batchnorm2d"], (2, 6, 7), pre=_pre(16))
_forced("fold_not_on_gemm", "gather", ["conv2d: {out_channels: 4, kernel_size: 3, padding: 1}", *BN_RELU],
        (2, 6, 6))
# a 1x1 convolution whose training runs a GEMM path (gather, the cheapest forward and backward on
# 16 -> 24 channels of 6x6) evaluates on the pointwise path: with a batch norm and ReLU folded in,
# and alone with a fused ReLU
CASES["evalpath_pointwise_bn_relu"] = around(["conv2d: {out_channels: 24, kernel_size: 1, bias: false}", *BN_RELU],
                                             (2, 6, 6), pre=_pre(16))
CASES["evalpath_pointwise_relu_pool"] = around(["conv2d: {out_channels: 24, kernel_size: 1}", "relu",
                                                "maxpool2d: {kernel_size: 2}"], (2, 6, 6), pre=_pre(16))
# the folds each case makes: conv layer -> (batch norm, ReLU or None)
FOLDS = {"evalpath_pointwise_bn_relu": {"conv2": ("bn1", "relu1")},"fold_pointwise_bn_relu": {"conv2": ("bn1", "relu1")}, "fold_pointwise_bias_bn": {"conv2": ("bn1", None)},
         "fold_pointwise_one_channel": {"conv2": ("bn1", "relu1")},
         "fold_depthwise_s2_bn_relu": {"conv2": ("bn1", "relu1")},
         "fold_depthwise_s1_tail": {"conv2": ("bn1", "relu1")}, "fold_depthwise_s1_flat_4x4": {"conv2": ("bn1", "relu1")},
         "fold_depthwise_one_channel": {"conv2": ("bn1", "relu1")}, "fold_bn_two_readers": {"conv2": ("bn", None)},
         "fold_winograd_bn_relu": {"conv2": ("bn1", "relu1")},
         "fold_winograd_dx_cut_channels": {"conv2": ("bn1", "relu1")},
         "fold_winograd_nobias_bn": {"conv2": ("bn1", None)},
         "fold_not_on_gemm": {}}
# the GEMM paths on a Winograd shape (16 channels in and out, 3x3, stride 1)
_forced("kpath_winograd_as_gather", "gather", "conv2d: {out_channels: 16, kernel_size: 3}", (2, 7, 9), pre=_pre(16))
_forced("kpath_winograd_as_im2col", "im2col", "conv2d: {out_channels: 16, kernel_size: 3}", (2, 7, 9), pre=_pre(16))
# im2row from vectors of an output row's pixels, transposed (stride 1, rows of 16 or more): 9
# whole vectors of taps and a cut last vector of pixels; groups and lopsided padding with a cut
# vector of taps (27 = 16 + 11) and two vectors of pixels and a tail
_forced("kpath_im2row_vectors", "im2col", "conv2d: {out_channels: 5, kernel_size: 3, padding: 1}", (16, 3, 20),
        pre=_pre(16))
_forced("kpath_im2row_vectors_groups", "im2col",
        "conv2d: {out_channels: 4, kernel_size: 3, groups: 2, padding: [1, 0, 2, 1]}", (6, 4, 33), pre=_pre(6))
# winograd_dx (the input gradient as a Winograd convolution too; padding 1): three vectors of
# output channels on an even size; odd sizes with cut last tiles, channels that are not whole
# vectors (17 in, 20 out) and no bias; one row of pixels; a fused ReLU; a residual block (the
# input gradient summed with the skip path's); and the GEMM backward on its shape
_forced("kpath_winograd_dx", "winograd_dx", "conv2d: {out_channels: 48, kernel_size: 3, padding: 1}", (2, 8, 8),
        pre=_pre(16))
_forced("kpath_winograd_dx_odd_nobias", "winograd_dx",
        "conv2d: {out_channels: 20, kernel_size: 3, padding: 1, bias: false}", (2, 7, 9), pre=_pre(17))
_forced("kpath_winograd_dx_one_row", "winograd_dx", "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        (2, 1, 5), pre=_pre(33))
_forced("kpath_winograd_dx_relu_fused", "winograd_dx",
        ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", "relu", "maxpool2d: {kernel_size: 2}"],
        (2, 6, 10), pre=_pre(16))
_forced("kpath_winograd_dx_residual", "winograd_dx",
        ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", "add: {inputs: [conv2, conv1]}", "relu"],
        (2, 5, 6), pre=_pre(16))
_forced("kpath_winograd_dx_rows16", "winograd_dx", "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        (2, 2, 16), pre=_pre(16))
_forced("kpath_winograd_dx_wide_relu", "winograd_dx",
        ["conv2d: {out_channels: 20, kernel_size: 3, padding: 1}", "relu", "maxpool2d: {kernel_size: 2}"],
        (2, 4, 18), pre=_pre(17))
_forced("kpath_winograd_dx_as_winograd", "winograd", "conv2d: {out_channels: 20, kernel_size: 3, padding: 1}",
        (2, 7, 9), pre=_pre(17))
# winograd_dw and winograd_dw_dx (the weight gradient as Winograd's transposed): with the GEMM
# input gradient, three vectors of output channels (a tile of 8 input channels x 3 vectors);
# odd sizes, lopsided padding, channels that are not whole vectors and no bias; the first layer
# (no input gradient); 64 channels (4 x 4 vectors); with the Winograd input gradient too: odd
# sizes, one row, a fused ReLU over rows of 16 or more pixels (whole-vector copies), a residual
# block, and a tail of output channels after a whole vector (17 -> 20)
_forced("kpath_winograd_dw", "winograd_dw", "conv2d: {out_channels: 48, kernel_size: 3, padding: 1}", (2, 8, 8),
        pre=_pre(16))
_forced("kpath_winograd_dw_odd_pad4", "winograd_dw",
        "conv2d: {out_channels: 20, kernel_size: 3, padding: [1, 0, 2, 1], bias: false}", (2, 7, 9), pre=_pre(17))
_forced("kpath_winograd_dw_first", "winograd_dw", "conv2d: {out_channels: 16, kernel_size: 3, in_channels: 16}",
        (16, 5, 7), pre=None, target="conv1")
_forced("kpath_winograd_dw_64", "winograd_dw", "conv2d: {out_channels: 64, kernel_size: 3, padding: 1}", (2, 6, 5),
        pre=_pre(64))
_forced("kpath_winograd_dw_dx_odd_nobias", "winograd_dw_dx",
        "conv2d: {out_channels: 20, kernel_size: 3, padding: 1, bias: false}", (2, 7, 9), pre=_pre(17))
_forced("kpath_winograd_dw_dx_one_row", "winograd_dw_dx", "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        (2, 1, 5), pre=_pre(33))
_forced("kpath_winograd_dw_dx_wide_relu", "winograd_dw_dx",
        ["conv2d: {out_channels: 20, kernel_size: 3, padding: 1}", "relu", "maxpool2d: {kernel_size: 2}"],
        (2, 4, 18), pre=_pre(17))
# one tile column (outputs 2 wide), 9 tiles in GEMM blocks of 5: the Winograd blocks (conv2d.py
# winograd_blocking) of the forward and of the input gradient, the last one partial
_forced("kpath_winograd_dw_dx_one_column", "winograd_dw_dx", "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        (2, 18, 2), pre=_pre(16))
_forced("kpath_winograd_dw_dx_residual", "winograd_dw_dx",
        ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1}", "add: {inputs: [conv2, conv1]}", "relu"],
        (2, 5, 6), pre=_pre(16))


def _covered() -> tuple[dict[str, set[str]], dict[tuple[str, str], list], set[str]]:
    """kind -> options set explicitly; (kind, option) -> values used (OMITTED when a case
    leaves the option at its default); the losses used."""
    import yaml

    instances: dict[str, list[dict]] = defaultdict(list)
    losses = set()
    for text in CASES.values():
        losses.add(yaml.safe_load(text)["loss"])
        for kind, opts in raw_layers(text):
            instances[kind].append(opts)
    options = {kind: set().union(*map(set, insts)) for kind, insts in instances.items()}
    values = {(kind, k): [o.get(k, OMITTED) for o in insts] for kind, insts in instances.items() for k in options[kind]}
    return options, values, losses


OMITTED = "<default>"
COVERED, COVERED_VALUES, COVERED_LOSSES = _covered()
IDS = list(CASES)


@pytest.fixture(scope="module", autouse=True)
def _prebuild_all():
    prebuild([(t, d, KERNELS.get(c)) for c, t in CASES.items() for d in ("float64", "float32")])


def prepared(case: str, dtype: str = "float64", threads: int = 1, vec: int | None = None):
    """The case's net (its kernel paths forced as KERNELS says, vectors of `vec` reals) with
    random batch-norm statistics, and a random batch."""
    net = build(CASES[case], dtype, threads, kernels=KERNELS.get(case), vec=vec)
    rng = np.random.default_rng(sum(map(ord, case)))
    net.init(int(rng.integers(1000)))
    randomize_batchnorm(net, rng)
    x, y = random_batch(net, BATCH, rng)
    return net, x, y


def _atol(grads: dict, rtol: float) -> float:
    """An absolute floor for tensors whose exact gradient is ~0 (a bias before batch norm)."""
    return rtol * 1e-2 * max(float(np.max(np.abs(g))) for g in grads.values())


WINOGRAD_CASES = [c for c in IDS if "winograd" in c]


@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_winograd_cases_run_winograd(case):
    """The cases above exercise the Winograd forward of the layer under test (by default, or
    forced to a Winograd path; those forced to a GEMM path run Winograd by default), and the
    Winograd gradients their paths name: the weight gradient (winograd_dw*) and the input
    gradient (*_dx; it needs padding 1: "conv_winograd_pad4" has other padding,
    "conv_winograd" none).  The defaults are the cheapest by the table's costs."""
    net = check_text(CASES[case])
    forced = KERNELS.get(case, {})
    target = next(iter(forced), "conv2")
    wino = all(p.startswith("winograd") for p in forced.values())
    if wino:
        net = force_kernels(net, forced)
    plan = make_plan(net)
    convs = [lp for lp in plan.layers if lp.kind == "conv2d"]
    assert [lp.c.get("WINO", False) for lp in convs] == [lp.layer.name == target for lp in convs]
    source = render(net, "float32").source
    assert f"{target}_winograd_gemm(" in source
    path = next(lp.kernel.path.name for lp in convs if lp.layer.name == target)
    dx, dw = path in WINOGRAD_DX_PATHS, path in WINOGRAD_DW_PATHS
    assert (f"{target}_winograd_dx_gemm(" in source) == dx and (f"{target}_winograd_dw_gemm(" in source) == dw
    if forced and wino:
        assert path == forced[target]
    else:  # 17 channels in, padded to 32, make the Winograd weight gradient's GEMM the dearer one
        assert path == {"conv_winograd_pad_nobias": "winograd_dx", "conv_winograd_same": "winograd_dw_dx"}.get(
            case, "winograd_dw"), path


@pytest.mark.parametrize("case, tile", [("kpath_winograd_dw", (8, 3)), ("kpath_winograd_dw_odd_pad4", (8, 2)),
                                        ("kpath_winograd_dw_first", (16, 1)), ("kpath_winograd_dw_64", (4, 4))])
def test_winograd_dw_register_tiles(case, tile):
    """The Winograd weight gradient's GEMM tile (input channels x vectors of output channels):
    the most FMAs per load that fits, over channels padded to vectors (17 -> 32)."""
    net = force_kernels(check_text(CASES[case]), KERNELS[case])
    lp = next(lp for lp in make_plan(net).layers if lp.layer.name in KERNELS[case])
    assert (lp.c["DW_IB"], lp.c["DW_CB"]) == tile


@pytest.mark.parametrize("case, vectors", [("kpath_im2row_vectors", (144, 16)), ("kpath_im2row_vectors_groups", (16, 32)),
                                           ("kpath_winograd_dx_rows16", (144, 16)), ("relu_fused_pool_columns", (16, 16))])
def test_im2row_vector_cases_transpose(case, vectors):
    """The cases above build the weight gradient's rows of taps from vectors of (taps, pixels) of
    an output row, transposed (vtranspose16); output rows under 16 pixels keep the scalar copy."""
    net = check_text(CASES[case])
    net = force_kernels(net, KERNELS[case]) if case in KERNELS else net
    lp = [lp for lp in make_plan(net).layers if lp.kind == "conv2d"][-1]
    assert lp.c["IM2ROW_VEC"] and (lp.c["K_VFULL"], lp.c["OW_FULL"]) == vectors
    assert "vtranspose16(r);" in render(net, "float32").source
    small = [lp for lp in make_plan(check_text(CASES["conv_basic"])).layers if lp.kind == "conv2d"][-1]
    assert not small.c["IM2ROW_VEC"] and small.c["OW"] < 16


def test_winograd_copies_transpose_whole_vectors():
    """Rows of 16 or more pixels go between the planes and channels last in 16 x 16 transposes:
    "kpath_winograd_dx_wide_relu" has 16 of its 18 columns and 16 of its 17 input and 20 output
    channels in whole vectors (the rest one by one), forward and input gradient alike."""
    case = "kpath_winograd_dx_wide_relu"
    net = force_kernels(check_text(CASES[case]), KERNELS[case])
    c = [lp for lp in make_plan(net).layers if lp.kind == "conv2d"][-1].c
    x = c["WGX"]
    assert (c["WG_IN_WFULL"], c["WG_OUT_WFULL"], c["WG_CIN_FULL"], c["WG_COUT_FULL"]) == (16, 16, 16, 16)
    assert (x["CIN"], x["COUT"], x["WG_IN_WFULL"], x["WG_OUT_WFULL"]) == (20, 17, 16, 16)
    source = render(net, "float32").source
    assert source.count("vtranspose16(r);") >= 8  # 2 channel blocks each way, forward and input gradient
    small = [lp for lp in make_plan(check_text(CASES["conv_winograd_same"])).layers if lp.kind == "conv2d"][-1].c
    assert small["WG_IN_WFULL"] == small["WG_OUT_WFULL"] == 0  # 8 columns


@pytest.mark.parametrize("case, tile", [("conv_gather_pad", (6, 1)), ("conv_gather_dilated_groups", (2, 2)),
                                        ("conv_gather_stride", (3, 1)), ("conv_gather_two_vectors", (4, 2)),
                                        ("conv_gather_16ch", (16, 1)), ("conv_gather_first", (5, 1)),
                                        ("conv_gatherdw_tail_groups", (3, 2)),
                                        ("conv_gatherdw_first_stride", (4, 2))])
def test_gather_cases_gather(case, tile):
    """The cases above run the layer under test with im2col on the fly, in the register tile
    (channels, pixel vectors) named, and the "gatherdw" ones, with 16 or more vectors of
    pixels, the weight gradient too (tiles of channels x taps: 3 x 8 with a tail of 2 taps and
    of 2 pixels, 4 x 6 with a tail of 4 taps); the small cases keep the im2col buffer."""
    plan = make_plan(check_text(CASES[case]))
    lp = [lp for lp in plan.layers if lp.kind == "conv2d"][-1]
    assert lp.c["GATHER"] and (lp.c["MB"], lp.c["NV"]) == tile
    assert lp.c["GATHER_DW"] == ("gatherdw" in case or case == "conv_gather_two_vectors")
    if "gatherdw" in case:
        expect = {"conv_gatherdw_tail_groups": (3, 8, 2, 306 % 16), "conv_gatherdw_first_stride": (4, 6, 4, 0)}
        assert (lp.c["DWG_MB"], lp.c["DWG_KB"], lp.c["DWG_K_TAIL"], lp.c["N"] % 16) == expect[case]
    source = render(plan.net, "float32").source
    assert re.search(r"vgather2\(xs\[(j|0)\] \+ tap", source)  # [0]: one vector of pixels, no loop over j
    assert (f"{lp.name}_taps[" in source) == lp.c["GATHER_DW"]
    for small in ("conv_basic", "conv_stride2_pad1", "conv_depthwise", "conv_dilation_stride"):
        assert not [lp for lp in make_plan(check_text(CASES[small])).layers if lp.kind == "conv2d"][-1].c["GATHER"]


@pytest.mark.parametrize("case, tail", [("conv_dottail_groups", (4, 4, 72, 8)), ("conv_dottail_exact", (3, 4, 32, 0)),
                                        ("conv_gather_16ch", (4, 4, 150, 10))])
def test_dottail_cases_take_dot_tail(case, tail):
    """The cases above compute their last (pixels, of which) in dot products of (channels) at a
    time over (taps), the last (shift) lanes of the last vector zero; the other gathered cases
    keep a vector of pixels for their tail (few channels, few taps or no tail)."""
    plan = make_plan(check_text(CASES[case]))
    c = [lp for lp in plan.layers if lp.kind == "conv2d"][-1].c
    assert c["GATHER"] and c["DOT_TAIL"]
    assert (c["TAIL_R"], c["TAIL_OB"], c["K"], c["TAIL_SHIFT"]) == tail
    assert "_forward_tail(" in render(plan.net, "float32").source
    for other in ("conv_gather_pad", "conv_gather_stride", "conv_gather_two_vectors", "conv_gather_first",
                  "conv_gatherdw_tail_groups"):
        assert not [lp for lp in make_plan(check_text(CASES[other])).layers if lp.kind == "conv2d"][-1].c["DOT_TAIL"]


def _pool_path(lp) -> str:
    t = lp.c["tiles"]
    if t is None:
        return "general"
    return "scalar" if t["SIMD"] == "columns" and not t["VEC_OW"] else t["SIMD"]


@pytest.mark.parametrize("case, pool_path", [("relu_fused_pool_general", "general"),
                                             ("relu_fused_pool_columns", "columns"),
                                             ("relu_fused_pool_channels", "channels"),
                                             ("relu_fused_pool_scalar", "scalar"),
                                             ("relu_fused_winograd", "columns"),
                                             ("relu_fused_linear_tail", None)])
def test_relu_fused_cases_fuse(case, pool_path):
    """The cases above run their ReLU inside its neighbours, through the path they name;
    a ReLU with a layer that cannot take it on either side keeps its own pass."""
    plan = make_plan(check_text(CASES[case]))
    relus = [i for i, lp in enumerate(plan.layers) if lp.kind == "relu"]
    assert relus and all(plan.layers[i].fused_into for i in relus)
    for i in relus:
        before, after = plan.layers[i - 1], plan.layers[i + 1]
        assert plan.layers[i].aliases and plan.layers[i].out is None
        assert before.relu_out and after.relu_din
        assert plan.layers[i].fused_into == (before.name, after.name)
        if after.kind == "maxpool2d":
            assert _pool_path(after) == pool_path
    if "winograd" in case:
        assert plan.layers[relus[0] - 1].c["WINO"]
    source = render(plan.net, "float64").source
    assert "vrelu(" in source and "relu1_forward" not in source and "relu1_backward" not in source


@pytest.mark.parametrize("case, fused", [
    ("graph_relu_self_masked_fanout", {"r": ("bn", "bn"), "r2": ("s", "s"), "r3": ("t", "t")}),
    ("graph_bn1d_relu_two_readers", {"r": ("bn", "bn")}),
    ("batchnorm1d", {"relu1": ("bn1", "fc2")}),  # one linear reader: it masks, as after a linear
])
def test_relu_fused_into_the_layer_before_alone(case, fused):
    """A ReLU after a batch norm or an add, whatever reads it, is applied by that layer's
    forward and its derivative by that layer's backward (masking its own output gradient):
    no slot, no pass; the eval forward applies it too."""
    plan = make_plan(check_text(CASES[case]))
    relus = {lp.layer.name: lp for lp in plan.layers if lp.kind == "relu"}
    names = {lp.layer.name: lp.name for lp in plan.layers}
    assert {k: lp.fused_into for k, lp in relus.items()} == {k: (names[a], names[b]) for k, (a, b) in fused.items()}
    for relu, (before, after) in fused.items():
        b = _lp_named(plan, before)
        assert relus[relu].aliases and relus[relu].out is None
        assert b.relu_out and b.relu_dout == (before == after) and not b.relu_din
        if before != after:
            assert _lp_named(plan, after).relu_din
    source = render(plan.net, "float64").source
    assert not any(f"{names[r]}_forward(" in source or f"{names[r]}_backward(" in source for r in fused)
    assert "its output gradient" in source or "batchnorm1d" in case


def test_relu_not_fused_without_both_neighbours():
    # "relu": first layer after a 1x1 conv, then between conv2d (no gradient mask) and flatten
    plan = make_plan(check_text(CASES["relu"]))
    relus = [lp for lp in plan.layers if lp.kind == "relu"]
    assert len(relus) == 2 and not any(lp.fused_into or lp.aliases for lp in relus)
    assert "relu1_forward" in render(plan.net, "float64").source
    # lenet5: all four (conv -> relu -> pool twice, linear -> relu -> linear twice)
    plan = make_plan(check_text((ROOT / "specs" / "lenet5.yaml").read_text(), "specs/lenet5.yaml"))
    assert [lp.fused_into for lp in plan.layers if lp.kind == "relu"] == [
        ("conv1", "pool1"), ("conv2", "pool2"), ("fc1", "fc2"), ("fc2", "fc3")]


def _lp_named(plan, name):
    return next(lp for lp in plan.layers if lp.layer.name == name)


@pytest.mark.parametrize("case", list(FOLDS))
def test_fold_cases_fold_the_batch_norm_in_evaluation(case):
    """Each case folds the batch norms (and ReLUs) FOLDS says into the convolution's evaluation
    forward: no call of their own in evaluation mode, one in training mode (the ReLU: applied
    by the batch norm in training, plan.fused_relus)."""
    plan = make_plan(force_kernels(check_text(CASES[case]), KERNELS.get(case, {})))
    folds = {lp.layer.name: (lp.fold_bn.layer.name, lp.fold_relu) for lp in plan.layers if lp.fold_bn}
    assert folds == {k: (bn, relu is not None) for k, (bn, relu) in FOLDS[case].items()}
    gone = {n for bn, relu in FOLDS[case].values() for n in (bn, relu) if n}
    assert {lp.layer.name for st in plan.eval_stages for lp in st.layers} & gone == set()
    trained = {lp.layer.name for st in plan.train_stages for lp in st.layers}
    for bn, relu in FOLDS[case].values():
        assert bn in trained
        assert relu is None or _lp_named(plan, relu).fused_into == (_lp_named(plan, bn).name,) * 2
    source = render(plan.net, "float64").source
    for conv in FOLDS[case]:
        assert f"{conv}_forward_eval(a + " in source


def test_a_batch_norm_no_layer_takes_applies_its_relu_in_evaluation():
    """After a GEMM-path convolution the batch norm's evaluation forward stores relu(x * scale +
    shift) into the ReLU's output; the ReLU runs only in training (fold_not_on_gemm)."""
    net = force_kernels(check_text(CASES["fold_not_on_gemm"]), KERNELS["fold_not_on_gemm"])
    plan = make_plan(net)
    bn = next(lp for lp in plan.layers if lp.layer.name == "bn1")
    # the ReLU is fused into the batch norm (its output is the batch norm's): no pass in either mode
    assert bn.fold_relu and bn.fold_bn is None and bn.fold_out_macro == "OFF_bn1_out"
    assert bn.relu_out and bn.relu_dout and _lp_named(plan, "relu1").fused_into == ("bn1", "bn1")
    assert "relu1" not in {lp.layer.name for st in plan.eval_stages + plan.train_stages for lp in st.layers}
    source = render(net, "float64").source
    assert "bn1_forward_eval(a + OFF_bn1_out, a + OFF_conv2_out" in source


@pytest.mark.parametrize("case", ["evalpath_pointwise_bn_relu", "evalpath_pointwise_relu_pool"])
def test_pointwise_shapes_evaluate_on_the_pointwise_path(case):
    """Training runs the cheapest path for forward and backward together (here gather); the
    evaluation forward of a 1x1 convolution runs the pointwise path whenever it applies (it is the
    same GEMM with no copies), unless a path is forced; the report says so."""
    net = check_text(CASES[case])
    plan = make_plan(net)
    conv = next(lp for lp in plan.layers if lp.layer.name == "conv2")
    assert conv.kernel.path.name == "gather" and conv.kernel.evaluates.name == "pointwise"
    assert conv.eval_lp.c["PATH"] == "pointwise" and conv.eval_lp.eval_alone
    source = render(net, "float64").source
    assert "static void conv2_forward_eval(" in source and "static void conv2_forward(" in source
    assert "conv2_forward_eval(a + " in source.split("static void forward_eval(")[1].split("static void forward_train(")[0]
    forced = make_plan(force_kernels(net, {"conv2": "gather"}))
    assert next(lp for lp in forced.layers if lp.layer.name == "conv2").eval_lp is None
    from netcompiler.report import build_report, kernel_lines
    assert any(l.startswith("conv2 ") and "evaluation: pointwise" in l
               for l in kernel_lines(build_report(net, kernels=True)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [*FOLDS, "evalpath_pointwise_relu_pool"])
def test_fold_cases_eval_forward_matches_torch_float32(case, threads):
    net, x, _ = prepared(case, "float32", threads)
    model = reference_model(net, CASES[case], net.state_dict()).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    assert_close(net.forward(x.astype(np.float32)), ref, 1e-5, f"{case}: eval forward (float32)")


@pytest.mark.parametrize("case", IDS)
def test_forward_eval_matches_torch(case):
    net, x, _ = prepared(case)
    model = reference_model(net, CASES[case]).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    assert_close(net.forward(x), ref, 1e-9, f"{case}: eval forward")
    net.threads = 2
    assert_close(net.forward(x), ref, 1e-9, f"{case}: eval forward, 2 threads")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", IDS)
def test_loss_and_gradients_match_torch_float64(case, threads):
    check_against_torch(*prepared(case, "float64", threads), CASES[case], case)


@pytest.mark.parametrize("case", IDS)
def test_loss_and_gradients_match_torch_float32(case):
    check_against_torch(*prepared(case, "float32", 2), CASES[case], case)


def check_against_torch(net, x, y, spec_text: str, what: str) -> None:
    """The training loss and every parameter gradient of `net` on (x, y) against PyTorch's
    (rtol 1e-9 in float64, 1e-4 in float32)."""
    f32 = net.dtype == np.float32
    rtol = 1e-4 if f32 else 1e-9
    x = x.astype(net.dtype)
    state = net.state_dict()
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, spec_text, x, y, dropout_masks(net, BATCH), state)
    tol = 1e-5 * abs(rl) + 1e-6 if f32 else 1e-9 * abs(rl) + 1e-14
    assert abs(loss - rl) <= tol, f"{what}: loss {loss!r}, torch {rl!r}"
    assert set(grads) == set(rg)
    for k in rg:
        assert grads[k].dtype == net.dtype
        assert_close(grads[k], rg[k], rtol, f"{what}: d{k} ({net.dtype.name})", atol=_atol(rg, rtol))


@pytest.mark.parametrize("case", IDS)
def test_gradients_match_finite_differences(case):
    check_finite_differences(*prepared(case, "float64", 1), case)


def check_finite_differences(net, x, y, what: str) -> None:
    """Each parameter's gradient at its largest coordinate and two random ones against central
    finite differences of the loss (float64; `seed` repeats the dropout masks)."""
    net.seed(7)
    _, grads = net.loss_and_grad(x, y)
    rng = np.random.default_rng(5)
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    h = 1e-5
    for name, p in net.params.items():
        g = grads[name]
        flat_p, flat_g = p.reshape(-1), g.reshape(-1)  # views into the parameter buffer
        coords = {int(np.argmax(np.abs(flat_g)))} | {int(i) for i in rng.integers(0, flat_p.size, 2)}
        for i in sorted(coords):
            old = flat_p[i]
            flat_p[i] = old + h
            net.seed(7)
            lp, _ = net.loss_and_grad(x, y)
            flat_p[i] = old - h
            net.seed(7)
            lm, _ = net.loss_and_grad(x, y)
            flat_p[i] = old
            fd = (lp - lm) / (2 * h)
            assert abs(fd - flat_g[i]) <= 1e-6 * max(abs(fd), 1e-2 * scale) + 1e-9, \
                f"{what}: d{name}[{i}] = {flat_g[i]!r}, finite differences {fd!r}"


@pytest.mark.parametrize("case", IDS)
def test_torchref_twin_matches_reference(case):
    """netcompiler.torchref (used by `netc verify`) builds the same model as the independent
    reference: same names, shapes and evaluation outputs, and the same training-mode
    gradients where there is no dropout."""
    from netcompiler.torchref import torch_loss_and_grad, torch_model

    net, x, y = prepared(case)
    state = net.state_dict()
    twin = torch_model(net.network, state).eval()
    ref = reference_model(net, CASES[case], state).eval()
    with torch.no_grad():
        assert_close(twin(torch.as_tensor(x)).numpy(), ref(torch.as_tensor(x)).numpy(), 1e-12, f"{case}: twin eval")
    if not any(l.kind.kind == "dropout" for l in net.network.layers):
        tl, tg, _, _ = torch_loss_and_grad(net.network, state, x, y)
        rl, rg, _, _ = reference_loss_and_grad(net, CASES[case], x, y, None, state)
        assert abs(tl - rl) <= 1e-12 * abs(rl)
        for k in rg:
            assert_close(tg[k], rg[k], 1e-12, f"{case}: twin d{k}", atol=_atol(rg, 1e-12))


# ---- batch norm: running statistics ---------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in IDS if "batchnorm" in c])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batchnorm_running_stats_match_torch(case, dtype):
    net, x, y = prepared(case, dtype, 2)
    x = x.astype(net.dtype)
    state = net.state_dict()
    rtol = 1e-9 if dtype == "float64" else 1e-5
    model = reference_model(net, CASES[case], state).train()
    for step in (1, 2):
        xs = x * step  # the second forward moves the statistics again, from the new values
        net.loss_and_grad(xs, y)
        for lname, m in dropout_masks(net, BATCH).items():
            getattr(model, lname).mask = torch.as_tensor(m.astype(np.float64))
        with torch.no_grad():
            model(torch.as_tensor(xs.astype(np.float64)))
        ref = model.state_dict()
        assert net.buffers, "no batch-norm buffers"
        for k, v in net.buffers.items():
            assert_close(v, ref[k].numpy(), rtol, f"{case}: {k} after {step} training forward(s)")
        assert any(not np.allclose(v, state[k]) for k, v in net.buffers.items()), "no running statistic moved"


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "mobilenetv2_cifar", "densenet_cifar", "fashion_resnet"])
def test_every_batch_norm_of_the_residual_and_dense_specs_runs_split(name):
    """Each of their batch norms sits between a convolution and a per-sample ReLU, add or concat:
    its passes run inside those stages' loops (the cases above check that form's gradients)."""
    plan = make_plan(check_text((ROOT / "specs" / f"{name}.yaml").read_text(), f"specs/{name}.yaml"))
    norms = [lp for lp in plan.layers if lp.kind == "batchnorm2d"]
    assert norms and [lp.layer.name for lp in norms if not lp.split] == []


@pytest.mark.parametrize("case, split", [("batchnorm", [False]), ("batchnorm_split_relu", [True]),
                                         ("batchnorm_split_no_input_grad", [True])])
def test_a_batch_norm_runs_split_only_between_two_per_sample_stages(case, split):
    """First in the net (its input comes from outside) or before a ranged linear: whole batch."""
    assert [lp.split for lp in make_plan(check_text(CASES[case])).layers if lp.kind == "batchnorm2d"] == split


# 35 values a plane: two vectors and a tail; the batch norm first (batch-level passes), or
# between two per-sample stages (split: per-sample sums combined): a ReLU before it (the values
# are positive: it keeps them), a 1x1 convolution after it.  (A convolution before it would make
# its own weight gradient ill-conditioned: sums of dx x over values of 1000 +- 0.01.)
LARGE_MEAN = {"whole_batch": spec([2, 5, 7], ["batchnorm2d", *HEAD]),
              "split": spec([2, 5, 7], ["relu", "batchnorm2d", "conv2d: {out_channels: 2, kernel_size: 1}", *HEAD])}


@pytest.mark.parametrize("form", list(LARGE_MEAN))
@pytest.mark.parametrize("spread", [0.01, "per sample"])
def test_batchnorm_float32_statistics_of_values_with_a_large_mean_match_torch(form, spread):
    """1000 +- 0.01: a sum of squares taken about 0 in float32 would lose the whole variance.
    Per sample: each sample about its own large mean (1000 s), +- 0.01 within it."""
    text = LARGE_MEAN[form]
    assert [lp.split for lp in make_plan(check_text(text)).layers if lp.kind == "batchnorm2d"] == [form == "split"]
    net = build(text, "float32")
    rng = np.random.default_rng(7)
    net.init(3)
    x, y = random_batch(net, BATCH, rng)
    base = 1000 if spread == 0.01 else 1000 * np.arange(1, BATCH + 1).reshape(-1, 1, 1, 1)
    x = (base + 0.01 * x).astype(np.float32)
    state = net.state_dict()
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, text, x, y, None, state)
    assert abs(loss - rl) <= 1e-4 * abs(rl), f"loss {loss!r}, torch {rl!r}"
    for k in rg:
        assert_close(grads[k], rg[k], 1e-3, f"large mean: d{k} (float32)", atol=_atol(rg, 1e-3))
    model = reference_model(net, text, state).train()
    with torch.no_grad():
        model(torch.as_tensor(x.astype(np.float64)))
    ref = model.state_dict()
    for k, v in net.buffers.items():
        assert_close(v, ref[k].numpy(), 1e-4, f"large mean: {k}")


def test_batchnorm_eval_forward_uses_running_stats_not_batch_stats():
    net, x, _ = prepared("batchnorm_eps_momentum")
    one = net.forward(x[:1])
    assert_close(net.forward(x)[:1], one, 1e-12, "evaluation output of a sample depends on its batch")


# ---- dropout: the mask itself --------------------------------------------------------------
DROPOUT_STATS = spec([2000], ["dropout: {p: 0.3}", "linear: {out_features: 2}"], "mse")


def test_dropout_mask_values_rate_and_repeatability():
    net = build(DROPOUT_STATS)
    rng = np.random.default_rng(0)
    x, y = random_batch(net, 4, rng)
    net.loss_and_grad(x, y)
    m1 = dropout_masks(net, 4)["dropout1"]
    assert set(np.unique(m1)) <= {0.0, 1 / 0.7}, np.unique(m1)[:5]
    frac = float(np.mean(m1 == 0))
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / m1.size), f"zeroed fraction {frac}, p = 0.3"
    assert not np.array_equal(m1[0], m1[1]), "two samples got the same mask"
    net.loss_and_grad(x, y)
    assert not np.array_equal(dropout_masks(net, 4)["dropout1"], m1), "two training calls got the same masks"
    net.seed(0)
    net.threads = 2
    net.loss_and_grad(x, y)
    assert np.array_equal(dropout_masks(net, 4)["dropout1"], m1), \
        "seed(0) did not repeat the masks (or the thread count changed them)"
    # evaluation mode is the identity: the output is the linear layer of x itself
    w, b = net.params["fc1.weight"], net.params["fc1.bias"]
    assert_close(net.forward(x), x @ w.T + b, 1e-12, "evaluation-mode dropout is not the identity")


# ---- numerically extreme inputs -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_with_huge_logits_matches_torch(dtype):
    text = spec([4], ["linear: {out_features: 3}"])
    net = build(text, dtype)
    net.params["fc1.weight"][...] = [[1000, 0, 0, 0], [0, -1000, 0, 0], [0, 0, 500, 0]]
    x, y = np.array([[1.0, 1, 1, 0], [-1, -1, 0, 0]]), np.array([1, 2])
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, text, x, y)
    assert np.isfinite(loss) and abs(loss - rl) <= 1e-6 * rl, (loss, rl)
    for k in rg:
        assert_close(grads[k], rg[k], 1e-6, f"d{k} with logits of +-1000")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_new_activations_treat_nan_inf_and_signed_zero_like_torch(dtype):
    F = torch.nn.functional
    x = np.array([[np.nan, -0.0, np.inf, -np.inf, 0.0, 6.0, -3.0, 3.0]])
    for act, ref in (("relu6", F.relu6), ("hardswish", F.hardswish), ("silu", F.silu)):
        net = build(spec([8], [act], "mse"), dtype)
        got = net.forward(x)
        want = ref(torch.as_tensor(x, dtype=torch.float64)).numpy()
        special = slice(0, 5)  # NaN, -0, inf, -inf, +0: the same values and signs exactly
        assert np.array_equal(got[:, special], want[:, special], equal_nan=True), (act, got, want)
        assert np.array_equal(np.signbit(got[:, special]), np.signbit(want[:, special])), (act, got, want)
        assert_close(got[:, 5:], want[:, 5:], 1e-6, f"{act} at the kinks")


def test_maxpool_propagates_nan_like_torch():
    text = spec([1, 2, 4], ["maxpool2d: {kernel_size: 2}", "flatten", "linear: {out_features: 2}"])
    net = build(text)
    x = np.arange(8.0).reshape(1, 1, 2, 4)
    x[0, 0, 1, 1] = x[0, 0, 0, 2] = np.nan  # a NaN late in the first window, first in the second
    pooled = net.plan.activations[1]
    net.forward(x)
    got = net._acts[0, pooled.offset:pooled.offset + pooled.size]
    ref = torch.nn.functional.max_pool2d(torch.as_tensor(x), 2).numpy().reshape(-1)
    assert pooled.name == "pool1.out" and np.array_equal(np.isnan(got), np.isnan(ref)), (got, ref)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act", ["relu6", "hardswish", "silu"])
def test_activation_derivatives_at_the_kinks_match_torch(act, dtype):
    """Inputs exactly at relu6's kinks (0, 6) and hardswish's (-3, 3): an identity linear layer
    passes them on unchanged, so its weight gradient holds the activation's derivative there."""
    text = spec([6], ["linear: {out_features: 6, bias: false}", act, "linear: {out_features: 2}"], "mse")
    net = build(text, dtype)
    net.params["fc1.weight"][...] = np.eye(6)
    x = np.array([[0.0, 6, -3, 3, -0.0, 1e-30], [3, -3, 6, 0, 7, -7]])
    y = np.zeros((2, 2))
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, text, x, y)
    assert abs(loss - rl) <= 1e-6 * rl
    for k in rg:
        assert_close(grads[k], rg[k], 1e-6, f"{act}: d{k} at the kinks")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_binary_cross_entropy_with_huge_logits_matches_torch(dtype):
    """max(x, 0) - x t + log1p(e^-|x|) stays finite where log(sigmoid(x)) would not (x = +-1000),
    with targets 0, 1 and in between."""
    text = spec([2], ["linear: {out_features: 4}"], "binary_cross_entropy")
    net = build(text, dtype)
    net.params["fc1.weight"][...] = [[1000, 0], [-1000, 0], [0, 30], [0, -0.5]]
    net.params["fc1.bias"][...] = 0
    x, y = np.array([[1.0, 1], [-1, 2]]), np.array([[0, 1, 0.25, 1], [1, 0, 0.5, 0]])
    loss, grads = net.loss_and_grad(x, y)
    rl, rg, _, _ = reference_loss_and_grad(net, text, x, y)
    assert np.isfinite(loss) and abs(loss - rl) <= 1e-6 * rl, (loss, rl)
    for k in rg:
        assert_close(grads[k], rg[k], 1e-6, f"d{k} with logits of +-1000")


# ---- windows that hold only padding ------------------------------------------------------------
# Dilated max-pooling can place every tap of a window in the padding (PyTorch allows padding up
# to half the *undilated* kernel): kernel 2, dilation 3, padding 1 over 2 rows puts the taps of
# the only output row at rows -1 and 2.  PyTorch outputs -inf there.
EMPTY_WINDOW = spec([1, 2, 3], ["maxpool2d: {kernel_size: [2, 1], stride: 1, padding: [1, 0], dilation: [3, 1]}"],
                    "mse")


def test_maxpool_window_of_only_padding_matches_torch():
    net = build(EMPTY_WINDOW)
    x = np.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    ref = reference_model(net, EMPTY_WINDOW).eval()(torch.as_tensor(x)).detach().numpy()
    assert np.all(np.isneginf(ref))
    np.testing.assert_array_equal(net.forward(x), ref)


def test_maxpool_padding_limit_is_pytorchs():
    """PyTorch allows padding up to half the *undilated* kernel, whatever the dilation."""
    too_much = spec([1, 1, 4], ["maxpool2d: {kernel_size: [2, 1], stride: 1, padding: [2, 0], dilation: [3, 1]}"],
                    "mse")
    with pytest.raises(RuntimeError, match="pad should be"):
        torch.nn.MaxPool2d((2, 1), 1, (2, 0), (3, 1))(torch.zeros(1, 1, 1, 4))
    with pytest.raises(SpecErrors, match="padding"):
        check_text(too_much)
    torch.nn.MaxPool2d((2, 1), 1, (1, 0), (3, 1))(torch.zeros(1, 1, 2, 3))  # allowed by PyTorch: and by us
    check_text(EMPTY_WINDOW)


def test_gather_tables_have_a_size_limit():
    """A gathered im2col has a table entry per vector of output pixels: up to 1024 vectors
    (a 128x128 output), larger maps keep the im2col buffer."""
    from netcompiler.layers.conv2d import GATHER_MAX_VECTORS, pixel_gather

    assert GATHER_MAX_VECTORS == 1024
    assert pixel_gather(128, 128, 1, 1, 130, 128 * 128) is not None
    assert pixel_gather(129, 128, 1, 1, 130, 129 * 128) is None
    big = check_text(spec([1, 131, 130], ["conv2d: {out_channels: 2, kernel_size: 3}", "flatten",
                                          "linear: {out_features: 2}"]))
    assert not make_plan(big).layers[0].c["GATHER"]
