"""Shared fixtures: tiny ViTs (32 px, patch 8 -> 16 patches + class token, dim 64, depth 4)."""
import pytest
import timm
import torch

import vit_moe  # noqa: F401  registers the models

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)


def tiny_dense(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', **dict(TINY_VIT, **overrides)).eval()


@pytest.fixture
def dense():
    return tiny_dense()


@pytest.fixture
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
