"""Network building blocks: the KAN layer and the SIREN / MLP / Fourier-feature / hash-grid baselines."""
from .hashgrid import HashGrid, HashGridEncoding
from .kan import KAN, KANLayer
from .mlp import MLP, FourierFeatureMLP
from .siren import Siren

__all__ = ["KAN", "KANLayer", "MLP", "FourierFeatureMLP", "HashGrid", "HashGridEncoding", "Siren"]
