"""--data as an image folder (DIR/CLASS/*.png|jpg, or DIR/train and DIR/test) and as .npy pairs."""
from __future__ import annotations

import numpy as np
import pytest

from netcompiler.data import load_dataset
from netcompiler.errors import DataError

Image = pytest.importorskip("PIL.Image")


def write_folder(root, classes, n, size=(6, 5), mode="L", seed=0, suffix=".png"):
    rng = np.random.default_rng(seed)
    truth = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            a = rng.integers(0, 256, shape).astype(np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i:03d}{suffix}")
            truth[(c, i)] = a
    return truth


def test_class_folders_are_the_training_set(tmp_path):
    truth = write_folder(tmp_path / "d", ["dog", "cat"], 3)
    ds = load_dataset(str(tmp_path / "d"))
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2  # sorted, as ImageFolder
    assert ds.train_x.shape == (6, 5, 6) and ds.train_x.dtype == np.uint8 and len(ds.test_x) == 0
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(ds.train_x[4], truth[("dog", 1)])


def test_train_and_test_folders_rgb(tmp_path):
    write_folder(tmp_path / "d" / "train", ["a", "b", "c"], 2, mode="RGB")
    truth = write_folder(tmp_path / "d" / "test", ["a", "c"], 1, mode="RGB", seed=1)
    ds = load_dataset(str(tmp_path / "d"))
    assert ds.train_x.shape == (6, 3, 5, 6) and ds.test_x.shape == (2, 3, 5, 6)
    assert ds.test_y.tolist() == [0, 2]  # labels by the training classes
    assert np.array_equal(ds.test_x[1], truth[("c", 0)].transpose(2, 0, 1))


def test_folder_images_of_different_sizes_are_an_error(tmp_path):
    write_folder(tmp_path / "d", ["a"], 1)
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "d" / "a" / "big.png")
    with pytest.raises(DataError, match="images differ in size"):
        load_dataset(str(tmp_path / "d"))


def test_npy_pairs(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (10, 4, 4)).astype(np.uint8), rng.integers(0, 3, 10)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for src in (tmp_path, tmp_path / "x.npy"):
        ds = load_dataset(str(src))
        assert np.array_equal(ds.train_x, x) and np.array_equal(ds.train_y, y) and len(ds.test_x) == 0
    np.save(tmp_path / "x_test.npy", x[:3])
    with pytest.raises(DataError, match="x_test.npy but not its pair"):
        load_dataset(str(tmp_path))
    np.save(tmp_path / "y_test.npy", y[:3])
    assert np.array_equal(load_dataset(str(tmp_path)).test_y, y[:3])


def test_train_on_an_image_folder(tmp_path):
    from netcompiler.train import TrainOptions, train

    write_folder(tmp_path / "d" / "train", ["a", "b"], 8, size=(8, 8))
    write_folder(tmp_path / "d" / "test", ["a", "b"], 2, size=(8, 8), seed=3)
    (tmp_path / "s.yaml").write_text("name: f\ninput: [1, 8, 8]\nlayers:\n  - flatten\n  - linear: {out_features: 2}\n"
                                     "loss: cross_entropy\n")
    r = train(TrainOptions(spec=str(tmp_path / "s.yaml"), data=str(tmp_path / "d"), out=str(tmp_path / "r"),
                           epochs=1, threads=1))
    assert len(r["history"]) == 1
