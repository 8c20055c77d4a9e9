"""Data: ImageNet-style folders with clear errors and a bad-image policy, timm transforms, the digits demo data."""
from .dataset import (
    BadImageError, BadImageLog, ImageFolderDataset, check_image_folder, ignore_stop_signals, verify_images,
)
from .digits import write_digits_image_folder
from .transforms import build_transforms, data_config_for
