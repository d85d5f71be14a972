"""Property tests of the pooling heads: each checks the formula its docstring states."""
import pytest
import torch

from wsl.models.layers.pooling import POOLINGS, GlobalAvgPool, GlobalMaxPool, LSEPool, TopKPool, WildcatPool


def maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("name", POOLINGS.names())
def test_every_pooling_maps_nchw_to_nc(name):
    pool = POOLINGS.build(name)
    z = maps(2, 3, 5, 7)
    out = pool(z)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    # channels_last input (a different memory layout) gives the same scores
    torch.testing.assert_close(pool(z.contiguous(memory_format=torch.channels_last)), out)


def test_unknown_pooling_lists_known_names():
    with pytest.raises(ValueError, match="known: avg, lse, max, topk, wildcat"):
        POOLINGS.build("gem")


def test_pooling_rejects_non_4d_input():
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        GlobalMaxPool()(torch.zeros(2, 3, 4))


def test_max_and_avg_formulas():
    z = maps(2, 3, 4, 4)
    torch.testing.assert_close(GlobalMaxPool()(z), z.flatten(2).max(-1).values)
    torch.testing.assert_close(GlobalAvgPool()(z), z.mean(dim=(2, 3)))


def test_gmp_gradient_hits_only_the_argmax():
    z = maps(1, 2, 6, 6).requires_grad_()
    GlobalMaxPool()(z).sum().backward()
    grad = z.grad.flatten(2)
    argmax = z.detach().flatten(2).argmax(-1)
    for c in range(2):
        expected = torch.zeros(36)
        expected[argmax[0, c]] = 1.0
        torch.testing.assert_close(grad[0, c], expected)


def test_lse_formula():
    z = maps(2, 3, 4, 5)
    beta = 2.5
    expected = torch.log(torch.exp(beta * z).mean(dim=(2, 3))) / beta
    torch.testing.assert_close(LSEPool(beta=beta)(z), expected)


def test_lse_large_beta_is_max_small_beta_is_mean():
    z = maps(2, 3, 8, 8)
    torch.testing.assert_close(LSEPool(beta=1000.0)(z), z.amax(dim=(2, 3)), atol=1e-2, rtol=0)
    torch.testing.assert_close(LSEPool(beta=1e-3)(z), z.mean(dim=(2, 3)), atol=2e-3, rtol=0)


def test_lse_stays_finite_for_huge_beta_and_flat_maps():
    z = maps(2, 3, 8, 8) * 50
    out = LSEPool(beta=1e4)(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, z.amax(dim=(2, 3)), atol=1e-3, rtol=0)
    zeros = torch.zeros(1, 2, 4, 4)
    for beta in (1e-4, 1.0, 1e4):
        torch.testing.assert_close(LSEPool(beta=beta)(zeros), torch.zeros(1, 2))
        torch.testing.assert_close(LSEPool(beta=beta)(zeros + 3.0), torch.full((1, 2), 3.0), atol=1e-3, rtol=0)


def test_lse_learnable_beta_gets_gradients_and_stays_positive():
    pool = LSEPool(beta=2.0, learnable=True)
    params = list(pool.parameters())
    assert len(params) == 1
    z = maps(2, 3, 4, 4)
    pool(z).sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().item() > 0
    with torch.no_grad():
        params[0].fill_(-50.0)  # any real value maps to a positive beta
    assert pool.beta.item() > 0
    fixed = LSEPool(beta=2.0)
    assert list(fixed.parameters()) == []
    assert "log_beta" in fixed.state_dict()  # a fixed beta still travels with checkpoints


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), True, "5"])
def test_lse_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        LSEPool(beta=beta)


def test_topk_with_k1_is_max_plus_min():
    z = maps(2, 3, 5, 5)
    torch.testing.assert_close(TopKPool(k=1)(z), z.amax(dim=(2, 3)) + z.amin(dim=(2, 3)))


def test_topk_formula():
    z = maps(2, 3, 4, 4)
    s = z.flatten(2).sort(dim=-1, descending=True).values
    torch.testing.assert_close(TopKPool(k=3)(z), s[..., :3].mean(-1) + s[..., -3:].mean(-1))


def test_wildcat_formula_and_alpha():
    z = maps(2, 3, 4, 4)
    s = z.flatten(2).sort(dim=-1, descending=True).values
    expected = s[..., :4].mean(-1) + 0.7 * s[..., -2:].mean(-1)
    torch.testing.assert_close(WildcatPool(kmax=4, kmin=2, alpha=0.7)(z), expected)
    torch.testing.assert_close(WildcatPool(kmax=4, kmin=0)(z), s[..., :4].mean(-1))
    torch.testing.assert_close(WildcatPool(kmax=4, kmin=2, alpha=0.0)(z), s[..., :4].mean(-1))


def test_wildcat_fraction_and_count_agree():
    z = maps(2, 3, 10, 10)  # 100 cells: 0.2 -> 20, 0.05 -> 5
    torch.testing.assert_close(WildcatPool(kmax=0.2, kmin=0.05, alpha=0.6)(z),
                               WildcatPool(kmax=20, kmin=5, alpha=0.6)(z))
    torch.testing.assert_close(TopKPool(k=0.1)(z), TopKPool(k=10)(z))


def test_k_larger_than_map_uses_whole_map():
    z = maps(2, 3, 2, 2)  # 4 cells
    torch.testing.assert_close(WildcatPool(kmax=50, kmin=50, alpha=1.0)(z), 2 * z.mean(dim=(2, 3)))
    torch.testing.assert_close(TopKPool(k=9)(z), 2 * z.mean(dim=(2, 3)))
    one = maps(2, 3, 1, 1)  # a 1x1 map: every pooling returns its value (topk twice: max + min)
    torch.testing.assert_close(WildcatPool(kmax=0.01, kmin=0)(one), one.flatten(1))
    for name in ("max", "avg", "lse"):
        torch.testing.assert_close(POOLINGS.build(name)(one), one.flatten(1))
    torch.testing.assert_close(TopKPool(k=3)(one), 2 * one.flatten(1))


@pytest.mark.parametrize("kwargs", [{"kmax": 0}, {"kmax": 1.5}, {"kmax": -2}, {"kmax": 2, "kmin": -1},
                                    {"kmax": "3"}, {"kmax": 2, "alpha": -0.5}])
def test_wildcat_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        WildcatPool(**kwargs)


@pytest.mark.parametrize("name", POOLINGS.names())
def test_poolings_pass_gradients_to_maps(name):
    z = maps(2, 3, 4, 4).requires_grad_()
    POOLINGS.build(name)(z).sum().backward()
    assert z.grad.abs().sum() > 0
