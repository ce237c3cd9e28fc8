"""openseg: open-vocabulary, open-world and open-ended segmentation on detectron2.

Importing the package registers its datasets, architectures and evaluator families, as
detectron2 projects do; methods live in `openseg.projects.<name>`.
"""
from . import data, evaluation, modeling  # noqa: F401
from .config import add_openseg_config, load_config

__version__ = "0.1.0"
__all__ = ["add_openseg_config", "load_config"]
