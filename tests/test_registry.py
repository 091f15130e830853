"""Every registered layer kind has a template and gradient tests for every option.

The coverage comes from tests/test_gradients.py: `COVERED` lists, per kind, the options
its cases set explicitly, and `COVERED_VALUES` the values they use.  Adding a layer kind
or an option without a gradient case makes these tests fail.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from netcompiler.check import LOSSES
from netcompiler.layers import REGISTRY
from test_gradients import COVERED, COVERED_LOSSES, COVERED_VALUES, OMITTED

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "layers"
CHECK_ONLY = {"in_channels", "in_features"}  # compared with the input shape, no effect on code
KINDS = sorted(REGISTRY)


def test_registry_is_not_empty_and_keyed_by_kind():
    assert len(REGISTRY) >= 12
    for name, kind in REGISTRY.items():
        assert kind.kind == name


@pytest.mark.parametrize("kind", KINDS)
def test_kind_has_a_template(kind):
    path = TEMPLATES / REGISTRY[kind].template
    assert path.is_file(), f"layer kind '{kind}' names template {path}, which does not exist"
    text = path.read_text()
    for macro in ("forward_def", "backward_def", "forward_call", "backward_call"):
        assert f"macro {macro}(" in text, f"{path.name} does not define the macro {macro}"


@pytest.mark.parametrize("kind", KINDS)
def test_kind_has_gradient_cases(kind):
    assert kind in COVERED, f"layer kind '{kind}' has no case in tests/test_gradients.py CASES"


@pytest.mark.parametrize("kind, option", [(k, o.name) for k in KINDS for o in REGISTRY[k].options
                                          if o.name not in CHECK_ONLY])
def test_every_option_has_a_gradient_case(kind, option):
    assert option in COVERED.get(kind, set()), \
        f"option '{option}' of '{kind}' is never set in tests/test_gradients.py CASES"


def _value_classes(kind: str, opt) -> dict[str, object]:
    """Value classes each option must be tested with: name -> predicate on the raw YAML value."""
    if opt.kind == "bool":
        return {"true": lambda v: v is True, "false": lambda v: v is False}
    if opt.kind == "choice":
        return {c: (lambda c: lambda v: v == c)(c) for c in opt.choices}
    if opt.kind == "pair":
        classes = {"int": lambda v: isinstance(v, int),
                   "non-square pair": lambda v: isinstance(v, list) and v[0] != v[1]}
        if opt.name in ("stride", "dilation", "kernel_size"):
            classes["above 1"] = lambda v: (v if isinstance(v, int) else max(v)) > 1
        return classes
    four = {"[top, bottom, left, right]": lambda v: isinstance(v, list) and len(v) == 4
            and (v[0] != v[1] or v[2] != v[3])}  # asymmetric
    if opt.kind == "padding":
        return {"int": lambda v: isinstance(v, int) and v > 0, "pair": lambda v: isinstance(v, list) and len(v) == 2,
                "same": lambda v: v == "same", "valid": lambda v: v == "valid", **four}
    if opt.kind == "pads":
        return {"int": lambda v: isinstance(v, int) and v > 0,
                "non-square pair": lambda v: isinstance(v, list) and len(v) == 2 and v[0] != v[1], **four}
    if opt.kind == "int" and opt.name == "groups":
        return {"groups > 1": lambda v: v > 1}
    if opt.kind == "float":
        return {"non-default": lambda v: v != opt.default}
    return {"set": lambda v: True}


@pytest.mark.parametrize("kind, option", [(k, o.name) for k in KINDS for o in REGISTRY[k].options
                                          if o.name not in CHECK_ONLY])
def test_every_option_value_class_is_covered(kind, option):
    opt = next(o for o in REGISTRY[kind].options if o.name == option)
    used = COVERED_VALUES.get((kind, option), [])
    defaulted = OMITTED in used and not opt.required and opt.default is not None  # left at its default
    used = [v for v in used if v != OMITTED] + ([opt.default] if defaulted else [])
    missing = [name for name, pred in _value_classes(kind, opt).items() if not any(pred(v) for v in used)]
    assert not missing, f"'{kind}' option '{option}' is never tested with: {', '.join(missing)} (values used: {used})"


def test_conv_same_padding_covers_odd_and_even_kernels():
    from conftest import raw_layers
    from test_gradients import CASES

    kernels = [o["kernel_size"] for t in CASES.values() for k, o in raw_layers(t)
               if k == "conv2d" and o.get("padding") == "same"]
    flat = [d for k in kernels for d in (k if isinstance(k, list) else [k])]
    assert any(d % 2 for d in flat) and any(d % 2 == 0 for d in flat), kernels


def test_depthwise_conv_is_covered():
    from netcompiler.check import check_text
    from test_gradients import CASES

    depthwise = [case for case, text in CASES.items() for l in check_text(text).layers
                 if l.kind.kind == "conv2d" and l.opts["groups"] == l.in_shape[0] > 1]
    assert depthwise, "no depthwise convolution (groups == in_channels) among the gradient cases"


def test_every_loss_is_covered():
    assert set(LOSSES) <= COVERED_LOSSES, f"losses without gradient cases: {set(LOSSES) - COVERED_LOSSES}"
