"""The arena of an exported network: only the tensors alive at the same time.

Liveness over the graph: a step's output is alive from the step that writes it to the
last step that reads it; a step's scratch only while the step runs.  The network input
and output are the caller's, not in the arena.  Three kinds of sharing come first:

* a concat's part is written by its producer straight into the concat's output, at the
  part's offset (a view; the concat then copies only the parts that cannot be views: the
  network input, a part listed twice, a part already inside another concat);
* a step marked `in_place` (element-wise, add) writes over an input that dies there (its
  last reader is this step), when that input has a buffer of its own of the same size;
* a view of a view is a view (a concat inside a concat: DenseNet's growing features).

The buffers are then placed by greedy first fit, largest first (TensorFlow Lite's
"greedy by size"): each at the lowest offset that overlaps no placed buffer alive at the
same time.  For a chain this gives max over steps of (input + scratch + output), the
least any placement can.  Sizes are rounded up to 16 bytes so every buffer is 16-byte
aligned in an aligned arena.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .lower import Step


def _round16(n: int, elem_bytes: int) -> int:
    """n elements of elem_bytes rounded up to 16 bytes, in elements."""
    per = 16 // elem_bytes
    return -(-n // per) * per


@dataclass
class Buffer:
    """A region of the arena: the output of one or more steps (in place, views), or a scratch."""

    name: str  # the step it belongs to
    size: int  # elements, rounded up to 16 bytes
    what: str  # for the comment
    side: str  # "out" | "scratch"
    offset: int = 0
    macro: str = ""  # its offset in the arena, in elements
    start: int = 0  # the steps during which it is alive (inclusive)
    end: int = 0

    def __post_init__(self) -> None:
        self.macro = self.macro or f"{self.name.upper()}_{'SCRATCH' if self.side == 'scratch' else 'OUT'}"


@dataclass
class Place:
    """Where a step's output lives: `base` ('input', 'output' or an arena Buffer) + offset."""

    base: object
    offset: int = 0


@dataclass
class MemoryPlan:
    buffers: list[Buffer]
    arena_floats: int  # in elements: floats, or bytes for int8
    elem_bytes: int = 4
    places: dict[int, Place] = field(default_factory=dict)  # id(step) -> where its output is

    @property
    def arena_bytes(self) -> int:
        return self.elem_bytes * self.arena_floats

    def region(self, step: Step | None) -> tuple[str, int, int]:
        """(base, first element, size) of a step's output (None: the network input); base
        is 'input', 'output' or 'arena'."""
        if step is None:
            return ("input", 0, 0)
        p = self.places[id(step)]
        if isinstance(p.base, Buffer):
            return ("arena", p.base.offset + p.offset, step.out_size)
        return (p.base, p.offset, step.out_size)


def _ref(p: Place) -> str:
    base = p.base if isinstance(p.base, str) else f"a + {p.base.macro}"
    return base + (f" + {p.offset}" if p.offset else "")


def _greedy(buffers: list[Buffer]) -> int:
    """Offsets by first fit, largest buffer first; returns the arena size."""
    placed: list[Buffer] = []
    for b in sorted(buffers, key=lambda b: (-b.size, b.start, b.side)):
        at = 0
        for o in sorted((o for o in placed if o.start <= b.end and b.start <= o.end), key=lambda o: o.offset):
            if at + b.size <= o.offset:
                break
            at = max(at, o.offset + o.size)
        b.offset = at
        placed.append(b)
    return max((b.offset + b.size for b in buffers), default=0)


def concat_views(steps: list[Step]) -> dict[int, tuple[Step, int]]:
    """id(part) -> (the concat whose output holds it, its offset there in elements), for the
    concat parts written in place; each concat's `copies` lists the others (the network
    input, a part listed twice, a part already inside an earlier concat)."""
    parent: dict[int, tuple[Step, int]] = {}
    for s in steps:
        if s.op != "concat":
            continue
        s.copies = []
        for k, (src, off) in enumerate(zip(s.inputs, s.c["OFFSETS"])):
            if src is None or src.output or id(src) in parent or s.inputs.count(src) > 1:
                s.copies.append((k, off, s.c["SIZES"][k]))
            else:
                parent[id(src)] = (s, off)
    return parent


def plan_memory(steps: list[Step], elem_bytes: int = 4) -> MemoryPlan:
    """elem_bytes: 4 for float32 tensors, 1 for int8 (sizes and offsets are in elements)."""
    index = {id(s): i for i, s in enumerate(steps)}
    last = {id(s): i for i, s in enumerate(steps)}  # the last step reading each output
    for i, s in enumerate(steps):
        for src in s.inputs:
            if src is not None:
                last[id(src)] = max(last[id(src)], i)
    parent = concat_views(steps)

    def root(s: Step) -> tuple[Step, int]:
        off = 0
        while id(s) in parent:
            s, o = parent[id(s)]
            off += o
        return s, off

    group_last: dict[int, int] = {}  # root step -> the last read of anything inside its output
    for s in steps:
        r = root(s)[0]
        group_last[id(r)] = max(group_last.get(id(r), 0), last[id(s)])
    places: dict[int, Place] = {}
    buffers: list[Buffer] = []
    own: dict[int, Buffer] = {}  # root step -> its buffer
    members: dict[int, list[Step]] = {}  # buffer -> the steps whose outputs live in it
    for i, s in enumerate(steps):
        r, off = root(s)
        if r is not s:
            continue  # placed with its root below
        if s.output:
            continue
        reuse = None
        if s.in_place and s.op != "concat" and id(s) not in parent:
            for src in s.inputs:
                if src is None or id(src) in parent:
                    continue
                b = own.get(id(src))
                if b is None or places[id(src)].offset or b.size != _round16(s.out_size, elem_bytes):
                    continue
                if max(group_last[id(m)] for m in members[id(b)]) == i:  # everything in it dies here
                    reuse = b
                    break
        if reuse is not None:
            own[id(s)] = reuse
            places[id(s)] = Place(reuse)
            members[id(reuse)].append(s)
            continue
        b = Buffer(s.name, _round16(s.out_size, elem_bytes), f"{s.name}'s output {''.join(f'[{d}]' for d in s.out_shape)}",
                   "out")
        buffers.append(b)
        own[id(s)] = b
        places[id(s)] = Place(b)
        members[id(b)] = [s]
    for s in steps:  # views, and the network output
        r, off = root(s)
        if r.output:
            places[id(s)] = Place("output", off)
        elif r is not s:
            places[id(s)] = Place(own[id(r)], off)
            members[id(own[id(r)])].append(s)
    for b in buffers:
        ms = members[id(b)]
        b.start, b.end = min(index[id(m)] for m in ms), max(last[id(m)] for m in ms)
    regions = list(buffers)
    for i, s in enumerate(steps):
        if s.scratch:
            regions.append(Buffer(s.name, s.scratch, f"{s.name}'s scratch: {s.scratch_doc}", "scratch", start=i, end=i))
    arena = _greedy(regions)
    seen: set[str] = set()
    for i, b in enumerate(sorted(regions, key=lambda b: (b.offset, b.start))):
        if b.macro in seen:  # layer names that differ only in case
            b.macro = f"{b.macro}_{i}"
        seen.add(b.macro)
    for s in steps:
        s.in_refs = ["input" if src is None else _ref(places[id(src)]) for src in s.inputs]
        s.in_ref = s.in_refs[0] if s.in_refs else "input"
        s.out_ref = _ref(places[id(s)])
        s.scratch_ref = next((f"a + {b.macro}" for b in regions if b.side == "scratch" and b.name == s.name
                              and b.start == index[id(s)]), "")
    return MemoryPlan(sorted(regions, key=lambda b: (b.offset, b.start)), arena, elem_bytes, places)
