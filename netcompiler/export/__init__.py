"""`netc export`: standalone inference C for microcontrollers and servers.

    exported = export_c(network, state)        # check.Network, weights by PyTorch name
    exported.write(out_dir)                    # NAME.c and NAME.h, atomically

The network may be a graph (fan-out, add, concat).  The C is float32 inference (or int8,
export_int8): weights as `static const` arrays (flash on a
microcontroller), no heap, no state between calls, no OpenMP, no compiler extensions.
The caller passes an arena of `NAME_ARENA_BYTES` for the intermediate tensors; the
memory plan (memory.py) keeps in it only the tensors alive at the same time.
Stages: lower (lower.py: layers -> steps, with fusions) -> plan memory -> render
(templates/export/).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..fileio import atomic_write_text
from .lower import Step, choose_conv_forms, lower
from .memory import MemoryPlan, plan_memory

TARGETS = ("generic", "host", "cortex-m4", "cortex-m7")
TARGET_DOC = {
    "generic": "portable C99: no compiler extensions; register blocks of 4 (for 32-bit MCUs)",
    "host": "portable C99 too, with register blocks of 8 (for CPUs with 16 or more vector registers)",
    "cortex-m4": "as generic; int8 convolutions use the DSP extension's dual 16-bit multiply-accumulate "
                 "(SMLAD, <arm_acle.h>) where __ARM_FEATURE_DSP is defined, plain C elsewhere",
    "cortex-m7": "as cortex-m4",
}
DSP_TARGETS = ("cortex-m4", "cortex-m7")
# Estimates for the report, from arm-none-eabi-gcc 12.2 -O2 for a Cortex-M4F (code of
# NAME.o: lenet5 1,852 B, alphabet 2,784 B of which 544 B are GELU's erf and exp; the
# stack NAME_infer used: 104 B and 112 B, measured in examples/cortex-m4)
CODE_BYTES = {"conv": 400, "linear": 300, "maxpool": 250, "avgpool": 300, "elementwise": 100,
              # graph steps, from the functions of tests/specs/export_graph.yaml's NAME.o (the same
              # compiler, -O2 -fno-inline): add with a hardswish 66 + 72 B, a concat's copy 12 B
              # (memcpy), adaptive_avgpool2d 244 B (global: 64 B), upsample 66 B
              "add": 140, "concat": 20, "adaptive_avgpool": 250, "upsample": 70}
CODE_BYTES_BASE = 150  # NAME_infer and its checks
MATH_CODE_BYTES = {"EXP": 200, "ERF": 350, "TANH": 200}
STACK_BYTES = 128  # the deepest call: NAME_infer and one step's function, spills included
# int8 (the same compiler and flags; code of NAME.o: lenet5 4,266 B generic, 6,072 B with
# SMLAD; alphabet 5,270 B and 6,050 B; stack of NAME_infer_int8 up to 260 B)
CODE_BYTES_INT8 = {"conv": 1300, "linear": 450, "maxpool": 250, "avgpool": 300, "elementwise": 100,
                   # export_graph.yaml's int8 NAME.o (-O2 -fno-inline): add 104-116 B, a concat's copy
                   # 12 B (60 B with a table), adaptive_avgpool2d 244 B (global: 80 B), upsample 70 B
                   "add": 140, "concat": 20, "adaptive_avgpool": 250, "upsample": 70}
CODE_BYTES_INT8_DSP_CONV = 1500
CODE_BYTES_INT8_BASE = 1000  # requant, NAME_infer_int8 and the float wrapper
STACK_BYTES_INT8 = 288

@dataclass
class Exported:
    name: str
    source: str
    header: str
    steps: list[Step]
    memory: MemoryPlan
    weights_bytes: int
    target: str
    qnet: object = None  # quant.QNet of an int8 build

    @property
    def arena_bytes(self) -> int:
        return self.memory.arena_bytes

    @property
    def code_bytes_estimate(self) -> int:
        if self.qnet is not None:
            return CODE_BYTES_INT8_BASE + sum(CODE_BYTES_INT8_DSP_CONV if s.c.get("DSP") else CODE_BYTES_INT8[s.op]
                                              for s in self.steps)
        math_fns = set().union(*(s.math for s in self.steps))
        math_fns |= {"EXP"} if math_fns else set()  # erf and tanh are made from exp
        return (CODE_BYTES_BASE + sum(CODE_BYTES[s.op] for s in self.steps)
                + sum(MATH_CODE_BYTES[m] for m in math_fns))

    @property
    def stack_bytes_estimate(self) -> int:
        return STACK_BYTES_INT8 if self.qnet is not None else STACK_BYTES

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        c_path, h_path = out / f"{self.name}.c", out / f"{self.name}.h"
        atomic_write_text(h_path, self.header)
        atomic_write_text(c_path, self.source)
        return c_path, h_path

    def summary(self) -> list[str]:
        flash = self.weights_bytes + self.code_bytes_estimate
        ram = self.arena_bytes + self.stack_bytes_estimate
        return [
            f"flash: {flash:,} B = {self.weights_bytes:,} B weights + ~{self.code_bytes_estimate:,} B code (estimate)",
            f"RAM:   {ram:,} B = {self.arena_bytes:,} B arena ({self.name.upper()}_ARENA_BYTES) + "
            f"~{self.stack_bytes_estimate:,} B stack (estimate); input and output buffers are the caller's",
        ]


def check_state(network, state: dict[str, np.ndarray], path) -> None:
    """Every parameter and buffer present with its shape, nothing extra, finite in float32
    (the exported C's type): the rule Net.load_state_dict applies (weights.state_problems)."""
    from ..weights import state_problems

    problems = state_problems({**network.param_shapes(), **network.buffer_shapes()}, state, np.float32)
    if problems:
        raise WeightsError(f"{path}: weights do not fit network '{network.name}':\n  " + "\n  ".join(problems))


Normalisation = tuple  # (mean, std): numbers, or lists of one per input channel


def load_state(network, path) -> tuple[dict[str, np.ndarray], Normalisation | None]:
    """The weights file `path` (as netc train writes it), checked against `network`, and the
    input normalisation (mean, std) the network was trained with, found as netc eval and netc
    predict find it: stored in the file, else normalization.json next to it, else the spec's
    train: section.  Each of mean and std is one number or a list of one per channel."""
    from ..weights import load_npz, network_cap, normalisation, read_meta, split

    state, raw, _ = split(load_npz(path, cap=network_cap(network)))
    mean, std, _ = normalisation(path, read_meta(raw, path), network)
    if not state and (network.param_shapes() or network.buffer_shapes()):
        raise WeightsError(f"{path}: holds no weights (only metadata)")
    check_state(network, state, path)
    return state, (mean, std) if mean is not None and std is not None else None


def per_channel(normalisation: Normalisation | None, channels: int) -> tuple[list[float], list[float]] | None:
    """(mean, std) as lists of `channels` values (a single number repeated), or None."""
    if normalisation is None:
        return None
    return tuple([float(x) for x in v] if isinstance(v, (list, tuple, np.ndarray)) else [float(v)] * channels
                 for v in normalisation)


def export_c(network, state: dict[str, np.ndarray], target: str = "generic", weights_name: str = "",
             normalisation: Normalisation | None = None, forms: dict[str, str] | None = None) -> Exported:
    """`normalisation`: the (mean, std) training scaled inputs with (numbers, or lists of one per
    channel), documented in the header.  `forms`: conv step name -> the form of lower.CONV_FORMS
    to use (default: the cheapest)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    check_state(network, state, weights_name or "weights")
    steps = lower(network.layers, state, target)
    choose_conv_forms(steps, target, forms)
    memory = plan_memory(steps)
    arrays = [a for s in steps for a in s.arrays]
    weights_bytes = 4 * sum(a.values.size for a in arrays)
    from .render import render

    source, header = render(network, steps, memory, arrays, weights_bytes, target,
                            network.file, weights_name, normalisation)
    return Exported(network.name, source, header, steps, memory, weights_bytes, target)


def _int8_scratch(qs) -> None:
    """The scratch of a step in bytes when its tensors are int8: the padded input and the
    conv row, each rounded up to 16 bytes.  A fused max-pool with no table before it runs
    on the int32 accumulators (requantisation is monotonic, so the max commutes with it):
    its row and the row of window maxima are int32."""
    step = qs.step
    c = step.c
    if step.op != "conv":
        return
    r16 = lambda n: -(-n // 16) * 16  # noqa: E731
    cin, hp, wp = c["CIN"], c["HP"], c["WP"]
    step.scratch = r16(c["XPAD_SIZE"]) if c["PADDED"] else 0
    docs = [f"the padded input int8 [{cin}][{hp}][{wp}] at +0"] if c["PADDED"] else []
    c.setdefault("DSP", False)
    c["POOL_ACC"] = c["POOL"] and qs.pre_lut is None
    if c["DSP"]:  # the input as int16, channels interleaved in pairs (see quant.dsp_layout)
        step.scratch = r16(2 * c["X16_SIZE"])
        docs = [f"the input int16, channels in pairs [{c['GROUPS'] * c['CPG']}][{hp}][{wp}][2] at +0"]
    if c["POOL"]:
        c["ROW_OFF"] = step.scratch
        docs.append(f"one conv output row {'int32' if c['POOL_ACC'] else 'int8'} [{c['OW']}] at +{step.scratch}")
        step.scratch += r16(c["OW"] * (4 if c["POOL_ACC"] else 1))
    if c["POOL_ACC"]:
        c["PROW_OFF"] = step.scratch
        docs.append(f"the window maxima int32 [{c['POW']}] at +{step.scratch}")
        step.scratch += r16(4 * c["POW"])
    step.scratch_doc = ", ".join(docs)


def calibration_inputs(network, data: str, count: int, normalisation: Normalisation | None) -> np.ndarray:
    """The first `count` training images of `data` (as netc train's --data), scaled as in training
    (per channel when the normalisation has one value per channel)."""
    from ..data import load_dataset
    from ..train import to_inputs

    ds = load_dataset(data)
    mean, std = normalisation if normalisation else (None, None)
    return to_inputs(network, ds.train_x[:count], mean, std, False, "float32")


def export_int8(network, state: dict[str, np.ndarray], calibration: np.ndarray | None, target: str = "generic",
                weights_name: str = "", normalisation: Normalisation | None = None,
                calibration_name: str = "", ranges: dict | None = None, render: bool = True) -> Exported:
    """int8 post-training static quantisation (quant.py), calibrated on the float32 inputs
    `calibration` (N, *input shape), or on given `ranges`; the C does integer arithmetic
    only.  render=False: the plan and sizes only (source and header empty)."""
    from .quant import calibrate, quantize, refuse
    from .render import int8_arrays, render_int8

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    check_state(network, state, weights_name or "weights")
    refuse(lower(network.layers, state, target))  # before calibrating
    qnet = quantize(network, state, ranges or calibrate(network, state, calibration), target)
    if target in DSP_TARGETS:
        from .quant import dsp_layout

        for qs in qnet.steps:
            dsp_layout(qs)
    steps = [qs.step for qs in qnet.steps]
    for qs in qnet.steps:
        _int8_scratch(qs)
    memory = plan_memory(steps, elem_bytes=1)
    arrays = [a for qs in qnet.steps for a in int8_arrays(qs)]
    weights_bytes = sum(a.nbytes for a in arrays)
    if not render:
        return Exported(network.name, "", "", steps, memory, weights_bytes, target, qnet)
    what = (calibration_name or "the calibration images") + (
        f" ({len(calibration)} images, min/max per tensor)" if calibration is not None else "")
    source, header = render_int8(network, qnet, memory, arrays, weights_bytes, target, network.file,
                                 weights_name, what, normalisation)
    return Exported(network.name, source, header, steps, memory, weights_bytes, target, qnet)


def _random_state_and_ranges(network) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """Weights and calibration ranges for sizes only (they do not change any size)."""
    rng = np.random.default_rng(0)
    state = {f"{l.name}.{k}": np.asarray(v, np.float32) for l in network.layers
             for k, v in l.kind.init_params(l, rng).items()}
    return state, {"": (-1.0, 1.0), **{l.name: (-1.0, 1.0) for l in network.layers}}


def estimates(network) -> list[tuple[str, str, int, int]]:
    """(target, build, flash, RAM) of the export of `network` per target, float32 and int8,
    from its shapes alone (flash: weights + code estimate; RAM: arena + stack estimate)."""
    from .quant import dsp_layout  # noqa: F401 (export_int8 applies it)

    from ..errors import NetcError

    state, ranges = _random_state_and_ranges(network)
    rows = []
    for target in TARGETS:
        steps = lower(network.layers, state, target)
        choose_conv_forms(steps, target)
        memory = plan_memory(steps)
        e = Exported(network.name, "", "", steps, memory, 4 * sum(a.values.size for s in steps for a in s.arrays), target)
        rows.append((target, "float32", e.weights_bytes + e.code_bytes_estimate, e.arena_bytes + e.stack_bytes_estimate))
        try:
            q = export_int8(network, state, None, target, ranges=ranges, render=False)
        except NetcError:  # export_lines says why
            continue
        rows.append((target, "int8", q.weights_bytes + q.code_bytes_estimate, q.arena_bytes + q.stack_bytes_estimate))
    return rows


def export_lines(network) -> list[str]:
    """The `netc report` lines: flash and RAM of `netc export` per target, float32 and int8."""
    from ..errors import NetcError

    try:
        rows = estimates(network)
    except NetcError as exc:
        return [f"netc export: not available ({exc})"]
    lines = ["netc export, per target: flash = weights + code (estimate), RAM = arena + stack (estimate):"]
    for target in TARGETS:
        cells = [f"{b} flash {f:,} B, RAM {r:,} B" for t, b, f, r in rows if t == target]
        lines.append(f"  {target:<10} " + "; ".join(cells))
    if not any(b == "int8" for _, b, _, _ in rows):
        try:
            state, ranges = _random_state_and_ranges(network)
            export_int8(network, state, None, ranges=ranges, render=False)
        except NetcError as exc:
            lines.append(f"  int8: not available ({exc})")
    return lines


__all__ = ["TARGETS", "Exported", "calibration_inputs", "check_state", "estimates", "export_c", "export_int8",
           "export_lines", "load_state"]
