"""Time-conditioned networks ``net(x, t)``. Any ``nn.Module`` with this signature works with ko_lightning."""

from ko_lightning.nets.embedding import SinusoidalTimeEmbedding, expand_time
from ko_lightning.nets.mlp import ACTIVATIONS, TimeMLP, make_activation
from ko_lightning.nets.unet import DIGITS_UNET_CONFIG, AttentionBlock, ResBlock, UNet

__all__ = [
    "ACTIVATIONS",
    "DIGITS_UNET_CONFIG",
    "AttentionBlock",
    "ResBlock",
    "SinusoidalTimeEmbedding",
    "TimeMLP",
    "UNet",
    "expand_time",
    "make_activation",
]
