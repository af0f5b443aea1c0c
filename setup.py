import re
from pathlib import Path

from setuptools import find_packages, setup

# __version__ read from the text: importing kanimg would import torch
version = {"__version__": re.search(r'^__version__ = "([^"]+)"', Path("kanimg/__init__.py").read_text(), re.M).group(1)}

setup(
    name="kanimg",
    version=version["__version__"],
    description="Implicit neural representations of images with deep Kolmogorov-Arnold Networks, "
                "compared fairly with SIREN, Fourier-feature and ReLU MLPs",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["kanimg", "kanimg.*"]),
    package_data={"kanimg.nn": ["csrc/*.cpp"]},
    data_files=[("share/kanimg/assets", ["assets/astronaut.png"])],
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision<=0.29.1",
        "numpy",
        "pillow",
        "imageio",
        "tifffile",
        "pypng",
        "lpips",
        "tqdm",
        "scikit-image",
        "scipy",
        "matplotlib",
        "ninja",  # builds the fused CPU kernel (torch.utils.cpp_extension)
        "constriction>=0.5,<0.6",  # range coder of .kimg files; its probability quantisation is part of the format
    ],
    extras_require={"test": ["pytest>=9.2", "hypothesis>=6.100", "bjontegaard>=1.3", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"]},
    entry_points={"console_scripts": ["kanimg=kanimg.cli:main"]},
)
