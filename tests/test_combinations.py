"""The combination matrix: every training option meets every other one (pairwise), on trained weights, through every
documented loader and both exports.

Each cell upcycles a tiny dense model folder, trains it a few steps (single process, 2-process DDP, or 2-process
FSDP2 through `Accelerator.prepare` with the shipped fsdp2 config; real processes over gloo, forked by the launch
server of tests/trainer_driver.py), then reloads the saved model through
`create_model_from_checkpoint`, timm's `local-dir:`, `validate()`, `train_scripts/validate.py`, and exports it with
`export/onnx_export.py` in float32 or int8 (layer-by-layer parity, then top-1 agreement on the validation images; the
export precision is one more factor of the pairwise array, so every option value is exported both ways).
`train_scripts/validate.py` runs in four cells (float32 and bf16, each launch kind): it is `validate()` behind a parser.
The reloaded model must score exactly what the trainer logged for its final evaluation (EMA weights too).

The cells cover every pair of option values (a pairwise covering array; Soft MoE has no fine-grained slices and no
slots for prefix tokens, so those pairs are absent; under FSDP2 the EMA is sharded like the parameters): torch_compile
(aot_eager in CI: dynamo, the wrappers and the saved keys are those of inductor, whose kernels
tests/test_training_scale.py checks on the MoE layer; the first cell with inductor, a minute of this CI's two cores,
is in the stress tier), grad_checkpointing, ema_decay, output_scale, router (expert choice / token choice / soft),
expert_init (copy / drop), grad_accum_steps (2; the epoch is cut to whole global batches),
mixed_precision (no / bf16), prefix_tokens (compete / always), num_shared_experts (0 / 1), expert_granularity (1 / 2),
export (float32 / int8).
Soft MoE files are checked end to end by the export CLI (no slot routing to expose), the others layer by layer.
"""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from vit_moe.models import create_model_from_checkpoint, save_trained_model
from vit_moe.training import load_config, train, validate

from conftest import ROOT, log_records, make_image_folder, run_front_end, script_env
from trainer_driver import Launcher

NAME = 'vit_ti16_moe_upcycled'
ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # 16 patches + class token
MOE = dict(ARCH, num_experts=4, moe_blocks=1)

# (mode, options): every pair of option values appears in at least one cell (9 cells: the fewest that hold every
# mode x router pair)
AOT = dict(torch_compile='default', torch_compile_backend='aot_eager')  # dynamo without inductor's kernels (docstring)
CELLS = {
    'single-compile-ckpt-scale-drop-accum-bf16-prefix-shared': ('single', dict(
        torch_compile='default', grad_checkpointing=True, output_scale=True, expert_init='drop', grad_accum_steps=2,
        mixed_precision='bf16', prefix_tokens='always', num_shared_experts=1)),
    'single-ema-scale-tokenchoice-accum-prefix-g2': ('single', dict(
        ema_decay=0.9, output_scale=True, router='token_choice', grad_accum_steps=2, prefix_tokens='always',
        expert_granularity=2, export='int8')),
    'single-soft-compile-ckpt-ema-drop-shared': ('single', dict(
        router='soft', **AOT, grad_checkpointing=True, ema_decay=0.9, expert_init='drop', num_shared_experts=1,
        export='int8')),
    'ddp-ckpt-ema-drop-bf16-g2': ('ddp', dict(
        grad_checkpointing=True, ema_decay=0.9, expert_init='drop', mixed_precision='bf16', expert_granularity=2,
        export='int8')),
    'ddp-tokenchoice-drop-prefix-shared': ('ddp', dict(
        router='token_choice', expert_init='drop', prefix_tokens='always', num_shared_experts=1, export='int8')),
    'ddp-soft-compile-ckpt-scale-accum': ('ddp', dict(
        router='soft', **AOT, grad_checkpointing=True, output_scale=True, grad_accum_steps=2)),
    'fsdp-compile-scale-prefix-shared-g2': ('fsdp', dict(
        **AOT, output_scale=True, prefix_tokens='always', num_shared_experts=1, expert_granularity=2, export='int8')),
    'fsdp-compile-ckpt-ema-scale-tokenchoice-drop-bf16-shared-g2': ('fsdp', dict(
        **AOT, grad_checkpointing=True, ema_decay=0.9, output_scale=True, router='token_choice', expert_init='drop',
        mixed_precision='bf16', num_shared_experts=1, expert_granularity=2)),
    'fsdp-soft-ema-accum-bf16': ('fsdp', dict(router='soft', ema_decay=0.9, grad_accum_steps=2, mixed_precision='bf16')),
}
MODEL_KEYS = ('output_scale', 'expert_init', 'router', 'prefix_tokens', 'num_shared_experts', 'expert_granularity')
MODEL_DEFAULTS = dict(output_scale=False, expert_init='copy', router='expert_choice', prefix_tokens='compete',
                      num_shared_experts=0, expert_granularity=1)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """Image folders (3 classes; 21 training images: 5 batches of 4 per epoch in one process, 2 global batches of 8
    with accumulation) and a dense model folder to upcycle."""
    root = tmp_path_factory.mktemp('combinations')
    data = make_image_folder(root / 'data', per_class=(7, 3), size=16)
    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', num_classes=3, **ARCH)
    save_trained_model(dense, root / 'dense', label_names=['class_0', 'class_1', 'class_2'])
    return data, root / 'dense'


def _config(data: Path, dense: Path, out: Path, options: dict, processes: int):
    model_kwargs = dict(MOE, **{k: v for k, v in options.items() if k in MODEL_KEYS})
    trainer = {k: v for k, v in options.items() if k not in MODEL_KEYS + ('export',)}
    return load_config(None, dict(
        model=NAME, pretrained=str(dense), model_kwargs=model_kwargs, data_dir=str(data), output_dir=str(out),
        batch_size=4 if processes == 1 else 2, num_workers=0, steps=4, lr=3e-3, warmup_steps=1, log_every=1,
        checkpoint_every=100, trackers='none', progress=False, hflip=0.0, scale=[0.8, 1.0], color_jitter=0.0,
        eval_batch_size=4, **trainer))


@pytest.fixture(scope='module')
def launcher():
    """2-process launches of train.py: real processes over gloo with torch.distributed.run's environment, forked by
    tests/trainer_driver.py's launch server (which imported torch once; torch.distributed.run itself launches the
    recipes in tests/test_recipes.py and the stress script's runs)."""
    server = Launcher(ROOT, script_env())
    yield server
    server.close()


def _train(cfg, mode: str, launcher) -> dict:
    """Train as `mode` says; return the final evaluation the trainer logged."""
    if mode == 'single':
        return train(cfg)['eval']
    path = Path(cfg.output_dir).with_suffix('.yaml')
    path.write_text(cfg.to_yaml())
    shim = ['tests/fsdp_on_cpu.py'] if mode == 'fsdp' else []
    result = launcher.run(*shim, 'train_scripts/train.py', '--config', str(path), processes=2, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    start, = log_records(cfg.output_dir, 'start')
    assert start['num_processes'] == 2 and start['distributed_type'] == ('FSDP' if mode == 'fsdp' else 'MULTI_CPU')
    return log_records(cfg.output_dir, 'eval')[-1]


def _assert_same_metrics(got: dict, logged: dict, bf16_rounding: bool, prefix: str = ''):
    """Every image is scored exactly once either way. The same eager arithmetic on the same batches gives the same
    numbers; per-image routing keeps an image's logits independent of its batch-mates, so float32 evaluations on other
    batches (DDP's per-process ones) or compiled agree to float noise. bf16 on other batches or compiled kernels
    rounds differently (`bf16_rounding`): one image may flip, the loss moves by up to 2 %."""
    assert got['num_samples'] == logged['num_samples'] == 9
    assert abs(got['top1'] - logged[prefix + 'top1']) <= (100 / 9 if bf16_rounding else 1e-9)
    assert got['loss'] == pytest.approx(logged[prefix + 'loss'], rel=2e-2 if bf16_rounding else 1e-5)


INDUCTOR_CELL = 'single-compile-ckpt-scale-drop-accum-bf16-prefix-shared'  # CI: aot_eager; inductor: stress tier
VALIDATE_CLI_CELLS = ('single-compile-ckpt-scale-drop-accum-bf16-prefix-shared', 'fsdp-soft-ema-accum-bf16',
                      'ddp-tokenchoice-drop-prefix-shared', 'single-ema-scale-tokenchoice-accum-prefix-g2')  # validate.py
# == validate(): float32 / bf16, each launch kind


@pytest.mark.parametrize('cell', list(CELLS) + [pytest.param(INDUCTOR_CELL + '-inductor', marks=pytest.mark.stress)])
def test_each_option_combination_trains_saves_reloads_and_exports(sources, tmp_path, cell, request):
    data, dense = sources
    mode, options = CELLS[cell.removesuffix('-inductor')]
    if cell == INDUCTOR_CELL:
        options = dict(options, torch_compile_backend='aot_eager')  # the same dynamo wrappers and saved keys
    cfg = _config(data, dense, tmp_path / 'run', options, 1 if mode == 'single' else 2)
    logged = _train(cfg, mode, request.getfixturevalue('launcher') if mode != 'single' else None)
    folder = Path(cfg.output_dir) / 'model'
    bf16 = options.get('mixed_precision') == 'bf16'
    precision = 'bf16' if bf16 else 'no'
    other_kernels = mode != 'single' or bool(options.get('torch_compile'))  # than validate()'s eager batches of 4

    # the trained model through every loader scores what the trainer logged
    saved = load_file(str(folder / 'model.safetensors'))
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in saved)  # plain keys, whatever wrapped the model
    model = create_model_from_checkpoint(NAME, str(folder)).eval()
    assert saved.keys() == model.state_dict().keys()
    applied = model.moe_config.to_dict()
    for key in MODEL_KEYS:  # the options are in the saved model, not just in the config (those the router uses)
        if key in applied:
            assert applied[key] == cfg.model_kwargs.get(key, MODEL_DEFAULTS[key]), key
        else:
            assert key not in cfg.model_kwargs, key
    _assert_the_cell_computes_what_readme_says(cfg, folder, dense, model)
    experts = model.blocks[-1].mlp.experts.fc1.weight
    assert not torch.equal(experts[0], experts[1])  # trained (and, with drop, re-initialised) apart
    local = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(local(x), model(x), rtol=0, atol=0)
    reloaded = validate(NAME, str(folder), str(data), num_workers=0, batch_size=4, mixed_precision=precision)
    _assert_same_metrics(reloaded, logged, bf16 and other_kernels)
    if cell in VALIDATE_CLI_CELLS:
        rc, _, err = run_front_end('train_scripts/validate.py', '--model', NAME, '--checkpoint', str(folder),
                                   '--data-dir', str(data), '--num-workers', '0', '--batch-size', '4',
                                   '--mixed-precision', precision, '--json', str(tmp_path / 'validate.json'))
        assert rc == 0, err
        from_cli = json.loads((tmp_path / 'validate.json').read_text())
        assert from_cli['top1'] == reloaded['top1'] and from_cli['loss'] == pytest.approx(reloaded['loss'], rel=1e-6)
    if options.get('ema_decay'):
        ema = validate(NAME, str(Path(cfg.output_dir) / 'model_ema'), str(data), num_workers=0, batch_size=4,
                       mixed_precision=precision)
        _assert_same_metrics(ema, logged, bf16 and mode != 'single', prefix='ema_')  # the EMA is never compiled

    # the cell's export (float32, or int8: a pairwise factor of the matrix) passes the layer-by-layer parity and agrees
    # with PyTorch on the validation images
    variant = ['--quantize', 'int8'] if options.get('export') == 'int8' else []
    rc, out, err = run_front_end(
        'export/onnx_export.py', '--model', NAME, '--checkpoint', str(folder), '--output', str(tmp_path / 'model.onnx'),
        '--batch-sizes', '3', '--data-dir', str(data), *variant)
    assert rc == 0, out + err
    assert 'real images (9 of' in out and out.count(': ok') == 2


def _assert_the_cell_computes_what_readme_says(cfg, folder: Path, dense_folder: Path, model):
    """The cell's own options, beside its training: (a) with every slot filled its upcycled start is the dense model
    (slot routers); (c) its experts compute the formula's FLOPs per token; (d) its config.json holds only options its
    router uses, each as the model resolved it."""
    from torch.utils.flop_counter import FlopCounterMode
    from vit_moe import MoeConfig
    from vit_moe.layers import MOE_OPTIONS
    config = model.moe_config
    saved = json.loads((folder / 'config.json').read_text())['model_args']
    assert MoeConfig.unused_options(saved) == ()
    assert {k: v for k, v in saved.items() if k in MOE_OPTIONS} == config.to_dict()
    x = torch.randn(2, 3, 16, 16)
    if config.router != 'soft':
        E, G = config.num_experts, config.groups
        full = dict(capacity_factor=E / G) if config.router == 'expert_choice' else dict(top_k=E // G,
                                                                                        capacity_factor=1.0)
        kwargs = dict(cfg.model_kwargs, **full, expert_init='copy')
        kwargs.pop('drop_ratio', None)
        start = create_model_from_checkpoint(NAME, str(dense_folder), **kwargs).eval()
        dense = create_model_from_checkpoint('vit_tiny_patch16_224', str(dense_folder), **ARCH).eval()
        with torch.no_grad():
            torch.testing.assert_close(start(x), dense(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    layer = model.blocks[-1].mlp
    name = f'{type(model).__name__}.blocks.{len(model.blocks) - 1}.mlp'
    got = sum(sum(counts.get(f'{name}.{bank}', {}).values()) for bank in ('experts', 'shared_experts')) / (2 * 17)
    hidden = layer.experts.hidden_features * config.groups
    mlp_flops = 2 * 2 * ARCH['embed_dim'] * hidden  # fc1 + fc2 of the dense MLP, per token
    assert got == pytest.approx(config.expert_flops_per_token(17, mlp_flops, model.num_prefix_tokens), rel=1e-9)


def test_the_matrix_covers_every_pair_of_option_values():
    values = dict(mode=('single', 'ddp', 'fsdp'), torch_compile=(None, 'default'), grad_checkpointing=(False, True),
                  ema_decay=(None, 0.9), output_scale=(False, True), router=('expert_choice', 'token_choice', 'soft'),
                  expert_init=('copy', 'drop'), grad_accum_steps=(1, 2), mixed_precision=(None, 'bf16'),
                  prefix_tokens=('compete', 'always'), num_shared_experts=(0, 1), expert_granularity=(1, 2),
                  export=('fp32', 'int8'))
    refused = ({'router': 'soft', 'expert_granularity': 2},  # Soft MoE mixes tokens into slots: no slices ...
               {'router': 'soft', 'prefix_tokens': 'always'})  # ... and no slots for prefix tokens to hold
    defaults = {k: v[0] for k, v in values.items()}
    rows = [dict(defaults, mode=mode, **options) for mode, options in CELLS.values()]
    assert all(set(row) - {'torch_compile_backend'} == set(values) for row in rows), 'an option the matrix does not list'
    keys = list(values)
    missing = []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            for va in values[a]:
                for vb in values[b]:
                    if {a: va, b: vb} in refused:
                        continue
                    if not any(r[a] == va and r[b] == vb for r in rows):
                        missing.append(f'{a}={va} with {b}={vb}')
    assert not missing, missing
