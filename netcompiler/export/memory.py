"""The arena of an exported network: only the tensors alive at the same time.

The steps form a chain: step i reads what step i-1 wrote and nothing older, so while it
runs only its input, its output and its scratch are alive.  The first step reads the
caller's input and the last writes the caller's output; neither is in the arena.  Each
new buffer goes to the end of the arena opposite its input (ping-pong): outputs of even
distance from the start at the bottom (offset 0), the others at the top (they end at the
arena's end), and a step's scratch between the two.  The arena is then

    max over steps of (bottom buffer + scratch + top buffer),

the least any placement can give for a chain.  A step marked `in_place` (element-wise
only) writes over its input when that is in the arena.  Sizes are rounded up to 16 bytes
so every buffer is 16-byte aligned in an aligned arena.
"""
from __future__ import annotations

from dataclasses import dataclass

from .lower import Step


def _round16(n: int, elem_bytes: int) -> int:
    """n elements of elem_bytes rounded up to 16 bytes, in elements."""
    per = 16 // elem_bytes
    return -(-n // per) * per


@dataclass
class Buffer:
    """A region of the arena: a step's output, or its scratch."""

    name: str  # the step it belongs to
    size: int  # floats, rounded up to 16 bytes
    what: str  # for the comment
    side: str  # "bottom" | "top" | "scratch"
    offset: int = 0
    macro: str = ""  # its offset in the arena, in floats

    def __post_init__(self) -> None:
        self.macro = self.macro or f"{self.name.upper()}_{'SCRATCH' if self.side == 'scratch' else 'OUT'}"


@dataclass
class MemoryPlan:
    buffers: list[Buffer]
    arena_floats: int  # in elements: floats, or bytes for int8
    elem_bytes: int = 4

    @property
    def arena_bytes(self) -> int:
        return self.elem_bytes * self.arena_floats


def plan_memory(steps: list[Step], elem_bytes: int = 4) -> MemoryPlan:
    """elem_bytes: 4 for float32 tensors, 1 for int8 (sizes and offsets are in elements)."""
    buffers: list[Buffer] = []
    outs: list[Buffer | None] = []  # the arena buffer each step writes (None: the caller's output)
    for i, s in enumerate(steps):
        src = outs[i - 1] if i else None
        if i == len(steps) - 1:
            outs.append(None)
        elif s.in_place and src is not None:
            outs.append(src)
        else:
            side = "top" if src is not None and src.side == "bottom" else "bottom"
            b = Buffer(s.name, _round16(s.out_size, elem_bytes), f"{s.name}'s output {''.join(f'[{d}]' for d in s.out_shape)}", side)
            buffers.append(b)
            outs.append(b)
    arena = 0
    for i, s in enumerate(steps):
        live = {id(b): b for b in (outs[i - 1] if i else None, outs[i]) if b is not None}.values()
        bottom = sum(b.size for b in live if b.side == "bottom")
        top = sum(b.size for b in live if b.side == "top")
        arena = max(arena, bottom + s.scratch + top)
    for b in buffers:
        b.offset = 0 if b.side == "bottom" else arena - b.size
    regions: list[Buffer] = []
    for i, s in enumerate(steps):
        src, dst = (outs[i - 1] if i else None), outs[i]
        if src is not None and all(src is not r for r in regions):
            regions.append(src)
        if s.scratch:  # above the bottom buffer the step uses
            bottom = max([b.size for b in (src, dst) if b is not None and b.side == "bottom"], default=0)
            regions.append(Buffer(s.name, s.scratch, f"{s.name}'s scratch: {s.scratch_doc}", "scratch", bottom))
    seen: set[str] = set()
    for i, b in enumerate(regions):
        if b.macro in seen:  # layer names that differ only in case
            b.macro = f"{b.macro}_{i}"
        seen.add(b.macro)
    for i, s in enumerate(steps):
        src, dst = (outs[i - 1] if i else None), outs[i]
        s.in_ref = "input" if src is None else f"a + {src.macro}"
        s.out_ref = "output" if dst is None else f"a + {dst.macro}"
        s.scratch_ref = next((f"a + {b.macro}" for b in regions if b.side == "scratch" and b.name == s.name), "")
    return MemoryPlan(sorted(regions, key=lambda b: b.offset), arena, elem_bytes)
