"""kanimg: implicit neural representations of images with deep Kolmogorov–Arnold Networks.

The Python API (see kanimg/api.py): ``kanimg.fit``, ``kanimg.compare``, ``kanimg.compress``,
``kanimg.decode``; models by name from ``kanimg.models.build_model``.
"""
__version__ = "0.1.0"

import warnings  # noqa: E402

with warnings.catch_warnings():  # in a notebook without ipywidgets tqdm.auto warns once, then draws text bars
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

from .api import Fit, as_image, compress, decode, fit  # noqa: E402
from .comparison import compare  # noqa: E402

__all__ = ["Fit", "as_image", "compare", "compress", "decode", "fit", "__version__"]
