"""Lint of the generated C: no template leftovers a reader trips over.

Every spec in specs/, tests/specs/snapshot.yaml and a few odd shapes (stride, padding,
dilation, groups, ceil-mode and average pools) are rendered in float32 and float64 and the
C text is searched for (so is the C of every case tests/test_gradients.py checks, each
conv2d kernel path forced on the shapes it is checked on there; tests/test_vector_widths.py
lints the narrower vector widths):
- loops that run once or never (`for (int j = 0; j < 1; j++)`);
- multiplications by a literal 1 and additions of a literal 0 (`ky * 1`, `y + 0`);
- `(void)X;` in a function that then uses X;
- comparisons of a loop variable with a literal that are always true or always false;
- comments with runs of spaces or a stray `*;` (template text that lost its line break), or
  a count of 1 with a plural noun ("the last 1 pixels");
- offsets into the scratch, activation or cache buffers written as bare numbers
  (`scratch + 34741`) instead of a named macro.
No compiler is needed: these are properties of the text.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT, spec_params
from netcompiler.check import check_text, force_kernels
from netcompiler.render import render

try:  # the kernel-path cases; test_gradients.py skips itself without torch, which the lint does not need
    from test_gradients import CASES as GRAD_CASES, KERNELS
except pytest.skip.Exception:
    GRAD_CASES, KERNELS = {}, {}

# Odd shapes, each a small network that exercises options the shipped specs do not.
ODD_SPECS = {
    "stride2_pad": """
name: stride2_pad
input: [3, 17, 15]
layers:
  - conv2d: {out_channels: 8, kernel_size: 3, stride: 2, padding: 1}
  - relu
  - conv2d: {out_channels: 4, kernel_size: [3, 2], stride: [1, 2], padding: [2, 0]}
  - flatten
  - linear: {out_features: 5}
loss: cross_entropy
""",
    "dilation_groups": """
name: dilation_groups
input: [4, 20, 20]
layers:
  - conv2d: {out_channels: 8, kernel_size: 3, dilation: 2, groups: 2, padding: 2}
  - relu
  - conv2d: {out_channels: 8, kernel_size: 1, groups: 4, bias: false}
  - maxpool2d: {kernel_size: 3, stride: 2, ceil_mode: true}
  - flatten
  - linear: {out_features: 3}
loss: cross_entropy
""",
    "avgpool": """
name: avgpool
input: [2, 13, 13]
layers:
  - conv2d: {out_channels: 6, kernel_size: 3, padding: same}
  - avgpool2d: {kernel_size: 2, ceil_mode: true}
  - gelu
  - avgpool2d: {kernel_size: 3, stride: 1, padding: 1}
  - conv2d: {out_channels: 16, kernel_size: 3}
  - maxpool2d: {kernel_size: 2, padding: 1}
  - flatten
  - linear: {out_features: 4}
loss: mse
""",
    "kinds": """
name: kinds
input: [3, 9, 8]
layers:
  - conv2d: {out_channels: 40, kernel_size: 3, stride: 2, padding: [0, 1, 0, 1]}
  - relu6
  - maxpool2d: {kernel_size: 2, stride: 1, padding: [0, 1, 0, 1]}
  - hardswish
  - upsample: {scale_factor: [1, 2]}
  - upsample: {scale_factor: 2}
  - avgpool2d: {kernel_size: 3, stride: 1, padding: [1, 1, 0, 1], count_include_pad: false}
  - adaptive_avgpool2d: {output_size: [3, 4]}
  - silu
  - global_avgpool2d
  - flatten
  - batchnorm1d
  - linear: {out_features: 3}
loss: binary_cross_entropy
""",
    "kinds_unit": """
name: kinds_unit
input: [1, 1, 5]
layers:
  - upsample: {scale_factor: [2, 1]}
  - adaptive_avgpool2d: {output_size: [1, 3]}
  - upsample: {scale_factor: [1, 2]}
  - global_avgpool2d
  - flatten
loss: mse
""",
    "wide": """
name: wide
input: [16, 12, 12]
layers:
  - conv2d: {out_channels: 32, kernel_size: 3, padding: 1}
  - batchnorm2d
  - relu
  - conv2d: {out_channels: 16, kernel_size: 3}
  - maxpool2d: {kernel_size: 2, stride: 1}
  - dropout: {p: 0.25}
  - flatten
  - linear: {out_features: 7}
loss: cross_entropy
""",
    # conv2d on maps of 16 pixels (one vector: pointwise and depthwise loops over pixels run once)
    "maps_of_16": """
name: maps_of_16
input: [8, 4, 4]
layers:
  - conv2d: {out_channels: 16, kernel_size: 1, bias: false}
  - relu
  - conv2d: {out_channels: 16, kernel_size: 3, padding: 1, groups: 16}
  - conv2d: {out_channels: 8, kernel_size: 1}
  - flatten
  - linear: {out_features: 3}
loss: cross_entropy
""",
    # a last vector of one pixel (17 = 16 + 1) in a 1x1 convolution; depthwise on one row
    "tail_of_one": """
name: tail_of_one
input: [3, 1, 17]
layers:
  - conv2d: {out_channels: 4, kernel_size: 1}
  - relu
  - conv2d: {out_channels: 4, kernel_size: 1}
  - conv2d: {out_channels: 4, kernel_size: 3, padding: 1, groups: 4}
  - flatten
  - linear: {out_features: 3}
loss: mse
""",
}

SPEC_FILES = sorted((ROOT / "specs").glob("*.yaml")) + [ROOT / "tests/specs/snapshot.yaml"]
# specs whose leftovers are known (strict: a fix shows as XPASS, and the entry goes)
LINT_XFAIL: dict[str, str] = {}
CASES = [pytest.param(p.read_text(), str(p.relative_to(ROOT)), id=p.stem,
                      marks=[pytest.mark.xfail(reason=LINT_XFAIL[p.stem], strict=True)] if p.stem in LINT_XFAIL else [])
         for p in SPEC_FILES] + [
    pytest.param(text, f"{name}.yaml", id=name) for name, text in ODD_SPECS.items()]

# buffers whose offsets must be named (macros), not written as numbers
BUFFERS = r"(?:scratch|ws|acts|dacts|cache|c->cache|xt|V|M)"

# a loop with literal bounds; the step is ++, a literal or (a literal times) VEC
_FOR = re.compile(r"for \((?:int |const int )?(\w+) = (-?\d+); \1 (<|<=) (-?\d+); \1(\+\+|\s*\+= ((?:\d+ \* )?(?:\d+|VEC)))\)")


def _step(m, vec: int) -> int:
    if not m.group(6):
        return 1
    return eval(m.group(6).replace("VEC", str(vec)))  # digits, "*" and VEC only (the regex)


def _strip_comments(src: str) -> str:
    """The C with comments replaced by spaces (line structure kept)."""
    return re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: re.sub(r"[^\n]", " ", m.group()), src, flags=re.S)


def functions(code: str):
    """(name, body) of every function definition in comment-free C."""
    for m in re.finditer(r"^(?:static |inline |void |int |double |float |\w+ )[^;{}()]*?(\w+)\([^;{}]*\)\s*\{",
                         code, flags=re.M):
        depth, i = 1, m.end()
        while depth and i < len(code):
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        yield m.group(1), code[m.end():i]


def _trips(lo: int, op: str, hi: int, step: int) -> int:
    end = hi + (1 if op == "<=" else 0)
    return max(0, -(-(end - lo) // step))


def lint(src: str) -> list[str]:
    problems = []
    code = _strip_comments(src)
    vec = re.search(r"#define VEC (\d+)", code)
    vec = int(vec.group(1)) if vec else 16
    lines = code.splitlines()

    def at(pos: int) -> str:
        n = code.count("\n", 0, pos)
        return f"line {n + 1}: {lines[n].strip()}"

    for m in _FOR.finditer(code):
        step = _step(m, vec)
        if _trips(int(m.group(2)), m.group(3), int(m.group(4)), step) <= 1:
            problems.append(f"loop that runs at most once: {at(m.start())}")
    for m in re.finditer(r"(?<![\w.])\*\s*1(?![\w.])|(?<![\w.)\]])1\s*\*(?![/=])", code):
        problems.append(f"multiplication by 1: {at(m.start())}")
    for m in re.finditer(r"[+-] 0(?![\w.])", code):
        problems.append(f"adds or subtracts 0: {at(m.start())}")
    for name, body in functions(code):
        for v in re.finditer(r"\(void\)\s*(\w+);", body):
            # OMP(...) is empty without OpenMP: a variable read only there needs its (void)
            rest = re.sub(r"OMP\(.*\)", "", body[:v.start()] + body[v.end():])
            if re.search(rf"(?<![\w.>]){re.escape(v.group(1))}\b", rest):
                problems.append(f"(void){v.group(1)}; in {name}, which uses {v.group(1)}")
        # comparisons of loop variables with literals that cannot change outcome
        loops = {}
        for f in _FOR.finditer(body):
            step = _step(f, vec)
            lo, hi = int(f.group(2)), int(f.group(4)) + (1 if f.group(3) == "<=" else 0)
            if hi > lo:
                loops.setdefault(f.group(1), []).append((lo, lo + (hi - 1 - lo) // step * step))
        for var, ranges in loops.items():
            if len(ranges) != 1 or len(re.findall(rf"\bint {var}\b", body)) > 1:
                continue  # several loops with that name: ranges are not tracked per scope
            lo, hi = ranges[0]
            for c in re.finditer(rf"(?<![\w.]){var} (<|<=|>|>=|==|!=) (-?\d+)(?![\w.])", body):
                if re.match(rf"{var} (<|<=) -?\d+; {var}", body[c.start():c.start() + 60]):
                    continue  # the loop's own condition
                k = int(c.group(2))
                test = {"<": lambda v: v < k, "<=": lambda v: v <= k, ">": lambda v: v > k,
                        ">=": lambda v: v >= k, "==": lambda v: v == k, "!=": lambda v: v != k}[c.group(1)]
                values = {test(lo), test(hi)} if c.group(1) not in "==!=" else {test(v) for v in (lo, hi, k) if lo <= v <= hi}
                if c.group(1) in ("==", "!=") and not lo <= k <= hi:
                    values = {test(lo)}
                if len(values) == 1:
                    problems.append(f"{var} {c.group(1)} {k} is always {values.pop()} in {name} "
                                    f"({var} runs {lo}..{hi})")
    for m in re.finditer(rf"(?<![\w>.]){BUFFERS}\s*\+\s*\d{{3,}}\b", code):
        problems.append(f"unnamed buffer offset: {at(m.start())}")
    # comments, skipping the banner (its table aligns columns with spaces)
    for m in list(re.finditer(r"/\*.*?\*/|//[^\n]*", src, flags=re.S))[1:]:
        text = m.group()
        for line in text.splitlines():
            body = re.sub(r"^\s*(/\*|\*(?!;)|//)?", "", line).rstrip()
            body = re.sub(r"\*/$", "", body)
            if re.search(r"\S {3,}\S", body) or "*;" in body:
                problems.append(f"comment with a run of spaces or a stray '*;': {line.strip()}")
            if re.search(r"(?<![\w.])1 [a-z]+s\b", body):
                problems.append(f"comment counts 1 of a plural (the items filter words it): {line.strip()}")
    return problems


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("text, file", CASES)
def test_generated_c_has_no_leftovers(text, file, dtype):
    problems = lint(render(check_text(text, file), dtype).source)
    assert not problems, f"{file} ({dtype}): {len(problems)} problems:\n" + "\n".join(problems[:80])


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradient_cases_have_no_leftovers(case):
    """Every case tests/test_gradients.py checks (each kernel path forced on the shape
    classes it is checked on there)."""
    net = check_text(GRAD_CASES[case], f"{case}.yaml")
    if case in KERNELS:
        net = force_kernels(net, KERNELS[case])
    problems = lint(render(net, "float32").source)
    assert not problems, f"{case}: {len(problems)} problems:\n" + "\n".join(problems[:80])


@pytest.mark.parametrize("snippet, what", [
    ("void f(void)\n{\n    for (int j = 0; j < 1; j++)\n        g(j);\n}\n", "at most once"),
    ("void f(void)\n{\n    for (k = 288; k < 288; k++)\n        g(k);\n}\n", "at most once"),
    ("void f(void)\n{\n    for (int p0 = 0; p0 < 16; p0 += 16)\n        g(p0);\n}\n", "at most once"),
    ("void f(int ky)\n{\n    g(ky * 1);\n}\n", "multiplication by 1"),
    ("void f(int y)\n{\n    g(y + 0 - 9);\n}\n", "adds or subtracts 0"),
    ("void f(float *scratch)\n{\n    (void)scratch;\n    g(scratch);\n}\n", "(void)scratch"),
    ("void f(float *o)\n{\n    for (int x0 = 0; x0 < 32; x0 += 16)\n        if (x0 < 0)\n            g(x0);\n}\n",
     "always False"),
    ("#define VEC 16\nvoid f(float *o)\n{\n    for (int x0 = 0; x0 < 40; x0 += VEC) {\n        if (x0 < 48)\n            g(x0);\n    }\n}\n",
     "always True"),
    ("#define VEC 16\nvoid f(float *o)\n{\n    for (int x0 = 0; x0 < 14; x0 += VEC)\n        g(x0);\n}\n", "at most once"),
    ("void f(void)\n{\n    /* done one by one     *; stores */\n}\n", "comment"),
    ("void f(void)\n{\n    { /* the last 1 pixels */\n    }\n}\n", "counts 1 of a plural"),
    ("void f(float *scratch)\n{\n    g(scratch + 34741);\n}\n", "unnamed buffer offset"),
])
def test_lint_finds_each_pattern(snippet, what):
    problems = lint("/* banner */\n" + snippet)
    assert any(what in p for p in problems), problems


def test_lint_accepts_clean_code():
    clean = ("/* banner */\n#define F_SCRATCH_COL 512 /* col [4][128] */\n"
             "void f(float *scratch, int n)\n{\n    /* two taps.  Then the rest */\n"
             "    for (int j = 0; j < 2; j++)\n        if (j < 1)\n            g(scratch + F_SCRATCH_COL, j * 2 + n - 1);\n}\n")
    assert lint(clean) == []


def test_index_expressions_fold_numbers_and_keep_precedence():
    from netcompiler.cexpr import Ix, at, ix, loop, prod

    assert str((ix("ic") * 28 + ix("ky") * 1) * 28 + ix("kx") * 1) == "(ic * 28 + ky) * 28 + kx"
    assert str((Ix.of(0) * 32 + ix("y") + 2) * 32 + 2) == "(y + 2) * 32 + 2"
    assert str(ix("4 * i + j") * 2320) == "(4 * i + j) * 2320"
    assert str(ix("a % 6") * 25 + ix("a / 6")) == "(a % 6) * 25 + a / 6"
    assert str(-ix("a + b") + 3) == "3 - (a + b)" and str(-ix("ox") * 2 - 1) == "-ox * 2 - 1"
    assert str(Ix.of(13) - ix("oy") * 2) == "13 - oy * 2" and str(ix("y") - 9) == "y - 9"
    assert str(at("weight", Ix.of(0) * 150)) == "weight" and str(at("w", ix("i") * 150)) == "w + i * 150"
    assert prod(1, 32, 32) == "32 * 32" and prod("sizeof(real_t)", 1) == "sizeof(real_t)"
    once, twice, never = loop("grp", 0, 1), loop("m0", 0, 16, 8), loop("p", 784, 784)
    assert (once.head, str(once.v)) == ("", "0")
    assert twice.head == "for (int m0 = 0; m0 < 16; m0 += 8) " and str(twice.v) == "m0"
    assert not never.runs
    with pytest.raises(ValueError):
        never.head  # noqa: B018 (a loop that never runs has no head to emit)


# ---- the exported C (netc export --format c): every spec, both float targets with every conv
# form that applies, and int8 for the portable and the DSP target
EXPORT_SPECS = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "tests/specs").glob("export_*.yaml"))


def _export_builds() -> list[str]:
    from netcompiler.export.lower import CONV_FORMS

    return (["float32/generic", "float32/host"] + [f"float32/host/{f.name}" for f in CONV_FORMS if "host" in f.targets]
            + ["int8/generic", "int8/cortex-m4"])


@pytest.mark.parametrize("build", _export_builds())
@pytest.mark.parametrize("path", spec_params(EXPORT_SPECS))
def test_exported_c_has_no_leftovers(path, build):
    from netcompiler.check import load
    from netcompiler.export import _random_state_and_ranges, export_c, export_int8
    from netcompiler.export.lower import FORMS, lower

    network = load(path)
    state, ranges = _random_state_and_ranges(network)
    dtype, target, *form = build.split("/")
    if dtype == "int8":
        source = export_int8(network, state, None, target, ranges=ranges).source
    elif form:
        steps = [s for s in lower(network.layers, state, target) if s.op == "conv" and FORMS[form[0]].applies(s)]
        if not steps:
            pytest.skip(f"the conv form {form[0]} applies to no step of {path.stem}")
        source = export_c(network, state, target, forms={s.name: form[0] for s in steps}).source
    else:
        source = export_c(network, state, target).source
    problems = lint(source)
    assert not problems, f"{path.name} ({build}): {len(problems)} problems:\n" + "\n".join(problems[:80])
