"""`netc eval --perturb`: each perturbation does what it says, seeded; eval shows clean and
perturbed accuracy side by side."""
from __future__ import annotations

import json

import numpy as np
import pytest

from netcompiler.cli import main
from netcompiler.perturb import parse_perturb, perturb
from netcompiler.train import train
from test_train import make_case, options


def images(n=20, h=8, w=9, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w)).astype(np.uint8)


def test_shift_moves_the_image_and_brings_in_black():
    x = images()
    got = perturb(x, [("shift", 2)], seed=1)
    f = x / 255
    moved = 0
    for i in range(len(x)):
        match = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                want = np.zeros_like(f[i])
                for r in range(8):
                    for c in range(9):
                        if 0 <= r - dy < 8 and 0 <= c - dx < 9:
                            want[r, c] = f[i][r - dy, c - dx]
                match.append(np.array_equal(got[i], want))
        assert sum(match) == 1, i
        moved += not match[12]  # index 12: dy = dx = 0
    assert moved > 10


def test_flip_inverts_exactly_k_pixels():
    x = images()
    got = perturb(x, [("flip", 5)], seed=2)
    f = x / 255
    diff = ~np.isclose(got, f)
    assert (diff.reshape(len(x), -1).sum(axis=1) <= 5).all() and diff.sum() > 5 * len(x) - 3  # p = 0.5 stays
    assert np.allclose(got[diff], 1 - f[diff])


def test_noise_rotate_contrast():
    x = np.full((200, 8, 8), 128, np.uint8)
    n = perturb(x, [("noise", 0.1)], seed=3)
    assert abs(float((n - 128 / 255).std()) - 0.1) < 0.01 and n.min() >= 0 and n.max() <= 1
    sq = images(4, 7, 7)
    # a 90-degree range: every angle maps the centre to itself, and rotate=0 is the identity
    assert np.array_equal(perturb(sq, [("rotate", 0)]), sq / 255)
    r = perturb(sq, [("rotate", 30)], seed=4)
    assert np.allclose(r[:, 3, 3], sq[:, 3, 3] / 255) and not np.allclose(r, sq / 255)
    c = perturb(sq, [("contrast", 0.5)], seed=5)
    f = sq / 255
    m = f.mean(axis=(1, 2), keepdims=True)
    ratio = (c - m) / np.where(abs(f - m) > 1e-9, f - m, 1)
    inside = (c > 0) & (c < 1) & (abs(f - m) > 1e-3)
    for i in range(4):  # one factor per image, in [0.5, 1.5]
        k = ratio[i][inside[i]]
        assert np.allclose(k, k[0]) and 0.5 <= k[0] <= 1.5


def test_seeded():
    x = images()
    spec = parse_perturb("shift=2,flip=5,noise=0.1,rotate=10,contrast=0.5")
    assert np.array_equal(perturb(x, spec, 7), perturb(x, spec, 7))
    assert not np.array_equal(perturb(x, spec, 7), perturb(x, spec, 8))


@pytest.mark.parametrize("bad, message", [("blur=1", "unknown perturbation 'blur'"), ("shift=a", "needs an integer"),
                                          ("contrast=2", "contrast must be in [0, 1]")])
def test_bad_perturbations(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_perturb(bad)


def test_eval_shows_clean_and_perturbed(tmp_path, capsys):
    spec_, data = make_case(tmp_path)
    train(options(spec_, data, tmp_path / "r"))
    w = str(tmp_path / "r" / "weights.npz")
    capsys.readouterr()
    assert main(["eval", spec_, w, "--data", data, "--perturb", "shift=3,flip=20", "--format", "json"]) == 0
    m = json.loads(capsys.readouterr().out)
    p = m["perturbed"]
    assert p["perturb"] == "shift=3,flip=20" and p["seed"] == 0
    assert m["accuracy"] > 0.9 and p["accuracy"] < m["accuracy"]  # quadrants moved by 3 of 8 pixels
    assert main(["eval", spec_, w, "--data", data, "--perturb", "shift=0"]) == 0
    out = capsys.readouterr().out
    clean = f"accuracy {100 * m['accuracy']:.2f}%"
    assert f"perturbed (shift=0, seed 0): loss {m['loss']:.4f}  {clean}" in out  # nothing moved
    with pytest.raises(SystemExit) as exc:  # a usage error
        main(["eval", spec_, w, "--data", data, "--perturb", "blur=1"])
    assert exc.value.code == 2
    assert "unknown perturbation 'blur'" in capsys.readouterr().err
