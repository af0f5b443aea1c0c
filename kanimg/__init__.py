"""kanimg: implicit neural representations of images with deep Kolmogorov–Arnold Networks."""
__version__ = "0.1.0"
