"""Measure this machine's FP32 FMA peak with a tiny C kernel (gcc -O3 -march=native).

The kernel keeps ACC independent accumulator vectors and runs acc = acc * m + c on each,
so the FMA units always have independent work (latency 4 x 2 pipes needs >= 8 chains).
It is built for 512-, 256- and 128-bit vectors (whatever the compiler supports) and the
best is reported: on AMD Zen 4, 512-bit FMAs are double-pumped and reach the same
throughput as 256-bit ones; on Intel with two 512-bit FMA ports the zmm variant wins.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

KERNEL = r"""
#include <immintrin.h>
#include <stdint.h>

#define ACC 12
#define BODY(T, SET1, FMA, ADD, STORE, LANES)                                               \
    T acc[ACC];                                                                            \
    const T m = SET1(0.999999f), c = SET1(1e-7f);                                          \
    for (int k = 0; k < ACC; k++)                                                          \
        acc[k] = SET1(1.0f + 0.001f * k);                                                  \
    for (int64_t i = 0; i < iters; i++) {                                                  \
        _Pragma("GCC unroll 12")                                                           \
        for (int k = 0; k < ACC; k++)                                                      \
            acc[k] = FMA(acc[k], m, c);                                                    \
    }                                                                                      \
    for (int k = 1; k < ACC; k++)                                                          \
        acc[0] = ADD(acc[0], acc[k]);                                                      \
    float tmp[LANES];                                                                      \
    STORE(tmp, acc[0]);                                                                    \
    float s = 0;                                                                           \
    for (int k = 0; k < LANES; k++)                                                        \
        s += tmp[k];                                                                       \
    return s;

/* each returns a value that depends on every FMA so nothing is optimised away;
 * flops = iters * ACC * LANES * 2 */
#ifdef __AVX512F__
float fma512(int64_t iters) { BODY(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps, 16) }
int has512(void) { return 1; }
#else
float fma512(int64_t iters) { (void)iters; return 0; }
int has512(void) { return 0; }
#endif
#ifdef __FMA__
float fma256(int64_t iters) { BODY(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps, 8) }
float fma128(int64_t iters) { BODY(__m128, _mm_set1_ps, _mm_fmadd_ps, _mm_add_ps, _mm_storeu_ps, 4) }
int hasfma(void) { return 1; }
#else
float fma256(int64_t iters) { (void)iters; return 0; }
float fma128(int64_t iters) { (void)iters; return 0; }
int hasfma(void) { return 0; }
#endif
int acc_count(void) { return ACC; }
"""

# portable fallback: plain float arrays the compiler vectorises for whatever the target is
PORTABLE = r"""
#include <stdint.h>
#define ACC 12
#define W 16
float fma_plain(int64_t iters) {
    float acc[ACC][W];
    for (int k = 0; k < ACC; k++)
        for (int j = 0; j < W; j++)
            acc[k][j] = 1.0f + 0.001f * k + 0.0001f * j;
    for (int64_t i = 0; i < iters; i++)
        for (int k = 0; k < ACC; k++)
            for (int j = 0; j < W; j++)
                acc[k][j] = acc[k][j] * 0.999999f + 1e-7f;
    float s = 0;
    for (int k = 0; k < ACC; k++)
        for (int j = 0; j < W; j++)
            s += acc[k][j];
    return s;
}
"""


def _compile(src: str, d: Path, name: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "gcc"
    c = d / f"{name}.c"
    so = d / f"{name}.so"
    c.write_text(src)
    subprocess.run([cc, "-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared", "-o", str(so), str(c)],
                   check=True, capture_output=True, text=True, timeout=120)
    return ctypes.CDLL(str(so))


def _time_kernel(fn, lanes: int, acc: int, min_time: float, reps: int, threads: int = 1,
                 clock=time.perf_counter) -> float:
    """GFLOP/s (best of reps: a peak, so the least disturbed repetition) of fn run concurrently in `threads` threads (ctypes drops the GIL)."""
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_int64]
    iters = 1000
    while True:  # calibrate to ~min_time per call
        t = time.perf_counter()
        fn(iters)
        dt = time.perf_counter() - t
        if dt > min_time / 4 or iters > 1 << 40:
            break
        iters *= 4
    iters = max(1000, int(iters * min_time / max(dt, 1e-9)))
    flops = iters * acc * lanes * 2 * threads
    results = []
    for _ in range(reps):
        if threads == 1:
            t = clock()
            fn(iters)
            dt = clock() - t
        else:
            ts = [threading.Thread(target=fn, args=(iters,)) for _ in range(threads)]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            dt = time.perf_counter() - t
        results.append(flops / dt / 1e9)
    return max(results)


def measure_peak(min_time: float = 0.3, reps: int = 5, threads: int = 1, clock=time.perf_counter) -> dict:
    """{'gflops': best 1-thread GFLOP/s, 'variants': {...}, 'threads_gflops': {threads: GFLOP/s}}."""
    with tempfile.TemporaryDirectory(prefix="netc-peak-") as tmp:
        d = Path(tmp)
        variants: dict[str, float] = {}
        best_fn = None
        try:
            lib = _compile(KERNEL, d, "peak")
            acc = lib.acc_count()
            cands = []
            if lib.has512():
                cands.append(("avx512", lib.fma512, 16))
            if lib.hasfma():
                cands += [("avx2-fma", lib.fma256, 8), ("sse-fma", lib.fma128, 4)]
            for name, fn, lanes in cands:
                variants[name] = _time_kernel(fn, lanes, acc, min_time, reps, clock=clock)
            if variants:
                best = max(variants, key=variants.get)
                best_fn = next((fn, lanes, acc) for n, fn, lanes in cands if n == best)
        except (OSError, subprocess.SubprocessError):
            pass
        if not variants:  # no intrinsics: plain C the compiler vectorises
            lib = _compile(PORTABLE, d, "peak_plain")
            variants["plain"] = _time_kernel(lib.fma_plain, 16, 12, min_time, reps, clock=clock)
            best_fn = (lib.fma_plain, 16, 12)
        best = max(variants, key=variants.get)
        out = {"gflops": variants[best], "variant": best, "variants": variants, "threads_gflops": {}}
        if threads > 1 and best_fn is not None:
            fn, lanes, acc = best_fn
            out["threads_gflops"][threads] = _time_kernel(fn, lanes, acc, min_time, reps, threads=threads)
        return out


if __name__ == "__main__":
    print(measure_peak(threads=2))
