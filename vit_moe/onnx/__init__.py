"""ONNX export (static capacity), ONNX Runtime inference and evaluation, benchmarks (`pip install "vit-moe[onnx]"`)."""
from .._extras import require_extra

require_extra('onnx', ('onnx', 'onnxscript', 'onnxruntime'), 'vit_moe.onnx')

from .benchmark import benchmark_inference, format_benchmark  # noqa: E402
from .export import DEFAULT_EXTERNAL_DATA_THRESHOLD, OnnxExportError, export_onnx  # noqa: E402
from .metadata import METADATA_KEY, read_metadata  # noqa: E402
from .parity import DEFAULT_TIE_RTOL, check_onnx_parity, compare_slots, format_parity  # noqa: E402
from .quantize import QUANTIZE_MODES, float_expert_weights, optimize_onnx, quantize_onnx  # noqa: E402
from .runtime import OnnxClassifier, default_providers, evaluate_onnx  # noqa: E402
