""" Which int8 weight range suits the CPU an int8 model will run on.

ONNX Runtime's dynamic int8 MatMul multiplies uint8 activations by int8 weights. On x86 CPUs with VNNI
(AVX-512 VNNI: Intel Cascade Lake+, AMD Zen 4+; AVX-VNNI: Intel Alder Lake+) the products are summed in int32.
Without VNNI (AVX2 only: older Intel, AMD Zen 1-3) the kernel uses `vpmaddubsw`, which adds pairs of products in
int16 *with saturation*: 255 x 127 x 2 = 64770 overflows 32767 and the sum is clipped. ONNX Runtime's quantization
docs recommend `reduce_range` (7-bit weights, [-64, 64]: 255 x 64 x 2 = 32640 fits) for those CPUs. Measured on a
trained 16-expert model, 1,000 real images (issue 16): on an AVX2-only CPU full-range weights gave 98.10 % top-1
agreement with fp32 PyTorch, reduced-range 99.30 %; on a VNNI CPU full range is exact in int32 and reduced range
only doubles the weight rounding error. ARM CPUs (NEON dot products) sum in int32 too.

Targets: 'vnni' (full range; also right for ARM), 'avx2' (reduced range; right for every x86 CPU, slightly less
accurate on VNNI ones), 'auto' (this machine's CPU, read with CPUID through torch.cpu.get_capabilities, or from
/proc/cpuinfo; an x86 CPU whose flags cannot be read is treated as 'avx2', the choice that is safe everywhere).
"""
import platform
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ['INT8_TARGETS', 'cpu_features', 'cpu_description', 'has_vnni', 'resolve_int8_target',
           'int8_target_warning']

INT8_TARGETS = ('auto', 'vnni', 'avx2')
_VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')
_X86 = ('x86_64', 'amd64', 'i386', 'i686', 'x86')
Features = Mapping[str, Any]


def _proc_cpuinfo(path: str = '/proc/cpuinfo') -> Dict[str, Any]:
    """Features in the layout of torch.cpu.get_capabilities() from Linux's /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path(path).read_text(errors='replace')
    except OSError:
        return {}
    features: Dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(':')
        key = key.strip()
        if key == 'model name' and 'cpu_name' not in features:
            features['cpu_name'] = value.strip()
        elif key == 'flags' and 'avx2' not in features:
            features.update({flag: True for flag in value.split()}, avx2='avx2' in value.split())
    return features


def cpu_features() -> Dict[str, Any]:
    """This CPU's name, architecture and instruction-set flags, read with CPUID (torch.cpu.get_capabilities, which
    sees what the CPU really offers, also in a VM or an emulator) or, with an older torch, /proc/cpuinfo."""
    try:
        from torch.cpu import get_capabilities
        features = dict(get_capabilities())
    except (ImportError, RuntimeError):
        features = _proc_cpuinfo()
    features.setdefault('architecture', platform.machine())
    return features


def _is_x86(features: Features) -> bool:
    return str(features.get('architecture') or platform.machine()).lower() in _X86


def has_vnni(features: Optional[Features] = None) -> Optional[bool]:
    """True / False for an x86 CPU with / without VNNI, None when unknown (no flags to read); True for other
    architectures (their int8 dot products do not saturate)."""
    features = cpu_features() if features is None else features
    if not _is_x86(features):
        return True
    if 'avx2' not in features:
        return None
    return any(features.get(flag) for flag in _VNNI_FLAGS)


def cpu_description(features: Optional[Features] = None) -> str:
    """e.g. 'AMD EPYC (x86_64, avx512_vnni)' or 'Intel(R) Xeon(R) ... (x86_64, AVX2, no VNNI)'."""
    features = cpu_features() if features is None else features
    name = features.get('cpu_name') or platform.processor() or 'unknown CPU'
    machine = features.get('architecture') or platform.machine()
    if not _is_x86(features):
        return f'{name} ({machine})'
    vnni = has_vnni(features)
    if vnni is None:
        return f'{name} ({machine}, flags unknown)'
    if vnni:
        return f'{name} ({machine}, {", ".join(f for f in _VNNI_FLAGS if features.get(f))})'
    return f'{name} ({machine}, {"AVX2" if features.get("avx2") else "no AVX2"}, no VNNI)'


def resolve_int8_target(target: str = 'auto', features: Optional[Features] = None) -> Dict[str, object]:
    """{'target': 'vnni' | 'avx2', 'reduce_range': bool, 'chosen': how} for `target` ('auto': this CPU)."""
    if target not in INT8_TARGETS:
        raise ValueError(f'int8 target {target!r} is not valid; accepted: {", ".join(INT8_TARGETS)} (auto: the CPU '
                         f'exporting; vnni: x86 CPUs with AVX-512 VNNI / AVX-VNNI, and ARM; avx2: any x86 CPU)')
    if target == 'auto':
        features = cpu_features() if features is None else features
        resolved = 'vnni' if has_vnni(features) else 'avx2'
        chosen = f'detected: {cpu_description(features)}'
    else:
        resolved, chosen = target, 'given'
    return dict(target=resolved, reduce_range=resolved == 'avx2', chosen=chosen)


def int8_target_warning(saved: Optional[Mapping[str, object]], features: Optional[Features] = None) -> Optional[str]:
    """A warning when a full-range int8 file (target 'vnni') runs on an x86 CPU without VNNI, else None."""
    if not saved or saved.get('target') != 'vnni':
        return None
    features = cpu_features() if features is None else features
    if has_vnni(features) is not False:
        return None
    return (f'this int8 model was quantized for CPUs with VNNI (full-range weights), but this CPU, '
            f'{cpu_description(features)}, has none: its int8 kernel saturates and accuracy drops (issue-16 '
            f'measurement: 98.1 % instead of 99.3 % top-1 agreement with fp32); re-export it with --int8-target avx2 '
            f'(or auto on this machine)')
