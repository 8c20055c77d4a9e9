"""vit_moe.planning.memory: parameter / gradient / AdamW bytes per GPU (DDP, FSDP2) and saved activations.

Full-size models only on the meta device; real compute only on a small model. memory.py is loaded by path:
`import vit_moe.training` would also import Accelerate and the training loop, which it does not need.
"""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import vit_moe  # noqa: F401  registers the models
from vit_moe.layers import moe_layers
from vit_moe.planning import memory

ROOT = Path(__file__).resolve().parent.parent


def _load(name, path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
SMALL = dict(img_size=64, depth=4, num_experts=4)  # 4x4 patches + class token, dim 192, MoE in blocks 2 and 3




def meta_model(name='vit_b16_moe_upcycled', **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


@pytest.fixture(scope='module')
def b16():
    return meta_model()


@pytest.fixture(scope='module')
def small():
    """The same small model on the CPU (real weights) and on the meta device."""
    torch.manual_seed(0)
    return timm.create_model('vit_ti16_moe_upcycled', **SMALL), meta_model('vit_ti16_moe_upcycled', **SMALL)


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


# --- activations

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_meta_count_equals_cpu_count(small, dtype, grad_checkpointing):
    real, meta = small
    on_cpu = memory.activation_memory(real, 2, grad_checkpointing, dtype)
    on_meta = memory.activation_memory(meta, 2, grad_checkpointing, dtype)
    assert on_meta == on_cpu
    assert on_cpu.total > 0
    assert not real.grad_checkpointing and real.training  # left as it was


def test_per_region_counts_equal_on_cpu_and_meta(small):
    real, meta = small
    for ckpt in (False, True):
        on_cpu, on_meta = (memory._forward_saved(m, 3, torch.float32, ckpt) for m in (real, meta))
        assert on_cpu == on_meta


def test_checkpointing_keeps_block_inputs_and_what_is_saved_outside(small):
    model = small[1]
    B, T, D = 3, 17, 192
    plain = memory._forward_saved(model, B, torch.float32, grad_checkpointing=False)
    ckpt = memory._forward_saved(model, B, torch.float32, grad_checkpointing=True)
    inputs = {r: v for r, v in ckpt.items() if isinstance(r, tuple)}
    assert inputs == {('input', i): B * T * D * 4 for i in range(4)}  # each block's input [B, T, D], fp32
    assert ckpt['outside'] == plain['outside']  # nothing inside a block reaches the outer hook
    assert set(ckpt) == {'outside', *inputs}
    result = memory.activation_memory(model, B, grad_checkpointing=True)
    assert result.blocks == max(plain[i] for i in range(4)) == plain[3]  # the MoE blocks are the largest
    assert result.total == plain['outside'] + sum(inputs.values()) + plain[3]


@pytest.fixture(scope='module')
def b16_activations(b16):
    """memory.activation_memory(b16, batch, grad_checkpointing, dtype), each counted once for the tests below."""
    results = {}

    def activations(batch, grad_checkpointing=False, dtype=torch.float32):
        key = batch, grad_checkpointing, dtype
        if key not in results:
            results[key] = memory.activation_memory(b16, batch, grad_checkpointing, dtype)
        return results[key]
    return activations


@pytest.mark.xdist_group('b16_activations')
def test_checkpointing_reduces_activation_memory(b16_activations):
    for dtype in (torch.float32, torch.bfloat16):
        full = b16_activations(32, False, dtype)
        ckpt = b16_activations(32, True, dtype)
        assert ckpt.total < full.total / 2
        assert ckpt.per_image < full.per_image / 5


@pytest.mark.xdist_group('b16_activations')
def test_activations_are_affine_in_the_batch(b16, b16_activations):
    saved = {b: sum(memory._forward_saved(b16, b, torch.float32, False).values()) for b in (1, 2, 32)}
    per_image = saved[2] - saved[1]
    assert saved[32] == saved[1] + 31 * per_image
    result = b16_activations(32)
    assert result.total == saved[32] and result.per_image == per_image
    assert result.weight_copies < 64  # fp32: no copies (the loss saves a scalar)


@pytest.mark.xdist_group('b16_activations')
def test_bf16_autocast_saves_bf16_weight_copies(b16, b16_activations):
    fp32 = b16_activations(32, dtype=torch.float32)
    bf16 = b16_activations(32, dtype=torch.bfloat16)
    assert 0.45 * fp32.per_image < bf16.per_image < 0.75 * fp32.per_image  # LayerNorm, router, residual stay fp32
    assert 0.95 < bf16.weight_copies / (2 * _num_params(b16)) <= 1.0  # bf16 copy of (almost) every weight
    ckpt = b16_activations(32, True, dtype=torch.bfloat16)
    assert ckpt.total >= ckpt.weight_copies  # autocast's cache, held until the forward returns


# --- parameters, gradients, optimizer

def test_ddp_is_16_bytes_per_parameter(b16):
    n = _num_params(b16)
    assert n == 965_087_464
    for gpus in (1, 8, 64):
        for mp in ('no', 'bf16'):
            m = memory.parameter_memory(b16, 'ddp', gpus, mp)
            assert m.params + m.grads + m.optimizer == 16 * n
            assert m.transient == 4 * n and m.total == 20 * n  # the reducer's gradient buckets
    assert memory.parameter_memory(b16, 'ddp', 8, gradient_as_bucket_view=True).total == 16 * n


def test_fsdp2_shards_scale_as_one_over_n_with_padding(b16):
    n = _num_params(b16)
    single = memory.parameter_memory(b16, 'fsdp2', 1)
    assert single.params + single.grads + single.optimizer == 16 * n
    for gpus in (2, 8, 64):
        m = memory.parameter_memory(b16, 'fsdp2', gpus)
        padded = sum(math.ceil(p.shape[0] / gpus) * math.prod(p.shape[1:]) for p in b16.parameters())
        assert m.params == m.grads == 4 * padded and m.optimizer == 8 * padded
        assert padded * gpus >= n  # padding only adds
        if gpus <= 32:
            assert m.params < 1.01 * 4 * n / gpus
    # 32 experts over 64 ranks: each rank stores one expert's rows (the experts are ~94% of the parameters), so
    # 64 GPUs hold about twice the even share, barely less than 32 GPUs
    on_32, on_64 = (memory.parameter_memory(b16, 'fsdp2', g).params for g in (32, 64))
    assert 1.8 * 4 * n / 64 < on_64 < on_32


def test_fsdp2_shard_sizes_follow_torch_chunk():
    # FSDP2 chunks dim 0 with torch.chunk (_chunk_with_empty) and pads every shard to chunk 0's size
    for dim0 in (1, 5, 10, 32, 768, 1000):
        for gpus in (1, 3, 4, 8, 48, 64):
            chunks = torch.chunk(torch.empty(dim0, 7, device='meta'), gpus)
            assert memory.fsdp_shard_numel((dim0, 7), gpus) == chunks[0].numel() == math.ceil(dim0 / gpus) * 7
    E, D, H = 32, 768, 3072  # expert weights [E, in, out]
    assert memory.fsdp_shard_numel((E, D, H), 64) == D * H  # ranks 32..63 hold one row of padding
    assert memory.fsdp_shard_numel((E, D, H), 8) == 4 * D * H
    assert memory.fsdp_shard_numel((1, 197, D), 64) == 197 * D  # pos_embed: whole on every rank


def test_fsdp2_units_and_transient(b16):
    units = memory.fsdp_units(b16)
    assert list(units) == [''] + [f'blocks.{i}' for i in range(12)]
    assert sum(len(u) for u in units.values()) == len(list(b16.parameters()))
    root = sum(p.numel() for _, p in units[''])
    moe = sum(p.numel() for _, p in units['blocks.11'])
    assert moe > 10 * sum(p.numel() for _, p in units['blocks.0'])
    m = memory.parameter_memory(b16, 'fsdp2', 1)
    assert m.largest_unit == 'blocks.6'  # the first MoE block
    assert m.transient == root * (4 + 4) + moe * (2 * 4 + 4 + 4)  # root params + grads; 2 blocks' params + grads + RS
    bf16 = memory.parameter_memory(b16, 'fsdp2', 1, 'bf16')
    assert bf16.transient == root * (2 + 2) + moe * (2 * 2 + 2 + 4)  # bf16 gathered params and grads, fp32 reduce
    # on 64 GPUs the experts' all-gather output is padded to 64 rows: twice their size
    on_8, on_64 = (memory.parameter_memory(b16, 'fsdp2', g).transient for g in (8, 64))
    assert on_64 > 1.7 * on_8


def test_fsdp2_shards_match_fully_shard_on_a_fake_process_group():
    """The per-rank bytes of torch's own fully_shard (world size 64, on meta) equal the count."""
    dist = pytest.importorskip('torch.distributed')
    fake_pg = pytest.importorskip('torch.testing._internal.distributed.fake_pg')
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = meta_model('vit_ti16_moe_upcycled', img_size=64, depth=4, num_experts=32)
    expected = memory.parameter_memory(model, 'fsdp2', 64)
    for rank in (0, 40):
        dist.init_process_group('fake', rank=rank, world_size=64, store=fake_pg.FakeStore())
        try:
            sharded = meta_model('vit_ti16_moe_upcycled', img_size=64, depth=4, num_experts=32)
            mesh = init_device_mesh('cpu', (64,))
            for block in sharded.blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=True)
            fully_shard(sharded, mesh=mesh, reshard_after_forward=True)
            local = {n: p.to_local() for n, p in sharded.named_parameters()}
            expert = local['blocks.3.mlp.experts.fc1.weight']
            assert expert.shape[0] == (1 if rank < 32 else 0)  # ranks 32..63: an empty shard ...
            assert expert.untyped_storage().nbytes() == 192 * 768 * 4  # ... padded to one expert's rows
            assert sum(t.untyped_storage().nbytes() for t in local.values()) == expected.params
        finally:
            dist.destroy_process_group()


def test_rejects_bad_arguments(b16):
    with pytest.raises(ValueError, match='strategy'):
        memory.parameter_memory(b16, 'zero3')
    with pytest.raises(ValueError, match='mixed_precision'):
        memory.parameter_memory(b16, 'fsdp2', 8, 'int8')
    with pytest.raises(ValueError, match='batch_size'):
        memory.activation_memory(b16, 0)


def test_the_planning_model_imports_only_torch_and_timm():
    """Every import of the planning package, those inside functions included, and what running it loads: no training
    or ONNX stack (the dry run, memory table and EP table alike)."""
    import ast
    allowed = {'contextlib', 'math', 'dataclasses', 'typing', 'torch', 'timm', '..layers', '..models', '.memory',
               '.comm_volume'}
    for path in (ROOT / 'vit_moe' / 'planning').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {'.' * node.level + (node.module or '').split('.')[0]}
            else:
                continue
            assert names <= allowed, (path.name, node.lineno, names - allowed)
    script = ('import sys, timm, vit_moe.planning as plan\n'
              'model = timm.create_model("vit_ti16_moe_upcycled", img_size=32, patch_size=8, embed_dim=64, depth=2, '
              'num_heads=2, num_experts=4)\n'
              'plan.parameter_memory(model, "fsdp2", num_gpus=2, mixed_precision="bf16", expert_parallel_size=2)\n'
              'plan.activation_memory(model, 2, grad_checkpointing=True)\n'
              'plan.comm_volume(model, "ddp", 2, 4)\n'
              'print(sorted(m for m in sys.modules if m.split(".")[0] in ("accelerate", "onnx", "onnxruntime", '
              '"torchmetrics")))')
    loaded = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == '[]'


def test_memory_table_script(tmp_path, capsys, monkeypatch):
    script = _load('memory_table_script', 'benchmarks/memory_table.py')
    monkeypatch.chdir(tmp_path)
    script.main(['--models', 'vit_ti16_moe_upcycled', '--gpus', '8', '64', '--batch-sizes', '4', '--output', 'm.md',
                 '--model-kwargs', '{"img_size": 64, "depth": 4, "num_experts": 4}'])
    out = capsys.readouterr().out
    assert '### vit_ti16_moe_upcycled' in out and ', 64 px' in out and '| FSDP2 + bf16 | 64 |' in out and 'batch 4 (GB)' in out
    assert '| bf16 autocast | yes |' in out
    assert [p.name for p in tmp_path.iterdir()] == ['m.md']  # nothing else is written
    assert (tmp_path / 'm.md').read_text() == out.rstrip('\n') + '\n'


@pytest.mark.parametrize('strategy', ['ddp', 'fsdp2'])
def test_expert_parallel_memory_is_the_bytes_of_a_sharded_model(strategy):
    """With expert_parallel_size N every GPU holds E / N experts of each MoE layer (whole tensors outside DDP; under
    FSDP2 on N = W GPUs each bank is a unit over 1 replica, which holds them all) plus the rest as the strategy holds
    it: the count equals the parameters of a model sharded that way."""
    import timm
    from vit_moe.layers import moe_layers, shard_experts
    from vit_moe.planning.memory import fsdp_shard_numel, parameter_memory
    model = timm.create_model('vit_ti16_moe_upcycled', img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                              num_experts=8)
    whole = [p for layer in moe_layers(model).values() for p in layer.experts.parameters()]
    ids = {id(p) for p in whole}
    rest = sum(p.numel() if strategy == 'ddp' else fsdp_shard_numel(p.shape, 4)
               for p in model.parameters() if id(p) not in ids)
    memory = parameter_memory(model, strategy, 4, expert_parallel_size=4)
    shard_experts(model, None, 4, 1)  # what each of the 4 processes keeps (no collective is run here)
    experts = sum(p.numel() for layer in moe_layers(model).values() for p in layer.experts.parameters())
    assert memory.params == 4 * (rest + experts) and memory.optimizer == 8 * (rest + experts)
    assert experts * 4 == sum(p.numel() for p in whole)  # a quarter of the experts


def _experts_and_rest(model, gpus):
    """(elements of the routed experts, whole; FSDP2's shard over `gpus` of everything else per GPU)."""
    experts = memory.routed_expert_parameters(model)
    ids = {id(p) for p in experts}
    rest = sum(memory.fsdp_shard_numel(p.shape, gpus) for p in model.parameters() if id(p) not in ids)
    return sum(p.numel() for p in experts), rest


@pytest.mark.parametrize('gpus, ep, held', [(16, 8, 16), (32, 8, 32), (64, 8, 8), (8, 8, 8), (16, 2, 16)],
                         ids=['16-ep8', '32-ep8', '64-ep8-whole', '8-ep8', '16-ep2'])
def test_fsdp2_with_expert_parallelism_holds_e_over_w_experts_where_the_replicas_divide_e_over_n(b16, gpus, ep, held):
    """FSDP2 + EP N on W GPUs: each expert bank is an FSDP unit over its W / N replicas, so a GPU holds 1 / W of the
    routed experts (params, grads, AdamW) where W / N divides E / N (32 experts, EP 8: 4 per group, over 2 or 4
    replicas), else 1 / N (64 GPUs: 4 experts over 8 replicas stay whole); DDP + EP holds 1 / N either way."""
    experts, rest = _experts_and_rest(b16, gpus)
    m = memory.parameter_memory(b16, 'fsdp2', gpus, 'bf16', expert_parallel_size=ep)
    assert memory.experts_sharded_over_dp(b16, gpus, ep) == (held == gpus)
    assert m.params == m.grads == 4 * (rest + experts // held) and m.optimizer == 8 * (rest + experts // held)
    ddp = memory.parameter_memory(b16, 'ddp', gpus, expert_parallel_size=ep)
    others = _num_params(b16) - experts
    assert ddp.params == ddp.grads == 4 * (others + experts // ep) and ddp.transient == 4 * others


def test_fsdp2_with_expert_parallelism_gathers_one_bank_in_the_transient(b16, monkeypatch):
    """The transient of FSDP2 + EP adds one bank's E / N experts all-gathered (bf16), their unsharded grads (bf16)
    and their reduce-scatter input (fp32 here) to the units' without the experts; whole banks (the replicas do not
    divide them) add nothing: their grads are the fp32 grads already counted."""
    per_layer = max(sum(p.numel() for p in layer.experts.parameters()) for layer in moe_layers(b16).values())
    sharded = memory.parameter_memory(b16, 'fsdp2', 16, 'bf16', reduce_dtype=torch.float32, expert_parallel_size=8)
    monkeypatch.setattr(memory, 'experts_sharded_over_dp', lambda *args: False)  # the same GPUs, banks left whole
    whole = memory.parameter_memory(b16, 'fsdp2', 16, 'bf16', reduce_dtype=torch.float32, expert_parallel_size=8)
    assert sharded.transient - whole.transient == per_layer // 8 * (2 + 2 + 4)
    assert whole.params - sharded.params == 4 * _experts_and_rest(b16, 16)[0] // 16  # E / N against E / W
    units = memory.fsdp_units(b16)  # the largest unit without the experts: a dense block, not an MoE one
    assert not any('.mlp.experts.' in name for name, _ in units[sharded.largest_unit])


@pytest.mark.parametrize('gpus, ep', [(8, 2), (8, 4), (16, 2)])
def test_fsdp2_with_expert_parallelism_matches_fully_shard_on_a_fake_process_group(gpus, ep):
    """The per-rank bytes of the trainer's own expert shards (`ExpertShards`: `shard_experts`, each bank
    `fully_shard` over 'dp' where it divides) under torch's fully_shard per block and root, on a fake process group
    of `gpus` ranks: 8 experts, EP 2 or 4 on 8 ranks hold 1 each; EP 2 on 16 ranks keeps 4 whole (8 replicas)."""
    dist = pytest.importorskip('torch.distributed')
    fake_pg = pytest.importorskip('torch.testing._internal.distributed.fake_pg')
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from vit_moe.training.expert_parallel import ExpertShards
    kwargs = dict(img_size=64, depth=4, num_experts=8)
    expected = memory.parameter_memory(meta_model('vit_ti16_moe_upcycled', **kwargs), 'fsdp2', gpus,
                                       expert_parallel_size=ep)
    for rank in (0, gpus - 1):
        dist.init_process_group('fake', rank=rank, world_size=gpus, store=fake_pg.FakeStore())
        try:
            model = meta_model('vit_ti16_moe_upcycled', **kwargs)
            shards = ExpertShards(ep, gpus, 'cpu')
            shards.shard(model)
            banks = shards.shard_over_dp(model)
            assert banks == (gpus == 8)
            ignored = None if banks else {p for bank in shards.expert_banks(model) for p in bank.parameters()}
            mesh = init_device_mesh('cpu', (gpus,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh, ignored_params=ignored)
            fully_shard(model, mesh=mesh, ignored_params=ignored)
            local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in model.named_parameters()}
            assert local['blocks.3.mlp.experts.fc1.weight'].shape[0] == (1 if banks else 8 // ep)
            assert sum(t.untyped_storage().nbytes() for t in local.values()) == expected.params
        finally:
            dist.destroy_process_group()
