"""Well-known architectures through ONNX (slow: minutes of C compilation).

torchvision is not a dependency, so ResNet-18, SqueezeNet 1.1, MobileNetV2 and GoogLeNet
(without its auxiliary heads) are written here as torchvision defines them, with random
weights and batch-norm statistics, exported by torch.onnx.export (batch norm kept), imported
and compiled: float32 forward of two 224x224 images equals PyTorch's (rel 1e-5).  The ONNX
model zoo's "light" models shipped in the onnx package (Caffe2 exports, opset 9) are imported
with random weights in place of their constant fills and compared with ONNX Runtime; the
ones netcompiler cannot express must stop at the node that says why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import assert_close
from test_onnx_graphs import Basic, Fire, export, randomized

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn
F = torch.nn.functional

import netcompiler as nc  # noqa: E402
from netcompiler.onnx_import import OnnxImportError, import_onnx  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                                           "ignore::torch.jit.TracerWarning")]


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Basic(64, 64), Basic(64, 64))
        self.layer2 = nn.Sequential(Basic(64, 128, 2), Basic(128, 128))
        self.layer3 = nn.Sequential(Basic(128, 256, 2), Basic(256, 256))
        self.layer4 = nn.Sequential(Basic(256, 512, 2), Basic(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeNet11(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, 1000, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, eps=1e-5, act=nn.ReLU6):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout, eps=eps), act(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [] if expand == 1 else [ConvBNAct(cin, hidden, 1)]
        self.conv = nn.Sequential(*layers, ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        features, cin = [ConvBNAct(3, 32, stride=2)], 32
        for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                           [6, 160, 3, 2], [6, 320, 1, 1]]:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*features, ConvBNAct(cin, 1280, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1))


def basic_conv(cin, cout, k, stride=1):
    """torchvision's GoogLeNet BasicConv2d: conv (no bias), batch norm (eps 0.001), ReLU."""
    return ConvBNAct(cin, cout, k, stride, eps=0.001, act=nn.ReLU)


class Inception(nn.Module):
    def __init__(self, cin, ch1, ch3r, ch3, ch5r, ch5, pool):
        super().__init__()
        self.branch1 = basic_conv(cin, ch1, 1)
        self.branch2 = nn.Sequential(basic_conv(cin, ch3r, 1), basic_conv(ch3r, ch3, 3))
        self.branch3 = nn.Sequential(basic_conv(cin, ch5r, 1), basic_conv(ch5r, ch5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), basic_conv(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = basic_conv(3, 64, 7, 2)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = basic_conv(64, 64, 1)
        self.conv3 = basic_conv(64, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, 1000)

    def forward(self, x):
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4d(self.inception4c(self.inception4b(self.inception4a(x))))
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


ARCHITECTURES = {"resnet18": ResNet18, "squeezenet1_1": SqueezeNet11, "mobilenet_v2": MobileNetV2,
                 "googlenet": GoogLeNet}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture(name, tmp_path):
    model = randomized(ARCHITECTURES[name]).eval()
    imported = import_onnx(export(model, (3, 224, 224), tmp_path / f"{name}.onnx", torch.float32))
    assert imported.network.total_params == sum(p.numel() for p in model.parameters())
    net = nc.compile(imported.network, dtype="float32", threads=1)
    net.load_state_dict(imported.state)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        assert_close(net.forward(x), model(torch.from_numpy(x)).numpy(), 1e-5, what=name)


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO_IMPORTED = ["resnet50", "vgg19", "squeezenet"]
ZOO_REFUSED = {"bvlc_alexnet": "(LRN", "zfnet512": "(LRN", "inception_v1": "(LRN",
               "densenet121": "(Mul): combines the activations with a constant tensor of shape [64, 1, 1]",
               "inception_v2": "(Mul): combines the activations with a constant tensor of shape [64, 1, 1]",
               "shufflenet": "(Reshape): reshapes a sample of [112, 56, 56] to [4, 28, 56, 56]; flatten"}


def random_weights(path: Path, out: Path) -> Path:
    """The light model with random weights in place of its ConstantOfShape fills (positive
    variances, scales near 1 for batch norm) and without its final Softmax."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    role = {t: i for n in g.node if n.op_type == "BatchNormalization" for i, t in enumerate(n.input)}
    rng = np.random.default_rng(0)
    nodes = []
    for n in g.node:
        if n.op_type != "ConstantOfShape":
            nodes.append(n)
            continue
        shape = tuple(int(d) for d in init[n.input[0]])
        v = (rng.uniform(0.5, 2, shape) if role.get(n.output[0]) == 4 else
             rng.uniform(0.5, 1.5, shape) if role.get(n.output[0]) == 1 else
             rng.standard_normal(shape) * np.sqrt(1 / np.prod(shape[1:])) if len(shape) >= 2 else
             rng.standard_normal(shape) * 0.1)
        g.initializer.append(numpy_helper.from_array(v.astype(np.float32), n.output[0]))
    assert nodes[-1].op_type == "Softmax"
    g.output[0].name = nodes[-1].input[0]
    del g.node[:]
    g.node.extend(nodes[:-1])
    model.ir_version = max(model.ir_version, 4)  # initializers that are not graph inputs
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("name", ZOO_IMPORTED)
def test_zoo_light_model(name, tmp_path):
    path = random_weights(LIGHT / f"light_{name}.onnx", tmp_path / f"{name}.onnx")
    imported = import_onnx(path)
    net = nc.compile(imported.network, dtype="float32", threads=1)
    net.load_state_dict(imported.state)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, *imported.network.input_shape)).astype(np.float32)
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert_close(net.forward(x).reshape(want.shape), want, 1e-5, what=name)


@pytest.mark.parametrize("name", sorted(ZOO_REFUSED))
def test_zoo_light_model_refused(name):
    path = LIGHT / f"light_{name}.onnx"
    with pytest.raises(OnnxImportError) as exc:
        import_onnx(path)
    assert ZOO_REFUSED[name] in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
