"""Image features: per-family image processors and the content-addressed feature store."""

from rollwire.features.processor import ImageProcessor, PixelFormat, WireField
from rollwire.features.qwen_vl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionConfig, process_image, smart_resize
from rollwire.features.store import FeatureStore, ImageFeatures, PinLease, StoreStats, compute_features

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "FeatureStore",
    "ImageFeatures",
    "ImageProcessor",
    "PinLease",
    "PixelFormat",
    "StoreStats",
    "VisionConfig",
    "WireField",
    "compute_features",
    "process_image",
    "smart_resize",
]
