""" One pass over an image folder with a model (and its start model) under `capture_routing(keep_tensors=True)`: what
the slot report (`routing_report`) and the Soft MoE report (`soft_routing_report`) both read.
"""
from typing import Callable, Dict, Iterator, NamedTuple, Tuple

import torch

from ..layers import RoutingCapture, capture_routing
from .routing_stats import patch_categories

__all__ = ['RoutingPass', 'PassBatch']


class PassBatch(NamedTuple):
    """The readable images of one batch and what every model's MoE layers did on them."""
    targets: torch.Tensor  # [B]
    positions: torch.Tensor  # [B] position of each image in the loader's order
    display: torch.Tensor  # [B, 3, H, W] the images un-normalised, in [0, 1]
    categories: torch.Tensor  # [B, T] PREFIX / BACKGROUND / OBJECT per token
    captures: Dict[str, RoutingCapture]  # model key ('model', 'start') -> its routing capture


class RoutingPass:
    """Runs `models` (key -> model; 'model' is scored) in eval and inference mode over batches of (images, targets,
    readable), unreadable images left out; counts images, left-out images and the 'model''s correct top-1."""

    def __init__(self, models: Dict[str, torch.nn.Module], data_config: Dict, background_threshold: float,
                 device: torch.device):
        model = models['model']
        self.models, self.device, self.background_threshold = models, device, background_threshold
        self.mean = torch.tensor(data_config['mean']).view(1, -1, 1, 1)
        self.std = torch.tensor(data_config['std']).view(1, -1, 1, 1)
        self.patch_size: Tuple[int, int] = tuple(model.patch_embed.patch_size)
        self.num_prefix = int(getattr(model, 'num_prefix_tokens', 0))
        self.num_images = self.num_excluded = self.correct = 0

    def batches(self, loader, progress: Callable = lambda it, total: it) -> Iterator[PassBatch]:
        """Every batch with at least one readable image; the models' modes are restored when the pass ends."""
        was_training = {key: m.training for key, m in self.models.items()}
        for m in self.models.values():
            m.eval()
        position = 0
        try:
            with torch.inference_mode():
                for images, targets, readable in progress(loader, len(loader)):
                    positions = torch.arange(position, position + len(targets))
                    position += len(targets)
                    keep = readable.bool()
                    self.num_excluded += int((~keep).sum())
                    if not keep.any():
                        continue
                    images, targets, positions = images[keep], targets[keep], positions[keep]
                    display = (images * self.std + self.mean).clamp(0, 1)
                    categories = patch_categories(display, self.patch_size, self.num_prefix, self.background_threshold)
                    self.num_images += len(targets)
                    captures = {}
                    for key, m in self.models.items():
                        with capture_routing(keep_tensors=True) as captures[key]:
                            logits = m(images.to(self.device))
                        if key == 'model':
                            self.correct += int((logits.argmax(dim=-1).cpu() == targets).sum())
                    yield PassBatch(targets, positions, display, categories, captures)
        finally:
            for key, m in self.models.items():
                m.train(was_training[key])
