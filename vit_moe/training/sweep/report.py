""" A sweep's report: every run's numbers collected, cells aggregated over seeds (mean, std, vs the dense
continuation), results.md / results.csv / runs.csv and the accuracy curves (matplotlib, the [report] extra).
"""
import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..._files import atomic_write
from .runner import read_run, run_status
from .spec import Sweep

def collect_results(sweep: Sweep) -> List[Dict[str, Any]]:
    """One entry per planned run of every cell: its status, and its numbers when it finished."""
    results = []
    for cell in sweep.cells:
        for run in cell.runs:
            status = run_status(run)
            entry = dict(cell=cell.name, seed=run.seed, baseline=cell.baseline, status=status.state,
                         detail=status.detail)
            if status.state == 'finished':
                entry.update(read_run(run.cfg.output_dir, run.cfg.steps))
            results.append(entry)
    return results


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mean_curve(curves: Sequence[Sequence[Tuple[int, Optional[float], float]]]) -> List[Dict[str, float]]:
    """Per step evaluated in EVERY curve ((step, elapsed_s, top1) lists): mean elapsed_s, mean / min / max top1."""
    if not curves:
        return []
    common = set.intersection(*({step for step, _, _ in c} for c in curves))
    by_step = [{step: (elapsed, top1) for step, elapsed, top1 in c} for c in curves]
    return [dict(step=s, elapsed_s=_mean([c[s][0] for c in by_step]), top1=statistics.fmean(c[s][1] for c in by_step),
                 top1_min=min(c[s][1] for c in by_step), top1_max=max(c[s][1] for c in by_step))
            for s in sorted(common)]


def aggregate(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows per cell (in order of first appearance) from per-run results: top-1 mean, sample std, min, max over
    the finished seeds, means of the other numbers, the mean curve, and top-1 relative to the baseline's mean."""
    cells: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        cells.setdefault(r['cell'], []).append(r)
    rows = []
    for name, runs in cells.items():
        done = [r for r in runs if r['status'] == 'finished']
        top1 = [r['top1'] for r in done]
        rows.append(dict(
            cell=name, baseline=any(r.get('baseline') for r in runs), planned=len(runs), n=len(done),
            seeds=[r['seed'] for r in done], diverged=[r['seed'] for r in runs if r['status'] == 'diverged'],
            missing=[r['seed'] for r in runs if r['status'] not in ('finished', 'diverged')],
            top1_mean=_mean(top1), top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
            top1_min=min(top1, default=None), top1_max=max(top1, default=None),
            top5_mean=_mean([r.get('top5') for r in done]), val_loss_mean=_mean([r.get('val_loss') for r in done]),
            train_loss_mean=_mean([r.get('train_loss') for r in done]),
            images_per_s=_mean([r.get('images_per_s') for r in done]),
            train_time_s=_mean([r.get('train_time_s') for r in done]),
            params=done[0].get('params') if done else None, steps=done[0].get('steps') if done else None,
            curve=mean_curve([r['curve'] for r in done])))
    reference = next((r['top1_mean'] for r in rows if r['baseline']), None)
    for row in rows:
        row['vs_baseline'] = (row['top1_mean'] - reference
                              if reference is not None and row['top1_mean'] is not None else None)
    return rows


def _fmt(value: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return '-'
    return f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'


def _note(row: Dict[str, Any]) -> str:
    notes = []
    if row['diverged']:
        notes.append(f'diverged: seed {", ".join(map(str, row["diverged"]))}')
    if row['missing']:
        notes.append(f'not run yet: seed {", ".join(map(str, row["missing"]))}')
    return '; '.join(notes)


COLUMNS = ('cell', 'seeds', 'val top-1 (%)', 'std', 'min-max', 'vs dense', 'train loss', 'train img/s',
           'train time (s)', 'params (M)', 'notes')


def format_markdown(rows: Sequence[Dict[str, Any]], title: str = '') -> str:
    """The results table: one row per cell, the baseline first and marked."""
    lines = ([title, ''] if title else []) + ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        span = f'{r["top1_min"]:.2f}-{r["top1_max"]:.2f}' if r['n'] else '-'
        cells = [f'{r["cell"]} (baseline)' if r['baseline'] else r['cell'], f'{r["n"]}/{r["planned"]}',
                 _fmt(r['top1_mean']), _fmt(r['top1_std']), span,
                 '-' if r['baseline'] else _fmt(r['vs_baseline'], signed=True), _fmt(r['train_loss_mean'], 4),
                 _fmt(r['images_per_s'], 0), _fmt(r['train_time_s'], 0),
                 _fmt(r['params'] / 1e6 if r['params'] else None), _note(r)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


CSV_COLUMNS = ('cell', 'baseline', 'settings', 'n_seeds', 'planned_seeds', 'steps', 'top1_mean', 'top1_std',
               'top1_min', 'top1_max', 'top1_vs_baseline', 'top5_mean', 'val_loss_mean', 'train_loss_mean',
               'train_images_per_s', 'train_time_s', 'params_m', 'diverged_seeds')


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def _write_csv(path: Path, rows: Sequence[Dict[str, Any]], settings: Dict[str, Dict[str, Any]]) -> None:
    atomic_write(path, _csv_text(CSV_COLUMNS, ([
        r['cell'], int(r['baseline']), json.dumps(settings.get(r['cell'], {})), r['n'], r['planned'],
        r['steps'], r['top1_mean'], r['top1_std'], r['top1_min'], r['top1_max'], r['vs_baseline'],
        r['top5_mean'], r['val_loss_mean'], r['train_loss_mean'], r['images_per_s'], r['train_time_s'],
        r['params'] / 1e6 if r['params'] else None, ' '.join(map(str, r['diverged']))] for r in rows)))


def _write_runs_csv(path: Path, results: Sequence[Dict[str, Any]]) -> None:
    keys = ('cell', 'seed', 'status', 'top1', 'top5', 'val_loss', 'train_loss', 'images_per_s', 'train_time_s',
            'params', 'steps')
    atomic_write(path, _csv_text(keys, ([r.get(k) for k in keys] for r in results)))


def plot_curves(rows: Sequence[Dict[str, Any]], path, x: str = 'step', title: str = '') -> Path:
    """Validation top-1 (mean over seeds, min-max band) against extra steps (`x='step'`) or training wall clock
    (`x='elapsed_s'`), one line per cell, the baseline dashed black. Needs matplotlib (the `report` extra)."""
    from ..._extras import require_extra
    require_extra('report', ('matplotlib',), 'sweep plots')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [r for r in rows if r['curve']]
    longest = max((c[x] or 0 for r in curves for c in r['curve']), default=0)
    scale, unit = ((1, 'steps') if x == 'step' else (3600, 'h') if longest > 3 * 3600
                   else (60, 'min') if longest > 300 else (1, 's'))
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for r in sorted(curves, key=lambda r: not r['baseline']):  # baseline first: the same colour cycle for cells
        xs = [(c[x] or 0) / scale for c in r['curve']]
        style = dict(color='black', linestyle='--', linewidth=1.8) if r['baseline'] else dict(linewidth=1.5)
        label = f'{r["cell"]} (baseline)' if r['baseline'] else r['cell']
        line, = ax.plot(xs, [c['top1'] for c in r['curve']], marker='o', markersize=3, label=label, **style)
        if r['n'] > 1:
            ax.fill_between(xs, [c['top1_min'] for c in r['curve']], [c['top1_max'] for c in r['curve']],
                            color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel('extra training steps' if x == 'step' else f'training wall-clock ({unit}, mean over seeds)')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc='lower right')
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)
    return Path(path)


def write_report(sweep: Sweep, plots: bool = True) -> Dict[str, Any]:
    """results.md, results.csv (per cell), runs.csv (per run) and the two plots in the sweep's output_dir, from
    every finished run (a changed one is left out and noted). Returns the paths, the markdown and the rows."""
    out = sweep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results = collect_results(sweep)
    rows = aggregate(results)
    steps = sorted({r['steps'] for r in rows if r['steps']})
    seeds = ', '.join(map(str, sweep.seeds))
    title = (f'Sweep `{sweep.name}` ({sweep.path}): {len(sweep.cells)} cells x seeds [{seeds}], '
             f'{"/".join(map(str, steps)) or "?"} extra steps each; validation top-1 at the final step, mean over '
             f'seeds (std: sample standard deviation; vs dense: difference of means).')
    changed = [f'{r["cell"]} seed {r["seed"]}' for r in results if r['status'] == 'changed']
    markdown = format_markdown(rows, title)
    if changed:
        markdown += f'\n\nLeft out (made with other settings than the config now gives): {", ".join(changed)}'
    paths = dict(markdown=out / 'results.md', csv=out / 'results.csv', runs=out / 'runs.csv')
    atomic_write(paths['markdown'], markdown + '\n')
    _write_csv(paths['csv'], rows, {c.name: c.settings for c in sweep.cells})
    _write_runs_csv(paths['runs'], [dict(r, curve=None) for r in results])
    if plots:
        paths['steps_plot'] = plot_curves(rows, out / 'accuracy_vs_steps.png', 'step',
                                          f'{sweep.name}: validation top-1 vs extra training steps')
        paths['time_plot'] = plot_curves(rows, out / 'accuracy_vs_time.png', 'elapsed_s',
                                         f'{sweep.name}: validation top-1 vs training wall-clock')
    return dict(paths=paths, markdown=markdown, rows=rows)
