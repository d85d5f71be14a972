"""DeconvNet: unpooling at the switches, any input size, gradients, receptive margin, weights, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsl.models import BACKBONES, build_segmenter, load_segmenter, segmenter_checkpoint
from wsl.models.segmentation import DeconvNet
from wsl.utils.io import save_checkpoint

NAMES = ["deconvnet", "deconvnet_shortcut"]


def tiny(name="deconvnet", **kw):
    torch.manual_seed(0)
    return build_segmenter(name, num_classes=3, backbone="vgg_tiny", **kw)


def deconvs(seq):
    return [(m.in_channels, m.out_channels) for m in seq if isinstance(m, torch.nn.ConvTranspose2d)]


def test_unpooling_puts_maxima_back_at_their_switches():
    unpool = tiny().net.unpool[0]  # the model's own 2x2 unpooling
    x = torch.tensor([[1., 5., 2., 0., 6.],
                      [3., 4., 9., 1., 2.],
                      [0., 2., 1., 1., 0.],
                      [7., 1., 3., 8., 4.],
                      [9., 9., 9., 9., 9.]]).view(1, 1, 5, 5)  # odd size: the last row/column are never pooled
    pooled, idx = F.max_pool2d(x, 2, return_indices=True)
    assert pooled.view(-1).tolist() == [5., 9., 7., 8.] and idx.view(-1).tolist() == [1, 7, 15, 18]
    out = unpool(pooled, idx, output_size=x.shape[-2:])
    expected = torch.zeros(5, 5)
    expected[0, 1], expected[1, 2], expected[3, 0], expected[3, 3] = 5., 9., 7., 8.
    assert torch.equal(out[0, 0], expected)
    # any values, not only the pooled ones, go to the switch positions
    out = unpool(torch.tensor([[[[-1., 2.], [3., 0.5]]]]), idx, output_size=x.shape[-2:])
    assert out[0, 0, 0, 1] == -1 and out[0, 0, 1, 2] == 2 and out[0, 0, 3, 0] == 3 and out[0, 0, 3, 3] == 0.5
    assert out.count_nonzero() == 4


@pytest.mark.parametrize("name", NAMES)
def test_decoder_unpools_where_the_encoder_took_its_maxima(name):
    net = tiny(name).net.eval()
    x = F.pad(torch.randn(2, 3, 37, 53), (0, 11, 0, 11))  # to the pooling grid, as forward does
    with torch.no_grad():
        features, switches = net.encode(x)
        unpooled = []
        net.decode(features, switches, unpooled=unpooled)
    assert len(switches) == len(unpooled) == 4 and features.shape[-2:] == (3, 4)
    for switch, up in zip(switches, reversed(unpooled)):  # unpooled maps come deepest first
        pre = switch.features
        assert up.shape == pre.shape and switch.size == pre.shape[-2:]
        idx = switch.indices.flatten(2)
        # the switches are the positions of each window's maximum in the encoder map ...
        torch.testing.assert_close(pre.flatten(2).gather(2, idx), F.max_pool2d(pre, 2).flatten(2), rtol=0, atol=0)
        # ... and the decoder's unpooled map is non-zero only there
        at_switch = torch.zeros_like(up).flatten(2).scatter_(2, idx, 1.0).view_as(up).bool()
        assert up[~at_switch].count_nonzero() == 0
        assert up[at_switch].count_nonzero() > 0


def test_decoder_structure_mirrors_the_encoder():
    net = tiny().net
    assert net.input_multiple == 16 and net.stride == 1 and net.offset == 0.0 and not net.shortcut
    # vgg_tiny: conv widths 16 | 32 | 64 64 | 128 128, fc6 3x3 256, fc7 256
    assert deconvs(net.deconv_fc6) == [(256, 128)]
    assert [deconvs(b) for b in net.decoder] == [[(16, 16)], [(32, 16)], [(64, 64), (64, 32)], [(128, 128), (128, 64)]]
    assert net.classifier.in_channels == 16 and net.classifier.out_channels == 3
    assert len(net.encoder_bn) == 0 and set(net.fc_bn) == {"fc6", "fc7"}  # vgg_tiny already normalises its convs
    assert all(m.p == 0 for m in net.backbone.fc if isinstance(m, torch.nn.Dropout))  # BN instead of dropout


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h,w", [(37, 53), (1, 1), (16, 33)])
def test_logits_at_input_size(name, h, w):
    model = tiny(name)
    out = model(torch.randn(2, 3, h, w))["out"]
    assert out.shape == (2, 3, h, w) and torch.isfinite(out).all()
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, h, w))["out"].shape == (1, 3, h, w)


def test_padding_keeps_pixels_aligned():
    """An image already on the pooling grid gives the same logits as itself with extra rows and
    columns cut off and padded back by the model: cropping restores the pixel positions."""
    model = tiny().eval()
    x = torch.randn(1, 3, 48, 64)
    x[..., 40:, :] = 0
    x[..., :, 50:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(x[..., :40, :50])["out"], model(x)["out"][..., :40, :50])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_first_conv(name):
    model = tiny(name)
    out = model(torch.randn(2, 3, 37, 53))["out"]
    F.cross_entropy(out, torch.randint(0, 3, (2, 37, 53))).backward()
    first = model.net.backbone.features[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_shortcut_adds_the_encoder_maps():
    x = torch.randn(1, 3, 48, 64)
    for name, uses_maps in (("deconvnet", False), ("deconvnet_shortcut", True)):
        net = tiny(name).net.eval()
        with torch.no_grad():
            features, switches = net.encode(x)
            blank = [s._replace(features=torch.zeros_like(s.features)) for s in switches]  # same switches
            changed = not torch.equal(net.decode(features, switches), net.decode(features, blank))
        assert changed == uses_maps, name


def test_receptive_margin_bounds_the_influence_of_a_pixel():
    net = tiny().net.eval()
    assert net.receptive_margin == 101
    x = torch.randn(2, 3, 256, 256, requires_grad=True)
    out = net(x)["out"]
    points = [(128, 128), (131, 134)]
    sum(out[i, :, y, x_].sum() for i, (y, x_) in enumerate(points)).backward()
    reach = []
    for i, (y, x_) in enumerate(points):
        ys, xs = torch.nonzero(x.grad[i].abs().sum(0), as_tuple=True)
        reach.append(max((ys - y).abs().max(), (xs - x_).abs().max()).item())
    # nothing beyond the margin, and the margin is not a loose bound
    assert max(reach) <= net.receptive_margin and min(reach) >= 0.8 * net.receptive_margin, reach


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    model = tiny(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model(torch.randn(2, 3, 32, 48))  # moves the BN running statistics off their init
    path = tmp_path / "seg.pt"
    save_checkpoint(path, segmenter_checkpoint(model, ["a", "b"], epoch=1))
    loaded, classes = load_segmenter(path, expect_classes=["a", "b"], expect_config={"name": name})
    assert classes == ["a", "b"] and loaded.config == model.config
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)["out"], model.eval()(x)["out"], rtol=0, atol=0)


def test_vgg16_trunk_loads_a_torchvision_state_dict(tmp_path):
    # torchvision's VGG16 with one cheap fill instead of its two 138M-weight initialisations
    with torch.device("meta"):
        ref = torchvision.models.vgg16(weights=None)
    ref.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.05, 0.05, generator=generator)
    path = tmp_path / "vgg16.pth"
    torch.save(ref.state_dict(), path)
    net = build_segmenter("deconvnet", num_classes=3, backbone_weights=path).net
    for i, layer in enumerate(ref.features):
        if isinstance(layer, torch.nn.Conv2d):
            assert torch.equal(net.backbone.features[i].weight, layer.weight)
            assert torch.equal(net.backbone.features[i].bias, layer.bias)
    assert torch.equal(net.backbone.fc.fc6.weight, ref.classifier[0].weight.view(4096, 512, 7, 7))
    assert torch.equal(net.backbone.fc.fc7.weight.flatten(1), ref.classifier[3].weight)
    del ref
    # the paper's network: BN on all 13 convs + fc6/fc7, deconv-fc6 7x7 to 512, mirrored 3x3 deconvs
    assert len(net.encoder_bn) == 13 and net.input_multiple == 32 and net.receptive_margin == 403
    assert deconvs(net.deconv_fc6) == [(4096, 512)] and net.deconv_fc6[0].kernel_size == (7, 7)
    assert [deconvs(b) for b in net.decoder] == [
        [(64, 64), (64, 64)], [(128, 128), (128, 64)], [(256, 256), (256, 256), (256, 128)],
        [(512, 512), (512, 512), (512, 256)], [(512, 512), (512, 512), (512, 512)]]
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 20, 30))["out"].shape == (1, 3, 20, 30)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="deconvnet supports backbones vgg16, vgg_tiny, got 'resnet50'"):
        build_segmenter("deconvnet", num_classes=3, backbone="resnet50")
    with pytest.raises(ValueError, match="fc6_padding must be .* got 'full'"):
        build_segmenter("deconvnet_shortcut", num_classes=3, backbone="vgg_tiny", fc6_padding="full")
    with pytest.raises(ValueError, match="non-overlapping poolings"):
        DeconvNet(BACKBONES.build("vgg_tiny"), 3)  # its default output stride 8 pools with stride 1
    with pytest.raises(ValueError, match="needs a VGG backbone"):
        DeconvNet(BACKBONES.build("resnet18"), 3)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        DeconvNet(BACKBONES.build("vgg_tiny", output_stride=None), 0)
    with pytest.raises(ValueError, match="imagenet_head"):
        DeconvNet(BACKBONES.build("vgg_tiny", output_stride=None, imagenet_head=True), 3)
    model = tiny(fc6_padding="valid")  # the paper's unpadded fc6: 3x3 on vgg_tiny, so >= 48 px
    assert model(torch.randn(2, 3, 50, 70))["out"].shape == (2, 3, 50, 70)
    with pytest.raises(ValueError, match="a 2x2 map reaches fc6.*at least 48 px or fc6_padding='same'"):
        model(torch.randn(2, 3, 20, 20))
    net = model.net
    features, switches = net.eval().encode(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="3 switches for 4 unpoolings"):
        net.decode(features, switches[1:])


def _three_squares(size=64):
    """One image: noise plus three 16 px squares, class c brightening colour channel c - 1."""
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(1, 3, size, size, generator=g)
    y = torch.zeros(1, size, size, dtype=torch.long)
    for c, (r, col) in enumerate(((8, 8), (8, 40), (40, 24)), start=1):
        y[0, r:r + 16, col:col + 16] = c
        x[0, c - 1, r:r + 16, col:col + 16] += 1.5
    return x, y


def test_deconvnet_learns_every_class_of_one_image_with_adam():
    """Issue 14: with the paper's std-0.01 classifier, Adam left the rare classes' rows of the
    classifier alike and the model predicted background everywhere (this image: every foreground
    IoU 0 after 100 steps, loss stuck near 0.29); it must overfit one image in a few steps."""
    model = build_segmenter("deconvnet", num_classes=4, backbone="vgg_tiny")  # the unseeded default init too
    torch.manual_seed(0)
    model.net.reset_parameters()
    x, y = _three_squares()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model.eval()(x)["out"].argmax(1)  # eval mode: BatchNorm's running statistics
    iou = [((pred == c) & (y == c)).sum().item() / ((pred == c) | (y == c)).sum().item() for c in range(4)]
    assert min(iou) > 0.9, iou
    rows = F.normalize(model.net.classifier.weight.detach().flatten(1)[1:], dim=1)  # foreground classes
    off_diagonal = (rows @ rows.T).masked_select(~torch.eye(3, dtype=torch.bool))
    assert off_diagonal.mean() < 0.5  # the std-0.01 init left them alike: mean cosine 0.997
