"""Index expressions for the generated C, simplified as they are built.

Templates write an index formula with these objects, e.g.
`{{ (ix("ic") * c.HP + ix("ky") * c.DH) * c.WP + ix("kx") * c.DW }}`; Python folds the
numbers, so the C never reads `ky * 1`, `y + 0` or `0 * 784` (with DH = DW = 1 the line
above is `(ic * 32 + ky) * 32 + kx`).  `cloop(...)` (in templates) decides whether a loop
exists at all: one that runs once leaves no `for`, and its variable becomes its only value.
"""
from __future__ import annotations


class Ix:
    """sum of coef * atom over terms, plus const; atoms are C variables or sub-expressions."""

    def __init__(self, terms=(), const: int = 0):
        self.terms: list[tuple[str, int]] = [(a, k) for a, k in terms if k]
        self.const = const

    @staticmethod
    def of(x) -> Ix:
        return x if isinstance(x, Ix) else Ix((), int(x))

    def __add__(self, other) -> Ix:
        o = Ix.of(other)
        merged: dict[str, int] = {}
        for a, k in self.terms + o.terms:
            merged[a] = merged.get(a, 0) + k
        return Ix(merged.items(), self.const + o.const)

    __radd__ = __add__

    def __neg__(self) -> Ix:
        return Ix([(a, -k) for a, k in self.terms], -self.const)

    def __sub__(self, other) -> Ix:
        return self + -Ix.of(other)

    def __rsub__(self, other) -> Ix:
        return Ix.of(other) - self

    def __mul__(self, other) -> Ix:
        if isinstance(other, Ix):
            if not other.terms:
                return self * other.const
            if not self.terms:
                return other * self.const
            return Ix([(f"{self._factor()} * {other._factor()}", 1)])
        if isinstance(other, str):
            return self * ix(other)
        k = int(other)
        if not self.terms or (len(self.terms) == 1 and not self.const) or k in (0, 1):
            return Ix([(a, c * k) for a, c in self.terms], self.const * k)
        return Ix([(f"({self}) * {k}", 1)])

    __rmul__ = __mul__

    def __floordiv__(self, k: int) -> Ix:
        """C's `/` on a non-negative index (a literal quotient for a constant)."""
        return Ix((), self.const // k) if not self.terms else Ix([(f"{self._factor()} / {k}", 1)])

    def _factor(self) -> str:
        s = str(self)
        return s if len(self.terms) + bool(self.const) <= 1 and " + " not in s and " - " not in s else f"({s})"

    def __str__(self) -> str:
        # a positive constant before a leading negative term: `1 - ox * 2`, not `-ox * 2 + 1`
        lead = self.terms and self.terms[0][1] < 0 and self.const > 0
        out = str(self.const) if lead else ""
        for a, k in self.terms:
            if (abs(k) != 1 and _loose(a, "+-%/")) or (k < 0 and _loose(a, "+-")):
                a = f"({a})"
            mag = a if abs(k) == 1 else f"{a} * {abs(k)}"
            out += (f" - {mag}" if out else f"-{mag}") if k < 0 else (f" + {mag}" if out else mag)
        if (self.const and not lead) or not out:
            c = self.const
            out += (f" - {-c}" if c < 0 else f" + {c}") if out else str(c)
        return out


def _loose(atom: str, ops: str) -> bool:
    """Whether atom has a binary operator from ops outside parentheses and brackets."""
    depth = 0
    for i, ch in enumerate(atom):
        depth += ch in "([" and 1 or (ch in ")]" and -1 or 0)
        if depth == 0 and ch in ops and 0 < i < len(atom) - 1 and atom[i - 1] == " " and atom[i + 1] == " ":
            return True
    return False


def ix(name: str) -> Ix:
    return Ix([(name, 1)])


class Loop:
    """`for (int v = lo; v < hi; v += step)` when it runs more than once; otherwise no loop
    (head is empty) and v is the constant lo."""

    def __init__(self, var: str, lo: int, hi, step: int | str = 1, step_c: str | None = None):
        # step may be a C expression ("2 * VEC"): such a loop is taken to run more than once;
        # step_c is how a numeric step is written in the C ("VEC" for 16)
        self.name = var
        self.trips = None
        if isinstance(hi, int) and isinstance(lo, int) and isinstance(step, int):
            self.trips = max(0, -(-(hi - lo) // step))
        once = self.trips is not None and self.trips <= 1
        inc = f"{var}++" if step == 1 and not step_c else f"{var} += {step_c or step}"
        self._head = "" if once else f"for (int {var} = {lo}; {var} < {hi}; {inc}) "
        self.v = Ix.of(lo) if once else ix(var)
        self.runs = self.trips != 0

    @property
    def head(self) -> str:
        if not self.runs:  # a loop that never runs must leave out its body too
            raise ValueError(f"loop over {self.name} runs no times: test .runs first")
        return self._head

    def __str__(self) -> str:
        return str(self.v)


def loop(var: str, lo, hi, step=1, step_c=None) -> Loop:
    return Loop(var, lo, hi, step, step_c)


def prod(*factors) -> str:
    """`a * b * c` without the factors that are 1 (`1` when all are)."""
    kept = [str(f) for f in factors if str(f) != "1"]
    return " * ".join(kept) or "1"


def at(pointer: str, offset) -> Ix:
    """`pointer + offset`, or the bare pointer when the offset is 0."""
    return ix(pointer) + offset


def uses(c_text: str, name: str) -> bool:
    """Whether C text (its comments left out) reads the variable `name` (not a member `x->name`)."""
    import re

    code = re.sub(r"/\*.*?\*/|//[^\n]*", " ", str(c_text), flags=re.S)
    return re.search(rf"(?<![\w.>]){re.escape(name)}\b", code) is not None
