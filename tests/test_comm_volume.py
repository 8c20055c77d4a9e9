"""The bytes-moved formula (vit_moe.planning.comm_volume) against the collectives of a real 4-process run (in CI
through tests/trainer_driver.py's launch server: 4 processes forked from one that imported torch once, with
torch.distributed.run's environment)."""
import importlib.util
import json

import pytest
import timm
import torch

import vit_moe  # noqa: F401  registers the models
from conftest import ROOT, launch_processes, run_script, script_env
from trainer_driver import Launcher
from vit_moe.layers import moe_layers
from vit_moe.planning.comm_volume import comm_volume


def _tiny_kwargs():
    """The tiny model `benchmarks/comm_volume.py --measure` runs."""
    spec = importlib.util.spec_from_file_location('comm_volume_script', ROOT / 'benchmarks' / 'comm_volume.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY


def _bank_numel(**kwargs):
    """Elements of one MoE layer's routed expert bank (every expert) of the tiny model, and its experts."""
    with torch.device('meta'):
        model = timm.create_model('vit_ti16_moe_upcycled', **dict(_tiny_kwargs(), **kwargs))
    (layer,) = moe_layers(model).values()
    return sum(p.numel() for p in layer.experts.parameters()), layer.num_experts


@pytest.mark.parametrize('launch', ['server', pytest.param('torchrun', marks=pytest.mark.stress)])
def test_the_formula_is_what_a_2_x_2_run_moves_for_every_strategy(tmp_path, launch):
    """DDP, FSDP2, expert parallelism with DDP and with FSDP2 (2 data-parallel replicas x 2 expert-parallel), bf16,
    with and without gradient checkpointing: every component of every strategy, byte for byte. The 4 processes are
    forked by the launch server in CI, started by torch.distributed.run (as the benchmark's docstring launches them) in
    the stress tier."""
    out = tmp_path / 'volume.json'
    command = ['benchmarks/comm_volume.py', '--measure', '--expert-parallel-size', '2', '--mixed-precision', 'bf16',
               '--json', str(out)]
    if launch == 'torchrun':
        run = run_script([*launch_processes(4), *command], timeout=600)
    else:
        launcher = Launcher(ROOT, script_env())
        try:
            run = launcher.run(*command, processes=4, timeout=600)
        finally:
            launcher.close()
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == 8
    for key, result in results.items():
        assert set(result['measured']) == {'gradients', 'parameters', 'expert_gradients', 'expert_parameters',
                                           'tokens'}, key
        assert result['measured'] == result['formula'], key
    ep = results['ep+ddp, grad ckpt']['measured']
    assert ep['tokens'] > results['ep+ddp']['measured']['tokens'] > 0  # checkpointing re-runs the forward's
    # the expert shards (E / N = 2 of the 4 experts per process) over their 2 data-parallel replicas, which send half
    bank, _ = _bank_numel()
    shard = bank // 2  # elements of a process's E / N experts
    for key in ('ep+ddp', 'ep+ddp, grad ckpt'):  # DDP: the shards' fp32 all-reduce (2 x 4 B x 1/2)
        measured = results[key]['measured']
        assert measured['expert_gradients'] == 2 * 4 * shard // 2 and measured['expert_parameters'] == 0, key
    for key in ('ep+fsdp2', 'ep+fsdp2, grad ckpt'):  # FSDP2: each bank its own unit over 'dp', 1 expert at rest
        measured, plain = results[key]['measured'], results[key.replace('ep+', '')]['measured']
        assert measured['expert_parameters'] == 2 * 2 * shard // 2, key  # bf16 all-gathers: forward and backward
        assert measured['expert_gradients'] == 2 * shard // 2, key  # one bf16 reduce-scatter, no all-reduce
        # the banks are not in the units over the 4 processes: FSDP2 without EP reduce-scatters them there too
        assert plain['gradients'] - measured['gradients'] == 2 * bank * 3 // 4, key
        assert plain['parameters'] - measured['parameters'] == 2 * 2 * bank * 3 // 4, key
    # the tokens the all-to-alls send are the same under DDP and FSDP2 (fp32 in, bf16 back)
    assert results['ep+fsdp2']['measured']['tokens'] == results['ep+ddp']['measured']['tokens']


def test_fsdp2_with_expert_parallelism_all_reduces_whole_banks_where_the_replicas_do_not_divide_them():
    """2 experts, EP 2 on 4 processes: 1 expert per process cannot be split over 2 replicas; the trainer leaves the
    banks out of FSDP2 (`ExpertShards.shard_over_dp` returns False) and all-reduces their fp32 gradients, as DDP."""
    with torch.device('meta'):
        model = timm.create_model('vit_ti16_moe_upcycled', **dict(_tiny_kwargs(), num_experts=2))
    bank, _ = _bank_numel(num_experts=2)
    fsdp2, ddp = (comm_volume(model, s, 4, 3, 2, 'bf16') for s in ('ep+fsdp2', 'ep+ddp'))
    assert fsdp2.expert_parameters == 0 and fsdp2.expert_gradients == ddp.expert_gradients == 2 * 4 * (bank // 2) // 2
    with torch.device('meta'):
        model = timm.create_model('vit_ti16_moe_upcycled', **dict(_tiny_kwargs(), num_experts=4))
    sharded = comm_volume(model, 'ep+fsdp2', 4, 3, 2, 'bf16')
    assert sharded.expert_parameters > 0 and sharded.expert_gradients < comm_volume(model, 'ep+ddp', 4, 3, 2,
                                                                                     'bf16').expert_gradients
