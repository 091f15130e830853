"""Nothing from outside reaches the generated C except validated identifiers and numbers:
paths and compiler flags are shown only in comments, escaped so that they cannot end the
comment, splice lines or start a preprocessor line."""
import re

import numpy as np
import pytest

import netcompiler as nc
from netcompiler.check import check_text
from netcompiler.ctext import assert_plan, comment
from netcompiler.plan import make_plan
from netcompiler.render import render

SPEC = """
name: tiny
input: [1, 6, 6]
layers:
  - conv2d: {out_channels: 2, kernel_size: 3}
  - relu
  - maxpool2d: {kernel_size: 2}
  - flatten
  - linear: {out_features: 3}
loss: cross_entropy
"""
# A path component cannot hold '/', so the payload ends each comment with '*/' as a path
# separator and reopens one with '/*' at its end; every C line of it has no '/'.
PAYLOAD = ('x*/\n#ifndef PWN\n#define PWN\n#include <stdlib.h>\n'
           '__attribute__((constructor)) static void pwn(void) { system("touch MARKER"); }\n'
           '#endif\n#define NOTHING /*')
# More ways out of a comment: a trigraph line splice, a backslash splice between '*' and '/',
# a bidi override and an undecodable byte of a path (a lone surrogate after os.fsdecode).
TRICKS = "a*??/\n/ b*\\\n/ c\u202e d\udcff e\r\n#define TRICK 1\x00\x1b f??="

TRIGRAPHS = {"??=": "#", "??/": "\\", "??'": "^", "??(": "[", "??)": "]", "??!": "|", "??<": "{", "??>": "}",
             "??-": "~"}


def code_outside_comments(src: str) -> str:
    """The C text with every comment replaced by one space, after translation phases 1-2
    (trigraphs, line splices - gcc splices across trailing blanks too), as the compiler sees it."""
    for k, v in TRIGRAPHS.items():
        src = src.replace(k, v)
    src = re.sub(r"\\[ \t]*\n", "", src)
    out, i = [], 0
    while i < len(src):
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            assert j >= 0, f"unterminated comment at {src[i:i + 80]!r}"
            out.append(" ")
            i = j + 2
        elif src.startswith("//", i):
            j = src.find("\n", i)
            out.append(" ")
            i = len(src) if j < 0 else j
        elif src[i] in "\"'":
            j = i + 1
            while src[j] != src[i]:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1])
            i = j + 1
        else:
            out.append(src[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("text", [PAYLOAD, TRICKS, "/*/*/ */ ??/ \\", "\\"])
def test_comment_text_cannot_leave_a_comment(text):
    shown = comment(text)
    assert "*/" not in shown and "/*" not in shown and "??" not in shown and "\\\n" not in shown
    assert all(ch.isprintable() for ch in shown) and not shown.endswith("\\")
    shown.encode("utf-8")  # no lone surrogates: the source file can be written
    assert code_outside_comments(f"/* {shown} */") == " "


def test_comment_text_keeps_ordinary_paths_readable():
    assert comment("specs/lenet5.yaml") == "specs/lenet5.yaml"
    assert comment("/home/me/my nets/réseau.yaml:12") == "/home/me/my nets/réseau.yaml:12"
    assert comment("a\nb") == "a\\nb"


@pytest.mark.parametrize("hostile, shown", [(PAYLOAD, 'system("touch MARKER")'), (TRICKS, "#define TRICK")])
def test_hostile_path_and_flags_change_only_comments(hostile, shown):
    """The C a compiler sees (comments removed) is the same whatever the spec's path and the
    flags shown in the banner; the payload appears only inside comments."""
    plain = render(check_text(SPEC, "specs/tiny.yaml"), "float32", ["-O2"])
    evil = render(check_text(SPEC, f"/tmp/{hostile}/tiny.yaml"), "float32", ["-O2", hostile])
    for a, b in ((plain.source, evil.source), (plain.header, evil.header)):
        assert code_outside_comments(b) == code_outside_comments(a)
    assert shown in evil.source  # shown (escaped) in comments, so the check above means something
    assert shown not in code_outside_comments(evil.source)


def test_render_asserts_names_are_identifiers():
    plan = make_plan(check_text(SPEC, "tiny.yaml"))
    plan.layers[0].name = "conv1 */ int evil; /*"  # what check.py refuses; render must refuse it too
    with pytest.raises(AssertionError, match="layer name"):
        assert_plan(plan)
    plan = make_plan(check_text(SPEC, "tiny.yaml"))
    plan.params[0].offset = float("nan")
    with pytest.raises(AssertionError, match="offset"):
        assert_plan(plan)


def test_spec_in_a_hostile_directory_builds_and_runs_nothing(tmp_path, monkeypatch):
    """A spec whose directory names hold '*/', newlines, #define and a constructor calling
    system() builds, loads and runs, and the payload never runs (no MARKER)."""
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    d = tmp_path / PAYLOAD / "sub"
    d.mkdir(parents=True)
    (d / "tiny.yaml").write_text(SPEC.replace("name: tiny\n", ""))  # name from the file: 'tiny'
    net = nc.compile(str(d / "tiny.yaml"), threads=1)
    x = np.random.default_rng(0).normal(size=(2, 1, 6, 6)).astype(np.float32)
    assert net.forward(x).shape == (2, 3)
    assert np.isfinite(net.train_step(x, np.array([0, 2]))) and net.step == 1
    assert not (tmp_path / "MARKER").exists()
    assert "touch MARKER" in net.paths.c_path.read_text()  # the path was shown, escaped


def test_harmless_path_with_comment_end_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("NETC_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "a*" / "b??" / "c\\"
    d.mkdir(parents=True)
    (d / "tiny.yaml").write_text(SPEC)
    net = nc.compile(str(d / "tiny.yaml"), threads=1)
    assert net.forward(np.zeros((1, 1, 6, 6), np.float32)).shape == (1, 3)


@pytest.mark.parametrize("hostile", [PAYLOAD, TRICKS])
def test_hostile_text_compiles_without_warnings(tmp_path, hostile):
    """-Wall covers -Wcomment ('/*' inside a comment) and -Wtrigraphs: none may fire."""
    from netcompiler.build import compile_rendered, default_flags

    flags = default_flags() + ["-Werror"]
    rendered = render(check_text(SPEC, f"/tmp/{hostile}/tiny.yaml"), "float32", flags + [hostile])
    assert compile_rendered(rendered, out_dir=tmp_path, flags=flags).so_path.stat().st_size > 0
