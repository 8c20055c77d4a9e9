""" Figures of a routing report, drawn from the numbers of `routing_stats` (the arrays that report.json holds).

matplotlib is imported lazily (the `[report]` extra). Figures are `matplotlib.figure.Figure` objects rendered by
the Agg canvas and saved as PNG: pyplot is never imported, so nothing is displayed, no global backend is
switched and no figure stays registered after it is saved.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._extras import require_extra

__all__ = ['require_matplotlib', 'expert_colors', 'plot_examples', 'plot_class_maps', 'plot_coverage', 'plot_combine_weights']

DPI = 100
UNPROCESSED = (1.0, 0.0, 0.0)  # frame of the patches no expert took
CATEGORY_COLORS = dict(all='0.35', background='tab:blue', object='tab:orange', prefix='tab:green')


def require_matplotlib() -> None:
    """An ImportError naming the `[report]` extra when matplotlib is not installed."""
    require_extra('report', ('matplotlib',), 'vit_moe.analysis (routing report figures)')


def _mpl():
    require_matplotlib()
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    return matplotlib, Figure, FigureCanvasAgg


def _save(fig, canvas_cls, path) -> None:
    canvas_cls(fig)
    fig.savefig(str(path), dpi=DPI)
    fig.clear()


def expert_colors(num_experts: int) -> np.ndarray:
    """[E, 4] RGBA: tab10 / tab20 for up to 10 / 20 experts, else evenly spaced hues."""
    matplotlib, _, _ = _mpl()
    if num_experts <= 10:
        return np.array([matplotlib.colormaps['tab10'](i) for i in range(num_experts)])
    if num_experts <= 20:
        return np.array([matplotlib.colormaps['tab20'](i) for i in range(num_experts)])
    return matplotlib.colormaps['hsv'](np.linspace(0, 1, num_experts, endpoint=False))


def _fmt(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.3f}'


def _prefix_name(num_prefix: int, i: int) -> str:
    return 'CLS' if num_prefix == 1 or i == 0 else f'R{i}'


def _blend(image: np.ndarray, rgba: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """`image` [H, W, 3] with a per-patch RGBA overlay [gh, gw, 4] alpha-blended onto the patches it covers."""
    ph, pw = patch_size
    gh, gw = rgba.shape[:2]
    layer = np.repeat(np.repeat(rgba, ph, axis=0), pw, axis=1)  # [gh * ph, gw * pw, 4]
    out = image.astype(np.float64).copy()
    region = out[:gh * ph, :gw * pw]
    alpha = layer[..., 3:]
    region[:] = region * (1 - alpha) + layer[..., :3] * alpha
    return out


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _outline(picture: np.ndarray, mask: np.ndarray, color, patch_size: Sequence[int], scale: int) -> np.ndarray:
    """Draw a frame in `color` around every patch where `mask` [gh, gw] is True (on a picture upscaled by `scale`)."""
    ph, pw = patch_size[0] * scale, patch_size[1] * scale
    gh, gw = mask.shape
    t = max(1, min(ph, pw) // 8)
    frame = np.zeros((ph, pw), dtype=bool)
    frame[:t], frame[-t:], frame[:, :t], frame[:, -t:] = True, True, True, True
    full = np.tile(frame, (gh, gw)) & mask.repeat(ph, axis=0).repeat(pw, axis=1)
    out = picture.copy()
    out[:gh * ph, :gw * pw][full] = np.asarray(color)[:3]
    return out


def example_cells(example: Dict, experts: Sequence[int], layer_stats: Dict, patch_size: Sequence[int],
                  colors: np.ndarray, count_colors: np.ndarray, scale: int = 1) -> List[Tuple[np.ndarray, str]]:
    """(picture [H * scale, W * scale, 3], corner note) of each column of one example row: the image, experts per
    patch, top expert, then one per expert in `experts` (its patches framed and tinted in its colour, the others
    dimmed)."""
    P = layer_stats['num_prefix_tokens']
    gh, gw = layer_stats['grid']
    img = np.asarray(example['image'], dtype=np.float64)
    counts, top, taken = (np.asarray(example[k]) for k in ('counts', 'top_expert', 'taken'))
    cells = [(_upscale(img, scale), '')]
    unprocessed = (counts[P:] == 0).reshape(gh, gw)  # framed in red in both maps
    rgba = count_colors[counts[P:]].copy()
    rgba[:, 3] = 0.6
    picture = _upscale(_blend(img, rgba.reshape(gh, gw, 4), patch_size), scale)
    cells.append((_outline(picture, unprocessed, UNPROCESSED, patch_size, scale),
                  ' '.join(f'{_prefix_name(P, i)}:{int(counts[i])}' for i in range(P))))
    patch_top = top[P:]
    rgba = np.zeros((gh * gw, 4))
    rgba[patch_top >= 0] = colors[patch_top[patch_top >= 0]]
    rgba[:, 3] = np.where(patch_top >= 0, 0.6, 0.8)  # black, more opaque: no expert
    picture = _upscale(_blend(img, rgba.reshape(gh, gw, 4), patch_size), scale)
    cells.append((_outline(picture, unprocessed, UNPROCESSED, patch_size, scale),
                  ' '.join(f'{_prefix_name(P, i)}:{"-" if top[i] < 0 else f"e{int(top[i])}"}' for i in range(P))))
    for e in experts:
        mask = taken[e, P:]
        rgba = np.zeros((gh * gw, 4))
        rgba[mask] = colors[e]
        rgba[:, 3] = np.where(mask, 0.35, 0.6)  # the expert's patches tinted, the others dimmed
        picture = _upscale(_blend(img, rgba.reshape(gh, gw, 4), patch_size), scale)
        cells.append((_outline(picture, mask.reshape(gh, gw), colors[e], patch_size, scale),
                      ' '.join(_prefix_name(P, i) for i in range(P) if taken[e, i])))
    return cells


def plot_examples(path, layer: str, examples: List[Dict], experts: Sequence[int], layer_stats: Dict,
                  patch_size: Sequence[int], class_names: Sequence[str]) -> None:
    """A grid: one row per example image; columns: the image, experts per patch (red: none), the top expert of each
    patch (largest combine weight; black: none; patches no expert took are framed in red in both), then each expert of `experts` with the patches it took tinted in
    its colour (the others dimmed). Prefix tokens (class token: CLS) taken are written in the cell's corner.

    `examples`: dicts with `image` [H, W, 3] in [0, 1], `target`, `counts` [T], `top_expert` [T], `taken` [E, T]
    (this layer's tensors for that image, as returned by LayerStats.update). Drawn as one mosaic picture (one
    imshow, fast for many cells), each cell upscaled to at least 96 pixels.
    """
    matplotlib, Figure, Canvas = _mpl()
    from matplotlib.patches import Patch

    E = layer_stats['num_experts']
    colors = expert_colors(E)
    count_colors = np.vstack([[1.0, 0.0, 0.0, 1.0], matplotlib.colormaps['viridis'](np.linspace(0, 1, E))])
    importance = layer_stats['expert_importance']
    titles = ['image', 'experts per patch', 'top expert'] + [f'expert {e} ({importance[e]:.1%})' for e in experts]
    H, W = np.asarray(examples[0]['image']).shape[:2]
    scale = max(1, -(-96 // max(H, W)))
    rows = [example_cells(ex, experts, layer_stats, patch_size, colors, count_colors, scale) for ex in examples]
    pad = max(2, scale)
    ch, cw = H * scale + pad, W * scale + pad
    mosaic = np.ones((len(rows) * ch, len(titles) * cw, 3))
    for r, cells in enumerate(rows):
        for c, (picture, _) in enumerate(cells):
            mosaic[r * ch:r * ch + H * scale, c * cw:c * cw + W * scale] = np.clip(picture[..., :3], 0, 1)
    cell_h, cell_w = 1.3 * ch / max(ch, cw), 1.3 * cw / max(ch, cw)  # inches, keeping the images' aspect ratio
    width, height = cell_w * len(titles) + 0.6, cell_h * len(rows) + 1.2
    fig = Figure(figsize=(max(width, 6.0), height))
    width = max(width, 6.0)
    ax = fig.add_axes([0.45 / width, 0.6 / height, cell_w * len(titles) / width, cell_h * len(rows) / height])
    ax.imshow(mosaic, interpolation='nearest', aspect='auto')
    ax.set_axis_off()
    for c, title in enumerate(titles):
        ax.text((c + 0.5) * cw, -pad, title, ha='center', va='bottom', fontsize=7)
    for r, cells in enumerate(rows):
        ax.text(-pad, (r + 0.5) * ch, str(class_names[examples[r]['target']]), ha='right', va='center', fontsize=7,
                rotation=90)
        for c, (_, note) in enumerate(cells):
            if note:
                ax.text(c * cw + pad, r * ch + pad, note, ha='left', va='top', fontsize=5.5, color='white',
                        bbox=dict(facecolor='black', alpha=0.6, pad=0.8, linewidth=0))
    router = layer_stats['router'].replace('_', ' ')
    fig.suptitle(f'{layer}: patches per expert ({router}, {E} experts, capacity {layer_stats["capacity"]})',
                 fontsize=9, y=1 - 0.12 / height)
    counts_handles = [Patch(color=count_colors[0], label='0')] + [
        Patch(color=count_colors[k], label=str(k)) for k in range(1, E + 1)]
    fig.legend(handles=counts_handles, loc='lower left', ncol=min(len(counts_handles), 9), fontsize=5.5,
               title='experts per patch', title_fontsize=6, frameon=False, handlelength=1.0, columnspacing=0.8)
    handles = [Patch(color=colors[e], label=f'e{e}') for e in range(E)] + [
        Patch(facecolor='black', edgecolor=UNPROCESSED, label='none')]
    fig.legend(handles=handles, loc='lower right', ncol=min(len(handles), 9), fontsize=5.5, title='top expert',
               title_fontsize=6, frameon=False, handlelength=1.0, columnspacing=0.8)
    _save(fig, Canvas, path)


def plot_class_maps(path, layer: str, layer_stats: Dict, class_names: Sequence[str]) -> None:
    """Heatmaps experts x classes: router importance (mean probability) and the share of the class's combine weight
    each expert gives; for token choice also the load (share of the class's token -> expert assignments; under
    expert choice every expert takes the same number of tokens of every image, so it is uniform by construction)."""
    _, Figure, Canvas = _mpl()
    per_class = layer_stats['per_class']
    panels = [('importance', 'importance: mean router probability')]
    panels.append(('combine_weight', "share of the class's combine weight"))
    if layer_stats['router'] != 'expert_choice':
        panels.insert(0, ('load', "load: share of the class's assignments"))
    E, C = layer_stats['num_experts'], len(class_names)
    width = min(max(4.0, 0.3 * C + 2.0), 14.0)
    fig = Figure(figsize=(width * len(panels), max(3.0, 0.28 * E + 1.8)))
    axes = np.array(fig.subplots(1, len(panels), squeeze=False))[0]
    for ax, (key, title) in zip(axes, panels):
        values = np.array([[np.nan if v is None else v for v in row] for row in per_class[key]], dtype=float)
        im = ax.imshow(values, aspect='auto', cmap='magma', interpolation='nearest')
        fig.colorbar(im, ax=ax, fraction=0.05)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel('expert')
        ax.set_yticks(range(E))
        ax.tick_params(labelsize=7)
        if C <= 40:
            ax.set_xticks(range(C))
            ax.set_xticklabels([str(n) for n in class_names], rotation=90 if max(map(len, map(str, class_names))) > 2
                               else 0)
        ax.set_xlabel('class')
    fig.suptitle(f'{layer}: experts x classes ({layer_stats["num_images"]} images)', fontsize=10)
    fig.tight_layout()
    _save(fig, Canvas, path)


def _last_nonzero(*hists) -> int:
    last = 0
    for h in hists:
        nz = np.flatnonzero(np.asarray(h))
        if nz.size:
            last = max(last, int(nz[-1]))
    return last


def plot_coverage(path, layers: Dict[str, Dict], start_layers: Optional[Dict[str, Dict]] = None) -> None:
    """Per layer (a row): the fraction of tokens taken by 0, 1, 2, ... experts, for all tokens and for background /
    object patches and prefix tokens (bars: the model; dashed markers: the start model), then the map of how often
    each patch position was left unprocessed (taken by no expert), for the model and the start model."""
    _, Figure, Canvas = _mpl()
    names = list(layers)
    cols = 2 + (start_layers is not None)
    fig = Figure(figsize=(6.5 + 3.0 * (cols - 1), 2.9 * len(names) + 0.5))
    axes = np.array(fig.subplots(len(names), cols, squeeze=False, gridspec_kw=dict(
        width_ratios=[2.2] + [1] * (cols - 1))))
    keys = ('all', 'background', 'object', 'prefix')
    vmax = max([float(np.max(layers[n]['unprocessed_map'])) for n in names]
               + [float(np.max(start_layers[n]['unprocessed_map'])) for n in names if start_layers is not None])
    vmax = vmax if vmax > 0 else 1.0  # one colour scale for every map of the figure
    for r, name in enumerate(names):
        stats = layers[name]
        start = start_layers[name] if start_layers is not None else None
        hists = {k: np.asarray(stats['experts_per_token'][k], dtype=float) for k in keys}
        start_hists = {k: np.asarray(start['experts_per_token'][k], dtype=float) for k in keys} if start else {}
        kmax = max(_last_nonzero(*hists.values(), *start_hists.values()), 1)
        ks = np.arange(kmax + 1)
        ax = axes[r, 0]
        shown = [k for k in keys if hists[k].sum() > 0]
        width = 0.8 / len(shown)
        for i, k in enumerate(shown):
            frac = hists[k][:kmax + 1] / hists[k].sum()
            ax.bar(ks - 0.4 + width * (i + 0.5), frac, width=width, color=CATEGORY_COLORS[k],
                   label=f'{k} ({int(hists[k].sum())})')
            if start and start_hists[k].sum() > 0:
                sfrac = start_hists[k][:kmax + 1] / start_hists[k].sum()
                ax.plot(ks - 0.4 + width * (i + 0.5), sfrac, linestyle='--', marker='_', markersize=8,
                        color=CATEGORY_COLORS[k], linewidth=0.8)
        ax.set_xticks(ks)
        ax.set_xlabel('experts that took the token')
        ax.set_ylabel('fraction of tokens')
        ax.set_title(f'{name}' + (' (bars: model, dashed: start)' if start else ''), fontsize=9)
        ax.legend(fontsize=7, title='tokens (count)', title_fontsize=7)
        maps = [('model', stats)] + ([('start', start)] if start else [])
        for c, (label, s) in enumerate(maps, start=1):
            im = axes[r, c].imshow(np.asarray(s['unprocessed_map']), vmin=0, vmax=vmax, cmap='Reds',
                                   interpolation='nearest')
            axes[r, c].set_title(f'{label}: unprocessed {s["unprocessed_fraction"]["all"]:.1%} of tokens', fontsize=8)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            fig.colorbar(im, ax=axes[r, c], fraction=0.046, label='fraction of images')
    fig.suptitle('Tokens taken by 0, 1, 2, ... experts; how often each patch position was left unprocessed',
                 fontsize=10)
    fig.tight_layout()
    _save(fig, Canvas, path)


def plot_combine_weights(path, layers: Dict[str, Dict], start_layers: Optional[Dict[str, Dict]] = None) -> None:
    """Per layer (a panel): histogram of the combine weights of the filled slots (fraction of slots per bin), the
    start model's as a step line, and 1/E (a uniform router's probability) dashed."""
    _, Figure, Canvas = _mpl()
    names = list(layers)
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.4))
    axes = np.array(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, name in zip(axes, names):
        cw = layers[name]['combine_weights']
        edges = np.asarray(cw['bin_edges'])
        counts = np.asarray(cw['counts'], dtype=float)
        start = start_layers[name]['combine_weights'] if start_layers is not None else None
        start_counts = np.asarray(start['counts'], dtype=float) if start else np.zeros_like(counts)
        last = _last_nonzero(counts, start_counts) + 1
        ax.bar(edges[:last], counts[:last] / max(counts.sum(), 1), width=np.diff(edges)[:last], align='edge',
               color='tab:purple', alpha=0.8, label=f'model (mean {_fmt(cw["mean"])})')
        if start:
            heights = np.append(start_counts[:last], start_counts[last - 1]) / max(start_counts.sum(), 1)
            ax.step(edges[:last + 1], heights,
                    where='post', color='black', linewidth=1, label=f'start (mean {_fmt(start["mean"])})')
        E = layers[name]['num_experts']
        ax.axvline(1.0 / E, color='0.4', linestyle='--', linewidth=0.8, label=f'1/E = {1 / E:.3f}')
        ax.set_xlim(0, edges[last])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('combine weight')
        ax.set_ylabel('fraction of filled slots')
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle('Combine weights of the filled expert slots', fontsize=10)
    fig.tight_layout()
    _save(fig, Canvas, path)
