"""Dense CRF in PyTorch: edge snapping, normalisation, batching, the lattice against the exact filter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsl.cam.crf import DenseCRF, _ExactGaussian, _Permutohedral, crf_pseudo_masks
from wsl.cam.postprocess import pseudo_masks


def _square_scene(h=40, w=40, seed=0):
    """A sharp red square on a blue background, and a blurry unary shifted off the square."""
    g = torch.Generator().manual_seed(seed)
    img = torch.empty(1, 3, h, w)
    img[:] = torch.tensor([40.0, 90.0, 160.0])[:, None, None]
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 3, 2 * w // 3
    img[:, :, y0:y1, x0:x1] = torch.tensor([220.0, 60.0, 40.0])[:, None, None]
    img = (img + 6 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    truth = torch.zeros(h, w, dtype=torch.bool)
    truth[y0:y1, x0:x1] = True
    m = torch.roll(truth.float()[None, None], shifts=(h // 13, w // 13), dims=(2, 3))
    k = 2 * (h // 8) + 1
    m = F.avg_pool2d(m, k, 1, k // 2, count_include_pad=False)
    fg = 0.2 + 0.6 * m
    return img, torch.cat([1 - fg, fg], 1), truth


def _iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.parametrize("filter", ["lattice", "exact"])
def test_crf_snaps_labels_to_the_colour_edge(filter):
    img, probs, truth = _square_scene()
    crf = DenseCRF(filter=filter)
    q = crf(img, probs)
    before = _iou(probs.argmax(1)[0] == 1, truth)
    after = _iou(q.argmax(1)[0] == 1, truth)
    assert before < 0.7 and after > 0.95
    assert q.dtype == torch.float32 and q.shape == probs.shape
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(1, 40, 40))


def test_defaults_are_deeplab_largefov():
    crf = DenseCRF()
    assert (crf.iterations, crf.pos_w, crf.pos_xy_std, crf.bi_w, crf.bi_xy_std, crf.bi_rgb_std) == (
        10, 3.0, 3.0, 4.0, 121.0, 5.0)


@pytest.mark.parametrize("filter", ["lattice", "exact"])
def test_batch_equals_per_image(filter):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 20, 24), generator=g, dtype=torch.uint8)
    probs = torch.softmax(3 * torch.randn(3, 4, 20, 24, generator=g), 1)
    crf = DenseCRF(iterations=5, bi_xy_std=20.0, filter=filter)
    batched = crf(images, probs)
    single = torch.cat([crf(images[i:i + 1], probs[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [2, 5, 21])
def test_any_number_of_labels_and_masked_labels_stay_zero(k):
    g = torch.Generator().manual_seed(k)
    images = torch.randint(0, 256, (2, 3, 16, 18), generator=g, dtype=torch.uint8)
    probs = torch.softmax(torch.randn(2, k, 16, 18, generator=g), 1)
    label_mask = torch.ones(2, k, dtype=torch.bool)
    label_mask[1, 1:] = False if k == 2 else torch.arange(1, k) % 2 == 0
    q = DenseCRF(iterations=3)(images, probs, label_mask)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 16, 18))
    assert q[1][~label_mask[1]].abs().max() == 0
    assert torch.isfinite(q).all()


def test_lattice_approximates_the_exact_gaussian_filter():
    g = torch.Generator().manual_seed(0)
    for d in (2, 5):
        feats = torch.rand(2, 300, d, generator=g) * 4
        values = torch.rand(600, 3, generator=g)
        lattice, exact = _Permutohedral(feats), _ExactGaussian(feats)
        ones = torch.ones(600, 1)
        # normalised filtering (what the CRF uses): weighted averages of the values
        approx = lattice.apply(values) / lattice.apply(ones)
        truth = exact.apply(values) / exact.apply(ones)
        rel = ((approx - truth).abs() / truth.abs()).mean()
        assert rel < (0.01 if d == 2 else 0.03)


def test_lattice_blur_neighbours_are_mutual():
    feats = torch.rand(1, 500, 5, generator=torch.Generator().manual_seed(3)) * 3
    lat = _Permutohedral(feats)
    for n1, n2 in lat.neighbours:
        found = n1 < lat.m
        assert found.any()
        # the +direction neighbour of my -direction neighbour is me
        assert torch.equal(n2[n1[found]], torch.nonzero(found).flatten())


def test_working_resolution_cap():
    img, probs, truth = _square_scene(80, 80)
    crf = DenseCRF(max_pixels=40 * 40)
    assert crf.working_size(80, 80) == (40, 40) and crf.working_size(30, 30) == (30, 30)
    assert DenseCRF(filter="exact").max_pixels == 64 * 64
    q = crf(img, probs)
    assert q.shape == probs.shape
    torch.testing.assert_close(q.sum(1), torch.ones(1, 80, 80))
    assert _iou(q.argmax(1)[0] == 1, truth) > 0.9


def test_crf_pseudo_masks():
    img, probs, truth = _square_scene()
    cams = torch.zeros(2, 3, 40, 40)
    cams[0, 1] = probs[0, 1]  # class 1: the blurry, shifted square (0.2 .. 0.8)
    cams[0, 2] = 1.0  # not positive: must never appear
    cams[1, 0] = 0.5  # second image: no positive class at all
    positive = torch.tensor([[False, True, False], [False, False, False]])
    images = img.repeat(2, 1, 1, 1)
    masks = crf_pseudo_masks(DenseCRF(), images, cams, positive, fg=0.4, bg=0.4)
    assert masks.dtype == torch.uint8 and masks.shape == (2, 40, 40)
    assert set(masks[0].unique().tolist()) == {0, 2}
    assert _iou(masks[0] == 2, truth) > 0.9
    assert masks[1].eq(0).all()
    assert _iou(pseudo_masks(cams, positive, fg=0.4, bg=0.4)[0] == 2, truth) < 0.6  # before the CRF
    banded = crf_pseudo_masks(DenseCRF(iterations=2), images, cams, positive)  # default band 0.05 / 0.30
    assert set(banded.unique().tolist()) <= {0, 2, 255}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="filter"):
        DenseCRF(filter="fft")
    with pytest.raises(ValueError, match="bi_rgb_std"):
        DenseCRF(bi_rgb_std=0)
    crf = DenseCRF()
    with pytest.raises(ValueError, match="probs"):
        crf(torch.zeros(1, 3, 8, 8), torch.ones(1, 2, 8, 9) / 2)
    with pytest.raises(ValueError, match="label_mask"):
        crf(torch.zeros(1, 3, 8, 8), torch.ones(1, 2, 8, 8) / 2, torch.zeros(1, 2, dtype=torch.bool))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_the_inputs():
    img, probs, _ = _square_scene()
    crf = DenseCRF()
    q_gpu = crf(img.cuda(), probs.cuda())
    assert q_gpu.is_cuda
    torch.testing.assert_close(q_gpu.cpu(), crf(img, probs), atol=1e-3, rtol=1e-3)
