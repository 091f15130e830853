"""The team that runs a call's chunks: results independent of it."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import build, spec
from test_threads import TEAM

from netcompiler import runtime

# ---- results do not depend on the team ---------------------------------------------------
SMALL_CHAIN = spec([1, 8, 8], ["conv2d: {out_channels: 4, kernel_size: 3}", "relu", "maxpool2d: {kernel_size: 2}",
                               "flatten", "linear: {out_features: 10}", "relu", "linear: {out_features: 3}"],
                   name="teams_chain")
GRAPH = (runtime.Path(__file__).parent / "specs" / "export_graph.yaml").read_text()
SPECS = {"batchnorm_dropout": TEAM, "chain": SMALL_CHAIN, "graph": GRAPH}


def _train(text, dtype, threads, team, count=45, batch=8):
    net = build(text, dtype, threads)
    net.team = team
    net.set_optimizer("momentum", lr=0.05, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(1)
    shape = net.network.input_shape
    x = net.check_x(rng.standard_normal((count, *shape)).astype(dtype))
    y = net.check_y(rng.integers(0, net.network.num_classes, count).astype(np.int32), count)
    order = rng.permutation(count).astype(np.int64)
    lrs = np.linspace(0.05, 0.01, -(-count // batch))
    losses, correct = [], []
    for _ in range(2):
        l, c = net.train_batches(x, y, order, batch, lrs=lrs)
        losses.append(l)
        correct.append(c)
    logits = net.forward(x[:11])
    state = {k: v.copy() for k, v in net.state_dict().items()}
    return state, np.concatenate(losses), np.concatenate(correct), logits, net


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("threads", [2, 4])
def test_the_same_bits_whatever_the_team(name, dtype, threads):
    """A net with `threads` threads trained on every team that divides it (and asked for a team
    of 3, which the C takes down to a divisor): parameters, running statistics, losses, correct
    counts and outputs the same bit for bit."""
    runs = {team: _train(SPECS[name], dtype, threads, team) for team in ((2, 1, 3) if threads == 2 else (4, 2, 1, 3))}
    ref, lref, cref, zref, _ = runs[threads]
    for team, (state, l, c, z, _) in runs.items():
        assert np.array_equal(l, lref) and np.array_equal(c, cref) and np.array_equal(z, zref), team
        for k in ref:
            assert np.array_equal(state[k], ref[k]), (team, k)
    # and the thread count still matters (chunks split the batch differently): the test can fail
    one = _train(SPECS[name], dtype, 1, 1)[0]
    assert any(not np.array_equal(one[k], ref[k]) for k in ref)


def test_team_values_are_checked():
    net = build(SMALL_CHAIN, "float32", 2)
    for bad in (0, -1, 1.5, "2", True, runtime.MAX_THREADS + 1):
        with pytest.raises(ValueError, match="team must be an integer"):
            net.team = bad
    net.team = 1
    assert net.team == 1 and net._ctx.team == 1
    net.team = None
    assert net.team is None and net._ctx.team == 0


def test_fewer_threads_than_asked_still_compute_every_sample(tmp_path):
    """OpenMP may give a parallel region fewer threads than it asks for (OMP_THREAD_LIMIT, a
    nested region): the threads it gets run every chunk, so a 2-thread net computes the same bits
    under OMP_THREAD_LIMIT=1 (before, the missing thread's samples were left as they were)."""
    script = tmp_path / "limit.py"
    script.write_text(
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import test_teams\n"
        "state, losses, correct, logits, _ = test_teams._train(test_teams.SMALL_CHAIN, 'float32', 2, None)\n"
        "np.savez(sys.argv[1], losses=losses, logits=logits, **{k.replace('.', '/'): v for k, v in state.items()})\n")
    out = tmp_path / "limited.npz"
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, cwd=tmp_path)
    state, losses, _, logits, _ = _train(SMALL_CHAIN, "float32", 2, None)
    got = np.load(out)
    assert np.array_equal(got["losses"], losses) and np.array_equal(got["logits"], logits)
    for k, v in state.items():
        assert np.array_equal(got[k.replace(".", "/")], v), k
