"""Data: the bundled cluttered-digits datasets, the scikit-image sample photos, the training
loaders (digits or an ImageFolder) and the evaluation transform a model's ``pretrained_cfg`` describes.

from msvit.data import ClutteredDigits, DenseClutteredDigits, sample_photos, normalize
"""

from msvit.data.digits import ClutteredDigits, DenseClutteredDigits, DigitSample, region_overlap
from msvit.data.sample_images import IMAGENET_MEAN, IMAGENET_STD, normalize, sample_photos
from msvit.data.transforms import eval_transform

__all__ = [
    "ClutteredDigits",
    "DenseClutteredDigits",
    "DigitSample",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "eval_transform",
    "normalize",
    "region_overlap",
    "sample_photos",
]
