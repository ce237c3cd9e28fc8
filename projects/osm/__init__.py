"""OSM: open-ended mask recognition with a frozen LLM (Yang et al., "Open-ended Semantic
Segmentation with MLLMs"). Importing registers the `OSM` meta-architecture."""

from .config import add_osm_config
from .meta_arch import OSM
from .maskq_former import MaskQFormer, context_region, mask_region
from .templates import INSTRUCTION_TEMPLATES

__all__ = [
    "INSTRUCTION_TEMPLATES",
    "MaskQFormer",
    "OSM",
    "add_osm_config",
    "context_region",
    "mask_region",
]
