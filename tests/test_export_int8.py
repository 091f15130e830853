"""`netc export --quantize int8`: the integer C against its numpy reference, bit for bit.

For every spec in specs/, the odd export specs and random chains: random weights (batch
norms with random statistics), calibration on random inputs, the C compiled with the
strict warnings of test_export.py and run on quantised inputs; its int8 outputs must equal
quant_ref.run's exactly, and the float wrapper NAME_infer must equal quantise -> reference
-> dequantise bit for bit.  The arithmetic itself (multiplier and shift, rounding, the
average) is checked against exact rational arithmetic, and the dequantised outputs against
the float network (a loose bound: quantisation error, not a bug).
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import netcompiler as nc
from conftest import ROOT, randomize_batchnorm, spec_params
from netcompiler.check import check_text, load
from netcompiler.cli import main
from netcompiler.export import export_int8
from netcompiler.export import quant_ref
from netcompiler.export.quant import QParams, dequantize, multiplier, quantize_input
from test_export import COMPILERS, DRIVER, ODD, SPECS, STRICT, _state, random_chains

import shutil
import subprocess


def _compile_int8(cc: str, out: Path, name: str, float_api: bool = False, extra=()) -> Path:
    exe = out / f"driver_{cc}{'_f' if float_api else ''}"
    nu = name.upper()
    defs = [f'-DNET_HEADER="{name}.h"', f"-DINPUT_SIZE={nu}_INPUT_SIZE", f"-DOUTPUT_SIZE={nu}_OUTPUT_SIZE"]
    defs += ([f"-DINFER={name}_infer", f"-DARENA_BYTES={nu}_FLOAT_ARENA_BYTES"] if float_api else
             [f"-DINFER={name}_infer_int8", "-DELEM=int8_t", f"-DARENA_BYTES={nu}_ARENA_BYTES"])
    cmd = [cc, *STRICT, "-O2", *extra, f"-I{out}", *defs, str(out / f"{name}.c"), str(DRIVER), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return exe


def _run(exe: Path, x: np.ndarray, dtype, out_size: int, tmp: Path) -> np.ndarray:
    xin, yout = tmp / "x.bin", tmp / "y.bin"
    np.ascontiguousarray(x).tofile(xin)
    r = subprocess.run([str(exe), str(xin), str(yout), str(len(x))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{exe.name} exited with {r.returncode}\n{r.stderr}"
    return np.fromfile(yout, dtype).reshape(len(x), out_size)


def _float_state(network, seed: int = 0) -> tuple[dict, object]:
    net = nc.compile(network, dtype="float32", threads=1)
    net.init(seed)
    randomize_batchnorm(net, np.random.default_rng(seed))
    return {k: np.asarray(v, np.float32) for k, v in net.state_dict().items()}, net


def _check(network, tmp: Path, seed: int = 0, compilers=COMPILERS, extra=(), state=None, target="generic") -> dict:
    state, net = (state, None) if state is not None else _float_state(network, seed)
    rng = np.random.default_rng(seed + 1)
    calib = rng.standard_normal((32, *network.input_shape)).astype(np.float32)
    e = export_int8(network, state, calib, target)
    e.write(tmp)
    x = rng.standard_normal((4, *network.input_shape)).astype(np.float32)
    xq = quantize_input(x, e.qnet.input)
    ref = quant_ref.run(e.qnet, xq)
    n_out = math.prod(network.output_shape)
    for cc in compilers:
        y = _run(_compile_int8(cc, tmp, network.name, extra=extra), xq, np.int8, n_out, tmp)
        assert np.array_equal(y, ref), f"{network.name} ({cc}): int8 C != reference\n{y}\n{ref}"
    yf = _run(_compile_int8(compilers[0], tmp, network.name, float_api=True, extra=extra), x, np.float32, n_out, tmp)
    assert np.array_equal(yf.view(np.uint32), dequantize(ref, e.qnet.output).view(np.uint32)), network.name
    return dict(e=e, net=net, x=x, ref=ref)


def test_kinds_without_int8_kernel_are_refused_in_one_line(monkeypatch):
    from netcompiler.errors import NetcError
    from netcompiler.export import quant

    monkeypatch.setattr(quant, "INT8_OPS", tuple(op for op in quant.INT8_OPS if op != "add"))
    network = load(ROOT / "specs" / "resnet20.yaml")
    with pytest.raises(NetcError) as exc:
        export_int8(network, _state(network), np.zeros((1, 3, 32, 32), np.float32))
    assert str(exc.value) == ("add 'layer1.0.add1': netc export --quantize int8 has no integer kernel for layer kind "
                              "'add' (the float32 export has)")


@pytest.mark.parametrize("path", spec_params(SPECS))
def test_specs_match_reference(path, tmp_path):
    r = _check(load(path), tmp_path)
    # and the int8 network computes roughly the float one: within 5% of the outputs' range
    f = r["net"].forward(r["x"]).reshape(len(r["x"]), -1)
    d = dequantize(r["ref"], r["e"].qnet.output)
    assert np.abs(d - f).max() <= 0.05 * np.ptp(f), (np.abs(d - f).max(), np.ptp(f))


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_shapes_match_reference(name, tmp_path):
    _check(check_text(ODD[name], f"{name}.yaml"), tmp_path)


ARM_GCC = shutil.which("arm-none-eabi-gcc")


@pytest.mark.parametrize("name", spec_params(SPECS, lambda p: p.stem) + sorted(ODD))
def test_cortex_m4_target_matches_reference(name, tmp_path):
    """--target cortex-m4: convolutions in the DSP weight order; on the host (no
    __ARM_FEATURE_DSP) their plain-C form must equal the reference, and the SMLAD form
    must compile warning-free for the Cortex-M4 (QEMU runs it: test_export_cortex_m4.py)."""
    paths = {p.stem: p for p in SPECS}
    network = load(paths[name]) if name not in ODD else check_text(ODD[name], f"{name}.yaml")
    r = _check(network, tmp_path, compilers=COMPILERS[:1], target="cortex-m4")
    assert any(s.c.get("DSP") for s in r["e"].steps) == any(s.op == "conv" for s in r["e"].steps)
    if ARM_GCC:
        cmd = [ARM_GCC, "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", *STRICT, "-O2",
               "-c", str(tmp_path / f"{network.name}.c"), "-o", str(tmp_path / "m4.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        if r["e"].qnet and any(s.c.get("DSP") for s in r["e"].steps):
            dis = subprocess.run(["arm-none-eabi-objdump", "-d", str(tmp_path / "m4.o")], capture_output=True, text=True)
            assert "smlad" in dis.stdout


def test_random_chains_match_reference(tmp_path):
    rng = np.random.default_rng(0)
    for i, (_, network) in enumerate(random_chains(20, seed=5)):
        out = tmp_path / str(i)
        out.mkdir()
        state = _state(network, i)
        for k, v in state.items():  # batch norms with random statistics and signed scales
            if k.split(".")[0].startswith("bn"):
                low, high = {"weight": (-1.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-0.5, 0.5),
                             "running_var": (0.5, 2.0)}[k.split(".")[1]]
                state[k] = rng.uniform(low, high, v.shape)
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        _check(network, out, seed=i, compilers=COMPILERS[:1], state=state, target=("generic", "cortex-m4")[i % 2])


def test_sanitizers(tmp_path):
    """Every int8 kernel (odd_groups: grouped padded conv, general max- and average pooling;
    odd_leading: a leading table step, fused pooling with cut windows) under ASan + UBSan,
    in the generic and the DSP weight layout."""
    for name in ("odd_groups", "odd_leading"):
        for target in ("generic", "cortex-m4"):  # cortex-m4 on the host: the DSP layout in plain C
            (tmp_path / name / target).mkdir(parents=True)
            _check(check_text(ODD[name], f"{name}.yaml"), tmp_path / name / target, compilers=["gcc"], target=target,
                   extra=["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])


# ---- the arithmetic against exact rationals --------------------------------------------------
def test_multiplier_and_requant_round_half_up():
    rng = np.random.default_rng(0)
    for m in [1e-9, 3.7e-5, 0.0123, 0.25, 0.5, 0.999999, 1.0, 3.5, 1000.0]:
        m0, n = multiplier(m)
        assert 1 <= n <= 62 and (2 ** 30 <= m0 < 2 ** 31 or n == 62)
        assert abs(Fraction(m0, 2 ** n) - Fraction(m)) <= Fraction(m) * Fraction(1, 2 ** 29) + Fraction(1, 2 ** 62)
        acc = rng.integers(-2 ** 31 + 1, 2 ** 31 - 1, 200)
        acc[:4] = [0, 1, -1, 2 ** 31 - 1]
        got = quant_ref.requant(acc.reshape(1, -1), np.full(200, m0), np.full(200, n), 3, -128).ravel()
        for a, g in zip(acc.tolist(), got.tolist()):
            exact = Fraction(a * m0, 2 ** n)
            want = math.floor(exact + Fraction(1, 2)) + 3  # half up
            assert g == max(-128, min(127, want)), (m, a)
    # the halves: +2.5 -> 3, -2.5 -> -2
    assert quant_ref.requant(np.array([[5, -5]]), np.array([2 ** 30, 2 ** 30]), np.array([31, 31]), 0, -128).tolist() == [[3, -2]]


def test_rescale_is_exact_rounding_half_up():
    """add and concat rescale q - zero by m 2^-n: floor(v m / 2^n + 1/2), unclamped."""
    rng = np.random.default_rng(5)
    for m in [0.01, 0.5, 0.7, 1.0, 1.9, 37.0]:
        m0, n = multiplier(m)
        v = np.arange(-255, 256)
        got = quant_ref.rescale(v, m0, n)
        for a, g in zip(v.tolist(), got.tolist()):
            assert g == math.floor(Fraction(a * m0, 2 ** n) + Fraction(1, 2)), (m, a)
    m0, n = multiplier(1.0)
    assert quant_ref.rescale(np.arange(-255, 256), m0, n).tolist() == list(range(-255, 256))  # the identity
    del rng


def test_int8_graph_concat_parts_take_the_concat_scale():
    """export_graph, int8: every part written inside a concat has that concat's scale and
    zero point (cat2 inside cat3 too), so the concat copies nothing but the network input,
    which it rescales; the memory plan passes the step-by-step check."""
    from test_export import check_plan

    network = load(ROOT / "tests" / "specs" / "export_graph.yaml")
    state, _ = _float_state(network)
    # inputs small next to the features, so that the input part needs rescaling
    calib = 0.2 * np.random.default_rng(0).standard_normal((16, 3, 10, 10)).astype(np.float32)
    e = export_int8(network, state, calib)
    q = {qs.step.name: qs for qs in e.qnet.steps}
    for part, cat in [("a", "cat1"), ("b", "cat1"), ("up", "cat2"), ("res1", "cat2"), ("cat2", "cat3"),
                      ("cat2_act", "cat3"), ("pool_a", "feats"), ("pool_g", "feats")]:
        assert q[part].out == q[cat].out, (part, cat)
    assert q["cat2"].out == q["cat3"].out and q["cat1"].step.copies == [] and q["cat3"].step.copies == []
    assert [k for k, _, _ in q["cat2"].step.copies] == [2] and q["cat2"].ins[2] == e.qnet.input
    assert q["cat2"].ins[2] != q["cat2"].out and "rescale(in2[i]" in e.source
    check_plan(e)


def test_avgpool_rounds_half_away_from_zero(tmp_path):
    """A 2x2 average of q - zero sums 2 and -2 (halves): 1 and -1, then + zero; the C agrees."""
    network = check_text(
        "name: avg\ninput: [1, 2, 4]\nlayers:\n  - avgpool2d: {kernel_size: 2}\n  - flatten\nloss: mse\n", "avg.yaml")
    e = export_int8(network, {}, np.array([[[[-1.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]]], np.float32))
    z = e.qnet.input.zero
    xq = np.array([[[[z + 1, z + 1, z - 1, z - 1], [z, z, z, z]]]], np.int8)
    assert quant_ref.run(e.qnet, xq).tolist() == [[z + 1, z - 1]]
    e.write(tmp_path)
    y = _run(_compile_int8(COMPILERS[0], tmp_path, "avg"), xq, np.int8, 2, tmp_path)
    assert y.tolist() == [[z + 1, z - 1]]


def test_qparams_hold_zero_and_the_range():
    q = QParams.from_range(0.5, 2.0)  # widened to [0, 2]
    assert q.zero == -128 and q.scale == pytest.approx(2 / 255)
    q = QParams.from_range(-1.0, 3.0)
    assert (-128 - q.zero) * q.scale == pytest.approx(-1.0, abs=q.scale) and (127 - q.zero) * q.scale == pytest.approx(3.0, abs=q.scale)
    assert quantize_input(np.array([-10.0, 0.0, 10.0], np.float32), q).tolist() == [-128, q.zero, 127]


# ---- the C text and the CLI ------------------------------------------------------------------
def test_int8_c_has_no_float_in_its_kernels():
    network = load(ROOT / "specs" / "alphabet.yaml")
    state, _ = _float_state(network)
    e = export_int8(network, state, np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32))
    kernels = e.source[:e.source.index(f"int {network.name}_infer(const float")]
    assert "float" not in kernels.split("*/", 1)[1].replace("floor", ""), "float in the int8 kernels"
    assert "double" not in e.source and "#include <math.h>" not in e.source
    assert "static const int8_t conv1_weight[288] = {" in e.source
    assert "static const int8_t conv1_post_lut[256] = {" in e.source  # the GELU after the fused pool
    for line in ("int alphabet_infer_int8(const int8_t *input, int8_t *output, void *arena);",
                 "#define ALPHABET_INPUT_SCALE ", "#define ALPHABET_INPUT_ZERO ", "#define ALPHABET_OUTPUT_SCALE ",
                 "#define ALPHABET_OUTPUT_ZERO ", "#define ALPHABET_FLOAT_ARENA_BYTES "):
        assert line in e.header, line
    # weights: a quarter of float's plus int32 biases, multipliers, shifts and tables
    assert e.weights_bytes < 0.3 * 4 * network.total_params


def _npz_data(tmp_path, network, n=64):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (n, 28, 28), np.uint8), y=rng.integers(0, 10, n),
             x_test=rng.integers(0, 256, (n, 28, 28), np.uint8), y_test=rng.integers(0, 10, n))
    return path


def test_cli_export_int8_and_eval_quantized(tmp_path, capsys):
    from netcompiler.weights import save_npz

    path = ROOT / "specs" / "lenet5.yaml"
    network = load(path)
    weights = tmp_path / "w.npz"
    save_npz(weights, _float_state(network)[0])
    data = _npz_data(tmp_path, network)
    assert main(["export", str(path), str(weights), "-o", str(tmp_path / "c"), "--quantize", "int8",
                 "--calibration", str(data), "--calibration-images", "20"]) == 0
    printed = capsys.readouterr().out
    assert "int8 calibrated on 20 " in printed and "flash: " in printed
    assert "int lenet5_infer_int8(" in (tmp_path / "c" / "lenet5.h").read_text()
    assert "calibrated on " in (tmp_path / "c" / "lenet5.c").read_text()
    assert main(["export", str(path), str(weights), "-o", str(tmp_path / "c"), "--quantize", "int8"]) == 1
    assert "--quantize int8 and --calibration DATA go together" in capsys.readouterr().err
    assert main(["eval", str(path), str(weights), "--data", str(data), "--quantized", "--calibration-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "int8 (netc export --quantize int8, calibrated on 20 " in out and "points); outputs agree on " in out
    assert main(["eval", str(path), str(weights), "--data", str(data), "--calibration", str(data)]) == 1
    assert "--calibration is for --quantized" in capsys.readouterr().err
    assert main(["eval", str(path), str(weights), "--data", str(data), "--quantized", "--format", "json"]) == 0
    import json

    m = json.loads(capsys.readouterr().out)
    assert 0 <= m["int8"]["accuracy"] <= 1 and m["int8"]["calibration_images"] == 64


def test_report_prints_export_flash_and_ram(capsys):
    """netc report: per target, float32 and int8 flash/RAM; the weights and arena in them are
    those of the real exports (calibrated, trained-like weights change no size)."""
    from netcompiler.export import estimates, export_c

    network = load(ROOT / "specs" / "lenet5.yaml")
    state, _ = _float_state(network)
    calib = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    rows = {(t, b): (f, r) for t, b, f, r in estimates(network)}
    for target in ("generic", "cortex-m4"):
        for build, e in (("float32", export_c(network, state, target)), ("int8", export_int8(network, state, calib, target))):
            assert rows[target, build] == (e.weights_bytes + e.code_bytes_estimate, e.arena_bytes + e.stack_bytes_estimate)
    assert rows["cortex-m4", "int8"][1] > rows["generic", "int8"][1]  # the int16 input copies
    assert main(["report", str(ROOT / "specs" / "lenet5.yaml")]) == 0
    out = capsys.readouterr().out
    f, r = rows["cortex-m4", "int8"]
    assert f"  cortex-m4  float32 flash {rows['cortex-m4', 'float32'][0]:,} B" in out and f"int8 flash {f:,} B, RAM {r:,} B" in out
