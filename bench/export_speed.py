"""Host speed of the exported C against the cffi build, batch 1, one thread.

    python bench/export_speed.py                  # lenet5 and alphabet
    python bench/export_speed.py --quick --nets lenet5

For each network (random weights from `Net.init(0)`): the cffi build's `Net.forward` on one
sample, its C entry point `NAME_forward` alone (called through cffi), and `netc export
--target host` compiled as a shared library with the cffi build's optimisation flags
(`-O3 -march=native -ffp-contract=fast -fno-math-errno`) whose `NAME_infer` is called
through cffi the same way (so both C calls carry the same call overhead).  Also the int8
export (`--quantize int8`, calibrated on 64 random inputs) through `NAME_infer_int8`.
Prints microseconds per inference (median of --reps repetitions, each at least --min-time
seconds) and the ratio export / NAME_forward; the target is <= 1.2 for float32.  The outputs
of the float export are checked against `Net.forward` first.  Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import netcompiler as nc  # noqa: E402
from netcompiler.check import load  # noqa: E402
from netcompiler.export import export_c, export_int8  # noqa: E402

FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno"]


def per_call_us(fn, min_time: float, reps: int) -> float:
    """Median over reps of the microseconds per call, each repetition at least min_time s."""
    t0, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - t0 < min_time / 4:  # warm-up and calibration
        fn()
        calls += 1
    k = max(1, int(min_time / max((time.perf_counter() - t0) / calls, 1e-9)))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(k):
            fn()
        out.append((time.perf_counter() - t) / k * 1e6)
    return statistics.median(out)


def _shared_lib(exported, tmp: Path) -> Path:
    exported.write(tmp)
    lib = tmp / f"lib{exported.name}.so"
    cmd = ["gcc", "-std=c99", *FLAGS, "-shared", "-fPIC", str(tmp / f"{exported.name}.c"), "-o", str(lib), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


def _aligned(nbytes: int) -> np.ndarray:
    buf = np.zeros(max(nbytes, 1) + 16, np.uint8)
    off = (-buf.ctypes.data) % 16
    return buf[off:off + max(nbytes, 1)]


def measure(name: str, min_time: float, reps: int) -> dict:
    import cffi

    spec = ROOT / "specs" / f"{name}.yaml" if not name.endswith((".yaml", ".yml")) else Path(name)
    network = load(spec)
    net = nc.compile(network, dtype="float32", threads=1)
    net.init(0)
    state = {k: np.asarray(v, np.float32) for k, v in net.state_dict().items()}
    x1 = np.random.default_rng(0).standard_normal((1, *network.input_shape)).astype(np.float32)
    n = network.name
    out = {"net": n}
    out["forward"] = per_call_us(lambda: net.forward(x1), min_time, reps)
    fwd = getattr(net._lib, f"{n}_forward")
    ctx, nffi = net._ctx, net._ffi
    px = nffi.cast(f"{n}_real *", x1.ctypes.data)
    net._reserve(1)
    out["c_call"] = per_call_us(lambda: fwd(ctx, px, nffi.NULL, 1, 0), min_time, reps)

    ffi = cffi.FFI()
    ffi.cdef(f"int {n}_infer(const float *, float *, void *);"
             f"int {n}_infer_int8(const signed char *, signed char *, void *);")
    with tempfile.TemporaryDirectory() as d:
        e = export_c(network, state, "host")
        lib = ffi.dlopen(str(_shared_lib(e, Path(d) / "f32")))
        y = np.zeros(int(np.prod(network.output_shape)), np.float32)
        arena = _aligned(e.arena_bytes)
        cx, cy, ca = (ffi.cast("float *", x1.ctypes.data), ffi.cast("float *", y.ctypes.data),
                      ffi.cast("void *", arena.ctypes.data))
        assert getattr(lib, f"{n}_infer")(cx, cy, ca) == 0
        ref = net.forward(x1).ravel()
        assert np.allclose(y, ref, rtol=1e-4, atol=1e-5), "the export disagrees with Net.forward"
        infer = getattr(lib, f"{n}_infer")
        out["export"] = per_call_us(lambda: infer(cx, cy, ca), min_time, reps)

        calib = np.random.default_rng(1).standard_normal((64, *network.input_shape)).astype(np.float32)
        q = export_int8(network, state, calib, "host")
        lib8 = ffi.dlopen(str(_shared_lib(q, Path(d) / "i8")))
        xq = np.zeros(x1.size, np.int8)
        yq = np.zeros(y.size, np.int8)
        arena8 = _aligned(q.arena_bytes)
        qx, qy, qa = (ffi.cast("signed char *", xq.ctypes.data), ffi.cast("signed char *", yq.ctypes.data),
                      ffi.cast("void *", arena8.ctypes.data))
        infer8 = getattr(lib8, f"{n}_infer_int8")
        out["export_int8"] = per_call_us(lambda: infer8(qx, qy, qa), min_time, reps)
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="lenet5,alphabet", help="spec names under specs/ or .yaml paths")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition (0.2)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, median printed (5)")
    ap.add_argument("--quick", action="store_true", help="--min-time 0.02 --reps 3")
    args = ap.parse_args(argv)
    if args.quick:
        args.min_time, args.reps = 0.02, 3
    load0 = _loadavg()
    rows = [measure(n, args.min_time, args.reps) for n in args.nets.split(",")]
    print(f"Exported C vs the cffi build, batch 1, 1 thread, us per inference (median); "
          f"load average {load0} at the start, {_loadavg()} at the end")
    head = ["net", "Net.forward", "NAME_forward", "export float32", "export/NAME_forward", "export int8"]
    body = [[r["net"], f"{r['forward']:.1f}", f"{r['c_call']:.1f}", f"{r['export']:.1f}",
             f"{r['export'] / r['c_call']:.2f}", f"{r['export_int8']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    for line in [head, *body]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
