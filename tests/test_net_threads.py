"""One Net shared by Python threads: every call that touches its buffers holds the Net's
lock, so concurrent calls give what the same calls in some serial order give, and never
corrupt memory (the C calls release the GIL and share one set of activations)."""
import threading

import numpy as np
import pytest

from conftest import build, spec

SPEC = spec((1, 12, 12), ["conv2d: {out_channels: 6, kernel_size: 3}", "relu", "maxpool2d: {kernel_size: 2}",
                          "flatten", "linear: {out_features: 32}", "relu", "linear: {out_features: 4}"])
ROUNDS = 150


def hammer(*jobs):
    """Run each job in its own thread, all started together; re-raise the first failure."""
    errors = []
    start = threading.Barrier(len(jobs))

    def run(job):
        try:
            start.wait()
            job()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 12, 12)), rng.integers(0, 4, n)


@pytest.mark.parametrize("path", ["fastcall", "cffi"])
def test_concurrent_forwards_equal_serial_ones(path):
    net = build(SPEC, "float64")
    xs = [data(n, n)[0] for n in (1, 7, 3, 16)]
    expected = [net.forward(x) for x in xs]
    fast = net._fast_forward
    if path == "cffi":  # Net.forward's Python path, as without the fastcall extension
        net._fast_forward = None  # capacity holds every batch below: _reserve does not set it again
    bad = []

    def job(k):
        def run():
            for i in range(ROUNDS):
                x = xs[(k + i) % len(xs)]
                if not np.array_equal(net.forward(x), expected[(k + i) % len(xs)]):
                    bad.append(i)
        return run

    try:
        hammer(*(job(k) for k in range(3)))
    finally:
        net._fast_forward = fast  # the net is shared with other tests (conftest.build)
    assert not bad, f"{len(bad)} of {3 * ROUNDS} concurrent forwards differ from serial ones"


def serial_training(steps, x, y):
    net = build(SPEC, "float64")
    for _ in range(steps):
        net.train_step(x, y)
    return net.state_dict()


def test_training_while_another_thread_forwards():
    x, y = data(16, 1)
    expected = serial_training(ROUNDS, x, y)
    net = build(SPEC, "float64")
    probe = data(5, 2)[0]
    outs = []
    hammer(lambda: [net.train_step(x, y) for _ in range(ROUNDS)],
           lambda: [outs.append(net.forward(probe)) for _ in range(ROUNDS)])
    for k, v in net.state_dict().items():
        assert np.array_equal(v, expected[k]), f"{k} differs from serial training"
    assert all(np.all(np.isfinite(o)) for o in outs)


CHANGE_THREADS = """
import sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import build
from test_net_threads import SPEC, data
net = build(SPEC, "float64")
x, y = data(64, 3)
stop = False
def fiddle():
    i = 0
    while not stop:  # 4 -> 1 frees the scratch and gradient blocks a 4-thread call may still use
        net.threads = 1 + 3 * (i % 2)
        net.state_dict()
        net.lr = 0.01
        i += 1
t = threading.Thread(target=fiddle)
t.start()
for _ in range(1500):
    net.train_step(x, y)
net.train_batches(x, y, np.arange(64).repeat(8), 16)
stop = True
t.join()
assert net.step == 1500 + 32, net.step
assert all(np.all(np.isfinite(v)) for v in net.state_dict().values())
print("ok")
"""


def test_training_while_another_thread_changes_threads(tmp_path):
    """In a child process: without the lock this aborted with 'double free or corruption'."""
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", CHANGE_THREADS, str(ROOT / "tests")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_loss_and_grad_concurrent_with_training_equals_serial():
    x, y = data(8, 4)
    net = build(SPEC, "float64")
    loss0, grads0 = net.loss_and_grad(x, y)
    results = []
    other = data(32, 5)
    hammer(lambda: [results.append(net.loss_and_grad(x, y)) for _ in range(ROUNDS)],
           lambda: [net.forward(other[0]) for _ in range(ROUNDS)])
    for loss, grads in results:  # forward does not change parameters: every call equals the first
        assert loss == loss0 and all(np.array_equal(grads[k], grads0[k]) for k in grads0)
