"""OSM, the OmniScient Model (Yu, Shen and Chen, "Towards Open-Ended Visual Recognition with
Large Language Model", ECCV 2024), on transformers' InstructBLIP, plus OPAL (App. B of
"Benchmarking Open-Ended Segmentation"). Importing registers the `OSM` meta-architecture and the mappers of the release's scale
jitter (`panoptic_osm`, `instance_osm`, `semantic_osm`)."""

from . import data  # noqa: F401  registers the OSM mappers
from .config import add_osm_config
from .meta_arch import OSM
from .omniscient import RELEASE_MODES, OmniScient, context_box_mask, load_base_model, load_released_checkpoint
from .templates import INSTRUCTION_TEMPLATES

__all__ = [
    "INSTRUCTION_TEMPLATES",
    "OSM",
    "OmniScient",
    "RELEASE_MODES",
    "add_osm_config",
    "context_box_mask",
    "load_base_model",
    "load_released_checkpoint",
]
