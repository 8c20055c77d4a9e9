"""Routing report of a MoE checkpoint on an ImageNet-style split: PNG figures, report.md linking them, report.json.

    python train_scripts/routing_report.py --model NAME --checkpoint FILE_OR_FOLDER --data-dir DIR [--split val]
        [--output routing_report] [--start-checkpoint FOLDER] [--max-images N] [--examples 8] [--experts-shown 4]
        [--background-threshold 0.1] [--batch-size 64] [--model-kwargs '{num_experts: 8}'] [--no-progress]

Per MoE layer: example images with the patches each of a few experts took (expert choice) / the expert each patch
went to (token choice); router importance and combine weight per expert and class; the fraction of tokens taken by
0, 1, 2, ... experts, for background and object patches apart, and where patches were left unprocessed; the
combine-weight distribution. --start-checkpoint compares with another checkpoint of the same model, e.g. the upcycled
start: the dense model folder it was upcycled from (built with the same model arguments and the trainer's seed,
--seed, so the router starts as the training run's did).

--checkpoint: a trainer output folder (model.safetensors + config.json), a .safetensors / .pth file,
'default' (timm's Hub weights) or 'hf-hub:org/name'.

A bad argument, path, checkpoint or a model without MoE layers exits with 2 and one line on stderr; --debug (or
VIT_MOE_DEBUG=1) shows the traceback instead. --verbose shows other libraries' INFO logs and warnings.
"""
import json

import timm

from vit_moe import _cli

MODEL_NAME = _cli.name_type(lambda name: ':' in name or timm.is_model(name), timm.list_models,
                            'a registered timm / vit_moe model (see timm.list_models())')


def _load_mapping(text: str):
    try:
        import yaml
    except ImportError:  # PyYAML comes with the [train] extra; JSON is YAML's subset anyway
        return json.loads(text)
    return yaml.safe_load(text)


def main(argv=None) -> int:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument('--model', type=MODEL_NAME, required=True, help='registered timm / vit_moe model name')
    parser.add_argument('--checkpoint', default=None, help='the model to report on (default: random init)')
    parser.add_argument('--start-checkpoint', default=None,
                        help='compare with this checkpoint of the same model, e.g. the dense folder it was upcycled '
                             'from (the upcycled start)')
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--split', default='val')
    parser.add_argument('--output', default='routing_report', help='folder for report.md, report.json and the PNGs')
    parser.add_argument('--max-images', type=int, default=None, help='at most this many images, evenly spaced')
    parser.add_argument('--examples', type=int, default=8, help='example images per layer')
    parser.add_argument('--experts-shown', type=int, default=4, help='experts in the example grids')
    parser.add_argument('--background-threshold', type=float, default=0.1,
                        help='a patch whose mean un-normalised intensity (0..1) is below this is background')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--num-workers', type=int, default=0)
    parser.add_argument('--seed', type=int, default=0, help='seed for building the start model (the trainer\'s)')
    parser.add_argument('--capacity-factor', type=_cli.capacity_type(_load_mapping), default=None,
                        help='capacity factor at inference: a number (every MoE layer) or {layer: number}')
    parser.add_argument('--model-kwargs', type=_cli.mapping_type(_load_mapping), default=None,
                        help="YAML mapping, e.g. '{img_size: 32}'")
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    _cli.setup_logging(args.verbose)
    for name in ('max_images', 'batch_size'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {value}')

    from vit_moe.analysis import load_report_models, routing_report
    from vit_moe.data import check_image_folder

    check_image_folder(args.data_dir, args.split)  # before loading any model
    model, start = load_report_models(args.model, args.checkpoint, args.start_checkpoint, args.model_kwargs,
                                      seed=args.seed, capacity_factor=args.capacity_factor)
    result = routing_report(
        model, args.data_dir, args.output, split=args.split, start_model=start, max_images=args.max_images,
        num_example_images=args.examples, experts_shown=args.experts_shown, batch_size=args.batch_size,
        num_workers=args.num_workers, progress=not args.no_progress, background_threshold=args.background_threshold,
        model_name=args.model, checkpoint=args.checkpoint, start_checkpoint=args.start_checkpoint)
    if result.get('kind') == 'soft':  # Soft MoE: slots mix tokens; no token is left out
        print(f'{args.model} on {result["split"]} ({result["num_images"]} images): Soft MoE, tokens per slot / slots '
              f'per token (effective numbers)')
        for name, layer in result['layers'].items():
            print(f'  {name}: {layer["tokens_per_slot"]:.1f} of {layer["num_tokens"]} / {layer["slots_per_token"]:.1f}'
                  f' of {layer["num_experts"] * layer["slots_per_expert"]}')
        print(f'report: {args.output}/report.md ({result["seconds"]:.1f} s)')
        return 0
    print(f'{args.model} on {result["split"]} ({result["num_images"]} images): tokens taken by no expert '
          f'(all / background / object patches)' + (' [start -> end]' if start is not None else ''))
    for name, layer in result['layers'].items():
        def fractions(stats):
            return ' / '.join('-' if stats['unprocessed_fraction'][k] is None else
                              f'{stats["unprocessed_fraction"][k]:.1%}' for k in ('all', 'background', 'object'))
        before = f'{fractions(result["start_layers"][name])} -> ' if start is not None else ''
        print(f'  {name}: {before}{fractions(layer)}')
    print(f'report: {args.output}/report.md ({result["seconds"]:.1f} s)')
    return 0


if __name__ == '__main__':
    _cli.run_and_exit(main)
