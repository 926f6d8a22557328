"""CUDA C kernels of the GPU backend, shipped as package data (installed as ``hxn_ptycho.cuda``)."""
from pathlib import Path


def kernel_dir() -> Path:
    """The folder that holds the ``*.cu`` sources, in the source tree or the installed wheel."""
    return Path(__file__).resolve().parent
