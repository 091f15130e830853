"""`python -m netcompiler check` in a subprocess: exit status, stdout/stderr, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = sorted((ROOT / "specs").glob("*.yaml"))


def netc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netcompiler", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def assert_clean_failure(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip()
    for n in needles:
        assert n in r.stderr, r.stderr


def test_good_specs_are_ok():
    r = netc("check", *GOOD)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for path in GOOD:
        assert f"{path}: ok (" in r.stdout
    assert "specs/lenet5.yaml: ok (lenet5: 1x28x28 -> 10, 61,706 parameters)" in r.stdout
    assert "conv1" in r.stdout  # the shape table


def test_quiet_prints_only_ok_lines():
    r = netc("check", "-q", "specs/lenet5.yaml", "specs/alphabet.yaml")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "specs/lenet5.yaml: ok (lenet5: 1x28x28 -> 10, 61,706 parameters)",
        "specs/alphabet.yaml: ok (alphabet: 1x28x28 -> 26, 137,178 parameters)",
    ]


def test_bad_spec_message_on_stderr():
    r = netc("check", "tests/specs/cifar_first.yaml")
    assert_clean_failure(r)
    assert r.stderr == ("tests/specs/cifar_first.yaml:9:23: error: flatten 'flatten1': expected output 10, but it "
                        "is 40 (from input 10x2x2)\n")
    assert "ok" not in r.stdout


def test_several_errors_all_on_stderr():
    r = netc("check", "tests/specs/bad_several.yaml")
    assert_clean_failure(r)
    assert len(r.stderr.splitlines()) == 6
    assert all(l.startswith("tests/specs/bad_several.yaml:") and ": error: " in l for l in r.stderr.splitlines())


@pytest.mark.parametrize("name", ["bad_kernel", "bad_python_tag", "bad_syntax", "bad_several"])
def test_bad_specs_fail_cleanly(name):
    assert_clean_failure(netc("check", f"tests/specs/{name}.yaml"), f"tests/specs/{name}.yaml:")


def test_one_bad_spec_does_not_hide_the_good_ones():
    r = netc("check", "-q", "specs/lenet5.yaml", "tests/specs/bad_kernel.yaml", "specs/cifar.yaml")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "specs/lenet5.yaml: ok" in r.stdout and "specs/cifar.yaml: ok" in r.stdout
    assert "conv2d 'conv3': input 4x4 is smaller than kernel 5x5" in r.stderr


def test_missing_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert_clean_failure(netc("check", missing), f"{missing}:1:1: error: cannot read spec: No such file or directory")


def test_binary_file(tmp_path):
    binary = tmp_path / "net.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_clean_failure(netc("check", binary), f"{binary}:1:1: error:")


def test_non_utf8_file(tmp_path):
    latin1 = tmp_path / "net.yaml"
    latin1.write_bytes("name: r\xe9seau\ninput: [4]\nlayers: [relu]\nloss: mse\n".encode("latin-1"))
    assert_clean_failure(netc("check", latin1), "spec is not UTF-8 text")


def test_utf8_file_with_control_characters(tmp_path):
    f = tmp_path / "net.yaml"
    f.write_bytes(b"input: [4]\nlayers: [relu]\x00\x01\nloss: mse\n")
    assert_clean_failure(netc("check", f), f"{f}:2:15: error: YAML syntax error: unacceptable character #x0000")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_clean_failure(netc("check", empty), f"{empty}:1:1: error: empty spec")


def test_directory_as_spec(tmp_path):
    assert_clean_failure(netc("check", tmp_path),
                         f"{tmp_path}:1:1: error: cannot read spec: it is a directory, not a regular file")


def test_fifo_and_devices_are_refused_without_reading(tmp_path):
    # a FIFO nobody writes hung the open; /dev/zero was read without bound
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    r = netc("check", fifo)
    assert_clean_failure(r, f"{fifo}:1:1: error: cannot read spec: it is a FIFO (named pipe), not a regular file")
    assert_clean_failure(netc("check", "/dev/zero"),
                         "/dev/zero:1:1: error: cannot read spec: it is a character device, not a regular file")


def test_huge_file_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert_clean_failure(netc("check", big), "specs over 1 MiB are refused")


def test_hostile_yaml(tmp_path):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)))
    assert_clean_failure(netc("check", laughs), "after expanding YAML aliases")
    deep = tmp_path / "deep.yaml"
    deep.write_text("input: " + "[" * 1000 + "]" * 1000 + "\n")
    assert_clean_failure(netc("check", deep), "nested too deeply")


def test_memory_budget_flag():
    r = netc("check", "-q", "--memory-budget", "1000KiB", "specs/lenet5.yaml")
    assert_clean_failure(r, "network 'lenet5' needs 1.0 MiB to train one sample, over the memory budget of "
                            "1000.0 KiB (--memory-budget)")
    assert netc("check", "-q", "--memory-budget", "2MiB", "specs/lenet5.yaml").returncode == 0


def test_report_on_missing_file_is_clean(tmp_path):
    assert_clean_failure(netc("report", tmp_path / "nope.yaml"), "cannot read spec")


def test_adamw_in_the_train_section(tmp_path):
    spec = tmp_path / "w.yaml"
    spec.write_text("input: [4]\nlayers:\n  - linear: {out_features: 2}\nloss: mse\n"
                    "train: {optimizer: adamw, weight_decay: 0.01}\n")
    r = netc("check", "-q", spec)
    assert r.returncode == 0, r.stderr
    spec.write_text(spec.read_text().replace("adamw", "adamx"))
    assert_clean_failure(netc("check", spec), "train option 'optimizer' must be one of sgd, momentum, adam, adamw, "
                                              "got 'adamx'")
