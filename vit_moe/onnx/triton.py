""" A Triton Inference Server model repository for an exported file (`export/onnx_export.py --triton-repo DIR`).

    DIR/<name>/config.pbtxt        platform onnxruntime_onnx, max_batch_size, dynamic batching, inputs / outputs,
    DIR/<name>/1/model.onnx        instance group, and for GPU files the TensorRT accelerator (fp16 for fp16 files)
    DIR/<name>/1/model.onnx.data   (external weights, when the file has them)

Dynamic batching is exact for float32 / float16 files of these models: routing groups are images, so an image's
logits never depend on which requests share its batch (the capacity is per image, and no token competes with another
image's tokens); Triton may batch any requests together without changing any answer. int8 files are not: ONNX
Runtime's dynamic quantization takes one activation scale per tensor over the whole batch, so an image's logits move
with its batch-mates (within 5 % of the largest logit in tests/test_deployment.py; the dense int8 model alike).

`triton_model_config(text)` parses a config.pbtxt with Triton's own protobuf (the `tritonclient` package, extra
`[serve]`), without importing its gRPC client.
"""
import importlib.util
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import onnx

__all__ = ['write_triton_repository', 'triton_config_text', 'triton_model_config']

_DTYPES = {onnx.TensorProto.FLOAT: 'TYPE_FP32', onnx.TensorProto.FLOAT16: 'TYPE_FP16'}


def _io(tensor: onnx.ValueInfoProto) -> dict:
    kind = tensor.type.tensor_type
    if kind.elem_type not in _DTYPES:
        raise ValueError(f'{tensor.name}: element type {kind.elem_type} has no Triton type here; accepted: float32, '
                         f'float16')
    dims = [d.dim_value if d.HasField('dim_value') else -1 for d in kind.shape.dim][1:]  # without the batch axis
    return dict(name=tensor.name, data_type=_DTYPES[kind.elem_type], dims=dims)


def triton_config_text(onnx_path: Union[str, Path], name: str, max_batch_size: int = 32,
                       preferred_batch_sizes: Sequence[int] = (4, 8, 16, 32), max_queue_delay_us: int = 500,
                       instances: int = 1, gpu: bool = False, threads: Optional[int] = None) -> str:
    """The config.pbtxt for `onnx_path` (its input and output shapes read from the file)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = [_io(t) for t in model.graph.input]
    outputs = [_io(t) for t in model.graph.output]
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size={max_batch_size} is not valid; expected an integer >= 1')
    preferred = [b for b in preferred_batch_sizes if b <= max_batch_size]

    def tensors(kind: str, items) -> str:
        return f'{kind} [\n' + ',\n'.join(
            f'  {{ name: "{t["name"]}" data_type: {t["data_type"]} dims: [ {", ".join(map(str, t["dims"]))} ] }}'
            for t in items) + '\n]'

    fp16 = any(t['data_type'] == 'TYPE_FP16' for t in inputs)
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f'max_batch_size: {max_batch_size}',
             tensors('input', inputs), tensors('output', outputs),
             'dynamic_batching {\n  preferred_batch_size: [ ' + ', '.join(map(str, preferred)) + ' ]\n'
             f'  max_queue_delay_microseconds: {max_queue_delay_us}\n}}',
             f'instance_group [ {{ count: {instances} kind: {"KIND_GPU" if gpu else "KIND_CPU"} }} ]']
    if gpu:
        precision = 'FP16' if fp16 else 'FP32'
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                     f'parameters {{ key: "precision_mode" value: "{precision}" }} }} ] }} }}')
    if threads:
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}')
    return '\n'.join(lines) + '\n'


def write_triton_repository(onnx_path: Union[str, Path], repository: Union[str, Path], name: Optional[str] = None,
                            **config: Any) -> Path:
    """Copy `onnx_path` (and its external data) into `repository/<name>/1/` beside a config.pbtxt; returns the model
    folder. `config`: `triton_config_text`'s options. The config is checked with Triton's protobuf when tritonclient
    is installed."""
    onnx_path = Path(onnx_path)
    name = name or onnx_path.stem
    folder = Path(repository) / name
    version = folder / '1'
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, version / 'model.onnx')
    data = onnx_path.with_name(onnx_path.name + '.data')
    if data.is_file():  # the graph names its data file: the same name beside model.onnx
        for location in _external_locations(onnx_path):
            shutil.copyfile(onnx_path.parent / location, version / location)
    text = triton_config_text(onnx_path, name, **config)
    try:
        triton_model_config(text)
    except ImportError:
        pass  # no tritonclient: written unchecked
    (folder / 'config.pbtxt').write_text(text)
    return folder


def _external_locations(path: Path) -> set:
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
            if entry.key == 'location'}


def _model_config_pb2():
    """tritonclient's generated model_config_pb2, loaded by path: `tritonclient.grpc`'s package would import grpc."""
    import tritonclient
    path = Path(tritonclient.__file__).parent / 'grpc' / 'model_config_pb2.py'
    spec = importlib.util.spec_from_file_location('vit_moe_triton_model_config_pb2', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def triton_model_config(text: str):
    """`text` parsed as Triton's ModelConfig (a google.protobuf.text_format error names what does not parse)."""
    from google.protobuf import text_format
    return text_format.Parse(text, _model_config_pb2().ModelConfig())
