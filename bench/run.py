#!/usr/bin/env python
"""netcompiler vs PyTorch eager (and ONNX Runtime) on CPU: training throughput, inference
latency, achieved GFLOP/s against this machine's measured FP32 FMA peak, build times and
(--profile) where the time goes.  See bench/README.md.

    python bench/run.py                      # lenet5 + alphabet, 1 and 2 threads, batch 64 and 1
    python bench/run.py --quick --nets lenet5 --threads 1 --no-onnx
    python bench/run.py --profile --json out.json

Nothing here asserts a time: numbers are printed (and written with --json), never checked.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import netcompiler as nc  # noqa: E402
from netcompiler.report import build_report  # noqa: E402

import peak as peak_mod  # noqa: E402
import prof_hook  # noqa: E402

LR, MOMENTUM = 0.01, 0.9
perf = time.perf_counter


# ---- measuring -------------------------------------------------------------------------------
class Timer:
    """Warm up, calibrate calls per repetition to >= min_time, then time `reps` repetitions.
    clock: time.perf_counter (wall) or time.thread_time (CPU time of the calling thread: with one
    thread it leaves out the time the process was descheduled by other load)."""

    def __init__(self, min_time: float, reps: int, warmup: float, clock=time.perf_counter):
        self.min_time, self.reps, self.warmup, self.clock = min_time, reps, warmup, clock

    def rates(self, fn, items: float) -> list[float]:
        """items/s of each repetition; fn() does `items` units of work per call."""
        clock = self.clock
        t0 = clock()
        calls = 0
        while calls < 2 or clock() - t0 < self.warmup:
            fn()
            calls += 1
        per_call = (clock() - t0) / calls
        k = max(1, math.ceil(self.min_time / max(per_call, 1e-9)))
        out = []
        for _ in range(self.reps):
            t = clock()
            for _ in range(k):
                fn()
            out.append(k * items / max(clock() - t, 1e-9))
        return out


def stat(rates: list[float] | None) -> dict | None:
    if not rates:
        return None
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "reps": len(rates)}


def med(s: dict | None) -> float | None:
    return None if s is None else s["median"]


# ---- environment -----------------------------------------------------------------------------
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def fastcall_state() -> str:
    """How Net.forward reaches C: netcompiler's fastcall extension, or cffi when it does not build."""
    from netcompiler.build import load_fastcall

    return "fastcall extension" if load_fastcall() is not None else "cffi (the fastcall extension did not build)"


def cc_version() -> str:
    from netcompiler.build import compiler, compiler_version

    try:
        return compiler_version(compiler())
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


def import_torch(enabled: bool):
    if not enabled:
        return None
    try:
        import torch
        import torch.nn.functional as F  # noqa: F401

        from netcompiler.torchref import torch_model  # noqa: F401
    except ImportError:
        return None
    return torch


def import_ort(enabled: bool):
    if not enabled:
        return None, "disabled (--no-onnx)"
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install onnxruntime onnx): ONNX Runtime column skipped"
    return ort, None


def spec_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = ROOT / "specs" / f"{name}.yaml"
    if not p.exists():
        raise SystemExit(f"bench: no spec '{name}' (looked for {p})")
    return p


# ---- build time ------------------------------------------------------------------------------
def build_times(spec: Path, flags: list[str]) -> dict:
    """Cold `nc.compile` in a fresh NETC_CACHE_DIR; split into Python (parse, check, plan,
    render) and the C compiler; plus the cached reload."""
    from netcompiler.build import default_flags
    from netcompiler.render import render

    default_flags()  # the OpenMP probe is cached per process: keep it out of the number
    old = os.environ.get("NETC_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="netc-bench-cache-") as tmp:
        os.environ["NETC_CACHE_DIR"] = tmp
        try:
            t = perf()
            nc.compile(str(spec), flags=flags)
            cold = perf() - t
            t = perf()
            nc.compile(str(spec), flags=flags)
            warm = perf() - t
            t = perf()
            render(nc.load_spec(str(spec)), "float32", flags)
            front = perf() - t
        finally:
            if old is None:
                os.environ.pop("NETC_CACHE_DIR", None)
            else:
                os.environ["NETC_CACHE_DIR"] = old
    return {"cold_s": cold, "python_s": front, "cc_s": max(cold - front, 0.0), "cached_s": warm}


# ---- one network -----------------------------------------------------------------------------
class Bench:
    def __init__(self, args, torch, ort):
        self.args = args
        self.torch = torch
        self.ort = ort
        self.wall = Timer(args.min_time, args.reps, args.warmup)
        self.cpu = Timer(args.min_time, args.reps, args.warmup, clock=time.thread_time)
        self.timer = self.wall
        self.rng = np.random.default_rng(0)

    def use_clock(self, threads: int) -> str:
        """--clock cpu applies to 1-thread runs only (thread CPU time misses the other threads)."""
        cpu = self.args.clock == "cpu" and threads == 1
        self.timer = self.cpu if cpu else self.wall
        return "cpu" if cpu else "wall"

    # -- data --
    def data(self, net, n: int):
        x = self.rng.standard_normal((n, *net.network.input_shape)).astype(np.float32)
        y = self.rng.integers(0, net.network.num_classes, n).astype(np.int32)
        return net.check_x(x), net.check_y(y, n)

    # -- netcompiler training --
    def netc_train(self, net, x, y, bs: int) -> dict:
        net.set_optimizer("momentum", lr=LR, momentum=MOMENTUM, weight_decay=0.0)
        n = x.shape[0]
        batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n - bs + 1, bs)]
        state = {"i": 0}

        def step():
            xb, yb = batches[state["i"] % len(batches)]
            state["i"] += 1
            net.train_step(xb, yb)

        r_step = self.timer.rates(step, bs)
        # one train_batches call ~ min_time / 2 (at least 4 batches), rows cycling through the data
        nb = max(4, round(self.args.min_time / 2 * statistics.median(r_step) / bs))
        order = np.arange(nb * bs, dtype=np.int64) % n
        short = {"n": 0}

        def many():
            losses, _ = net.train_batches(x, y, order, bs)
            if len(losses) < nb or not np.all(np.isfinite(losses)):
                short["n"] += 1
                net.init(0)

        r_many = self.timer.rates(many, nb * bs)
        out = {"train_step": stat(r_step), "train_batches": stat(r_many), "batches_per_call": nb}
        if short["n"]:
            out["warning"] = f"train_batches stopped early (non-finite loss) {short['n']} time(s)"
        best = "train_batches" if med(out["train_batches"]) >= med(out["train_step"]) else "train_step"
        out["best"], out["headline"] = best, out[best]
        return out

    # -- torch training --
    def torch_train(self, model, x, y, bs: int) -> dict | None:
        torch = self.torch
        if torch is None:
            return None
        import torch.nn.functional as F

        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        xt = torch.from_numpy(x)
        yt = torch.from_numpy(y.astype(np.int64))
        batches = [(xt[i:i + bs], yt[i:i + bs]) for i in range(0, x.shape[0] - bs + 1, bs)]
        state = {"i": 0}

        def step():
            xb, yb = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()

        return stat(self.timer.rates(step, bs))

    # -- inference latency, batch 1 --
    def netc_latency(self, net, x1) -> dict:
        out = {"forward": stat([1e6 / r for r in self.timer.rates(lambda: net.forward(x1), 1)])}
        try:  # the C entry point alone, without the Python checks and the output copy
            fwd = getattr(net._lib, f"{net.name}_forward")
            ctx, ffi = net._ctx, net._ffi
            px = ffi.cast(f"{net.name}_real *", x1.ctypes.data)
            net._reserve(1)
            out["c_call"] = stat([1e6 / r for r in self.timer.rates(lambda: fwd(ctx, px, ffi.NULL, 1, 0), 1)])
        except AttributeError:  # Net internals changed
            out["c_call"] = None
        return out

    def torch_latency(self, model, x1) -> dict | None:
        torch = self.torch
        if torch is None:
            return None
        model.eval()
        xt = torch.from_numpy(x1)

        def run():
            with torch.inference_mode():
                model(xt)

        return stat([1e6 / r for r in self.timer.rates(run, 1)])

    def onnx_file(self, model, x1, tmpdir: str) -> tuple[str | None, str | None]:
        """Export the eval-mode torch model; (path, None) or (None, why not)."""
        torch = self.torch
        model.eval()
        path = os.path.join(tmpdir, "model.onnx")
        errors = []
        # torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript; the TorchScript
        # exporter (dynamo=False) needs only onnx and handles these nets.
        # the batch axis is dynamic, so one file serves batch 1 and the --infer-batch sizes
        for kw in ({"dynamo": False, "dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}}}, {}):
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (torch.from_numpy(x1),), path, input_names=["x"],
                                      output_names=["logits"], **kw)
                return path, None
            except Exception as exc:  # noqa: BLE001 - report and try the other exporter
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
        return None, "; ".join(errors)

    def ort_latency(self, path: str, x1, threads: int) -> dict:
        sess = self.ort_session(path, threads)
        name = sess.get_inputs()[0].name
        feed = {name: x1}
        return stat([1e6 / r for r in self.timer.rates(lambda: sess.run(None, feed), 1)])

    # -- inference throughput, batch > 1 (images/s) --
    def infer_rates(self, net, model, sess, xb) -> dict:
        """Eval-mode forward of the batch xb: Net.forward, torch under inference_mode, ONNX Runtime."""
        n = xb.shape[0]
        out = {"netc": stat(self.timer.rates(lambda: net.forward(xb), n))}
        if model is not None:
            torch = self.torch
            model.eval()
            xt = torch.from_numpy(xb)

            def run():
                with torch.inference_mode():
                    model(xt)

            out["torch"] = stat(self.timer.rates(run, n))
        if sess is not None:
            feed = {sess.get_inputs()[0].name: xb}
            out["onnx"] = stat(self.timer.rates(lambda: sess.run(None, feed), n))
        return out

    def ort_session(self, path: str, threads: int):
        ort = self.ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    # -- profile (API level) --
    def api_profile(self, net, x, y, bs: int) -> dict | None:
        """ms per batch of the public C entry points: training forward, zero_grad + backward
        (loss included), optimizer step, and evaluation forward."""
        try:
            lib, ctx, ffi, name = net._lib, net._ctx, net._ffi, net.name
            fwd = getattr(lib, f"{name}_forward")
            bwd = getattr(lib, f"{name}_backward")
            zero = getattr(lib, f"{name}_zero_grad")
            optstep = getattr(lib, f"{name}_optimizer_step")
            optim = net._optim
        except AttributeError:
            return None
        net.set_optimizer("momentum", lr=LR, momentum=MOMENTUM)
        xb, yb = np.ascontiguousarray(x[:bs]), np.ascontiguousarray(y[:bs])
        net._reserve(bs)
        px = ffi.cast(f"{name}_real *", xb.ctypes.data)
        py = ffi.cast("int32_t *", yb.ctypes.data)
        out = {}

        def ms(fn):
            return stat([1e3 / r for r in self.timer.rates(fn, 1)])

        out["eval_forward"] = ms(lambda: fwd(ctx, px, ffi.NULL, bs, 0))
        out["train_forward"] = ms(lambda: fwd(ctx, px, ffi.NULL, bs, 1))
        fwd(ctx, px, ffi.NULL, bs, 1)

        def backward():
            zero(ctx)
            bwd(ctx, py, ffi.NULL, bs)

        out["backward"] = ms(backward)
        out["optimizer"] = ms(lambda: optstep(ctx, optim))
        return out

    def layer_profile(self, spec: Path, threads: int, x, y, bs: int) -> dict | None:
        """Per-layer thread-time per sample from NAME_profile (generator hook or bench prototype)."""
        try:
            net, how = prof_hook.profiled_net(str(spec), threads, self.args.flags)
        except Exception as exc:  # noqa: BLE001 - profiling is best effort
            return {"error": f"{type(exc).__name__}: {exc}"}
        net.set_optimizer("momentum", lr=LR, momentum=MOMENTUM)
        n = x.shape[0]
        nb = max(4, n // bs)
        order = np.arange(nb * bs, dtype=np.int64) % n
        net.train_batches(x, y, order, bs)  # warm-up
        if not prof_hook.reset_profile(net):
            return {"error": "the profiled library reports no layers (built without -DNETC_PROFILE?)"}
        # per repetition: reset, train for >= min_time, read; per layer the median over repetitions
        # (a preempted layer call inflates one repetition, not the median)
        per_rep, walls, cpus = [], [], []
        for _ in range(max(self.args.reps, 5)):
            prof_hook.reset_profile(net)
            samples, t0, c0 = 0, perf(), time.thread_time()
            while samples == 0 or perf() - t0 < self.args.min_time:
                net.train_batches(x, y, order, bs)
                samples += nb * bs
            walls.append((perf() - t0) * 1e6 / samples)
            cpus.append((time.thread_time() - c0) * 1e6 / samples)
            prof = prof_hook.read_profile(net)
            if prof is None:
                return {"error": "no profile counters"}
            per_rep.append([(d["train_forward"][0] / 1e3 / samples, d["backward"][0] / 1e3 / samples)
                            for _, d in prof])
        # the layer timers read CLOCK_MONOTONIC, so time the thread spent descheduled counts too;
        # with --clock cpu and one thread, scale by (thread CPU time / wall time) of the same calls,
        # assuming the lost time falls on layers in proportion to their length
        scale = 1.0
        if self.args.clock == "cpu" and threads == 1:
            scale = min(1.0, statistics.median(c / w for c, w in zip(cpus, walls)))
        rows = []
        for i, (lp, _) in enumerate(prof):
            rows.append({"layer": lp.name, "spec_name": lp.layer.name, "kind": lp.kind,
                         "forward_us": scale * statistics.median(r[i][0] for r in per_rep),
                         "backward_us": scale * statistics.median(r[i][1] for r in per_rep)})
        return {"source": how, "threads": threads, "batch": bs, "reps": len(per_rep), "scale": scale,
                "wall_us_per_sample": statistics.median(walls), "cpu_us_per_sample": statistics.median(cpus),
                "layers": rows}

    # -- everything for one net --
    def run_net(self, name: str) -> dict:
        torch = self.torch
        spec = spec_path(name)
        res: dict = {"name": spec.stem, "spec": str(spec)}
        if not self.args.no_build_time:
            res["build"] = build_times(spec, self.args.flags)
        net = nc.compile(str(spec), threads=self.args.threads[0], flags=self.args.flags)
        rep = build_report(net.network)
        res["training_flops"], res["total_flops"] = rep["training_flops"], rep["total_flops"]
        # per layer (forward FLOPs, backward FLOPs); the report already leaves out the first
        # layer's input gradient, which is never computed
        res["layer_flops"] = {r["name"]: (r["flops"], r["backward_flops"]) for r in rep["layers"]}
        x, y = self.data(net, self.args.samples)
        x1 = np.ascontiguousarray(x[:1])
        model = None
        if torch is not None:
            from netcompiler.torchref import torch_model

            model = torch_model(net.network, net.state_dict(), dtype=torch.float32)
        onnx_path, res["onnx_note"] = None, None
        tmpdir = tempfile.mkdtemp(prefix="netc-bench-onnx-")
        if self.ort is not None and model is not None:
            onnx_path, why = self.onnx_file(model, x1, tmpdir)
            if onnx_path is None:
                res["onnx_note"] = f"torch.onnx.export failed: {why}"
        res["runs"] = []
        for threads in self.args.threads:
            net.threads = threads
            if torch is not None:
                torch.set_num_threads(threads)
            run: dict = {"threads": threads, "clock": self.use_clock(threads), "train": {}, "infer": {}}
            for bs in self.args.batch:
                progress(f"{name}: {threads} thread(s), training batch {bs}")
                net.init(0)
                t = {"netc": self.netc_train(net, x, y, bs)}
                if model is not None:
                    model.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
                    t["torch"] = self.torch_train(model, x, y, bs)
                run["train"][bs] = t
            progress(f"{name}: {threads} thread(s), inference latency")
            inf = {"netc": self.netc_latency(net, x1)}
            if model is not None:
                inf["torch"] = self.torch_latency(model, x1)
            if onnx_path is not None:
                try:
                    inf["onnx"] = self.ort_latency(onnx_path, x1, threads)
                except Exception as exc:  # noqa: BLE001
                    res["onnx_note"] = f"onnxruntime failed: {type(exc).__name__}: {exc}"
            run["infer"] = inf
            run["infer_batch"] = {}
            for bs in [b for b in self.args.infer_batch if b > 1]:
                progress(f"{name}: {threads} thread(s), inference batch {bs}")
                sess = None
                if onnx_path is not None and "onnx" in inf:
                    sess = self.ort_session(onnx_path, threads)
                run["infer_batch"][bs] = self.infer_rates(net, model, sess, np.ascontiguousarray(x[:bs]))
            if self.args.profile:
                progress(f"{name}: {threads} thread(s), profile")
                run["api_profile"] = self.api_profile(net, x, y, self.args.batch[0])
                if threads == self.args.threads[0]:
                    run["layer_profile"] = self.layer_profile(spec, threads, x, y, self.args.batch[0])
            res["runs"].append(run)
        with contextlib.suppress(OSError):
            for f in Path(tmpdir).iterdir():
                f.unlink()
            Path(tmpdir).rmdir()
        return res


# ---- printing ----------------------------------------------------------------------------------
def progress(msg: str) -> None:
    if sys.stderr.isatty():
        print(f"\r\033[K... {msg}", end="", file=sys.stderr, flush=True)


def clear_progress() -> None:
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]


def f0(v):
    return "n/a" if v is None else f"{v:,.0f}"


def f1(v):
    return "n/a" if v is None else f"{v:,.1f}"


def fx(v):
    return "n/a" if v is None else f"{v:.2f}x"


def pct(v):
    return "n/a" if v is None else f"{v:.1f}%"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def report(results: dict, args) -> str:
    L: list[str] = []
    env = results["env"]
    pk = results["peak"]
    peak1 = pk["gflops"]
    L.append(f"netcompiler benchmark: {env['cpu']}, {env['cores']} core(s) available, Python {env['python']}, "
             f"numpy {env['numpy']}, torch {env['torch'] or ('skipped' if args.no_torch else 'not installed')}, "
             f"onnxruntime {env['onnxruntime'] or '-'}")
    L.append(f"C compiler: {env['cc']}; netc flags: {' '.join(env['flags'])}; vectors: {env.get('vec')} reals; "
             f"Net.forward: {env.get('fastcall')}")
    L.append(f"timing: warm-up {args.warmup:g} s, then median of {args.reps} repetitions of >= {args.min_time:g} s "
             f"each ({'thread CPU time for 1-thread runs, wall time otherwise' if args.clock == 'cpu' else 'wall time'}); load average {env['loadavg_start']} at start, {env['loadavg_end']} at end "
             f"(other load on the {env['cores']} cores makes numbers noisy, multi-thread ones most)")
    mt = "; ".join(f"{t} threads concurrently {g:.1f} GFLOP/s (~{g / peak1:.1f} cores' worth free for this run)"
                   for t, g in pk["threads_gflops"].items())
    L.append(f"FP32 peak (FMA loop, {pk['variant']}, 1 core): {peak1:.1f} GFLOP/s"
             f" [{', '.join(f'{k} {v:.1f}' for k, v in pk['variants'].items())}]" + (f"; {mt}" if mt else ""))
    L.append("%peak = achieved GFLOP/s / (threads x 1-core peak); FLOPs per image from the netc report "
             "(training_flops for training, total_flops for inference); over 100% means the peak run was disturbed")
    if results["notes"]:
        L += [f"note: {n}" for n in results["notes"]]

    # training
    L += ["", "Training throughput (images/s; one step = forward + loss + backward + SGD-momentum update, fp32)"]
    head = ["net", "thr", "batch", "netc img/s", "via", "train_step", "train_batches", "torch img/s", "netc/torch",
            "netc GFLOP/s", "netc %peak", "torch GFLOP/s", "torch %peak"]
    rows = []
    for r in results["nets"]:
        tf = r["training_flops"]
        for run in r["runs"]:
            T = run["threads"]
            for bs, t in run["train"].items():
                n, tt = t["netc"], med(t.get("torch"))
                nh = med(n["headline"])
                ng, tg = nh * tf / 1e9, (tt * tf / 1e9 if tt else None)
                rows.append([r["name"], str(T), str(bs), f0(nh), "batches" if n["best"] == "train_batches" else "step",
                             f0(med(n["train_step"])), f0(med(n["train_batches"])), f0(tt), fx(ratio(nh, tt)),
                             f1(ng), pct(100 * ng / (T * peak1)), f1(tg),
                             pct(100 * tg / (T * peak1)) if tg else "n/a"])
    L += table(head, rows, left=1)
    L.append("netc img/s is the better of train_step (one Python call per batch) and train_batches (all batches "
             "in one C call; 'via' says which)")
    warn = [f"{r['name']} {run['threads']}thr b{bs}: {t['netc']['warning']}" for r in results["nets"]
            for run in r["runs"] for bs, t in run["train"].items() if t["netc"].get("warning")]
    L += [f"warning: {w}" for w in warn]

    # thread scaling
    ths = args.threads
    if len(ths) > 1:
        bs = 64 if 64 in args.batch else max(args.batch)
        lo, hi = min(ths), max(ths)
        parts = []
        for r in results["nets"]:
            by = {run["threads"]: run["train"][bs] for run in r["runs"]}
            nl, nh_ = med(by[lo]["netc"]["headline"]), med(by[hi]["netc"]["headline"])
            tl, th = med(by[lo].get("torch")), med(by[hi].get("torch"))
            parts.append(f"{r['name']} netc {fx(ratio(nh_, nl))}, torch {fx(ratio(th, tl))}")
        L += ["", f"{hi}-vs-{lo} thread speedup, batch-{bs} training: " + "; ".join(parts)]

    # inference
    L += ["", "Inference latency, batch 1, eval mode (microseconds per call; lower is better)"]
    head = ["net", "thr", "netc forward", "netc C call", "torch eager", "onnxruntime", "torch/netc", "ort/netc",
            "netc GFLOP/s", "netc %peak"]
    rows = []
    for r in results["nets"]:
        for run in r["runs"]:
            T = run["threads"]
            i = run["infer"]
            nf, nc_ = med(i["netc"]["forward"]), med(i["netc"].get("c_call"))
            tt, oo = med(i.get("torch")), med(i.get("onnx"))
            g = r["total_flops"] / (nf * 1e3)
            rows.append([r["name"], str(T), f1(nf), f1(nc_), f1(tt), f1(oo) if "onnx" in i else "skipped",
                         fx(ratio(tt, nf)), fx(ratio(oo, nf)), f1(g), pct(100 * g / (T * peak1))])
    L += table(head, rows, left=1)
    L.append("netc forward = Net.forward (input checks + output copy; in C when the fastcall extension builds); "
             "netc C call = NAME_forward called through cffi (its call overhead, about 0.3 us, included); "
             "ratios > 1 mean netc is faster")
    for r in results["nets"]:
        if r.get("onnx_note"):
            L.append(f"note ({r['name']}): {r['onnx_note']}")
    for bs in [b for b in args.infer_batch if b > 1]:
        L += ["", f"Inference throughput, batch {bs}, eval mode (images/s; higher is better)"]
        rows = []
        for r in results["nets"]:
            for run in r["runs"]:
                i = run.get("infer_batch", {}).get(bs)
                if not i:
                    continue
                nf, tt, oo = med(i["netc"]), med(i.get("torch")), med(i.get("onnx"))
                g = nf * r["total_flops"] / 1e9
                rows.append([r["name"], str(run["threads"]), f0(nf), f0(tt), f0(oo) if "onnx" in i else "skipped",
                             fx(ratio(nf, tt)), fx(ratio(nf, oo)), f1(g), pct(100 * g / (run["threads"] * peak1))])
        L += table(["net", "thr", "netc forward", "torch eager", "onnxruntime", "netc/torch", "netc/ort",
                    "netc GFLOP/s", "netc %peak"], rows, left=1)
        L.append(f"netc forward = Net.forward of {bs} images; onnxruntime runs the same export with a dynamic batch "
                 "axis; ratios > 1 mean netc is faster")

    # build
    if any("build" in r for r in results["nets"]):
        L += ["", "netc build, cold cache (nc.compile with a fresh NETC_CACHE_DIR)"]
        rows = [[r["name"], f"{b['cold_s']:.2f} s", f"{b['python_s'] * 1e3:.0f} ms", f"{b['cc_s']:.2f} s",
                 f"{b['cached_s'] * 1e3:.0f} ms"] for r in results["nets"] if (b := r.get("build"))]
        L += table(["net", "cold total", "parse+check+render", "C compiler", "cached reload"], rows)

    # profile
    if args.profile:
        L += profile_lines(results, peak1)
    return "\n".join(L)


def profile_lines(results: dict, peak1: float) -> list[str]:
    L = ["", "Profile (API level): ms per batch of the C entry points, batch "
         f"{results['args']['batch'][0]}"]
    head = ["net", "thr", "fwd (train)", "bwd+loss", "optimizer", "sum", "fwd %", "bwd %", "opt %", "fwd GFLOP/s",
            "bwd GFLOP/s", "eval fwd"]
    rows = []
    bs = results["args"]["batch"][0]
    for r in results["nets"]:
        fw_flops = r["total_flops"]
        bw_flops = r["training_flops"] - r["total_flops"]
        for run in r["runs"]:
            p = run.get("api_profile")
            if not p:
                continue
            f, b, o = med(p["train_forward"]), med(p["backward"]), med(p["optimizer"])
            s = f + b + o
            rows.append([r["name"], str(run["threads"]), f"{f:.3f}", f"{b:.3f}", f"{o:.3f}", f"{s:.3f}",
                         pct(100 * f / s), pct(100 * b / s), pct(100 * o / s), f1(fw_flops * bs / (f * 1e6)),
                         f1(bw_flops * bs / (b * 1e6)), f"{med(p['eval_forward']):.3f}"])
    L += table(head, rows, left=1)
    L.append("bwd+loss = zero_grad + NAME_backward (loss, all layer backwards, per-thread gradient reduction); "
             "bwd GFLOP/s counts training_flops - total_flops (the report leaves out the first layer's input "
             "gradient, which is never computed)")
    for r in results["nets"]:
        for run in r["runs"]:
            lp = run.get("layer_profile")
            if not lp:
                continue
            L += ["", f"Per-layer profile: {r['name']}, {lp.get('threads')} thread(s), batch {lp.get('batch')}"
                  + (f" ({lp['source']})" if "source" in lp else "")]
            if "error" in lp:
                L.append(f"unavailable: {lp['error']}")
                continue
            tot = sum(x["forward_us"] + x["backward_us"] for x in lp["layers"])
            rows = []
            for x in lp["layers"]:
                # the report names layers as the spec does (layer1.0.conv1), the C as identifiers
                ff, bf = r["layer_flops"].get(x.get("spec_name", x["layer"]), (0, 0))
                fg = ff / (x["forward_us"] * 1e3) if x["forward_us"] > 0 else None
                bg = bf / (x["backward_us"] * 1e3) if x["backward_us"] > 0 and bf else None
                rows.append([x["layer"], x["kind"], f"{x['forward_us']:.2f}", f"{x['backward_us']:.2f}",
                             pct(100 * (x["forward_us"] + x["backward_us"]) / tot), f1(fg) if ff else "-",
                             f1(bg) if bf else "-", pct(100 * (fg or 0) / peak1) if ff else "-",
                             pct(100 * (bg or 0) / peak1) if bf else "-"])
            rows.append(["total", "", f"{sum(x['forward_us'] for x in lp['layers']):.2f}",
                         f"{sum(x['backward_us'] for x in lp['layers']):.2f}", "100.0%", "", "", "", ""])
            L += table(["layer", "kind", "fwd us/img", "bwd us/img", "% of layers", "fwd GFLOP/s", "bwd GFLOP/s",
                        "fwd %peak", "bwd %peak"], rows, left=2)
            L.append(f"thread-time per image inside layer calls (median of {lp['reps']} repetitions)"
                     + (f", scaled by {lp['scale']:.2f} = thread CPU time / wall time of the profiled calls"
                        if lp["scale"] != 1.0 else "")
                     + f"; the profiled train_batches took {lp['wall_us_per_sample']:.2f} us/img wall, "
                     f"{lp['cpu_us_per_sample']:.2f} us/img calling-thread CPU (both include loss, gradient "
                     "reduction, optimizer and timer overhead)")
    return L


# ---- main --------------------------------------------------------------------------------------
def int_list(s: str) -> list[int]:
    try:
        v = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="netcompiler vs PyTorch (and ONNX Runtime) CPU benchmark")
    ap.add_argument("--nets", default="lenet5,alphabet",
                    help="comma-separated spec names under specs/ or .yaml paths (default: lenet5,alphabet)")
    ap.add_argument("--threads", type=int_list, default=[1, 2], help="thread counts (default: 1,2)")
    ap.add_argument("--batch", type=int_list, default=[64, 1], help="training batch sizes (default: 64,1)")
    ap.add_argument("--infer-batch", type=int_list, default=[1, 64],
                    help="inference batch sizes: 1 is the latency table, larger ones a throughput table "
                         "(default: 1,64)")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test / CI): less time, fewer reps")
    ap.add_argument("--min-time", type=float, help="seconds per repetition (default 0.2; --quick 0.03)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement, median reported (default 5; --quick 3)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per measurement (default 0.2; --quick 0.02)")
    ap.add_argument("--samples", type=int, help="random training images (default 1024; --quick 256)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall (default) or cpu: time 1-thread runs by the calling thread's CPU time, which "
                         "leaves out time stolen by other processes on a loaded machine (multi-thread runs "
                         "always use wall time)")
    ap.add_argument("--profile", action="store_true", help="time forward/backward/optimizer and every layer")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even when installed")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch (netcompiler only)")
    ap.add_argument("--no-build-time", action="store_true", help="skip the cold build timing")
    ap.add_argument("--cflags", default="", metavar="FLAGS",
                    help="extra C flags appended to netc's default flags for every netc build, e.g. "
                         "'-fassociative-math -fno-signed-zeros -fno-trapping-math'")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE as JSON")
    args = ap.parse_args(argv)
    q = args.quick
    args.min_time = args.min_time if args.min_time is not None else (0.03 if q else 0.2)
    args.reps = args.reps if args.reps is not None else (3 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (0.02 if q else 0.2)
    args.samples = args.samples if args.samples is not None else (256 if q else 1024)
    args.samples = max(args.samples, max(args.batch))
    args.nets = [n for n in args.nets.split(",") if n.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for n in args.nets:  # fail before spending time on anything
        spec_path(n)
    torch = import_torch(not args.no_torch)
    ort, ort_note = import_ort(not args.no_onnx and torch is not None)
    notes = []
    if torch is None:
        notes.append("PyTorch skipped" + (" (--no-torch)" if args.no_torch else " (not installed)"))
    elif ort_note:
        notes.append(ort_note)
    from netcompiler.runtime import available_cores

    if max(args.threads) > (cores := available_cores()):
        notes.append(f"more threads requested ({max(args.threads)}) than cores available ({cores})")
    from netcompiler.build import default_flags
    from netcompiler.target import detect

    args.flags = default_flags() + shlex.split(args.cflags)
    progress("measuring FP32 peak")
    # many short repetitions, best kept: the peak is what an undisturbed window reaches
    pk = peak_mod.measure_peak(min_time=0.05, reps=max(2 * args.reps, 6 if args.quick else 12),
                               threads=max(args.threads),
                               clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
    env = {"cpu": cpu_name(), "cores": available_cores(), "python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__ if torch else None, "onnxruntime": ort.__version__ if ort else None,
           "cc": cc_version(), "flags": args.flags, "vec": detect(args.flags).vec, "fastcall": fastcall_state(),
           "loadavg_start": loadavg(),
           "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))}}
    bench = Bench(args, torch, ort)
    nets = [bench.run_net(n) for n in args.nets]
    env["loadavg_end"] = loadavg()
    clear_progress()
    results = {"env": env, "peak": pk, "notes": notes, "nets": nets,
               "args": {k: v for k, v in vars(args).items()}}
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
