"""argparse types and flag groups shared by the verbs."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable


def output_file(text: str) -> Path:
    """argparse type for an output file's -o: a name ending in a separator names a folder, which
    Path would silently drop (``-o new/`` writing a file called ``new``)."""
    if not text or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"-o takes a file name, got {text!r}")
    return Path(text)


def comma_list(kind: Callable, flag: str, example: str) -> Callable[[str], list]:
    """argparse type for comma-separated values of ``kind``, e.g. --widths 2,64,64,1."""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated list, e.g. {example}; got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return values

    return parse


def int_list(flag: str, example: str = "2,64,64,1") -> Callable[[str], list[int]]:
    """argparse type for comma-separated integers, e.g. --widths 2,64,64,1."""
    return comma_list(int, flag, example)


def grid_schedule(text: str) -> list:
    """--grid-schedule '1000:20,10;3000:50,10' → [[1000, [20, 10]], [3000, [50, 10]]]."""
    entries = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        step, _, grids = part.partition(":")
        try:
            entries.append([int(step), [int(g) for g in grids.split(",")]])
        except ValueError:
            raise argparse.ArgumentTypeError(f"--grid-schedule takes STEP:G1,G2,…;STEP:… e.g. 1000:20,10; got {text!r}") from None
    return entries


def size(text: str) -> tuple[int, int]:
    """'1024x768' → (width, height)."""
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes WIDTHxHEIGHT, e.g. 1024x1024; got {text!r}") from None
    if not sep or width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"--size takes positive WIDTHxHEIGHT; got {text!r}")
    return width, height


def execution_flags(group) -> None:
    from ..train import PRECISIONS

    group.add_argument("--precision", choices=PRECISIONS,
                       help="training steps in fp32 (default), tf32 (TensorFloat-32 matmuls on CUDA) or bf16 (autocast)")
    group.add_argument("--compile", action="store_true", default=None, help="train through torch.compile (compiles once, outside the clock)")
