"""What a spec's values may be: YAML 1.2 numbers, bounded options, names that stay valid C,
and diagnostics that stay on one line whatever the spec holds."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from netcompiler.check import check_text, load, name_from_path
from netcompiler.errors import Diagnostic, SpecErrors, printable
from netcompiler.render import render

ROOT = Path(__file__).resolve().parents[1]


def one(layer: str, input_shape: str = "[2, 6, 6]", extra: str = "") -> str:
    return f"input: {input_shape}\nlayers:\n  - {layer}\n  - flatten\nloss: mse\n{extra}"


def message(text: str) -> str:
    with pytest.raises(SpecErrors) as exc:
        check_text(text, "net.yaml")
    return str(exc.value)


def at(layer: str, token: str) -> str:
    """'net.yaml:3:COL' of the first `token` in the layer line `  - {layer}` of `one`."""
    return f"net.yaml:3:{('  - ' + layer).index(token) + 1}"


def value_of(layer: str, option: str) -> str:
    """'net.yaml:3:COL' of the value of `option` in that line (errors point at values)."""
    return f"net.yaml:3:{('  - ' + layer).index(option + ': ') + len(option) + 3}"


# ---- numbers: YAML 1.2 core schema ----------------------------------------------------------
@pytest.mark.parametrize("written, value", [
    ("1e-5", 1e-5), ("1E-3", 1e-3), ("5e2", 500.0), (".5", 0.5), ("0.001", 0.001), ("-1.5e-3", -1.5e-3),
    ("+2", 2.0), ("2", 2.0), ("1.", 1.0), ("+.25", 0.25), ("1e+2", 100.0),
])
def test_numbers_in_every_form_are_numbers(written, value):
    net = check_text(one(f"leaky_relu: {{negative_slope: {written}}}"), "net.yaml")
    assert net.layers[0].opts["negative_slope"] == value


def test_exponent_numbers_in_layer_options_and_train_section():
    text = ("input: [3, 4, 4]\nlayers:\n  - batchnorm2d: {eps: 1e-5, momentum: 1E-1}\n  - flatten\n"
            "  - dropout: {p: 2.5e-1}\nloss: mse\ntrain: {lr: 1e-3, weight_decay: 5e-4, mean: 1.307e-1, std: 3.081E-1,"
            " val_split: .1}\n")
    net = check_text(text, "net.yaml")
    assert net.layers[0].opts == {"eps": 1e-5, "momentum": 0.1}
    assert net.layers[2].opts == {"p": 0.25}
    assert net.train == {"lr": 1e-3, "weight_decay": 5e-4, "mean": 0.1307, "std": 0.3081, "val_split": 0.1}


def test_integers_are_decimal():
    # YAML 1.1 read 010 as octal 8; 1.2's core schema (and JSON) read decimal
    assert check_text(one("conv2d: {out_channels: 010, kernel_size: 3}"), "n.yaml").layers[0].opts["out_channels"] == 10


@pytest.mark.parametrize("layer, expected", [
    ("conv2d: {out_channels: 0x10, kernel_size: 3}",
     "conv2d: 'out_channels' must be an integer, got '0x10' (numbers are decimal, without "
     "'_': e.g. 16, 0.5, 1e-5)"),
    ("conv2d: {out_channels: 1_000, kernel_size: 3}",
     "conv2d: 'out_channels' must be an integer, got '1_000' (numbers are decimal, without "
     "'_': e.g. 16, 0.5, 1e-5)"),
    ("conv2d: {out_channels: 2, kernel_size: 3, bias: yes}",
     "conv2d: 'bias' must be true or false, got 'yes' (write true or false)"),
    ("conv2d: {out_channels: 2, kernel_size: 3, bias: off}",
     "conv2d: 'bias' must be true or false, got 'off' (write true or false)"),
    ("conv2d: {out_channels: 1:30, kernel_size: 3}",
     "conv2d: 'out_channels' must be an integer, got '1:30'"),
    ("leaky_relu: {negative_slope: 1e-5x}",
     "leaky_relu: 'negative_slope' must be a number, got '1e-5x'"),
    ("leaky_relu: {negative_slope: 2024-01-01}",
     "leaky_relu: 'negative_slope' must be a number, got '2024-01-01'"),
    ("leaky_relu: {negative_slope: .inf}",
     "leaky_relu: 'negative_slope' must be a finite number, got inf"),
    ("leaky_relu: {negative_slope: .nan}",
     "leaky_relu: 'negative_slope' must be a finite number, got nan"),
])
def test_what_is_not_a_number_or_a_boolean(layer, expected):
    option = re.search(r"'(\w+)'", expected).group(1)
    assert message(one(layer)) == f"{value_of(layer, option)}: error: {expected}"


def train_at(train: str, option: str) -> str:
    return f"net.yaml:6:{train.index(option + ': ') + len(option) + 3}"


def test_train_section_numbers_are_checked_with_location():
    train = "train: {lr: 1e-3x, epochs: 1e1, batch_size: 0x40}"
    assert message(one("relu", extra=train + "\n")).splitlines() == [
        f"{train_at(train, 'lr')}: error: train option 'lr' must be a number in [0, 1000], got '1e-3x'",
        f"{train_at(train, 'epochs')}: error: train option 'epochs' must be a positive integer (at most 1,048,576), "
        "got 10.0",
        f"{train_at(train, 'batch_size')}: error: train option 'batch_size' must be a positive integer (at most "
        "1,048,576), got '0x40' (numbers are decimal, without '_': e.g. 16, 0.5, 1e-5)",
    ]


# ---- absurd option values are refused at check time -----------------------------------------
@pytest.mark.parametrize("layer, expected", [
    ("conv2d: {out_channels: 2, kernel_size: 3, stride: 1000000000000000000000000000000}",
     "conv2d: 'stride' must be at most 1,048,576, got about 10^30"),
    ("conv2d: {out_channels: 2, kernel_size: 3, stride: [1, 2147483648]}",
     "conv2d: 'stride' must be at most 1,048,576, got 2147483648"),
    ("conv2d: {out_channels: 2, kernel_size: 3, dilation: 4294967296}",
     "conv2d: 'dilation' must be at most 1,048,576, got 4294967296"),
    ("conv2d: {out_channels: 2, kernel_size: 3, groups: 9999999999}",
     "conv2d: 'groups' must be at most 1,048,576, got 9999999999"),
    ("conv2d: {out_channels: 2, kernel_size: 3, padding: 2000000}",
     "conv2d: 'padding' must be at most 1,048,576, got 2000000"),
    ("conv2d: {out_channels: 2, kernel_size: 3, padding: 1000000}",
     "conv2d 'conv1': the padded input of a group has 8,000,048,000,072 elements; at most "
     "2,147,483,647"),
    ("conv2d: {out_channels: 100000000000000000000, kernel_size: 3}",
     "conv2d: 'out_channels' must be at most 1,048,576, got about 10^20"),
    ("maxpool2d: {kernel_size: 2, stride: 99999999999}",
     "maxpool2d: 'stride' must be at most 1,048,576, got 99999999999"),
    ("avgpool2d: {kernel_size: 4294967298}",
     "avgpool2d: 'kernel_size' must be at most 1,048,576, got 4294967298"),
    ("dropout: {p: 100000000000000000000000000000000000000000000}",
     "dropout: 'p' must be in [0, 1], got about 10^44"),
    ("leaky_relu: {negative_slope: 1e300}",
     "leaky_relu: 'negative_slope' must be in [-1e+06, 1e+06], got 1e+300"),
    ("batchnorm2d: {eps: 1e400}",
     "batchnorm2d: 'eps' must be a finite number, got inf"),
    ("batchnorm2d: {momentum: -1e-9}",
     "batchnorm2d: 'momentum' must be in [0, 1], got -1e-09"),
])
def test_absurd_option_values(layer, expected):
    option = "padding" if "padded input" in expected else re.search(r"'(\w+)'", expected).group(1)
    assert message(one(layer)) == f"{value_of(layer, option)}: error: {expected}"


def test_absurd_linear_and_train_values():
    assert message("input: [4]\nlayers:\n  - linear: {out_features: 1099511627776}\nloss: mse\n") == (
        "net.yaml:3:28: error: linear: 'out_features' must be at most 1,048,576, got 1099511627776")
    train = ("train: {batch_size: 100000000000, seed: 18446744073709551616, std: 0, "
             "lr: 1000000000000000000000000000000000000000000000, momentum: 1.5, mean: .inf}")
    assert message(one("relu", extra=train + "\n")).splitlines() == [
        f"{train_at(train, 'batch_size')}: error: train option 'batch_size' must be a positive integer (at most "
        "1,048,576), got 100000000000",
        f"{train_at(train, 'seed')}: error: train option 'seed' must be an integer >= 0 (at most "
        "9,223,372,036,854,775,807), got about 10^19",
        f"{train_at(train, 'std')}: error: train option 'std' must be positive, got 0",
        f"{train_at(train, 'lr')}: error: train option 'lr' must be a number in [0, 1000], got about 10^45",
        f"{train_at(train, 'momentum')}: error: train option 'momentum' must be a number in [0, 1], got 1.5",
        f"{train_at(train, 'mean')}: error: train option 'mean' must be a number in [0, 1e+06], got inf",
    ]


def test_largest_allowed_values_still_check():
    net = check_text(one("conv2d: {out_channels: 2, kernel_size: 3, stride: 1048576}"), "n.yaml")
    assert net.layers[0].out_shape == (2, 1, 1)


# ---- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("_", "starts with '_'"),           # `__real` is a GCC keyword
    ("_stdint", "starts with '_'"),     # header guard _STDINT_H of <stdint.h>
    ("_math", "starts with '_'"),       # _MATH_H
    ("_features", "starts with '_'"),   # _FEATURES_H
    ("_Net", "starts with '_'"),
    ("__x", "starts with '_'"),
    ("a__b", "contains '__'"),
    ("typeof", "is reserved in C"),
    ("asm", "is reserved in C"),
    ("bool", "is reserved in C"),
    ("int", "is reserved in C"),
])
def test_names_that_break_the_c_build_are_refused(name, why):
    text = f"name: {name}\ninput: [4]\nlayers:\n  - linear: {{out_features: 2, name: fc}}\nloss: mse\n"
    assert message(text).startswith(f"net.yaml:1:7: error: name '{name}' {why}")
    text = f"name: net\ninput: [4]\nlayers:\n  - linear: {{out_features: 2, name: {name}}}\nloss: mse\n"
    col = text.splitlines()[3].index("name: ") + len("name: ") + 1
    assert message(text).startswith(f"net.yaml:4:{col}: error: linear: layer name '{name}' {why}")


def test_underscore_message_says_why():
    text = "name: _stdint\ninput: [4]\nlayers: [relu]\nloss: mse\n"
    assert message(text) == (
        "net.yaml:1:7: error: name '_stdint' starts with '_': C reserves such identifiers for the compiler and "
        "the system headers (the generated _stdint_... and _STDINT_... could clash with theirs); start it with a "
        "letter")


@pytest.mark.parametrize("path, name", [
    ("lenet5.yaml", "lenet5"), ("my-net.v2.yaml", "my_net_v2"), ("_stdint.yaml", "stdint"), ("__x.yaml", "x"),
    ("9lives.yaml", "net_9lives"), ("int.yaml", "net_int"), ("a__b.yaml", "a_b"), ("_.yaml", "net"),
    ("<spec>", "spec"), ("a" * 60 + ".yaml", "a" * 48),
])
def test_names_derived_from_the_file_name_are_valid(path, name):
    assert name_from_path(path) == name
    assert check_text("input: [4]\nlayers: [relu]\nloss: mse\n", path).name == name


def _tokens(c_text: str) -> set[str]:
    c_text = re.sub(r"/\*.*?\*/", " ", c_text, flags=re.S)
    c_text = re.sub(r"//[^\n]*|\"[^\"\n]*\"", " ", c_text)
    return set(re.findall(r"\b[A-Za-z_]\w*\b", c_text))


# every layer kind, with options that select the template's other paths (Winograd conv,
# tiled and general pooling, batch-level layers, both GELUs)
ALL_KINDS = [
    ("[3, 12, 12]", ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1, name: zqa}", "relu: {name: zqb}",
                     "maxpool2d: {kernel_size: 2, name: zqc}", "batchnorm2d: {name: zqd}",
                     "conv2d: {out_channels: 4, kernel_size: 3, stride: 2, groups: 2, name: zqe}",
                     "avgpool2d: {kernel_size: 2, padding: 1, name: zqf}",
                     "maxpool2d: {kernel_size: 3, stride: 1, padding: 1, ceil_mode: true, name: zqg}",
                     "gelu: {approximate: tanh, name: zqh}", "dropout: {name: zqi}", "flatten: {name: zqj}",
                     "linear: {out_features: 40, name: zqk}", "leaky_relu: {name: zql}", "tanh: {name: zqm}",
                     "sigmoid: {name: zqn}", "gelu: {name: zqo}", "linear: {out_features: 3, name: zqp}"]),
    ("[16, 32, 32]", ["conv2d: {out_channels: 16, kernel_size: 3, padding: 1, name: zqa}", "relu: {name: zqb}",
                      "maxpool2d: {kernel_size: 2, name: zqc}", "conv2d: {out_channels: 8, kernel_size: 5, name: zqd}",
                      "flatten: {name: zqe}", "linear: {out_features: 3, name: zqf}"]),
]


def test_no_user_name_can_make_a_generated_name_collide():
    """Every identifier the generated C makes from a user's name is PREFIX + name + SUFFIX.
    For each such pattern and each identifier that is there anyway (the templates' own, the
    system headers'), a name that would turn the pattern into that identifier must be
    refused by the checker; and no two patterns may overlap (a name plus a suffix giving
    another name plus another suffix)."""
    patterns: set[tuple[str, str]] = set()
    fixed: set[str] = set()
    sources = []
    for shape, layers in ALL_KINDS:
        text = (f"name: zqnet\ninput: {shape}\nlayers:\n" + "".join(f"  - {l}\n" for l in layers)
                + "loss: cross_entropy\n")
        for dtype in ("float32", "float64"):
            r = render(check_text(text, "x.yaml"), dtype)
            sources.append(r.source)
            for t in _tokens(r.source + r.header):
                m = re.fullmatch(r"(.*?)(zq[a-z]+|ZQNET)(_.*)?", t)
                if m:
                    patterns.add((m.group(1), m.group(3) or ""))
                else:
                    fixed.add(t)
    assert ("", "_forward") in patterns and ("OFF_", "_out") in patterns and ("", "_H") in patterns
    includes = "".join(sorted({l + "\n" for s in sources for l in s.splitlines() if l.startswith("#include <")}))
    out = subprocess.run(["cc", "-std=c11", "-fopenmp", "-E", "-dM", "-"], input=includes, capture_output=True,
                         text=True, check=True).stdout
    out += subprocess.run(["cc", "-std=c11", "-fopenmp", "-E", "-"], input=includes, capture_output=True,
                          text=True, check=True).stdout
    system = set(re.findall(r"\b[A-Za-z_]\w*\b", out))
    assert "_STDINT_H" in system or "_STDINT_H_" in system or "__STDINT_H" in system or "uint64_t" in system
    candidates = set()
    for prefix, suffix in patterns:
        for t in fixed | system:
            if t.startswith(prefix) and t.endswith(suffix) and len(t) > len(prefix) + len(suffix):
                candidates.add(t[len(prefix):len(t) - len(suffix)])
        for p2, s2 in patterns:
            if (p2, s2) != (prefix, suffix) and p2 == prefix and s2.endswith("_" + suffix.lstrip("_")) and suffix:
                pytest.fail(f"generated names {prefix}NAME{suffix} and {p2}NAME{s2} can collide")
    for name in sorted(candidates):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            continue
        for spelt in {name, name.lower()}:
            for text in (f"name: {spelt}\ninput: [4]\nlayers: [relu]\nloss: mse\n",
                         f"name: zz\ninput: [4]\nlayers:\n  - relu: {{name: {spelt}}}\nloss: mse\n"):
                with pytest.raises(SpecErrors):
                    check_text(text, "n.yaml")


def test_ordinary_names_near_generated_ones_still_build():
    """Names that equal identifiers of the templates or of the system headers (used only as
    prefixes, they cannot collide) compile warning-free and run."""
    import numpy as np

    from conftest import build

    layers = ["linear: {out_features: 4, name: count}", "relu: {name: forward}", "tanh: {name: window}",
              "relu: {name: OFF}", "relu: {name: X}", "relu: {name: 'NULL'}", "relu: {name: EOF}",
              "relu: {name: real}", "relu: {name: vload}", "relu: {name: string}", "relu: {name: M}",
              "linear: {out_features: 2, name: INT32}"]
    for net_name in ("stdint", "math", "features", "omp"):
        text = (f"name: {net_name}\ninput: [3]\nlayers:\n" + "".join(f"  - {l}\n" for l in layers)
                + "loss: cross_entropy\n")
        net = build(text, "float32", file=f"{net_name}.yaml")
        loss, grads = net.loss_and_grad(np.ones((2, 3), np.float32), np.array([0, 1], np.int32))
        assert np.isfinite(loss) and set(grads) == {"count.weight", "count.bias", "INT32.weight", "INT32.bias"}


# ---- diagnostics stay on one line ----------------------------------------------------------
def test_printable_escapes_control_characters():
    assert printable("plain text, é") == "plain text, é"
    assert printable("a\nb\rc\td\x1b[31m\x00\x7f\u2028\u200b\xa0") == "a\\nb\\rc\\td\\x1b[31m\\x00\\x7f\\u2028\\u200b\\xa0"


def test_a_name_with_a_newline_gives_a_one_line_diagnostic():
    text = 'name: "evil\\nnet.yaml:1:1: error: fake"\ninput: [4]\nlayers:\n  - relu: {name: "r\\x1b[2J"}\nloss: mse\n'
    lines = message(text).splitlines()
    assert lines == [
        "net.yaml:1:7: error: name 'evil\\nnet.yaml:1:1: error: fake' is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)",
        "net.yaml:4:18: error: relu: layer name 'r\\x1b[2J' is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)",
    ]


def test_unknown_keys_and_kinds_with_control_characters_are_escaped():
    text = 'input: [4]\nlayers:\n  - "re\\nlu"\n  - relu: {"sl\\u2028ope": 1}\nloss: mse\n"x\\ty": 1\n'
    lines = message(text).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("net.yaml:3:5: error: unknown layer kind 're\\nlu'")
    assert lines[1].startswith("net.yaml:4:12: error: relu: unknown option 'sl\\u2028ope'")
    assert lines[2].startswith("net.yaml:6:1: error: unknown key 'x\\ty'")


def test_a_spec_path_with_a_newline_is_escaped(tmp_path):
    d = tmp_path / "a\nb"
    d.mkdir()
    (d / "net.yaml").write_text("input: [4]\nlayers: [relu]\nloss: crossentropy\n")
    with pytest.raises(SpecErrors) as exc:
        load(d / "net.yaml")
    assert str(exc.value) == (f"{tmp_path}/a\\nb/net.yaml:3:7: error: unknown loss 'crossentropy' (did you mean "
                              f"'cross_entropy'?); expected one of cross_entropy, mse")
    assert str(Diagnostic("f\n", 1, 1, "m\r")) == "f\\n:1:1: error: m\\r"


# ---- the spec file ------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_spec_file(tmp_path):
    p = tmp_path / "net.yaml"
    p.write_text("input: [4]\nlayers: [relu]\nloss: mse\n")
    p.chmod(0)
    with pytest.raises(SpecErrors) as exc:
        load(p)
    assert str(exc.value) == f"{p}:1:1: error: cannot read spec: Permission denied"


def test_spec_over_the_size_bound_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.yaml"
    with open(p, "wb") as f:
        f.truncate(10 * 2**30)  # a sparse 10 GiB file: reading it would take long and much memory
    with pytest.raises(SpecErrors) as exc:
        load(p)
    assert str(exc.value) == f"{p}:1:1: error: spec is 10,737,418,240 bytes; specs over 1 MiB are refused"


def test_a_symlink_to_a_spec_is_read(tmp_path):
    (tmp_path / "real.yaml").write_text("name: linked\ninput: [4]\nlayers: [relu]\nloss: mse\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "real.yaml")
    assert load(tmp_path / "link.yaml").name == "linked"


# ---- one rule per training value: the spec, the CLI, Net ------------------------------------------
@pytest.mark.parametrize("key, flag, bad, good", [
    ("lr", "--lr", 1e30, 0.5), ("momentum", "--momentum", 1.5, 0.5), ("weight_decay", "--weight-decay", -1, 0.01),
    ("epochs", "--epochs", 0, 3), ("batch_size", "--batch-size", 2**21, 8), ("seed", "--seed", -1, 7),
    ("val_split", "--val-split", 1.0, 0.2),
])
def test_training_values_have_one_rule(key, flag, bad, good, capsys):
    from netcompiler.check import check_text, train_value
    from netcompiler.cli import build_parser

    with pytest.raises(ValueError):
        train_value(key, bad)
    assert train_value(key, good) == good
    with pytest.raises(SpecErrors, match=f"train option '{key}' must be"):
        check_text(f"input: [4]\nlayers: [{{linear: {{out_features: 2}}}}]\nloss: mse\ntrain: {{{key}: {bad!r}}}\n")
    check_text(f"input: [4]\nlayers: [{{linear: {{out_features: 2}}}}]\nloss: mse\ntrain: {{{key}: {good!r}}}\n")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "x.yaml", "--data", "d", flag, str(bad)])
    assert "must be" in capsys.readouterr().err
    args = build_parser().parse_args(["train", "x.yaml", "--data", "d", flag, str(good)])
    assert getattr(args, key) == good


@pytest.mark.parametrize("what, bad", [("lr", 1e30), ("lr", float("nan")), ("lr", -1), ("momentum", 1.5),
                                       ("weight_decay", -0.1)])
def test_net_optimizer_values_follow_the_same_rule(what, bad):
    import netcompiler as nc
    from netcompiler.check import check_text

    net = nc.compile(check_text("input: [4]\nlayers: [{linear: {out_features: 2}}]\nloss: mse\n"), threads=1)
    with pytest.raises(ValueError, match=f"{what} must be"):
        net.set_optimizer("momentum", **{what: bad})
    if what == "lr":
        with pytest.raises(ValueError, match="lr must be"):
            net.lr = bad
