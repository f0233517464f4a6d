"""Lightning data modules: 2D toys, sklearn digits (offline) and images already on disk.

Every module yields plain tensor batches ``x`` of shape ``(B, *data_shape)``, is seeded, never downloads, and
exposes ``normalize``/``denormalize``, ``data_shape`` and ``train_tensor()`` (the training set in model space, the
input of the KO separation estimator). The training loaders' position in the epoch is saved in Lightning checkpoints,
so a run resumed mid-epoch repeats the uninterrupted one (:class:`IndexBatchLoader`).

With ``labels=True`` the batches are tuples ``(x, y)`` instead, ``y`` the int64 class labels ``(B,)`` of the
samples; the module then has ``num_classes`` (None without labels) and ``labels_tensor(split)``, the labels of a
split aligned with its tensor (``train_tensor()`` and the other tensor helpers stay plain tensors).
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
from ko_lightning.data.images import (
    ImageDataModule,
    load_image_array,
    load_image_folder,
    load_images,
    load_labelled_images,
)
from ko_lightning.data.toy2d import (
    TOY2D_LABELLED_SAMPLERS,
    TOY2D_NUM_CLASSES,
    TOY2D_SAMPLERS,
    Toy2DDataModule,
    checkerboard_square,
    on_checkerboard,
    sample_checkerboard,
    sample_checkerboard_with_labels,
    sample_eight_gaussians,
    sample_eight_gaussians_with_labels,
    sample_mixture12,
    sample_mixture12_with_labels,
    sample_moons,
    sample_moons_with_labels,
    sample_pinwheel,
    sample_pinwheel_with_labels,
    sample_rings,
    sample_rings_with_labels,
    sample_spiral,
)

__all__ = [
    "TOY2D_LABELLED_SAMPLERS",
    "TOY2D_NUM_CLASSES",
    "TOY2D_SAMPLERS",
    "DigitsDataModule",
    "ImageDataModule",
    "IndexBatchLoader",
    "IndexBatchSampler",
    "IndexedTransform",
    "TensorBatchDataset",
    "Toy2DDataModule",
    "checkerboard_square",
    "load_image_array",
    "load_image_folder",
    "load_images",
    "load_labelled_images",
    "make_loader",
    "moment_normalization",
    "on_checkerboard",
    "sample_checkerboard",
    "sample_checkerboard_with_labels",
    "sample_eight_gaussians",
    "sample_eight_gaussians_with_labels",
    "sample_mixture12",
    "sample_mixture12_with_labels",
    "sample_moons",
    "sample_pinwheel",
    "sample_pinwheel_with_labels",
    "sample_moons_with_labels",
    "sample_rings",
    "sample_rings_with_labels",
    "sample_spiral",
]
