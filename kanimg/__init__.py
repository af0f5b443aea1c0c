"""kanimg: implicit neural representations of images with deep Kolmogorov–Arnold Networks.

The Python API: ``kanimg.fit`` (kanimg/fitting.py), ``kanimg.compare`` (kanimg/comparison.py),
``kanimg.compress`` and ``kanimg.decode`` (kanimg/compress/api.py), ``kanimg.as_image``
(kanimg/io.py); models by name from ``kanimg.models.build_model``.
"""
__version__ = "0.1.0"

import warnings  # noqa: E402

with warnings.catch_warnings():  # in a notebook without ipywidgets tqdm.auto warns once, then draws text bars
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

from .comparison import compare  # noqa: E402
from .compress.api import compress, decode  # noqa: E402
from .fitting import Fit, fit  # noqa: E402
from .io import as_image  # noqa: E402

__all__ = ["Fit", "as_image", "compare", "compress", "decode", "fit", "__version__"]
