"""Bytes each process sends per training step: DDP, FSDP2, expert parallelism (+ FSDP2), from the shapes; and
checked against what a real run's collectives move.

    .venv/bin/python benchmarks/comm_volume.py [--models vit_b16_moe_upcycled ...] [--processes 8 16 32 64]
        [--batch-sizes 32 128] [--expert-parallel-size 8] [--output FILE]
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/comm_volume.py --measure \\
        [--strategies ddp fsdp2 ep+ddp ep+fsdp2] [--json FILE]        # gloo on CPUs: a tiny model, one step each

The table: `vit_moe.planning.comm_volume` (bf16 mixed precision, one micro-batch per step; the models on the meta
device). --measure: every process builds a tiny upcycled model, sets it up as each strategy does (DDP with the expert
shards ignored, FSDP2 `fully_shard` per block plus the root, `shard_experts`; under FSDP2 + EP, as the trainer, each
expert bank first its own `fully_shard` unit over the mesh's 'dp' dimension: `ExpertShards.shard_over_dp`), runs one
forward and backward (and the trainer's `reduce_gradients` of the expert shards), and counts the bytes of every
collective it calls (DDP through a counting comm hook, FSDP2's all-gathers and reduce-scatters: over the 'dp' replicas,
a group smaller than the world, the expert banks'; the all-to-alls forward and backward); rank 0 prints the counts
beside the formula's and writes them to --json.
"""
import argparse
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import timm
import torch

import vit_moe  # noqa: F401  registers the models
from vit_moe import _cli

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5, num_experts=4, moe_blocks=1)


def table(models, processes, batch_sizes, ep, mixed_precision) -> str:
    """GB each process sends per step; for expert parallelism also the part that leaves an EP group of `ep` GPUs
    (one node: the all-to-alls stay on its links)."""
    from vit_moe.planning.comm_volume import comm_volume, expert_parameter_numel
    lines = []
    for name in models:
        with torch.device('meta'):
            model = timm.create_model(name)
        experts = expert_parameter_numel(model)
        total = sum(p.numel() for p in model.parameters())
        lines += [f'#### {name}: {total / 1e9:.2f} B parameters, {experts / 1e9:.2f} B of them routed experts', '',
                  f'| processes | batch / process | DDP | FSDP2 | EP {ep} + DDP (across nodes) | '
                  f'EP {ep} + FSDP2 (across nodes) |', '|---:|---:|---:|---:|---:|---:|']
        for n in processes:
            for b in batch_sizes:
                v = {s: comm_volume(model, s, n, b, min(ep, n), mixed_precision)
                     for s in ('ddp', 'fsdp2', 'ep+ddp', 'ep+fsdp2')}
                cells = [f'{v["ddp"].total / GB:.1f}', f'{v["fsdp2"].total / GB:.1f}'] + [
                    f'{v[s].total / GB:.1f} ({(v[s].total - v[s].tokens) / GB:.1f})' for s in ('ep+ddp', 'ep+fsdp2')]
                lines.append(f'| {n} | {b} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------- measuring
class _Counted(torch.autograd.Function):
    """Identity that counts, in the backward, the gradient an all-to-all's backward sends."""

    @staticmethod
    def forward(ctx, x, counter, fraction):
        ctx.counter, ctx.fraction = counter, fraction
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter['tokens'] += int(grad.numel() * grad.element_size() * ctx.fraction)
        return grad, None, None


def _instrument(counts: Counter):
    """Count what the collectives move (bytes a process sends: see vit_moe.planning.comm_volume)."""
    import torch.distributed as dist
    import vit_moe.layers.expert_parallel as ep_module

    def size(group) -> int:
        return dist.get_world_size(group)

    def experts(group) -> bool:  # the 'dp' replicas of an expert group (FSDP2 + EP's expert banks), not the world
        return size(group) < dist.get_world_size()

    gather, scatter, reduce, a2a = dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce, \
        ep_module.all_to_all_single_autograd

    def all_gather_single(output_tensor, input_tensor, group=None, async_op=False):
        g = size(group)
        counts['expert_parameters' if experts(group) else 'parameters'] += \
            output_tensor.numel() * output_tensor.element_size() * (g - 1) // g
        return gather(output_tensor, input_tensor, group=group, async_op=async_op)

    def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        g = size(group)
        counts['expert_gradients' if experts(group) else 'gradients'] += \
            input.numel() * input.element_size() * (g - 1) // g
        return scatter(output=output, input=input, op=op, group=group, async_op=async_op)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        g = size(group)
        counts['expert_gradients'] += 2 * tensor.numel() * tensor.element_size() * (g - 1) // g
        return reduce(tensor, op=op, group=group, async_op=async_op)

    def all_to_all_single_autograd(x, out_splits, in_splits, group):
        g = size(group)
        counts['tokens'] += x.numel() * x.element_size() * (g - 1) // g
        return _Counted.apply(a2a(x, out_splits, in_splits, group), counts, (g - 1) / g)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single
    ep_module.all_to_all_single_autograd = all_to_all_single_autograd
    return all_reduce, reduce


def _ddp_counting_hook(counts: Counter, world: int):
    import torch.distributed as dist

    def hook(state, bucket):
        buffer = bucket.buffer()
        counts['gradients'] += 2 * buffer.numel() * buffer.element_size() * (world - 1) // world
        return dist.all_reduce(buffer.div_(world), async_op=True).get_future().then(lambda f: f.value()[0])
    return hook


@contextmanager
def _layer_norm_as_on_cuda():
    """LayerNorm in fp32 under autocast, as CUDA's autocast runs it (layer_norm is on its fp32 list); CPU's keeps the
    input's dtype. Under DDP the residual stream is fp32 either way; under FSDP2's bf16 policy it is bf16, so without
    this the tokens the all-to-alls send would be bf16 here and fp32 on GPUs."""
    import torch.nn.functional as F
    plain = F.layer_norm

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled('cpu'):
            return plain(input, normalized_shape, weight, bias, eps)
        with torch.autocast('cpu', enabled=False):
            return plain(input.float(), normalized_shape, None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
    F.layer_norm = layer_norm
    try:
        yield
    finally:
        F.layer_norm = plain


def measure_one(strategy: str, ep: int, mixed_precision: str, grad_checkpointing: bool, batch: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from vit_moe.layers import moe_layers, shard_experts
    from vit_moe.planning.comm_volume import comm_volume
    from vit_moe.training.expert_parallel import ExpertShards
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY)
    expected = comm_volume(model, strategy, world, batch, ep, mixed_precision, grad_checkpointing)
    counts = Counter()
    all_reduce, plain_all_reduce = _instrument(counts)
    shards = None
    if strategy.startswith('ep'):
        shards = ExpertShards(ep, world, 'cpu')
        shards.shard(model)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if strategy.endswith('ddp'):
        model = DistributedDataParallel(model)
        model.register_comm_hook(None, _ddp_counting_hook(counts, world))
    else:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) \
            if mixed_precision == 'bf16' else MixedPrecisionPolicy()
        # as the trainer (training/parallelize.py): each expert bank its own unit over 'dp' first, where the replicas
        # divide its experts; else the banks left out of FSDP2's units (whole E / N experts per process)
        banks_sharded = shards is not None and shards.shard_over_dp(model, mp_policy=policy, reshard_after_forward=True)
        ignored = set(p for bank in shards.expert_banks(model) for p in bank.parameters()) \
            if shards is not None and not banks_sharded else None
        for block in model.blocks:
            fully_shard(block, mp_policy=policy, ignored_params=ignored)
        fully_shard(model, mp_policy=policy, ignored_params=ignored)
    generator = torch.Generator().manual_seed(rank)
    images, targets = torch.randn(batch, 3, 16, 16, generator=generator), torch.randint(0, 5, (batch,), generator=generator)
    # bf16: autocast under DDP and FSDP2 alike, as Accelerate wraps the prepared model's forward (its native_amp), on
    # top of FSDP2's bf16 MixedPrecisionPolicy; LayerNorms as CUDA's autocast runs them (the tokens sent: their outputs)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=mixed_precision == 'bf16')
    with _layer_norm_as_on_cuda():  # the backward too: gradient checkpointing runs the forward again, under autocast
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        loss.backward()
    if shards is not None:  # the trainer's expert-gradient reduction (an all-reduce under DDP), counted
        import torch.distributed as dist_module
        dist_module.all_reduce = all_reduce
        try:
            shards.reduce_gradients(model.module if hasattr(model, 'module') else model)
        finally:
            dist_module.all_reduce = plain_all_reduce
    measured = dict(counts)
    keys = ('gradients', 'parameters', 'expert_gradients', 'expert_parameters', 'tokens')
    return dict(measured={k: measured.get(k, 0) for k in keys}, formula={k: getattr(expected, k) for k in keys})


def measure(args) -> int:
    import torch.distributed as dist
    dist.init_process_group('gloo')
    results = {}
    for strategy in args.strategies:
        for ckpt in (False, True):
            key = f'{strategy}{", grad ckpt" if ckpt else ""}'
            results[key] = measure_one(strategy, args.expert_parallel_size, args.mixed_precision, ckpt, args.batch)
    if dist.get_rank() == 0:
        for key, r in results.items():
            print(f'{key}: measured {r["measured"]}  formula {r["formula"]}')
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit_b16_moe_upcycled', 'vit_l16_moe_upcycled',
                                                        'vit_g14_dinov2_moe_upcycled'])
    parser.add_argument('--processes', nargs='+', type=int, default=[8, 16, 32, 64])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[32, 128])
    parser.add_argument('--expert-parallel-size', type=int, default=8)
    parser.add_argument('--mixed-precision', default='bf16', choices=['no', 'bf16'])
    parser.add_argument('--output', type=Path)
    parser.add_argument('--measure', action='store_true', help='count a real run (under torch.distributed.run)')
    parser.add_argument('--strategies', nargs='+', default=['ddp', 'fsdp2', 'ep+ddp', 'ep+fsdp2'])
    parser.add_argument('--batch', type=int, default=3, help='--measure: images per process')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    if args.measure:
        return measure(args)
    text = table(args.models, args.processes, args.batch_sizes, args.expert_parallel_size, args.mixed_precision)
    print(text)
    if args.output:
        args.output.write_text(text + '\n')
    return 0


if __name__ == '__main__':
    code = main()
    _cli.leave(code) if '--measure' in sys.argv else sys.exit(code)
