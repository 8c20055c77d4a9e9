"""Run an ablation sweep: a grid of trainer settings over a common base, several seeds per cell, resumable.

    python train_scripts/sweep.py --config configs/sweeps/digits_small.yaml [--output DIR] [--seeds 0 1 2]
                                  [--only CELL [--only CELL ...]] [--dry-run] [--no-progress]
    python train_scripts/sweep.py --config configs/sweeps/experts.yaml --launcher "accelerate launch --config_file
                                  configs/accelerate/ddp.yaml"      # multi-GPU: each run launched on its own

The sweep config (see configs/sweeps/ and vit_moe/training/sweep/) names a base trainer config, a grid of
settings (cells), seeds, an optional dense stage (a dense model trained once, or an existing one, that every
cell upcycles) and an optional baseline (the dense model continued for the same steps). Each run lands in
OUTPUT/<cell>/seed_<s>/; a finished run is not rerun, an interrupted one resumes from its newest checkpoint, and
a run made with other settings than the config now gives is refused, naming the cell and the keys. At the end:
OUTPUT/results.md and results.csv (per cell: validation top-1 mean, std, min-max over seeds, train loss, images/s,
parameters), runs.csv (per run), accuracy_vs_steps.png and accuracy_vs_time.png (the baseline dashed).

--dry-run lists the cells and the state of every run, and exits. --only runs those cells (and the dense stage
when needed); the report covers every finished run. The sweep itself is one process: without --launcher every
run trains in it (CPU, one GPU); with --launcher each run is `LAUNCHER train_scripts/train.py --config
RUN/sweep_run_config.yaml` (do not start the sweep itself with accelerate launch).

A bad key, value or path exits with 2 and one line on stderr; --debug (or VIT_MOE_DEBUG=1) shows the traceback.
--verbose shows other libraries' INFO logs and warnings. SIGTERM / Ctrl-C stop the current run with a checkpoint
(exit 128 + the signal number); the same command resumes.
"""
import shlex
import sys
from pathlib import Path

from vit_moe import _cli


def describe(sweep, only=None) -> str:
    """The cells, their settings and every run's state, as text."""
    from vit_moe.training.sweep import plan
    states = {run.cfg.output_dir: status for run, status in plan(sweep, only)}
    lines = [f'sweep {sweep.name!r} ({sweep.path}) -> {sweep.output_dir}; base {sweep.base}; '
             f'seeds {sweep.seeds}']
    if sweep.dense is not None:
        lines.append(f'  dense stage: {sweep.dense.cfg.model}, {sweep.dense.cfg.steps} steps -> '
                     f'{sweep.dense.cfg.output_dir}: {_state(states.get(sweep.dense.cfg.output_dir))}')
    for cell in sweep.select(only):
        settings = ', '.join(f'{k}: {v!r}' for k, v in cell.settings.items()) or 'the dense continuation'
        cfg = cell.runs[0].cfg
        lines.append(f'  {cell.name}  ({settings}; {cfg.model}, {cfg.steps} steps)')
        for run in cell.runs:
            lines.append(f'    seed {run.seed}: {_state(states.get(run.cfg.output_dir))}')
    return '\n'.join(lines)


def _state(status) -> str:
    if status is None:
        return '?'
    if status.state == 'interrupted':
        return f'interrupted at step {status.step} (resumes)'
    if status.state in ('changed', 'diverged'):
        return f'{status.state.upper()}: {status.detail}'
    return status.state


def main(argv=None) -> int:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument('--config', required=True, help='sweep YAML (configs/sweeps/*.yaml)')
    parser.add_argument('--output', help='output folder (default: the config\'s output_dir)')
    parser.add_argument('--seeds', type=int, nargs='+', help='seeds for every cell (default: the config\'s)')
    parser.add_argument('--only', action='append', metavar='CELL', help='run only this cell (repeatable)')
    parser.add_argument('--dry-run', action='store_true', help='list the cells and run states, then exit')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--launcher', metavar='COMMAND',
                        help='train each run in its own processes started by COMMAND train_scripts/train.py --config '
                             'RUN.yaml, e.g. "accelerate launch --config_file configs/accelerate/ddp.yaml" (multi-GPU; '
                             'default: every run in this process)')
    args = parser.parse_args(argv)
    _cli.setup_logging(args.verbose)
    from vit_moe._extras import require_extra
    from vit_moe.training.sweep import load_sweep, run_sweep, write_report

    sweep = load_sweep(args.config, output_dir=args.output, seeds=args.seeds,
                       progress=False if args.no_progress else None)
    if args.dry_run:
        print(describe(sweep, args.only))
        return 0
    require_extra('report', ('matplotlib',), 'sweep plots')  # before hours of training, not after
    train_script = str(Path(__file__).resolve().parent / 'train.py')
    command = shlex.split(args.launcher) + [train_script] if args.launcher else None
    outcome = run_sweep(sweep, args.only, command=command)
    if outcome['interrupted']:
        print(f'interrupted in {outcome["run"]} at step {outcome["step"]} (checkpoint saved); run the same command '
              f'to resume', file=sys.stderr)
        return 128 + outcome['interrupted']
    report = write_report(sweep)
    print('\n' + report['markdown'] + '\n')
    print('written: ' + ', '.join(str(p) for p in report['paths'].values()))
    return 0


if __name__ == '__main__':
    _cli.run_and_exit(main)
