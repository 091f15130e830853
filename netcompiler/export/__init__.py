"""`netc export`: standalone inference C for microcontrollers and servers.

    exported = export_c(network, state)        # check.Network, weights by PyTorch name
    exported.write(out_dir)                    # NAME.c and NAME.h, atomically

The C is float32 inference only: weights as `static const` arrays (flash on a
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
from .lower import Step, lower
from .memory import MemoryPlan, plan_memory

TARGETS = ("generic", "host")
TARGET_DOC = {
    "generic": "portable C99: no compiler extensions; register blocks of 4 (for 32-bit MCUs)",
    "host": "portable C99 too, with register blocks of 8 (for CPUs with 16 or more vector registers)",
}
# Estimates for the report, from arm-none-eabi-gcc 12.2 -O2 for a Cortex-M4F (code of
# NAME.o: lenet5 1,852 B, alphabet 2,784 B of which 544 B are GELU's erf and exp; the
# stack NAME_infer used: 104 B and 112 B, measured in examples/cortex-m4)
CODE_BYTES = {"conv": 400, "linear": 300, "maxpool": 250, "avgpool": 300, "elementwise": 100}
CODE_BYTES_BASE = 150  # NAME_infer and its checks
MATH_CODE_BYTES = {"EXP": 200, "ERF": 350, "TANH": 200}
STACK_BYTES = 128  # the deepest call: NAME_infer and one step's function, spills included

@dataclass
class Exported:
    name: str
    source: str
    header: str
    steps: list[Step]
    memory: MemoryPlan
    weights_bytes: int
    target: str

    @property
    def arena_bytes(self) -> int:
        return self.memory.arena_bytes

    @property
    def code_bytes_estimate(self) -> int:
        math_fns = set().union(*(s.math for s in self.steps))
        math_fns |= {"EXP"} if math_fns else set()  # erf and tanh are made from exp
        return (CODE_BYTES_BASE + sum(CODE_BYTES[s.op] for s in self.steps)
                + sum(MATH_CODE_BYTES[m] for m in math_fns))

    @property
    def stack_bytes_estimate(self) -> int:
        return STACK_BYTES

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


def load_state(network, path) -> tuple[dict[str, np.ndarray], tuple[float, float] | None]:
    """The weights file `path` (as netc train writes it), checked against `network`, and the
    input normalisation (mean, std) stored in it, if any."""
    from ..weights import load_npz, meta_float, network_cap, split

    state, meta, _ = split(load_npz(path, cap=network_cap(network)))
    mean, std = meta_float(meta, "mean"), meta_float(meta, "std")
    if not state and (network.param_shapes() or network.buffer_shapes()):
        raise WeightsError(f"{path}: holds no weights (only metadata)")
    check_state(network, state, path)
    return state, (mean, std) if mean is not None and std is not None and std > 0 else None


def export_c(network, state: dict[str, np.ndarray], target: str = "generic", weights_name: str = "",
             normalisation: tuple[float, float] | None = None) -> Exported:
    """`normalisation`: the (mean, std) training scaled inputs with, documented in the header."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    check_state(network, state, weights_name or "weights")
    steps = lower(network.layers, state, target)
    memory = plan_memory(steps)
    arrays = [a for s in steps for a in s.arrays]
    weights_bytes = 4 * sum(a.values.size for a in arrays)
    from .render import render

    source, header = render(network, steps, memory, arrays, weights_bytes, target,
                            network.file, weights_name, normalisation)
    return Exported(network.name, source, header, steps, memory, weights_bytes, target)


__all__ = ["TARGETS", "Exported", "check_state", "export_c", "load_state"]
