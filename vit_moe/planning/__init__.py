""" Planning before launching: per-GPU training memory and bytes moved per step, counted from a model's shapes (a
model on the `meta` device is enough). Needs only torch and timm: used by the trainer's dry run
(`train.py --dry-run`), `benchmarks/memory_table.py` and `benchmarks/comm_volume.py`.
"""
from .comm_volume import CommVolume, comm_volume, expert_parameter_numel
from .memory import GB, activation_memory, fsdp_shard_numel, fsdp_units, parameter_memory
