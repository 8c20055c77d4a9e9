""" Deployable variants of an exported model, with ONNX Runtime's own tools: int8 experts, optimised sessions.

`quantize_onnx(src, dst)` (dynamic int8, ONNX Runtime's `quantize_dynamic`):
1. fuse the exported erf-GELU into com.microsoft Gelu (exact; ONNX Runtime fuses it nowhere else),
2. (default) unroll the batched expert matmuls into per-expert 2-D MatMuls, which ONNX Runtime pre-packs,
3. `quantize_dynamic(per_channel=True, weight_type=QInt8, op_types_to_quantize=['MatMul'])` with the routers
   excluded: int8 weights per output column (per expert), activations quantized at run time, router logits
   float32; the patch-embedding Conv stays float32 (ConvInteger was 4x slower than the float Conv here),
4. batched (not unrolled) 3-D expert weights are re-quantized per expert and output column (scale [E, 1, M]):
   `quantize_dynamic` gives them one scale per column shared by all experts, which ONNX Runtime refuses.

The weight range follows the CPU the file is for (`target`, `vit_moe.onnx.int8_target`): full int8 range for CPUs
with VNNI (and ARM), `reduce_range` (7-bit weights) for x86 CPUs without VNNI, whose int8 kernel saturates on full
range weights; 'auto' detects the exporting CPU. The choice is recorded in the file's metadata (`vit_moe_int8`), and
`OnnxClassifier` warns when a full-range file runs on a CPU without VNNI.

Measured choices (S/16, 2 threads): QUInt8 weights 1.5-1.8x slower than QInt8 on this CPU (u8u8 kernel);
per-channel is more accurate than per-tensor at the same speed.
Weight-only int4 (MatMulNBits) applies only to 2-D weights, so only after unrolling, and at ~13 tokens per expert
ONNX Runtime 1.32's int4 kernels were slower than its int8 ones: not offered.

Dynamic quantization computes each activation's scale over the whole tensor at run time, so an int8 model's
logits for an image move slightly (~0.05) with its batch-mates; the float graphs do not.

`optimize_onnx(src, dst)`: the GELU fusion, then ONNX Runtime's graph optimisations (EXTENDED level, the
portable one) saved to a file: faster session start; tied to the ONNX Runtime version that wrote it.
"""
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
import onnx
from onnx import numpy_helper

from .graph_rewrites import fuse_erf_gelu, merge_expert_branches, op_counts, router_node_names, unroll_expert_matmuls
from .int8_target import resolve_int8_target
from .metadata import INT8_KEY, METADATA_KEY

__all__ = ['quantize_onnx', 'optimize_onnx', 'float_expert_weights', 'QUANTIZE_MODES', 'int8_qmax']

_logger = logging.getLogger(__name__)

QUANTIZE_MODES = ('int8',)
_EXTERNAL_THRESHOLD = int(1.8e9)


def int8_qmax(reduce_range: bool) -> int:
    """Largest int8 weight magnitude ONNX Runtime's symmetric quantizer uses: 127, or 64 with reduce_range."""
    return 64 if reduce_range else 127


def _fix_batched_per_channel(q_model: onnx.ModelProto, float_model: onnx.ModelProto, reduce_range: bool) -> int:
    """Re-quantize the 3-D expert weights [E, K, M] symmetric int8 per expert and output column (scale [E, 1, M])."""
    qmax = int8_qmax(reduce_range)
    q_inits = {i.name: i for i in q_model.graph.initializer}
    f_inits = {i.name: i for i in float_model.graph.initializer}
    fixed = 0
    for n in q_model.graph.node:
        if n.op_type != 'MatMulInteger' or n.input[1] not in q_inits or len(q_inits[n.input[1]].dims) != 3:
            continue
        base = n.input[1][:-len('_quantized')]
        weight = numpy_helper.to_array(f_inits[base]).astype(np.float32)  # [E, K, M]
        amax = np.abs(weight).max(axis=1, keepdims=True)  # [E, 1, M]
        scale = np.where(amax == 0, 1.0, amax / qmax).astype(np.float32)
        q_inits[n.input[1]].CopyFrom(numpy_helper.from_array(
            np.clip(np.round(weight / scale), -qmax, qmax).astype(np.int8), n.input[1]))
        q_inits[n.input[3]].CopyFrom(numpy_helper.from_array(np.zeros(scale.shape, np.int8), n.input[3]))
        q_inits[base + '_scale'].CopyFrom(numpy_helper.from_array(scale, base + '_scale'))
        fixed += 1
    return fixed


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (a model over 2 GB cannot be serialised to ask protobuf its size)."""
    return sum(len(i.raw_data) if i.raw_data else int(np.prod(i.dims)) * 4 for i in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path) -> None:
    big = _weight_bytes(model) > _EXTERNAL_THRESHOLD
    for stale in (path, path.with_name(path.name + '.data')):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=big, location=path.name + '.data' if big else None)


# [E, K, M], or expert e's [K, M] once unrolled; every expert bank's linear weights (vit_moe.layers.experts)
_EXPERT_WEIGHT = re.compile(r'experts\.(fc1|fc2|fc1_g|fc1_x)\.weight(\.\d+)?$')


def float_expert_weights(model: onnx.ModelProto) -> List[str]:
    """Expert weight matrices still stored in floating point (quantized ones are `<name>_quantized`, int8)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return [i.name for i in model.graph.initializer if i.data_type in floats and _EXPERT_WEIGHT.search(i.name)]


class _DropPreprocessingAdvice(logging.Filter):
    """quantize_dynamic logs a generic 'Please consider to run pre-processing' warning on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'consider to run pre-processing' not in record.getMessage()


def quantize_onnx(
        src: Union[str, Path],
        dst: Union[str, Path],
        mode: str = 'int8',
        per_channel: bool = True,
        unroll_experts: bool = True,
        target: str = 'auto',
) -> Dict[str, Any]:
    """Dynamic int8 quantization of an exported (MoE) ViT, routers kept float32 (see the module docstring).

    Args:
        target: the CPU the file is for: 'auto' (this one), 'vnni' (x86 with VNNI, ARM: full-range weights) or
            'avx2' (any x86 CPU: reduced-range weights); see `vit_moe.onnx.int8_target`.

    Returns:
        {'routers': router node names kept float, 'ops_before' / 'ops_after': op type counts,
         'float_expert_weights': expert weights left in floating point (empty), 'bytes': size of `dst`,
         'int8': the target record written to the metadata (target, reduce_range, how it was chosen)}.
    """
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import QuantType, quantize_dynamic
    if mode not in QUANTIZE_MODES:
        raise ValueError(f'quantize={mode!r} is not valid; accepted: {", ".join(QUANTIZE_MODES)}')
    int8 = resolve_int8_target(target)
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))  # external data included
    ops_before = op_counts(model)
    routers = router_node_names(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    fuse_erf_gelu(model)
    if unroll_experts:
        unroll_expert_matmuls(model)
        merge_expert_branches(model)
    prepared = dst.with_name(dst.stem + '.prepared.onnx')
    _save(model, prepared)
    advice = _DropPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(str(prepared), str(dst), per_channel=per_channel, reduce_range=int8['reduce_range'],
                         weight_type=QuantType.QInt8, op_types_to_quantize=['MatMul'], nodes_to_exclude=routers,
                         extra_options={'MatMulConstBOnly': True})
        quantized = onnx.load(str(dst))
        if per_channel:
            _fix_batched_per_channel(quantized, model, int8['reduce_range'])
    finally:
        logging.getLogger().removeFilter(advice)
        for stale in (prepared, prepared.with_name(prepared.name + '.data')):
            stale.unlink(missing_ok=True)
    metadata[INT8_KEY] = json.dumps(dict(int8, onnxruntime=ort_version))
    present = {p.key: p for p in quantized.metadata_props}
    for key, value in metadata.items():  # the timm data config travels with the model
        if key in present:
            present[key].value = value
        else:
            quantized.metadata_props.add(key=key, value=value)
    _save(quantized, dst)
    return dict(routers=routers, ops_before=ops_before, ops_after=op_counts(quantized),
                float_expert_weights=float_expert_weights(quantized), bytes=_file_bytes(dst), int8=int8)


def optimize_onnx(src: Union[str, Path], dst: Union[str, Path], threads: int = 1) -> Path:
    """GELU fusion, then ONNX Runtime's EXTENDED graph optimisations, saved to `dst` (reload it at any level)."""
    import onnxruntime as ort
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    metadata = {p.key: p.value for p in model.metadata_props}
    fuse_erf_gelu(model)
    fused = dst.with_name(dst.stem + '.fused.onnx')
    _save(model, fused)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(dst)
        if _weight_bytes(model) > _EXTERNAL_THRESHOLD:
            options.add_session_config_entry('session.optimized_model_external_initializers_file_name',
                                             dst.name + '.data')
        ort.InferenceSession(str(fused), options, providers=['CPUExecutionProvider'])
    finally:
        for stale in (fused, fused.with_name(fused.name + '.data')):
            stale.unlink(missing_ok=True)
    optimized = onnx.load(str(dst), load_external_data=False)
    if METADATA_KEY not in {p.key for p in optimized.metadata_props}:  # keep the timm data config
        for key, value in metadata.items():
            optimized.metadata_props.add(key=key, value=value)
        onnx.save(optimized, str(dst))
    return dst


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + '.data')
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
