"""DeepLab v2 ASPP and v3+: structure against the papers, geometry, receptive margins, weights, checkpoints."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from wsl.models import build_backbone, build_segmenter, load_segmenter, maps_to_pixels, segmenter_checkpoint
from wsl.models.backbones import Backbone, Tap
from wsl.models.segmentation import DeepLabASPP, DeepLabV3Plus
from wsl.models.segmentation.deeplab import deeplabv3plus_resnet50
from wsl.models import BACKBONES
from wsl.utils.io import save_checkpoint


def _dilations(convs):
    return [conv.dilation[0] for conv in convs]


def test_aspp_on_vgg16_is_the_papers_aspp_l():
    torch.manual_seed(0)
    net = build_segmenter("deeplab_aspp", num_classes=21).net
    assert isinstance(net, DeepLabASPP) and net.backbone.stride == 8 and net.backbone.fc is None
    assert net.rates == (6, 12, 18, 24) and _dilations(b[0] for b in net.branches) == [6, 12, 18, 24]
    for branch in net.branches:  # fc6 3x3 dilated, 1024 wide -> fc7 1x1 -> fc8 1x1 to the classes
        fc6, fc7, fc8 = (m for m in branch if isinstance(m, nn.Conv2d))
        assert fc6.kernel_size == (3, 3) and fc6.padding == fc6.dilation and fc6.out_channels == 1024
        assert fc7.kernel_size == (1, 1) and fc7.out_channels == 1024 and fc8.out_channels == 21
    out = net(torch.randn(1, 3, 33, 41))["out"]
    assert out.shape == (1, 21, 33, 41) and torch.isfinite(out).all()


def test_aspp_tiny_and_resnet_forms():
    tiny = build_segmenter("deeplab_aspp", num_classes=3, backbone="vgg_tiny").net
    assert tiny.rates == (2, 4, 6, 8) and tiny.branches[0][0].out_channels == 256
    # ResNet: one 3x3 conv per branch straight to the classes, as the paper's ResNet-101 model
    res = build_segmenter("deeplab_aspp", num_classes=3, backbone="resnet18", rates=[3, 5]).net
    assert res.backbone.stride == 8 and res.rates == (3, 5)
    assert [len(b) for b in res.branches] == [1, 1]
    assert [(b[0].kernel_size, b[0].dilation, b[0].out_channels) for b in res.branches] == [
        ((3, 3), (3, 3), 3), ((3, 3), (5, 5), 3)]


def test_aspp_sums_its_branches():
    torch.manual_seed(0)
    net = build_segmenter("deeplab_aspp", num_classes=3, backbone="vgg_tiny", rates=(2, 4, 6)).net.eval()
    x = torch.randn(1, 3, 45, 51)
    with torch.no_grad():
        feats = net.backbone(x)
        per_branch = [maps_to_pixels(b(feats), x.shape[-2:], stride=8, offset=net.offset) for b in net.branches]
        torch.testing.assert_close(net(x)["out"], sum(per_branch))
        for branch in net.branches[1:]:  # only branch 0 left: the output is its logits alone
            branch[-1].weight.zero_()
            branch[-1].bias.zero_()
        torch.testing.assert_close(net(x)["out"], per_branch[0])


def test_v3plus_on_resnet50_is_the_papers_design():
    torch.manual_seed(0)
    net = build_segmenter("deeplabv3plus_resnet50", num_classes=21).net
    assert isinstance(net, DeepLabV3Plus) and isinstance(net.aspp, ASPP)
    assert net.backbone.stride == 16 and net.low_level == "layer1" and net.backbone.taps["layer1"].stride == 4
    assert _dilations(c[0] for c in net.aspp.convs[1:-1]) == [6, 12, 18]
    assert net.aspp.convs[0][0].in_channels == 2048 and net.aspp.project[0].out_channels == 256
    assert net.reduce[0].in_channels == 256 and net.reduce[0].out_channels == 48
    convs = [m for m in net.decoder if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(304, 256, (3, 3)), (256, 256, (3, 3))]
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 37, 45))["out"]
    assert out.shape == (1, 21, 37, 45) and torch.isfinite(out).all()


def test_v3plus_output_stride_8_doubles_the_rates():
    for backbone, rates16 in (("resnet18", [6, 12, 18]), ("vgg_tiny", [1, 3, 4])):
        for stride, factor in ((16, 1), (8, 2)):
            net = build_segmenter("deeplabv3plus", num_classes=3, backbone=backbone,
                                  output_stride=stride).net
            assert net.backbone.stride == stride
            assert _dilations(c[0] for c in net.aspp.convs[1:-1]) == [r * factor for r in rates16]
    net = build_segmenter("deeplabv3plus", num_classes=3, backbone="resnet18", output_stride=8,
                          rates=[2, 4]).net
    assert net.rates == (2, 4)  # explicit rates are used as given


class _Ramp(nn.Module):
    """Stands in for the ASPP: channel 0 holds each cell's row, channel 1 its column."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def forward(self, f):
        n, _, h, w = f.shape
        i, j = torch.meshgrid(torch.arange(h, dtype=f.dtype), torch.arange(w, dtype=f.dtype), indexing="ij")
        ramp = torch.stack([i, j]).expand(n, 2, h, w)
        return torch.cat([ramp, torch.zeros(n, self.channels - 2, h, w)], dim=1)


@pytest.mark.parametrize("backbone", ["vgg_tiny", "resnet18"])
def test_v3plus_decoder_concatenates_aligned_features(backbone):
    torch.manual_seed(0)
    net = build_segmenter("deeplabv3plus", num_classes=3, backbone=backbone).net.eval()
    aspp_channels, low_channels = net.aspp.project[0].out_channels, net.reduce[0].out_channels
    assert (aspp_channels, low_channels) == ({"vgg_tiny": (64, 12), "resnet18": (256, 48)}[backbone])
    net.aspp = _Ramp(aspp_channels)
    seen = []
    handle = net.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            x = torch.randn(1, 3, 37, 53)
            feats = net.backbone.forward_taps(x, [net.low_level])
            net(x)
    finally:
        handle.remove()
    (cat,) = seen
    low, out = feats[net.low_level], feats["out"]
    assert cat.shape == (1, aspp_channels + low_channels, *low.shape[-2:])
    torch.testing.assert_close(cat[:, aspp_channels:], net.reduce(low))
    # stride-4 cell p sits on pixel o4 + 4p and reads the coarse map at (o4 + 4p - o) / s, border held
    tap, s, o = net.backbone.taps[net.low_level], net.backbone.stride, net.backbone.offset
    rows = ((tap.offset + 4 * torch.arange(low.shape[-2]) - o) / s).clamp(0, out.shape[-2] - 1)
    cols = ((tap.offset + 4 * torch.arange(low.shape[-1]) - o) / s).clamp(0, out.shape[-1] - 1)
    torch.testing.assert_close(cat[0, 0, :, 0], rows.float())
    torch.testing.assert_close(cat[0, 1, 0, :], cols.float())


# Each new input shape costs a ResNet some 0.5 s of one-off kernel set-up on the CPU: one size each.
@pytest.mark.parametrize("name,options,sizes", [
    ("deeplab_aspp", {"backbone": "vgg_tiny"}, [(37, 53), (21, 17)]),
    ("deeplab_aspp", {"backbone": "resnet18", "rates": [2, 4]}, [(37, 53)]),
    ("deeplabv3plus", {"backbone": "vgg_tiny"}, [(37, 53), (17, 21)]),
    ("deeplabv3plus", {"backbone": "vgg_tiny", "output_stride": 8}, [(37, 53), (9, 13)]),
    ("deeplabv3plus", {"backbone": "resnet18", "output_stride": 8}, [(21, 17)]),
])
def test_logits_at_any_input_size_and_gradients_reach_the_first_conv(name, options, sizes):
    torch.manual_seed(0)
    model = build_segmenter(name, num_classes=4, **options)
    for h, w in sizes:
        out = model(torch.randn(2, 3, h, w))["out"]
        assert out.shape == (2, 4, h, w) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    first = next(m for m in model.net.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,options,size", [
    ("deeplab_largefov", {"backbone": "vgg_tiny"}, 180),
    ("deeplab_aspp", {"backbone": "vgg_tiny"}, 240),
    ("deeplabv3plus", {"backbone": "vgg_tiny"}, 300),
])
def test_receptive_margin_bounds_what_a_pixel_sees(name, options, size):
    torch.manual_seed(0)
    model = build_segmenter(name, num_classes=3, **options).eval()
    margin = model.net.receptive_margin
    assert isinstance(margin, int) and 2 * margin < size
    if name.startswith("deeplabv3plus"):
        nn.init.zeros_(model.net.aspp.convs[-1][1].weight)  # image pooling sees everything: switch it off
    x = torch.randn(1, 3, size, 32, requires_grad=True)  # tall and thin: the field is measured along y
    c = size // 2
    model(x)["out"][0, 1, c, 16].backward()
    reach = (torch.nonzero(x.grad.abs().sum((0, 1, 3))) - c).abs().max().item()
    assert 0.8 * margin < reach <= margin  # an upper bound, and not a loose one on these nets


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_resnet18_is_the_a_trous_resnet18(output_stride):
    """The dilated trunk sampled every 32/output_stride cells is the plain trunk (same weights)."""
    torch.manual_seed(0)
    plain = build_backbone("resnet18").eval()
    dilated = BACKBONES.build("resnet18", output_stride=output_stride).eval()
    dilated.load_state_dict(plain.state_dict())
    assert dilated.stride == output_stride and dilated.taps["layer1"] == plain.taps["layer1"]
    k = 32 // output_stride
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(dilated(x)[..., ::k, ::k], plain(x))


def test_backbone_weights_from_a_torchvision_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        ref.bn1.running_mean.uniform_()  # a buffer too, so the check is not on an init value
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)  # a plain torchvision state dict (with its fc.*)
    for name in ("deeplabv3plus", "deeplab_aspp"):
        trunk = build_segmenter(name, num_classes=3, backbone="resnet18", backbone_weights=path).net.backbone
        torch.testing.assert_close(trunk.conv1.weight, ref.conv1.weight)
        torch.testing.assert_close(trunk.bn1.running_mean, ref.bn1.running_mean)
        torch.testing.assert_close(trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


@pytest.mark.parametrize("name,options", [
    ("deeplab_aspp", {"backbone": "vgg_tiny", "rates": [2, 5]}),
    ("deeplabv3plus", {"backbone": "vgg_tiny", "output_stride": 8}),
])
def test_checkpoint_round_trip(tmp_path, name, options):
    torch.manual_seed(0)
    model = build_segmenter(name, num_classes=3, **options)
    model(torch.randn(2, 3, 40, 40))  # BatchNorm running statistics away from their init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "seg.pt"
    save_checkpoint(path, segmenter_checkpoint(model, ["a", "b"], epoch=1))
    loaded, classes = load_segmenter(path, expect_classes=["a", "b"], expect_config={"name": name})
    assert classes == ["a", "b"] and loaded.config == model.config
    assert loaded.net.receptive_margin == model.net.receptive_margin
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)["out"], model.eval()(x)["out"])


class _NoStride4(Backbone):
    out_channels, stride, offset = 8, 8, 3.5
    taps = {"pool3": Tap(8, 8, 3.5)}


def test_bad_options_name_the_value():
    cases = [
        (dict(name="deeplab_aspp", backbone="resnet101"), "deeplab_aspp supports backbones .*got 'resnet101'"),
        (dict(name="deeplab_aspp", backbone="vgg_tiny", rates=[]), r"rates must be .*got \[\]"),
        (dict(name="deeplab_aspp", backbone="vgg_tiny", rates=[6, 0]), r"got \[6, 0\]"),
        (dict(name="deeplab_aspp", backbone="vgg_tiny", rates="6"), "got '6'"),
        (dict(name="deeplab_aspp", backbone="vgg_tiny", rates=[1.5]), r"got \[1.5\]"),
        (dict(name="deeplab_aspp", backbone="vgg_tiny", fc_channels=-1), "fc_channels must be .*got -1"),
        (dict(name="deeplabv3plus", backbone="vgg_tiny", output_stride=32),
         "output_stride must be 8 or 16, got 32"),
        (dict(name="deeplabv3plus", output_stride=4), "got 4"),
        (dict(name="deeplabv3plus", backbone="mobilenet"), "supports backbones .*got 'mobilenet'"),
        (dict(name="deeplabv3plus", backbone="vgg_tiny", aspp_channels=0), "aspp_channels .*got 0"),
        (dict(name="deeplabv3plus", backbone="vgg_tiny", low_level_channels=True), "low_level_channels"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            build_segmenter(options.pop("name"), num_classes=3, **options)
    with pytest.raises(ValueError, match="deeplabv3plus_resnet50 is DeepLab v3\\+ on resnet50 only, got "
                                         "backbone='vgg_tiny'; use deeplabv3plus"):
        deeplabv3plus_resnet50(num_classes=3, backbone="vgg_tiny")
    with pytest.raises(ValueError, match=r"stride-4 map .*pool3 \(stride 8\)"):
        DeepLabV3Plus(_NoStride4(), 3)


def test_checkpoint_of_deeplabv3plus_resnet50_on_another_backbone_loads_as_deeplabv3plus(tmp_path, caplog):
    """Before issue 14 deeplabv3plus_resnet50 took any backbone: such checkpoints (and configs) still load,
    under the family's name."""
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", num_classes=3, backbone="vgg_tiny")
    ckpt = segmenter_checkpoint(model, ["a", "b"])
    ckpt["config"] = {**ckpt["config"], "name": "deeplabv3plus_resnet50"}  # as written before the rename
    save_checkpoint(tmp_path / "old.pt", ckpt)
    loaded, _ = load_segmenter(tmp_path / "old.pt")
    assert loaded.config.name == "deeplabv3plus" and "now called deeplabv3plus" in caplog.text
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)["out"], model.eval()(x)["out"])
