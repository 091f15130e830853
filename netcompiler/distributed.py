"""`netc train --distributed`: data-parallel training on MPI (mpi4py), one process per rank.

    mpirun -np 2 netc train specs/lenet5.yaml --data fashion-mnist      (or srun -n 2 ...)

Every rank loads the data, compiles the spec and draws the same permutation each epoch (same
seed).  `--batch-size` is the global batch: batch k of the epoch's order is cut into N
contiguous shares, rank r trains on rows [r*m//N, (r+1)*m//N) of it (m the batch's size).  A
step is `Net.backward_batch` (the gradient of the rank's mean loss), a scale by the rank's
share of the batch (local samples / m, so the sum is the gradient of the global batch's mean
loss), one in-place Allreduce (sum) of `Net.grad_buffer` (the gradients and, in its two spare
slots, the loss sum and correct count), then `Net.optimizer_step` on every rank: the same
update everywhere.  With the same global batch and seed, N ranks give the single-process
result up to rounding (the sums are added in another order); lr needs no change.

Batch norm uses per-rank batch statistics (as PyTorch DDP), so results differ from one
process by design; the running statistics are averaged across ranks after every step, so
every rank holds the same buffers.  Dropout masks: rank r draws from seed
seed + r * GOLDEN (mod 2**64), rank 0 from the run's seed; reproducible for a given N.

Rank 0 alone prints, and reads and writes the run directory (lock, metrics.csv, weights.npz,
checkpoint.npz; through train.py's atomic writers); the other ranks read it on --resume (a
directory every rank sees, as a cluster's shared file system).  At each epoch end a sha256 of
the parameters and buffers is compared across ranks; a mismatch stops the run.  Validation is
split across ranks like the training batches and reduced.  SIGUSR1 (Open MPI's mpirun forwards
it to every rank: `kill -USR1 <mpirun pid>`) or Ctrl-C asks for a stop; the ranks agree on it
at the next chunk boundary and rank 0 writes the checkpoint.  An error on one rank is reported
by rank 0 when the ranks agree on it (setup, divergence, a digest mismatch), else that rank
aborts the job (MPI_Abort); a rank that dies makes mpirun stop the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import sys
import traceback
from typing import Any

import numpy as np

from .errors import NetcError
from .fileio import locked_directory, remove_stale_temps
from .train import RUN_FILES, Run, TrainOptions, TrainingDiverged, loss_of, predict_outputs

GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: rank r's dropout seed is seed + r * GOLDEN
# world size as launchers set it: Open MPI's mpirun, MPICH/Intel's hydra, PMIx, Slurm's srun
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def launcher_world_size() -> int:
    """The number of processes a launcher (mpirun, srun) started this one among; 1 if none."""
    for var in WORLD_SIZE_VARS:
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s dropout seed for a run whose (rank 0) seed is `seed`."""
    return (int(seed) + rank * GOLDEN) % 2**64


def share(m: int, rank: int, size: int) -> tuple[int, int]:
    """Rank `rank`'s part [lo, hi) of m rows split across `size` ranks."""
    return rank * m // size, (rank + 1) * m // size


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Comm:
    """MPI_COMM_WORLD, through mpi4py."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise NetcError(f"--distributed needs mpi4py and an MPI library ({exc}): apt-get install openmpi-bin "
                            f"libopenmpi-dev, then pip install mpi4py (or pip install 'netcompiler[mpi]')") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def sum_(self, a: np.ndarray) -> None:
        """a = the sum of every rank's a, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)

    def max_(self, a: np.ndarray) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.MAX)

    def gather(self, value: Any) -> list[Any]:
        return self.comm.allgather(value)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def train_batches(net, comm: Comm, x: np.ndarray, y: np.ndarray, order: np.ndarray, bs: int,
                  lrs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Data-parallel `Net.train_batches`: the global batches of `order` (the same on every
    rank), this rank training its share of each, batch k at learning rate lrs[k] (None: the
    optimizer's); returns what every rank returns alike: the
    global batches' mean losses and correct counts, up to and including a non-finite loss
    (whose update every rank skips)."""
    g = net.grad_buffer
    npar = g.size - 2
    buffers = net.flat_buffers if net.plan.num_buffers else None
    nb = -(-len(order) // bs)
    losses = np.zeros(nb, np.float64)
    correct = np.zeros(nb, np.int64)
    for k in range(nb):
        batch = order[k * bs:(k + 1) * bs]
        m = len(batch)
        lo, hi = share(m, comm.rank, comm.size)
        if lrs is not None:  # as Net.train_batches: lr ends as the last one used
            net.lr = float(lrs[k])
        loss, right = net.backward_batch(x, y, batch[lo:hi])
        g[:npar] *= (hi - lo) / m  # the sum over ranks: the gradient of the global batch's mean loss
        g[npar] = loss * (hi - lo)
        g[npar + 1] = right
        comm.sum_(g)
        losses[k] = float(g[npar]) / m
        correct[k] = int(round(float(g[npar + 1])))
        if not math.isfinite(losses[k]):  # the same on every rank: all skip the update and stop
            return losses[:k + 1], correct[:k + 1]
        net.optimizer_step()
        if buffers is not None:  # batch-norm running statistics: the mean over ranks
            comm.sum_(buffers)
            buffers /= comm.size
    return losses, correct


class AgreedError(NetcError):
    """An error every rank raised; rank 0 reports it, the others exit quietly."""


class DistributedRun(Run):
    """A `Run` that is one rank of a data-parallel job (see the module's docstring)."""

    def __init__(self, opts: TrainOptions, comm: Comm, **kw):
        self.comm = comm
        self.ranks = comm.size
        if comm.rank != 0:
            opts = dataclasses.replace(opts, plot=False)  # curves.png: rank 0's
            quiet = open(os.devnull, "w")
            kw.update(out=quiet, err=quiet, progress=False)
        super().__init__(opts, **kw)

    # ---- agreement ----
    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed; if one did, every rank raises (rank 0 the first
        rank's message, so it is printed once)."""
        errors = self.comm.gather(None if error is None else str(error))
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not bad:
            return
        r, text = bad[0]
        raise AgreedError(text if r == 0 else f"rank {r} of {self.comm.size}: {text}") from None

    def run(self) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            error = None
            if self.comm.rank == 0:
                try:
                    stack.enter_context(locked_directory(
                        self.run_dir, "netc train", "wait for it to finish, or pass --out to train in another "
                                                    "directory"))
                    removed = remove_stale_temps(self.run_dir, RUN_FILES)
                    if removed:
                        print(f"netc: removed {', '.join(removed)} from {self.run_dir} (left by a run that was "
                              f"killed while writing)", file=self.err, flush=True)
                except NetcError as exc:
                    error = exc
            self.agree(error)
            return self._run()

    def setup(self) -> None:
        error = None
        try:
            super().setup()
            bs, size = int(self.s["batch_size"]), self.comm.size
            if bs < size:
                raise NetcError(f"--batch-size {bs} is the global batch, split across {size} ranks: it must be at "
                                f"least {size}")
            if not self._trainable(bs):
                raise NetcError(f"--batch-size {bs} gives {bs // size} samples per rank on {size} ranks: too few "
                                f"for this network's batch norm; raise --batch-size")
        except (NetcError, ValueError, OSError) as exc:
            error = exc
        self.agree(error)
        widths = self.comm.gather(self.net.plan.vec)  # it sets the layout the gradients are summed in
        self.agree(None if len(set(widths)) == 1 else NetcError(
            f"the ranks built the network for different vector widths ({', '.join(map(str, widths))} reals, by "
            f"rank), so their parameter arrays do not line up: set NETC_VEC to one of them on every rank"))
        state = self.net.optimizer_state()  # rank 0's dropout stream (fresh or from the checkpoint)
        state["dropout_seed"] = np.array(rank_seed(int(state["dropout_seed"]), self.comm.rank), np.uint64)
        self.net.load_optimizer_state(state)
        self.say(f"distributed: {self.comm.size} ranks, global batch {self.s['batch_size']} "
                 f"(about {int(self.s['batch_size']) // self.comm.size} per rank)")

    def _trainable(self, n: int) -> bool:
        return n >= self.comm.size and super()._trainable(n // self.comm.size)

    # ---- the step ----
    def _train_batches(self, order: np.ndarray, bs: int, lrs: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        return train_batches(self.net, self.comm, self.X, self.Y, order, bs, lrs)

    def _next_chunk(self, stop: bool, chunk: int) -> tuple[bool, int]:
        flags = np.array([int(stop or _USR1.requested), -chunk], np.int64)
        self.comm.max_(flags)  # stop if any rank was asked to; the smallest chunk
        return bool(flags[0]), int(-flags[1])

    def _evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        lo, hi = share(len(x), self.comm.rank, self.comm.size)
        z = predict_outputs(self.net, x[lo:hi])
        sums = np.zeros(3, np.float64)
        if hi > lo:
            sums[:] = (loss_of(self.network.loss, z, labels[lo:hi]) * (hi - lo),
                       np.count_nonzero(z.argmax(axis=1) == labels[lo:hi]) if labels.ndim == 1 else 0, hi - lo)
        self.comm.sum_(sums)
        if not sums[2]:
            return float("nan"), float("nan")
        return float(sums[0] / sums[2]), float(sums[1] / sums[2]) if labels.ndim == 1 else float("nan")

    # ---- files: rank 0 only ----
    def _save_epoch(self) -> None:
        mine = digest(self.net.flat_params, self.net.flat_buffers)
        digests = self.comm.gather(mine)
        if len(set(digests)) > 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            raise AgreedError(f"the parameters differ across ranks after epoch {len(self.history)} (ranks "
                              f"{', '.join(map(str, bad))} differ from rank 0: sha256 {digests[0][:12]} vs "
                              f"{digests[bad[0]][:12]}); the run stops; nothing was written for this epoch")
        if self.comm.rank == 0:
            super()._save_epoch()

    def save_checkpoint(self) -> None:
        if self.comm.rank == 0:
            super().save_checkpoint()

    def _write_weights(self) -> None:
        if self.comm.rank == 0:
            super()._write_weights()

    def write_static_files(self) -> None:
        if self.comm.rank == 0:
            super().write_static_files()


class _Usr1:
    """SIGUSR1 (which Open MPI's mpirun forwards to every rank) asks for a stop, as a first Ctrl-C."""

    requested = False
    quiet = False  # the ranks but 0

    def handle(self, signum, frame):
        if not self.requested and not self.quiet:
            print(f"\nnetc: SIGUSR1: stopping after the current chunk of batches", file=sys.stderr, flush=True)
        self.requested = True


_USR1 = _Usr1()


def train(opts: TrainOptions, **kw) -> dict[str, Any] | None:
    """Run this process's rank of a data-parallel `netc train`.  Errors: rank 0 raises what the
    ranks agreed on, the other ranks exit 1 quietly; anything else aborts the whole job."""
    comm = Comm()
    _USR1.quiet = comm.rank != 0
    try:
        signal.signal(signal.SIGUSR1, _USR1.handle)
    except ValueError:  # not the main thread
        pass
    try:
        return DistributedRun(opts, comm, **kw).run()
    except (AgreedError, TrainingDiverged, KeyboardInterrupt) as exc:
        if comm.rank == 0:
            raise
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 1) from None
    except (NetcError, OSError) as exc:  # one rank's own error (e.g. it cannot write a file): stop every rank
        print(f"error: rank {comm.rank} of {comm.size}: {exc}; aborting the job", file=sys.stderr, flush=True)
        comm.abort(1)
    except BaseException:
        traceback.print_exc()
        print(f"error: rank {comm.rank} of {comm.size} failed (above); aborting the job", file=sys.stderr,
              flush=True)
        comm.abort(1)
    return None
