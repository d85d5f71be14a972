"""Overlap-tile inference: tiled == whole image, the stated tolerances, window sizes, refusals, Segmenter."""
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import perturbed
from wsl.models import build_segmenter
from wsl.models.tiling import Tiler, mirror_index, mirror_pad, tiled_logits
from wsl.segment import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def valid_unet():
    torch.manual_seed(0)
    return perturbed(build_segmenter("unet", num_classes=3, base_channels=4, depth=3))


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 150, 190, generator=torch.Generator().manual_seed(1))


def relative_error(a, b):
    return ((a - b).abs().max() / (b.max() - b.min())).item()


class Recorder(torch.nn.Module):
    """Delegates to ``inner`` and records the input sizes it is run on."""

    def __init__(self, inner, **geometry):
        super().__init__()
        self.inner, self.sizes = inner, []
        for k, v in geometry.items():
            setattr(self, k, v)

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.inner(x)


def test_mirror_index_and_pad():
    x = torch.arange(20.0).view(1, 1, 4, 5)
    torch.testing.assert_close(mirror_pad(x, 3, 2, 1, 4), F.pad(x, (1, 4, 3, 2), mode="reflect"))
    assert mirror_index(-9, 12, 4).tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    big = mirror_pad(x, 10, 11, 12, 13)  # beyond the image's own size: reflected again
    assert big.shape == (1, 1, 25, 30) and big[0, 0, 10:14, 12:17].equal(x[0, 0])
    assert mirror_pad(torch.ones(1, 1, 1, 1), 2, 2, 2, 2).equal(torch.ones(1, 1, 5, 5))


@pytest.mark.parametrize("border", ["clip", "mirror"])
def test_identity_predictor_puts_every_core_back_in_place(border):
    x = torch.randn(1, 3, 37, 50)
    out = tiled_logits(lambda w: w * 2, x, tile=16, overlap=5, border=border)
    assert out.equal(x * 2)


def test_unpadded_unet_tiled_equals_whole_image(valid_unet, image):
    with torch.no_grad():
        whole = valid_unet(image)["out"]
        tiler = Tiler(valid_unet, tile=64, tile_batch=3)
        tiled = tiler(image)
        # any overlap the grid allows is as exact (46 + 8 = 54 px)
        wider = Tiler(valid_unet, tile=64, overlap=54)(image[:1])
    assert (tiler.border, tiler.overlap, tiler.align) == ("mirror", 46, 8)
    assert len(tiler.tiles(150, 190)) == 3 * 3
    # float32: only the rounding of convolutions run on other sizes differs (3e-7 of the range measured)
    assert relative_error(tiled, whole) < 2e-6 and relative_error(wider, whole[:1]) < 2e-6
    # float64: identical, the tiles' maps are sub-blocks of the whole image's
    net64 = build_segmenter("unet", num_classes=3, base_channels=4, depth=3).double().eval()
    net64.load_state_dict(valid_unet.state_dict())
    x64 = image[:1].double()
    with torch.no_grad():
        assert torch.equal(Tiler(net64, tile=64)(x64), net64(x64)["out"])
        assert torch.equal(Tiler(net64, tile=64, overlap=54)(x64), net64(x64)["out"])


def test_the_tiles_never_see_more_than_tile_plus_twice_the_overlap(valid_unet, image):
    net = valid_unet.net
    sizes = []

    def record(x, _inner=net._forward_tile):
        sizes.append(tuple(x.shape[-2:]))
        return _inner(x)

    net._forward_tile = record  # the property forward_tile hands the tiler this instance attribute
    try:
        with torch.no_grad():
            Tiler(valid_unet, tile=64)(image[:1])
    finally:
        del net._forward_tile
    assert sizes and max(max(s) for s in sizes) <= 64 + 2 * 46

    fcn = perturbed(build_segmenter("fcn8s", num_classes=3, backbone="vgg_tiny"))
    for border in ("clip", "mirror"):
        recorder = Recorder(fcn, receptive_margin=20, tile_align=8)
        with torch.no_grad():
            tiler = Tiler(recorder, tile=32, border=border, tile_batch=2)
            out = tiler(image[:1])
        assert out.shape == (1, 3, 150, 190) and tiler.overlap == 24
        assert max(max(s) for s in recorder.sizes) <= 32 + 2 * 24
        assert all(s == (80, 80) for s in recorder.sizes) == (border == "mirror")


@pytest.mark.parametrize("name", ["fcn8s", "deeplab_largefov"])
def test_padded_models_within_the_stated_tolerance(name):
    image = torch.randn(1, 3, 190, 230, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = perturbed(build_segmenter(name, num_classes=3, backbone="vgg_tiny"))
    with torch.no_grad():
        whole = model(image)["out"]
        clip = Tiler(model, tile=80)
        assert clip.border == "clip" and clip.align == 8
        assert relative_error(clip(image), whole) < 1e-5  # wsl.models.tiling: <= 5e-7 measured
        mirror = Tiler(model, tile=80, border="mirror")
        tiled = mirror(image)
    m = mirror.overlap  # beyond one overlap from the border the mirrored tiles are exact too
    assert relative_error(tiled[..., m:-m, m:-m], whole[..., m:-m, m:-m]) < 1e-5
    assert relative_error(tiled, whole) > 1e-3  # the border differs: mirrored image vs zero padding
    # with too little context the interior differs
    with torch.no_grad():
        assert relative_error(Tiler(model, tile=80, overlap=8)(image), whole) > 1e-3


def test_an_image_smaller_than_a_tile_is_one_tile(valid_unet):
    fcn = perturbed(build_segmenter("fcn8s", num_classes=3, backbone="vgg_tiny"))
    for model, size in ((valid_unet, (5, 7)), (valid_unet, (30, 41)), (fcn, (30, 41))):
        x = torch.randn(1, 3, *size)
        tiler = Tiler(model, tile=128)
        assert len(tiler.tiles(*size)) == 1
        with torch.no_grad():
            torch.testing.assert_close(tiler(x), model(x)["out"], rtol=1e-6, atol=1e-6)


def test_tile_sizes_that_do_not_fit_are_refused_naming_the_smallest(valid_unet):
    with pytest.raises(ValueError, match="smaller than its receptive margin \\(46 px\\).*smallest valid tile is 48 px"):
        Tiler(valid_unet, tile=40)
    with pytest.raises(ValueError, match="not a multiple of its pooling grid \\(8 px\\).*smallest valid tile is 48 px"):
        Tiler(valid_unet, tile=60)
    with pytest.raises(ValueError, match="overlap 20 px is less than the 46 px of context UNet consumes"):
        Tiler(valid_unet, tile=64, overlap=20)
    for kw, message in (({"tile": 0}, "tile must be an integer >= 1 px, got 0"),
                        ({"tile": 64, "overlap": -1}, "overlap must be an integer >= 0 px"),
                        ({"tile": 64, "tile_batch": 0}, "tile_batch must be an integer >= 1"),
                        ({"tile": 64, "border": "wrap"}, "border must be one of auto, clip, mirror")):
        with pytest.raises(ValueError, match=message):
            Tiler(valid_unet, **kw)
    with pytest.raises(ValueError, match="states no receptive_margin; pass the overlap"):
        Tiler(lambda w: w, tile=64)


def test_overlap_is_rounded_up_to_the_grid_with_a_log_line(valid_unet, caplog):
    fcn = build_segmenter("fcn8s", num_classes=3, backbone="vgg_tiny")
    with caplog.at_level(logging.INFO, logger="wsl.models.tiling"):
        assert Tiler(fcn, tile=80, overlap=70).overlap == 72
        assert Tiler(valid_unet, tile=64, overlap=50).overlap == 54  # 46 + a multiple of 8
    assert "overlap 70 px rounded up to 72 px" in caplog.text and "overlap 50 px rounded up to 54 px" in caplog.text


def test_segmenter_with_tiles_gives_the_same_labels(valid_unet):
    images = torch.randint(0, 256, (2, 3, 90, 110), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    plain = Segmenter(valid_unet, scales=(1.0, 0.75), flip=True)
    tiled = Segmenter(valid_unet, scales=(1.0, 0.75), flip=True, tile=48)
    assert (tiled.tile, tiled.tile_overlap) == (48, 46) and plain.tile_overlap is None
    torch.testing.assert_close(tiled.probabilities(images), plain.probabilities(images), rtol=1e-5, atol=1e-6)
    assert torch.equal(tiled(images), plain(images))
    with pytest.raises(ValueError, match="tile_overlap=8 needs a tile size"):
        Segmenter(valid_unet, tile_overlap=8)
    with pytest.raises(ValueError, match="smallest valid tile is 48 px"):
        Segmenter(valid_unet, tile=16)
