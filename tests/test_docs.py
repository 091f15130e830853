"""README and --help stay true: every layer kind and option is documented."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from netcompiler.layers import REGISTRY

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_kind_and_option_is_in_the_readme(kind):
    row = next((l for l in README.splitlines() if l.startswith("|") and f"`{kind}`" in l), None)
    assert row is not None, f"README's layer table has no row for {kind}"
    for opt in REGISTRY[kind].options:
        assert f"`{opt.name}`" in row, f"README's row for {kind} does not mention option {opt.name}"


def test_readme_commands_exist():
    for script in re.findall(r"`(scripts/[\w.]+)`", README):
        assert (Path(__file__).resolve().parent.parent / script).exists(), script


@pytest.mark.parametrize("command", ["check", "report", "build", "show", "verify"])
def test_help_lists_commands(command):
    out = subprocess.run([sys.executable, "-m", "netcompiler", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and command in out.stdout
    sub = subprocess.run([sys.executable, "-m", "netcompiler", command, "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and "usage: netc" in sub.stdout


def test_readme_mac_count_of_lenet5_is_the_reports():
    """The MAC figures the README compares with fvcore and torchinfo are netc's own count."""
    from netcompiler.check import load
    from netcompiler.report import build_report

    rep = build_report(load(Path(__file__).resolve().parent.parent / "specs" / "lenet5.yaml"))
    stated = re.search(r"for LeNet-5 .*?`netc report` gives ([\d,]+) MACs", README, re.S)
    assert stated, "README no longer states LeNet-5's MAC count next to fvcore's and torchinfo's"
    assert int(stated.group(1).replace(",", "")) == rep["total_macs"]
    conv1 = next(l for l in rep["layers"] if l["name"] == "conv1")
    assert f"{conv1['macs']:,} + {conv1['activations']:,}" in README  # torchinfo's conv1 = MACs + bias adds
