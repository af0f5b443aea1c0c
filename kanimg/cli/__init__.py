"""Command line: one subcommand per verb, one module per verb; each only parses and calls the library.

Errors the user can fix are one line on stderr and exit status 2; Ctrl-C exits 130 after
saving what a run has so far. Under torchrun (``torchrun … -m kanimg fit|compare|rd …``) every
copy joins the process group first (kanimg.distributed); only rank 0 prints the results.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Sequence

import torch

from .. import __version__, distributed
from ..errors import KanimgError
from . import compare, compress, fit, render


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as KanimgError-style single lines (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"kanimg: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kanimg", description="Fit images with deep Kolmogorov–Arnold Networks and compare them with SIREN, RFF and MLP.")
    parser.add_argument("--version", action="version", version=f"kanimg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for verb in (fit, render, compress, compare):
        verb.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (already printed as one line), --help, --version
        return int(exc.code or 0)
    previous = _on_sigterm(_raise_interrupt)  # `kill` saves like Ctrl-C
    try:
        with distributed.joined() as place:
            _setup_logging(quiet=getattr(args, "quiet", False))
            if place.size > 1 and args.command not in DISTRIBUTED_VERBS:
                raise KanimgError(f"kanimg {args.command} runs in one process; under torchrun only {', '.join(DISTRIBUTED_VERBS)} "
                                  f"share their work among processes")
            if not place.is_main:
                args.quiet = True  # one progress bar and one printout: rank 0's
            return args.func(args)
    except KanimgError as exc:
        print(f"{_speaker()}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_speaker()}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError):
        print(f"{_speaker()}: error: out of memory; try a smaller --batch-size or model", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that filled up or a folder that became read-only mid-run
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{_speaker()}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        _on_sigterm(previous)


DISTRIBUTED_VERBS = ("fit", "compare", "rd")


def _speaker() -> str:
    """Who says a line: "kanimg", or under torchrun "kanimg[rank R]" (every rank reports its own)."""
    try:
        place = distributed.from_environment()
    except KanimgError:
        return "kanimg"
    return f"kanimg[rank {place.rank}]" if place.size > 1 else "kanimg"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is logged (a caller, a notebook or a test
    may replace it after the handler was made), as logging's own last-resort handler does."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    """kanimg's own log lines (e.g. the one-time kernel build) on stderr, nothing from others;
    under torchrun each line says its rank."""
    log = logging.getLogger("kanimg")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    prefix = _speaker()
    handler = next((h for h in log.handlers if getattr(h, "kanimg_cli", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.kanimg_cli = True
        log.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))


def _on_sigterm(handler):
    """Install a SIGTERM handler where possible (main thread only); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
