"""Command-line pieces shared by every subcommand: range-checked numbers and quiet output.

- A bad option is one line on stderr and exit 2 (`Parser`), like every other expected failure;
  `--help` shows the defaults.

- Numbers are checked by argparse itself (`int_in`, `float_in`), so an out-of-range value is a
  one-line usage error, exit 2, before any model is loaded or any file is written.
- A settings model (pydantic) can be the command line itself (`add_fields`, `from_args`): each
  field's type, default and description make its option and its `--help` line; `Arg` adds what a
  type cannot say (the range argparse checks, a metavar, a default from the environment).
- Progress bars are drawn only when stderr is a terminal; `--progress` / `--no-progress` force either.
- Third-party chatter (Python warnings from transformers/peft/torch, transformers' logging, hub
  download bars, llama.cpp's own log lines) stays off unless `-v` is given.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import types
import typing


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default (but not for flags or options without one)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in h:
            return h
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line (runtime.errors.UserError: exit 2), like every other
    expected failure, instead of a usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse prints no line (so no default) for an option without help text
        if "help" not in kwargs and kwargs.get("default") not in (None, False, argparse.SUPPRESS):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        from qwen_local.runtime.errors import UserError

        raise UserError(f"{message} (see {self.prog} --help)")


def int_in(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {span}, not {v}")
        return v
    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float | None = None, *, lo_open: bool = False):
    """argparse type: a finite number in [lo, hi], or (lo, hi] with lo_open."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        low_ok = v > lo if lo_open else v >= lo
        if not math.isfinite(v) or not low_ok or (hi is not None and v > hi):
            left = "(" if lo_open else "["
            span = f"in {left}{lo:g}, {hi:g}]" if hi is not None else (
                f"> {lo:g}" if lo_open else f">= {lo:g}")
            raise argparse.ArgumentTypeError(f"must be {span}, not {text}")
        return v
    parse.__name__ = "number"
    return parse


class Arg:
    """What the command line needs to know about a settings field beyond its type, default and
    description. The range is checked by argparse only: the model itself accepts values outside it
    (a test may set a timeout of 0 to force every local call to time out)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 metavar: str | None = None, env: str | None = None, required: bool = False,
                 cli: bool = True):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open
        self.metavar, self.env, self.required, self.cli = metavar, env, required, cli


def _base_type(annotation) -> tuple[type, list | None]:
    """(type argparse converts to, choices) for a field annotation: `X | None` is X, a Literal is
    its values' type with those values as the choices."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no single command-line type for {annotation}")
        return _base_type(inner[0])
    if origin is typing.Literal:
        values = list(typing.get_args(annotation))
        return type(values[0]), values
    return annotation, None


def add_fields(p: argparse.ArgumentParser, model) -> None:
    """One option per field of a pydantic model, in field order: `--field-name`, converted (and
    range-checked) by argparse, with the field's default and its description as the help. A bool
    field is a switch away from its default: `--no-field-name` when it is on by default."""
    for name, field in model.model_fields.items():
        arg = next((m for m in field.metadata if isinstance(m, Arg)), Arg())
        if not arg.cli:
            continue
        kind, choices = _base_type(field.annotation)
        kw: dict = {"default": os.environ.get(arg.env, field.default) if arg.env else field.default}
        if choices:
            kw["choices"] = choices
        elif kind is int:
            kw["type"] = int_in(arg.lo, arg.hi) if arg.lo is not None else int
        elif kind is float:
            kw["type"] = float_in(arg.lo, arg.hi, lo_open=arg.lo_open) if arg.lo is not None else float
        elif kind is bool:  # a switch that turns the default off: --no-x when on, --x when off
            kw["action"] = "store_false" if field.default else "store_true"
            kw["dest"] = name
        elif kind is not str:
            raise TypeError(f"{name}: no command-line form for {kind}")
        if arg.required:
            kw["required"] = True
        if arg.metavar:
            kw["metavar"] = arg.metavar
        if field.description:  # none: Parser shows the default alone
            kw["help"] = field.description
        flag = name.replace("_", "-")
        p.add_argument(("--no-" if kind is bool and field.default else "--") + flag, **kw)


def from_args(model, args: argparse.Namespace):
    """The model built from parsed options (the fields the command line has; the rest keep their
    defaults)."""
    return model(**{k: v for k, v in vars(args).items() if k in model.model_fields})


THREADS_HELP = "threads for llama.cpp and torch (default: the physical cores this process may use)"


def add_threads(p: argparse.ArgumentParser) -> None:
    """--threads, the same in every command (the default: runtime.llama.default_threads)."""
    p.add_argument("--threads", type=int_in(1, 1024), default=None, metavar="N", help=THREADS_HELP)


def add_output_flags(p: argparse.ArgumentParser, progress: bool = True) -> None:
    if progress:
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars on stderr (default: only when stderr is a terminal)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show third-party warnings and llama.cpp's own log")


def parse_quietly(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, bool]:
    """(args, progress) for a command with the output flags: parsed, and quiet unless -v."""
    args = parser.parse_args(argv)
    progress = progress_enabled(args.progress)
    quiet(args.verbose, progress)
    return args, progress


def progress_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(enabled: bool, **kw):
    """A tqdm bar on stderr that leaves no line behind (the one rule for every command's bars), or
    None when disabled. kw: tqdm's own (total, desc, unit, ...)."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **{"unit": "q", **kw})


def progress_wrap(desc: str, enabled: bool):
    """The same as a wrapper around an iterable of queries, or None."""
    return (lambda it: progress_bar(True, iterable=it, desc=desc)) if enabled else None


def quiet(verbose: bool = False, progress: bool = False) -> None:
    """Silence what other libraries print, unless verbose. Call once, before heavy imports run."""
    if verbose:
        os.environ["QWEN_LOCAL_LLAMA_LOG"] = "1"  # runtime.engine leaves llama.cpp's logging alone
        return
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the bench's worker processes too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub.utils import disable_progress_bars
        if not progress:
            disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency
        pass
