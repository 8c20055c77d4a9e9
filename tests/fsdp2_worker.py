"""A short FSDP2 training run on CPU, driven the way Accelerate drives it on GPUs (run by tests/test_fsdp.py).

Accelerate refuses FSDP on CPU, so this worker builds the FullyShardedDataParallelPlugin from the shipped
`configs/accelerate/fsdp2.yaml` and calls Accelerate's own `fsdp2_prepare_model` (what `accelerator.prepare`
runs for FSDP2) on a stand-in accelerator, over gloo. The step is the trainer's (`vit_moe.training.forward_loss`,
timm's AdamW through `vit_moe.training.create_optimizer`, gradient clipping); the full weights are gathered as
`accelerator.get_state_dict` gathers them under FSDP2.

    python tests/fsdp2_worker.py SETTINGS_JSON                                   # one process, no sharding
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py SETTINGS_JSON

Writes `<out>/result_<world>.json` (losses, what each rank holds) and `<out>/model_<world>.safetensors`.
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import vit_moe  # noqa: F401  registers the models
from vit_moe import _cli
from vit_moe.training import create_optimizer, forward_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_on_cpu import ROOT, plugin_from_config  # noqa: E402


def shard(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    plugin = plugin_from_config(ROOT / 'configs' / 'accelerate' / 'fsdp2.yaml')
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  mixed_precision='no', is_main_process=rank == 0, device=torch.device('cpu'))
    return fsdp2_prepare_model(accelerator, model)


def main(settings: dict) -> None:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if world > 1:
        dist.init_process_group('gloo')
        assert dist.get_world_size() == world  # not independent processes
    torch.manual_seed(0)  # the same initial model on every rank and in the single-process run
    model = timm.create_model('vit_ti16_moe_upcycled', **settings['model_kwargs'])
    if settings.get('grad_checkpointing'):
        model.set_grad_checkpointing(True)
    if world > 1:
        model = shard(model, rank)
    optimizer = create_optimizer(model, lr=settings['lr'], weight_decay=0.05)
    generator = torch.Generator().manual_seed(1)
    losses, global_batch, size = [], settings['global_batch'], settings['model_kwargs']['img_size']
    for _ in range(settings['steps']):
        images = torch.randn(global_batch, 3, size, size, generator=generator)
        targets = torch.randint(0, settings['model_kwargs']['num_classes'], (global_batch,), generator=generator)
        local = slice(rank * global_batch // world, (rank + 1) * global_batch // world)  # this rank's share
        loss, _, _, routing = forward_loss(model, images[local], targets[local], torch.nn.functional.cross_entropy)
        loss.backward()  # FSDP2 reduce-scatters the gradients: their mean over ranks = the global batch's gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())

    held = {}
    for name, param in model.named_parameters():
        local_param = param.to_local() if hasattr(param, 'to_local') else param
        held[name] = dict(global_shape=list(param.shape), local_shape=list(local_param.shape))
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # what accelerator.get_state_dict does for FSDP2
    else:
        state = model.state_dict()
    out = Path(settings['out'])
    (out / f'held_{world}_{rank}.json').write_text(json.dumps(held))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f'model_{world}.safetensors'))
        (out / f'result_{world}.json').write_text(json.dumps(dict(losses=losses, world=world,
                                                                  routed_layers=sorted(routing.layers))))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
    _cli.leave(0)  # a process of a distributed launch ends without interpreter finalization (see vit_moe._cli)
