"""Per-layer timing for netcompiler nets.

The generated C calls static per-layer functions (<layer>_forward / <layer>_backward) from
forward_eval, forward_train and <net>_backward; Python cannot call them.  The proposed hook
for the generator (see bench/README.md, "Per-layer profiling hook") is:

    build with -DNETC_PROFILE and every layer call is wrapped with a CLOCK_MONOTONIC
    accumulator per thread, read through one exported function that the API always declares:

    /* ns[3*i + d], calls[3*i + d] for layer i (plan order), d = 0 eval forward,
     * 1 training forward, 2 backward; summed over threads (thread-nanoseconds).
     * Returns the number of layers, or 0 when built without -DNETC_PROFILE.
     * reset != 0 zeroes the counters after reading. */
    int NAME_profile(double *ns, int64_t *calls, int reset);

`profiled_net` uses that hook when the generator has it (feature check: the function is in
the rendered API), and otherwise builds the same thing itself by patching the generated C
text: a prototype of the hook that lives only in bench/ and is dropped once the generator
has it.  Either way the library exports NAME_profile with the signature above.
"""
from __future__ import annotations

import re
from dataclasses import replace

PROFILE_FLAG = "-DNETC_PROFILE"
DIRECTIONS = ("eval_forward", "train_forward", "backward")

PRELUDE = r"""
/* ==== bench/prof_hook.py: per-layer timing (prototype of the NETC_PROFILE hook) ========= */
#include <time.h>
#define PROF_LAYERS {nl}
#define PROF_SLOTS (3 * PROF_LAYERS)
#define PROF_ROW (((PROF_SLOTS + 7) / 8) * 8 + 8) /* padded: threads do not share cache lines */
#define PROF_MAX_THREADS 256
static double prof_ns[PROF_MAX_THREADS * PROF_ROW];
static int64_t prof_calls[PROF_MAX_THREADS * PROF_ROW];
static inline double prof_now(void)
{{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}}
static inline void prof_add(int slot, double t0)
{{
    const int t = THREAD_ID() % PROF_MAX_THREADS;
    prof_ns[t * PROF_ROW + slot] += prof_now() - t0;
    prof_calls[t * PROF_ROW + slot]++;
}}
int {name}_profile(double *ns, int64_t *calls, int reset)
{{
    for (int i = 0; i < PROF_SLOTS; i++) {{
        double s = 0;
        int64_t k = 0;
        for (int t = 0; t < PROF_MAX_THREADS; t++) {{
            s += prof_ns[t * PROF_ROW + i];
            k += prof_calls[t * PROF_ROW + i];
        }}
        if (ns)
            ns[i] = s;
        if (calls)
            calls[i] = k;
    }}
    if (reset) {{
        memset(prof_ns, 0, sizeof prof_ns);
        memset(prof_calls, 0, sizeof prof_calls);
    }}
    return PROF_LAYERS;
}}
"""

DECL = "int {name}_profile(double *ns, int64_t *calls, int reset);\n"


def generator_has_hook(rendered) -> bool:
    return f"{rendered.name}_profile(" in rendered.api


def instrument_source(source: str, name: str, layer_names: list[str]) -> str:
    """Wrap every per-layer call in forward_eval / forward_train / backward_team with a timer."""
    index = {n: i for i, n in enumerate(layer_names)}
    starts = {"static void forward_eval(": 0, "static void forward_train(": 1, "static double backward_team(": 2,
              f"double {name}_backward(": 2}
    # <layer>_forward(...), the batch-level variants <layer>_forward_batch / _forward_train, a
    # split layer's per-sample passes _forward_sums / _apply (and _backward_...), each with its
    # comment, and <layer>_winograd_weights(...) (remaking a conv's cached weights counts as its
    # forward)
    call = re.compile(r"^(\s*)(\w+?)_(forward|backward|winograd_weights)(?:_batch|_train|_eval|_sums|_apply)?"
                      r"\((.*)\);\s*(?:/\*.*\*/)?\s*$")
    out, direction, wrapped = [], None, 0
    lines = source.splitlines()
    # the prelude needs THREAD_ID() and the includes: put it just before the first network function
    first_fn = next(i for i, l in enumerate(lines) if l.startswith("static void forward_eval("))
    # clock_gettime / CLOCK_MONOTONIC are POSIX: -std=c11 hides them unless asked for first
    out.append("#define _POSIX_C_SOURCE 199309L")
    for i, line in enumerate(lines):
        if i == first_fn:
            out.extend(PRELUDE.format(nl=len(layer_names), name=name).splitlines())
        for prefix, d in starts.items():
            if line.startswith(prefix):
                direction = d
        if line == "}":
            direction = None
        m = call.match(line)
        if direction is not None and m and m.group(2) in index:
            want = "forward" if direction < 2 else "backward"
            if m.group(3).replace("winograd_weights", "forward") == want:
                slot = 3 * index[m.group(2)] + direction
                line = f"{m.group(1)}{{ const double t0_ = prof_now(); {line.strip()} prof_add({slot}, t0_); }}"
                wrapped += 1
        out.append(line)
    if wrapped == 0:
        raise RuntimeError("no per-layer calls found to instrument (generated C layout changed?)")
    return "\n".join(out) + "\n"


def profiled_net(spec, threads: int, flags: list[str] | None = None):
    """(net, how): a Net whose library exports NAME_profile.  how says where the hook came from."""
    import cffi

    import netcompiler as nc
    from netcompiler.build import compile_rendered, default_flags
    from netcompiler.render import render
    from netcompiler.runtime import Net

    flags = list(flags) if flags is not None else default_flags()
    network = nc.load_spec(spec)
    rendered = render(network, "float32", flags)
    if generator_has_hook(rendered):
        return nc.compile(network, threads=threads, flags=flags + [PROFILE_FLAG]), "generator hook (-DNETC_PROFILE)"
    layer_names = [lp.name for lp in rendered.plan.layers]
    source = instrument_source(rendered.source, rendered.name, layer_names)
    api = rendered.api + DECL.format(name=rendered.name)
    patched = replace(rendered, source=source, api=api)
    built = compile_rendered(patched, flags=flags + [PROFILE_FLAG])
    ffi = cffi.FFI()
    ffi.cdef(api)
    lib = ffi.dlopen(str(built.so_path))
    return Net(patched, ffi, lib, dtype="float32", threads=threads, paths=built), "bench prototype (patched C)"


def read_profile(net, reset: bool = False):
    """[(layer, {direction: (ns, calls)})] or None when the library has no active profile."""
    fn = getattr(net._lib, f"{net.name}_profile", None)
    if fn is None:
        return None
    nl = len(net.plan.layers)
    ns = net._ffi.new("double[]", 3 * nl)
    calls = net._ffi.new("int64_t[]", 3 * nl)
    if fn(ns, calls, int(reset)) != nl:
        return None
    return [(lp, {d: (ns[3 * i + k], calls[3 * i + k]) for k, d in enumerate(DIRECTIONS)})
            for i, lp in enumerate(net.plan.layers)]


def reset_profile(net) -> bool:
    fn = getattr(net._lib, f"{net.name}_profile", None)
    return fn is not None and fn(net._ffi.NULL, net._ffi.NULL, 1) > 0
