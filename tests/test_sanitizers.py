"""The generated C under AddressSanitizer + UndefinedBehaviorSanitizer, and warning-free.

- Specs that use every layer kind (strided/padded/grouped/'same' convolutions, max-pooling
  with ceil_mode and padding, average pooling, batch norm, dropout, every activation) are
  rendered, written next to tests/c/driver.c and compiled with
  `-fsanitize=address,undefined -Wall -Wextra -Werror`.  The driver allocates every array
  at exactly the header's sizes and calls every entry point with capacities 1 and 3; the
  test runs it and requires exit status 0 and no sanitizer report.
- Every spec under specs/ compiles with the project's default flags plus -Werror (and with
  clang too when it is installed).
"""
from __future__ import annotations

import concurrent.futures
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, heavy_spec, spec
from netcompiler.build import BASE_FLAGS, WARNINGS, compiler, default_flags, has_openmp
from netcompiler.check import check_text, load
from netcompiler.render import render

DRIVER = ROOT / "tests" / "c" / "driver.c"
# and the spec whose convolutions take the pointwise and depthwise paths
SPECS = sorted((ROOT / "specs").glob("*.yaml")) + [ROOT / "tests/specs/mobilenet_tiny.yaml"]
SANITIZE = ["-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror"]
SANITIZE_EXTRA: list[str] = []
RUNS = ["1:1", "3:1", "1:2", "3:2", "3:2:1"]  # capacity:threads[:team] (batch sizes 1 and 3)
# batchnorm1d has one value per feature and sample: training needs 2 samples in every batch
# (Python refuses fewer, Net.check_training_batch), so san_kinds runs capacities 3 and 5 (the
# driver's train_batches splits its 5 rows into batches of the capacity: 3 + 2, or 5)
RUNS_OF = {"san_kinds": ["3:1", "5:1", "3:2", "5:2", "5:2:1"]}

SAN_SPECS = {
    # every kind, cross-entropy
    "san_all": spec([2, 9, 8], [
        "conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: 1}",
        "batchnorm2d: {eps: 0.001, momentum: 0.2}",
        "relu",
        "conv2d: {out_channels: 4, kernel_size: [3, 2], padding: same, groups: 2, dilation: [2, 1]}",
        "leaky_relu: {negative_slope: 0.1}",
        "maxpool2d: {kernel_size: 2, stride: 2, padding: 1, ceil_mode: true}",
        "gelu: {approximate: tanh}",
        "avgpool2d: {kernel_size: 2, stride: 1, padding: 1, ceil_mode: true, count_include_pad: false}",
        "dropout: {p: 0.25}",
        "conv2d: {out_channels: 8, kernel_size: 2, groups: 4, bias: false}",
        "tanh",
        "maxpool2d: {kernel_size: [2, 1], stride: 1, dilation: [1, 2]}",
        "flatten",
        "linear: {out_features: 8}",
        "gelu",
        "dropout",
        "sigmoid",
        "linear: {out_features: 4, bias: false}",
    ], name="san_all"),
    # parameter-free and batch-level layers first and last, mean squared error
    "san_mse": spec([3, 6, 5], [
        "batchnorm2d",
        "maxpool2d: {kernel_size: 3, stride: 1, padding: 1}",
        "dropout: {p: 0.5}",
        "conv2d: {out_channels: 3, kernel_size: 3, groups: 3, padding: valid, dilation: [1, 2]}",
        "avgpool2d: {kernel_size: 3, stride: 2, padding: 1, ceil_mode: true}",
        "conv2d: {out_channels: 2, kernel_size: 1, padding: [1, 0]}",
        "batchnorm2d",
    ], loss="mse", name="san_mse"),
    # a graph: a residual add with a fused ReLU, a tensor with three readers (one of them
    # batch-level, adding from its own slot), concat parts in place and copied, 1-D concat
    "san_graph": spec([2, 6, 6], [
        "conv2d: {name: x, out_channels: 3, kernel_size: 3, padding: 1}",
        "conv2d: {name: y, out_channels: 3, kernel_size: 3, padding: 1, bias: false}",
        "batchnorm2d: {name: bn, inputs: [y]}",
        "add: {name: sum, inputs: [bn, x]}",
        "relu",
        "maxpool2d: {name: pool, kernel_size: 2}",
        "conv2d: {name: z, out_channels: 2, kernel_size: 2, stride: 2, inputs: [x]}",
        "avgpool2d: {name: pin, kernel_size: 2, inputs: [input]}",
        "concat: {name: cat, inputs: [pool, pin, z, pool]}",
        "flatten",
        "linear: {name: h, out_features: 6}",
        "linear: {name: g, out_features: 6, inputs: [h]}",
        "concat: {inputs: [g, h]}",
        "linear: {out_features: 3}",
    ], name="san_graph"),
    # convolution GEMMs with several register blocks, a prime channel count and > 128 taps
    "san_gemm": spec([3, 9, 8], [
        "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        "relu",
        "conv2d: {out_channels: 11, kernel_size: 5, padding: same}",
        "maxpool2d: {kernel_size: 2}",
        "conv2d: {out_channels: 12, kernel_size: [4, 3]}",
        "flatten",
        "linear: {out_features: 32}",
        "linear: {out_features: 5}",
    ], name="san_gemm"),
    # Winograd 3x3 convolutions: channels not a multiple of the vector width, zero padding, an
    # odd output (a cut last tile), no bias; a full-vector one with bias after it; then the last
    # 3 pixels of a gathered forward as dot products (dot_tail: 72 taps, groups, no bias)
    "san_wino": spec([17, 7, 9], [
        "conv2d: {out_channels: 20, kernel_size: 3, padding: 1, bias: false}",
        "relu",
        "conv2d: {out_channels: 32, kernel_size: 3}",
        "conv2d: {out_channels: 32, kernel_size: 3, padding: 1, groups: 4, bias: false}",
        "flatten",
        "linear: {out_features: 3}",
    ], name="san_wino"),
    # the Winograd input gradient (winograd_dx, padding 1): rows of 18 (one transposed vector of
    # columns, two one by one), 17 and 20 channels (a cut vector of channels), a fused ReLU, a
    # full-vector one without bias; their weight gradients' im2row transposed from vectors too
    "san_wino_dx": spec([16, 4, 18], [
        "conv2d: {out_channels: 17, kernel_size: 1}",
        "conv2d: {out_channels: 20, kernel_size: 3, padding: 1}",
        "relu",
        "conv2d: {out_channels: 16, kernel_size: 3, padding: 1, bias: false}",
        "flatten",
        "linear: {out_features: 3}",
    ], name="san_wino_dx"),
    # the Winograd weight gradient: the first layer (winograd_dw, no input gradient, 16 x 1 vector
    # tiles), lopsided padding with the GEMM input gradient (winograd_dw, 8 x 2) and both Winograd
    # gradients (winograd_dw_dx, 8 x 3), over rows of 20 and 21 pixels (one transposed vector of
    # columns, the rest one by one)
    "san_wino_dw": spec([16, 6, 20], [
        "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        "relu",
        "conv2d: {out_channels: 32, kernel_size: 3, padding: [1, 0, 2, 1], bias: false}",
        "conv2d: {out_channels: 48, kernel_size: 3, padding: 1}",
        "flatten",
        "linear: {out_features: 3}",
    ], name="san_wino_dw"),
    # max-pooling's tiled path (pool.py, tiling()) in all its shapes: a row and a column in no
    # window; vector blocks of 16, 8 and 2 columns with cut last windows in scalar code; a row
    # with one whole window; vectors over channels, with only cut windows in a row
    "san_pool": spec([2, 63, 39], [
        "conv2d: {out_channels: 4, kernel_size: 1}",
        "maxpool2d: {kernel_size: 2}",
        "maxpool2d: {kernel_size: 2, ceil_mode: true}",
        "maxpool2d: {kernel_size: [1, 3], ceil_mode: true}",
        "maxpool2d: {kernel_size: [2, 3], ceil_mode: true}",
        "maxpool2d: {kernel_size: 3, ceil_mode: true}",
        "flatten",
        "linear: {out_features: 4}",
    ], loss="mse", name="san_pool"),
    # im2col on the fly: the weight gradient too, first and not (620 pixels: a cut last vector);
    # then with stride 2 and padding (its last pixel vectors start early); fused ReLUs: conv ->
    # relu -> tiled and general max-pools, linear -> relu -> linear
    "san_fused": spec([3, 20, 31], [
        "conv2d: {out_channels: 4, kernel_size: 3, padding: 1}",
        "conv2d: {out_channels: 6, kernel_size: 3, padding: 1}",
        "conv2d: {out_channels: 8, kernel_size: 3, stride: 2, padding: 1}",
        "relu",
        "maxpool2d: {kernel_size: 2, ceil_mode: true}",
        "conv2d: {out_channels: 16, kernel_size: 3, padding: 1}",
        "relu",
        "maxpool2d: {kernel_size: 3, stride: 1, padding: 1}",
        "flatten",
        "linear: {out_features: 20}",
        "relu",
        "linear: {out_features: 4}",
    ], name="san_fused"),
    # a 1-D network: flatten and activations first, dropout last
    "san_1d": spec([7], ["flatten", "gelu", "linear: {out_features: 6}", "relu", "linear: {out_features: 3}",
                         "dropout: {p: 0.1}"], name="san_1d"),
    # conv2d's pointwise and depthwise paths (their vector loads reach past rows and planes): a
    # pointwise first layer with a cut last vector (171 pixels), depthwise stride 1 (rows of 19:
    # a whole vector and a cut one) and stride 2 (5x10) without bias, pointwise after them
    "san_paths": spec([3, 9, 19], [
        "conv2d: {out_channels: 4, kernel_size: 1}",
        "conv2d: {out_channels: 4, kernel_size: 3, padding: 1, groups: 4}",
        "relu",
        "conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: 1, groups: 4, bias: false}",
        "conv2d: {out_channels: 5, kernel_size: 1}",
        "flatten",
        "linear: {out_features: 3}",
    ], name="san_paths"),
    # batch norms (and ReLUs) folded into the evaluation forward (plan.py, eval_folds): depthwise
    # stride 2, pointwise (evaluation only: training runs a GEMM path), then without a ReLU
    "san_fold": spec([16, 12, 12], [
        "conv2d: {out_channels: 16, kernel_size: 1}",
        "conv2d: {out_channels: 16, kernel_size: 3, stride: 2, padding: 1, groups: 16, bias: false}",
        "batchnorm2d",
        "relu",
        "conv2d: {out_channels: 24, kernel_size: 1, bias: false}",
        "batchnorm2d",
        "relu",
        "conv2d: {out_channels: 5, kernel_size: 1}",
        "batchnorm2d",
        "flatten",
        "linear: {out_features: 3}",
    ], name="san_fold"),
    # the kinds of modern small networks
    "san_kinds": spec([3, 9, 8], [
        "conv2d: {out_channels: 4, kernel_size: 3, stride: 2, padding: [0, 1, 0, 1]}",
        "relu6",
        "maxpool2d: {kernel_size: 2, stride: 1, padding: [0, 1, 0, 1]}",
        "hardswish",
        "avgpool2d: {kernel_size: 3, stride: 1, padding: [1, 1, 0, 1], count_include_pad: false}",
        "upsample: {scale_factor: [2, 1]}",
        "adaptive_avgpool2d: {output_size: [4, 3]}",
        "silu",
        "global_avgpool2d",
        "flatten",
        "batchnorm1d: {eps: 0.001, momentum: 0.2}",
        "linear: {out_features: 3}",
    ], loss="binary_cross_entropy", name="san_kinds"),
}
CASES = [("san_all", "float32"), ("san_all", "float64"), ("san_mse", "float32"), ("san_mse", "float64"),
         ("san_gemm", "float32"), ("san_gemm", "float64"),
         ("san_wino", "float32"), ("san_wino", "float64"), ("san_wino_dx", "float32"), ("san_wino_dx", "float64"),
         ("san_wino_dw", "float32"), ("san_wino_dw", "float64"),
         ("san_pool", "float32"), ("san_pool", "float64"),
         ("san_fused", "float32"), ("san_fused", "float64"), ("san_1d", "float64"),
         ("san_kinds", "float32"), ("san_kinds", "float64"),
         ("san_graph", "float32"), ("san_graph", "float64"), ("san_paths", "float32"), ("san_paths", "float64"),
         ("san_fold", "float32"), ("san_fold", "float64")]


def _write(rendered, directory: Path) -> Path:
    c = directory / f"{rendered.name}.c"
    c.write_text(rendered.source)
    (directory / f"{rendered.name}.h").write_text(rendered.header)
    return c


def _omp_flags(cc: str) -> list[str]:
    return ["-fopenmp"] if has_openmp(cc) else ["-Wno-unknown-pragmas"]


def test_san_paths_takes_the_pointwise_and_depthwise_paths():
    from netcompiler.plan import make_plan

    paths = [lp.kernel.path.name for lp in make_plan(check_text(SAN_SPECS["san_paths"])).layers if lp.kernel]
    assert paths == ["pointwise", "depthwise", "depthwise", "pointwise"]


def test_san_wino_dx_takes_winograd_dx_with_transposed_copies():
    from netcompiler.plan import make_plan

    convs = [lp for lp in make_plan(check_text(SAN_SPECS["san_wino_dx"])).layers if lp.kind == "conv2d"]
    assert [lp.kernel.path.name for lp in convs[1:]] == ["winograd_dx", "winograd_dw_dx"]
    assert all(lp.c["WG_IN_WFULL"] == 16 and lp.c["WGX"]["WG_IN_WFULL"] == 16 for lp in convs[1:])
    assert convs[1].c["IM2ROW_VEC"] and convs[2].c["DWY"]["WG_IN_WFULL"] == 16


def test_san_wino_dw_takes_the_winograd_weight_gradient():
    from netcompiler.plan import make_plan

    convs = [lp for lp in make_plan(check_text(SAN_SPECS["san_wino_dw"])).layers if lp.kind == "conv2d"]
    assert [lp.kernel.path.name for lp in convs] == ["winograd_dw", "winograd_dw", "winograd_dw_dx"]
    assert [(lp.c["DW_IB"], lp.c["DW_CB"]) for lp in convs] == [(16, 1), (8, 2), (8, 3)]
    assert [lp.c["DWY"]["WG_IN_WFULL"] for lp in convs] == [16, 16, 16]


def test_san_fold_folds_its_batch_norms():
    from netcompiler.plan import make_plan

    plan = make_plan(check_text(SAN_SPECS["san_fold"]))
    convs = [lp for lp in plan.layers if lp.kernel]
    assert [(lp.kernel.path.name, lp.kernel.evaluates.name) for lp in convs] == [
        ("pointwise", "pointwise"), ("depthwise", "depthwise"), ("gather", "pointwise"), ("pointwise", "pointwise")]
    assert [(lp.fold_bn and lp.fold_bn.name, lp.fold_relu) for lp in convs] == [
        (None, False), ("bn1", True), ("bn2", True), ("bn3", False)]


def test_san_specs_use_every_layer_kind():
    from netcompiler.layers import REGISTRY

    used = {l.kind.kind for name in ("san_all", "san_kinds", "san_graph") for l in check_text(SAN_SPECS[name]).layers}
    assert used == set(REGISTRY), f"kinds missing from san_all, san_kinds and san_graph: {set(REGISTRY) - used}"


@pytest.mark.parametrize("name, dtype", CASES)
def test_sanitizers_clean(name, dtype, tmp_path):
    run_sanitized(name, dtype, tmp_path)


def run_sanitized(name: str, dtype: str, tmp_path: Path, vec: int | None = None,
                  march: tuple[str, ...] = ()) -> None:
    """SAN_SPECS[name] rendered (with vectors of `vec` reals when given), built with the
    sanitizers (and `march`) against the driver, run clean."""
    cc = shutil.which("gcc") or compiler()
    text = SAN_SPECS[name]
    net = check_text(text, f"{name}.yaml")
    rendered = render(net, dtype, SANITIZE, vec=vec)
    c_file = _write(rendered, tmp_path)
    exe = tmp_path / f"{name}_driver"
    defines = [f"-DNET={name}", f"-DNETU={name.upper()}", f'-DNET_HEADER="{name}.h"',
               f"-DNET_CE={int(net.loss == 'cross_entropy')}"]
    cmd = [cc, *SANITIZE, *march, *SANITIZE_EXTRA, *_omp_flags(cc), f"-I{tmp_path}", *defines, str(c_file),
           str(DRIVER), "-o", str(exe), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "sanitize" in proc.stderr and "cannot find" in proc.stderr:
        pytest.skip(f"the sanitizer runtime is not installed: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, f"compile failed:\n{' '.join(cmd)}\n{proc.stderr}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", OMP_WAIT_POLICY="passive")
    run = subprocess.run([str(exe), *RUNS_OF.get(name, RUNS)], capture_output=True, text=True, timeout=300, env=env)
    report = run.stderr
    assert run.returncode == 0, f"{name} ({dtype}) driver exited {run.returncode}:\n{report[-6000:]}"
    for marker in ("AddressSanitizer", "runtime error", "LeakSanitizer", "FAILED"):
        assert marker not in report, f"{name} ({dtype}): {marker} report:\n{report[-6000:]}"
    assert run.stdout.strip() == "ok"


# ---- warning-free with the project's flags -----------------------------------------------------
def _compile_only(cc: str, flags: list[str], rendered, directory: Path) -> subprocess.CompletedProcess:
    c_file = _write(rendered, directory)
    cmd = [cc, *flags, "-Werror", "-fPIC", "-c", str(c_file), "-o", str(directory / f"{rendered.name}.o")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def _compile_all(cc: str, flags: list[str], tmp_path: Path, sources) -> list[str]:
    """Compile each (label, rendered) concurrently; return the failures' messages."""
    def one(item):
        label, rendered = item
        d = tmp_path / label
        d.mkdir()
        proc = _compile_only(cc, flags, rendered, d)
        return None if proc.returncode == 0 else f"{label}:\n{proc.stderr.strip()[:3000]}"

    workers = max(1, len(os.sched_getaffinity(0)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [r for r in pool.map(one, sources) if r]


def _project_sources(flags, heavy: bool = False, vec: int | None = None):
    """Both dtypes of every spec of SPECS (light ones, or with heavy=True the heavy ones), with
    vectors of `vec` reals when given."""
    out = []
    for path in (p for p in SPECS if heavy_spec(p) == heavy):
        net = load(path)
        for dtype in ("float32", "float64"):
            out.append((f"{path.stem}_{dtype}", render(net, dtype, flags, vec=vec)))
    return out


COMPILERS = ["gcc"] + (["clang"] if shutil.which("clang") else [])


@pytest.mark.parametrize("cc_name", COMPILERS)
def test_project_specs_compile_without_warnings(cc_name, tmp_path):
    cc = shutil.which(cc_name)
    if cc is None:
        pytest.skip(f"{cc_name} is not installed")
    flags = default_flags(cc)
    failures = _compile_all(cc, flags, tmp_path, _project_sources(flags))
    assert not failures, "warnings with the default flags + -Werror:\n" + "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("cc_name", COMPILERS)
def test_heavy_project_specs_compile_without_warnings(cc_name, tmp_path):
    flags = default_flags(shutil.which(cc_name))
    failures = _compile_all(shutil.which(cc_name), flags, tmp_path, _project_sources(flags, heavy=True))
    assert not failures, "warnings with the default flags + -Werror:\n" + "\n".join(failures)


def test_project_specs_compile_without_warnings_when_openmp_is_missing(tmp_path):
    cc = shutil.which("gcc") or compiler()
    flags = BASE_FLAGS + WARNINGS  # what default_flags() returns where has_openmp() is False
    sources = [s for s in _project_sources(flags) if s[0].startswith("cifar")]
    failures = _compile_all(cc, flags, tmp_path, sources)
    assert not failures, "warnings without OpenMP:\n" + "\n".join(failures)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
def test_project_specs_compile_without_warnings_without_avx512(tmp_path):
    cc = shutil.which("gcc") or compiler()
    flags = [f for f in default_flags(cc) if not f.startswith("-march")] + ["-march=x86-64-v3"]
    sources = [s for s in _project_sources(flags) if s[0].startswith("lenet5_")]
    failures = _compile_all(cc, flags, tmp_path, sources)
    assert not failures, "warnings on an AVX2 machine:\n" + "\n".join(failures)
