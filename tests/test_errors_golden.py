"""Golden error messages: the exact text, with file:line:col, of every kind of mistake.

Each spec is written out in full so the line and column in the expected message can be
checked by eye against it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from netcompiler.check import check_text, load
from netcompiler.errors import SpecErrors

ROOT = Path(__file__).resolve().parents[1]

CONV_OPTIONS = "out_channels, kernel_size, stride, padding, dilation, groups, bias, in_channels, name, expect, inputs"

GOLDEN = {
    "missing_input": (
        "name: net\n"
        "layers:\n"
        "  - relu\n"
        "loss: mse\n",
        "net.yaml:1:1: error: missing 'input': the shape of one sample, e.g. input: [1, 28, 28] "
        "(channels, height, width) or input: [784]"),
    "missing_layers": (
        "name: net\n"
        "input: [4]\n"
        "loss: mse\n",
        "net.yaml:1:1: error: missing 'layers': a list of layers, e.g. - conv2d: {out_channels: 6, kernel_size: 5}"),
    "missing_loss": (
        "name: net\n"
        "input: [4]\n"
        "layers:\n"
        "  - relu\n",
        "net.yaml:1:1: error: missing 'loss': one of cross_entropy, mse, binary_cross_entropy"),
    "empty_layers": (
        "input: [4]\n"
        "layers: []\n"
        "loss: mse\n",
        "net.yaml:2:9: error: 'layers' must be a non-empty list"),
    "not_a_mapping": (
        "- conv2d\n"
        "- relu\n",
        "net.yaml:1:1: error: a spec is a mapping with 'input', 'layers' and 'loss'"),
    "wrong_type": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: six, kernel_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:28: error: conv2d: 'out_channels' must be an integer, got 'six'"),
    "wrong_type_block_style": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d:\n"
        "      out_channels: 6\n"
        "      kernel_size: 5\n"
        "      bias: yes please\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:6:13: error: conv2d: 'bias' must be true or false, got 'yes please'"),
    "float_size": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 2.5}\n"
        "loss: mse\n",
        "net.yaml:3:28: error: linear: 'out_features' must be an integer, got 2.5"),
    "zero_size": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 0, kernel_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:28: error: conv2d: 'out_channels' must be >= 1, got 0"),
    "negative_size": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6, kernel_size: -5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:44: error: conv2d: 'kernel_size' must be >= 1, got -5"),
    "negative_stride_in_pair": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6, kernel_size: 5, stride: [1, -2]}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:55: error: conv2d: 'stride' must be >= 1, got -2"),
    "negative_padding": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6, kernel_size: 5, padding: -1}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:56: error: conv2d: 'padding' must be >= 0, got -1"),
    "zero_input": (
        "input: [1, 0, 28]\n"
        "layers:\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:12: error: input size must be positive, got 0"),
    "negative_input": (
        "input: [1, 28, -28]\n"
        "layers:\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:16: error: input size must be positive, got -28"),
    "input_not_integer": (
        "input: [1, 28, true]\n"
        "layers:\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:16: error: input size must be an integer, got true"),
    "input_nested_list": (
        "input: [[1, 28, 28]]\n"
        "layers:\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:9: error: input size must be an integer, got [1, 28, 28]"),
    "input_two_dims": (
        "input: [28, 28]\n"
        "layers:\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:8: error: 'input' must be [channels, height, width] or [features], got [28, 28]"),
    "unknown_kind_conv2": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2: {out_channels: 6, kernel_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:5: error: unknown layer kind 'conv2' (did you mean 'conv2d'?)"),
    "unknown_kind_maxpool": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - maxpool: {kernel_size: 2}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:5: error: unknown layer kind 'maxpool' (did you mean 'maxpool2d'?)"),
    "unknown_kind_bare": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - flatten\n"
        "  - softmax\n"
        "loss: mse\n",
        "net.yaml:4:5: error: unknown layer kind 'softmax': not needed: cross_entropy applies log-softmax to the "
        "logits; forward returns logits"),
    "unknown_option": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6, kernal_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:31: error: conv2d: unknown option 'kernal_size' (did you mean 'kernel_size'?); "
        f"options are {CONV_OPTIONS}"),
    "missing_required_option": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:5: error: conv2d: missing required option 'kernel_size' (kernel height and width (int or [h, w]))"),
    "invalid_layer_name": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {name: 1st-conv, out_channels: 6, kernel_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:20: error: conv2d: layer name '1st-conv' is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)"),
    "reserved_layer_name": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: float, out_features: 2}\n"
        "loss: mse\n",
        "net.yaml:3:20: error: linear: layer name 'float' is reserved in C (a keyword or a name the generated code "
        "uses)"),
    "long_network_name": (
        "name: " + "n" * 49 + "\n"
        "input: [4]\n"
        "layers:\n"
        "  - relu\n"
        "loss: mse\n",
        "net.yaml:1:7: error: name '" + "n" * 49 + "' is 49 characters long; at most 48"),
    "invalid_network_name": (
        "name: my net\n"
        "input: [4]\n"
        "layers:\n"
        "  - relu\n"
        "loss: mse\n",
        "net.yaml:1:7: error: name 'my net' is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)"),
    "duplicate_names": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {name: features, out_channels: 6, kernel_size: 5}\n"
        "  - relu\n"
        "  - conv2d: {name: features, out_channels: 6, kernel_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:5:20: error: duplicate layer name 'features' (also layer 1, line 3)"),
    "duplicate_with_automatic_name": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 4}\n"
        "  - linear: {out_features: 4, name: fc1}\n"
        "loss: mse\n",
        "net.yaml:4:37: error: duplicate layer name 'fc1' (also layer 1, line 3)"),
    "duplicate_key": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 4, out_features: 5}\n"
        "loss: mse\n",
        "net.yaml:3:31: error: duplicate key 'out_features'"),
    "expect_mismatch": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6, kernel_size: 5, expect: [6, 28, 28]}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:55: error: conv2d 'conv1': expected output 6x28x28, but it is 6x24x24 (from input 1x28x28)"),
    "kernel_larger_than_input": (
        "input: [1, 12, 12]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 6, kernel_size: 5}\n"
        "  - maxpool2d: {kernel_size: 2}\n"
        "  - conv2d: {out_channels: 16, kernel_size: 5}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:5:5: error: conv2d 'conv2': input 4x4 is smaller than kernel 5x5 (1+4-5 = 0)"),
    "groups_not_dividing": (
        "input: [6, 8, 8]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 8, kernel_size: 3, groups: 4}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:55: error: conv2d 'conv1': groups=4 must divide both in_channels (6) and out_channels (8)"),
    "pool_padding_over_half_kernel": (
        "input: [1, 8, 8]\n"
        "layers:\n"
        "  - maxpool2d: {kernel_size: 3, padding: 2}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:42: error: maxpool2d 'pool1': padding 2 is more than half the kernel size 3"),
    "padding_misspelt": (
        "input: [1, 8, 8]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 2, kernel_size: 3, padding: sam}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:56: error: conv2d: 'padding' must be an integer, a pair, [top, bottom, left, right], 'same' or "
        "'valid', got 'sam' (did you mean 'same'?)"),
    "linear_without_flatten": (
        "input: [1, 28, 28]\n"
        "layers:\n"
        "  - linear: {out_features: 10}\n"
        "loss: cross_entropy\n",
        "net.yaml:3:5: error: linear 'fc1': input is 1x28x28 (3-D); a linear layer needs a 1-D input: "
        "add '- flatten' before it (it would give 784 features)"),
    "in_features_mismatch": (
        "input: [784]\n"
        "layers:\n"
        "  - linear: {out_features: 10, in_features: 748}\n"
        "loss: cross_entropy\n",
        "net.yaml:3:45: error: linear 'fc1': in_features is 748 but the input has 784 features"),
    "python_object_tag": (
        "input: !!python/object/apply:os.system ['echo hi']\n"
        "layers:\n"
        "  - relu\n"
        "loss: mse\n",
        "net.yaml:1:8: error: unsupported YAML tag '!!python/object/apply:os.system' (only plain data is allowed)"),
    "input_over_2_31_elements": (
        "input: [3, 65536, 65536]\n"
        "layers:\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:8: error: input 3x65536x65536 has 12,884,901,888 elements; at most 2,147,483,647 per tensor"),
    "output_over_2_31_elements": (
        "input: [3, 1024, 1024]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 2048, kernel_size: 1}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:3:5: error: conv2d 'conv1': output has 2,147,483,648 elements; at most 2,147,483,647 per tensor"),
    "parameter_over_2_31_elements": (
        "input: [65536]\n"
        "layers:\n"
        "  - linear: {out_features: 65536}\n"
        "loss: mse\n",
        "net.yaml:3:5: error: linear 'fc1': parameter 'weight' has 4,294,967,296 elements; "
        "at most 2,147,483,647 per tensor"),
    "memory_budget": (
        # 5 outputs of 512x1024x1024 floats, saved and with gradients: 5 * 2^29 * 8 bytes = 20 GiB
        "name: huge\n"
        "input: [3, 1024, 1024]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 512, kernel_size: 1}\n"
        "  - relu\n"
        "  - conv2d: {out_channels: 512, kernel_size: 1}\n"
        "  - relu\n"
        "  - conv2d: {out_channels: 512, kernel_size: 1}\n"
        "  - flatten\n"
        "loss: mse\n",
        "net.yaml:1:1: error: network 'huge' needs 20.0 GiB to train one sample, over the memory budget of "
        "16.0 GiB (--memory-budget)"),
    "unknown_top_level_key": (
        "input: [4]\n"
        "layers:\n"
        "  - relu\n"
        "loss: mse\n"
        "optimiser: adam\n",
        "net.yaml:5:1: error: unknown key 'optimiser'; expected one of name, input, blocks, layers, loss, train"),
    "misspelt_top_level_key": (
        "input: [4]\n"
        "layer:\n"
        "  - relu\n"
        "loss: mse\n",
        "net.yaml:2:1: error: unknown key 'layer' (did you mean 'layers'?); expected one of name, input, blocks, layers, "
        "loss, train"),
    "unknown_loss": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 3}\n"
        "loss: crossentropy\n",
        "net.yaml:4:7: error: unknown loss 'crossentropy' (did you mean 'cross_entropy'?); expected one of "
        "cross_entropy, mse, binary_cross_entropy"),
    "unknown_train_option": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 3}\n"
        "loss: mse\n"
        "train: {epoch: 3}\n",
        "net.yaml:5:9: error: unknown train option 'epoch' (did you mean 'epochs'?); expected one of epochs, "
        "batch_size, optimizer, lr, momentum, weight_decay, seed, val_split, mean, std, normalize, lr_schedule, step_size, "
        "gamma, milestones, min_lr, max_lr, pct_start, div_factor, final_div_factor, warmup_epochs, nesterov, "
        "label_smoothing, clip_grad_norm, patience, augment"),
    "bad_train_recipe_options": (
        "input: [1, 4, 4]\n"
        "layers:\n"
        "  - flatten\n"
        "  - linear: {out_features: 3}\n"
        "loss: mse\n"
        "train:\n"
        "  lr_schedule: cosin\n"
        "  milestones: [5, 2]\n"
        "  nesterov: 1\n"
        "  augment: shift=2,flip\n",
        "net.yaml:7:16: error: train option 'lr_schedule' must be one of none, step, multistep, cosine, onecycle, "
        "got 'cosin' (did you mean 'cosine'?)\n"
        "net.yaml:8:15: error: train option 'milestones' must be a list of increasing positive integers, got [5, 2]\n"
        "net.yaml:9:13: error: train option 'nesterov' must be true or false, got 1\n"
        "net.yaml:10:12: error: train option 'augment' is wrong: unknown augmentation 'flip' (expected shift, hflip, erase)"),
    "dropout_p_one": (
        "input: [4]\n"
        "layers:\n"
        "  - dropout: {p: 1}\n"
        "loss: mse\n",
        "net.yaml:3:18: error: dropout 'dropout1': p must be below 1 (p=1 zeroes everything)"),
    "key_shown_as_written": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 2, null: 1}\n"
        "loss: mse\n",
        "net.yaml:3:31: error: linear: unknown option 'null'; options are out_features, bias, in_features, name, "
        "expect, inputs"),
    "loss_mapping_shown_as_data": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 2}\n"
        "loss: {kind: mse}\n",
        "net.yaml:4:7: error: unknown loss {'kind': 'mse'}; expected one of cross_entropy, mse, "
        "binary_cross_entropy"),
    "options_not_a_mapping": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: 10\n"
        "loss: mse\n",
        "net.yaml:3:13: error: options of 'linear' must be a mapping, e.g. linear: {...}, got 10"),
    "yaml_tab": (
        "input: [4]\n"
        "layers:\n"
        "\t- relu\n",
        "net.yaml:3:1: error: YAML syntax error: found character '\\t' that cannot start any token"),
    "yaml_unclosed_bracket": (
        "input: [1, 28, 28\n"
        "layers:\n"
        "  - relu\n"
        "loss: mse\n",
        "net.yaml:2:7: error: YAML syntax error: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence started at line 1, column 8)"),
    "yaml_two_documents": (
        "input: [4]\n"
        "---\n"
        "layers: [relu]\n",
        "net.yaml:2:1: error: YAML syntax error: expected a single document in the stream, but found another "
        "document"),
    "yaml_nul_character": (
        "input: [4]\n"
        "lay\x00ers: [relu]\n",
        "net.yaml:2:4: error: YAML syntax error: unacceptable character #x0000 (special characters are not allowed)"),
    "empty": (
        "",
        "net.yaml:1:1: error: empty spec: expected a mapping with 'input', 'layers' and 'loss'"),
    "only_comments": (
        "# nothing here\n",
        "net.yaml:1:1: error: empty spec: expected a mapping with 'input', 'layers' and 'loss'"),
    "global_pool_on_features": (
        "input: [8]\n"
        "layers:\n"
        "  - global_avgpool2d\n"
        "loss: mse\n",
        "net.yaml:3:5: error: global_avgpool2d 'pool1': needs a 3-D input (channels, height, width), got 8"),
    "adaptive_pool_zero_size": (
        "input: [2, 6, 6]\n"
        "layers:\n"
        "  - adaptive_avgpool2d: {output_size: [3, 0]}\n"
        "loss: mse\n",
        "net.yaml:3:39: error: adaptive_avgpool2d: 'output_size' must be >= 1, got 0"),
    "batchnorm1d_on_maps": (
        "input: [2, 4, 4]\n"
        "layers:\n"
        "  - batchnorm1d\n"
        "loss: mse\n",
        "net.yaml:3:5: error: batchnorm1d 'bn1': needs a 1-D input (features), got 2x4x4: use batchnorm2d for "
        "(channels, height, width), or flatten first"),
    "upsample_bilinear": (
        "input: [2, 4, 4]\n"
        "layers:\n"
        "  - upsample: {scale_factor: 2, mode: bilinear}\n"
        "loss: mse\n",
        "net.yaml:3:39: error: upsample: 'mode' must be one of nearest; got 'bilinear'"),
    "upsample_fractional_scale": (
        "input: [2, 4, 4]\n"
        "layers:\n"
        "  - upsample: {scale_factor: 1.5}\n"
        "loss: mse\n",
        "net.yaml:3:30: error: upsample: 'scale_factor' must be an integer, got 1.5"),
    "padding_list_of_3": (
        "input: [1, 8, 8]\n"
        "layers:\n"
        "  - conv2d: {out_channels: 2, kernel_size: 3, padding: [0, 1, 0]}\n"
        "loss: mse\n",
        "net.yaml:3:56: error: conv2d: 'padding' must be an integer, a pair, [top, bottom, left, right], 'same' or "
        "'valid', got a list of 3"),
    "pool_padding_same": (
        "input: [1, 8, 8]\n"
        "layers:\n"
        "  - maxpool2d: {kernel_size: 2, padding: same}\n"
        "loss: mse\n",
        "net.yaml:3:42: error: maxpool2d: 'padding' must be an integer, a pair [h, w] or [top, bottom, left, right], "
        "got 'same'"),
    "pool_padding4_over_half": (
        "input: [1, 8, 8]\n"
        "layers:\n"
        "  - avgpool2d: {kernel_size: 3, stride: 2, padding: [0, 2, 0, 1]}\n"
        "loss: mse\n",
        "net.yaml:3:53: error: avgpool2d 'pool1': padding 2 is more than half the kernel size 3"),
    "pool_padding4_ceil_mode": (
        "input: [1, 8, 8]\n"
        "layers:\n"
        "  - maxpool2d: {kernel_size: 2, padding: [0, 1, 0, 1], ceil_mode: true}\n"
        "loss: mse\n",
        "net.yaml:3:67: error: maxpool2d 'pool1': ceil_mode needs the same padding on both sides; with padding "
        "[top, bottom, left, right] give the extra rows and columns as bottom and right padding"),
    "recursive_alias": (
        "input: &a [1, *a]\n"
        "layers: [relu]\n"
        "loss: mse\n",
        "net.yaml:1:8: error: recursive YAML alias (a value that contains itself)"),
}

KINDS = ("conv2d, maxpool2d, avgpool2d, adaptive_avgpool2d, global_avgpool2d, linear, flatten, relu, leaky_relu, "
         "gelu, tanh, sigmoid, relu6, hardswish, silu, batchnorm2d, batchnorm1d, dropout, upsample, add, concat")


def _one_layer(layer: str, input_shape: str = "[4]") -> str:
    return f"input: {input_shape}\nlayers:\n  - {layer}\nloss: mse\n"


# The message for each layer kind (first item of a one-layer spec, at 3:5) that is not ours.
UNKNOWN_KINDS = {
    "residual": "layer kind 'residual' is not supported as a kind: a layer reads earlier tensors by name (inputs: "
                "[a, b]); add sums them, concat joins them",
    "Concatenate": "unknown layer kind 'Concatenate' (did you mean 'concat'?)",
    "dense": "unknown layer kind 'dense' (did you mean 'linear'?)",
    "Dense": "unknown layer kind 'Dense' (did you mean 'linear'?)",
    "Linear": "unknown layer kind 'Linear' (did you mean 'linear'?)",
    "Conv2D": "unknown layer kind 'Conv2D' (did you mean 'conv2d'?)",
    "Conv2d": "unknown layer kind 'Conv2d' (did you mean 'conv2d'?)",
    "MaxPooling2D": "unknown layer kind 'MaxPooling2D' (did you mean 'maxpool2d'?)",
    "MaxPool2d": "unknown layer kind 'MaxPool2d' (did you mean 'maxpool2d'?)",
    "AveragePooling2D": "unknown layer kind 'AveragePooling2D' (did you mean 'avgpool2d'?)",
    "BatchNorm2d": "unknown layer kind 'BatchNorm2d' (did you mean 'batchnorm2d'?)",
    "BatchNormalization": "unknown layer kind 'BatchNormalization' (did you mean 'batchnorm2d'?)",
    "ReLU": "unknown layer kind 'ReLU' (did you mean 'relu'?)",
    "LeakyReLU": "unknown layer kind 'LeakyReLU' (did you mean 'leaky_relu'?)",
    "GELU": "unknown layer kind 'GELU' (did you mean 'gelu'?)",
    "Dropout": "unknown layer kind 'Dropout' (did you mean 'dropout'?)",
    "Flatten": "unknown layer kind 'Flatten' (did you mean 'flatten'?)",
    "softmax": "unknown layer kind 'softmax': not needed: cross_entropy applies log-softmax to the logits; "
               "forward returns logits",
    "log_softmax": "unknown layer kind 'log_softmax': not needed: cross_entropy applies log-softmax to the logits; "
                   "forward returns logits",
    "Softmax": "unknown layer kind 'Softmax': not needed: cross_entropy applies log-softmax to the logits; "
               "forward returns logits",
    "conv1d": "layer kind 'conv1d' is not supported: only 2-D convolution (conv2d); 1-D data fits it as input "
              "[channels, 1, width] with kernel_size [1, k]",
    "Conv1D": "layer kind 'Conv1D' is not supported: only 2-D convolution (conv2d); 1-D data fits it as input "
              "[channels, 1, width] with kernel_size [1, k]",
    "conv3d": "layer kind 'conv3d' is not supported: only conv2d",
    "maxpool1d": "layer kind 'maxpool1d' is not supported: only 2-D pooling (maxpool2d, avgpool2d)",
    "lstm": "layer kind 'lstm' is not supported: recurrent, embedding and attention layers are not available",
    "LSTM": "layer kind 'LSTM' is not supported: recurrent, embedding and attention layers are not available",
    "elu": "layer kind 'elu' is not supported; the activations are relu, leaky_relu, gelu, tanh, sigmoid, relu6, "
           "hardswish, silu",
    "AdaptiveAvgPool2d": "unknown layer kind 'AdaptiveAvgPool2d' (did you mean 'adaptive_avgpool2d'?)",
    "GlobalAveragePooling2D": "unknown layer kind 'GlobalAveragePooling2D' (did you mean 'global_avgpool2d'?)",
    "AdaptiveMaxPool2d": "layer kind 'AdaptiveMaxPool2d' is not supported: use maxpool2d with kernel_size equal to "
                         "the input's height and width (average pooling: adaptive_avgpool2d, global_avgpool2d)",
    "BatchNorm1d": "unknown layer kind 'BatchNorm1d' (did you mean 'batchnorm1d'?)",
    "LayerNorm": "layer kind 'LayerNorm' is not supported: only batchnorm2d and batchnorm1d",
    "ReLU6": "unknown layer kind 'ReLU6' (did you mean 'relu6'?)",
    "Hardswish": "unknown layer kind 'Hardswish' (did you mean 'hardswish'?)",
    "SiLU": "unknown layer kind 'SiLU' (did you mean 'silu'?)",
    "swish": "unknown layer kind 'swish' (did you mean 'silu'?)",
    "UpSampling2D": "unknown layer kind 'UpSampling2D' (did you mean 'upsample'?)",
    "Upsample": "unknown layer kind 'Upsample' (did you mean 'upsample'?)",
    # (not 'frobnicate': difflib finds it 0.625 close to 'concat', over the 0.6 cutoff)
    "xyzzy": f"unknown layer kind 'xyzzy'; kinds are {KINDS}",
    "conv2": "unknown layer kind 'conv2' (did you mean 'conv2d'?)",
}


@pytest.mark.parametrize("kind", list(UNKNOWN_KINDS))
def test_unknown_layer_kinds(kind):
    with pytest.raises(SpecErrors) as exc:
        check_text(_one_layer(kind), "net.yaml")
    assert str(exc.value) == "net.yaml:3:5: error: " + UNKNOWN_KINDS[kind]


def test_unknown_kind_with_options_and_a_number_as_kind():
    with pytest.raises(SpecErrors) as exc:
        check_text(_one_layer("Dense: {units: 10}"), "net.yaml")
    assert str(exc.value) == "net.yaml:3:5: error: unknown layer kind 'Dense' (did you mean 'linear'?)"
    with pytest.raises(SpecErrors) as exc:
        check_text(_one_layer("12: {}"), "net.yaml")
    assert str(exc.value) == f"net.yaml:3:5: error: unknown layer kind '12'; kinds are {KINDS}"


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden(name):
    text, expected = GOLDEN[name]
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "net.yaml")
    assert str(exc.value) == expected


def test_memory_budget_option():
    text = (ROOT / "specs/lenet5.yaml").read_text()
    # params + grads + adam state: 4 * 61,706 * 4 bytes = 987,296; per sample the outputs of conv1,
    # pool1, conv2, pool2, fc1-3 (the four ReLUs are fused: no outputs of their own), 8,094
    # floats saved and their gradients, + 1,576 argmax indices: 71,056 bytes; 1,058,352 in all
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "lenet5.yaml", memory_budget=1_058_351)
    assert str(exc.value) == ("lenet5.yaml:2:1: error: network 'lenet5' needs 1.0 MiB (1,058,352 bytes) to train one "
                              "sample, over the memory budget of 1.0 MiB (1,058,351 bytes) (--memory-budget)")
    assert check_text(text, "lenet5.yaml", memory_budget=1_058_352).name == "lenet5"


def test_several_independent_errors_are_all_reported(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SpecErrors) as exc:
        load("tests/specs/bad_several.yaml")
    f = "tests/specs/bad_several.yaml"
    assert str(exc.value).splitlines() == [
        f"{f}:5:28: error: conv2d: 'out_channels' must be an integer, got 'six'",
        f"{f}:6:5: error: unknown layer kind 'maxpool' (did you mean 'maxpool2d'?)",
        f"{f}:7:32: error: conv2d: unknown option 'kernal_size' (did you mean 'kernel_size'?); "
        f"options are {CONV_OPTIONS}",
        f"{f}:8:12: error: relu: unknown option 'slope'; options are name, expect, inputs",
        f"{f}:10:28: error: linear: 'out_features' must be >= 1, got 0",
        f"{f}:11:7: error: unknown loss 'crossentropy' (did you mean 'cross_entropy'?); expected one of "
        "cross_entropy, mse, binary_cross_entropy",
    ]


def test_several_yaml_level_errors_are_all_reported():
    text = ("input: !!python/object/apply:os.system ['x']\n"
            "layers:\n"
            "  - linear: {out_features: 3, out_features: 4}\n"
            "loss: !!binary aGVsbG8=\n")
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "net.yaml")
    assert str(exc.value).splitlines() == [
        "net.yaml:1:8: error: unsupported YAML tag '!!python/object/apply:os.system' (only plain data is allowed)",
        "net.yaml:3:31: error: duplicate key 'out_features'",
        "net.yaml:4:7: error: unsupported YAML tag '!!binary' (only plain data is allowed)",
    ]


@pytest.mark.parametrize("name, expected", [
    ("bad_kernel", "tests/specs/bad_kernel.yaml:10:5: error: conv2d 'conv3': input 4x4 is smaller than kernel 5x5 "
                   "(1+4-5 = 0)"),
    ("bad_python_tag", "tests/specs/bad_python_tag.yaml:3:8: error: unsupported YAML tag "
                       "'!!python/object/apply:os.system' (only plain data is allowed)"),
    ("bad_syntax", "tests/specs/bad_syntax.yaml:3:7: error: YAML syntax error: expected ',' or ']', but got ':' "
                   "(while parsing a flow sequence started at line 2, column 8)"),
    ("cifar_first", "tests/specs/cifar_first.yaml:9:23: error: flatten 'flatten1': expected output 10, but it is "
                    "40 (from input 10x2x2)"),
], ids=["bad_kernel", "bad_python_tag", "bad_syntax", "cifar_first"])
def test_golden_files(name, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SpecErrors) as exc:
        load(f"tests/specs/{name}.yaml")
    assert str(exc.value) == expected


def test_python_tag_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    text = f"input: !!python/object/apply:os.system ['touch {marker}']\nlayers: [relu]\nloss: mse\n"
    with pytest.raises(SpecErrors):
        check_text(text, "net.yaml")
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(SpecErrors) as exc:
        load(tmp_path / "nope.yaml")
    assert str(exc.value) == f"{tmp_path / 'nope.yaml'}:1:1: error: cannot read spec: No such file or directory"
    with pytest.raises(SpecErrors) as exc:
        load(tmp_path)
    assert str(exc.value) == f"{tmp_path}:1:1: error: cannot read spec: it is a directory, not a regular file"
    binary = tmp_path / "net.bin"
    binary.write_bytes(b"input: [4]\n\xff\xfe\x00\x01")
    with pytest.raises(SpecErrors) as exc:
        load(binary)
    assert str(exc.value) == f"{binary}:1:1: error: spec is not UTF-8 text (invalid start byte at byte 11)"


def test_option_errors_spell_values_as_yaml():
    with pytest.raises(SpecErrors) as exc:
        check_text("input: [4]\nlayers:\n  - linear: {out_features: true}\nloss: mse\n", "net.yaml")
    assert str(exc.value) == "net.yaml:3:28: error: linear: 'out_features' must be an integer, got true"


# ---- graphs and blocks ----------------------------------------------------------------------
BLOCK_HEAD = ("input: [3, 8, 8]\n"
              "blocks:\n"
              "  down:\n"
              "    params: [channels]\n"
              "    layers:\n"
              "      - conv2d: {name: conv1, out_channels: $channels, kernel_size: 3, stride: 2, padding: 1}\n"
              "      - add: {inputs: [conv1, input]}\n"
              "layers:\n"
              "  - conv2d: {name: stem, out_channels: 4, kernel_size: 3, padding: 1}\n")

GRAPH_GOLDEN = {
    "unknown_input": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: first, out_features: 4}\n"
        "  - linear: {out_features: 4, inputs: [frist]}\n"
        "  - add: {inputs: [fc2, input]}\n"
        "loss: mse\n",
        "net.yaml:4:40: error: linear 'fc2': unknown input 'frist' (did you mean 'first'?); it reads 'input' or an "
        "earlier layer's name"),
    "two_unknown_inputs": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: first, out_features: 4}\n"
        "  - add: {inputs: [frist, inptu]}\n"
        "loss: mse\n",
        "net.yaml:4:20: error: add 'add1': unknown input 'frist' (did you mean 'first'?); it reads 'input' or an "
        "earlier layer's name\n"
        "net.yaml:4:27: error: add 'add1': unknown input 'inptu' (did you mean 'input'?); it reads 'input' or an "
        "earlier layer's name"),
    "later_input": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 4, inputs: [last]}\n"
        "  - linear: {name: last, out_features: 4}\n"
        "loss: mse\n",
        "net.yaml:3:40: error: linear 'fc1': input 'last' is defined later (line 4); a layer reads only the network "
        "input and layers before it"),
    "own_output": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: me, out_features: 4, inputs: [me]}\n"
        "loss: mse\n",
        "net.yaml:3:50: error: linear 'me': a layer cannot read its own output 'me'"),
    "reserved_input": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: input, out_features: 4}\n"
        "loss: mse\n",
        "net.yaml:3:20: error: linear: layer name 'input' is reserved for the network input (in a block: the "
        "block's input)"),
    "add_one_input": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 4}\n"
        "  - add: {inputs: [fc1]}\n"
        "loss: mse\n",
        "net.yaml:4:19: error: add 'add1' reads 1 tensor; it needs at least 2, e.g. inputs: [a, b]"),
    "add_without_inputs": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 4}\n"
        "  - add\n"
        "loss: mse\n",
        "net.yaml:4:5: error: add 'add1' needs inputs: the names of the 2 or more tensors it reads, e.g. "
        "inputs: [conv2, input]"),
    "add_shapes_differ": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {out_features: 3}\n"
        "  - add: {inputs: [fc1, input]}\n"
        "loss: mse\n",
        "net.yaml:4:19: error: add 'add1': cannot add 'input' (4) to 'fc1' (3): the shapes differ"),
    "concat_spatial_sizes": (
        "input: [3, 8, 8]\n"
        "layers:\n"
        "  - conv2d: {name: a, out_channels: 2, kernel_size: 2}\n"
        "  - concat: {inputs: [input, a]}\n"
        "loss: mse\n",
        "net.yaml:4:22: error: concat 'concat1': cannot concatenate 'a' (2x7x7) with 'input' (3x8x8): the spatial "
        "sizes must agree"),
    "concat_ranks": (
        "input: [3, 2, 2]\n"
        "layers:\n"
        "  - flatten\n"
        "  - concat: {inputs: [input, flatten1]}\n"
        "loss: mse\n",
        "net.yaml:4:22: error: concat 'concat1': cannot concatenate 'flatten1' (12) with 'input' (3x2x2): both must "
        "be 3-D (channels) or both 1-D (features)"),
    "output_never_read": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: a, out_features: 4}\n"
        "  - linear: {name: unused, out_features: 4}\n"
        "  - linear: {out_features: 2, inputs: [a]}\n"
        "loss: mse\n",
        "net.yaml:4:5: error: linear 'unused': its output is never read (only the last layer's output is the "
        "network's); name it in a later layer's inputs or remove it"),
    "error_inside_block": (
        BLOCK_HEAD + "  - down: {name: layer1, channels: 8}\nloss: mse\n",
        "net.yaml:7:23: error: add 'layer1.add1': cannot add 'stem' (4x8x8) to 'layer1.conv1' (8x4x4): the shapes "
        "differ (in block 'down' used as 'layer1' at line 10)"),
    "error_inside_repeated_block": (
        BLOCK_HEAD.replace("stride: 2, ", "") + "  - down: {name: layer1, repeat: 2, channels: 4}\n"
        "  - down: {name: layer2, channels: 5}\nloss: mse\n",
        "net.yaml:7:23: error: add 'layer2.add1': cannot add 'layer1.1.add1' (4x8x8) to 'layer2.conv1' (5x8x8): "
        "the shapes differ (in block 'down' used as 'layer2' at line 11)"),
    "block_parameter_misspelt": (
        BLOCK_HEAD.replace("$channels", "$chanels") + "  - down: {name: layer1, channels: 4}\n"
        "  - down: {name: layer2, channels: 4}\nloss: mse\n",
        "net.yaml:6:45: error: block 'down': unknown parameter '$chanels' (did you mean 'channels'?); its "
        "parameters: channels"),
    "block_use_key_misspelt": (
        BLOCK_HEAD + "  - down: {name: layer1, chanels: 4}\nloss: mse\n",
        "net.yaml:10:26: error: block 'down': unknown key 'chanels' (did you mean 'channels'?); expected name, "
        "repeat, start, inputs, channels"),
    "block_parameter_missing": (
        BLOCK_HEAD + "  - down: {name: layer1, repeat: 2}\nloss: mse\n",
        "net.yaml:10:5: error: block 'down': missing parameter 'channels' (its parameters: channels)"),
    "block_uses_itself": (
        "input: [4]\n"
        "blocks:\n"
        "  loop:\n"
        "    layers: [loop]\n"
        "layers: [loop]\n"
        "loss: mse\n",
        "net.yaml:4:14: error: block 'loop' uses itself (loop -> loop) (in block 'loop' used as 'loop1' at line 5)"),
    "unknown_kind_suggests_block": (
        BLOCK_HEAD + "  - dwon: {channels: 4}\nloss: mse\n",
        "net.yaml:10:5: error: unknown layer kind 'dwon' (did you mean 'down'?)"),
    "names_equal_in_c": (
        "input: [4]\n"
        "layers:\n"
        "  - linear: {name: a.b, out_features: 4}\n"
        "  - linear: {name: a_b, out_features: 4}\n"
        "loss: mse\n",
        "net.yaml:4:20: error: duplicate layer name 'a_b' (also layer 1 'a.b', the same in C, line 3)"),
}


@pytest.mark.parametrize("name", list(GRAPH_GOLDEN))
def test_golden_graph(name):
    text, expected = GRAPH_GOLDEN[name]
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "net.yaml")
    assert str(exc.value) == expected
