"""Time-conditioned networks ``net(x, t)`` (``net(x, t, cond=None)`` when conditional). Any ``nn.Module`` with this
signature works with ko_lightning."""

from ko_lightning.nets.embedding import ConditionEmbedding, SinusoidalTimeEmbedding, expand_time
from ko_lightning.nets.mlp import ACTIVATIONS, TimeMLP, make_activation
from ko_lightning.nets.unet import DIGITS_UNET_CONFIG, AttentionBlock, ResBlock, UNet

__all__ = [
    "ACTIVATIONS",
    "DIGITS_UNET_CONFIG",
    "AttentionBlock",
    "ConditionEmbedding",
    "ResBlock",
    "SinusoidalTimeEmbedding",
    "TimeMLP",
    "UNet",
    "expand_time",
    "make_activation",
]
