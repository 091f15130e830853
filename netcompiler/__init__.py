"""netcompiler: a declarative neural-network compiler.

Pipeline: parse (spec.py) -> check (check.py) -> plan (plan.py) -> render (render.py,
templates/) -> compile/load (build.py) -> run (runtime.py).

    import netcompiler as nc
    net = nc.compile("specs/lenet5.yaml")
    logits = net.forward(x)
"""
from __future__ import annotations

__version__ = "0.1.0"


def compile(spec, dtype: str = "float32", threads: int | None = None, flags: list[str] | None = None,
            out_dir=None, memory_budget: int | None = None):
    """Check, generate, build (cached) and load a spec; return a `runtime.Net`.

    `spec` is a path or an already checked `check.Network`."""
    import cffi

    from .build import compile_rendered, default_flags
    from .check import DEFAULT_MEMORY_BUDGET, Network, load
    from .render import render
    from .runtime import Net

    net = spec if isinstance(spec, Network) else load(spec, memory_budget or DEFAULT_MEMORY_BUDGET)
    flags = list(flags) if flags is not None else default_flags()
    rendered = render(net, dtype, flags)
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
