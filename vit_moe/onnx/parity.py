""" Parity of an exported model with PyTorch: ONNX Runtime and the model on the same fresh random inputs. """
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from .runtime import OnnxClassifier

__all__ = ['check_onnx_parity']


def check_onnx_parity(
        model: torch.nn.Module,
        onnx_path: Union[str, Path],
        batch_sizes: Sequence[int] = (1, 3, 8),
        seed: int = 1234,
        providers: Optional[Sequence[str]] = None,
) -> Dict[int, Dict[str, float]]:
    """Max |logit difference| and top-1 agreement between PyTorch and ONNX Runtime on fresh random inputs.

    The inputs differ from the example used for export (another seed, other batch sizes).
    """
    classifier = OnnxClassifier(onnx_path, providers=providers)
    param = next(model.parameters())
    dtype, device, was_training = param.dtype, param.device, model.training
    model.eval()
    height, width = classifier.data_config['input_size'][1:]
    generator = torch.Generator().manual_seed(seed)
    results = {}
    try:
        for batch in batch_sizes:
            x = torch.randn(batch, 3, height, width, generator=generator).to(dtype)
            with torch.no_grad():
                expected = model(x.to(device)).float().cpu().numpy()
            got = classifier(x.numpy()).astype(np.float32)
            results[batch] = dict(
                max_abs_diff=float(np.abs(got - expected).max()), max_abs_logit=float(np.abs(expected).max()),
                top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()))
    finally:
        model.train(was_training)
    return results
