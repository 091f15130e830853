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
from netcompiler.export import export_c, export_int8

SPEC = "tests/specs/snapshot.yaml"  # relative, so the banner is the same on every machine
SNAPSHOTS = ROOT / "tests" / "snapshots"


def exported(int8: bool = False):
    """int8: --target cortex-m4 (both conv forms), with given ranges (calibration by torch
    could differ in its last bits between machines)."""
    network = check_text((ROOT / SPEC).read_text(), SPEC)
    rng = np.random.default_rng(0)
    state = {f"{l.name}.{k}": np.asarray(v) for l in network.layers for k, v in l.kind.init_params(l, rng).items()}
    if int8:
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        ranges = {"": (-2.0, 2.0), **{l.name: (0.0, 1.5) if l.kind.kind == "relu" else (-1.5, 1.5)
                                      for l in network.layers}}
        return export_int8(network, state, None, "cortex-m4", weights_name="weights.npz", normalisation=(0.25, 0.5),
                           calibration_name="given ranges", ranges=ranges)
    return export_c(network, state, weights_name="weights.npz", normalisation=(0.25, 0.5))


@pytest.mark.parametrize("part, filename", [("source", "export_snapshot.c"), ("header", "export_snapshot.h"),
                                            ("source", "export_int8_snapshot.c"), ("header", "export_int8_snapshot.h")])
def test_exported_code_matches_snapshot(part, filename):
    check_snapshot(getattr(exported("int8" in filename), part), SNAPSHOTS / filename, "exported", __file__)


def test_export_is_deterministic():
    for int8 in (False, True):
        a, b = exported(int8), exported(int8)
        assert a.source == b.source and a.header == b.header
