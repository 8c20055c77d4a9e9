"""Config loading / overrides and the learning-rate schedules."""
import math

import pytest
import yaml
from hypothesis import given, strategies as st

from vit_moe.training import ConfigError, TrainConfig, learning_rate, load_config, parse_train_args


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text(yaml.safe_dump(dict(model='vit_s16_moe_upcycled', lr=0.1, model_kwargs=dict(num_experts=4))))
    cfg = parse_train_args(['--config', str(path), '--lr', '3e-4', '--model-kwargs', '{num_experts: 8, router: token_choice}',
                            '--scale', '[0.5, 1.0]', '--resume', 'latest'])
    assert cfg.model == 'vit_s16_moe_upcycled' and cfg.lr == 3e-4 and cfg.scale == [0.5, 1.0]
    assert cfg.model_kwargs == dict(num_experts=8, router='token_choice') and cfg.resume == 'latest'


def test_every_config_key_can_be_overridden_on_the_command_line():
    defaults = TrainConfig().to_dict()
    for key in defaults:
        flag = '--' + key.replace('_', '-')
        with pytest.raises(SystemExit) as err:  # argparse knows the flag: --help on it would exit 0
            parse_train_args([flag])  # a flag without its value is an argparse error (exit 2), not "unrecognized"
        assert err.value.code == 2


@pytest.mark.parametrize('values, message', [
    (dict(lrr=0.1), r"unknown config key\(s\) \['lrr'\] in command-line overrides; did you mean lrr -> lr\? "
                    r"\(accepted keys: model, "),
    (dict(batch_sise=8), r"\['batch_sise'\] in command-line overrides; did you mean batch_sise -> batch_size\?"),
    (dict(zzz=1), r"unknown config key\(s\) \['zzz'\] in command-line overrides \(accepted keys: model, "),
    (dict(schedule='linear'), "schedule='linear' is not valid; accepted: rsqrt, cosine, constant"),
    (dict(mixed_precision='fp8'), "mixed_precision='fp8' is not valid; accepted: no, bf16, fp16"),
    (dict(batch_size=0), 'batch_size=0 is not valid; expected an integer >= 1'),
    (dict(lr=-1.0), 'lr=-1.0 is not valid; expected >= 0'),
    (dict(lr='fast'), "lr='fast' is not valid; expected a number"),
    (dict(steps='1.5'), "steps='1.5' is not valid; expected an integer"),
    (dict(steps=1.5), "steps=1.5 is not valid; expected an integer"),
    (dict(bad_image_policy='ignore'), "bad_image_policy='ignore' is not valid; accepted: skip, error"),
])
def test_impossible_options_name_the_value_and_what_is_accepted(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(str(tmp_path / 'nope.yaml'))
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: [unclosed')
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parent.parent / 'configs').glob('*.yaml')):
        assert load_config(str(path)).steps >= 1, path


def test_shipped_digits_moe_config_continues_the_dense_runs_curve():
    from pathlib import Path
    configs = Path(__file__).parent.parent / 'configs'
    dense, moe = (load_config(str(configs / name)) for name in ('digits_dense.yaml', 'digits_moe.yaml'))
    assert (moe.lr, moe.warmup_steps, moe.weight_decay, moe.batch_size) == (
        dense.lr, dense.warmup_steps, dense.weight_decay, dense.batch_size)
    assert moe.step_offset == dense.steps
    longer_dense = TrainConfig(**dict(dense.to_dict(), steps=dense.steps + 1))
    assert learning_rate(0, moe) == pytest.approx(learning_rate(dense.steps, longer_dense))


@given(offset=st.integers(0, 10_000), step=st.integers(0, 10_000), warmup=st.integers(0, 1000))
def test_rsqrt_with_step_offset_continues_the_dense_schedule(offset, step, warmup):
    dense = TrainConfig(lr=1e-3, warmup_steps=warmup, steps=offset + step + 1)
    moe = TrainConfig(lr=1e-3, warmup_steps=warmup, step_offset=offset, steps=step + 1)
    assert learning_rate(step, moe) == pytest.approx(learning_rate(offset + step, dense))


def test_rsqrt_values():
    cfg = TrainConfig(lr=1.0, warmup_steps=100, steps=1000)
    assert learning_rate(49, cfg) == pytest.approx(0.5)  # linear warm-up
    assert learning_rate(99, cfg) == pytest.approx(1.0)
    assert learning_rate(399, cfg) == pytest.approx(math.sqrt(100 / 400))


def test_rsqrt_cooldown_reaches_zero_linearly():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=100, cooldown_steps=9)
    assert learning_rate(90, cfg) == pytest.approx(math.sqrt(10 / 91) * 10 / 10)
    assert learning_rate(99, cfg) == pytest.approx(math.sqrt(10 / 100) * 1 / 10)


def test_cosine_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, schedule='cosine', warmup_steps=10, steps=110, min_lr=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)
