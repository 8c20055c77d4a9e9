""" Per-GPU training memory of a timm ViT (MoE or dense): parameters, gradients, AdamW state, activations.

Everything is counted from the model itself, per tensor, so it works on a model built on the `meta` device (no
weights, no process group, no GPU): `with torch.device('meta'): model = timm.create_model(name)`. Imports only torch
and the standard library (not Accelerate); FSDP2's sharding rules are restated from torch's source (cited below), not
queried from a process group.

* `parameter_memory()`: fp32 master parameters (4 B), fp32 gradients (4 B) and AdamW's two fp32 moments (8 B) per
  parameter, per GPU, under DDP or FSDP2 full shard (`fully_shard` on every transformer block and on the root, as
  the trainer has Accelerate's FSDP2 plugin wrap them: `vit_moe.training.fsdp_wrap`), with the transient all-gathered
  parameters and unsharded gradients of FSDP2 and the gradient buckets of DDP.
* `activation_memory()`: bytes saved for the backward pass by one forward at a batch size, with or without timm's
  gradient checkpointing, in float32 or under bf16 autocast, counted with `torch.autograd.graph.saved_tensors_hooks`;
  `activation_memories()` both settings from the same passes.

Bytes, not GB: the callers divide (`GB = 1e9`).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

__all__ = [
    'GB', 'STRATEGIES', 'ParameterMemory', 'ActivationMemory', 'fsdp_units', 'fsdp_shard_numel', 'parameter_memory',
    'routed_expert_parameters', 'experts_sharded_over_dp', 'expert_shard_numel', 'activation_memory',
    'activation_memories',
]

GB = 1e9  # decimal gigabyte, as in the tables
Region = Union[int, str, Tuple[str, int]]
STRATEGIES = ('ddp', 'fsdp2')
_PARAM_DTYPES = {'no': torch.float32, 'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device='meta').element_size()


# ---------------------------------------------------------------------------------------------------------------
# parameters, gradients, optimizer state

def fsdp_shard_numel(shape: Sequence[int], num_gpus: int) -> int:
    """Elements each rank stores of a parameter of `shape` under FSDP2 over `num_gpus` ranks (padding included).

    FSDP2 shards dim 0 with `torch.chunk` semantics and pads every rank's shard to the size of rank 0's, which is
    always a full chunk of ceil(dim0 / N) rows (torch/distributed/fsdp/_fully_shard/_fsdp_param.py,
    `FSDPParam._init_sharded_param`: `chunks = _chunk_with_empty(param_data, shard_world_size, dim=shard_dim)`,
    `padded_sharded_size = chunks[0].size()  # 0th always padded`; `_chunk_with_empty` in _fsdp_common.py appends
    empty chunks when torch.chunk returns fewer than N). So 32 experts over 64 ranks: every rank stores one expert's
    rows (ranks 32..63 hold zero padding), and a [1, T, D] pos_embed is stored whole on every rank.
    """
    if len(shape) == 0:  # fully_shard refuses 0-dim parameters; count them as replicated
        return 1
    return math.ceil(shape[0] / num_gpus) * math.prod(shape[1:])


def fsdp_units(
        model: nn.Module, wrap_cls_names: Optional[Iterable[str]] = None) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """FSDP units as the trainer has Accelerate's FSDP2 plugin make them: one per module whose class name is in
    `wrap_cls_names` (default: the classes of the model's blocks, MoE blocks included: timm's `Block`, Eva's
    `EvaBlock`), and the root ('') with every other parameter (patch embedding, cls/pos embeddings, final norm, head).
    Returns unit name -> [(parameter name, parameter)]."""
    from ..models.upcycled import block_classes
    wrap_cls_names = set(block_classes(model) if wrap_cls_names is None else wrap_cls_names)
    prefixes = [name for name, m in model.named_modules() if name and type(m).__name__ in wrap_cls_names]
    units: Dict[str, List[Tuple[str, nn.Parameter]]] = {'': []}
    units.update({p: [] for p in prefixes})
    for name, param in model.named_parameters():
        owner = max((p for p in prefixes if name.startswith(p + '.')), key=len, default='')
        units[owner].append((name, param))
    return units


@dataclass(frozen=True)
class ParameterMemory:
    """Bytes per GPU (the fullest rank, rank 0) of model state in training with AdamW.

    Attributes:
        params: fp32 master parameters (sharded under FSDP2, padding included).
        grads: fp32 gradients (sharded under FSDP2).
        optimizer: AdamW's exp_avg and exp_avg_sq, fp32.
        transient: FSDP2: all-gathered parameters and unsharded gradients of the root unit and the largest units
            during forward/backward, with expert parallelism also one expert bank's (see `parameter_memory`); DDP:
            the reducer's gradient buckets.
        num_params: parameters of the model.
        largest_unit: name of the largest FSDP unit ('' for DDP).
    """
    strategy: str
    num_gpus: int
    mixed_precision: str
    params: int
    grads: int
    optimizer: int
    transient: int
    num_params: int
    largest_unit: str = ''

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.transient


def parameter_memory(
        model: nn.Module,
        strategy: str = 'ddp',
        num_gpus: int = 1,
        mixed_precision: str = 'no',
        reduce_dtype: torch.dtype = torch.float32,
        wrap_cls_names: Optional[Iterable[str]] = None,
        gradient_as_bucket_view: bool = False,
        expert_parallel_size: int = 1,
) -> ParameterMemory:
    """Per-GPU bytes of parameters, gradients and AdamW state, counted per parameter tensor of `model` (meta is fine).

    DDP: every GPU holds everything: fp32 params 4 B + fp32 grads 4 B + AdamW 8 B = 16 B per parameter. With bf16
    autocast (Accelerate's mixed precision for DDP) the master weights stay fp32, so the same; autocast's bf16 weight
    copies are counted by `activation_memory`. `transient` holds the DDP reducer's flat gradient buckets, another
    4 B per parameter unless `gradient_as_bucket_view=True` (Accelerate's default is False; see the docstring of
    torch.nn.parallel.DistributedDataParallel: with True "the saved memory size will be equal to the total gradients
    size"). `mixed_precision` does not change DDP.

    FSDP2 full shard (`reshard_after_forward=True`): sharded fp32 params, grads and optimizer state, 16 B per
    parameter / N, counted per tensor as `fsdp_shard_numel` (dim 0 padded to ceil(dim0 / N) rows on every rank;
    rank 0 always holds a full chunk, so it is the fullest). `mixed_precision='bf16'` is
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=`reduce_dtype`): the unsharded params and grads are bf16, the
    sharded master params, grads and optimizer stay fp32. `transient` assumes, at the peak (in the backward):
      * the root unit's all-gathered params and its unsharded grads (the root wraps the whole forward, so it is
        gathered from the first layer to the last and its grads wait for its reduce-scatter at the end),
      * two of the largest block units' all-gathered params (the one computing and the one prefetched), each the
        padded size N * ceil(dim0 / N) rows in param_dtype (FSDP2's all-gather output, which the unsharded
        parameter is a view of),
      * one largest unit's unsharded grads (param_dtype, exact size) plus its reduce-scatter input (padded,
        reduce_dtype), both alive while the grads are copied into the reduce-scatter buffer.
    Not counted: the bf16 copy of a unit's shard before the all-gather (1/N of a unit), the brief overlap of a flat
    all-gather buffer with its per-parameter copy-out, and allocator fragmentation.

    `expert_parallel_size` M > 1 (the W = `num_gpus` GPUs a ('dp', 'ep') mesh of (W / M) x M): every MoE layer's
    routed experts are spread over groups of M GPUs, E / M per GPU; the rest is held as above, its units without the
    experts (the largest unit chosen among them). DDP: the E / M experts whole (fp32 params, grads and AdamW: 16 B per
    parameter / M), outside the reducer's buckets. FSDP2: each expert bank is also an FSDP unit of its own over the
    W / M data-parallel replicas (`vit_moe.training.expert_parallel.ExpertShards.shard_over_dp`), so a GPU holds
    E / W experts at rest (16 B per parameter / W), where W / M divides every layer's E / M
    (`experts_sharded_over_dp`); `transient` then adds one bank's gathering: the largest layer's E / M experts
    all-gathered (param_dtype), their unsharded grads (param_dtype) and their reduce-scatter input (reduce_dtype).
    Otherwise the banks stay whole E / M experts per GPU, outside FSDP2's units, as under DDP.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f'strategy must be one of {STRATEGIES}, got {strategy!r}')
    if mixed_precision not in _PARAM_DTYPES:
        raise ValueError(f'mixed_precision must be one of {sorted(_PARAM_DTYPES)}, got {mixed_precision!r}')
    if num_gpus < 1:
        raise ValueError(f'num_gpus must be >= 1, got {num_gpus!r}')
    if expert_parallel_size > 1:
        return _with_expert_parallelism(model, strategy, num_gpus, mixed_precision, reduce_dtype, wrap_cls_names,
                                        gradient_as_bucket_view, expert_parallel_size)
    fp32 = 4
    params = list(model.parameters())
    num_params = sum(p.numel() for p in params)
    if strategy == 'ddp':
        trainable = sum(p.numel() for p in params if p.requires_grad)  # frozen ones get no grads nor AdamW state
        return ParameterMemory(
            strategy, num_gpus, mixed_precision, params=fp32 * num_params, grads=fp32 * trainable,
            optimizer=2 * fp32 * trainable, transient=0 if gradient_as_bucket_view else fp32 * trainable,
            num_params=num_params)

    return _fsdp2_memory(model, num_gpus, mixed_precision, reduce_dtype, wrap_cls_names)


def _fsdp2_memory(model: nn.Module, n: int, mixed_precision: str, reduce_dtype: torch.dtype,
                  wrap_cls_names: Optional[Iterable[str]], leave_out: Iterable[nn.Parameter] = ()) -> ParameterMemory:
    """`parameter_memory` under FSDP2 full shard over `n` GPUs (see its docstring for what `transient` holds), of the
    parameters not in `leave_out` (expert parallelism: the routed experts, outside these units); `num_params` counts
    every parameter of the model."""
    fp32 = 4
    num_params = sum(p.numel() for p in model.parameters())
    left_out = {id(p) for p in leave_out}
    params = [p for p in model.parameters() if id(p) not in left_out]
    shard = sum(fsdp_shard_numel(p.shape, n) for p in params)  # elements per rank
    trainable = sum(fsdp_shard_numel(p.shape, n) for p in params if p.requires_grad)
    pb = _nbytes(_PARAM_DTYPES[mixed_precision])  # unsharded param / grad bytes
    rb = _nbytes(reduce_dtype if mixed_precision not in ('no', 'fp32') else torch.float32)

    def gathered(unit) -> int:  # all-gather output: N padded shards
        return sum(n * fsdp_shard_numel(p.shape, n) for _, p in unit) * pb

    def unsharded_grads(unit) -> int:
        return sum(p.numel() for _, p in unit if p.requires_grad) * pb

    def reduce_scatter_input(unit) -> int:  # padded, reduce_dtype
        return sum(n * fsdp_shard_numel(p.shape, n) for _, p in unit if p.requires_grad) * rb

    units = {k: [(name, p) for name, p in unit if id(p) not in left_out]
             for k, unit in fsdp_units(model, wrap_cls_names).items()}
    root = units.pop('')
    largest = max(units, key=lambda k: 2 * gathered(units[k]) + unsharded_grads(units[k])
                  + reduce_scatter_input(units[k]), default='')
    block = units.get(largest, [])
    transient = gathered(root) + unsharded_grads(root) \
        + 2 * gathered(block) + unsharded_grads(block) + reduce_scatter_input(block)
    return ParameterMemory(
        'fsdp2', n, mixed_precision, params=fp32 * shard, grads=fp32 * trainable,
        optimizer=2 * fp32 * trainable, transient=transient, num_params=num_params, largest_unit=largest)


def routed_expert_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The routed experts' parameters of every MoE layer: what expert parallelism spreads over processes."""
    from ..layers import moe_layers
    return [p for layer in moe_layers(model).values() for p in layer.experts.parameters()]


def experts_sharded_over_dp(model: nn.Module, num_gpus: int, expert_parallel_size: int) -> bool:
    """FSDP2 + expert parallelism M over `num_gpus` W: whether every expert bank becomes an FSDP unit of its own over
    the W / M data-parallel replicas (E / W experts per GPU at rest), as the trainer does where W / M divides every
    MoE layer's E / M (`vit_moe.training.expert_parallel.ExpertShards.shard_over_dp`); else they stay E / M whole."""
    from ..layers import moe_layers
    replicas = num_gpus // expert_parallel_size
    return all((layer.experts.fc2.weight.shape[0] // expert_parallel_size) % replicas == 0
               for layer in moe_layers(model).values())


def expert_shard_numel(shape: Sequence[int], num_gpus: int, expert_parallel_size: int, over_dp: bool) -> int:
    """Elements a GPU holds of a routed expert tensor of (whole-bank) `shape` [E, ...] under expert parallelism M over
    `num_gpus` W: E / M experts whole, or (`over_dp`: FSDP2's unit over the W / M replicas) its `fsdp_shard_numel`
    of them, E / W experts where W / M divides E / M."""
    local = (shape[0] // expert_parallel_size, *shape[1:])
    return fsdp_shard_numel(local, num_gpus // expert_parallel_size) if over_dp else math.prod(local)


def _with_expert_parallelism(model, strategy, num_gpus, mixed_precision, reduce_dtype, wrap_cls_names,
                             gradient_as_bucket_view, size: int) -> ParameterMemory:
    """`parameter_memory` of the model without its routed experts, plus what a GPU holds of them: E / `size` whole
    (DDP; FSDP2 where the replicas do not divide E / `size`), or E / W in FSDP2 units of their own over the
    W / `size` data-parallel replicas, with one bank's gathering in `transient`."""
    if num_gpus % size:
        raise ValueError(f'expert_parallel_size={size} does not divide num_gpus={num_gpus}')
    fp32 = 4
    expert_params = routed_expert_parameters(model)
    held = {id(p) for p in expert_params}
    over_dp = strategy == 'fsdp2' and experts_sharded_over_dp(model, num_gpus, size)
    shard = {id(p): expert_shard_numel(p.shape, num_gpus, size, over_dp) for p in expert_params}
    experts = sum(shard.values())
    trainable = sum(shard[id(p)] for p in expert_params if p.requires_grad)
    if strategy == 'ddp':
        others = [p for p in model.parameters() if id(p) not in held]
        other_trainable = sum(p.numel() for p in others if p.requires_grad)
        return ParameterMemory(
            strategy, num_gpus, mixed_precision, params=fp32 * (sum(p.numel() for p in others) + experts),
            grads=fp32 * (other_trainable + trainable), optimizer=2 * fp32 * (other_trainable + trainable),
            transient=0 if gradient_as_bucket_view else fp32 * other_trainable,  # the experts are not in the buckets
            num_params=sum(p.numel() for p in model.parameters()))
    rest = _fsdp2_memory(model, num_gpus, mixed_precision, reduce_dtype, wrap_cls_names, leave_out=expert_params)
    transient = rest.transient + (_expert_bank_transient(model, num_gpus, size, mixed_precision, reduce_dtype)
                                  if over_dp else 0)
    return ParameterMemory('fsdp2', num_gpus, mixed_precision, params=rest.params + fp32 * experts,
                           grads=rest.grads + fp32 * trainable, optimizer=rest.optimizer + 2 * fp32 * trainable,
                           transient=transient, num_params=rest.num_params, largest_unit=rest.largest_unit)


def _expert_bank_transient(model, num_gpus, size, mixed_precision, reduce_dtype) -> int:
    """FSDP2's buffers for one expert bank, its own unit over the W / M replicas (the largest layer's): its E / M
    experts all-gathered (padded shards, param_dtype), their unsharded grads (param_dtype) and their reduce-scatter
    input (padded, reduce_dtype), as for the blocks' units."""
    from ..layers import moe_layers
    replicas = num_gpus // size
    pb = _nbytes(_PARAM_DTYPES[mixed_precision])
    rb = _nbytes(reduce_dtype if mixed_precision not in ('no', 'fp32') else torch.float32)

    def bank(layer) -> int:
        params = list(layer.experts.parameters())
        gathered = sum(replicas * expert_shard_numel(p.shape, num_gpus, size, True) for p in params)
        grads = sum(expert_shard_numel(p.shape, num_gpus, size, False) for p in params if p.requires_grad)
        scatter = sum(replicas * expert_shard_numel(p.shape, num_gpus, size, True) for p in params if p.requires_grad)
        return gathered * pb + grads * pb + scatter * rb
    return max((bank(layer) for layer in moe_layers(model).values()), default=0)


# ---------------------------------------------------------------------------------------------------------------
# activations

@dataclass(frozen=True)
class ActivationMemory:
    """Bytes kept for the backward pass by one training forward (loss included) at `batch_size`.

    Attributes:
        outside: saved by the ops outside the blocks (patch embedding, final norm, head, loss).
        block_inputs: inputs of the checkpointed blocks, kept for their recomputation (0 without checkpointing).
        blocks: saved inside the blocks: all of them, or with checkpointing the largest single block's
            recomputation (one block at a time in the backward).
        weight_copies: the part that does not grow with the batch: low-precision copies of the weights made by
            autocast (0 in float32). Without checkpointing they are saved for the backward (already in `outside`
            and `blocks`); with checkpointing autocast's cache still holds every block's copy until the forward
            returns (the peak of the forward), then only the recomputed block's.
        per_image: bytes each further image adds to the activations (with checkpointing: to outside + block_inputs
            + blocks; the weight copies do not grow).
        total: the peak: outside + blocks (no checkpointing), or outside + block_inputs + max(blocks, the blocks'
            weight copies) (checkpointing: end of the forward vs the recomputation of the largest block).
    """
    batch_size: int
    grad_checkpointing: bool
    dtype: torch.dtype
    outside: int
    block_inputs: int
    blocks: int
    weight_copies: int
    per_image: int
    total: int


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _fake_state(model: nn.Module, fake_mode: FakeTensorMode) -> Dict[str, torch.Tensor]:
    """Fake CPU tensors (shapes and dtypes, no storage) for the parameters and buffers of a meta-device model."""
    with fake_mode:
        state = {n: torch.empty(p.shape, dtype=p.dtype, device='cpu').requires_grad_(p.requires_grad)
                 for n, p in model.named_parameters()}
        state.update({n: torch.empty(b.shape, dtype=b.dtype, device='cpu') for n, b in model.named_buffers()})
    return state


class _SavedTensorCounter:
    """Bytes of the storages saved for backward, de-duplicated per storage, by region: 'outside', a block index, or
    ('input', i) for the input of block i.

    A storage is counted whole (`untyped_storage().nbytes()`: q, k, v viewing one qkv tensor count once), once,
    in the region where it is first saved; the model's parameters and buffers are excluded (they are model state).
    """

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.seen: Dict[int, Tuple[Region, int]] = {}  # storage -> (region where first saved, bytes)
        self.input_of: Dict[int, Region] = {}  # storage of a block's input -> ('input', i)
        self.keep: List[torch.Tensor] = []  # keeps counted storages alive: their ids stay unique
        self.region: Region = 'outside'

    def add(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = (self.region, t.untyped_storage().nbytes())
            self.keep.append(t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def bytes(self) -> Dict[Region, int]:
        """Bytes per region; a block's input counts as ('input', i) whoever saved it (the block's first norm, or
        the checkpoint, which saves its inputs through the outer hooks before the block's pre-hook runs)."""
        out: Dict[Region, int] = {}
        for key, (region, nbytes) in self.seen.items():
            region = self.input_of.get(key, region)
            out[region] = out.get(region, 0) + nbytes
        return out


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    if not isinstance(getattr(model, 'blocks', None), (nn.Sequential, nn.ModuleList)):
        raise TypeError(f'expected a timm VisionTransformer or Eva (model.blocks: nn.Sequential or nn.ModuleList), '
                        f'got {type(model).__name__}')
    return model.blocks


def _forward_saved(
        model: nn.Module, batch_size: int, dtype: torch.dtype, grad_checkpointing: bool) -> Dict[Region, int]:
    """Saved bytes per region of one training forward + cross-entropy loss.

    Each block's input is attributed to ('input', i) (recorded by a forward pre-hook), not to whoever saves it.
    With non-reentrant checkpointing the tensors saved inside a block are packed by the checkpoint's own hooks and
    never reach the outer hook; the block inputs, which the checkpoint keeps for the recomputation, still do (it
    saves them with save_for_backward); the pre-hook also adds them in case a checkpoint implementation does not.
    """
    meta = _is_meta(model)
    fake_mode = FakeTensorMode() if meta else None
    state = _fake_state(model, fake_mode) if meta else None
    device = torch.device('cpu') if meta else next(model.parameters()).device
    counter = _SavedTensorCounter(state.values() if meta else [*model.parameters(), *model.buffers()])

    def pre_hook(i):
        def hook(module, args):
            x = args[0]  # [B, T, D]
            counter.input_of.setdefault(x.untyped_storage()._cdata, ('input', i))
            if grad_checkpointing:
                counter.add(x)
            counter.region = i
        return hook

    def post_hook(module, args, output):
        counter.region = 'outside'

    blocks = _blocks(model)
    handles = [b.register_forward_pre_hook(pre_hook(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post_hook) for b in blocks]
    was_training, was_checkpointing = model.training, getattr(model, 'grad_checkpointing', False)
    model.train()
    model.set_grad_checkpointing(grad_checkpointing)
    pe = model.patch_embed
    try:
        # the CPU RNG is forked: dropout (if any) does not move the caller's random state
        with fake_mode if meta else contextlib.nullcontext(), torch.random.fork_rng(devices=[]), torch.enable_grad():
            images = torch.zeros(batch_size, pe.proj.in_channels, *pe.img_size, device=device)  # [B, C, H, W]
            targets = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), \
                    torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = torch.func.functional_call(model, state, (images,)) if meta else model(images)  # [B, C]
                loss = F.cross_entropy(logits.float(), targets)
            del loss, logits
    finally:
        for h in handles:
            h.remove()
        model.set_grad_checkpointing(was_checkpointing)
        model.train(was_training)
    return counter.bytes()


def activation_memory(
        model: nn.Module,
        batch_size: int = 1,
        grad_checkpointing: bool = False,
        dtype: torch.dtype = torch.float32,
) -> ActivationMemory:
    """Bytes saved for the backward pass by a training forward of `model` (a timm ViT) at `batch_size`.

    Counts the storages that autograd saves (`torch.autograd.graph.saved_tensors_hooks`; the pack hook adds each
    saved tensor's whole storage once and excludes the parameters) during the forward and a cross-entropy loss, at
    the model's image size. A model on the `meta` device runs on fake CPU tensors (FakeTensorMode: meta storage, so
    shapes and dtypes are exact and nothing is computed; plain meta tensors cannot run the router, whose
    `torch.is_autocast_enabled(device)` rejects 'meta', nor autocast); a real CPU model runs for real (the tests check
    that both counts agree). Attention is timm's fused `scaled_dot_product_attention`, which on CPU, like flash and
    memory-efficient attention on GPU, saves q, k, v, the output and the log-sum-exp (no T x T matrix).

    `dtype=torch.bfloat16`: bf16 autocast with fp32 parameters, as Accelerate runs DDP mixed precision, using CPU
    autocast, whose casting rules match CUDA's for this model's ops (matmuls, conv and attention in bf16; the
    residual stream, LayerNorm and the router in fp32; checked against fake CUDA tensors with unfused attention).
    Autocast's bf16 weight copies are reported as `weight_copies` (they do not grow with the batch).

    `grad_checkpointing=True` runs timm's `set_grad_checkpointing(True)` (each block checkpointed, non-reentrant):
    the outer hook then sees only what is saved outside the blocks; the total adds every block's input [B, T, D]
    (kept by the checkpoint) and the largest block's own saved tensors, measured in a pass without checkpointing
    (the backward recomputes one block at a time). Gradients of the activations during the backward are not counted.
    The model is left as it was (training mode, checkpointing flag). `activation_memories` gives both settings from
    the same passes.
    """
    return activation_memories(model, batch_size, dtype, (grad_checkpointing,))[grad_checkpointing]


def activation_memories(
        model: nn.Module,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        grad_checkpointing: Iterable[bool] = (False, True),
) -> Dict[bool, ActivationMemory]:
    """`activation_memory` for each setting of `grad_checkpointing` (default: without and with), as a dict keyed by
    it: the passes without checkpointing, which both settings use (with checkpointing: for the largest block's
    recomputation and the weight copies), run once, so the two settings cost 4 forwards, not 6."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size!r}')
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f'dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}')
    # every region's bytes are affine in the batch (a static capacity per image), so two batch sizes split each
    # region into a batch-independent part (autocast's weight copies) and a per-image part
    sizes = (batch_size, batch_size + 1)
    plain = {b: _forward_saved(model, b, dtype, grad_checkpointing=False) for b in sizes}

    def fixed(region) -> int:
        a, b = plain[sizes[0]].get(region, 0), plain[sizes[1]].get(region, 0)
        return a - batch_size * (b - a)

    regions = set(plain[sizes[0]]) | set(plain[sizes[1]])
    blocks = sorted(r for r in regions if isinstance(r, int))
    results: Dict[bool, ActivationMemory] = {}
    for checkpointing in dict.fromkeys(bool(c) for c in grad_checkpointing):
        if not checkpointing:
            saved = plain[batch_size]
            total = sum(saved.values())
            results[False] = ActivationMemory(
                batch_size, False, dtype, outside=saved.get('outside', 0), block_inputs=0,
                blocks=total - saved.get('outside', 0), weight_copies=sum(fixed(r) for r in regions),
                per_image=sum(plain[sizes[1]].values()) - total, total=total)
            continue
        copies = sum(fixed(i) for i in blocks)  # autocast's cache of the blocks' weight copies, until the forward ends
        peaks = {}
        for b in sizes:
            saved = _forward_saved(model, b, dtype, grad_checkpointing=True)
            if any(isinstance(r, int) for r in saved):
                raise RuntimeError(f'tensors saved inside checkpointed blocks reached the outer hook: {list(saved)}')
            inputs = sum(v for r, v in saved.items() if isinstance(r, tuple))
            largest = max((plain[b].get(i, 0) for i in blocks), default=0)  # its recomputation, input excluded
            peaks[b] = (saved.get('outside', 0), inputs, largest)
        outside, inputs, largest = peaks[batch_size]
        results[True] = ActivationMemory(
            batch_size, True, dtype, outside=outside, block_inputs=inputs, blocks=largest,
            weight_copies=copies + fixed('outside'), per_image=sum(peaks[sizes[1]]) - sum(peaks[batch_size]),
            total=outside + inputs + max(largest, copies))
    return results
