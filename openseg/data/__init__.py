"""Data: dataset registry (imported for its registrations), class splits, vocabularies and
dataset mappers."""

from . import datasets  # noqa: F401  registers all datasets
from .mappers import (
    MAPPER_REGISTRY,
    InstanceDatasetMapper,
    PanopticDatasetMapper,
    SemanticDatasetMapper,
    build_lsj_augmentation,
    build_mapper,
)
from .splits import apply_class_splits, known_seen_unseen, seen_unseen_split
from .vocab import PROMPT_TEMPLATES, get_vocabulary, normalize_name, register_vocabulary, validate_vocabulary

__all__ = [
    "InstanceDatasetMapper",
    "MAPPER_REGISTRY",
    "PanopticDatasetMapper",
    "SemanticDatasetMapper",
    "build_lsj_augmentation",
    "PROMPT_TEMPLATES",
    "apply_class_splits",
    "build_mapper",
    "get_vocabulary",
    "known_seen_unseen",
    "normalize_name",
    "seen_unseen_split",
    "register_vocabulary",
    "validate_vocabulary",
]
