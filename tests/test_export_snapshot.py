"""Snapshot of `netc export`'s C for tests/specs/snapshot.yaml (weights: PyTorch's
initialisation from numpy's generator with seed 0).

A change to templates/export/ or the lowering shows up here as a diff to review.  After
checking that the new output is what you want, rewrite the snapshots with

    NETC_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_export_snapshot.py
"""
from __future__ import annotations


import numpy as np
import pytest

from conftest import ROOT, check_snapshot
from netcompiler.check import check_text
from netcompiler.export import export_c

SPEC = "tests/specs/snapshot.yaml"  # relative, so the banner is the same on every machine
SNAPSHOTS = ROOT / "tests" / "snapshots"


def exported():
    network = check_text((ROOT / SPEC).read_text(), SPEC)
    rng = np.random.default_rng(0)
    state = {f"{l.name}.{k}": np.asarray(v) for l in network.layers for k, v in l.kind.init_params(l, rng).items()}
    return export_c(network, state, weights_name="weights.npz", normalisation=(0.25, 0.5))


@pytest.mark.parametrize("part, filename", [("source", "export_snapshot.c"), ("header", "export_snapshot.h")])
def test_exported_code_matches_snapshot(part, filename):
    check_snapshot(getattr(exported(), part), SNAPSHOTS / filename, "exported", __file__)


def test_export_is_deterministic():
    a, b = exported(), exported()
    assert a.source == b.source and a.header == b.header
