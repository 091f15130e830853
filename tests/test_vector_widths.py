"""The generated C at every vector width: 16 reals (AVX-512), 8 (AVX2) and 4 (SSE2, NEON).

The rest of the suite runs at NETC_VEC's width (16 unless set; conftest.py), so that the
tiles it expects do not depend on the machine.  Here:
- which width a build gets: the compiler's macros for the -march it is given, NETC_VEC
  over them, `compile(vec=...)` and `render(vec=...)` over both, clear errors for others;
- vsumN's and vtransposeN's shuffle tables (16: the tables the C had before widths were a
  choice; every width: the lane sums and the transpose they compute, simulated in numpy);
- every case of tests/test_gradients.py at 8 and at 4 reals against PyTorch (float64, 1 and
  2 threads; float32; finite differences on the forced kernel paths), and shapes that are
  edge cases only at the narrower widths (exactly one vector, one lane over, Winograd and
  pointwise convolutions that need VEC channels or pixels);
- the register tiles fit the target's registers, a forced path that does not apply at a
  width is refused naming it, one network planned at two widths gets both plans;
- the C of the project's specs compiles warning-free for an AVX2 and a baseline x86-64
  target at their widths, has no template leftovers, and runs clean under the sanitizers.
"""
from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

import netcompiler as nc
from conftest import ROOT, assert_close, build, prebuild, reference_model, spec
from netcompiler import target
from netcompiler.build import default_flags
from netcompiler.check import check_text, force_kernels, load
from netcompiler.errors import KernelError, TargetError
from netcompiler.plan import make_plan
from netcompiler.render import bit_reversed, render, shuffle_levels

torch = pytest.importorskip("torch")
from test_gradients import (BATCH, CASES, KERNELS, check_against_torch, check_finite_differences,  # noqa: E402
                            prepared)
from test_c_lint import lint  # noqa: E402
import test_sanitizers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel",
                                        "ignore:.*requires_grad=True.*:UserWarning")

NARROW = (8, 4)
X86 = platform.machine() in ("x86_64", "AMD64")
GCC = shutil.which("gcc")


def _native_vec() -> int:
    with pytest.MonkeyPatch.context() as m:
        m.delenv(target.ENV, raising=False)
        return target.detect().vec


# ---- which width a build gets ----------------------------------------------------------------
@pytest.mark.skipif(not (X86 and GCC), reason="x86-64 with gcc only")
@pytest.mark.parametrize("march, vec", [("x86-64", 4), ("x86-64-v2", 4), ("x86-64-v3", 8), ("x86-64-v4", 16)])
def test_the_width_follows_the_targets_vector_registers(march, vec, monkeypatch):
    monkeypatch.delenv(target.ENV)
    assert target.detect(["-O2", f"-march={march}"], cc=GCC).vec == vec
    # the last -march wins, as it does for the compiler
    assert target.detect([*default_flags(GCC), f"-march={march}"], cc=GCC).vec == vec


def test_an_unusable_compiler_gets_the_narrowest_width(monkeypatch):
    monkeypatch.delenv(target.ENV)
    assert target.detect(["-O2"], cc="/nonexistent/cc").vec == 4


def test_without_a_compiler_plans_are_made_for_the_narrowest_width(monkeypatch, capsys):
    """`netc report --kernels` needs no compiler: with none, it plans for 4 reals."""
    monkeypatch.delenv(target.ENV)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert target.detect().vec == 4
    from netcompiler.cli import main

    assert main(["report", str(ROOT / "tests/specs/mobilenet_tiny.yaml"), "--kernels"]) == 0
    assert "kernel paths for vectors of 4 reals" in capsys.readouterr().out


def test_netc_vec_overrides_the_detection(monkeypatch):
    monkeypatch.setenv(target.ENV, "8")
    assert target.detect(["-march=x86-64-v4"]).vec == 8
    assert target.current() == target.TARGETS[8]
    with target.using(4):
        assert target.current().vec == 4
    assert target.current().vec == 8


@pytest.mark.parametrize("value", ["12", "x", "16.0", "-8"])
def test_a_bad_netc_vec_is_a_clear_error(value, monkeypatch, capsys):
    monkeypatch.setenv(target.ENV, value)
    with pytest.raises(TargetError, match=rf"NETC_VEC must be one of 4, 8, 16, got '{value}'"):
        target.detect()
    from netcompiler.cli import main

    assert main(["show", str(ROOT / "specs/lenet5.yaml")]) == 1
    assert f"netc: error: NETC_VEC must be one of 4, 8, 16, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("value", [3, 32, "8", True, 8.0])
def test_a_bad_vec_argument_is_refused_before_any_build(value):
    net = load(ROOT / "specs/lenet5.yaml")
    with pytest.raises(TargetError, match=r"must be one of 4, 8, 16 \(reals per vector\)"):
        nc.compile(net, vec=value)
    with pytest.raises(TargetError):
        render(net, vec=value)


@pytest.mark.parametrize("vec, name", [(16, "AVX-512"), (8, "AVX/AVX2"), (4, "128-bit vectors")])
def test_the_c_says_its_width(vec, name):
    r = render(load(ROOT / "specs/lenet5.yaml"), "float32", ["-O2"], vec=vec)
    assert f"#define VEC {vec}\n" in r.source
    assert f"Vectors: {vec} reals (VEC), tiles for {name} registers." in r.header
    assert r.plan.vec == vec


def test_netc_show_follows_the_cflags_target(monkeypatch, capsys):
    if not (X86 and GCC):
        pytest.skip("x86-64 with gcc only")
    monkeypatch.delenv(target.ENV)
    monkeypatch.setenv("CC", GCC)
    from netcompiler.cli import main

    assert main(["show", str(ROOT / "specs/lenet5.yaml"), "--cflags=-march=x86-64-v3"]) == 0
    assert "#define VEC 8\n" in capsys.readouterr().out


# ---- the shuffle tables -----------------------------------------------------------------------
def test_the_16_lane_tables_are_the_ones_the_c_had():
    levels = dict(shuffle_levels(16))
    assert levels[8] == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23]
    assert levels[4] == [0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27]
    assert levels[2] == [0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29]
    assert levels[1] == [0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30]
    assert list(levels) == [8, 4, 2, 1]
    assert bit_reversed(16) == [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15]


def _shuffle2(a, b, m):
    return np.concatenate([a, b])[m]


@pytest.mark.parametrize("vec", [16, 8, 4])
def test_vsum_tables_sum_every_vectors_lanes(vec):
    """vsumN as the template writes it: the leaves in bit-reversed order, then at each level
    pairs of vectors shuffled by x_w and x_w + w and added."""
    rng = np.random.default_rng(vec)
    a = rng.standard_normal((vec, vec))
    levels, leaf = shuffle_levels(vec), bit_reversed(vec)
    x = np.array(levels[0][1])
    w = levels[0][0]
    cur = [_shuffle2(a[leaf[2 * i]], a[leaf[2 * i + 1]], x) + _shuffle2(a[leaf[2 * i]], a[leaf[2 * i + 1]], x + w)
           for i in range(w)]
    for w, lanes in levels[1:]:
        x = np.array(lanes)
        cur = [_shuffle2(cur[2 * i], cur[2 * i + 1], x) + _shuffle2(cur[2 * i], cur[2 * i + 1], x + w)
               for i in range(w)]
    assert len(cur) == 1
    np.testing.assert_allclose(cur[0], a.sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("vec", [16, 8, 4])
def test_vtranspose_tables_transpose(vec):
    """vtransposeN as the template writes it: level s swaps rows i and i + s (i & s == 0)."""
    a = np.arange(vec * vec, dtype=float).reshape(vec, vec)
    r = [row.copy() for row in a]
    for s, lanes in shuffle_levels(vec):
        x = np.array(lanes)
        for i in range(vec):
            if not i & s:
                u, v = r[i], r[i + s]
                r[i], r[i + s] = _shuffle2(u, v, x), _shuffle2(u, v, x + s)
    np.testing.assert_array_equal(np.array(r), a.T)


# ---- gradients at the narrower widths ---------------------------------------------------------
# shapes that are edge cases only below 16 reals: exactly one vector of pixels, channels or
# inputs, one over, Winograd with 8 channels (it needs VEC of them), pointwise on 8 pixels
EDGE = {
    "pointwise_8px": spec((6, 2, 4), ["conv2d: {out_channels: 5, kernel_size: 1}", "relu",
                                      "conv2d: {out_channels: 7, kernel_size: 1}", "flatten",
                                      "linear: {out_features: 3}"]),
    "pointwise_9px": spec((6, 3, 3), ["conv2d: {out_channels: 6, kernel_size: 1}",
                                      "conv2d: {out_channels: 4, kernel_size: 1, bias: false}", "flatten",
                                      "linear: {out_features: 3}"]),
    "winograd_8ch": spec((8, 6, 5), ["conv2d: {out_channels: 8, kernel_size: 1}",
                                     "conv2d: {out_channels: 8, kernel_size: 3, padding: 1}", "relu",
                                     "conv2d: {out_channels: 12, kernel_size: 3}", "flatten",
                                     "linear: {out_features: 3}"]),
    "winograd_4ch_first": spec((4, 5, 7), ["conv2d: {out_channels: 4, kernel_size: 3, padding: 1}",
                                           "batchnorm2d", "relu", "flatten", "linear: {out_features: 3}"]),
    "depthwise_widths": spec((8, 9, 17), ["conv2d: {out_channels: 8, kernel_size: 1}",
                                         "conv2d: {out_channels: 8, kernel_size: 3, padding: 1, groups: 8}",
                                         "conv2d: {out_channels: 8, kernel_size: 3, stride: 2, padding: 1, "
                                         "groups: 8, bias: false}", "flatten", "linear: {out_features: 3}"]),
    "gather_rows_of_5": spec((3, 7, 5), ["conv2d: {out_channels: 6, kernel_size: 3, padding: 1}", "relu",
                                         "conv2d: {out_channels: 5, kernel_size: 3, padding: 1}", "flatten",
                                         "linear: {out_features: 3}"]),
    "linear_widths": spec((9,), ["linear: {out_features: 8}", "relu", "linear: {out_features: 12}",
                                 "linear: {out_features: 4}", "linear: {out_features: 5}"]),
    "batchnorm_planes_8_and_9": spec((3, 2, 4), ["conv2d: {out_channels: 4, kernel_size: 1}", "batchnorm2d",
                                                 "conv2d: {out_channels: 4, kernel_size: 2, padding: 1}",
                                                 "batchnorm2d", "flatten", "linear: {out_features: 3}"]),
}
ALL = {**CASES, **EDGE}


# float32 (vkeep's register constraint, 32-bit lanes) on the kernel paths' cases and the edge
# cases by default; on every case with -m slow
FLOAT32 = sorted(KERNELS) + list(EDGE)
FLOAT32_PARAMS = [pytest.param(c, marks=[] if c in FLOAT32 else [pytest.mark.slow]) for c in ALL]


@pytest.fixture(scope="module", autouse=True)
def _prebuild_narrow():
    prebuild([(t, "float64", KERNELS.get(c), v) for c, t in ALL.items() for v in NARROW]
             + [(ALL[c], "float32", KERNELS.get(c), v) for c in FLOAT32 for v in NARROW]
             + [(t, "float64", None, 16) for t in EDGE.values()])


def _prepared(case, dtype, threads, vec):
    if case in CASES:
        return prepared(case, dtype, threads, vec)
    from conftest import random_batch, randomize_batchnorm

    net = build(EDGE[case], dtype, threads, vec=vec)
    rng = np.random.default_rng(sum(map(ord, case)))
    net.init(int(rng.integers(1000)))
    randomize_batchnorm(net, rng)
    return (net, *random_batch(net, BATCH, rng))


@pytest.mark.parametrize("vec", NARROW)
@pytest.mark.parametrize("case", list(ALL))
def test_forward_and_gradients_match_torch(case, vec):
    """Evaluation forward, training loss and every gradient against PyTorch (float64), with 1
    and 2 threads."""
    for threads in (1, 2):
        net, x, y = _prepared(case, "float64", threads, vec)
        assert net.plan.vec == vec
        model = reference_model(net, ALL[case]).eval()
        with torch.no_grad():
            ref = model(torch.as_tensor(x)).numpy()
        assert_close(net.forward(x), ref, 1e-9, f"{case} at VEC={vec}, {threads} threads: eval forward")
        check_against_torch(net, x, y, ALL[case], f"{case} at VEC={vec}, {threads} threads")


@pytest.mark.parametrize("vec", NARROW)
@pytest.mark.parametrize("case", FLOAT32_PARAMS)
def test_float32_gradients_match_torch(case, vec):
    check_against_torch(*_prepared(case, "float32", 1, vec), ALL[case], f"{case} at VEC={vec}")


@pytest.mark.parametrize("vec", NARROW)
@pytest.mark.parametrize("case", sorted(KERNELS) + list(EDGE))
def test_gradients_match_finite_differences(case, vec):
    check_finite_differences(*_prepared(case, "float64", 1, vec), f"{case} at VEC={vec}")


@pytest.mark.parametrize("case", list(EDGE))
def test_edge_cases_match_torch_at_16(case):
    check_against_torch(*_prepared(case, "float64", 1, 16), EDGE[case], case)


def _paths(text, vec):
    with target.using(vec):
        return {lp.layer.name: lp.kernel.path.name for lp in make_plan(check_text(text)).layers if lp.kernel}


def test_the_edge_cases_take_the_paths_they_are_named_for():
    assert set(_paths(EDGE["pointwise_8px"], 8).values()) == {"pointwise"}
    assert set(_paths(EDGE["pointwise_8px"], 16).values()) != {"pointwise"}  # 8 pixels: under one vector
    assert _paths(EDGE["winograd_8ch"], 8)["conv2"].startswith("winograd")
    assert _paths(EDGE["winograd_8ch"], 8)["conv3"].startswith("winograd")
    assert not _paths(EDGE["winograd_8ch"], 16)["conv2"].startswith("winograd")
    assert _paths(EDGE["winograd_4ch_first"], 4)["conv1"].startswith("winograd")
    assert set(list(_paths(EDGE["depthwise_widths"], 8).values())[1:]) == {"depthwise"}


# ---- plans at a width -------------------------------------------------------------------------
def _tiles(lp, tg) -> list[str]:
    """What of lp's register tiles does not fit tg's registers."""
    c, bad = lp.c, []

    def need(what, ok):
        if not ok:
            bad.append(f"{lp.layer.name} ({lp.kernel.path.name if lp.kernel else lp.kind}): {what}")

    if lp.kind == "linear":
        need(f"forward tile {c['FR']} x {c['FQ']} > {tg.acc_max}", c["FR"] * c["FQ"] <= tg.acc_max)
        need(f"{c['FQ']} input vectors beside it", c["FR"] * c["FQ"] + c["FQ"] <= tg.regs)
    if "MB" in c and "NV" in c and lp.kernel and lp.kernel.path.name != "pointwise":
        need(f"GEMM tile {c['MB']} x {c['NV']} > {tg.regs // 2}", c["MB"] * c["NV"] <= tg.regs // 2)
        need(f"weight-gradient tile {c['MBW']} x {c['NVW']}", c["MBW"] * c["NVW"] <= tg.acc_max)
        need(f"input-gradient tile {c['KB2']} x {c['NV']}", c["KB2"] * c["NV"] <= tg.acc_max)
    if lp.kernel and lp.kernel.path.name == "pointwise":
        need(f"forward tile {c['MB']} x {c['NV']}", c["MB"] * c["NV"] <= tg.acc_max)
        need(f"lane-sum tile {c['DMB']} x {c['DKB']}", c["DMB"] * c["DKB"] + c["DMB"] + 1 <= tg.tile_regs)
    if "DWG_MB" in c:
        need(f"gathered weight-gradient tile {c['DWG_MB']} x {c['DWG_KB']}",
             c["DWG_MB"] * c["DWG_KB"] + c["DWG_MB"] + 2 <= tg.regs)
    if "WG_TB" in c:
        need(f"Winograd GEMM {c['WG_TB']} x {c['WG_CB']}", c["WG_TB"] * c["WG_CB"] <= tg.acc_max)
    if "DW_IB" in c:
        need(f"Winograd weight gradient {c['DW_IB']} x {c['DW_CB']}", c["DW_IB"] * c["DW_CB"] <= tg.acc_max)
    return bad


@pytest.mark.parametrize("vec", [16, 8, 4])
def test_register_tiles_fit_the_targets_registers(vec):
    tg = target.TARGETS[vec]
    texts = {p.stem: p.read_text() for p in sorted((ROOT / "specs").glob("*.yaml"))}
    bad = []
    with target.using(tg):
        for name, text in {**texts, **ALL}.items():
            net = check_text(text, f"{name}.yaml")
            if name in KERNELS:
                net = force_kernels(net, KERNELS[name])
            for lp in make_plan(net).layers:
                bad += [f"{name}: {b}" for b in _tiles(lp, tg)]
    assert not bad, "\n".join(bad[:40])


def test_a_path_forced_where_only_wider_vectors_refuse_it_says_the_width():
    text = EDGE["winograd_8ch"]
    with target.using(8):
        force_kernels(check_text(text), {"conv2": "winograd"})
    with target.using(16), pytest.raises(KernelError, match=r"'winograd' does not apply \(3x3, stride 1, no dilation, "
                                                            r"one group, at least 16 channels in and out\)"):
        force_kernels(check_text(text), {"conv2": "winograd"})


def test_a_path_forced_at_one_width_and_planned_at_another_is_refused():
    with target.using(8):
        net = force_kernels(check_text(EDGE["winograd_8ch"]), {"conv2": "winograd"})
    with target.using(16), pytest.raises(KernelError, match="does not apply with vectors of 16 reals"):
        make_plan(net)


def test_one_network_planned_at_two_widths_gets_each_widths_plan():
    net = load(ROOT / "specs/lenet5.yaml")
    with target.using(16):
        a = make_plan(net)
    with target.using(8):
        b = make_plan(net)
    with target.using(16):
        c = make_plan(net)
    assert (a.vec, b.vec, c.vec) == (16, 8, 16)
    conv = [lp.c for lp in (a.layers[0], b.layers[0], c.layers[0])]
    assert conv[0] == conv[2] and conv[0]["VEC"] == 16 and conv[1]["VEC"] == 8


# ---- the C at each width ----------------------------------------------------------------------
@pytest.mark.parametrize("vec", NARROW)
def test_no_template_leftovers_at_narrower_widths(vec):
    problems = []
    for name, text in {**{p.stem: p.read_text() for p in sorted((ROOT / "specs").glob("*.yaml"))}, **ALL}.items():
        net = check_text(text, f"{name}.yaml")
        if name in KERNELS:
            net = force_kernels(net, KERNELS[name])
        problems += [f"{name}: {p}" for p in lint(render(net, "float32", vec=vec).source)]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:80])


@pytest.mark.skipif(not (X86 and GCC), reason="x86-64 with gcc only")
@pytest.mark.parametrize("march, vec", [("x86-64-v3", 8), ("x86-64", 4)])
def test_project_specs_compile_without_warnings_at_the_targets_width(march, vec, tmp_path):
    flags = [f for f in default_flags(GCC) if not f.startswith("-march")] + [f"-march={march}"]
    sources = test_sanitizers._project_sources(flags, vec=vec)
    failures = test_sanitizers._compile_all(GCC, flags, tmp_path, sources)
    assert not failures, f"warnings at -march={march}, VEC={vec}:\n" + "\n".join(failures)


@pytest.mark.parametrize("vec", NARROW)
@pytest.mark.parametrize("name", ["san_all", "san_gemm", "san_wino_dx", "san_wino_dw", "san_graph", "san_paths",
                                  "san_fold"])
def test_sanitizers_clean_at_narrower_widths(name, vec, tmp_path):
    # AVX2 where the machine has it (the width's own instructions), else the baseline's
    march = ("-march=x86-64-v3",) if vec == 8 and X86 and _native_vec() >= 8 else ()
    test_sanitizers.run_sanitized(name, "float32", tmp_path, vec=vec, march=march)


# ---- memory layout: every tensor at whole vectors ------------------------------------------------
ODD_SIZES = """
name: odd_sizes
input: [3, 7, 7]
layers:
  - conv2d: {out_channels: 5, kernel_size: 3}
  - batchnorm2d
  - relu: {name: trunk}
  - conv2d: {name: side, out_channels: 5, kernel_size: 3, inputs: [input]}
  - add: {inputs: [trunk, side]}
  - maxpool2d: {kernel_size: 2, stride: 2, ceil_mode: true}
  - flatten
  - linear: {out_features: 13}
  - relu
  - linear: {out_features: 3}
loss: cross_entropy
"""


@pytest.mark.parametrize("vec", (16, 8, 4))
def test_every_slot_starts_at_whole_vectors(vec):
    """Parameters, buffers, activations, statistics, caches and each thread's scratch start at
    multiples of VEC reals (sizes here are odd: 135 weights, 5 biases, 3x7x7 inputs), so the
    C's vector loads of a slot start where a vector does."""
    with target.using(vec):
        plan = make_plan(check_text(ODD_SIZES))
    for group in (plan.params, plan.buffers, plan.activations, plan.stats, plan.cache):
        assert [t.offset % vec for t in group] == [0] * len(group), [(t.name, t.offset) for t in group]
    for size in (plan.num_params, plan.num_buffers, plan.acts_per_sample, plan.stats_size, plan.cache_size,
                 plan.scratch_per_thread):
        assert size % vec == 0, size
    assert [t.size for t in plan.params][:2] == [135, 5]  # the gaps are not counted as parameters
    assert sum(t.size for t in plan.params) == check_text(ODD_SIZES).total_params


def test_the_runtime_arrays_start_at_cache_lines():
    """Every array the C reads or writes through a vector starts at a multiple of 64 bytes
    (numpy gives 16): with the slots at whole vectors, no vector load straddles two lines."""
    net = build(ODD_SIZES, "float32", threads=2)
    net.forward(np.zeros((3, 3, 7, 7), np.float32))
    arrays = {"params": net._params, "grads": net._grad_ext, "m": net._opt_m, "v": net._opt_v,
              "buffers": net._buffers, "stats": net._stats, "cache": net._cache, "acts": net._acts,
              "dacts": net._dacts, "ints": net._ints, "grads_tls": net._grads_tls, "scratch": net._scratch}
    assert {k: a.ctypes.data % 64 for k, a in arrays.items()} == dict.fromkeys(arrays, 0)


def test_optimizer_state_moves_between_vector_widths():
    """Checkpointed moments are packed (no alignment gaps, whose size depends on VEC): Adam
    state saved by a VEC = 16 build resumes in a VEC = 4 build to the same next step."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 7, 7)), np.array([0, 1, 2, 1])
    wide, narrow = build(ODD_SIZES, vec=16), build(ODD_SIZES, vec=4)
    for net in (wide, narrow):
        net.set_optimizer("adam", lr=0.01)
    wide.train_step(x, y)
    state = wide.optimizer_state()
    assert state["m"].shape == (check_text(ODD_SIZES).total_params,) and np.any(state["m"])
    narrow.load_state_dict(wide.state_dict())
    narrow.load_optimizer_state(state)
    for k in ("m", "v", "step"):
        np.testing.assert_array_equal(narrow.optimizer_state()[k], state[k])
    wide.train_step(x, y)
    narrow.train_step(x, y)
    for name, p in wide.params.items():
        assert_close(narrow.params[name], p, 1e-10, f"{name} after a resumed step", atol=1e-12)
