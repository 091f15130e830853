#!/usr/bin/env python
"""Data-parallel training throughput on MPI: images/s of one rank x T threads against R ranks x
1 thread, and the time of the gradient Allreduce per step.  See bench/README.md.

    python bench/mpi.py                              # lenet5, fashion_convnet: 1x1, 1x2, 2x1
    python bench/mpi.py --nets lenet5 --steps 50 --batch 64 --json out.json

The parent launches `mpirun -np R python bench/mpi.py --worker ...` once per configuration
(as root it sets Open MPI's OMPI_ALLOW_RUN_AS_ROOT variables, and --oversubscribe); rank 0 of
each worker prints one JSON line.  Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import netcompiler as nc
    from netcompiler.distributed import Comm, train_batches

    comm = Comm()
    spec = args.net if args.net.endswith(".yaml") else str(ROOT / "specs" / f"{args.net}.yaml")
    net = nc.compile(spec, threads=args.threads)
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = net.check_x(rng.standard_normal((n, *net.network.input_shape)).astype(np.float32))
    y = net.check_y(rng.integers(0, net.network.num_classes, n), n)
    net.set_optimizer("sgd", lr=0.01, momentum=0.9)
    order = np.arange(n)
    single = comm.size == 1

    def run(rows):
        if single:  # what netc train does in one process: all batches in one C call
            net.train_batches(x, y, rows, args.batch)
        else:
            train_batches(net, comm, x, y, rows, args.batch)

    run(order[:args.batch * 2])  # warm up (allocations, caches)
    rates = []
    for _ in range(args.reps):
        comm.comm.Barrier()
        t0 = time.perf_counter()
        run(order)
        comm.comm.Barrier()
        rates.append(n / (time.perf_counter() - t0))
    # the Allreduce of the gradient buffer alone, as each step does it
    g = net.grad_buffer
    times = []
    for _ in range(args.allreduce_reps):
        comm.comm.Barrier()
        t0 = time.perf_counter()
        comm.sum_(g)
        times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(json.dumps({"net": net.name, "params": int(net.plan.num_params), "ranks": comm.size,
                          "threads": args.threads, "batch": args.batch, "images_per_s": statistics.median(rates),
                          "step_ms": 1e3 * args.batch / statistics.median(rates),
                          "allreduce_us": 1e6 * statistics.median(times), "allreduce_bytes": int(g.nbytes)}),
              flush=True)


def launch(args, net: str, ranks: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    if os.geteuid() == 0:  # Open MPI refuses to run as root unless told
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # mpirun binds each rank of a small job to one core: right for one thread per rank, wrong for more
    bind = ["--bind-to", "none"] if threads > 1 else []
    cmd = [args.mpirun, "-np", str(ranks), "--oversubscribe", *bind, "-x", "PYTHONPATH",
           "-x", "OMP_NUM_THREADS", sys.executable, str(Path(__file__).resolve()), "--worker", "--net", net,
           "--threads", str(threads), "--batch", str(args.batch), "--steps", str(args.steps), "--reps",
           str(args.reps), "--allreduce-reps", str(args.allreduce_reps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        sys.exit(f"bench/mpi.py: {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--net", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--nets", default="lenet5,fashion_convnet", help="spec names under specs/ or .yaml paths")
    ap.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    ap.add_argument("--steps", type=int, default=60, help="steps per repetition (default 60)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions, median printed (default 5)")
    ap.add_argument("--allreduce-reps", type=int, default=200, help="timed Allreduce calls (default 200)")
    ap.add_argument("--configs", default="1x1,1x2,2x1",
                    help="RANKSxTHREADS, comma-separated (default 1x1,1x2,2x1; the computed table needs 1x1)")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.mpirun = shutil.which("mpirun")
    if not args.mpirun:
        sys.exit("bench/mpi.py: mpirun not found (apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)")
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} cores, load average {load:.2f} at the start; global batch {args.batch}, "
          f"float32, sgd momentum; median of {args.reps}")
    rows = []
    for net in args.nets.split(","):
        for cfg in args.configs.split(","):
            ranks, threads = map(int, cfg.split("x"))
            rows.append(launch(args, net, ranks, threads))
    print(f"{'net':<16} {'params':>8} {'ranks x threads':>15} {'img/s':>8} {'step ms':>8} {'allreduce us':>12} "
          f"{'bytes':>8}")
    for r in rows:
        ar = f"{r['allreduce_us']:.0f}" if r["ranks"] > 1 else "-"
        print(f"{r['net']:<16} {r['params']:>8,} {str(r['ranks']) + ' x ' + str(r['threads']):>15} "
              f"{r['images_per_s']:>8,.0f} {r['step_ms']:>8.2f} {ar:>12} {r['allreduce_bytes']:>8,}")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    print("\nComputed, not measured across machines: a ring Allreduce sends and receives 2(N-1)/N x 4 bytes x "
          "parameters per rank and step, about 2 x 4P for large N; the step waits for it (no overlap), so a link "
          "is 'free' while that transfer is under 10% of the step.  'us/img' is one rank's compute per image, "
          "measured above (the 1 x 1 row); 'min batch' the per-rank batch whose step reaches 'free above'.")
    print(f"{'net':<16} {'4P bytes':>10} {'us/img':>7} {'10G us':>7} {'free above':>10} {'min batch':>9} "
          f"{'100G us':>7} {'free above':>10} {'min batch':>9}")
    for r in rows:
        if (r["ranks"], r["threads"]) != (1, 1):
            continue
        per_image = 1e6 / r["images_per_s"]
        cells = []
        for gbps in (10, 100):
            t = 2 * 4 * r["params"] * 8 / (gbps * 1e3)  # us
            cells += [f"{t:>7.0f}", f"{10 * t / 1e3:>8.2f}ms", f"{math.ceil(10 * t / per_image):>9}"]
        print(f"{r['net']:<16} {4 * r['params']:>10,} {per_image:>7.1f} {cells[0]} {cells[1]:>10} {cells[2]} "
              f"{cells[3]} {cells[4]:>10} {cells[5]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_start": load, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
