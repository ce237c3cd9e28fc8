"""openseg evaluators: one per metric family, built from dataset metadata by `build_evaluator`."""
from .base import SplitAwareEvaluator, class_splits_from_metadata, gather_to_main, split_means
from .builder import EVALUATOR_FAMILIES, build_evaluator, register_evaluator_family
from .panoptic import PanopticEvaluator
from .semantic import SemanticEvaluator
