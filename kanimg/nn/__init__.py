"""Network building blocks: the KAN layer and the SIREN / MLP / Fourier-feature baselines."""
from .kan import KAN, KANLayer
from .mlp import MLP, FourierFeatureMLP
from .siren import Siren

__all__ = ["KAN", "KANLayer", "MLP", "FourierFeatureMLP", "Siren"]
