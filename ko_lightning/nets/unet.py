"""A small time-conditioned U-Net for images from 8 x 8 to 64 x 64."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ko_lightning.nets.embedding import ConditionEmbedding, SinusoidalTimeEmbedding, expand_time

__all__ = ["DIGITS_UNET_CONFIG", "AttentionBlock", "ResBlock", "UNet"]

DIGITS_UNET_CONFIG: dict[str, object] = {
    "in_channels": 1,
    "image_size": 8,
    "base_channels": 32,
    "channel_mults": (1, 2, 2),
    "num_res_blocks": 2,
    "attention_resolutions": (4,),
}
"""Keyword arguments of the ~1.8M-parameter U-Net for 8 x 8 digits: ``UNet(**DIGITS_UNET_CONFIG)``."""


class ResBlock(nn.Module):
    """Residual block with time-embedding injection by scale and shift (FiLM) after the second GroupNorm.

        h = conv1(silu(GN(x)));  (a, b) = Linear(silu(emb));  h = conv2(dropout(silu(GN(h) * (1 + a) + b)))
        out = skip(x) + h,  with skip a 1x1 conv when the channel count changes (identity otherwise).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        emb_dim: size of the time embedding.
        dropout: dropout probability before the second convolution.
        groups: GroupNorm groups (must divide both channel counts).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the ``H * W`` positions of each image separately.

    Args:
        channels: feature channels (divisible by ``num_heads`` and ``groups``).
        num_heads: attention heads.
        groups: GroupNorm groups.
    """

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class _Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A residual block followed by optional attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class UNet(nn.Module):
    """A DDPM-style U-Net ``net(x, t, cond=None)`` for square images, output shaped like the input.

    Layout: a 3x3 input conv; per resolution level ``i`` (channels ``base_channels * channel_mults[i]``),
    ``num_res_blocks`` residual blocks (+ self-attention where the resolution is in ``attention_resolutions``) and a
    stride-2 conv to the next level; a middle of residual block, attention (``mid_attention``), residual block; the
    mirrored decoder with ``num_res_blocks + 1`` blocks per level, each fed the matching encoder activation by
    concatenation, and nearest-neighbour upsampling + conv; finally GroupNorm, SiLU and a **zero-initialized** 3x3
    conv (the network outputs 0 at initialization). Time enters every residual block by scale and shift of its
    second GroupNorm, from ``MLP(sinusoidal(t))`` of width ``4 * base_channels``. GroupNorm and attention act on
    each sample separately, so in eval mode the output for one sample does not depend on the rest of the batch.

    Sizes: the digits configuration :data:`DIGITS_UNET_CONFIG`, ``UNet(in_channels=1, image_size=8,
    base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4,))`` (levels 8, 4, 2 with
    32, 64, 64 channels, attention at 4 x 4 and in the middle), has about 1.8M parameters (1,742,881). The plain
    defaults (``base_channels=64, channel_mults=(1, 2)``) give 3.97M on 8 x 8. A CIFAR-10 size:
    ``UNet(3, 32, 128, (1, 2, 2, 2), 2, (16,), 0.1, groups=32)`` (38.3M).

    Args:
        in_channels: image channels.
        image_size: side length of the (square) input; divisible by ``2 ** (len(channel_mults) - 1)``.
        base_channels: channels of the first level (divisible by ``groups``).
        channel_mults: channel multiplier of each resolution level (one level per entry).
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: resolutions (side lengths, e.g. ``(16,)``) at which self-attention is added; each
            must be a resolution of the network (``image_size / 2**i``).
        dropout: dropout probability inside the residual blocks.
        groups: GroupNorm groups.
        out_channels: output channels (default ``in_channels``).
        num_heads: attention heads (must divide the channels where attention is used).
        mid_attention: add self-attention in the middle block.
        time_scale: multiplier applied to ``t`` in the sinusoidal embedding (1000 for ``t in [0, 1]``).
        num_classes: class-conditional with ``num_classes`` labels: a learned class embedding
            (:class:`~ko_lightning.nets.embedding.ConditionEmbedding`, index ``num_classes`` = "no condition") is added
            to the time embedding (docs/math.md §7).
        cond_dim: conditional on a float vector of this width, embedded linearly (a NaN row = "no condition").

    Example:
        >>> net = UNet(in_channels=1, image_size=8)
        >>> net(torch.randn(4, 1, 8, 8), torch.rand(4)).shape
        torch.Size([4, 1, 8, 8])
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        groups: int = 8,
        out_channels: int | None = None,
        num_heads: int = 4,
        mid_attention: bool = True,
        time_scale: float = 1000.0,
        num_classes: int | None = None,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("image_size", image_size, 1)
        _check_int("base_channels", base_channels, 1)
        _check_int("num_res_blocks", num_res_blocks, 1)
        _check_int("groups", groups, 1)
        _check_int("num_heads", num_heads, 1)
        out_channels = in_channels if out_channels is None else _check_int("out_channels", out_channels, 1)
        channel_mults = tuple(channel_mults)
        if not channel_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in channel_mults):
            raise ValueError(f"channel_mults must be a non-empty sequence of positive ints, got {channel_mults!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mults) - 1) = {factor} "
                f"(channel_mults={channel_mults} gives {len(channel_mults)} levels)"
            )
        widths = [base_channels * m for m in channel_mults]
        bad = [w for w in [base_channels, *widths] if w % groups]
        if bad:
            raise ValueError(
                f"groups={groups} must divide every channel count; base_channels={base_channels} with "
                f"channel_mults={channel_mults} gives {bad}"
            )
        resolutions = [image_size // 2**i for i in range(len(channel_mults))]
        attention_resolutions = tuple(attention_resolutions)
        unknown = [r for r in attention_resolutions if r not in resolutions]
        if unknown:
            raise ValueError(
                f"attention_resolutions={attention_resolutions} contains {unknown}, not a resolution of this network; "
                f"its resolutions are {resolutions}"
            )
        attn_widths = [w for w, r in zip(widths, resolutions, strict=True) if r in attention_resolutions]
        if mid_attention:
            attn_widths.append(widths[-1])
        if any(w % num_heads for w in attn_widths):
            raise ValueError(f"num_heads={num_heads} must divide the attention channels {sorted(set(attn_widths))}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.channel_mults = channel_mults
        self.attention_resolutions = attention_resolutions
        emb_dim = 4 * base_channels
        self.time_embedding = nn.Sequential(
            SinusoidalTimeEmbedding(base_channels, scale=time_scale),
            nn.Linear(base_channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.num_classes, self.cond_dim = num_classes, cond_dim
        self.cond_embedding = (
            None
            if num_classes is None and cond_dim is None
            else ConditionEmbedding(emb_dim, num_classes=num_classes, cond_dim=cond_dim)
        )

        def attention(channels: int, resolution: int) -> AttentionBlock | None:
            return AttentionBlock(channels, num_heads, groups) if resolution in attention_resolutions else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, (width, res) in enumerate(zip(widths, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                self.down.append(_Stage(ResBlock(ch, width, emb_dim, dropout, groups), attention(width, res)))
                ch = width
                skip_channels.append(ch)
            if level < len(widths) - 1:
                self.down.append(_Downsample(ch))
                skip_channels.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout, groups)
        self.mid_attn = AttentionBlock(ch, num_heads, groups) if mid_attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout, groups)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, res = widths[level], resolutions[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    _Stage(ResBlock(ch + skip_channels.pop(), width, emb_dim, dropout, groups), attention(width, res))
                )
                ch = width
            if level > 0:
                self.up.append(_Upsample(ch))

        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        if self.conv_out.bias is not None:  # always, with Conv2d's default bias=True; narrows the type
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Evaluate on images ``x`` of shape ``(B, in_channels, image_size, image_size)`` and conditioning ``t`` of
        shape ``(B,)`` (or a scalar; any real values); returns ``(B, out_channels, image_size, image_size)``.
        ``cond``: labels ``(B,)`` or floats ``(B, cond_dim)`` for a conditional network (None: "no condition")."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        t = expand_time(t, x.shape[0], x.device)
        emb_in = self.time_embedding[0](t).to(self.time_embedding[1].weight.dtype)
        emb = self.time_embedding[1:](emb_in)
        if self.cond_embedding is not None:
            emb = emb + self.cond_embedding(cond, x.shape[0], x.device).to(emb.dtype)
        elif cond is not None:
            raise ValueError("cond was given but this UNet is unconditional (build it with num_classes or cond_dim)")

        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, emb) if isinstance(module, _Stage) else module(h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for module in self.up:
            if isinstance(module, _Stage):
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))
