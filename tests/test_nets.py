"""Tests of ko_lightning.nets: shapes, time dependence, batch independence, sizes and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from kinetic_helpers import ELEMENTARY_REL, U32, gamma
from ko_lightning.nets import DIGITS_UNET_CONFIG, SinusoidalTimeEmbedding, TimeMLP, UNet


def _perturb_output_layer(net: UNet, seed: int = 0) -> None:
    """Give the zero-initialized output conv random weights so that the output reflects the whole network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


#: SiLU in fp32, x / (1 + exp(-x)): the exp (ELEMENTARY_REL), the sum and the division.
_SILU_REL = ELEMENTARY_REL + 3 * U32


def _mlp_rounding_bound(net: TimeMLP, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """First-order worst-case fp32 rounding of ``net(x, t)`` (a SiLU TimeMLP), per output.

    Reference: exact arithmetic on the embedding's fp32 arguments (products of fp32 numbers, the same however the
    batch is formed). Local errors: sin / cos within ELEMENTARY_REL; a Linear layer with K inputs,
    ``gamma(K + 1) (|W| |h| + |b|)`` per output unit (any summation order); SiLU, ``_SILU_REL |silu(y)|``. Each is
    carried to the outputs by the float64 Jacobian (autograd: ``sum_j |d out / d unit_j| x local error_j``).
    """
    emb_mod = net.time_embedding
    half = emb_mod.dim // 2
    k = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(emb_mod.max_period) * k / half)
    args = ((emb_mod.scale * t.float())[:, None] * freqs[None, :]).double()
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = torch.nn.functional.pad(emb, (0, emb_mod.dim - emb.shape[1]))
    local = [torch.full_like(emb, ELEMENTARY_REL)]
    probes = [torch.zeros_like(emb, requires_grad=True)]
    h = torch.cat([x.double(), emb + probes[0]], dim=1)
    for layer in net.net:
        if isinstance(layer, torch.nn.Linear):
            w, b = layer.weight.detach().double(), layer.bias.detach().double()
            local.append(gamma(w.shape[1] + 1) * (h.detach().abs() @ w.abs().T + b.abs()))
            h = h @ w.T + b
        else:
            assert isinstance(layer, torch.nn.SiLU), layer
            h = torch.nn.functional.silu(h)
            local.append(_SILU_REL * h.detach().abs())
        probes.append(torch.zeros_like(h, requires_grad=True))
        h = h + probes[-1]
    bound = torch.zeros_like(h.detach())
    for o in range(h.shape[1]):  # the rows are independent samples: one backward pass per output column
        grads = torch.autograd.grad(h[:, o].sum(), probes, retain_graph=True)
        bound[:, o] = sum((g.abs() * e).sum(1) for g, e in zip(grads, local, strict=True))
    return bound


# ----------------------------------------------------------------------------------------------- embedding
def test_sinusoidal_embedding_values_and_shape() -> None:
    emb = SinusoidalTimeEmbedding(16)
    out = emb(torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == (3, 16) and out.dtype == torch.float32
    # t = 0: cos features are 1, sin features are 0 (cos(0), sin(0) within ELEMENTARY_REL of 1 and 0)
    torch.testing.assert_close(out[0], torch.cat([torch.ones(8), torch.zeros(8)]), atol=ELEMENTARY_REL, rtol=0)
    # the first frequency is exp(0) = 1: feature 0 is cos(scale * t) of the same fp32 argument 500, within
    # ELEMENTARY_REL of the exact value in both evaluations (vectorized or not)
    torch.testing.assert_close(out[1, 0], torch.cos(torch.tensor(500.0)), atol=2 * ELEMENTARY_REL, rtol=0)
    # every row lies on a product of circles: cos^2 + sin^2 = 1 per frequency (each within ELEMENTARY_REL,
    # squared: 2 (ELEMENTARY_REL + u), plus the sum's rounding)
    torch.testing.assert_close(
        out[:, :8] ** 2 + out[:, 8:] ** 2, torch.ones(3, 8), atol=2 * ELEMENTARY_REL + 3 * U32, rtol=0
    )


def test_sinusoidal_embedding_odd_dim_scale_and_real_valued_input() -> None:
    emb = SinusoidalTimeEmbedding(7, scale=1.0)
    out = emb(torch.tensor([-12.0, 0.0, 3.5, 20.0]))  # log-SNR-like values outside [0, 1]
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, -1] == 0)  # padding column
    # distinct inputs give distinct embeddings
    assert torch.cdist(out, out).fill_diagonal_(1.0).min() > 1e-3  # >> fp32 rounding, ~ELEMENTARY_REL sqrt(dim)
    with pytest.raises(ValueError, match="dim"):
        SinusoidalTimeEmbedding(1)


# ---------------------------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("dim,batch", [(2, 5), (3, 1), (64, 17)])
def test_time_mlp_shapes(dim: int, batch: int) -> None:
    net = TimeMLP(dim=dim, hidden=32, depth=2, time_embed_dim=8)
    out = net(torch.randn(batch, dim), torch.rand(batch))
    assert out.shape == (batch, dim)


def test_time_mlp_default_size_is_plain_4x512() -> None:
    net = TimeMLP()
    expected = (2 + 64) * 512 + 512 + 3 * (512 * 512 + 512) + 512 * 2 + 2
    assert _n_params(net) == expected
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5


def test_time_mlp_time_dependence_scalar_t_and_batch_independence() -> None:
    torch.manual_seed(0)
    net = TimeMLP(dim=2, hidden=64, depth=3).eval()
    x = torch.randn(8, 2)
    out_a = net(x, torch.full((8,), 0.2))
    out_b = net(x, torch.full((8,), 0.7))
    assert (out_a - out_b).abs().max() > 1e-3  # >> twice _mlp_rounding_bound (~1e-5 here)
    # a scalar t is broadcast: the same values through the same kernels, bitwise
    torch.testing.assert_close(net(x, torch.tensor(0.2)), out_a, atol=0, rtol=0)
    t = torch.rand(8)
    full = net(x, t)
    # one row alone takes other matmul kernels (another summation order): both within the fp32 rounding bound
    tol = 2 * _mlp_rounding_bound(net, x, t)
    for i in (0, 5):
        err = (net(x[i : i + 1], t[i : i + 1]) - full[i : i + 1]).double().abs()
        assert bool((err <= tol[i : i + 1]).all()), (err, tol[i])


def test_time_mlp_errors() -> None:
    with pytest.raises(ValueError, match="activation"):
        TimeMLP(activation="swishy")
    with pytest.raises(ValueError, match="depth"):
        TimeMLP(depth=0)
    net = TimeMLP(dim=2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(4, 2), torch.rand(3))


# --------------------------------------------------------------------------------------------------- UNet
_SMALL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, groups=4)
#: float64 rounding of the small 8x8 UNets below (outputs O(1)). Rounding errors scale with the unit roundoff:
#: these networks in fp32 (u = 6e-8) stay within ~2e-6 of float64, an error constant of ~30 u; in float64
#: (u = 1.1e-16) that is ~3e-15, and a worst-case alignment of ~15 layers' sums of <= 32 x 9 = 288 terms
#: (gamma_288 ~ 300 u each) stays below 1e-10.
_UNET_F64_TOL = 1e-10


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(in_channels=1, image_size=8, **_SMALL), (2, 1, 8, 8)),
        (dict(in_channels=3, image_size=16, attention_resolutions=(8,), **_SMALL), (3, 3, 16, 16)),
        (
            dict(in_channels=3, image_size=32, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, groups=4),
            (2, 3, 32, 32),
        ),
        (
            dict(
                in_channels=3,
                image_size=64,
                base_channels=8,
                channel_mults=(1, 1, 2, 2),
                num_res_blocks=1,
                attention_resolutions=(8,),
                groups=4,
                mid_attention=False,
            ),
            (1, 3, 64, 64),
        ),
    ],
)
def test_unet_output_shapes_and_zero_init(kwargs: dict, shape: tuple[int, ...]) -> None:
    net = UNet(**kwargs)
    out = net(torch.randn(shape), torch.rand(shape[0]))
    assert out.shape == shape
    assert torch.all(out == 0)  # zero-initialized output conv


def test_unet_out_channels() -> None:
    net = UNet(in_channels=3, image_size=8, out_channels=6, **_SMALL)
    assert net(torch.randn(2, 3, 8, 8), torch.rand(2)).shape == (2, 6, 8, 8)


def test_unet_depends_on_t_and_on_x() -> None:
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, attention_resolutions=(4,), **_SMALL).eval()
    _perturb_output_layer(net)
    x = torch.randn(4, 1, 8, 8)
    # In float64, where rounding (< _UNET_F64_TOL) cannot fake a dependence: the outputs must move by 1e-4.
    net64 = net.double()
    out_a = net64(x.double(), torch.full((4,), 0.1))
    out_b = net64(x.double(), torch.full((4,), 0.9))
    assert (out_a - out_b).abs().max() > 1e-4
    out_c = net64(x.double() + 0.5 * torch.randn_like(x.double()), torch.full((4,), 0.1))
    assert (out_a - out_c).abs().max() > 1e-4
    net = net.float()
    # a real-valued conditioning outside [0, 1] (e.g. log-SNR) is accepted
    out_d = net(x, torch.tensor([-8.0, -1.0, 2.5, 9.0]))
    assert torch.isfinite(out_d).all()
    # scalar t broadcast: the same values through the same kernels, bitwise
    torch.testing.assert_close(net(x, torch.tensor(0.1)), net(x, torch.full((4,), 0.1)), atol=0, rtol=0)


def test_unet_batch_independence_in_eval_mode() -> None:
    torch.manual_seed(1)
    net = UNet(in_channels=1, image_size=8, attention_resolutions=(8, 4), **_SMALL).eval()
    _perturb_output_layer(net)
    # In float64: other batch sizes take other conv / matmul kernels, so only rounding may differ
    # (< _UNET_F64_TOL); any coupling of the samples would move the outputs by orders of magnitude more.
    net = net.double()
    x, t = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.rand(5)
    full = net(x, t)
    alone = net(x[2:3], t[2:3])
    torch.testing.assert_close(alone, full[2:3], rtol=0, atol=_UNET_F64_TOL)
    x2, t2 = x.clone(), t.clone()
    x2[[0, 1, 3, 4]] = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t2[[0, 1, 3, 4]] = torch.rand(4)
    torch.testing.assert_close(net(x2, t2)[2], full[2], rtol=0, atol=_UNET_F64_TOL)


def test_unet_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(2)
    net = UNet(in_channels=1, image_size=8, attention_resolutions=(4,), **_SMALL)
    _perturb_output_layer(net)
    net(torch.randn(3, 1, 8, 8), torch.rand(3)).pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_unet_dropout_only_in_train_mode() -> None:
    torch.manual_seed(3)
    net = UNet(in_channels=1, image_size=8, dropout=0.5, **_SMALL)
    _perturb_output_layer(net)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    net.train()
    assert (net(x, t) - net(x, t)).abs().max() > 0
    net.eval()
    torch.testing.assert_close(net(x, t), net(x, t), atol=0, rtol=0)  # deterministic kernels: bitwise


def test_unet_bf16_autocast_runs() -> None:
    net = UNet(in_channels=1, image_size=8, **_SMALL)
    _perturb_output_layer(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out.float()).all()


def test_unet_digits_config_has_about_1_8m_parameters() -> None:
    net = UNet(**DIGITS_UNET_CONFIG)
    n = _n_params(net)
    assert abs(n - 1.8e6) / 1.8e6 < 0.10, n
    assert net(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=12, channel_mults=(1, 2, 2, 2)), "image_size"),
        (dict(base_channels=20, groups=8), "groups"),
        (dict(image_size=8, channel_mults=(1, 2), attention_resolutions=(2,)), "attention_resolutions"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(base_channels=24, groups=8, num_heads=5), "num_heads"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_unet_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_unet_bad_input_shape() -> None:
    net = UNet(in_channels=1, image_size=8, **_SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(2, 1, 8, 8), torch.rand(5))
