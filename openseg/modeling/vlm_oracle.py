"""Table 1 of "What holds back open-vocabulary segmentation?" (Sec. 4.1): zero-shot VLMs
under the segmentation oracle.

"Our segmentation oracle produces a set of perfect binary masks, one for each panoptic
segment. We use pre-trained CLIP encoders. We extract dense image features in the shared
vision-language embedding space according to the MaskCLIP strategy for ViT backbones, while
simply removing the global average pool for ConvNeXt. Then, we gather per-mask
representations by mask-pooling over the extracted CLIP features. We embed class names into
the common vector space with the CLIP text encoder. Finally, we recover panoptic segmentation
by assigning each mask with the class whose text embedding yields the highest cosine
similarity with the corresponding visual representation." Each model is "tested on three
resolutions: longer side 512, longer side 640, and shorter side 800 with longer side capped
at 1333", with "the ViT positional embeddings [interpolated] to match the input resolution".

Dense features come from openseg.modeling.backbones.clip (ConvNeXt: head per pixel; OpenAI /
OpenCLIP ViT: MaskCLIP value path; SigLIP 2: the value path of its attention-pooling head).
Class names are embedded with cfg.MODEL.TEXT_EMBEDDING templates and synonyms (the paper
does not state its prompts). Weights and tokenizers are read only from `root/<key>/`.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.modeling import build_backbone
from torch import Tensor

from ..data.mappers import build_mapper
from ..data.vocab import get_vocabulary
from ..evaluation.panoptic import PanopticEvaluator
from .inference import panoptic_inference
from .oracles import (
    IMPOSSIBLE_LOGIT,
    ground_truth_at_output,
    ground_truth_of_input,
    masks_as_logits,
)
from .text import OpenCLIPTextEncoder, class_embeddings, templates_from_config

CHECKPOINT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")


@dataclass(frozen=True)
class VLMSpec:
    """One row of Table 1: labels as printed, the open_clip config, where weights come from."""

    family: str
    architecture: str
    data: str
    model_name: str
    source: str  # Hugging Face repository whose files go into root/<key>/
    hf_tokenizer: bool = False  # SigLIP 2: the tokenizer files are in root/<key>/ too


VLM_MODELS: Dict[str, VLMSpec] = {
    "clip-vit-b-16": VLMSpec("CLIP", "ViT-B-16 @ 224", "WIT", "ViT-B-16-quickgelu",
                             "timm/vit_base_patch16_clip_224.openai"),
    "openclip-vit-b-16": VLMSpec("OpenCLIP", "ViT-B-16 @ 224", "LAION-2B", "ViT-B-16",
                                 "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    "siglip2-vit-b-16-256": VLMSpec("SigLIP 2", "ViT-B-16 @ 256", "WebLI", "ViT-B-16-SigLIP2-256",
                                    "timm/ViT-B-16-SigLIP2-256", True),
    "siglip2-vit-b-16-384": VLMSpec("SigLIP 2", "ViT-B-16 @ 384", "WebLI", "ViT-B-16-SigLIP2-384",
                                    "timm/ViT-B-16-SigLIP2-384", True),
    "siglip2-vit-b-16-512": VLMSpec("SigLIP 2", "ViT-B-16 @ 512", "WebLI", "ViT-B-16-SigLIP2-512",
                                    "timm/ViT-B-16-SigLIP2-512", True),
    "openclip-convnext-base": VLMSpec("OpenCLIP", "ConvNeXt-Base", "LAION-2B", "convnext_base_w",
                                      "laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg"),
    "clip-vit-l-14": VLMSpec("CLIP", "ViT-L-14 @ 224", "WIT", "ViT-L-14-quickgelu",
                             "timm/vit_large_patch14_clip_224.openai"),
    "openclip-vit-l-14": VLMSpec("OpenCLIP", "ViT-L-14 @ 224", "LAION-2B", "ViT-L-14",
                                 "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"),
    "siglip2-vit-l-16-256": VLMSpec("SigLIP 2", "ViT-L-16 @ 256", "WebLI", "ViT-L-16-SigLIP2-256",
                                    "timm/ViT-L-16-SigLIP2-256", True),
    "siglip2-vit-l-16-384": VLMSpec("SigLIP 2", "ViT-L-16 @ 384", "WebLI", "ViT-L-16-SigLIP2-384",
                                    "timm/ViT-L-16-SigLIP2-384", True),
    "siglip2-vit-l-16-512": VLMSpec("SigLIP 2", "ViT-L-16 @ 512", "WebLI", "ViT-L-16-SigLIP2-512",
                                    "timm/ViT-L-16-SigLIP2-512", True),
    "openclip-convnext-large": VLMSpec("OpenCLIP", "ConvNeXt-Large", "LAION-2B",
                                       "convnext_large_d_320",
                                       "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"),
}

# setting -> (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST) of detectron2's ResizeShortestEdge:
# (512, 512) scales the longer side to 512, (800, 1333) the shorter side to 800 with the
# longer side capped at 1333
TABLE1_SETTINGS: Dict[str, Tuple[int, int]] = {
    "512": (512, 512),
    "640": (640, 640),
    "800x1333": (800, 1333),
}


def vlm_files(key: str, root: str) -> Tuple[str, str]:
    """(checkpoint path, tokenizer folder or "") of VLM `key` under `root`; fails naming the
    expected path when the weights are missing."""
    if key not in VLM_MODELS:
        raise ValueError(f"Unknown VLM {key!r}; Table 1 models: {list(VLM_MODELS)}.")
    spec = VLM_MODELS[key]
    folder = os.path.join(root, key)
    for name in CHECKPOINT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            checkpoint = os.path.join(folder, name)
            break
    else:
        raise FileNotFoundError(
            f"VLM {key!r} ({spec.family} {spec.architecture}): no weights at "
            f"{os.path.join(folder, CHECKPOINT_FILES[0])} (or {CHECKPOINT_FILES[1]}); put the "
            f"files of the Hugging Face repository {spec.source} there (--vlm-root {root!r})."
        )
    return checkpoint, folder if spec.hf_tokenizer else ""


def pool_masks(dense: Tensor, masks: Tensor) -> Tensor:
    """Mask pooling: [E, h, w] features, bool [M, H, W] masks -> [M, E], the mean of the
    features weighted by each mask's coverage of every feature cell."""
    coverage = F.interpolate(masks[None].float(), size=dense.shape[-2:], mode="area")[0]
    pooled = torch.einsum("ehw,mhw->me", dense.float(), coverage)
    return pooled / coverage.sum(dim=(-2, -1))[:, None].clamp(min=1e-8)


def classify_ground_truth(
    backbone, text_embeddings: Tensor, batched_input: Dict, size_divisibility: int
) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
    """Zero-shot classes of one input's ground-truth masks: (class logits [M, K+1] with
    no-object impossible, padded bool masks [M, H_pad, W_pad], image size)."""
    device = text_embeddings.device
    mean = torch.tensor(backbone.pixel_mean, device=device).view(-1, 1, 1)
    std = torch.tensor(backbone.pixel_std, device=device).view(-1, 1, 1)
    image = (batched_input["image"].to(device).float() - mean) / std
    height, width = image.shape[-2:]
    padded = (-(-height // size_divisibility) * size_divisibility,
              -(-width // size_divisibility) * size_divisibility)
    image = F.pad(image, (0, padded[1] - width, 0, padded[0] - height))
    labels, masks = ground_truth_of_input(batched_input, padded, device)
    dense = backbone.dense_clip_features(backbone(image[None]))[0]
    similarity = F.normalize(pool_masks(dense, masks), dim=-1) @ text_embeddings.T.float()
    void = similarity.new_full((similarity.shape[0], 1), IMPOSSIBLE_LOGIT)
    return torch.cat([similarity, void], dim=1), masks, (height, width)


def evaluate_vlm(cfg: CfgNode, key: str, root: str, setting: str, output_dir: str) -> Dict:
    """PQ / PQ_seen / PQ_unseen of VLM `key` classifying the ground-truth masks of
    cfg.DATASETS.TEST[0] at resolution `setting` (keys of TABLE1_SETTINGS). The test set
    needs `class_splits` (openseg.evaluation.builder.ensure_class_splits)."""
    checkpoint, tokenizer = vlm_files(key, root)
    spec = VLM_MODELS[key]
    dataset = cfg.DATASETS.TEST[0]
    run_cfg = cfg.clone()
    run_cfg.defrost()
    run_cfg.MODEL.BACKBONE.NAME = "build_openclip_backbone"
    run_cfg.MODEL.CLIP.MODEL_NAME = spec.model_name
    run_cfg.MODEL.CLIP.PRETRAINED_PATH = checkpoint
    run_cfg.MODEL.CLIP.TOKENIZER_PATH = tokenizer
    run_cfg.MODEL.CLIP.OUT_FEATURES = ["res4"]
    run_cfg.INPUT.MIN_SIZE_TEST, run_cfg.INPUT.MAX_SIZE_TEST = TABLE1_SETTINGS[setting]
    run_cfg.INPUT.FORMAT = "RGB"  # CLIP statistics are RGB
    run_cfg.TEST.ORACLE.SEGMENTATION = True  # the test mapper keeps the ground truth
    run_cfg.freeze()
    device = torch.device(cfg.MODEL.DEVICE)
    backbone = build_backbone(run_cfg).to(device).eval()
    text = class_embeddings(
        OpenCLIPTextEncoder.from_backbone(backbone, checkpoint), get_vocabulary(dataset),
        templates_from_config(run_cfg), run_cfg.MODEL.TEXT_EMBEDDING.CACHE_DIR, device=device,
    )
    thing_ids = set(MetadataCatalog.get(dataset).get("thing_dataset_id_to_contiguous_id", {}).values())
    overlap = cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD
    loader = build_detection_test_loader(run_cfg, dataset, mapper=build_mapper(run_cfg, is_train=False))
    evaluator = PanopticEvaluator(dataset, output_dir, distributed=False)
    evaluator.reset()
    with torch.no_grad():
        for batch in loader:
            outputs: List[Dict] = []
            for x in batch:
                mask_cls, masks, image_size = classify_ground_truth(
                    backbone, text, x, backbone.size_divisibility
                )
                output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
                masks = ground_truth_at_output(masks, image_size, output_size)
                outputs.append({"panoptic_seg": panoptic_inference(
                    mask_cls, masks_as_logits(masks), thing_ids=thing_ids,
                    object_mask_threshold=0.0, overlap_threshold=overlap,
                )})
            evaluator.process(batch, outputs)
    return dict(evaluator.evaluate()["panoptic_seg"])
