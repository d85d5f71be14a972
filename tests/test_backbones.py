"""Backbones: torchvision parity, weight loading from every kind of source, geometry (stride/offset)."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet50_Weights, VGG16_Weights

from wsl.errors import CheckpointError
from wsl.models import BACKBONES, build_classifier, classifier_checkpoint
from wsl.models.backbones import VGGBackbone
from wsl.utils.io import save_checkpoint


@pytest.fixture(scope="module")
def tv_vgg16(tmp_path_factory):
    """torchvision VGG16 with random weights, and its state dict saved as a .pth file."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None, init_weights=False).eval()
    path = tmp_path_factory.mktemp("weights") / "vgg16_random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_vgg16_matches_torchvision_logits(tv_vgg16):
    ref, path = tv_vgg16
    model = BACKBONES.build("vgg16", weights=str(path), imagenet_head=True).eval()
    assert (model.out_channels, model.stride, model.offset) == (1000, 32, 111.5)  # 111.5 = centre of 224 px
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        dense = model(x)
        expected = ref(x)
    assert dense.shape == (2, 1000, 1, 1)
    assert (dense.flatten(1) - expected).abs().max().item() < 1e-4
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 288)).shape == (1, 1000, 2, 3)  # larger input: dense map
        with pytest.raises(ValueError, match="at least 224 px"):
            model(torch.randn(1, 3, 96, 96))


def test_torchvision_enum_and_names_use_the_enums_loader(tv_vgg16, monkeypatch):
    ref, _ = tv_vgg16
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):  # stands in for the download
        calls.append((self, kwargs))
        return ref.state_dict()

    monkeypatch.setattr(VGG16_Weights, "get_state_dict", fake_get_state_dict)
    for weights in (VGG16_Weights.IMAGENET1K_V1, "IMAGENET1K_V1", "VGG16_Weights.IMAGENET1K_V1"):
        model = BACKBONES.build("vgg16_conv5", weights=weights)
        torch.testing.assert_close(model.features[28].weight, ref.features[28].weight)  # conv5_3
    assert [c[0] for c in calls] == [VGG16_Weights.IMAGENET1K_V1] * 3
    assert all(c[1].get("weights_only") is True for c in calls)

    # Dilated variant: the same fc6 weights, reshaped to 7x7 kernels and dilated.
    atrous = BACKBONES.build("vgg16_atrous", weights="IMAGENET1K_V1", output_stride=16).eval()
    torch.testing.assert_close(atrous.fc.fc6.weight, ref.classifier[0].weight.reshape(4096, 512, 7, 7))
    torch.testing.assert_close(atrous.fc.fc7.weight.flatten(1), ref.classifier[3].weight)
    assert atrous.fc.fc6.dilation == (2, 2) and (atrous.stride, atrous.offset) == (16, 7.5)
    with torch.no_grad():
        assert atrous(torch.randn(1, 3, 48, 48)).shape == (1, 4096, 3, 3)


def test_weights_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET22K'.*IMAGENET1K_V1"):
        BACKBONES.build("vgg16_conv5", weights="IMAGENET22K")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        BACKBONES.build("vgg16_conv5", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="VGG16_Weights"):
        BACKBONES.build("vgg16_conv5", weights=ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="no named torchvision weights"):
        BACKBONES.build("vgg_tiny", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'; known: .*vgg16"):
        BACKBONES.build("vgg19")
    with pytest.raises(ValueError, match="output_stride=4"):
        BACKBONES.build("vgg_tiny", output_stride=4)


def test_weights_from_wsl_checkpoint_and_mismatch_refused(tmp_path):
    clf = build_classifier(backbone="vgg_tiny", num_classes=3)
    path = tmp_path / "clf.pt"
    save_checkpoint(path, classifier_checkpoint(clf, ["a", "b", "c"]))
    backbone = BACKBONES.build("vgg_tiny", weights=path)
    for name, tensor in clf.backbone.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], tensor)
    with pytest.raises(CheckpointError, match="clf.pt \\(wsl.classifier, 'vgg_tiny'\\): weights lack"):
        BACKBONES.build("vgg16_conv5", weights=path)
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "note": "not weights"}, junk)
    with pytest.raises(CheckpointError, match="not a state dict"):
        BACKBONES.build("vgg_tiny", weights=junk)


def test_resnet_loads_a_torchvision_state_dict(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = BACKBONES.build("resnet18", weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = nn.Sequential(*list(ref.eval().children())[:-2])  # torchvision minus avgpool/fc
        torch.testing.assert_close(model(x), trunk(x))


# Every registered backbone on a small input: (name, kwargs, size, expected stride, offset).
CASES = [
    ("vgg16_conv5", {}, 64, 16, 7.5),
    ("vgg_tiny", {}, 64, 8, 3.5),
    ("vgg_tiny", {"output_stride": 16}, 64, 16, 7.5),
    ("resnet18", {}, 64, 32, 0.0),
    ("resnet50", {}, 64, 32, 0.0),
    ("resnet50", {"output_stride": 8}, 64, 8, 0.0),
]


def test_every_backbone_is_covered():
    # vgg16 and vgg16_atrous run in the torchvision tests above (their fc6 is too big to build twice)
    assert {c[0] for c in CASES} | {"vgg16", "vgg16_atrous"} == set(BACKBONES.names())


@pytest.mark.parametrize("name,kwargs,size,stride,offset", CASES)
def test_backbone_shapes_and_geometry(name, kwargs, size, stride, offset):
    model = BACKBONES.build(name, **kwargs).eval()
    assert (model.stride, model.offset) == (stride, offset)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        taps = model.forward_taps(x, list(model.taps))
    assert taps["out"].shape == (2, model.out_channels, size // stride, size // stride)
    for tap_name, tap in model.taps.items():
        assert taps[tap_name].shape == (2, tap.channels, size // tap.stride, size // tap.stride)
    with pytest.raises(ValueError, match="no tap"):
        model.forward_taps(x, ["pool9"])


def _linearised(model: nn.Module) -> nn.Module:
    """Same geometry, but symmetric: max pools -> average pools, constant positive conv weights,
    identity BatchNorm, so an interior cell's input gradient is centred on its receptive field."""
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return model


@pytest.mark.parametrize("model", [
    BACKBONES.build("vgg_tiny"),
    BACKBONES.build("vgg_tiny", output_stride=16),
    # the VGG16 family's structure at narrow width: unpadded 7x7 fc6, and the dilated DeepLab layout
    VGGBackbone(cfg=(4, "M", 4, "M", 4, "M"), fc_channels=4, fc6_kernel=7, fc6_padding="valid"),
    VGGBackbone(cfg=(4, "M", 4, "M", 4, "M", 4, "M", 4, "M"), fc_channels=4, fc6_kernel=3, output_stride=8),
], ids=["vgg_tiny", "vgg_tiny_os16", "vgg16_like", "vgg16_atrous_like"])
def test_offset_is_the_receptive_field_centre(model):
    net = _linearised(model)
    x = torch.ones(1, 3, 224, 224, requires_grad=True)
    out = net(x)
    i, j = out.shape[2] // 2, out.shape[3] // 2 - 1  # interior cells, receptive field inside the image
    out[0, :, i, j].sum().backward()
    g = x.grad[0].sum(0)
    assert g[0].abs().sum() == 0 and g[:, 0].abs().sum() == 0  # the field is not clipped by the border
    ys, xs = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    centre_y, centre_x = (g * ys).sum() / g.sum(), (g * xs).sum() / g.sum()
    assert centre_y.item() == pytest.approx(model.offset + model.stride * i, abs=1e-3)
    assert centre_x.item() == pytest.approx(model.offset + model.stride * j, abs=1e-3)


def test_vgg_tiny_channels_last_matches_contiguous():
    model = BACKBONES.build("vgg_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
