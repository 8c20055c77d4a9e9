""" Static-capacity ONNX export of (MoE) ViTs.

Per-image routing makes the capacity a constant for the input size, and stacked experts put every
expert's weights in the graph, so the torch.export (dynamo) based exporter produces an exact graph
with a dynamic batch axis and no NonZero or other data-dependent shapes.

The timm data config (input size, mean, std, crop, interpolation) and label names are stored in the
ONNX metadata, so `vit_moe.onnx.OnnxClassifier` preprocesses exactly as timm does.

The exporter logs a few hundred INFO lines per model (onnxscript's optimizer and rewriter, onnx_ir's passes);
`export_onnx` raises those loggers to WARNING for the call unless a level is set on one of them, e.g.
`logging.getLogger('onnxscript').setLevel(logging.INFO)` to see them.
"""
import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import onnx
import torch

from ..layers import capture_routing, soft_moe_layers
from .metadata import METADATA_KEY, ROUTING_OUTPUTS_KEY, model_metadata

__all__ = ['export_onnx', 'OnnxExportError', 'DEFAULT_EXTERNAL_DATA_THRESHOLD', 'RoutingProbe', 'ROUTING_KINDS']

_logger = logging.getLogger(__name__)

DEFAULT_EXTERNAL_DATA_THRESHOLD = int(1.8e9)  # bytes; protobuf cannot hold a model over 2 GB
EXPORTER_LOGGERS = ('torch.onnx', 'onnxscript', 'onnx_ir')  # quieted during export unless a level is set on them


class OnnxExportError(RuntimeError):
    """A model or option that cannot be exported."""


def _input_size(model: torch.nn.Module, img_size: Optional[Union[int, Sequence[int]]]) -> Tuple[int, int]:
    built = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is None:
        if built is None:
            raise OnnxExportError(f'{type(model).__name__} has no patch_embed.img_size: pass img_size')
        return tuple(built)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    dynamic = getattr(model, 'dynamic_img_size', False)
    if built is not None and tuple(built) != size and not dynamic:
        raise OnnxExportError(
            f'input size {size} is not supported by this model, built for {tuple(built)} (fixed position '
            f'embedding); rebuild it with img_size={size[0]} or export at {tuple(built)}')
    return size


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter's loggers at WARNING for the duration, except those the caller set a level on."""
    quieted = [lg for lg in map(logging.getLogger, EXPORTER_LOGGERS) if lg.level == logging.NOTSET]
    for lg in quieted:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg in quieted:
            lg.setLevel(logging.NOTSET)


ROUTING_KINDS = ('input', 'token_index', 'combine_weights', 'expert_output', 'output')


class RoutingProbe(torch.nn.Module):
    """A debug export's graph: the logits, then for each MoE layer in call order its input [B, T, D], slot token
    indices [B, E, capacity], combine weights [B, E, capacity], expert outputs [E, B*capacity, D] (before weighting)
    and output [B, T, D] (`ROUTING_KINDS`; never the deployed file)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        with capture_routing(keep_tensors=True) as capture:
            logits = self.model(x)
        outputs = [logits]
        for _, layer in capture.tensors:
            outputs += [getattr(layer, kind) for kind in ROUTING_KINDS]
        return tuple(outputs)

    def layer_names(self, example: torch.Tensor):
        with torch.no_grad(), capture_routing() as capture:
            self.model(example)
        return [name for name, _, _ in capture.records]


@contextlib.contextmanager
def on_cpu_in_eval_mode(model: torch.nn.Module):
    """The model on the CPU in eval mode for the duration; its device and train / eval mode are restored after."""
    was_training = model.training
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device('cpu')
    if device.type != 'cpu':
        model.to('cpu')
    model.eval()
    try:
        yield model
    finally:
        if device.type != 'cpu':
            model.to(device)
        model.train(was_training)


def export_onnx(
        model: torch.nn.Module,
        output: Union[str, Path],
        img_size: Optional[Union[int, Sequence[int]]] = None,
        opset: Optional[int] = 18,
        fp16: bool = False,
        external_data: Optional[bool] = None,
        external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
        check: bool = True,
        quantize: Optional[str] = None,
        optimize: bool = False,
        unroll_experts: bool = True,
        expose_routing: bool = False,
        int8_target: str = 'auto',
        debug_output: Optional[Union[str, Path]] = None,
        expert_kernel: str = 'matmul',
) -> Path:
    """Export `model` to ONNX with a dynamic batch axis ('images' [B, 3, H, W] -> 'logits').

    Args:
        model: a timm model (dense or MoE) on any device; exported on the CPU in eval mode, then put back on its
            device and in its mode.
        output: the .onnx path; with external data the weights go to `<output>.data` beside it.
        img_size: export size; must match the size the model was built for (fixed position embedding).
        opset: ONNX opset (default 18).
        fp16: export with float16 weights and inputs (router logits stay float32).
        external_data: force external data on / off; default on when the weights exceed the threshold.
        external_data_threshold: bytes above which weights are written as external data.
        check: run the full onnx.checker on the exported float graph.
        quantize: 'int8' for dynamic int8 weights (every expert; routers float32; `vit_moe.onnx.quantize_onnx`);
            'int4-experts' (with expert_kernel='qmoe'): 4-bit experts, block 32, and int8 for the rest.
        optimize: save ONNX Runtime's graph optimisations (and the GELU fusion) in the file (`optimize_onnx`).
        unroll_experts: with `quantize`, run the experts as per-expert 2-D matmuls in the graph (pre-packed).
        int8_target: with `quantize`, the CPU the file is for: 'auto' (this one), 'vnni' or 'avx2' (weight range;
            `vit_moe.onnx.int8_target`).
        expose_routing: a debug export for parity checks (`RoutingProbe`): extra outputs `<layer>/input`,
            `<layer>/token_index`, `<layer>/combine_weights`, `<layer>/expert_output`, `<layer>/output` per MoE layer,
            listed in the metadata. Not for deployment.
        debug_output: also write that debug export of the same trace here (quantized / optimised as `output`):
            the model is traced once with its routing exposed, saved as `debug_output`, and `output` is the same
            graph with only its logits kept (the other outputs and the nodes that only fed them removed). With
            expert_kernel='qmoe' (no per-slot expert outputs to expose): the graph before the rest of the model is
            quantized, QMoE nodes and everything else float32, which parity compares tightly with `qmoe_reference`.
        expert_kernel: 'matmul' (default: the experts as standard-op matmuls, portable) or 'qmoe' (each MoE layer's
            experts and combine in one ONNX Runtime com.microsoft.QMoE node, 8-bit experts with quantize='int8',
            4-bit with 'int4-experts'; `vit_moe.onnx.fused_experts`; recorded in the metadata as `expert_kernel`).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    height, width = _input_size(model, img_size)
    if quantize and fp16:
        raise OnnxExportError('quantize and fp16 exclude each other: int8 weights are quantized from float32')
    if quantize:
        from .int8_target import resolve_int8_target
        resolve_int8_target(int8_target)  # a bad target fails before the export
    qmoe = _qmoe_settings(model, expert_kernel, quantize, fp16, expose_routing)
    debug_output = Path(debug_output) if debug_output is not None else None
    if debug_output is not None and expose_routing:
        raise OnnxExportError('expose_routing and debug_output exclude each other: debug_output already writes the '
                              'debug export beside the deployed file')
    float_output, float_debug = (_float_path(path) if quantize or optimize else path
                                 for path in (output, debug_output or output))
    kept = None
    if qmoe is not None and debug_output is not None:  # the QMoE graph before the rest is quantized, kept
        float_output = float_debug = kept = debug_output
        debug_output = None
    with on_cpu_in_eval_mode(model):
        _export(model, float_output, (height, width), opset, fp16, external_data, external_data_threshold, check,
                expose_routing, float_debug if debug_output is not None else None, qmoe)
    if not (quantize or optimize):
        return output
    from .quantize import optimize_onnx, quantize_onnx
    try:
        if quantize:
            quantize_onnx(float_output, output, 'int8', unroll_experts=unroll_experts, target=int8_target)
            if debug_output is not None:
                quantize_onnx(float_debug, debug_output, 'int8', unroll_experts=unroll_experts, target=int8_target)
            if optimize:
                optimize_onnx(output, output)
        else:
            optimize_onnx(float_output, output)
            if debug_output is not None:
                optimize_onnx(float_debug, debug_output)
    finally:
        for stale in {float_output, float_debug} - {kept}:
            for path in (stale, stale.with_name(stale.name + '.data')):
                path.unlink(missing_ok=True)
    return output


def _qmoe_settings(model, expert_kernel: str, quantize: Optional[str], fp16: bool, expose_routing: bool
                   ) -> Optional[Tuple[int, int]]:
    """(expert bits, block size) for expert_kernel='qmoe', None for 'matmul'; one error naming a bad combination."""
    from .fused_experts import EXPERT_KERNELS, QMOE_EXPERT_BITS, check_qmoe_layers
    from .quantize import QUANTIZE_MODES
    if expert_kernel not in EXPERT_KERNELS:
        raise OnnxExportError(f'expert_kernel={expert_kernel!r} is not known; accepted: {", ".join(EXPERT_KERNELS)}')
    if quantize is not None and quantize not in QUANTIZE_MODES + tuple(QMOE_EXPERT_BITS):
        raise OnnxExportError(f"quantize={quantize!r} is not known; accepted: 'int8', 'int4-experts' (with "
                              f"expert_kernel='qmoe') or None")
    if expert_kernel == 'matmul':
        if quantize == 'int4-experts':
            raise OnnxExportError("quantize='int4-experts' needs expert_kernel='qmoe' (4-bit experts are QMoE's); "
                                  "with the standard-op experts: quantize='int8'")
        return None
    if quantize is None or fp16:
        raise OnnxExportError(f"expert_kernel='qmoe' computes quantized experts: give quantize='int8' (8-bit) or "
                              f"'int4-experts' (4-bit){', not fp16' if fp16 else ''}")
    if expose_routing:
        raise OnnxExportError("expert_kernel='qmoe' has no per-slot expert outputs to expose (expose_routing): a "
                              "QMoE file is checked end to end against vit_moe.onnx.fused_experts.qmoe_reference, "
                              "and debug_output keeps its graph before the rest is quantized")
    try:
        check_qmoe_layers(model)
    except ValueError as e:
        raise OnnxExportError(str(e)) from e
    return QMOE_EXPERT_BITS[quantize]


def _float_path(path: Path) -> Path:
    """Where the float graph goes before quantization / optimisation writes `path`."""
    return path.with_name(path.stem + '.float.onnx')


def _export(model, output: Path, size: Tuple[int, int], opset, fp16, external_data, external_data_threshold, check,
            expose_routing: bool = False, debug_output: Optional[Path] = None,
            qmoe: Optional[Tuple[int, int]] = None):
    height, width = size
    dtype = torch.float16 if fp16 else torch.float32
    if fp16:
        model = copy.deepcopy(model).half()  # leave the caller's model in float32
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    use_external = external_data if external_data is not None else weight_bytes > external_data_threshold
    example = torch.randn(2, 3, height, width, dtype=dtype)
    batch = torch.export.Dim('batch', min=1, max=4096)
    graph, output_names, layers = model, ['logits'], []
    if expose_routing or debug_output is not None:
        graph = RoutingProbe(model).eval()
        layers = graph.layer_names(example)
        if not layers:
            raise OnnxExportError(f'{type(model).__name__} has no MoE layer: there is no routing to expose')
        soft = soft_moe_layers(model)
        if soft:
            raise OnnxExportError(f'{next(iter(soft))} is a Soft MoE layer: its slots mix all tokens, there is no slot routing '
                                  f'to expose; accepted: expert_choice / token_choice layers (check Soft MoE end to end)')
        output_names += [f'{n}/{kind}' for n in layers for kind in ROUTING_KINDS]
    kernels, translations = contextlib.nullcontext(), None
    if qmoe is not None:
        from .fused_experts import qmoe_kernels, qmoe_translations
        kernels, translations = qmoe_kernels(model, *qmoe), qmoe_translations()
    try:
        with _quiet_exporter_logs(), kernels:
            program = torch.onnx.export(
                graph, (example,), dynamo=True, dynamic_shapes=({0: batch},), input_names=['images'],
                output_names=output_names, opset_version=opset, verbose=False,
                custom_translation_table=translations)
    except Exception as e:
        raise OnnxExportError(f'{type(model).__name__} could not be exported to ONNX: {type(e).__name__}: '
                              f'{str(e).splitlines()[0] if str(e) else e}') from e
    metadata = dict(model_metadata(model, (height, width)), expert_kernel='qmoe' if qmoe else 'matmul')
    if qmoe:
        from onnx_ir.passes.common import RemoveUnusedNodesPass
        RemoveUnusedNodesPass()(program.model)  # the dequantized expert weights fed only the PyTorch reference
        metadata.update(expert_bits=qmoe[0], expert_block_size=qmoe[1] or None, expert_gelu='tanh')
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    if layers:
        program.model.metadata_props[ROUTING_OUTPUTS_KEY] = json.dumps(layers)
        for weight in list(program.model.graph.initializers.values()):  # the model's names, not RoutingProbe's
            if weight.name.startswith('model.'):
                weight.name = weight.name[len('model.'):]
    if debug_output is not None:
        _save(program, debug_output, use_external)
        _keep_only_the_logits(program.model)
    _save(program, output, use_external)
    if check:
        onnx.checker.check_model(str(output), full_check=True)
    _logger.debug(f'exported {output} ({weight_bytes / 1e6:.0f} MB of weights, external data: {use_external})')
    return output


def _save(program, output: Path, external_data: bool) -> None:
    for stale in (output, output.with_name(output.name + '.data')):
        stale.unlink(missing_ok=True)
    program.save(str(output), external_data=external_data)


def _keep_only_the_logits(model) -> None:
    """A debug export's graph (onnx_ir) made the deployed one: the logits its only output, the nodes and weights
    that fed only the routing outputs removed, the routing metadata dropped."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    logits = model.graph.outputs[0]
    model.graph.outputs.clear()
    model.graph.outputs.append(logits)
    model.metadata_props.pop(ROUTING_OUTPUTS_KEY, None)
    RemoveUnusedNodesPass()(model)
