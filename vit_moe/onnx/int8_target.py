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
accurate on VNNI ones), 'auto' (this machine's CPU, read from /proc/cpuinfo on Linux; an x86 CPU whose flags cannot
be read is treated as 'avx2', the choice that is safe everywhere).
"""
import platform
from pathlib import Path
from typing import Dict, Optional

__all__ = ['INT8_TARGETS', 'cpu_description', 'has_vnni', 'resolve_int8_target', 'int8_target_warning']

INT8_TARGETS = ('auto', 'vnni', 'avx2')
_VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')
_X86 = ('x86_64', 'amd64', 'i386', 'i686', 'x86')


def _cpuinfo(path: str = '/proc/cpuinfo') -> Dict[str, str]:
    """'model name' and 'flags' of the first CPU in /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path(path).read_text(errors='replace')
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        key, _, value = line.partition(':')
        key = key.strip()
        if key in ('model name', 'flags', 'Features') and key not in info:
            info[key] = value.strip()
    return info


def _is_x86(machine: Optional[str] = None) -> bool:
    return (machine or platform.machine()).lower() in _X86


def has_vnni(cpuinfo: Optional[Dict[str, str]] = None, machine: Optional[str] = None) -> Optional[bool]:
    """True / False for an x86 CPU with / without VNNI, None when unknown (no flags to read); True for other
    architectures (their int8 dot products do not saturate)."""
    if not _is_x86(machine):
        return True
    info = _cpuinfo() if cpuinfo is None else cpuinfo
    if 'flags' not in info:
        return None
    flags = set(info['flags'].split())
    return any(f in flags for f in _VNNI_FLAGS)


def cpu_description(cpuinfo: Optional[Dict[str, str]] = None, machine: Optional[str] = None) -> str:
    """e.g. 'AMD EPYC (x86_64, avx512_vnni)' or 'Intel(R) Xeon(R) ... (x86_64, AVX2, no VNNI)'."""
    machine = machine or platform.machine()
    info = _cpuinfo() if cpuinfo is None else cpuinfo
    name = info.get('model name') or platform.processor() or 'unknown CPU'
    if not _is_x86(machine):
        return f'{name} ({machine})'
    flags = set(info.get('flags', '').split())
    if not flags:
        return f'{name} ({machine}, flags unknown)'
    vnni = [f for f in _VNNI_FLAGS if f in flags]
    if vnni:
        return f'{name} ({machine}, {", ".join(vnni)})'
    return f'{name} ({machine}, {"AVX2" if "avx2" in flags else "no AVX2"}, no VNNI)'


def resolve_int8_target(target: str = 'auto', cpuinfo: Optional[Dict[str, str]] = None,
                        machine: Optional[str] = None) -> Dict[str, object]:
    """{'target': 'vnni' | 'avx2', 'reduce_range': bool, 'chosen': how} for `target` ('auto': this CPU)."""
    if target not in INT8_TARGETS:
        raise ValueError(f'int8 target {target!r} is not valid; accepted: {", ".join(INT8_TARGETS)} (auto: the CPU '
                         f'exporting; vnni: x86 CPUs with AVX-512 VNNI / AVX-VNNI, and ARM; avx2: any x86 CPU)')
    if target == 'auto':
        vnni = has_vnni(cpuinfo, machine)
        resolved = 'vnni' if vnni else 'avx2'
        chosen = f'detected: {cpu_description(cpuinfo, machine)}'
    else:
        resolved, chosen = target, 'given'
    return dict(target=resolved, reduce_range=resolved == 'avx2', chosen=chosen)


def int8_target_warning(saved: Optional[Dict[str, object]], cpuinfo: Optional[Dict[str, str]] = None,
                        machine: Optional[str] = None) -> Optional[str]:
    """A warning when a full-range int8 file (target 'vnni') runs on an x86 CPU without VNNI, else None."""
    if not saved or saved.get('target') != 'vnni' or has_vnni(cpuinfo, machine) is not False:
        return None
    return (f'this int8 model was quantized for CPUs with VNNI (full-range weights), but this CPU, '
            f'{cpu_description(cpuinfo, machine)}, has none: its int8 kernel saturates and accuracy drops '
            f'(issue-16 measurement: 98.1 % instead of 99.3 % top-1 agreement with fp32); re-export with '
            f'--int8-target avx2 (or auto on this machine)')
