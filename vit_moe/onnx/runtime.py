""" ONNX Runtime inference for exported models, with timm's preprocessing and torchmetrics evaluation.

Providers are chosen up front from what is installed and usable here, so that no failed-provider errors are
printed: CUDA (when onnxruntime-gpu and a GPU are both present), then the CPU; TensorRT first only when asked for
(`tensorrt=True`) and its libraries load (onnxruntime-gpu lists the TensorRT provider whether or not TensorRT is
installed). On CUDA, torch tensors already on the GPU are bound in place (IO binding: no copy through the host),
after torch's stream has finished writing them.
"""
import ctypes.util
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors
import torch
import torch.nn.functional as F

from ..data import ImageFolderDataset
from .int8_target import int8_target_warning
from .metadata import INT8_KEY, METADATA_KEY

__all__ = ['default_providers', 'session_options', 'OnnxClassifier', 'evaluate_onnx', 'GPU_PROVIDERS']

_logger = logging.getLogger(__name__)
_ACCEPTED = 'an .onnx file written by vit_moe.onnx.export_onnx / export/onnx_export.py'
_NOT_A_MODEL = (ort_errors.InvalidProtobuf, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.NoModel)


def _gpu_present() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a CUDA build of torch without a driver
        return False


GPU_PROVIDERS = ('TensorrtExecutionProvider', 'CUDAExecutionProvider')  # in order of preference
OPTIMIZATION_LEVELS = {
    'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, 'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _tensorrt_loadable() -> bool:
    """TensorRT's runtime library is installed (the `tensorrt` wheels, or libnvinfer on the library path)."""
    return importlib.util.find_spec('tensorrt_libs') is not None or ctypes.util.find_library('nvinfer') is not None


def default_providers(tensorrt: bool = False) -> List[str]:
    """The usable providers in order of preference: [TensorRT (when asked for and loadable),] CUDA (with a GPU
    present), then the CPU."""
    available = ort.get_available_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available
           and (p != 'TensorrtExecutionProvider' or tensorrt and _tensorrt_loadable())]
    return (gpu if gpu and _gpu_present() else []) + ['CPUExecutionProvider']


def session_options(threads: Optional[int] = None, optimization: str = 'all') -> 'ort.SessionOptions':
    """ONNX Runtime session options: intra-op threads and the graph optimisation level, errors-only logging."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f'optimization={optimization!r} is not valid; accepted: {", ".join(OPTIMIZATION_LEVELS)}')
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads:
        options.intra_op_num_threads = threads
    return options


def _load_session(path: Path, options: 'ort.SessionOptions', providers: List[str]) -> 'ort.InferenceSession':
    """An InferenceSession; a file ONNX Runtime cannot parse as a model is a ValueError naming it."""
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except _NOT_A_MODEL as e:
        reason = str(e).split(' failed:', 1)[-1].strip()  # drop '[ONNXRuntimeError] : 7 : ... Load model from X'
        raise ValueError(f'{str(path)!r} is not an ONNX model; expected {_ACCEPTED} '
                         f'(ONNX Runtime: {reason[:200]})') from e


class OnnxClassifier:
    """An exported classifier: `clf(batch)` -> logits; `clf.transform` is timm's eval transform for it.

    Args:
        path: .onnx file written by `vit_moe.onnx.export_onnx` (its metadata holds the timm data config).
        providers: ONNX Runtime providers in order of preference; default `default_providers()` (CUDA, CPU: those
            usable here; TensorRT only when given here or via `default_providers(tensorrt=True)`).
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
        optimization: graph optimisation level: 'all' (default), 'extended', 'basic' or 'disable'.
        io_binding: bind CUDA torch inputs and outputs in place (default: on when the CUDA provider runs).
        device_id: the GPU the CUDA / TensorRT providers run on (default: torch's current device); CUDA inputs on
            another GPU are copied to it.
    """

    def __init__(self, path: Union[str, Path], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, optimization: str = 'all', io_binding: Optional[bool] = None,
                 device_id: Optional[int] = None):
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f'ONNX model {str(path)!r} is a folder; expected {_ACCEPTED}')
        if not path.is_file():
            raise FileNotFoundError(f'ONNX model {str(path)!r} does not exist')
        options = session_options(threads, optimization)
        providers = list(providers or default_providers())
        if device_id is None:
            device_id = torch.cuda.current_device() if any(p in GPU_PROVIDERS for p in providers) and _gpu_present() \
                else 0
        self.device_id = device_id
        providers = [(p, {'device_id': device_id}) if p in GPU_PROVIDERS else p for p in providers]
        self.session = _load_session(path, options, providers)
        on_cuda = self.session.get_providers()[0] in GPU_PROVIDERS
        self.io_binding = on_cuda if io_binding is None else (io_binding and on_cuda)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f'ONNX model {str(path)!r} has no {METADATA_KEY!r} metadata (timm data config); '
                             f'expected {_ACCEPTED}')
        self.data_config: Dict[str, Any] = json.loads(meta[METADATA_KEY])
        self.int8: Optional[Dict[str, Any]] = json.loads(meta[INT8_KEY]) if INT8_KEY in meta else None
        warning = int8_target_warning(self.int8) if self.session.get_providers()[0] == 'CPUExecutionProvider' else None
        if warning:
            _logger.warning(f'{path}: {warning}')
        self.input = self.session.get_inputs()[0]
        self.dtype = np.float16 if 'float16' in self.input.type else np.float32
        self._transform = None

    @property
    def providers(self) -> List[str]:
        return self.session.get_providers()

    @property
    def transform(self):
        """timm's evaluation transform (resize, center crop, normalise) for this model."""
        if self._transform is None:
            from timm.data import create_transform
            keys = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
            self._transform = create_transform(**{k: self.data_config[k] for k in keys if k in self.data_config})
        return self._transform

    def __call__(self, images: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Logits [B, classes] for preprocessed images [B, 3, H, W]."""
        if self.io_binding and isinstance(images, torch.Tensor) and images.is_cuda:
            return self._run_bound(images)
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        return self.session.run(None, {self.input.name: np.ascontiguousarray(images, dtype=self.dtype)})[0]

    def _run_bound(self, images: torch.Tensor) -> np.ndarray:
        """CUDA input bound in place (IO binding), output left on the session's GPU then copied once."""
        device = torch.device('cuda', self.device_id)
        images = images.detach().to(device, torch.float16 if self.dtype == np.float16 else torch.float32)
        images = images.contiguous()
        # ONNX Runtime reads the buffer on its own stream: torch's pending work on it must be done first
        torch.cuda.current_stream(device).synchronize()
        binding = self.session.io_binding()
        binding.bind_input(self.input.name, 'cuda', self.device_id, self.dtype, tuple(images.shape),
                           images.data_ptr())
        binding.bind_output(self.session.get_outputs()[0].name, 'cuda', self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict(self, pil_images: Sequence) -> np.ndarray:
        """Logits for PIL images, preprocessed as timm does for this model."""
        return self(torch.stack([self.transform(img.convert('RGB')) for img in pil_images]))


def evaluate_onnx(onnx_path: Union[str, Path], data_dir: str, split: str = 'val', batch_size: int = 64,
                  num_workers: int = 2, providers: Optional[Sequence[str]] = None,
                  reference: Optional[torch.nn.Module] = None, max_images: Optional[int] = None) -> Dict[str, Any]:
    """top-1 / top-5 (torchmetrics), loss and images/s of an exported model on `data_dir/split`.

    An unreadable image is left out of the metrics (never replaced by another), counted in `num_excluded` and
    named in `excluded`, as in PyTorch evaluation. With `reference` (the PyTorch model it was exported from), the
    same preprocessed images also go through it: `reference_top1` and `top1_agreement` (fraction of images on
    which both predict the same class) are added. `max_images`: at most this many images, evenly spaced over the
    split (every class represented in a class-sorted folder).
    """
    from torchmetrics.classification import MulticlassAccuracy  # part of the [onnx] and [train] extras

    classifier = OnnxClassifier(onnx_path, providers=providers)
    labels = classifier.data_config.get('label_names')
    dataset = ImageFolderDataset(data_dir, split, class_map={n: i for i, n in enumerate(labels)} if labels else None,
                                 transform=classifier.transform, substitute_unreadable=False)
    num_classes = classifier.data_config.get('num_classes') or len(dataset.class_to_idx)
    subset = dataset
    if max_images is not None and max_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, np.linspace(0, len(dataset) - 1, max_images).round().astype(int).tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    top1 = MulticlassAccuracy(num_classes, top_k=1, average='micro')
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average='micro')
    loss_sum, count, excluded, elapsed, agree, reference_correct = 0.0, 0, 0, 0.0, 0, 0
    for images, targets, readable in loader:
        start = time.perf_counter()
        logits = torch.from_numpy(classifier(images).astype(np.float32))
        elapsed += time.perf_counter() - start
        excluded += int((~readable).sum())
        logits, targets = logits[readable], targets[readable]
        if reference is not None:
            param = next(reference.parameters())
            with torch.no_grad():
                expected = reference(images[readable].to(param.device, param.dtype)).float().cpu()
            agree += int((expected.argmax(-1) == logits.argmax(-1)).sum())
            reference_correct += int((expected.argmax(-1) == targets).sum())
        top1.update(logits, targets)
        top5.update(logits, targets)
        loss_sum += float(F.cross_entropy(logits, targets, reduction='sum'))
        count += len(targets)
    extra = {} if reference is None else dict(reference_top1=100.0 * reference_correct / max(1, count),
                                              top1_agreement=agree / max(1, count))
    return dict(top1=float(top1.compute()) * 100, top5=float(top5.compute()) * 100, loss=loss_sum / max(1, count),
                **extra,
                num_samples=count, num_excluded=excluded, excluded=dataset.skipped,
                images_per_s=(count + excluded) / elapsed if elapsed else float('nan'),
                providers=classifier.providers, onnx=str(onnx_path), split=str(dataset.reader.root))
