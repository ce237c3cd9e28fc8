"""Reading released and openseg checkpoints (`OpenSegCheckpointer`, used for MODEL.WEIGHTS)
and converting between layouts (`tools/convert_checkpoint.py`). Importing this package
registers the built-in layouts, including the full Mask2Former model-zoo checkpoints."""
from .loader import (
    CHECKPOINT_FORMATS,
    CheckpointError,
    CheckpointFormat,
    OpenSegCheckpointer,
    convert_from_openseg,
    convert_to_openseg,
    detect_format,
    read_checkpoint_file,
    register_checkpoint_format,
)
from ..modeling.backbones.swin import with_release_buffers
from .mask2former import openseg_to_reference, reference_to_openseg

# Mask2Former's MaskFormer meta-architecture (model-zoo .pkl, .pth of its train_net.py):
# backbone.*, sem_seg_head.pixel_decoder.*, sem_seg_head.predictor.*
register_checkpoint_format(CheckpointFormat(
    name="mask2former",
    detect=lambda keys: any(k.startswith("sem_seg_head.predictor.") for k in keys),
    to_openseg=reference_to_openseg,
    # a Swin backbone gets back the index buffers the release saves (and openseg recomputes)
    from_openseg=lambda state: openseg_to_reference(with_release_buffers(state)),
))

__all__ = [
    "CHECKPOINT_FORMATS",
    "CheckpointError",
    "CheckpointFormat",
    "OpenSegCheckpointer",
    "convert_from_openseg",
    "convert_to_openseg",
    "detect_format",
    "read_checkpoint_file",
    "register_checkpoint_format",
]
