"""specs/fashion_resnet.yaml: the architecture is the residual network a hand-written PyTorch
model describes (parameter count, state_dict names and shapes, the same function), and
netc check / netc verify are clean."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_twin_computes
from netcompiler.check import load

torch = pytest.importorskip("torch")
nn = torch.nn

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "fashion_resnet.yaml"


class Basic(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class Down(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride=2, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class FashionResNet(nn.Module):
    """1x28x28 -> stem conv 32 + max pool to 14x14 -> one basic block of 32 -> a halving block
    to 64x7x7 and one basic block of 64 -> a halving block to 128x4x4 -> global average pool
    -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.layer1 = nn.Sequential(Basic(32))
        self.layer2 = nn.Sequential(Down(32, 64), Basic(64))
        self.layer3 = nn.Sequential(Down(64, 128))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_fashion_resnet_is_the_hand_written_model():
    net = load(SPEC)
    ref = FashionResNet()
    assert net.total_params == sum(p.numel() for p in ref.parameters()) == 382_058
    sd = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = {**net.param_shapes(), **net.buffer_shapes()}
    assert set(ours) == set(sd) and all(ours[k] == sd[k] for k in sd)
    for m in ref.modules():  # non-trivial batch-norm statistics, so eval mode tests them too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    assert_twin_computes(net, ref, (1, 28, 28), samples=3)


def test_fashion_resnet_checks_clean():
    out = subprocess.run([sys.executable, "-m", "netcompiler", "check", str(SPEC)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "fashion_resnet.yaml: ok (fashion_resnet: 1x28x28 -> 10, 382,058 parameters)" in out.stdout


@pytest.mark.slow
def test_fashion_resnet_verifies():
    out = subprocess.run([sys.executable, "-m", "netcompiler", "verify", str(SPEC), "--batch-size", "2",
                          "--samples", "2"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "verify: ok" in out.stdout
