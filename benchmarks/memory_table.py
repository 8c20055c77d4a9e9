"""Per-GPU training memory of the upcycled MoE models, as markdown tables (for README).

    python benchmarks/memory_table.py [--models vit_b16_moe_upcycled vit_l16_moe_upcycled] [--gpus 8 64]
        [--batch-sizes 32 128] [--reduce-dtype fp32] [--model-kwargs '{"num_experts": 16}'] [--output FILE]

Counted from each model built on the meta device (exact per-tensor shapes, no weights, no GPU): a few seconds on a
CPU. For each model, two tables:

1. model state per GPU with AdamW under DDP, FSDP2 full shard and FSDP2 with bf16 mixed precision
   (`vit_moe.planning.memory.parameter_memory`),
2. activations saved for the backward pass per image and per batch, float32 or bf16 autocast, with and without
   gradient checkpointing (`vit_moe.planning.memory.activation_memory`).

Prints to stdout; writes FILE only with --output. GB = 1e9 bytes, MB = 1e6 bytes.
"""
import argparse
import json
from pathlib import Path

import timm
import torch

import vit_moe  # noqa: F401  registers the models
from vit_moe.planning import memory  # torch and timm only

GB, MB = memory.GB, 1e6
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def _table(header, rows) -> str:
    align = ['---' if i < 2 else '---:' for i in range(len(header))]  # labels left, numbers right
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def state_table(model, gpus, reduce_dtype, expert_parallel_size=8) -> str:
    """DDP / FSDP2 / FSDP2 + bf16 rows, with and without expert parallelism, at each number of GPUs."""
    settings = [('DDP', 'ddp', 'no', 1), ('FSDP2', 'fsdp2', 'no', 1), ('FSDP2 + bf16', 'fsdp2', 'bf16', 1),
                (f'DDP + EP {expert_parallel_size}', 'ddp', 'no', expert_parallel_size),
                (f'FSDP2 + bf16 + EP {expert_parallel_size}', 'fsdp2', 'bf16', expert_parallel_size)]
    rows = []
    for label, strategy, mp, ep in settings:
        for n in gpus:
            m = memory.parameter_memory(model, strategy, n, mp, reduce_dtype=DTYPES[reduce_dtype],
                                        expert_parallel_size=min(ep, n))
            rows.append([label, n] + [f'{v / GB:.1f}' for v in (m.params, m.grads, m.optimizer, m.transient, m.total)])
    return _table(['strategy', 'GPUs', 'params', 'grads', 'AdamW', 'transient', 'total (GB/GPU)'], rows)


def activation_table(model, batch_sizes) -> str:
    """fp32 / bf16 autocast, with and without gradient checkpointing."""
    rows = []
    for label, dtype in (('fp32', torch.float32), ('bf16 autocast', torch.bfloat16)):
        for ckpt in (False, True):
            one = memory.activation_memory(model, 1, ckpt, dtype)
            batches = [memory.activation_memory(model, b, ckpt, dtype).total for b in batch_sizes]
            rows.append([label, 'yes' if ckpt else 'no', f'{one.per_image / MB:.1f}', f'{one.weight_copies / GB:.1f}']
                        + [f'{t / GB:.1f}' for t in batches])
    return _table(['precision', 'grad checkpointing', 'per image (MB)', 'weight copies (GB)']
                  + [f'batch {b} (GB)' for b in batch_sizes], rows)


NOTES = """\
Model state: AdamW, fp32 master weights; per GPU on the fullest rank (rank 0). DDP: 4 B params + 4 B grads + 8 B AdamW
per parameter on every GPU, the same with bf16 autocast; transient = DDP's gradient buckets (4 B per parameter;
0 with `gradient_as_bucket_view=True`). FSDP2: `fully_shard` per `Block` plus the root, `reshard_after_forward=True`;
params/grads/AdamW sharded along dim 0, padded to ceil(dim0 / N) rows per rank (the stacked experts [E, in, out] shard
over experts: 32 experts on 64 GPUs leave half the ranks holding padding). Transient = the root unit's gathered params
and grads + 2 of the largest (MoE) block's all-gathered params (computing + prefetched; padded to N * ceil(dim0 / N)
rows, so 2x the experts on 64 GPUs) + its unsharded grads and reduce-scatter buffer. FSDP2 + bf16:
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype={reduce}): bf16 gathered params and grads. + EP M: every MoE
layer's routed experts spread over groups of M GPUs, E / M each (fp32 params, grads and AdamW), whole tensors outside
DDP's buckets; under FSDP2 each expert bank is also an FSDP unit of its own over the W / M data-parallel replicas where
W / M divides E / M: E / W each at rest, and one bank's E / M experts gathered (with its grads and reduce-scatter
input) in the transient (32 experts, EP 8: on 8 GPUs one replica, E / W = E / M; on 64 GPUs 4 experts per group do
not split over 8 replicas, the banks stay whole); the rest as the strategy holds it, its largest unit without experts.

Activations: bytes autograd saves for the backward of one forward + loss (counted with saved-tensor hooks on fake
tensors; equal to a real CPU run), fused attention (no T x T matrix). Per image = growth per image. Weight copies =
the batch-independent part: autocast's bf16 copies of DDP's fp32 weights (with checkpointing held until the forward
returns; FSDP2 + bf16, which gathers bf16 weights, is not measured here). Batch columns = the peak: all saved tensors
without checkpointing; with checkpointing every block's input + what is saved outside the blocks + max(the largest
block's recomputation, the weight copies). Gradients of activations, the CUDA context, allocator caching and
fragmentation are not included; add the model state above."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit_b16_moe_upcycled', 'vit_l16_moe_upcycled'])
    parser.add_argument('--gpus', nargs='+', type=int, default=[8, 64])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[32, 128], help='per GPU')
    parser.add_argument('--reduce-dtype', choices=sorted(DTYPES), default='fp32',
                        help="FSDP2 + bf16 reduce-scatter dtype (Accelerate's mixed_precision: bf16 uses bf16)")
    parser.add_argument('--model-kwargs', type=json.loads, default={},
                        help='JSON arguments for timm.create_model, e.g. \'{"num_experts": 16}\' (img_size changes T)')
    parser.add_argument('--output', type=Path, help='also write the markdown to this file')
    args = parser.parse_args(argv)

    parts = []
    for name in args.models:
        with torch.device('meta'):
            model = timm.create_model(name, **args.model_kwargs)
        num_params = sum(p.numel() for p in model.parameters())
        size = 'x'.join(map(str, model.patch_embed.img_size)) if len(set(model.patch_embed.img_size)) > 1 \
            else model.patch_embed.img_size[0]
        parts.append(f'### {name} ({num_params / 1e9:.3f} B parameters)\n\n'
                     f'Model state per GPU (GB), AdamW:\n\n{state_table(model, args.gpus, args.reduce_dtype)}\n\n'
                     f'Activations (GB unless noted), {size} px:\n\n{activation_table(model, args.batch_sizes)}\n')
    parts.append(NOTES.format(reduce=str(DTYPES[args.reduce_dtype])) + '\n')
    text = '\n'.join(parts)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == '__main__':
    main()
