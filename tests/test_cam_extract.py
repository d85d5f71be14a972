"""CAM extraction: geometry of the upsampling, normalisation, multi-scale/flip aggregation, no hooks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsl.cam.extract import (CAMExtractor, ClassMaps, normalize_cams, select_classes, select_maps, selected_maps,
                             upsample_cams)
from wsl.models.layers import geometry
from wsl.models.layers.geometry import _resize_linear, resample_maps


class TinyCAMNet(nn.Module):
    """A fully convolutional 'classifier' with the wsl model interface: 3x3 conv (pad 1) -> 4x4 average
    pool (stride 4) -> 1x1 conv to C maps; image score = global max (a ``pooling`` module)."""

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, num_classes, 1)
        self.pooling = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
        self.stride, self.offset = 4, 1.5  # a 4x4 pool cell covers pixels 4i..4i+3: centre 4i + 1.5
        self.calls = 0

    def class_maps(self, x):
        self.calls += 1
        return self.head(F.avg_pool2d(torch.relu(self.conv(x)), 4))

    def forward(self, x):
        return self.pooling(self.class_maps(x))


class HotCellNet(nn.Module):
    """Maps that are zero except for cell (i, j) = 1, whatever the image (only its size matters)."""

    def __init__(self, cell, stride=4, offset=2.0) -> None:
        super().__init__()
        self.cell, self.stride, self.offset = cell, stride, offset
        self.dummy = nn.Parameter(torch.zeros(()))

    def class_maps(self, x):
        n, _, h, w = x.shape
        maps = torch.zeros(n, 1, h // self.stride, w // self.stride, device=x.device)
        maps[:, 0, self.cell[0], self.cell[1]] = 1.0
        return maps

    def forward(self, x):
        return self.class_maps(x).amax((2, 3))


class PixelNet(nn.Module):
    """Stride-1 maps (offset 0): upsampling must be the identity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.stride, self.offset = 1, 0.0

    def class_maps(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.class_maps(x).mean((2, 3))


def _images(n=2, h=32, w=40, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_hot_cell_lands_on_its_receptive_field_centre():
    model = HotCellNet(cell=(3, 5), stride=4, offset=2.0).eval()
    cams = CAMExtractor(model, normalize="none")(_images(1, 32, 40)).cams[0, 0]
    y, x = divmod(int(cams.argmax()), cams.shape[1])
    assert (y, x) == (2 + 4 * 3, 2 + 4 * 5)
    assert cams[y, x] == pytest.approx(1.0)
    # bilinear: one stride away the value has dropped to 0, half-way it is 0.5
    assert cams[y, x + 4] == pytest.approx(0.0, abs=1e-6) and cams[y, x + 2] == pytest.approx(0.5)
    assert cams[y - 2, x] == pytest.approx(0.5)


def test_half_pixel_offset_and_rescaled_input():
    # offset 1.5: cell 2 is centred between pixels 9 and 10
    cams = CAMExtractor(HotCellNet(cell=(2, 2), stride=4, offset=1.5), normalize="none")(_images(1, 32, 32)).cams
    row = cams[0, 0, 10]
    assert row[9] == pytest.approx(row[10]) and row[9] == row.max()
    # at scale 0.5 the network sees 16x16; cell 1 sits at resized pixel 6 = original (6 + 0.5) * 2 - 0.5 = 12.5
    cams = CAMExtractor(HotCellNet(cell=(1, 1), stride=4, offset=2.0), scales=(0.5,), normalize="none")(
        _images(1, 32, 32)).cams[0, 0]
    assert cams[12, 12] == pytest.approx(cams[13, 13]) and cams[12, 12] == pytest.approx(cams.max())
    assert cams[12, 12] == pytest.approx(cams[13, 12])


@pytest.mark.parametrize("size,input_size,offset", [
    ((37, 53), None, (3.5, 2.0)), ((37, 53), (28, 40), (3.5, 2.0)), ((5, 3), None, (3.5, 2.0)),
    ((40, 42), None, (3.5, 2.5)),  # stride x the map, cells centred on their blocks: OpenCV's resize
])
def test_upsampling_equals_grid_sample(size, input_size, offset, monkeypatch):
    # parity with the reference it replaced: grid_sample (bilinear, border padding) on a grid of the
    # same map coordinates, normalised with align_corners=False; here with per-axis stride and offset
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 5, 7, generator=g)
    (H, W), (in_h, in_w) = size, input_size or size
    stride = (8.0, 6.0)

    def norm(n_out, n_in, s, o, n_map):
        q = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
        return ((2 * (q - o) / s + 1) / n_map - 1).float()

    grid = torch.stack(torch.meshgrid(norm(W, in_w, stride[1], offset[1], 7), norm(H, in_h, stride[0], offset[0], 5),
                                      indexing="xy"), -1)[None].expand(2, H, W, 2)
    reference = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    resized = []
    monkeypatch.setattr(geometry, "_resize_linear", lambda *a: resized.append(a) or _resize_linear(*a))
    ours = upsample_cams(maps, size, stride=stride, offset=offset, input_size=input_size)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert bool(resized) == (size == (40, 42))  # the OpenCV path exactly where its geometry is ours
    if resized:  # and the matrix products agree with it
        torch.testing.assert_close(ours, upsample_cams(maps.requires_grad_(), size, stride=stride, offset=offset))
        assert len(resized) == 1  # a map that needs gradients takes the torch path
        # the segmenters' resampling shares the choice: a 4-pixel grid read by 2-pixel cells
        pixels = resample_maps(maps.detach(), (10, 14), stride=4.0, offset=1.5, out_stride=2.0, out_offset=0.5)
        assert len(resized) == 2
        torch.testing.assert_close(pixels, resample_maps(maps.double(), (10, 14), stride=4.0, offset=1.5,
                                                         out_stride=2.0, out_offset=0.5).float())


def test_scale_one_without_flip_returns_the_models_own_maps_and_scores():
    model = PixelNet().eval()
    x = _images()
    out = CAMExtractor(model, normalize="none")(x)
    with torch.no_grad():
        torch.testing.assert_close(out.cams, model.class_maps(x))
        torch.testing.assert_close(out.scores, model(x))
    strided = TinyCAMNet().eval()
    out = CAMExtractor(strided, normalize="none")(x)
    with torch.no_grad():
        maps = strided.class_maps(x)
        torch.testing.assert_close(out.cams, upsample_cams(maps, (32, 40), stride=4, offset=1.5))
        torch.testing.assert_close(out.scores, strided(x))
    assert out.cams.dtype == torch.float32 and out.cams.is_inference()


def test_no_hooks_are_registered(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("CAMExtractor must not register hooks")

    for name in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                 "register_backward_hook"):
        monkeypatch.setattr(nn.Module, name, refuse)
    monkeypatch.setattr(torch.nn.modules.module, "register_module_forward_hook", refuse)
    model = TinyCAMNet().eval()
    CAMExtractor(model, scales=(1.0, 0.5), flip=True)(_images())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_one_batched_forward_pass_per_scale():
    model = TinyCAMNet().eval()
    CAMExtractor(model, scales=(1.0, 0.75, 0.5), flip=True)(_images(3))
    assert model.calls == 3


def test_flip_aggregation_is_flip_equivariant_for_any_model():
    model = TinyCAMNet().eval()
    ext = CAMExtractor(model, scales=(1.0, 0.75), flip=True, normalize="none")
    x = _images(2, 32, 40)
    a, b = ext(x), ext(x.flip(-1))
    torch.testing.assert_close(b.cams, a.cams.flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=1e-5)


def test_flip_aggregation_of_a_symmetric_model_is_symmetric_and_changes_nothing():
    model = TinyCAMNet().eval()
    with torch.no_grad():  # mirror-symmetric 3x3 kernels make the model flip-equivariant
        w = model.conv.weight
        w.copy_((w + w.flip(-1)) / 2)
    x = _images(2, 32, 32)
    x = (x + x.flip(-1)) / 2  # a symmetric image
    flipped = CAMExtractor(model, flip=True, normalize="none")(x).cams
    plain = CAMExtractor(model, flip=False, normalize="none")(x).cams
    torch.testing.assert_close(flipped, flipped.flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flipped, plain, atol=1e-5, rtol=1e-5)


def test_multiscale_averages_the_scales():
    model = TinyCAMNet().eval()
    x = _images(1, 32, 32)
    both = CAMExtractor(model, scales=(1.0, 0.5), normalize="none")(x)
    one = CAMExtractor(model, scales=(1.0,), normalize="none")(x)
    half = CAMExtractor(model, scales=(0.5,), normalize="none")(x)
    torch.testing.assert_close(both.cams, (one.cams + half.cams) / 2)
    torch.testing.assert_close(both.scores, (one.scores + half.scores) / 2)


def test_normalisations():
    maps = torch.tensor([[[[1.0, 3.0], [-2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, -1.0], [-3.0, -2.0]],
                          [[2.0, 2.0], [2.0, 2.0]]]])
    mx = normalize_cams(maps, "max")
    torch.testing.assert_close(mx[0, 0], torch.tensor([[1 / 3, 1.0], [0.0, 0.0]]))
    assert mx[0, 1:3].abs().sum() == 0 and torch.isfinite(mx).all()  # zero and negative maps: zeros
    assert torch.all(mx[0, 3] == 1.0)
    mm = normalize_cams(maps, "minmax")
    torch.testing.assert_close(mm[0, 0], torch.tensor([[0.6, 1.0], [0.0, 0.4]]))
    assert mm[0, 3].abs().sum() == 0 and torch.isfinite(mm).all()  # flat map: zeros, not NaN
    assert normalize_cams(maps, "none") is maps
    with pytest.raises(ValueError, match="normalisation"):
        normalize_cams(maps, "softmax")


def test_extractor_output_is_max_normalised_by_default():
    out = CAMExtractor(TinyCAMNet().eval(), scales=(1.0, 0.5), flip=True)(_images())
    assert out.cams.shape == (2, 3, 32, 40) and out.scores.shape == (2, 3)
    assert out.cams.min() >= 0 and out.cams.max() <= 1
    peaks = out.cams.flatten(2).amax(-1)
    assert torch.all(((peaks - 1).abs() < 1e-6) | (peaks == 0))  # each map peaks at 1 (or is empty)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="class_maps"):
        CAMExtractor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scales"):
        CAMExtractor(TinyCAMNet(), scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="normalis"):
        CAMExtractor(TinyCAMNet(), normalize="l2")
    with pytest.raises(ValueError, match="images"):
        CAMExtractor(TinyCAMNet())(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_training_mode_is_left_alone_but_logged(caplog):
    model = TinyCAMNet().train()
    CAMExtractor(model)(_images(1))
    assert model.training and "training mode" in caplog.text


def test_select_classes_and_selected_maps():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert select_classes(labels=labels).tolist() == [[True, False, True], [False, False, False]]
    scores = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -0.5, -2.0]])
    assert select_classes(scores=scores).tolist() == [[True, False, True], [False, True, False]]
    assert select_classes(scores=scores, at_least_one=False)[1].sum() == 0
    assert select_classes(scores=scores, threshold=1.0).tolist() == [[True, False, False], [False, True, False]]
    cams = torch.rand(2, 3, 4, 5)
    (idx0, maps0), (idx1, maps1) = selected_maps(cams, select_classes(labels=labels))
    assert idx0.tolist() == [0, 2] and torch.equal(maps0, cams[0, [0, 2]])
    assert idx1.numel() == 0 and maps1.shape == (0, 4, 5)
    with pytest.raises(ValueError):
        select_classes()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_models_device():
    model = TinyCAMNet().eval().cuda()
    x = _images()
    out = CAMExtractor(model, scales=(1.0, 0.5), flip=True)(x)
    ref = CAMExtractor(TinyCAMNet().eval(), scales=(1.0, 0.5), flip=True)(x)
    assert out.cams.is_cuda
    torch.testing.assert_close(out.cams.cpu(), ref.cams, atol=1e-4, rtol=1e-4)


def test_real_classifier_scores_come_from_its_pooling_in_the_same_pass():
    from wsl.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=4, pooling="lse").eval()
    x = _images(2, 40, 48)
    out = CAMExtractor(model, normalize="none")(x)
    with torch.no_grad():
        maps = model.class_maps(x)
        torch.testing.assert_close(out.scores, model(x))
        torch.testing.assert_close(out.cams, upsample_cams(maps, (40, 48), stride=model.stride, offset=model.offset))


@pytest.mark.parametrize("scales, flip, normalize", [((1.0,), False, "max"),  # cv2.resize route, into the slots
                                                     ((0.75,), False, "max"),  # matrix products, into the slots
                                                     ((1.0, 0.75), True, "minmax"),  # matrix-product route
                                                     ((0.5,), True, "none")])
def test_upsampling_only_the_used_maps_gives_their_full_path_values_exactly(scales, flip, normalize):
    model = TinyCAMNet(num_classes=7).eval()
    ext = CAMExtractor(model, scales=scales, flip=flip, normalize=normalize)
    x = _images(3, 32, 40)
    full = ext(x)
    maps = ext.class_maps(x)
    assert isinstance(maps, ClassMaps)  # the maps stay at map resolution until asked for
    assert all(m.shape[-2:] == (h // 4, w // 4) for m, (h, w) in maps.passes)
    assert torch.equal(maps.scores, full.scores)
    assert torch.equal(maps.upsample(), full.cams)
    assert maps.upsample(torch.zeros(0, dtype=torch.long)).shape == (0, 32, 40)
    rows = torch.tensor([20, 0, 9, 13])  # (image, class) = (2, 6), (0, 0), (1, 2), (1, 6)
    assert torch.equal(maps.upsample(rows), full.cams.flatten(0, 1)[rows])
    padded = maps.upsample(torch.tensor([-1, 20, -1, 0]))  # -1: an all-zero map (select_maps' padding)
    assert torch.equal(padded[[1, 3]], full.cams.flatten(0, 1)[[20, 0]]) and not padded[[0, 2]].any()
    select = torch.zeros(3, 7, dtype=torch.bool)
    select[0, [1, 4]] = select[2, 6] = True  # image 1 uses no class
    for source in (maps, full.cams):
        used = select_maps(source, select)
        assert used.classes.tolist()[0] == [1, 4] and used.classes[2, 0] == 6
        assert used.valid.tolist() == [[True, True], [False, False], [True, False]]
        assert torch.equal(used.cams[used.valid], full.cams[select])
        assert not used.cams[~used.valid].any()  # padding slots are zero


def test_select_maps_refuses_a_selection_of_another_shape():
    maps = CAMExtractor(TinyCAMNet(num_classes=3).eval()).class_maps(_images(2))
    with pytest.raises(ValueError, match=r"select must be a bool \(N, C\) = \(2, 3\)"):
        select_maps(maps, torch.ones(2, 4, dtype=torch.bool))
