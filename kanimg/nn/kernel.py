"""Loads the fused C++ CPU kernels (the KAN layer's, the hash encoding's), compiling them once per machine.

torch.utils.cpp_extension caches the build (under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR), so only the first use pays the ~1 minute compile. The build is tuned
for the CPU it runs on (-march=native), so the cache is keyed on that CPU: a home folder or
cache shared between machines never runs one machine's build on another (a SIGILL there
would kill the process before any fallback could run), and on the torch install it links against. Without a working
compiler, or with KANIMG_NO_KERNEL=1, the KAN layer and the hash encoding fall back to the
pure-PyTorch functions in bspline.py and hashgrid.py, which compute the same thing more slowly.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("kan_cpu.cpp", "hashgrid_cpu.cpp")]


def _cpu_key() -> str:
    """A short digest of this CPU: its model name and instruction-set flags (or, where
    /proc/cpuinfo is missing, what the platform module says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        text = "".join(sorted(set(lines)))
    except OSError:
        text = ""
    text = text or f"{platform.machine()} {platform.processor()} {platform.platform()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _torch_key() -> str:
    """A short digest of the torch install the kernel builds against: two environments on one
    machine (a project's venv and a CI venv) share the build cache, and with one name each would
    rebuild the other's build on every switch, or rewrite the library another process has loaded."""
    import torch

    return hashlib.sha256(f"{torch.__version__} {Path(torch.__file__).resolve().parent}".encode()).hexdigest()[:8]


_NAME = f"kanimg_kan_cpu_{_cpu_key()}_{_torch_key()}"


@functools.cache
def cpu_kernel() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be built."""
    if os.environ.get("KANIMG_NO_KERNEL", "") not in ("", "0"):
        return None
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # "No CUDA runtime is found" is irrelevant to a CPU build
    try:
        from torch.utils import cpp_extension

        if not _is_built(cpp_extension):
            log.info("building the fused KAN CPU kernel (once per machine, about a minute)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(
                name=_NAME,
                sources=[str(source) for source in _SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as exc:  # any build failure means: use the PyTorch path
        warnings.warn(f"kanimg: fused CPU kernel unavailable ({str(exc).splitlines()[0][:200]}); using the PyTorch path")
        return None
    finally:
        torch_log.setLevel(level)


def _is_built(cpp_extension) -> bool:
    try:
        folder = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
    except Exception:
        return False
    return (folder / f"{_NAME}.so").exists()
