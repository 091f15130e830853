"""Snapshot of the generated C for tests/specs/snapshot.yaml (float32, flags ["-O2"]).

A change to the templates shows up here as a diff to review.  After checking that the
new output is what you want, rewrite the snapshots with

    NETC_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshot.py
"""
from __future__ import annotations

import difflib
import os

import pytest

from conftest import ROOT
from netcompiler.check import check_text
from netcompiler.render import render

SPEC = "tests/specs/snapshot.yaml"  # relative, so the banner is the same on every machine
SNAPSHOTS = ROOT / "tests" / "snapshots"
FLAGS = ["-O2"]
UPDATE = os.environ.get("NETC_UPDATE_SNAPSHOTS") == "1"


def rendered():
    return render(check_text((ROOT / SPEC).read_text(), SPEC), "float32", FLAGS)


@pytest.mark.parametrize("part, filename", [("source", "snapshot.c"), ("header", "snapshot.h")])
def test_generated_code_matches_snapshot(part, filename):
    text = getattr(rendered(), part)
    path = SNAPSHOTS / filename
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: run NETC_UPDATE_SNAPSHOTS=1 python -m pytest {__file__}"
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"snapshot/{filename}", f"generated/{filename}", n=2))
        lines = diff.splitlines()
        shown = "\n".join(lines[:120]) + (f"\n... {len(lines) - 120} more diff lines" if len(lines) > 120 else "")
        pytest.fail(f"generated {filename} differs from {path} (NETC_UPDATE_SNAPSHOTS=1 to accept):\n{shown}")


def test_rendering_is_deterministic():
    a, b = rendered(), rendered()
    assert a.source == b.source and a.header == b.header


def test_snapshot_is_machine_independent():
    r = rendered()
    for text in (r.source, r.header):
        assert str(ROOT) not in text, "the generated code names this checkout's absolute path"
        assert SPEC in text, "the banner should name the spec it came from"
        assert "-O2" in text, "the banner should name the compiler flags"
