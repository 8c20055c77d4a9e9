""" Shared plumbing of the command-line front ends (train_scripts/, export/): one-line errors, quiet logs.

    def main(argv=None) -> int:
        parser = _cli.ArgumentParser(description=__doc__)   # adds --debug and --verbose
        args = parser.parse_args(argv)
        _cli.setup_logging(args.verbose)
        ...

    if __name__ == '__main__':
        _cli.run_and_exit(main)

Exit codes:

* 0: success.
* 1: a check the command ran failed (e.g. onnx_export.py parity), or an unexpected error: that is a bug, and
  its full traceback is printed as Python does.
* 2: a user mistake: the command line, a config key or value, a path, an input file, a missing extra. One line
  on stderr, `prog: error: message`, where the message names the bad value and what is accepted; under a
  distributed launcher, printed by rank 0 only (every process exits 2).
* 130: interrupted by Ctrl-C (KeyboardInterrupt), quietly. train.py saves a checkpoint on SIGINT / SIGTERM and
  exits with 128 + the signal number itself.

User mistakes are the package's own exception types (ConfigError, CheckpointMismatchError, BadImageError,
OnnxExportError, ...), ValueError, FileNotFoundError and the other path errors, and ImportErrors that name an
extra to install. `--debug` (or the environment variable VIT_MOE_DEBUG=1) shows their traceback instead.

Logging: `vit_moe` loggers at INFO (the trainer's one-line progress), everything else at WARNING, and no
deprecation / future warnings (unless -W or PYTHONWARNINGS is given); `--verbose` puts everything at INFO,
including loggers that quiet themselves unless a level is set on them (the ONNX exporter's).

Leaving a process that ran a torch.distributed process group (`leave`): Gloo's worker threads release the tensors of
a finished collective after the Python side has seen it complete. When that release comes after the interpreter has
begun finalizing, taking the GIL makes the thread exit through a forced unwind, which a noexcept C++ destructor turns
into `std::terminate` ("terminate called without an active exception", SIGABRT): a job that finished its work ends
with exit code -6. `destroy_process_group` does not prevent it where other objects keep the group alive (FSDP2's
device mesh, held by torch's DTensor caches). So a process started by a launcher ends as multiprocessing's children
do: atexit handlers, flushed output, then `os._exit`, with no interpreter finalization for a C++ thread to race.

This module imports only the standard library.
"""
import argparse
import atexit
import contextlib
import difflib
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Callable, NoReturn, Optional, Sequence

__all__ = ['ArgumentParser', 'UsageError', 'add_common_flags', 'pop_common_flags', 'raise_usage_errors', 'mapping_type',
           'name_type', 'setup_logging', 'run', 'run_and_exit', 'leave', 'debug_requested', 'is_user_error',
           'one_line', 'take_num_classes', 'is_main_process', 'capacity_type']

DEBUG_ENV = 'VIT_MOE_DEBUG'
LOG_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'
# vit_moe.onnx.export.EXPORTER_LOGGERS (not imported here): quiet during an export unless a level is set on them
SELF_QUIETING_LOGGERS = ('torch.onnx', 'onnxscript', 'onnx_ir')
# warnings that are not the user's business by default: torch.compile imports torch.utils.cpp_extension, which warns
# 'No CUDA runtime is found, using CUDA_HOME=...' on any machine with a CUDA toolkit but no GPU
QUIET_UNLESS_VERBOSE = ('torch.utils.cpp_extension',)
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class UsageError(Exception):
    """A command line that cannot be parsed (argparse's error, raised instead of printing the usage)."""


def _suggest(parser: argparse.ArgumentParser, message: str) -> str:
    """Append close matches for unrecognized options, e.g. '--lr-rate' -> '--lr'."""
    if not message.startswith('unrecognized arguments:'):
        return message
    known = list(parser._option_string_actions)
    hints = []
    for token in message.split(':', 1)[1].split():
        hints += difflib.get_close_matches(token.split('=')[0], known, n=1) if token.startswith('--') else []
    return message + (f' (did you mean {", ".join(hints)}?)' if hints else '') + '; see --help'


def _raise_usage_error(parser: argparse.ArgumentParser, message: str):
    raise UsageError(_suggest(parser, message))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with --debug / --verbose, a raw description, and errors raised as UsageError (one line)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        add_common_flags(self)

    error = _raise_usage_error


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--debug (tracebacks for user mistakes too) and --verbose (every library's INFO logs and warnings)."""
    parser.add_argument('--debug', action='store_true',
                        help=f'show the full traceback of an error (also: {DEBUG_ENV}=1)')
    parser.add_argument('--verbose', action='store_true', help="show other libraries' INFO logs and warnings")


def pop_common_flags(argv: Optional[Sequence[str]] = None):
    """(argv without --debug / --verbose, debug, verbose), for parsers built elsewhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in argv if a not in ('--debug', '--verbose')]
    return rest, '--debug' in argv, '--verbose' in argv


@contextlib.contextmanager
def raise_usage_errors():
    """Every argparse parser used inside raises UsageError instead of printing the usage (for parsers built
    elsewhere, e.g. vit_moe.training.parse_train_args)."""
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _raise_usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def mapping_type(load: Callable[[str], Any], example: str = '{num_experts: 8}') -> Callable[[str], Optional[dict]]:
    """argparse type: text -> mapping via `load` (e.g. yaml.safe_load); a bad text is a one-line usage error."""
    def mapping(text: str) -> Optional[dict]:
        try:
            value = load(text)
        except Exception:
            value = text
        if value is not None and not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f'{text!r} is not a YAML mapping; expected e.g. {example!r}')
        return value
    return mapping


def capacity_type(load: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type for --capacity-factor: a number > 0 (every MoE layer) or a mapping of MoE layer -> number."""
    def capacity(text: str):
        try:
            value = load(text)
        except Exception:
            value = text
        numbers = value.values() if isinstance(value, dict) else [value]
        if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in numbers):
            raise argparse.ArgumentTypeError(f'{text!r} is not a capacity factor; expected a number > 0 (every MoE '
                                             f'layer) or a mapping of MoE layer to number, e.g. '
                                             f"'{{blocks.11.mlp: 1.0}}'")
        return value
    return capacity


def name_type(is_known: Callable[[str], bool], known: Callable[[], Sequence[str]], what: str) -> Callable[[str], str]:
    """argparse type: a name `is_known` accepts; else a one-line usage error with the closest `known()` names."""
    def name(text: str) -> str:
        if is_known(text):
            return text
        close = difflib.get_close_matches(text, known(), n=3, cutoff=0.6)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        raise argparse.ArgumentTypeError(f'{text!r} is not {what}{hint}')
    return name


def take_num_classes(model_kwargs: Optional[dict], num_classes: Optional[int], flag: str = '--num-classes'):
    """(model_kwargs without num_classes, num_classes): the class count may come as `flag` or inside --model-kwargs,
    but not twice with different values (a one-line usage error naming both)."""
    kwargs = dict(model_kwargs or {})
    given = kwargs.pop('num_classes', None)
    if given is not None and num_classes is not None and given != num_classes:
        raise UsageError(f'num_classes given twice: {flag} {num_classes} and --model-kwargs num_classes={given}; '
                         f'give it once ({flag})')
    return kwargs, num_classes if num_classes is not None else given


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torch.distributed.run / accelerate launch set RANK), or a lone process."""
    rank = os.environ.get('RANK', '0')
    return not rank.isdigit() or int(rank) == 0


def setup_logging(verbose: bool = False, fmt: str = LOG_FORMAT) -> None:
    """`vit_moe` at INFO and the rest at WARNING, deprecation warnings off; everything at INFO with `verbose`."""
    logging.basicConfig(format=fmt)  # a no-op where handlers exist (e.g. under pytest)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger('vit_moe').setLevel(logging.INFO)
    for name in QUIET_UNLESS_VERBOSE:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if verbose:
        for name in SELF_QUIETING_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    elif not sys.warnoptions:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings('ignore', category=category)


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """--debug in `argv` or VIT_MOE_DEBUG set to anything but '' / '0'."""
    argv = sys.argv[1:] if argv is None else argv
    return '--debug' in argv or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def is_user_error(error: BaseException) -> bool:
    """The package's own error types, ValueError, path errors, and ImportErrors naming an extra."""
    if isinstance(error, UsageError) or type(error).__module__.split('.')[0] == 'vit_moe':
        return True
    if isinstance(error, ImportError):
        return 'pip install' in str(error)
    return isinstance(error, (ValueError,) + _PATH_ERRORS)


def one_line(error: BaseException) -> str:
    """The error's message on one line (its type name when it has none)."""
    return ' '.join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run(main: Callable[[Sequence[str]], Optional[int]], argv: Optional[Sequence[str]] = None,
        prog: Optional[str] = None) -> int:
    """Call `main(argv)` and turn user mistakes into one line on stderr and exit code 2 (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    debug = debug_requested(argv)
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        return 130
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        if is_main_process():  # under a launcher every process refuses alike: one line, by rank 0
            print(f'{prog}: error: {one_line(e)}', file=sys.stderr)
        return 2


def _in_process_group_launch() -> bool:
    """Started by a distributed launcher (torch.distributed.run / accelerate launch set WORLD_SIZE), or a process group
    is up in this process."""
    distributed = sys.modules.get('torch.distributed')
    initialized = distributed is not None and distributed.is_available() and distributed.is_initialized()
    return 'WORLD_SIZE' in os.environ or initialized


def leave(code: int) -> NoReturn:
    """Exit with `code`. A process of a distributed launch runs its atexit handlers, flushes its output and ends with
    `os._exit`: no interpreter finalization for Gloo's threads to race (see the module doc); any other exits as usual."""
    if not _in_process_group_launch():
        sys.exit(code)
    try:
        atexit._run_exitfuncs()  # logging.shutdown, trackers, compile workers: as a normal exit would run them
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def run_and_exit(main: Callable[[Sequence[str]], Optional[int]]) -> NoReturn:
    """A front end's entry point: `run(main)` on the command line's arguments, then `leave` with its exit code (an
    unexpected error: its traceback and 1, as Python would; `sys.exit` inside `main` keeps its code)."""
    try:
        code = run(main)
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    leave(code)
