"""U-Net: the paper's geometry, every option on odd sizes, encoders and their weights, gradients, checkpoints."""
import itertools

import pytest
import torch

from conftest import perturbed
from wsl.models import build_segmenter, load_segmenter, segmenter_checkpoint
from wsl.models.segmentation import UNet
from wsl.models.tiling import mirror_pad
from wsl.utils.io import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_papers_geometry():
    net = build_segmenter("unet", num_classes=2, base_channels=1).net
    assert (net.depth, net.valid_margin, net.receptive_margin, net.tile_align) == (4, 92, 94, 16)
    assert net._crops == [88, 40, 16, 4]  # 568->392, 280->200, 136->104, 64->56 in Fig. 1
    with torch.no_grad():
        assert net._network(torch.zeros(1, 3, 572, 572)).shape[-2:] == (388, 388)  # Fig. 1: 572 in, 388 out
    widths = [block[0].out_channels for block in build_segmenter("unet", num_classes=2, depth=4).net.down]
    assert widths == [64, 128, 256, 512, 1024]
    # depth 1-2: outputs come in multiples of 2**depth, no slack
    for depth, margin in ((1, 8), (2, 20), (3, 46)):
        assert build_segmenter("unet", num_classes=2, base_channels=1, depth=depth).net.receptive_margin == margin


@pytest.mark.parametrize("padding,batch_norm,depth", list(itertools.product(("valid", "same"), (False, True), (1, 2, 3))))
def test_logits_at_input_size_for_odd_sizes(padding, batch_norm, depth):
    torch.manual_seed(0)
    model = build_segmenter("unet", num_classes=3, padding=padding, batch_norm=batch_norm, depth=depth,
                            base_channels=2).eval()
    for h, w in ((1, 1), (17, 30), (33, 9)):
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w))["out"]
        assert out.shape == (2, 3, h, w) and torch.isfinite(out).all()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_encoder_vgg_tiny_shapes_and_skips(batch_norm):
    model = build_segmenter("unet", num_classes=3, encoder="vgg_tiny", base_channels=4, batch_norm=batch_norm).eval()
    net = model.net
    # natural stride 16 (no fc layers), skips from pool1..pool3, stride 1 without a skip
    assert net.backbone.stride == 16 and net.backbone.fc is None and net.depth == 4 and net.tile_align == 16
    assert net.tap_names == [None, "pool1", "pool2", "pool3"]
    assert [m[0].in_channels for m in net.decode] == [4, 16 + 16, 32 + 32, 64 + 64]
    assert net.forward_tile is None and net.receptive_margin == 72
    for h, w in ((5, 7), (37, 53)):
        with torch.no_grad():
            assert model(torch.randn(1, 3, h, w))["out"].shape == (1, 3, h, w)


def test_encoder_vgg16_weights_from_a_state_dict_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    # A torchvision VGG16 state dict: the conv trunk under "features." (the fc layers would be ignored).
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build_segmenter("unet", num_classes=3, encoder="vgg16", backbone_weights=path, base_channels=4).eval()
    net = model.net
    for i in (0, 28):  # conv1_1 and conv5_3
        torch.testing.assert_close(net.backbone.features[i].weight, state[f"features.{i}.weight"])
    assert net.tap_names == [None, "pool1", "pool2", "pool3", "pool4"] and net.tile_align == 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, 35, 45))["out"].shape == (1, 3, 35, 45)
    assert model.config.kwargs == {"encoder": "vgg16", "base_channels": 4}


def test_valid_and_same_are_one_implementation():
    valid = build_segmenter("unet", num_classes=3, base_channels=2, depth=2).net
    same = build_segmenter("unet", num_classes=3, base_channels=2, depth=2, padding="same").net
    same.load_state_dict(valid.state_dict())  # the same parameters: padding is the only difference
    assert valid.forward_tile is not None and same.forward_tile is None
    assert valid.down[0][0].padding == (0, 0) and same.down[0][0].padding == (1, 1)


def test_valid_forward_is_the_unpadded_network_on_the_mirrored_image():
    net = perturbed(build_segmenter("unet", num_classes=3, base_channels=2, depth=3).net)
    x = torch.randn(1, 3, 21, 30)
    r = net.receptive_margin
    padded = mirror_pad(x, r, r + 3, r, r + 2)  # to multiples of 8
    with torch.no_grad():
        want = net._network(padded)[..., 2:23, 2:32]  # the unpadded network's output is 2 px wider each side
        torch.testing.assert_close(net(x)["out"], want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="not a tile of a multiple of 8 px plus 46 px"):
            net.forward_tile(torch.zeros(1, 3, 101, 100))


@pytest.mark.parametrize("options", [{"padding": "same", "depth": 2}, {"encoder": "vgg_tiny"}])
def test_padded_receptive_margin_bounds_the_gradient(options):
    net = perturbed(build_segmenter("unet", num_classes=2, base_channels=2, **options).net)
    margin = net.receptive_margin
    x = torch.randn(1, 3, 2 * margin + 40, 2 * margin + 40, requires_grad=True)
    for p in (margin + 3, margin + 20):
        net(x)["out"][0, :, p, p].sum().backward()
        ys, xs = torch.nonzero(x.grad.abs().sum((0, 1)), as_tuple=True)
        assert len(ys) and ys.min() >= p - margin and ys.max() <= p + margin
        assert xs.min() >= p - margin and xs.max() <= p + margin
        x.grad = None


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for options in ({"base_channels": 2, "depth": 2, "batch_norm": True}, {"encoder": "vgg_tiny", "base_channels": 2}):
        model = build_segmenter("unet", num_classes=3, **options).train()
        out = model(torch.randn(2, 3, 19, 26))["out"]
        torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 19, 26))).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert model.net.down is None or model.net.down[0][0].weight.grad.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("unet", num_classes=3, base_channels=2, depth=2, batch_norm=True)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 20, 20))  # BatchNorm running statistics away from their init
    perturbed(model)
    path = tmp_path / "unet.pt"
    save_checkpoint(path, segmenter_checkpoint(model, ["a", "b"], epoch=1))
    loaded, classes = load_segmenter(path, expect_classes=["a", "b"], expect_config={"name": "unet"})
    assert classes == ["a", "b"] and loaded.config == model.config and isinstance(loaded.net, UNet)
    x = torch.randn(2, 3, 23, 31)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x)["out"], model.eval()(x)["out"])


def test_backbone_names_the_encoder_as_train_seg_passes_it():
    from wsl.train.segmenter import SegModelConfig, build_model

    # the trainer passes model.backbone to every segmenter (default vgg_tiny)
    net = build_model(SegModelConfig(name="unet", options={"base_channels": 2}), 3).net
    assert net.backbone is not None and net.backbone.name == "vgg_tiny"
    paper = build_model(SegModelConfig(name="unet", options={"encoder": "none", "base_channels": 2, "depth": 2}), 3)
    assert paper.net.backbone is None and paper.net.valid and paper.config.kwargs["backbone"] == "vgg_tiny"
    assert build_segmenter("unet", num_classes=3, encoder="vgg_tiny", backbone="vgg_tiny").net.backbone is not None


@pytest.mark.parametrize("options,message", [
    ({"padding": "full"}, "padding must be 'valid' \\(the paper\\) or 'same', got 'full'"),
    ({"depth": 0}, "depth must be an integer >= 1, got 0"),
    ({"base_channels": 2.5}, "base_channels must be an integer >= 1, got 2.5"),
    ({"encoder": "vgg_tiny", "padding": "valid"}, "padding must be 'same', got 'valid'"),
    ({"encoder": "vgg_tiny", "depth": 3}, "depth=3 is set by the encoder's stride"),
    ({"encoder": "vgg99"}, "unknown backbone 'vgg99'; known:"),
    ({"backbone_weights": "IMAGENET1K_V1"}, "backbone_weights need an encoder"),
    ({"encoder": "vgg16", "backbone": "vgg_tiny"}, "encoder='vgg16' and backbone='vgg_tiny' disagree"),
])
def test_bad_options_raise_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        build_segmenter("unet", num_classes=3, **options)
