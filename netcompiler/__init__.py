"""netcompiler: a declarative neural-network compiler.

Pipeline: parse (spec.py) -> check (check.py) -> plan (plan.py) -> render (render.py,
templates/) -> compile/load (build.py) -> run (runtime.py).

    import netcompiler as nc
    net = nc.compile("specs/lenet5.yaml")
    logits = net.forward(x)
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# How idle OpenMP threads wait, set at import, before any network (and so the OpenMP runtime)
# is loaded: libgomp reads these variables once, when it is loaded.  Its default spins up to
# 300,000 times (~12 ms at the ~40 ns a `pause` takes here) at every barrier and region start;
# when another process holds a core, the spinning threads burn the time the working ones need,
# and 2-thread training fell to 0.03-0.72x the 1-thread speed (bench/busy.py; README, Threads).
# A short spin (100 ~ 4 us), then sleep: a thread that sleeps is scheduled at once when woken;
# measured 0.57-7.3x (median 1.9x) the 1-thread speed with a busy core.  Longer spins measured
# worse, OMP_WAIT_POLICY=passive alone (no spin) about the same.  OMP_WAIT_POLICY=passive says the same to
# LLVM's libomp (clang builds); libgomp takes its spin count from GOMP_SPINCOUNT.  Nothing is
# set when the user set either variable.  The setting is inherited by child processes and read
# by any OpenMP runtime loaded later (torch bundles libgomp.so.1: one copy serves both); when
# one was loaded before netcompiler was imported (torch imported first), it keeps its own.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "100"}
if not any(k in _os.environ for k in OPENMP_WAIT):
    _os.environ.update(OPENMP_WAIT)


def compile(spec, dtype: str = "float32", threads: int | None = None, flags: list[str] | None = None,
            out_dir=None, memory_budget: int | None = None, kernels: dict[str, str] | None = None,
            vec: int | None = None):
    """Check, generate, build (cached) and load a spec; return a `runtime.Net`.

    `spec` is a path or an already checked `check.Network`; `threads` is as for `Net.threads`
    (1 to runtime.MAX_THREADS; None: runtime.default_threads(), the available cores not busy
    with other work).  `kernels` forces kernel paths, layer name -> path (`{"conv1": "im2col"}`;
    `netc report --kernels` lists the choices); a path that does not apply to its layer is an
    `errors.KernelError`.  `vec` (4, 8 or 16) sets the reals per vector of the generated C instead
    of the build target's (see `target`): any width runs anywhere, the target's runs fastest."""
    import cffi

    from .build import compile_rendered, default_flags
    from .check import DEFAULT_MEMORY_BUDGET, Network, force_kernels, load
    from .render import render
    from .runtime import Net, check_threads

    from .target import resolve, using

    threads = check_threads(threads)  # before the build: a bad count fails at once
    flags = list(flags) if flags is not None else default_flags()
    tg = resolve(vec, flags)
    net = spec if isinstance(spec, Network) else load(spec, memory_budget or DEFAULT_MEMORY_BUDGET)
    with using(tg):  # where a forced path applies depends on the vector width
        if kernels:
            net = force_kernels(net, kernels)
        rendered = render(net, dtype, flags, vec=tg.vec)
    built = compile_rendered(rendered, out_dir=out_dir, flags=flags)
    ffi = cffi.FFI()
    ffi.cdef(rendered.api)
    # RTLD_NODELETE: the library (and its OpenMP runtime) stays mapped until the process
    # exits; unloading it while OpenMP worker threads still spin crashed at exit.
    try:
        lib = ffi.dlopen(str(built.load_path), ffi.RTLD_NOW | ffi.RTLD_NODELETE)
    except OSError as exc:  # e.g. a library damaged in the cache after it was built
        from .errors import BuildError

        reason = str(exc).split(": ")[-1].split(".  Additionally")[0]
        raise BuildError(f"cannot load the compiled library {built.load_path}: {reason}; remove "
                         f"{built.load_path.parent} to rebuild it") from None
    return Net(rendered, ffi, lib, dtype=dtype, threads=threads, paths=built)


def load_spec(path, memory_budget: int | None = None):
    """Parse and check a spec file -> `check.Network` (raises `errors.SpecErrors`)."""
    from .check import DEFAULT_MEMORY_BUDGET, load

    return load(path, memory_budget or DEFAULT_MEMORY_BUDGET)
