"""One registry for every model family and named variant: ``build_model(name, **spec)``.

A registered entry is a small function that checks its keyword spec and builds the network;
the registry records the fully resolved spec on the model (``model.spec``) so a checkpoint
can rebuild it. Each entry also carries its family's best-known training defaults (learning
rate, batch size), used unless the user overrides them.

    >>> model = build_model("kan", widths=[2, 3])
    >>> model.spec["grids"], model.spec["levels"], model.spec["finest_resolution"]
    ([16], 16, 256)
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import KanimgError
from .nn import KAN, MLP, FourierFeatureMLP, HashGrid, HashGridEncoding, Siren
from .nn.kan import GRID_KINDS


@dataclass(frozen=True)
class ModelEntry:
    """A registered name: a family's builder with its default options (a variant such as the
    paper's "siren2" is the same builder with other defaults)."""

    name: str
    family: str
    build: Callable[..., nn.Module]
    defaults: dict[str, Any]
    train_defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # options sized to the image, (spec, height, width) -> {option: value}, for those whose default is None
    for_image: Callable[[dict[str, Any], int, int], dict[str, Any]] | None = None

    def default_spec(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.defaults.items()}


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, train_defaults: dict[str, Any] | None = None, description: str = "",
             for_image: Callable[[dict[str, Any], int, int], dict[str, Any]] | None = None):
    """Decorator: register ``fn(**spec) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
        _add(ModelEntry(name, name, fn, defaults, dict(train_defaults or {}), description or (fn.__doc__ or "").strip().split("\n")[0],
                        for_image))
        return fn

    return wrap


def register_variant(name: str, family: str, description: str, train_defaults: dict[str, Any] | None = None, **defaults: Any) -> None:
    """Register ``name`` as ``family`` with other default options (e.g. a paper's preset) and,
    if given, other training defaults (else the family's)."""
    base = _REGISTRY[family]
    unknown = set(defaults) - set(base.defaults)
    if unknown:
        raise ValueError(f"{family} has no option {unknown}")
    _add(ModelEntry(name, family, base.build, {**base.defaults, **defaults}, dict(train_defaults or base.train_defaults), description,
                    base.for_image))


def _add(entry: ModelEntry) -> None:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry


def model_names(variants: bool = True) -> list[str]:
    """Registered names: the families first, then (optionally) the named variants."""
    return [n for n, e in _REGISTRY.items() if variants or e.name == e.family]


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KanimgError(f"unknown model {name!r}; choose from: {', '.join(_REGISTRY)}") from None


def build_model(name: str, **spec: Any) -> nn.Module:
    """Build a registered model; options left as None take the entry's defaults.

    Raises:
        KanimgError: unknown name, unknown option or an invalid value.
    """
    entry = get_entry(name)
    spec = {k: v for k, v in spec.items() if v is not None}
    resolved = entry.default_spec()
    unknown = sorted(set(spec) - set(resolved))
    if unknown:
        raise KanimgError(f"model {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(resolved)}")
    resolved.update({k: _plain(v) for k, v in spec.items()})
    model = entry.build(**resolved)
    for key, value in resolved.items():  # options the builder derived (None) are read back
        if value is None and hasattr(model, key):
            resolved[key] = _plain(getattr(model, key))
    model.spec = {"name": name, **resolved}
    return model


# Options a family gained after kanimg first wrote checkpoints, with the value that rebuilds a
# model saved before them as it was trained: a new default must never change an old model.
OPTIONS_ADDED_LATER = {"kan": {"directions": 0, "levels": 0}}
# Registered names that were renamed: old checkpoints name the entry they were trained as.
RENAMED = {"kan-ridge8": "kan-ridge"}


def saved_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec read from a checkpoint, under today's name, with the options it predates set as
    it was trained."""
    name = RENAMED.get(spec["name"], spec["name"])
    return {**OPTIONS_ADDED_LATER.get(get_entry(name).family, {}), **spec, "name": name}


# Largest model kanimg builds: in training, parameters, gradients and two Adam moments take 16 bytes each.
MAX_PARAMETERS = 200_000_000


def param_count(name: str, spec: dict[str, Any]) -> int:
    """Parameters of a registered model with ``spec``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, **spec).parameters())


def _plain(value: Any) -> Any:
    """Tuples to lists, so specs are JSON- and weights_only-checkpoint-friendly."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_widths(widths: list[int], min_layers: int = 1) -> list[int]:
    try:
        widths = [int(w) for w in widths]
    except (TypeError, ValueError):
        raise KanimgError(f"widths must be integers, got {widths!r}") from None
    if len(widths) < min_layers + 1:
        raise KanimgError(f"widths {widths} need at least {min_layers + 1} entries (input, …, output)")
    if any(w <= 0 for w in widths):
        raise KanimgError(f"widths must be positive, got {widths}")
    return widths


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise KanimgError(f"{name} must be positive, got {value}")
    return value


# ----------------------------------------------------------------------------- families

# Default KAN grids on coordinates: the first layer sees the coordinates and needs fine grids for
# detail; deeper layers compose, coarser grids suffice there (the paper's 100 / 10 pattern).
# Measured on 256² and 600×400 photos (1,500 steps): a first grid of about half the image's
# longer side beat smaller ones (e.g. 32.3 vs 30.8 dB with 256 vs 128 on the 600×400 image), and
# hidden grids of 20 beat 10 (42.7 vs 39.8 dB on the 256² image). A KAN on a hash encoding sees
# learned features instead, whose detail lives in the encoding's tables: ENCODED_GRID intervals
# (the tuning sweep's winner, docs/benchmark.md).
FIRST_GRID, HIDDEN_GRID, ENCODED_GRID = 128, 20, 16
MAX_GRID = 4096  # intervals per layer: far above any useful grid, and bounds what a file or flag can ask for


def kan_grids_for(widths: list[int], height: int | None = None, width: int | None = None, encoded: bool = False) -> list[int]:
    """Default grid sizes of a KAN with ``widths`` (on a hash encoding if ``encoded``) fitted to an image of this size."""
    if encoded:
        return [ENCODED_GRID] * (len(widths) - 1)
    first = FIRST_GRID if height is None else int(min(512, max(16, round(max(height, width) / 2))))
    return [first] + [HIDDEN_GRID] * (len(widths) - 2)


def _hash_options(levels: int, features: int, log2_table_size: int | None, base_resolution: int, finest: int | None) -> list[int]:
    """A hash encoding's options checked (one line for a bad one) and as ints; finest None: 256,
    log2_table_size None: 16."""
    finest = 256 if finest is None else finest
    log2_table_size = 16 if log2_table_size is None else log2_table_size
    for option, value, top in (("levels", levels, 64), ("features", features, 64), ("log2_table_size", log2_table_size, 24),
                               ("base_resolution", base_resolution, 1 << 16), ("finest_resolution", finest, 1 << 16)):
        if int(value) != value or not 1 <= value <= top:
            raise KanimgError(f"{option} must be an integer from 1 to {top}, got {value}")
    if finest < base_resolution:
        raise KanimgError(f"finest_resolution ({finest}) must be at least base_resolution ({base_resolution})")
    return [int(levels), int(features), int(log2_table_size), int(base_resolution), int(finest)]


# A hash encoding fitted to an image: its finest level has a cell per pixel, and each level's
# table holds ``entries_per_pixel`` entries per pixel of the image, rounded up to a power of two,
# from 2^16 to at most 2^19 (2^16 entries left the finest levels of a 741×500 photo colliding 8
# to 1). Measured at 30 s (docs/benchmark.md): on the full-size tuning photos tables of 2^19
# against 2^16 gained the hash grid 4.8 dB and the KAN 0.9 dB; on the tuning crops 2^18 against
# 2^16 (there it only makes the finest levels collision-free) scored +0.9 dB for the hash grid
# and -12 dB for the KAN, both within the sweep's run-to-run noise: each family keeps what its
# sweep chose, 4 entries per pixel for the hash grid and 1 for the KAN.
MAX_LOG2_TABLE = 19


def encoding_for_image(height: int, width: int, base_resolution: int, entries_per_pixel: int = 1) -> dict[str, int]:
    """The hash encoding's finest resolution and table size for an image of height × width (an
    image smaller than the coarsest level gets that level alone: finest = base)."""
    log2_size = math.ceil(math.log2(height * width * entries_per_pixel))
    return {"finest_resolution": max(height, width, base_resolution), "log2_table_size": min(MAX_LOG2_TABLE, max(16, log2_size))}


def _sized_to_image(spec: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """A KAN's grids (and its encoding's size) for an image of height × width."""
    encoded = spec["levels"] > 0
    return {"grids": kan_grids_for(spec["widths"], height, width, encoded), **(encoding_for_image(height, width, spec["base_resolution"]) if encoded else {})}


# The default KAN: a multiresolution hash encoding (as the hashgrid baseline's) read out by one
# KAN layer on a fixed uniform grid. Training defaults are the tuning sweep's winners
# (docs/benchmark.md): no grid refits, which under a clock cost more than they gave once the
# encoding ran as a fused kernel (a refit takes ~0.3 s, and percentile knots take the kernel's
# slower path); --grid-update-every 25 brings back the earlier refits in the first 500 steps.
# lr_steps (here and for hashgrid and rff): the sweep's rate is for runs of about the steps a
# 30 s run makes; a longer run starts at lr·√(lr_steps / steps) (TrainConfig.lr_steps). The 120 s
# learning-rate round chose half the rate for all three (docs/benchmark.md): lr_steps is a quarter
# of its mean steps at the full rate (9,633, 42,284, 42,391) to two figures, so that length gets half.
@register("kan", train_defaults={"lr": 6e-2, "batch_size": 16384, "grid_update_every": 0, "grid_update_until": 500,
                                 "lr_steps": 2400},
          description="KAN on a multiresolution hash encoding, cubic B-spline edges + SiLU base", for_image=_sized_to_image)
def kan(
    widths: tuple[int, ...] = (2, 1),
    grids: tuple[int, ...] | int | None = None,
    grid_range: tuple[float, float] = (-1.0, 1.0),
    grid_kind: str = "percentile",
    directions: int = 0,
    levels: int = 16,
    features: int = 2,
    log2_table_size: int | None = None,
    base_resolution: int = 16,
    finest_resolution: int | None = None,
) -> nn.Module:
    """KAN with one grid size per layer (an int applies to every layer; None: see kan_grids_for).

    Its first layer sees a multiresolution hash encoding of (x, y) (``levels`` × ``features``
    values, options as the hashgrid family's; finest_resolution and log2_table_size None: 256
    and 16, or sized to the image when fitting, see encoding_for_image), or with ``levels`` 0
    the coordinates themselves: along ``directions`` evenly spaced directions (0: x and y
    alone, every first-layer unit then is f(x) + g(y)). Grids start uniform on ``grid_range``; ``grid_kind`` is where grid updates put
    the knots: at sample quantiles ("percentile", pykan's choice and the measured winner,
    docs/kan-grids.md) or evenly over the sample range ("uniform")."""
    widths = _check_widths(widths)
    if int(levels) != levels or levels < 0:
        raise KanimgError(f"levels must be an integer from 0 (no hash encoding) to 64, got {levels}")
    if grids is None:
        grids = kan_grids_for(widths, encoded=levels > 0)
    grids = [grids] * (len(widths) - 1) if isinstance(grids, int) else list(grids)
    if len(grids) != len(widths) - 1:
        raise KanimgError(f"grids has {len(grids)} entries but widths {widths} has {len(widths) - 1} layers; give one grid size per layer")
    if any(int(g) != g or not 1 <= g <= MAX_GRID for g in grids):
        raise KanimgError(f"grid sizes must be integers from 1 to {MAX_GRID}, got {grids}")
    if len(grid_range) != 2 or not grid_range[0] < grid_range[1]:
        raise KanimgError(f"grid_range must be [lo, hi] with lo < hi, got {grid_range}")
    if grid_kind not in GRID_KINDS:
        raise KanimgError(f"grid_kind must be one of {', '.join(GRID_KINDS)}, got {grid_kind!r}")
    if int(directions) != directions or not 0 <= directions <= 256:
        raise KanimgError(f"directions must be an integer from 0 to 256, got {directions}")
    encoding = None
    if levels:
        if directions:
            raise KanimgError(f"ridge directions apply to a KAN on the coordinates: with directions {directions}, set levels 0 "
                              f"(as kan-ridge does); with levels {levels}, set directions 0")
        options = _hash_options(levels, features, log2_table_size, base_resolution, finest_resolution)
        encoding = HashGridEncoding(*options)
    model = KAN(widths, [int(g) for g in grids], grid_range, grid_kind, int(directions), encoding)
    if encoding is not None:
        model.finest_resolution = options[-1]
    return model


# Training defaults and default options of siren, mlp, rff and hashgrid: the winners of the
# tuning sweep (benchmarks/inr_bench.py --tune, 30 s per candidate on photos the benchmark does
# not use, 21 candidates per family; docs/benchmark.md). Under a clock all three coordinate
# networks gain most from small batches; SIREN's published recipe (256 wide, lr 1e-4,
# whole-image batches, ω0 30) made 40 steps in 30 s and came last.
@register("siren", train_defaults={"lr": 3e-4, "batch_size": 1024}, description="SIREN, sine activations, omega0=90")
def siren(widths: tuple[int, ...] = (2, 128, 128, 128, 1), omega0: float = 90.0) -> nn.Module:
    """SIREN (Sitzmann et al. 2020) with its published initialisation."""
    return Siren(_check_widths(widths, 2), _positive("omega0", omega0))


@register("mlp", train_defaults={"lr": 3e-3, "batch_size": 256}, description="ReLU MLP on raw coordinates")
def mlp(widths: tuple[int, ...] = (2, 256, 256, 256, 256, 1)) -> nn.Module:
    """Plain ReLU MLP."""
    return MLP(_check_widths(widths))


@register("rff", train_defaults={"lr": 1e-3, "batch_size": 512, "lr_steps": 11000}, description="ReLU MLP on Gaussian Fourier features")
def rff(widths: tuple[int, ...] = (2, 256, 256, 1), scale: float = 15.0, num_features: int = 256) -> nn.Module:
    """ReLU MLP on random Fourier features (Tancik et al. 2020), B ~ N(0, scale²)."""
    widths = _check_widths(widths)
    if widths[0] != 2:
        raise KanimgError(f"rff takes 2-D coordinates: widths must start with 2, got {widths}")
    return FourierFeatureMLP(widths, _positive("scale", scale), int(_positive("num_features", num_features)))


@register("hashgrid", train_defaults={"lr": 2e-2, "batch_size": 4096, "lr_steps": 11000}, description="multiresolution hash encoding + ReLU MLP",
          for_image=lambda spec, height, width: encoding_for_image(height, width, spec["base_resolution"], entries_per_pixel=4))
def hashgrid(
    widths: tuple[int, ...] = (2, 64, 1),
    levels: int = 16,
    features: int = 2,
    log2_table_size: int | None = None,
    base_resolution: int = 16,
    finest_resolution: int | None = None,
) -> nn.Module:
    """Multiresolution hash grid (Müller et al. 2022, instant-ngp) with a small ReLU MLP: L levels
    of F features, 2^log2_table_size entries per level, N_min = base_resolution cells per side up
    to finest_resolution (both None: 2^16 and 256, or sized to the image when fitting, see
    encoding_for_image)."""
    widths = _check_widths(widths)
    if widths[0] != 2:
        raise KanimgError(f"hashgrid takes 2-D coordinates: widths must start with 2, got {widths}")
    return HashGrid(widths, *_hash_options(levels, features, log2_table_size, base_resolution, finest_resolution))


# KANs on the coordinates themselves (the default KAN before the hash encoding; 12–14 dB behind
# it at equal time, docs/benchmark.md), trained as tuned for them.
COORDINATE_KAN = {"widths": (2, 64, 64, 64, 1), "levels": 0}
COORDINATE_KAN_TRAINING = {"lr": 2e-2, "batch_size": 4096}
register_variant("kan-ridge", "kan", "deep KAN on (x, y) along 8 ridge directions", COORDINATE_KAN_TRAINING, **COORDINATE_KAN, directions=8)
register_variant("kan-xy", "kan", "deep KAN whose first layer sees x and y alone", COORDINATE_KAN_TRAINING, **COORDINATE_KAN)


# ----------------------------------------------------------------------------- the KAN paper's presets
# Image-fitting table of arXiv 2410.01803 (see the KAN slides): "1" models are 128 wide, "2"
# models 404 wide, 4 hidden layers each; RFF with s = 3 and s = 30. The output width (1, the
# paper's grey image) follows the image's channels when fitting.
_HIDDEN = {"1": 128, "2": 404}
register_variant("kan2", "kan", "KAN2 of the KAN paper: [2,128×4,1], G=[100,10,10,10,10], percentile grid updates (pykan)",
                 COORDINATE_KAN_TRAINING, widths=(2, 128, 128, 128, 128, 1), grids=(100, 10, 10, 10, 10), grid_kind="percentile", levels=0)
for _size, _width in _HIDDEN.items():
    _widths = (2, _width, _width, _width, _width, 1)
    register_variant(f"siren{_size}", "siren", f"SIREN{_size} of the KAN paper: [2,{_width}×4,1]", widths=_widths, omega0=30.0)
    register_variant(f"mlp{_size}", "mlp", f"MLP{_size} of the KAN paper: [2,{_width}×4,1]", widths=_widths)
    for _s in (3, 30):
        register_variant(f"rff{_size}-s{_s}", "rff", f"MLP_RFF{_size} (s={_s}) of the KAN paper: [2,{_width}×4,1]",
                         widths=_widths, scale=float(_s))
