"""The parallelize step's gradient handling, in one process: clipping applies to the gradients the update applies."""
import copy

import pytest
import timm
import torch
import torch.distributed as dist
from accelerate import Accelerator

from vit_moe.training.evaluation import fresh_accelerator_state
from vit_moe.training.expert_parallel import ExpertShards
from vit_moe.training.parallelize import Parallelism

from conftest import TRAIN_MOE


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _clipped_update(model, images, targets, loss_scale):
    """The parameter change of one SGD step (lr 1) after the expert-parallel clipping path, with the loss scaled by
    a GradScaler (fp16's) when `loss_scale` is set."""
    fresh_accelerator_state()
    accelerator = Accelerator(cpu=True, mixed_precision='fp16' if loss_scale else 'no')
    if loss_scale:  # what Accelerate sets up for fp16 on a GPU
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler('cpu', init_scale=loss_scale)
    parallel = Parallelism(accelerator)
    parallel.shards = ExpertShards(1, 1, 'cpu')  # an expert-parallel group of one process: the same code path
    parallel.shards.shard(model)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(images), targets)
    accelerator.backward(loss)
    parallel.reduce_gradients(model)
    norm = parallel.clip_grad_norm_(model, model, max_norm=1e-3)
    optimizer.step()
    return norm, {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_fp16_expert_parallel_clipping_clips_the_unscaled_gradients(one_process_group):
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', num_classes=3, **TRAIN_MOE)
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    plain_norm, plain = _clipped_update(copy.deepcopy(model), images, targets, loss_scale=None)
    scaled_norm, scaled = _clipped_update(copy.deepcopy(model), images, targets, loss_scale=2.0 ** 16)
    assert plain_norm > 1e-3  # clipping is active
    torch.testing.assert_close(scaled_norm, plain_norm, rtol=1e-5, atol=0)  # the norm of the unscaled gradients
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-4, atol=1e-10, msg=name)
