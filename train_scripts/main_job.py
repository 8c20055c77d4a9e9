"""The main job: upcycle a small dense ViT into an expert-choice MoE and show what changed.

    python train_scripts/main_job.py [--model vit_tiny_patch16_224] [--num-experts 32]
"""
import argparse

import timm
import torch

import vit_moe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_tiny_patch16_224', help='dense timm ViT (random init, no download)')
    parser.add_argument('--num-experts', type=int, default=32)
    parser.add_argument('--capacity-factor', type=float, default=2.0)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dense = timm.create_model(args.model).eval()
    moe = vit_moe.upcycle(dense, num_experts=args.num_experts, capacity_factor=args.capacity_factor).eval()
    full = vit_moe.upcycle(dense, num_experts=args.num_experts, capacity_factor=float(args.num_experts)).eval()
    x = torch.randn(2, *dense.pretrained_cfg['input_size'])
    with torch.inference_mode():
        ref, out, out_full = dense(x), moe(x), full(x)
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    layer = moe.blocks[moe.moe_config['moe_blocks'][0]].mlp
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f'dense {args.model}: {count(dense):.1f} M parameters, {len(dense.blocks)} blocks, {tokens} tokens/image')
    print(f'upcycled: MoE in blocks {moe.moe_config["moe_blocks"]}, {args.num_experts} experts, '
          f'expert choice C={args.capacity_factor} -> capacity {layer.router.capacity(tokens)} tokens/expert/image, '
          f'{count(moe):.1f} M parameters')
    print(f'max |logit difference| vs dense: C=E {float((out_full - ref).abs().max()):.2e} (exact up to float), '
          f'C={args.capacity_factor} {float((out - ref).abs().max()):.3f} (the upcycling drop training recovers)')
    print(f'tokens routed to no expert at C={args.capacity_factor}: '
          f'{vit_moe.collect_moe_metrics(moe)["dropped_fraction"]:.1%}')


if __name__ == '__main__':
    main()
