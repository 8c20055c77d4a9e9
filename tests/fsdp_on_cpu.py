"""Run a script under Accelerate's FSDP2 on CPU processes (gloo), through `Accelerator.prepare` itself.

Accelerate turns FSDP on only for GPU-like distributed types: on CPU processes (MULTI_CPU) it silently keeps DDP.
This launcher shim makes every AcceleratorState created while `script` runs an FSDP one, with the plugin built from
a shipped accelerate config (`configs/accelerate/fsdp2.yaml` unless FSDP_CONFIG names another), exactly as
`accelerate launch --config_file ...` would on GPUs. Everything after that is Accelerate's own code path:
`prepare` (fully_shard, optimizer swap), `accumulate`, `clip_grad_norm_`, sharded `save_state` / `load_state`,
`get_state_dict`.

    ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_on_cpu.py \\
        train_scripts/train.py --config ...
"""
import os
import runpy
import sys
from pathlib import Path

import accelerate.state as accelerate_state
import yaml
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

ROOT = Path(__file__).resolve().parent.parent
# accelerate config `fsdp_config` keys -> FullyShardedDataParallelPlugin arguments (as `accelerate launch` maps them)
PLUGIN_ARGS = {
    'fsdp_version': 'fsdp_version', 'fsdp_auto_wrap_policy': 'auto_wrap_policy',
    'fsdp_transformer_layer_cls_to_wrap': 'transformer_cls_names_to_wrap',
    'fsdp_reshard_after_forward': 'reshard_after_forward', 'fsdp_state_dict_type': 'state_dict_type',
    'fsdp_cpu_ram_efficient_loading': 'cpu_ram_efficient_loading', 'fsdp_offload_params': 'cpu_offload',
    'fsdp_activation_checkpointing': 'activation_checkpointing',
}


def plugin_from_config(path: Path) -> FullyShardedDataParallelPlugin:
    """The FSDP plugin an accelerate config file describes (a KeyError: a config key this shim does not map)."""
    fsdp = yaml.safe_load(Path(path).read_text())['fsdp_config']
    kwargs = {PLUGIN_ARGS[k]: v for k, v in fsdp.items()}
    kwargs['auto_wrap_policy'] = kwargs['auto_wrap_policy'].lower()
    if kwargs.get('transformer_cls_names_to_wrap'):  # the shipped configs name none: the trainer takes the model's
        kwargs['transformer_cls_names_to_wrap'] = kwargs['transformer_cls_names_to_wrap'].split(',')
    return FullyShardedDataParallelPlugin(**kwargs)


def use_fsdp_on_cpu(config: Path) -> None:
    """Every AcceleratorState made from now on in this process uses FSDP with `config`'s plugin on CPU processes."""
    init = accelerate_state.AcceleratorState.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            plugin = plugin_from_config(config)
            if self._mixed_precision != 'no':
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            self.distributed_type = DistributedType.FSDP
            accelerate_state.PartialState._shared_state['distributed_type'] = DistributedType.FSDP

    accelerate_state.AcceleratorState.__init__ = fsdp_init


if __name__ == '__main__':
    use_fsdp_on_cpu(Path(os.environ.get('FSDP_CONFIG', ROOT / 'configs' / 'accelerate' / 'fsdp2.yaml')))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name='__main__')
