"""SegPrompt (Zhu et al. ICCV 2023): category-level prompt learning as auxiliary training of a
class-agnostic Mask2Former for open-world instance segmentation."""

from . import checkpoint  # registers the release checkpoint format
from .config import add_segprompt_config
from .matching import class_restricted_assignment, one_to_one_assignment
from .meta_arch import SegPromptMaskFormer
from .prompt_cache import PromptCache
from .queries import (
    PromptQueryBuilder,
    select_examples,
    select_prompt_classes,
    supervised_classes,
)

__all__ = [
    "PromptCache",
    "PromptQueryBuilder",
    "SegPromptMaskFormer",
    "add_segprompt_config",
    "class_restricted_assignment",
    "one_to_one_assignment",
    "select_examples",
    "select_prompt_classes",
    "supervised_classes",
]
