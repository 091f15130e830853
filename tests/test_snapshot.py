"""Snapshot of the generated C for tests/specs/snapshot.yaml (float32, flags ["-O2"], 16 reals per vector).

A change to the templates shows up here as a diff to review.  After checking that the
new output is what you want, rewrite the snapshots with

    NETC_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshot.py
"""
from __future__ import annotations


import pytest

from conftest import ROOT, check_snapshot
from netcompiler.check import check_text
from netcompiler.render import render

SPEC = "tests/specs/snapshot.yaml"  # relative, so the banner is the same on every machine
SNAPSHOTS = ROOT / "tests" / "snapshots"
FLAGS = ["-O2"]
VEC = 16  # the vector width is the build target's (target.py); the snapshot's is fixed


def rendered():
    return render(check_text((ROOT / SPEC).read_text(), SPEC), "float32", FLAGS, vec=VEC)


@pytest.mark.parametrize("part, filename", [("source", "snapshot.c"), ("header", "snapshot.h")])
def test_generated_code_matches_snapshot(part, filename):
    check_snapshot(getattr(rendered(), part), SNAPSHOTS / filename, "generated", __file__)


def test_rendering_is_deterministic():
    a, b = rendered(), rendered()
    assert a.source == b.source and a.header == b.header


def test_snapshot_is_machine_independent():
    r = rendered()
    for text in (r.source, r.header):
        assert str(ROOT) not in text, "the generated code names this checkout's absolute path"
        assert SPEC in text, "the banner should name the spec it came from"
        assert "-O2" in text, "the banner should name the compiler flags"
