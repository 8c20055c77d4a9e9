"""How the class token is routed in the digits_prefix sweep: right after upcycling (step 0) and after training.

Run after `python train_scripts/sweep.py --config configs/sweeps/digits_prefix.yaml`:

    .venv/bin/python benchmarks/prefix_token_routing.py [--sweep-dir outputs/sweeps/digits_prefix]

Prints one markdown row per (prefix_tokens, seed, MoE layer): the fraction of validation images whose class token no
expert processed, and the mean number of experts that processed it, at step 0 -> after the run; then the run's top-1.
"""
import argparse
import tempfile

import torch

from vit_moe.analysis import routing_report
from vit_moe.models import create_model_from_checkpoint

MODEL = 'vit_ti16_moe_upcycled'


def _mean(histogram):
    return sum(k * v for k, v in enumerate(histogram)) / max(sum(histogram), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sweep-dir', default='outputs/sweeps/digits_prefix')
    args = parser.parse_args()
    root = args.sweep_dir
    print('| prefix_tokens | seed | layer | class token unprocessed | experts per class token | run top-1 |')
    print('|---|---|---|---|---|---|')
    for mode in ('compete', 'always'):
        for seed in (0, 1, 2):
            run = f'{root}/prefix_tokens={mode}/seed_{seed}'
            model = create_model_from_checkpoint(MODEL, f'{run}/model').eval()
            kwargs = {k: v for k, v in model._model_args.items() if k != 'num_classes'}
            torch.manual_seed(seed)  # a step-0 model: the dense weights upcycled, routers drawn from N(0, 0.02)
            start = create_model_from_checkpoint(MODEL, f'{root}/dense/model', **kwargs).eval()
            with tempfile.TemporaryDirectory() as out:
                r = routing_report(model, f'{root}/data', out, start_model=start, progress=False,
                                   num_example_images=2, experts_shown=2)
            for name, layer in r['layers'].items():
                s = r['start_layers'][name]
                print(f'| {mode} | {seed} | {name} | {100 * s["unprocessed_fraction"]["prefix"]:.1f} % -> '
                      f'{100 * layer["unprocessed_fraction"]["prefix"]:.1f} % | '
                      f'{_mean(s["experts_per_token"]["prefix"]):.2f} -> '
                      f'{_mean(layer["experts_per_token"]["prefix"]):.2f} | {r["top1"]:.2f} |')


if __name__ == '__main__':
    main()
