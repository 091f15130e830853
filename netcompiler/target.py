"""The machine the generated C is built for: its vector width and vector register count.

The generated C computes on `vreal`s, VEC reals handled as one value (the GCC/clang vector
extension), and sizes its register tiles from the number of vector registers.  Both come
from the target the C compiler builds for with the build's flags (`-march=native` by
default): a vreal is one register there, so the compiler keeps the tiles in registers.
GCC's code for vectors wider than the machine's registers moves them through memory and
general registers (built for AVX2, the VEC = 16 C trained resnet8 13x slower than the
VEC = 8 C: README, "Code generation").

| target (compiler macro)      | VEC (floats) | vector registers |
|------------------------------|--------------|------------------|
| AVX-512 (`__AVX512F__`)      | 16           | 32               |
| AVX, AVX2 (`__AVX__`)        | 8            | 16               |
| anything else (SSE2, NEON)   | 4            | 16               |

`NETC_VEC` (4, 8 or 16) overrides the detection, for every build of the process and of the
processes it starts (the tests pin it so that their expected tiles do not depend on the
machine); `using(vec)` overrides it for the plans made inside it.  The plan records the
width it was made with (`Plan.vec`), and the rendered C defines VEC from it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import subprocess
from dataclasses import dataclass

from .errors import TargetError

VEC_CHOICES = (4, 8, 16)
ENV = "NETC_VEC"


@dataclass(frozen=True)
class Target:
    vec: int  # reals per vreal
    regs: int  # vector registers

    @property
    def acc_max(self) -> int:
        """Vector accumulators a register tile may hold: 3/4 of the registers (24 of 32, 12 of
        16), the rest for the operands it loads."""
        return self.regs * 3 // 4

    @property
    def tile_regs(self) -> int:
        """Registers a tile may use in all (accumulators and operands): all but two."""
        return self.regs - 2


TARGETS = {16: Target(16, 32), 8: Target(8, 16), 4: Target(4, 16)}

_forced: contextvars.ContextVar[Target | None] = contextvars.ContextVar("netc_target", default=None)


def check_vec(value, what: str = "the vector width") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in VEC_CHOICES:
        raise TargetError(f"{what} must be one of {', '.join(map(str, VEC_CHOICES))} (reals per vector), "
                         f"got {value!r}")
    return value


def _env_vec() -> int | None:
    v = os.environ.get(ENV)
    if v is None or v == "":
        return None
    try:
        return check_vec(int(v), ENV)
    except ValueError:
        raise TargetError(f"{ENV} must be one of {', '.join(map(str, VEC_CHOICES))}, got {v!r}") from None


def _compiler_vec(cc: str, flags: tuple[str, ...]) -> int:
    """The vector width of what `cc flags` builds for, from its predefined macros; 4 when they
    cannot be read (an unknown compiler still builds correct C with it)."""
    args = [f for f in flags if f.startswith(("-m", "-std="))]
    try:
        r = subprocess.run([cc, *args, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 4
    macros = set(line.split()[1] for line in r.stdout.splitlines() if line.startswith("#define "))
    if "__AVX512F__" in macros:
        return 16
    if "__AVX__" in macros:
        return 8
    return 4


@functools.lru_cache(maxsize=None)
def _build_vec(cc: str | None, cc_env: str | None, flags: tuple[str, ...] | None) -> int:
    """_compiler_vec of the build with `cc` (None: build.compiler(), which reads $CC: `cc_env`
    keys the cache) and `flags` (None: the default flags); 4 without a compiler (checks and
    reports still plan)."""
    from .build import compiler, default_flags
    from .errors import BuildError

    if cc is None:
        try:
            cc = compiler()
        except BuildError:
            return 4
    return _compiler_vec(cc, flags if flags is not None else tuple(default_flags(cc)))


def detect(flags: list[str] | None = None, cc: str | None = None) -> Target:
    """The target of a build with these flags (default: the default build flags)."""
    v = _env_vec()
    if v is not None:
        return TARGETS[v]
    return TARGETS[_build_vec(cc, os.environ.get("CC"), None if flags is None else tuple(flags))]


def resolve(vec: int | None = None, flags: list[str] | None = None) -> Target:
    """The target of vectors of `vec` reals when given, else detect(flags)'s."""
    return TARGETS[check_vec(vec)] if vec is not None else detect(flags)


def current() -> Target:
    """The target plans are made for now: `using`'s, else NETC_VEC's, else the default build's."""
    t = _forced.get()
    return t if t is not None else detect()


@contextlib.contextmanager
def using(target: Target | int):
    """Plans made inside are made for `target` (a Target or a vector width)."""
    if not isinstance(target, Target):
        target = TARGETS[check_vec(target)]
    token = _forced.set(target)
    try:
        yield target
    finally:
        _forced.reset(token)
