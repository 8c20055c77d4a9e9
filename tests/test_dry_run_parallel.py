"""train.py --dry-run with expert parallelism and the number of processes: E / N routed experts per process in the
memory, the sizes the launch refuses (one line each), the advice naming a larger expert-parallel size, one process
planned without a launch. On the meta device / fake tensors: no weights, no GPU."""
import re

import pytest
import timm
import torch

from conftest import ROOT, TINY_MOE, run_front_end
from vit_moe.training import load_config
from vit_moe.training.dry_run import MARGIN, dry_run
from vit_moe.planning.memory import GB, fsdp_shard_numel, parameter_memory, routed_expert_parameters

MOE = dict(TINY_MOE, num_experts=8)  # num_classes 10
KWARGS = '{img_size: 32, patch_size: 8, embed_dim: 64, depth: 4, num_heads: 2, num_experts: 8, num_classes: 10}'
TINY = ['--model', 'vit_ti16_moe_upcycled', '--model-kwargs', KWARGS, '--batch-size', '2', '--dry-run']
FSDP2 = str(ROOT / 'configs' / 'accelerate' / 'fsdp2.yaml')


def _cfg(ep=1, **overrides):
    return load_config(None, dict(dict(model='vit_ti16_moe_upcycled', model_kwargs=MOE, batch_size=2,
                                       ema_decay=0.999, expert_parallel_size=ep), **overrides))


@pytest.fixture(scope='module')
def model():
    with torch.device('meta'):
        return timm.create_model('vit_ti16_moe_upcycled', **MOE)


def _numel(tensors):
    return sum(t.numel() for t in tensors)


@pytest.mark.parametrize('ep', [2, 8])
def test_expert_parallelism_divides_the_experts_state_by_n_under_ddp(model, ep):
    """Parameters, gradients, AdamW and EMA: the routed experts' part is 1 / N of EP 1's, the rest unchanged."""
    experts = _numel(routed_expert_parameters(model))
    rest = _numel(model.parameters()) - experts
    buffers = _numel(model.buffers())
    whole, spread = (dry_run(_cfg(n), num_processes=8)['plan'] for n in (1, ep))
    for name, nbytes, extra in (('params', 4, 0), ('grads', 4, 0), ('optimizer', 8, 0), ('ema', 4, buffers)):
        assert getattr(whole, name) == nbytes * (rest + experts) + 4 * extra, name
        assert getattr(spread, name) == nbytes * (rest + experts // ep) + 4 * extra, name
        assert getattr(whole, name) - getattr(spread, name) == nbytes * experts * (ep - 1) // ep, name
    assert spread.activations == whole.activations and spread.total < whole.total
    assert spread.expert_params == whole.expert_params == experts


@pytest.mark.parametrize('processes, ep, held', [(8, 2, 8), (8, 4, 8), (8, 8, 8), (16, 2, 2), (16, 4, 4)],
                         ids=['8-ep2', '8-ep4', '8-ep8', '16-ep2-whole', '16-ep4-whole'])
def test_expert_parallelism_under_fsdp2_holds_e_over_w_experts_where_the_replicas_divide_them(model, processes, ep,
                                                                                             held):
    """FSDP2 + EP N on W processes: each expert bank is an FSDP unit over its W / N replicas, so the routed experts'
    part of the parameters, gradients, AdamW and EMA is 1 / W of EP 1's unsharded where W / N divides E / N (8
    experts on 8 processes), else 1 / N (16 processes: 8 / N experts over 16 / N replicas stay whole); the rest is
    FSDP2's shards over W, and the numbers are the memory model's."""
    experts = _numel(routed_expert_parameters(model))
    ids = {id(p) for p in routed_expert_parameters(model)}
    rest = sum(fsdp_shard_numel(p.shape, processes) for p in model.parameters() if id(p) not in ids)
    buffers = sum(fsdp_shard_numel(b.shape, processes) for b in model.buffers())
    plan = dry_run(_cfg(ep), FSDP2, num_processes=processes)['plan']
    for name, nbytes, extra in (('params', 4, 0), ('grads', 4, 0), ('optimizer', 8, 0), ('ema', 4, buffers)):
        assert getattr(plan, name) == nbytes * (rest + experts // held) + 4 * extra, name
    state = parameter_memory(model, 'fsdp2', processes, 'no', expert_parallel_size=ep)
    assert (plan.params, plan.grads, plan.optimizer, plan.transient) == (state.params, state.grads, state.optimizer,
                                                                         state.transient)


def test_the_report_names_the_share_of_the_experts_at_rest_under_fsdp2():
    rc, out, err = run_front_end('train_scripts/train.py', *TINY, '--accelerate-config', FSDP2,
                                 '--expert-parallel-size', '2')
    assert rc == 0, err
    assert ('1/8 of them on each process: expert_parallel_size 2, each bank sharded again by FSDP2 over 4 '
            'data-parallel replicas)') in out
    rc, out, err = run_front_end('train_scripts/train.py', *TINY, '--accelerate-config', FSDP2, '--num-processes',
                                 '16', '--expert-parallel-size', '2')
    assert rc == 0 and '1/2 of them on each process: expert_parallel_size 2)' in out, err


def test_the_command_line_reports_the_shipped_config_with_less_parameter_memory_at_ep_8():
    def parameters_gb(ep):
        rc, out, err = run_front_end('train_scripts/train.py', '--config', 'configs/vit_b16_moe_imagenet.yaml',
                                     '--dry-run', '--num-processes', '8', '--batch-size', '1',
                                     '--expert-parallel-size', str(ep))
        assert rc == 0, err
        return float(re.search(r'parameters ([\d.]+) GB', out).group(1)), out

    (whole, _), (spread, out) = parameters_gb(1), parameters_gb(8)
    assert 'in routed experts, 1/8 of them on each process: expert_parallel_size 8' in out
    assert spread < whole / 4  # the routed experts are most of the model


@pytest.mark.parametrize('args, expected', [
    (['--num-processes', '8', '--expert-parallel-size', '3'],
     'expert_parallel_size=3 does not divide the 8 process(es) of the launch; expected a divisor of 8: 1, 2, 4, 8'),
    (['--num-processes', '16', '--expert-parallel-size', '16'],
     'expert_parallel_size=16 does not divide num_experts=8 of '),
    (['--expert-parallel-size', '2'], 'expert_parallel_size=2 does not divide the 1 process(es)'),
], ids=['processes', 'experts', 'one-process'])
def test_a_size_the_launch_refuses_is_one_line_naming_both_numbers(args, expected):
    rc, out, err = run_front_end('train_scripts/train.py', *TINY, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and out == '' and expected in err, err
    if '16' in args:
        assert err.rstrip().endswith('expected a divisor of the experts and of the 16 process(es): 1, 2, 4, 8')
    if '--num-processes' not in args:  # one process planned: say how to plan the cluster's
        assert '--accelerate-config' in err and '--num-processes' in err


def test_a_dense_model_with_expert_parallelism_is_refused_in_one_line():
    rc, out, err = run_front_end('train_scripts/train.py', '--model', 'vit_tiny_patch16_224', '--model-kwargs',
                                 '{img_size: 32, patch_size: 8, depth: 2}', '--batch-size', '2', '--dry-run',
                                 '--num-processes', '2', '--expert-parallel-size', '2')
    assert rc == 2 and len(err.splitlines()) == 1 and 'the model has no MoE layer' in err, err


def test_the_advice_names_the_smallest_expert_parallel_size_that_fits():
    totals = {ep: dry_run(_cfg(ep), num_processes=8)['plan'].total for ep in (1, 2, 4, 8)}
    assert totals[1] > totals[2] > totals[4] > totals[8]
    gpu_memory_gb = (totals[2] + totals[4]) / 2 / MARGIN / GB  # fits with EP 4 (and 8), not with 2
    common = [*TINY, '--ema-decay', '0.999', '--num-processes', '8', '--gpu-memory-gb', repr(gpu_memory_gb)]
    rc, out, err = run_front_end('train_scripts/train.py', *common)
    assert rc == 2 and len(err.splitlines()) == 1 and 'does NOT fit' in out
    assert 'try' in err and 'expert_parallel_size: 4 (1/4 of the routed experts on each process' in err, err
    assert 'expert_parallel_size: 2' not in err and 'expert_parallel_size: 8' not in err
    rc, out, err = run_front_end('train_scripts/train.py', *common, '--expert-parallel-size', '4')
    assert rc == 0 and 'fits' in out, err  # the advice holds


def test_one_process_is_planned_with_a_note_and_no_processes_are_refused():
    rc, out, err = run_front_end('train_scripts/train.py', *TINY)
    assert rc == 0 and 'launch: single, 1 process(es)' in out, err
    note = [line for line in out.splitlines() if line.startswith('note: one process planned')]
    assert len(note) == 1 and '--accelerate-config' in note[0] and '--num-processes' in note[0]
    rc, out, err = run_front_end('train_scripts/train.py', *TINY, '--num-processes', '8')
    assert rc == 0 and 'note:' not in out and 'launch: ddp, 8 process(es)' in out, err
    for n in ('0', '-2'):  # refused, not the accelerate config's 8
        rc, out, err = run_front_end('train_scripts/train.py', *TINY, '--accelerate-config', FSDP2,
                                     '--num-processes', n)
        assert rc == 2 and out == '' and err.strip() == (f'train.py: error: --num-processes {n} is not valid; '
                                                          f'expected an integer >= 1'), err
