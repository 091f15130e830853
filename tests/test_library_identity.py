"""Every loaded library is the one built for that network and dtype, also when two builds
share an output directory (dlopen of one path twice returns the library loaded first)."""
import numpy as np
import torch

import netcompiler as nc
from netcompiler.build import compile_rendered
from netcompiler.check import check_text
from netcompiler.render import render

from conftest import assert_close, reference_model


def spec(width: int) -> str:
    return f"""
name: same
input: [1, 4, 4]
layers:
  - flatten
  - linear: {{out_features: {width}}}
  - relu
  - linear: {{out_features: 3}}
loss: cross_entropy
"""


def torch_outputs(net, text, x):
    model = reference_model(net, text).eval()
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float64)).numpy()


def test_two_networks_with_one_name_in_one_out_dir(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 1, 4, 4))
    a = nc.compile(check_text(spec(8), "a.yaml"), dtype="float64", threads=1, out_dir=tmp_path)
    b = nc.compile(check_text(spec(32), "b.yaml"), dtype="float64", threads=1, out_dir=tmp_path)
    assert (tmp_path / "same.so").exists()  # the artefact a user sees keeps its name
    for net, text in ((a, spec(8)), (b, spec(32)), (a, spec(8))):
        assert_close(net.forward(x), torch_outputs(net, text, x), 1e-12, "outputs")
        net.train_step(x, np.array([0, 1, 2, 0, 1]))  # the larger buffers of b, used through a's library: a crash


def test_one_spec_as_float32_then_float64_in_one_out_dir(tmp_path):
    text = spec(16)
    x = np.random.default_rng(1).normal(size=(3, 1, 4, 4))
    f32 = nc.compile(check_text(text, "s.yaml"), dtype="float32", threads=1, out_dir=tmp_path)
    f64 = nc.compile(check_text(text, "s.yaml"), dtype="float64", threads=1, out_dir=tmp_path)
    assert_close(f64.forward(x), torch_outputs(f64, text, x), 1e-12, "float64 outputs")
    assert_close(f32.forward(x.astype(np.float32)), torch_outputs(f32, text, x), 1e-5, "float32 outputs")


def test_a_rebuild_leaves_one_loadable_copy(tmp_path):
    """The content-named copies are cleaned when the directory's build changes."""
    for width in (8, 16, 8):
        compile_rendered(render(check_text(spec(width), "s.yaml")), out_dir=tmp_path)
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".so") and p.name != "same.so")
    assert len(hidden) == 1, hidden
