"""Expert-parallel gradients against data-parallel ones, per design, on real processes (run by
tests/test_expert_parallel.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ep_worker.py OUT_JSON

Every process builds the same tiny upcycled model per design (router, shared and fine-grained experts, 'always' prefix
tokens, output_scale, bf16 autocast, gradient checkpointing) and computes, on its own batch, (a) the data-parallel
gradients: its own, then averaged over the processes (what DDP gives), and (b) the expert-parallel ones: the same
model with its experts sharded over the processes (`shard_experts`), each expert shard's gradient divided by the
number of processes (`ExpertShards.reduce_gradients` with one data-parallel replica) and the others averaged.
Rank 0 writes, per design, the largest relative difference of any parameter (expert shards against their slice of
the data-parallel gradient), and whether the layer compiles with `torch.compile(fullgraph=True)`.
"""
import json
import sys
from contextlib import nullcontext

import timm
import torch
import torch.distributed as dist

import vit_moe  # noqa: F401  registers the models
from vit_moe import _cli
from vit_moe.layers import capture_routing, moe_layers, shard_experts

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5, moe_blocks=1, reg_tokens=2)
DESIGNS = {
    'expert choice': dict(num_experts=4),
    'token choice': dict(num_experts=4, router='token_choice', capacity_factor=1.0),
    'soft': dict(num_experts=4, router='soft', slots_per_expert=3),
    'shared + prefix always + output_scale': dict(num_experts=4, num_shared_experts=1, prefix_tokens='always',
                                                   output_scale=True),
    'fine-grained G=2, token choice': dict(num_experts=8, expert_granularity=2, router='token_choice', top_k=1),
    'bf16 autocast': dict(num_experts=4),
    'gradient checkpointing': dict(num_experts=4),
}


def _model(options):
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', **ARCH, **options)
    torch.manual_seed(1)  # experts apart (else every expert's gradient is alike)
    with torch.no_grad():
        for layer in moe_layers(model).values():
            for p in layer.experts.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model


def _grads(model, images, targets, design):
    model.zero_grad(set_to_none=True)
    if design == 'gradient checkpointing':
        model.set_grad_checkpointing(True)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16) if design == 'bf16 autocast' else nullcontext()
    with autocast, capture_routing() as routing:
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets) + routing.aux_loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(out_path: str) -> None:
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own images
    images, targets = torch.randn(3, 3, 16, 16, generator=generator), torch.randint(0, 5, (3,), generator=generator)
    results = {}
    for design, options in DESIGNS.items():
        dense = _grads(_model(options), images, targets, design)
        for g in dense.values():  # DDP's mean over the processes
            dist.all_reduce(g)
            g /= world
        model = _model(options)
        shard_experts(model, dist.group.WORLD, world, rank)
        names = {f'{n}.experts.{k}' for n, layer in moe_layers(model).items() for k, _ in layer.experts.named_parameters()}
        sharded = _grads(model, images, targets, design)
        worst, compared = 0.0, 0
        for name, g in sharded.items():
            compared += name in names
            if name in names:
                g = g / world  # its group's contributions, then the mean over every process
                E = dense[name].shape[0]
                expected = dense[name][rank * E // world:(rank + 1) * E // world]
            else:
                dist.all_reduce(g)
                g = g / world
                expected = dense[name]
            worst = max(worst, float((g - expected).abs().max()) / max(float(expected.abs().max()), 1e-12))
        results[design] = dict(worst_relative_difference=worst, parameters=len(sharded), shards=compared)
    layer = moe_layers(model)['blocks.1.mlp']
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 19, 32)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    results['compiled'] = True
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
    _cli.leave(0)
