"""Segmenters: every builder on a small input, FCN upsampling and alignment, weights, checkpoints."""
import pytest
import torch
import torchvision
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

from wsl.errors import CheckpointError
from wsl.models import (SEGMENTERS, SegmenterConfig, build_classifier, build_segmenter, classifier_checkpoint,
                        load_segmenter, maps_to_pixels, segmenter_checkpoint)
from wsl.models.segmentation import bilinear_kernel
from wsl.utils.io import save_checkpoint

# (name, options, input H, W). VGG16 and ResNet50 variants run once each on small inputs.
CASES = [
    ("fcn32s", {"backbone": "vgg_tiny"}, 50, 70),
    ("fcn16s", {"backbone": "vgg_tiny"}, 50, 70),
    ("fcn8s", {"backbone": "vgg_tiny"}, 50, 70),
    ("fcn8s", {"backbone": "vgg_tiny", "upsampling": "bilinear", "output_stride": 16}, 50, 70),
    ("fcn8s", {}, 64, 80),  # VGG16, fc6 padded
    ("fcn16s", {"backbone": "resnet18", "upsampling": "bilinear"}, 64, 64),
    ("deeplab_largefov", {"backbone": "vgg_tiny"}, 50, 70),
    ("deeplab_largefov", {}, 64, 72),  # VGG16
    ("deeplabv3_resnet50", {}, 64, 64),
    ("unet", {"base_channels": 4, "depth": 2}, 37, 53),  # the paper's unpadded U-Net, mirrored context
    ("unet", {"padding": "same", "base_channels": 4, "depth": 3, "batch_norm": True}, 37, 53),
    ("unet", {"encoder": "vgg_tiny", "base_channels": 4}, 37, 53),
    ("deeplab_aspp", {"backbone": "vgg_tiny"}, 37, 53),
    ("deeplabv3plus", {"backbone": "vgg_tiny"}, 37, 53),
    ("deeplabv3plus_resnet50", {}, 64, 64),  # the ResNet-50 preset
    ("deconvnet", {"backbone": "vgg_tiny"}, 37, 53),
    ("deconvnet_shortcut", {"backbone": "vgg_tiny"}, 37, 53),
]


def test_every_segmenter_is_covered():
    assert {c[0] for c in CASES} == set(SEGMENTERS.names())


@pytest.mark.parametrize("name,options,h,w", CASES)
def test_segmenter_outputs_logits_at_input_size(name, options, h, w):
    torch.manual_seed(0)
    model = build_segmenter(name, num_classes=4, **options)
    assert model.config == SegmenterConfig(name=name, num_classes=4, kwargs=options)
    out = model(torch.randn(2, 3, h, w))
    assert set(out) == {"out"} and out["out"].shape == (2, 4, h, w)
    assert torch.isfinite(out["out"]).all()
    out["out"].logsumexp(1).sum().backward()  # the logits depend on the first layer's weights
    first = next(p for n, p in model.named_parameters() if "weight" in n)
    assert first.grad is not None


def test_fcn_and_deeplab_structure():
    fcn = build_segmenter("fcn8s", num_classes=3, backbone="vgg_tiny", output_stride=16).net
    assert fcn.skip_names == ["pool3", "pool2"]  # strides 8 and 4 below the stride-16 scores
    for conv in [fcn.score, *fcn.skip_scores]:  # zero-initialised scores, as in the paper
        assert conv.weight.abs().sum() == 0
    for up in fcn.up2:
        torch.testing.assert_close(up.weight, bilinear_kernel(3, 2))
        assert up.weight.requires_grad
    lfov = build_segmenter("deeplab_largefov", num_classes=3, backbone="vgg_tiny").net
    assert lfov.backbone.stride == 8 and lfov.head[0].dilation == (4, 4) and lfov.head[0].out_channels == 256


def test_bilinear_kernel_upsamples_a_ramp_exactly():
    up = torch.nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2, 2))
        ramp = torch.arange(8.0).expand(1, 2, 8, 8)
        out = up(ramp)
    # input cell i lands at output cell 2i + 1/2, so output cell o holds (o - 1/2) / 2 (interior)
    expected = (torch.arange(16.0) - 0.5) / 2
    torch.testing.assert_close(out[0, 1, 5, 1:-1], expected[1:-1])


def test_learned_upsampling_refuses_misaligned_backbone():
    with pytest.raises(ValueError, match="upsampling='bilinear'"):
        build_segmenter("fcn16s", num_classes=3, backbone="resnet18")
    with pytest.raises(ValueError, match="no map at stride"):
        build_segmenter("fcn8s", num_classes=3, backbone="resnet50", output_stride=8, upsampling="bilinear")


def test_maps_to_pixels_puts_cell_values_on_their_centres():
    stride, offset = 8, 3.5
    i, j = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    maps = torch.stack([2 * i - j, i + 3 * j]).unsqueeze(0)  # linear in the cell coordinates
    pixels = maps_to_pixels(maps, (24, 32), stride=stride, offset=offset)
    y, x = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    u, v = ((y - offset) / stride).clamp(0, 2), ((x - offset) / stride).clamp(0, 3)  # border held
    torch.testing.assert_close(pixels[0], torch.stack([2 * u - v, u + 3 * v]))
    # an integer offset puts cell centres on pixels
    maps = torch.randn(1, 2, 3, 4)
    pixels = maps_to_pixels(maps, (20, 30), stride=4, offset=2.0)
    torch.testing.assert_close(pixels[0, :, 6, 10], maps[0, :, 1, 2])
    torch.testing.assert_close(pixels[0, :, 19, 29], maps[0, :, 2, 3])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown segmenter 'segformer'; known: deconvnet, .*deeplab_largefov"):
        build_segmenter("segformer", num_classes=3)
    with pytest.raises(ValueError, match="deeplab_largefov supports backbones vgg16, vgg_tiny"):
        build_segmenter("deeplab_largefov", num_classes=3, backbone="resnet50")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        build_segmenter("fcn32s", num_classes=1, backbone="vgg_tiny")
    with pytest.raises(ValueError, match="fcn16s: weights must be None or a path"):
        build_segmenter("fcn16s", num_classes=3, backbone="vgg_tiny", weights=3)


def test_deeplabv3_weights_from_enum_and_backbone_file(tmp_path, monkeypatch):
    ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                             num_classes=21, aux_loss=True)
    monkeypatch.setattr(DeepLabV3_ResNet50_Weights, "get_state_dict", lambda self, **kw: ref.state_dict())
    model = build_segmenter("deeplabv3_resnet50", num_classes=5, weights="COCO_WITH_VOC_LABELS_V1")
    torch.testing.assert_close(model.net.backbone.layer4[2].conv3.weight, ref.backbone.layer4[2].conv3.weight)
    torch.testing.assert_close(model.net.classifier[0].project[0].weight, ref.classifier[0].project[0].weight)
    assert model.net.classifier[4].out_channels == 5  # another class count: the last layer keeps its init

    path = tmp_path / "r50.pth"  # a torchvision ResNet50 state dict (the trunk's keys are resnet50's)
    torch.save(ref.backbone.state_dict(), path)
    model = build_segmenter("deeplabv3_resnet50", num_classes=3, backbone_weights=path)
    torch.testing.assert_close(model.net.backbone.conv1.weight, ref.backbone.conv1.weight)


@pytest.fixture
def seg_ckpt(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("fcn8s", num_classes=4, backbone="vgg_tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # non-zero scores, so outputs differ between models
    path = tmp_path / "seg.pt"
    save_checkpoint(path, segmenter_checkpoint(model, ["a", "b", "c"], epoch=2))
    return model, path


def test_segmenter_checkpoint_round_trip(seg_ckpt):
    model, path = seg_ckpt
    loaded, classes = load_segmenter(path, expect_classes=["a", "b", "c"], expect_config={"name": "fcn8s"})
    assert classes == ["a", "b", "c"] and loaded.config == model.config
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)["out"], model.eval()(x)["out"])


def test_segmenter_checkpoint_refusals(seg_ckpt, tmp_path):
    model, path = seg_ckpt
    with pytest.raises(CheckpointError, match=r"made for another model: 3 classes \[a, b, c\] \(expected 20\)"):
        load_segmenter(path, expect_classes=20)
    with pytest.raises(CheckpointError, match="name='fcn8s' \\(expected 'deeplab_largefov'\\)"):
        load_segmenter(path, expect_config={"name": "deeplab_largefov"})
    clf_path = tmp_path / "clf.pt"
    save_checkpoint(clf_path, classifier_checkpoint(build_classifier(backbone="vgg_tiny", num_classes=2), ["a", "b"]))
    with pytest.raises(CheckpointError, match="holds a classifier, expected a segmenter checkpoint"):
        load_segmenter(clf_path)
    with pytest.raises(ValueError, match="3 foreground class names for a model with 5 outputs"):
        segmenter_checkpoint(build_segmenter("fcn32s", num_classes=5, backbone="vgg_tiny"), ["a", "b", "c"])


def test_weights_from_segmenter_checkpoint_fine_tune_other_classes(seg_ckpt):
    model, path = seg_ckpt
    same = build_segmenter("fcn8s", num_classes=4, backbone="vgg_tiny", weights=path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[name], tensor)
    other = build_segmenter("fcn8s", num_classes=7, backbone="vgg_tiny", weights=path)
    torch.testing.assert_close(other.net.backbone.features[0].weight, model.net.backbone.features[0].weight)
    assert other.net.score.weight.abs().sum() == 0  # 7-class head: kept at its (zero) init
