"""The float32 build's inline exp, erf and tanh (templates/float_math.c.j2).

- Accuracy: the functions, compiled with the project's flags inside loops over arrays (so
  the vectorised code is what runs), against float64 numpy (math.erf for erf) on about a
  million float32 inputs spread evenly over the bit patterns (every binade, subnormals
  included), plus special values: +-0, subnormals, the overflow and underflow edges, +-inf
  and NaN.  Errors are in float32 ulps of the exact value and printed like llm.c's maxdiff.
- The generated float32 C uses them where an activation needs them; float64 keeps libm.
- With gcc, every element-wise activation loop of the float32 build vectorises.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import spec
from netcompiler.build import compiler, default_flags
from netcompiler.check import check_text
from netcompiler.layers.activations import MATH_MACROS
from netcompiler.render import _env, render

# max error in ulps each function must keep (measured on every float32 input with gcc 12
# -O3 -march=native: exp 1.26, erf 1.29, tanh 1.34; the margin is for other compilers)
MAX_ULPS = {"exp": 2.0, "erf": 2.0, "tanh": 2.0}
FLT_MAX = float(np.finfo(np.float32).max)

HARNESS = """
#include <math.h>
#include <stdint.h>
#include <string.h>
{math}
void vm_exp(float *restrict out, const float *restrict in, int n) {{ for (int i = 0; i < n; i++) out[i] = netc_expf(in[i]); }}
void vm_erf(float *restrict out, const float *restrict in, int n) {{ for (int i = 0; i < n; i++) out[i] = netc_erff(in[i]); }}
void vm_tanh(float *restrict out, const float *restrict in, int n) {{ for (int i = 0; i < n; i++) out[i] = netc_tanhf(in[i]); }}
"""
CDEF = "\n".join(f"void vm_{f}(float *out, const float *in, int n);" for f in MAX_ULPS)
REFERENCE = {"exp": np.exp, "erf": np.vectorize(math.erf, otypes=[np.float64]), "tanh": np.tanh}
SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754944e-38, 1e-30, -1e-30, 1e-7, 0.5, -0.5, 1, -1,
                    0.625, -0.625, 0.84, -0.84, 3.8, -3.8, 3.9, 4, -4, 4.5, 9, -9, 9.1, 20, -20, 87, 88.72, 88.73, 89, 100, -87, -88,
                    -103.9, -104, -110, 1e30, -1e30, FLT_MAX, -FLT_MAX, np.inf, -np.inf], np.float32)


def float_math() -> str:
    """The C of all three functions, as the float32 build includes it."""
    return _env().get_template("float_math.c.j2").render(uses=dict(math=MATH_MACROS))


@pytest.fixture(scope="module")
def vmath(tmp_path_factory):
    """The three functions in a shared library built with the project's default flags."""
    import cffi

    d = tmp_path_factory.mktemp("vmath")
    src = d / "vmath.c"
    src.write_text(HARNESS.format(math=float_math()))
    so = d / "vmath.so"
    proc = subprocess.run([compiler(), *default_flags(), "-Werror", "-shared", "-fPIC", str(src), "-o", str(so)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    lib = ffi.dlopen(str(so))

    def call(name: str, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x)
        getattr(lib, f"vm_{name}")(ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", x), x.size)
        return out

    return call


def sweep_inputs(step: int = 4099) -> np.ndarray:
    """Every step-th float32 bit pattern (both signs, all binades), NaNs left out, + SPECIAL."""
    x = np.arange(0, 2 ** 32, step, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([x[~np.isnan(x)], SPECIAL])


def ulp_errors(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|y - ref| in float32 ulps at ref (2^-149 in the subnormal range); where ref rounds to
    +-inf in float32, 0 if y is that inf and inf otherwise."""
    with np.errstate(over="ignore"):
        ref32 = ref.astype(np.float32)
    _, e = np.frexp(ref)
    ulp = np.ldexp(1.0, np.maximum(np.where(ref == 0, -200, e) - 24, -149))
    with np.errstate(invalid="ignore"):
        err = np.abs(y.astype(np.float64) - ref) / ulp
    overflow = np.isinf(ref32)
    err[overflow] = np.where(y[overflow] == ref32[overflow], 0.0, np.inf)
    return err


@pytest.mark.parametrize("name", sorted(MAX_ULPS))
def test_accuracy_over_a_dense_sweep(vmath, name):
    x = sweep_inputs()
    y = vmath(name, x)
    with np.errstate(over="ignore"):
        ref = REFERENCE[name](x.astype(np.float64))
    err = ulp_errors(y, ref)
    i = int(np.argmax(err))
    normal = (np.abs(ref) >= np.finfo(np.float32).tiny) & (np.abs(ref) <= FLT_MAX)
    rel = np.abs(y[normal] / ref[normal] - 1)
    print(f"{name}: {x.size} inputs, max {err[i]:.2f} ulp at x = {float(x[i])!r}, max relative difference "
          f"{rel.max():.3g} (normal results)")
    assert err[i] <= MAX_ULPS[name], (f"{name}({float(x[i])!r}) = {float(y[i])!r}, want {float(ref[i])!r}: "
                                      f"{err[i]:.2f} ulp > {MAX_ULPS[name]}")


def test_special_values(vmath):
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 89.0, -104.0, 1e30, -1e30], np.float32)
    exp, erf, tanh = (vmath(f, x) for f in ("exp", "erf", "tanh"))
    np.testing.assert_array_equal(exp, [1, 1, np.inf, 0, np.nan, np.nan, np.inf, 0, np.inf, 0])
    np.testing.assert_array_equal(erf, [0, -0.0, 1, -1, np.nan, np.nan, 1, -1, 1, -1])
    np.testing.assert_array_equal(tanh, [0, -0.0, 1, -1, np.nan, np.nan, 1, -1, 1, -1])
    assert not np.signbit(erf[0]) and np.signbit(erf[1]) and not np.signbit(tanh[0]) and np.signbit(tanh[1])
    # odd functions exactly, and never beyond +-1
    s = sweep_inputs(65537)
    for f in ("erf", "tanh"):
        np.testing.assert_array_equal(vmath(f, -s), -vmath(f, s))
        assert np.all(np.abs(vmath(f, s)) <= 1)


UB_DRIVER = """
#include <stdio.h>
int main(void)
{
    volatile float sink = 0;
    for (unsigned long long b = 0; b < 0x100000000ull; b += 65521) { /* and NaNs, infs, subnormals */
        const unsigned bits = (unsigned)b;
        float x;
        memcpy(&x, &bits, sizeof x);
        sink += netc_expf(x) + netc_erff(x) + netc_tanhf(x);
    }
    puts("ok");
    return 0;
}
"""


def test_no_undefined_behaviour_on_any_input(tmp_path):
    """UBSan over a sweep of bit patterns that includes NaNs (their garbage exponent bits go
    through exp's integer arithmetic) and infinities."""
    src = tmp_path / "ub.c"
    src.write_text(HARNESS.format(math=float_math()) + UB_DRIVER)
    exe = tmp_path / "ub"
    cc = shutil.which("gcc") or compiler()
    proc = subprocess.run([cc, "-std=c11", "-O1", "-g", "-fsanitize=undefined", "-fno-sanitize-recover=all",
                           "-Wall", "-Wextra", "-Werror", str(src), "-o", str(exe), "-lm"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "sanitize" in proc.stderr and "cannot find" in proc.stderr:
        pytest.skip(f"the sanitizer runtime is not installed: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok" and "runtime error" not in run.stderr, run.stderr


def test_activations_at_inf_and_nan_float32():
    """Through a compiled float32 net: NaN in -> NaN out, and the limits at +-inf (torch gives
    the same, except that its vectorised gelu returns NaN at +inf where x Phi(x) = inf)."""
    import netcompiler as nc

    x = np.array([[np.inf, -np.inf, np.nan, -0.0, 0.0, 2.0, 3e38]], np.float32)
    want = {"gelu": [np.inf, np.nan, np.nan, -0.0, 0.0, 2 * 0.5 * (1 + math.erf(2 / math.sqrt(2))), 3e38],
            "tanh": [1, -1, np.nan, -0.0, 0.0, math.tanh(2), 1],
            "sigmoid": [1, 0, np.nan, 0.5, 0.5, 1 / (1 + math.exp(-2)), 1]}
    for kind, expected in want.items():
        net = nc.compile(check_text(spec([7], [kind], "mse"), f"{kind}.yaml"), dtype="float32", threads=1)
        np.testing.assert_allclose(net.forward(x)[0], np.array(expected, np.float32), rtol=1e-6, err_msg=kind)


# ---- the generated C uses them ------------------------------------------------------------------
# a conv first: layers with nothing trainable upstream have no backward (graph.needs_grad)
ACTS = spec([2, 5, 5], ["conv2d: {out_channels: 2, kernel_size: 1}", "tanh", "sigmoid", "gelu: {approximate: tanh}", "gelu", "flatten",
                        "linear: {out_features: 3}"], name="acts")


def test_float32_c_uses_the_inline_functions_and_float64_keeps_libm():
    f32 = render(check_text(ACTS, "acts.yaml"), "float32").source
    for macro, fn in (("EXP", "netc_expf"), ("ERF", "netc_erff"), ("TANH", "netc_tanhf")):
        assert f"#define {macro} {fn}\n" in f32
        assert f"static inline float {fn}(float x)" in f32
    assert "x * ((1 + ERF(x * M_SQRT1_2_R)) / 2)" in f32 and "EXP(-x * x / 2)" in f32
    f64 = render(check_text(ACTS, "acts.yaml"), "float64").source
    assert "#define EXP exp\n" in f64 and "#define ERF erf\n" in f64 and "#define TANH tanh\n" in f64
    assert "netc_" not in f64
    # emitted only where used: a ReLU network has none of them
    relu = render(check_text(spec([4], ["relu", "linear: {out_features: 2}"]), "relu.yaml"), "float32").source
    assert "static inline float netc_" not in relu
    # sigmoid needs exp only
    sig = render(check_text(spec([4], ["sigmoid", "linear: {out_features: 2}"]), "sig.yaml"), "float32").source
    assert "netc_expf(float x)" in sig and "netc_erff(float x)" not in sig and "netc_tanhf(float x)" not in sig


@pytest.mark.skipif(not shutil.which("gcc"), reason="-fopt-info-vec is gcc's")
def test_float32_activation_loops_vectorise(tmp_path):
    """A double constant or a libm call in an activation expression stops gcc vectorising
    the loop; catch that here rather than in a benchmark."""
    rendered = render(check_text(ACTS, "acts.yaml"), "float32")
    c = tmp_path / "acts.c"
    c.write_text(rendered.source)
    (tmp_path / "acts.h").write_text(rendered.header)
    proc = subprocess.run(["gcc", *default_flags("gcc"), "-fPIC", "-c", str(c), "-o", str(tmp_path / "acts.o"),
                           "-fopt-info-vec-optimized"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    vectorised = {int(m) for m in re.findall(r"acts\.c:(\d+):\d+: optimized: loop vectorized", proc.stderr)}
    lines = rendered.source.splitlines()
    loops = {}  # "tanh1_forward" -> line number of its element loop
    for i, line in enumerate(lines):
        m = re.match(r"static void ((?:tanh|sigmoid|gelu)\d+_(?:forward|backward))\(", line)
        if m:
            j = next(k for k in range(i, len(lines)) if lines[k].lstrip().startswith("for ("))
            loops[m.group(1)] = j + 1
    assert len(loops) == 8, loops  # forward and backward of each
    missed = {fn: ln for fn, ln in loops.items() if ln not in vectorised}
    assert not missed, f"not vectorised: {missed}\n{proc.stderr}"


def test_gelu_derivative_from_the_saved_output():
    """gelu's backward takes Phi(x) as y / x from the saved output (1/2 below |x| = 1e-20, where
    y / x would lose it to subnormal rounding): check dy/dx = Phi(x) + x phi(x) against float64
    at tiny, ordinary and large |x|, in both builds."""
    import netcompiler as nc

    z = np.array([0.0, -0.0, 1e-44, -3e-45, 1e-38, -3e-30, 2e-21, -5e-20, 1e-7, -0.3, 0.5, 1.7, -2.5, 6.0, -9.0, 14.0, -20.0])
    phi = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    want = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z]) + z * phi
    n = z.size
    text = spec([n], ["linear: {out_features: %d}" % n, "gelu"], "mse")
    for dtype, tol in (("float32", 2e-6), ("float64", 1e-12)):
        net = nc.compile(check_text(text, "g.yaml"), dtype=dtype, threads=1)
        # x = ones, W = 0, bias = z: the gelu input is z, and dL/dbias = dL/dy * gelu'(z)
        net.load_state_dict({"fc1.weight": np.zeros((n, n)), "fc1.bias": z})
        x = np.ones((1, n))
        y = net.forward(x)
        # targets y + 1: mse's dL/dy = 2 (y - t) / n = -2 / n for every element
        _, grads = net.loss_and_grad(x, y + 1)
        got = grads["fc1.bias"] / (-2 / n)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-3, err_msg=dtype)
