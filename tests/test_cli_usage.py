"""The argument parser: mistyped commands and options, and the help of every argument."""
from __future__ import annotations

import argparse

import pytest

from netcompiler.cli import build_parser, main


def usage_error(capsys, *argv: str) -> tuple[list[str], str]:
    """-> (stderr lines, the error line) of a command line argparse refuses (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.rstrip("\n").splitlines()
    return lines, lines[-1]


@pytest.mark.parametrize("argv, error", [
    (["train", "specs/lenet5.yaml", "--data", "fashion-mnist", "--learning-rate", "0.1"],
     "netc train: error: unrecognized option '--learning-rate' (did you mean '--lr'?)"),
    (["train", "specs/lenet5.yaml", "--data", "fashion-mnist", "--learning_rate=0.1"],
     "netc train: error: unrecognized option '--learning_rate' (did you mean '--lr'?)"),
    (["train", "specs/lenet5.yaml", "--data", "fashion-mnist", "--batchsize", "8"],
     "netc train: error: unrecognized option '--batchsize' (did you mean '--batch-size'?)"),
    # a missing required option (--data) does not hide the misspelt one
    (["train", "specs/lenet5.yaml", "--batchsize", "8"],
     "netc train: error: unrecognized option '--batchsize' (did you mean '--batch-size'?)"),
    (["check", "--quite", "specs/lenet5.yaml"],
     "netc check: error: unrecognized option '--quite' (did you mean '--quiet'?)"),
    (["eval", "s.yaml", "w.npz", "--data", "d", "--zzz", "2", "--splt", "train"],
     "netc eval: error: unrecognized options '--zzz', '--splt' (did you mean '--split'?)"),
])
def test_unknown_option_gets_the_command_usage_and_a_suggestion(capsys, argv, error):
    lines, last = usage_error(capsys, *argv)
    assert last == error
    assert lines[0].startswith(f"usage: netc {argv[0]} ")  # the command's usage, not netc's
    assert sum("error:" in l for l in lines) == 1


def test_misspelt_command(capsys):
    lines, last = usage_error(capsys, "trian", "specs/lenet5.yaml")
    assert last.startswith("netc: error: unknown command 'trian' (did you mean 'train'?); commands: check, report")
    lines, last = usage_error(capsys, "frobnicate")
    assert "did you mean" not in last and "commands: check, report, build" in last


def test_valid_command_lines_still_parse():
    p = build_parser()
    a = p.parse_args(["train", "s.yaml", "--data", "d", "--batch", "8", "--lr=.5", "--seed", "0", "--no-prog"])
    assert (a.batch_size, a.lr, a.no_progress) == (8, 0.5, True)  # unique prefixes are argparse's abbreviations
    a = p.parse_args(["verify", "s.yaml", "--seed", "-3"])  # a negative number is a value, not an option
    assert a.seed == -3
    a = p.parse_args(["build", "-obuild/x", "s.yaml", "--cflags", "-O2 -g"])
    assert (a.out, a.cflags) == ("build/x", "-O2 -g")
    a = p.parse_args(["predict", "s.yaml", "w.npz", "-", "--top", "2"])
    assert a.files == ["-"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_argument_of_every_command_has_help():
    top = build_parser()
    commands = _subparsers(top)
    assert {"check", "report", "build", "show", "verify", "train", "eval", "predict"} <= set(commands)
    commands["netc"] = top
    missing = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
               for name, p in commands.items() for a in p._actions if not (a.help or "").strip()]
    assert missing == []


def test_optimizer_help_says_what_each_optimizer_is(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{sgd,momentum,adam,adamw}" in text
    assert "sgd: torch.optim.SGD without momentum" in text
    assert "adam and adamw: two names of one optimizer, torch.optim.AdamW" in text
    assert "not torch.optim.Adam" in text


def test_normalisation_is_explained_once(capsys):
    texts = {}
    for name in _subparsers(build_parser()):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        texts[name] = " ".join(capsys.readouterr().out.split())
    paragraph = "inputs are pixels/255 (uint8 images), then (x - mean) / std"
    assert [n for n, t in texts.items() if paragraph in t] == ["train"]
    assert "'__meta__/mean'" in texts["train"] and "normalization.json" in texts["train"]
    for name in ("eval", "predict"):  # the order in which they look for it, and where to read more
        assert "normalised with the mean/std stored inside WEIGHTS, else with those of normalization.json" \
               in texts[name] and "netc train --help" in texts[name]
