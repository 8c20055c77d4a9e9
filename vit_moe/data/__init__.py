"""Data: ImageNet-style folders with clear errors and a bad-image policy, timm transforms, the digits demo data,
data-loader workers that survive a stop signal."""
from .dataset import BadImageError, BadImageLog, ImageFolderDataset, check_image_folder, verify_images
from .digits import write_digits_image_folder
from .stop_signals import STOP_SIGNALS, WorkerSignals, ignore_stop_signals, iter_with_shielded_workers
from .transforms import build_transforms, data_config_for
