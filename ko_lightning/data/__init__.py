"""Lightning data modules: 2D toys, sklearn digits (offline) and images already on disk.

Every module yields plain tensor batches ``x`` of shape ``(B, *data_shape)``, is seeded, never downloads, and
exposes ``normalize``/``denormalize``, ``data_shape`` and ``train_tensor()`` (the training set in model space, the
input of the KO separation estimator). The training loaders' position in the epoch is saved in Lightning checkpoints,
so a run resumed mid-epoch repeats the uninterrupted one (:class:`IndexBatchLoader`).
"""

from ko_lightning.data.base import (
    IndexBatchLoader,
    IndexBatchSampler,
    IndexedTransform,
    TensorBatchDataset,
    make_loader,
    moment_normalization,
)
from ko_lightning.data.digits import DigitsDataModule
from ko_lightning.data.images import ImageDataModule, load_image_array, load_image_folder, load_images
from ko_lightning.data.toy2d import (
    TOY2D_SAMPLERS,
    Toy2DDataModule,
    on_checkerboard,
    sample_checkerboard,
    sample_eight_gaussians,
    sample_mixture12,
    sample_moons,
    sample_rings,
    sample_spiral,
)

__all__ = [
    "TOY2D_SAMPLERS",
    "DigitsDataModule",
    "ImageDataModule",
    "IndexBatchLoader",
    "IndexBatchSampler",
    "IndexedTransform",
    "TensorBatchDataset",
    "Toy2DDataModule",
    "load_image_array",
    "load_image_folder",
    "load_images",
    "make_loader",
    "moment_normalization",
    "on_checkerboard",
    "sample_checkerboard",
    "sample_eight_gaussians",
    "sample_mixture12",
    "sample_moons",
    "sample_rings",
    "sample_spiral",
]
