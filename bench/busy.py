#!/usr/bin/env python
"""Training throughput on a busy machine: the default thread count against --threads 1 and
all cores, with and without a competing busy process pinned to one core.  See bench/README.md.

    python bench/busy.py                          # lenet5 + fashion_convnet, batch 64
    python bench/busy.py --libgomp-default        # the same with libgomp's own (long) spin
    python bench/busy.py --nets lenet5 --seconds 0.05 --reps 1 --samples 128    # smoke run

Every figure is the median images/s of `--reps` timed `Net.train_batches` calls of about
`--seconds` each (random images and labels, SGD with momentum), wall clock.  The default
thread count is chosen anew under each load (as a net made at that moment gets it:
runtime.default_threads leaves out the cores other processes keep busy); it, all available
cores and 1 thread are measured alternately in one process, so they see the same load; the
load average is printed with every row.  Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LIBGOMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own spin count when nothing is set
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass\n"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


@contextlib.contextmanager
def busy_process(core: int | None):
    """A Python process that spins, pinned to `core`; killed on the way out, whatever happens,
    and gone by itself if this process dies first (it spins only while its parent lives).
    None: no busy process."""
    if core is None:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: left unpinned
            os.sched_setaffinity(proc.pid, {core})
        time.sleep(0.2)  # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def rate(net, x, y, bs: int, seconds: float, last: dict) -> float:
    """images/s of one train_batches call sized from the last rate to last about `seconds`."""
    n = max(bs, round(seconds * last.get(net.threads, 2000.0)) // bs * bs)
    order = np.arange(n, dtype=np.int64) % x.shape[0]
    t = time.perf_counter()
    losses, _ = net.train_batches(x, y, order, bs)
    dt = max(time.perf_counter() - t, 1e-9)
    if not np.all(np.isfinite(losses)):
        net.init(0)
    last[net.threads] = r = len(losses) * bs / dt
    return r


def measure(net, x, y, bs: int, threads: list[int], args) -> dict[int, float]:
    """Median images/s per thread count, the counts interleaved repetition by repetition."""
    runs: dict[int, list[float]] = {t: [] for t in threads}
    last: dict[int, float] = {}
    for t in threads:  # warm-up and calibration
        net.threads = t
        rate(net, x, y, bs, args.seconds / 4, last)
    for _ in range(args.reps):
        for t in threads:
            net.threads = t
            runs[t].append(rate(net, x, y, bs, args.seconds, last))
    return {t: statistics.median(r) for t, r in runs.items()}


def spec_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = ROOT / "specs" / f"{name}.yaml"
    if not p.exists():
        raise SystemExit(f"bench: no spec '{name}' (looked for {p})")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="lenet5,fashion_convnet", help="spec names under specs/ or .yaml paths")
    ap.add_argument("--batch", type=int, default=64, help="training batch size (64)")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per timed call (1.0)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per thread count and load (3)")
    ap.add_argument("--samples", type=int, default=2048, help="random training images cycled through (2048)")
    ap.add_argument("--busy-core", type=int, default=None,
                    help="core the busy process is pinned to (default: the last available core)")
    ap.add_argument("--loads", default="none,busy", help="'none' (no busy process) and/or 'busy' (none,busy)")
    ap.add_argument("--libgomp-default", action="store_true",
                    help="measure with libgomp's own wait (GOMP_SPINCOUNT=300000) instead of netcompiler's short "
                         "spin, as before netcompiler set one; only when neither variable is set already")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    args = ap.parse_args(argv)
    if args.libgomp_default and not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        os.environ.update(LIBGOMP_DEFAULT)  # before netcompiler's import, which sets its own otherwise
    import netcompiler as nc
    from netcompiler import runtime
    from netcompiler.runtime import available_cores

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    busy_core = args.busy_core if args.busy_core is not None else cores[-1]
    rng = np.random.default_rng(0)
    wait_env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    print(f"busy bench: {available_cores()} core(s) available, busy process on core {busy_core}, "
          f"batch {args.batch}, {args.reps} x {args.seconds:g} s per figure")
    print(f"OpenMP wait settings in this process: {wait_env}")
    rows, results = [], []
    cores_all = available_cores()
    for name in args.nets.split(","):
        net = nc.compile(str(spec_path(name)))
        x = net.check_x(rng.standard_normal((args.samples, *net.network.input_shape)).astype(np.float32))
        y = net.check_y(rng.integers(0, net.network.num_classes, args.samples).astype(np.int32), args.samples)
        net.set_optimizer("momentum", lr=0.01, momentum=0.9, weight_decay=0.0)
        for load in args.loads.split(","):
            if load not in ("none", "busy"):
                raise SystemExit(f"bench: --loads takes 'none' and 'busy', got '{load}'")
            with busy_process(busy_core if load == "busy" else None) as proc:
                net.threads = runtime.default_threads(fresh=True)  # the default a net made now gets
                default = net.threads
                threads = sorted({cores_all, default, 1}, reverse=True)
                r = measure(net, x, y, args.batch, threads, args)
                la = loadavg()
            where = "none" if load == "none" else f"core {busy_core}"
            rows.append([name, where, str(default), f"{r[default]:,.0f}", f"{r[cores_all]:,.0f}", f"{r[1]:,.0f}",
                         f"{r[default] / r[1]:.2f}", la])
            results.append({"net": name, "load": load, "default_threads": default, "all_threads": cores_all, "img_s": {str(k): v for k, v in
                            r.items()}, "loadavg": la, "busy_pid": proc.pid if proc else None})
    head = ["network", "busy process", "default threads", "default img/s", f"{cores_all} threads img/s",
            "1 thread img/s", "default/1", "loadavg"]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    for i, row in enumerate([head, *rows]):
        print("  ".join(str(c).ljust(w) if j < 2 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": wait_env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
