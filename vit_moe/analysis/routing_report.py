""" A routing report: what the routers of a MoE model did on an image folder, as PNG figures, report.md and
report.json.

    from vit_moe.analysis import routing_report, load_report_models
    model, start = load_report_models('vit_ti16_moe_upcycled', 'outputs/main_job/moe/model',
                                      start_checkpoint='outputs/main_job/dense/model')
    numbers = routing_report(model, 'outputs/main_job/data', 'outputs/main_job/routing_report', start_model=start)

A model with Soft MoE layers gets the report of `soft_routing_report` (mixes instead of choices).

One pass over the split (a progress bar over the batches) runs the model (and the start model, on the same
batches) inside `vit_moe.capture_routing(keep_tensors=True)`; `routing_stats.LayerStats` turns each layer's
captured tensors into the numbers, which report.json holds, report.md tabulates and the figures draw.
"""
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import ImageFolderDataset, build_transforms, data_config_for
from ..layers import ExpertChoiceRouter, capacity_factors, moe_layers, soft_moe_layers
from ..models import create_model_from_checkpoint, take_capacity_factor
from . import routing_figures as figures
from .routing_pass import RoutingPass
from .routing_stats import BACKGROUND, OBJECT, PREFIX, LayerStats
from .soft_routing_report import soft_routing_report

__all__ = ['routing_report', 'load_report_models', 'moe_layer_info', 'format_report', 'DEFAULT_BACKGROUND_THRESHOLD']

DEFAULT_BACKGROUND_THRESHOLD = 0.1


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def moe_layer_info(model: torch.nn.Module, model_name: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Layer name (as recorded by capture_routing) -> {'num_experts', 'router', 'expert_choice'} of every MoE layer.

    Raises:
        ValueError: the model has no MoE layer (a dense model), naming it.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f'model {model_name or _model_name(model)!r} has no MoE layer (a dense model?); a routing '
                         f'report needs a MoE model, e.g. vit_ti16_moe_upcycled or vit_moe.upcycle(dense_model)')
    return {m.layer_name: dict(num_experts=m.num_experts, router=type(m.router).__name__,
                               expert_choice=isinstance(m.router, ExpertChoiceRouter)) for m in layers.values()}


def load_report_models(model_name: str, checkpoint: Optional[str], start_checkpoint: Optional[str] = None,
                       model_kwargs: Optional[Dict[str, Any]] = None, seed: int = 0,
                       capacity_factor: Optional[Union[float, Dict[str, float]]] = None,
                       ) -> Tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """(model, start model or None), in eval mode, through `create_model_from_checkpoint`.

    The start model is built with the model's own arguments (a dense folder given as `start_checkpoint` restores
    only weights, data config and labels) and after `torch.manual_seed(seed)`, like the trainer (whose default seed
    is 0), so an upcycled start gets the router initialisation the training run started from. Both run at
    `capacity_factor` when it is given.
    """
    capacity_factor, model_kwargs = take_capacity_factor(model_kwargs, capacity_factor)
    model = create_model_from_checkpoint(model_name, checkpoint, capacity_factor=capacity_factor,
                                         **model_kwargs).eval()
    moe_layer_info(model, model_name)
    start = None
    if start_checkpoint:
        args = {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in ('pretrained_cfg_overlay',)}
        args.update(model_kwargs or {})
        args.pop('num_classes', None)
        saved_capacity = args.pop('capacity_factor', None)  # the model's own, unless one is given
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            start = create_model_from_checkpoint(model_name, start_checkpoint, num_classes=model.num_classes,
                                                 capacity_factor=capacity_factor if capacity_factor is not None
                                                 else saved_capacity, **args).eval()
        if set(moe_layer_info(start, model_name)) != set(moe_layer_info(model, model_name)):
            raise ValueError(f'start checkpoint {start_checkpoint!r} gives MoE layers {sorted(moe_layer_info(start))}, '
                             f'the checkpoint {sorted(moe_layer_info(model))}; give a start model of the same layout')
    return model, start


def _file_stem(layer: str) -> str:
    return re.sub(r'[^A-Za-z0-9]+', '_', layer).strip('_')


def _class_map(model: torch.nn.Module, data_dir: str, split: str,
               class_names: Optional[Sequence[str]]) -> Optional[Dict[str, int]]:
    """Class name -> index from the model's label names when every folder of the split is one of them; else None
    (sorted folder names, as the trainer does)."""
    names = list(class_names) if class_names else list((getattr(model, 'pretrained_cfg', None) or {}).get(
        'label_names') or [])
    split_dir = Path(data_dir) / split
    if not names or not split_dir.is_dir():
        return None
    folders = {p.name for p in split_dir.iterdir() if p.is_dir()}
    return {str(n): i for i, n in enumerate(names)} if folders <= {str(n) for n in names} else None


def _progress(iterable, enabled: bool, total: int, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the [train] extra; without it, no bar
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit='batch', leave=False)


def _most_important(values: List[float], k: int) -> List[int]:
    """Indices of the `k` largest values, largest first."""
    return sorted(range(len(values)), key=lambda e: -values[e])[:k]


def routing_report(
        model: torch.nn.Module,
        data_dir: str,
        output_dir: str,
        split: str = 'val',
        start_model: Optional[torch.nn.Module] = None,
        max_images: Optional[int] = None,
        num_example_images: int = 8,
        experts_shown: int = 4,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
        background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
        class_names: Optional[Sequence[str]] = None,
        model_name: Optional[str] = None,
        checkpoint: Optional[str] = None,
        start_checkpoint: Optional[str] = None,
        device: Optional[torch.device] = None,
) -> Dict[str, Any]:
    """Write report.md, report.json and PNG figures on the routing of `model` over `data_dir/split`.

    Args:
        model: a model with MoE layers (vit_moe's); put in eval mode for the pass and restored after.
        data_dir, split: an ImageFolder split `data_dir/split/<class>/<image>`; unreadable images are left out.
        output_dir: created if needed; report.md, report.json and the PNGs go there.
        start_model: the same architecture at another point (e.g. the upcycled model before training): its
            routing on the same images is compared with the model's.
        max_images: use this many images, evenly spaced over the split (all classes), instead of all.
        num_example_images: images in each layer's example grid (evenly spaced over the split).
        experts_shown: experts in the example grids: the layer's most important ones (mean router probability).
        batch_size, num_workers: the data loader's.
        progress: a progress bar over the batches (tqdm).
        background_threshold: a patch is background when the mean of its un-normalised pixels (channels and
            pixels averaged, in [0, 1]) is below this; otherwise object. Prefix tokens (class token, registers)
            are their own category.
        class_names: names of the model's classes in index order (default: the model's label names, else the
            split's sorted folder names).
        model_name, checkpoint, start_checkpoint: named in the report (default: the model's architecture).
        device: where to run (default: the model's device).

    Returns:
        The numbers report.json holds: `layers` (per MoE layer, see `LayerStats.result`), `start_layers` (or None),
        `figures` (relative paths), `num_images`, `top1` (when the model's classes are known), ...

    Raises:
        ValueError: a model without MoE layers, a start model of another layout, a patch grid that does not
            match the tokens.
        FileNotFoundError: a missing data folder or split.
    """
    started = time.perf_counter()
    model_name = model_name or _model_name(model)
    info = moe_layer_info(model, model_name)
    soft = bool(soft_moe_layers(model))  # Soft MoE: slots mix tokens, a report of mixes (soft_routing_report)
    if not soft:
        figures.require_matplotlib()  # before the pass over the data
    if start_model is not None and set(moe_layer_info(start_model, model_name)) != set(info):
        raise ValueError(f'the start model has MoE layers {sorted(moe_layer_info(start_model))}, the model '
                         f'{sorted(info)}; give a start model of the same layout')
    device = device or next(model.parameters()).device
    data = _report_data(model, data_dir, split, class_names, max_images, num_example_images, batch_size, num_workers)
    bar = lambda it, total: _progress(it, progress, total, 'routing report')  # noqa: E731
    if soft:
        header = dict(model=model_name, checkpoint=checkpoint, start_checkpoint=start_checkpoint,
                      data_dir=str(data_dir), split=split, input_size=[int(v) for v in data.config['input_size']])
        return soft_routing_report(
            model, data.loader, len(data.subset), output_dir, data.config,
            {m.layer_name: m for m in moe_layers(model).values()}, start_model,
            background_threshold, bar, device, header, data.top1_known)

    models = {'model': model} if start_model is None else {'model': model, 'start': start_model}
    run = RoutingPass(models, data.config, background_threshold, device)
    stats, examples, example_meta = _collect(run, data, info, bar)
    if run.num_images == 0:
        raise ValueError(f'no readable image in {data_dir}/{split}')
    missing = sorted(set(info) - set(stats['model']))
    if missing:
        raise ValueError(f'MoE layers {missing} of {model_name} did not run in the forward pass')

    layers = {name: stats['model'][name].result() for name in info}
    start_layers = {name: stats['start'][name].result() for name in info} if start_model is not None else None
    out = Path(output_dir)
    figure_paths, shown = _draw_figures(out, layers, start_layers, examples, data.labels, run.patch_size,
                                        experts_shown)
    result = dict(
        model=model_name, checkpoint=checkpoint, start_checkpoint=start_checkpoint, data_dir=str(data_dir),
        split=split, num_images=run.num_images, num_excluded=run.num_excluded, num_classes=data.num_classes,
        class_names=data.labels, top1=100.0 * run.correct / run.num_images if data.top1_known else None,
        input_size=[int(v) for v in data.config['input_size']], patch_size=list(run.patch_size),
        num_prefix_tokens=run.num_prefix, grid=next(iter(layers.values()))['grid'],
        background_threshold=background_threshold,
        background_definition=(f'a patch is background when the mean of its un-normalised pixel values (over '
                               f'channels and pixels, in [0, 1]) is below {background_threshold}; object otherwise'),
        layers=layers, start_layers=start_layers, experts_shown=shown, examples=example_meta, figures=figure_paths,
        capacity_factor=capacity_factors(model),
    )
    result['seconds'] = time.perf_counter() - started
    (out / 'report.json').write_text(json.dumps(result, indent=1))
    (out / 'report.md').write_text(format_report(result))
    return result


def _collect(run: RoutingPass, data: '_ReportData', info: Dict[str, Dict[str, Any]], bar):
    """The pass over the images: per model key and layer its `LayerStats`, the example images' per-patch arrays per
    layer, and the example images' paths and patch counts."""
    stats: Dict[str, Dict[str, LayerStats]] = {key: {} for key in run.models}
    examples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in info}
    example_meta: List[Dict[str, Any]] = []
    for batch in run.batches(data.loader, bar):
        grid = (batch.display.shape[-2] // run.patch_size[0], batch.display.shape[-1] // run.patch_size[1])
        shown_images = [i for i, p in enumerate(batch.positions.tolist()) if p in data.example_positions]
        for key, capture in batch.captures.items():
            for name, routing in capture.tensors:
                if name not in info:
                    raise ValueError(f'layer {name!r} recorded routing but is not a MoE layer of the model')
                if name not in stats[key]:
                    stats[key][name] = LayerStats(info[name]['num_experts'], routing.probs.shape[1], run.num_prefix,
                                                  grid, data.num_classes, info[name]['expert_choice'])
                per_image = stats[key][name].update(routing.token_index, routing.combine_weights, routing.probs,
                                                    batch.targets, batch.categories)
                if key == 'model':
                    examples[name] += [dict(image=batch.display[i].permute(1, 2, 0).numpy(),
                                            target=int(batch.targets[i]),
                                            **{k: v[i].numpy() for k, v in per_image.items()}) for i in shown_images]
        for i in shown_images:
            counts = {c: int((batch.categories[i] == k).sum())
                      for c, k in (('prefix', PREFIX), ('background', BACKGROUND), ('object', OBJECT))}
            example_meta.append(dict(path=data.dataset.path(int(data.indices[int(batch.positions[i])])),
                                     target=int(batch.targets[i]), category_counts=counts))
    return stats, examples, example_meta


class _ReportData(NamedTuple):
    config: Dict[str, Any]  # timm data config of the model
    dataset: ImageFolderDataset
    indices: np.ndarray  # dataset index of each image of the pass
    subset: torch.utils.data.Subset
    loader: torch.utils.data.DataLoader
    example_positions: set  # positions in the pass of the example images
    labels: List[str]  # class names in index order
    num_classes: int
    top1_known: bool  # the model's classes are the split's


def _report_data(model, data_dir, split, class_names, max_images, num_example_images, batch_size,
                 num_workers) -> _ReportData:
    """The split with the model's eval preprocessing, `max_images` of it evenly spaced, and the example images."""
    config = data_config_for(model)
    class_map = _class_map(model, data_dir, split, class_names)
    dataset = ImageFolderDataset(data_dir, split, class_map=class_map,
                                 transform=build_transforms(config, None, is_training=False),
                                 substitute_unreadable=False)
    names_by_index = {i: n for n, i in dataset.class_to_idx.items()}
    num_classes = max(names_by_index) + 1
    labels = [names_by_index.get(i, str(i)) for i in range(num_classes)]
    top1_known = class_map is not None or getattr(model, 'num_classes', None) == num_classes
    indices = np.arange(len(dataset))
    if max_images is not None and max_images < len(dataset):
        indices = np.unique(np.linspace(0, len(dataset) - 1, max(max_images, 1)).round().astype(int))
    subset = torch.utils.data.Subset(dataset, indices.tolist())
    example_positions = set(np.unique(np.linspace(0, len(subset) - 1, min(num_example_images, len(subset))).round()
                                      .astype(int)).tolist()) if num_example_images > 0 else set()
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return _ReportData(config, dataset, indices, subset, loader, example_positions, labels, num_classes, top1_known)


def _draw_figures(out: Path, layers, start_layers, examples, labels, patch_size, experts_shown: int):
    """The coverage, combine-weight, class-map and example PNGs in `out`: (relative paths, experts shown per layer)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Any] = dict(coverage='coverage.png', combine_weights='combine_weights.png', class_maps={},
                                 examples={})
    shown: Dict[str, List[int]] = {}
    figures.plot_coverage(out / paths['coverage'], layers, start_layers)
    figures.plot_combine_weights(out / paths['combine_weights'], layers, start_layers)
    for name, layer in layers.items():
        stem = _file_stem(name)
        paths['class_maps'][name] = f'classes_{stem}.png'
        figures.plot_class_maps(out / paths['class_maps'][name], name, layer, labels)
        if examples[name]:
            shown[name] = _most_important(layer['expert_importance'], min(experts_shown, layer['num_experts']))
            paths['examples'][name] = f'examples_{stem}.png'
            figures.plot_examples(out / paths['examples'][name], name, examples[name], shown[name], layer,
                                  patch_size, labels)
    return paths, shown


def _capacity_text(factors: Dict[str, float]) -> str:
    values = sorted(set(factors.values()))
    return f'{values[0]:g}' if len(values) == 1 else ', '.join(f'{k}: {v:g}' for k, v in factors.items())


def _pct(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.1f} %'


def _num(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _arrow(start: Optional[Dict], end: Dict, get, fmt) -> str:
    return fmt(get(end)) if start is None else f'{fmt(get(start))} -> {fmt(get(end))}'


def format_report(r: Dict[str, Any]) -> str:
    """report.md from the numbers `routing_report` returns (figures linked by relative path)."""
    lines = (_header_lines(r) + _coverage_lines(r) + _importance_lines(r) + _combine_weight_lines(r)
             + _example_lines(r) + [f'Written in {r["seconds"]:.1f} s.'])
    return '\n'.join(lines) + '\n'


def _routers(layers: Dict[str, Dict]) -> List[str]:
    return sorted({layer['router'].replace('_', ' ') for layer in layers.values()})


def _header_lines(r: Dict[str, Any]) -> List[str]:
    layers, P = r['layers'], r['num_prefix_tokens']
    first = next(iter(layers.values()))
    lines = [
        f'# Routing report: {r["model"]}', '',
        f'Model `{r["model"]}`' + (f' (checkpoint `{r["checkpoint"]}`)' if r['checkpoint'] else '')
        + f' on `{r["data_dir"]}/{r["split"]}`: {r["num_images"]} images'
        + (f' ({r["num_excluded"]} unreadable left out)' if r['num_excluded'] else '')
        + f', {r["num_classes"]} classes' + (f', top-1 {r["top1"]:.2f} %' if r['top1'] is not None else '') + '.',
        f'{len(layers)} MoE layer(s) ({", ".join(_routers(layers))}, {first["num_experts"]} experts, capacity '
        f'{first["capacity"]} slots per expert per image'
        + (f', capacity factor {_capacity_text(r["capacity_factor"])}' if r.get('capacity_factor') else '')
        + f'); input {r["input_size"][1]}x{r["input_size"][2]}, patch '
        f'{r["patch_size"][0]}x{r["patch_size"][1]}: {r["grid"][0]}x{r["grid"][1]} patches + {P} prefix token(s) = '
        f'{first["num_tokens"]} tokens per image.',
    ]
    if r['start_layers'] is not None:
        lines.append(f'Start model for comparison: `{r["start_checkpoint"] or "given"}` (same images; "start -> end" '
                     f'in the tables).')
    return lines + [
        '',
        f'**Background / object patches**: {r["background_definition"]}. Prefix tokens (the class token'
        f'{", registers" if P > 1 else ""}) are counted apart. A token taken by no expert skips the MoE layer '
        f'(residual only).',
        '',
        'Every number below is computed from the routing tensors captured in one pass over the images '
        '(`vit_moe.capture_routing(keep_tensors=True)`: slot token indices, combine weights, router probabilities); '
        'the figures are drawn from the same arrays, which `report.json` holds.',
        '',
    ]


def _coverage_lines(r: Dict[str, Any]) -> List[str]:
    layers, start = r['layers'], r['start_layers']
    lines = ['## Tokens taken by 0, 1, 2, ... experts', '',
             '| layer | tokens unprocessed | background | object | prefix | mean experts per token | '
             'background / object patches |',
             '|---|---|---|---|---|---|---|']
    for name, layer in layers.items():
        s = start[name] if start else None
        cells = [_arrow(s, layer, lambda x, k=k: x['unprocessed_fraction'][k], _pct)
                 for k in ('all', 'background', 'object', 'prefix')]
        counts = layer['num_tokens_by_category']
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' | '
                     + _arrow(s, layer, lambda x: x['mean_experts_per_token']['all'], _num)
                     + f' | {counts["background"]} / {counts["object"]} |')
    lines += ['', '"Unprocessed": the fraction of the category\'s tokens that no expert took.'
              + (' Under expert choice the mean number of experts per token is E x capacity / T by construction; '
                 'where the slots go is what changes.' if 'expert choice' in _routers(layers) else ''), '']
    for name, layer in layers.items():
        hist = layer['experts_per_token']['all']
        last = max(k for k, v in enumerate(hist) if v) if any(hist) else 0
        lines.append(f'- `{name}`: tokens taken by k = 0..{last} experts: {", ".join(str(v) for v in hist[:last + 1])}'
                     + (f' (start: {", ".join(str(v) for v in start[name]["experts_per_token"]["all"][:last + 1])})'
                        if start else ''))
    return lines + ['', f'![tokens per number of experts and unprocessed patch positions]({r["figures"]["coverage"]})',
                    '']


def _importance_lines(r: Dict[str, Any]) -> List[str]:
    layers, labels = r['layers'], r['class_names']
    lines = ['## Expert load and importance per class', '',
             '| layer | importance per expert (min - max) | largest class importance | largest class share of '
             'combine weight |', '|---|---|---|---|']
    for name, layer in layers.items():
        importance = layer['expert_importance']
        cells = []
        for key in ('importance', 'combine_weight'):
            m = np.array([[np.nan if v is None else v for v in row] for row in layer['per_class'][key]], dtype=float)
            if np.isfinite(m).any():
                e, c = np.unravel_index(np.nanargmax(m), m.shape)
                cells.append(f'expert {e}, class {labels[c]}: {m[e, c]:.3f}')
            else:
                cells.append('-')
        lines.append(f'| {name} | {min(importance):.3f} - {max(importance):.3f} | {cells[0]} | {cells[1]} |')
    if any(layer['router'] == 'expert_choice' for layer in layers.values()):
        lines += ['', 'Under expert choice every expert takes exactly `capacity` tokens of every image, so the load '
                      '(share of token -> expert assignments) is uniform by construction; the heatmaps show the '
                      'router importance (mean probability over the class\'s tokens) and each expert\'s share of the '
                      'class\'s combine weight instead (token choice layers also show the load).']
    lines.append('')
    return lines + [f'- `{name}`: ![{name} experts x classes]({r["figures"]["class_maps"][name]})' for name in layers]


def _combine_weight_lines(r: Dict[str, Any]) -> List[str]:
    layers, start = r['layers'], r['start_layers']
    lines = ['', '## Combine weights', '', '| layer | filled slots | mean | min | max |', '|---|---|---|---|---|']
    for name, layer in layers.items():
        s = start[name] if start else None
        cw = layer['combine_weights']
        lines.append(f'| {name} | {cw["num_filled"]} of {cw["num_slots"]} | '
                     + ' | '.join(_arrow(s, layer, lambda x, k=k: x['combine_weights'][k], lambda v: _num(v, 4))
                                  for k in ('mean', 'min', 'max')) + ' |')
    return lines + ['', f'![combine weights]({r["figures"]["combine_weights"]})', '']


def _example_lines(r: Dict[str, Any]) -> List[str]:
    if not r['figures']['examples']:
        return []
    lines = ['## Example images', '',
             f'{len(r["examples"])} images evenly spaced over the split. Columns: the image; experts per patch '
             f'(red: none); the top expert of each patch (largest combine weight; black: none); then the layer\'s '
             f'most important experts, each with the patches it took framed and tinted in its colour. Patches no '
             f'expert took are framed in red; prefix tokens taken are written in the corner of a cell.', '',
             '| layer | experts shown (importance) |', '|---|---|']
    for name, experts in r['experts_shown'].items():
        importance = r['layers'][name]['expert_importance']
        lines.append(f'| {name} | ' + ', '.join(f'{e} ({importance[e]:.1%})' for e in experts) + ' |')
    lines.append('')
    for name, path in r['figures']['examples'].items():
        lines += [f'### {name}', '', f'![{name} example routing]({path})', '']
    return lines
