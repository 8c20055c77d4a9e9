""" Ablation sweeps: a grid of trainer settings over a common base, several seeds per cell, resumable, reported as
a results table (markdown + CSV) and accuracy curves (against extra training steps and against wall-clock time).
`spec`: the YAML and its cells; `runner`: running them; `report`: the tables and curves.

    sweep = load_sweep('configs/sweeps/digits_small.yaml')       # validates every run's config up front
    outcome = run_sweep(sweep)                                   # runs what is not finished, in order
    paths = write_report(sweep)                                  # results.md / .csv, runs.csv, two PNGs

A sweep YAML (paths of trainer configs are relative to the sweep file; other paths to the working directory):

    name: digits_small               # default: the file's stem
    output_dir: outputs/sweeps/x     # default: outputs/sweeps/<name>; --output overrides
    data: digits                     # optional: write scikit-learn's digits to <output_dir>/data, every run's data_dir
    seeds: [0, 1]                    # every cell (and the baseline) runs once per seed; --seeds overrides
    common: {eval_every: 20}         # trainer keys for EVERY run: dense stage, baseline and cells
    dense:                           # optional: the dense model the cells upcycle, either trained here once ...
      config: ../digits_dense.yaml   #   ... into <output_dir>/dense (resumable, shared by all cells)
      set: {steps: 200}              #   ... with these keys over `config` (and `common`)
      # pretrained: path/model       # ... or an existing one (then `step_offset: N` = its step count, optional)
    base: ../digits_moe.yaml         # the cells' trainer config
    set: {steps: 100}                # trainer keys over base + common for every cell
    grid:                            # cartesian product, first axis slowest; one cell per combination
      model_kwargs.num_experts: [4, 8]   # a trainer key or model_kwargs.<kwarg>: a list of values
      model_kwargs: {capacity_factor: [1.0, 2.0]}   # a model_kwargs sub-grid: one axis per kwarg
      routing:                       # any other name: a list of mappings (keys that change together)
        - {model_kwargs.router: expert_choice}
        - {model_kwargs.router: token_choice, model_kwargs.capacity_factor: 1.0}
    baseline:                        # optional: the dense continuation, cell `dense_continued`
      config: ../digits_dense.yaml   # default: dense.config, else base with model = the MoE model's dense source
      set: {}                        # trainer keys over config + common

`model_kwargs` is merged key by key at every level (base <- common <- set <- grid), never replaced; dotted keys
(`model_kwargs.num_experts`) and nested mappings are equivalent. The sweep sets `output_dir`
(`<output_dir>/<cell>/seed_<s>`), `seed`, `resume: auto`, and, with a dense stage, `pretrained` (its model) and
`step_offset` (its step_offset + steps: the rsqrt schedule continues). The baseline gets the cells' `steps` (the
same number of extra steps) and loses the MoE-only model kwargs (num_experts, router, ...).

Cell names are `key=value` pairs joined by commas (`num_experts=8,capacity_factor=2.0`; model_kwargs keys without
their prefix), usable as folder names; `dense_continued` is the baseline.

Runs train one after another in this process (`train()`: CPU, one GPU), or, with `run_sweep(command=...)`
(train_scripts/sweep.py --launcher "accelerate launch ..."), each in its own processes started by
`command + ['--config', <run folder>/sweep_run_config.yaml]`: the way to run a sweep on several GPUs, since
Accelerate's `end_training()` tears the process group down after every run. The sweep itself is one process.

A run is FINISHED when its `sweep_result.json` (written by the sweep when the run ends) names the configured steps
and `model/model.safetensors` is present, or, without that file, when `model/model.safetensors` is present, the
log holds an eval record at the configured step and the newest checkpoint is at that step: it is not run again.
Anything else with a checkpoint is INTERRUPTED and resumes in place from its newest complete checkpoint (a run
that finished with fewer steps than now configured continues to the new count). A run that holds a checkpoint or a
model and was made with other settings than the sweep config now gives (any key but steps, data location,
logging, checkpointing and evaluation ones) is CHANGED: the sweep refuses it, naming the cell and the keys, before
training anything. A run whose loss became non-finite is recorded as diverged and not rerun.
"""
from .report import aggregate, collect_results, format_markdown, mean_curve, plot_curves, write_report
from .runner import RunStatus, plan, read_run, run_status, run_sweep
from .spec import (
    BASELINE, RESULT_FILE, Cell, Run, Sweep, SweepError, cell_name, expand_grid, flatten_settings, load_sweep,
    merge_settings,
)

__all__ = [
    'SweepError', 'Run', 'Cell', 'Sweep', 'RunStatus', 'load_sweep', 'expand_grid', 'cell_name', 'merge_settings',
    'flatten_settings', 'run_status', 'plan', 'run_sweep', 'read_run', 'collect_results', 'mean_curve', 'aggregate',
    'format_markdown', 'write_report', 'plot_curves', 'BASELINE', 'RESULT_FILE',
]
