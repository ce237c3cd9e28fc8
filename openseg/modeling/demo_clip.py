"""Contrastive pre-training of the demo's tiny CLIPs on rendered demo scenes.

A random-init CLIP knows no language, so with it the demo's unseen classes ("cross", "sand")
can never be recognised and the open-vocabulary mechanism the oracle study probes ("What holds
back open-vocabulary segmentation?", Sec. 4.3: masks of unseen objects that CLIP classifies
correctly) cannot appear. A real CLIP learns web concepts from image-text pairs (Radford et al.
ICML 2021, Sec. 2); the demo CLIP learns all eight demo classes from scenes rendered by the demo
renderer from seeds disjoint from the train / val images (`demo.SEED_STREAMS`), each segment
paired with the prompts of its class's synonyms. The scene family is a `demo.DemoScenes`: the
demo (default) or the open-vocabulary shapes (`demo.OV_SHAPES`: 12 shapes in random colours
and 4 textures, rendered from its own seed streams, every class included).

FC-CLIP (Yu et al. NeurIPS 2023, Sec. 3.3) and MAFT+ classify masks by pooling the dense CLIP
features inside them and embedding the pooled vector with the CLIP head, so the image side of
the objective is exactly that: every segment's coverage-weighted pool of
`OpenCLIPBackbone.pooling_features`, through `embed_masks`. The text side is one embedding per
synonym (mean over the prompt templates, as `encode_vocabulary(per_name=True)`). Several
segments and synonyms share a class, so the symmetric InfoNCE of CLIP counts every same-class
pair as a positive (UniCL, Yang et al. CVPR 2022, Sec. 3.1).
"""
import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.datasets.demo import DEMO, DemoScenes, render_image
from .backbones.clip import OpenCLIPBackbone
from .text import encode_vocabulary, max_over_synonyms, synonym_counts

logger = logging.getLogger(__name__)


def multi_positive_infonce(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE of [N, M] logits whose positives are the True entries of [N, M]
    `positives`: each row's log-softmax over the M columns (and each column's over the N rows)
    averaged over its positives, then over rows (columns) that have any; the mean of both
    directions. With one positive per row and column this is CLIP's loss."""
    positives = positives.to(logits.dtype)

    def one_direction(scores: Tensor, targets: Tensor) -> Tensor:
        counts = targets.sum(dim=1)
        keep = counts > 0
        per_row = -(scores.log_softmax(dim=1) * targets).sum(dim=1)[keep] / counts[keep]
        return per_row.mean()

    return 0.5 * (one_direction(logits, positives) + one_direction(logits.t(), positives.t()))


def render_batch(
    stream: str, indices: Sequence[int], scenes: DemoScenes = DEMO
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images `indices` of `stream` of `scenes` as [B, 3, H, W] float 0-255 RGB, the bool masks
    [N, H, W] of every drawn segment, their class ids [N] (index in `scenes.classes`) and image
    index in the batch [N]."""
    images, masks, labels, owners = [], [], [], []
    for batch_index, index in enumerate(indices):
        image, segments = render_image(stream, int(index), scenes)
        images.append(torch.from_numpy(image).permute(2, 0, 1).float())
        for name, mask in segments:
            masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
            labels.append(scenes.classes.index(name))
            owners.append(batch_index)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels), torch.tensor(owners)


def segment_embeddings(
    backbone: OpenCLIPBackbone, images: Tensor, masks: Tensor, owners: Tensor, input_size: int = 0
) -> Tensor:
    """[B, 3, H, W] 0-255 RGB images, [N, H, W] segment masks of image `owners` [N] -> [N, E]
    L2-normalised CLIP embeddings: the masks' coverage of each feature cell weights the mean of
    `pooling_features` (as the segmentation oracle's mask classifier), then `embed_masks`.
    `input_size` > 0 resizes the images (bilinear) to the model's input size first, as the
    config's INPUT.MIN_SIZE_TEST does to the segmentation model's images."""
    if input_size and input_size != images.shape[-1]:
        images = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False)
    mean = images.new_tensor(backbone.pixel_mean).view(1, -1, 1, 1)
    std = images.new_tensor(backbone.pixel_std).view(1, -1, 1, 1)
    features = backbone.pooling_features(backbone((images - mean) / std))
    coverage = F.interpolate(masks[None].float(), size=features.shape[-2:], mode="area")[0]
    embedded = backbone.embed_masks(features[owners], coverage[:, None])[:, 0]
    return F.normalize(embedded, dim=-1)


def synonym_embeddings(
    backbone: OpenCLIPBackbone, templates: Sequence[str], scenes: DemoScenes = DEMO
) -> Tuple[Tensor, Tensor]:
    """[S, E] embeddings of every synonym of the vocabulary of `scenes` (mean over `templates`)
    and the class id of each [S]; differentiable (the backbone's text tower)."""
    embeddings = encode_vocabulary(backbone, scenes.synonyms, templates, per_name=True)
    counts = synonym_counts(scenes.synonyms)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return embeddings, labels.to(embeddings.device)


def logit_scale(backbone: OpenCLIPBackbone) -> Tensor:
    """CLIP's learned temperature, clamped at 100 as in CLIP (and FC-CLIP / MAFT+ at test)."""
    return backbone.clip_model.logit_scale.exp().clamp(max=100.0)


def pretrain(
    backbone: OpenCLIPBackbone,
    templates: Sequence[str],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    log_period: int = 50,
    scenes: DemoScenes = DEMO,
    input_size: int = 0,
) -> List[float]:
    """Train the whole CLIP of `backbone` (image and text towers, temperature) for `steps`
    AdamW steps on batches of `batch_size` "clip_pretrain" renders of `scenes` (step s uses
    images s * batch_size ...), cosine learning rate after 5 % warm-up; returns the loss of every step.

    No weight decay: only the few tokens of the demo vocabulary receive gradients, and decay
    would shrink every other token embedding for nothing."""
    params = list(backbone.clip_model.parameters())
    for param in params:
        param.requires_grad = True
    backbone.clip_model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps)),
    )
    losses = []
    for step in range(steps):
        images, masks, labels, owners = render_batch(
            "clip_pretrain", range(step * batch_size, (step + 1) * batch_size), scenes
        )
        regions = segment_embeddings(backbone, images, masks, owners, input_size)
        texts, text_labels = synonym_embeddings(backbone, templates, scenes)
        logits = logit_scale(backbone) * regions @ texts.t()
        loss = multi_positive_infonce(logits, labels[:, None] == text_labels[None, :])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_period and ((step + 1) % log_period == 0 or step + 1 == steps):
            logger.info(
                "demo CLIP step %d/%d: loss %.4f, logit scale %.1f, lr %.2e",
                step + 1, steps, np.mean(losses[-log_period:]), logit_scale(backbone).item(),
                schedule.get_last_lr()[0],
            )
    backbone.clip_model.eval()
    return losses


@torch.no_grad()
def zero_shot_accuracy(
    backbone: OpenCLIPBackbone,
    templates: Sequence[str],
    num_images: int,
    batch_size: int = 32,
    scenes: DemoScenes = DEMO,
    input_size: int = 0,
) -> Dict[str, float]:
    """Per-class accuracy of classifying the segments of the first `num_images` held-out
    renders ("clip_held_out") of `scenes` by CLIP alone: the class of the synonym most similar to the
    segment's pooled embedding (FC-CLIP's maximum over synonyms)."""
    was_training = backbone.clip_model.training
    backbone.clip_model.eval()
    texts, _ = synonym_embeddings(backbone, templates, scenes)
    counts = synonym_counts(scenes.synonyms)
    num_classes = len(scenes.classes)
    correct = torch.zeros(num_classes)
    total = torch.zeros(num_classes)
    for start in range(0, num_images, batch_size):
        images, masks, labels, owners = render_batch(
            "clip_held_out", range(start, min(start + batch_size, num_images)), scenes
        )
        regions = segment_embeddings(backbone, images, masks, owners, input_size)
        predicted = max_over_synonyms(regions @ texts.t(), counts).argmax(dim=1)
        total += torch.bincount(labels, minlength=num_classes).float()
        correct += torch.bincount(labels[predicted == labels], minlength=num_classes).float()
    backbone.clip_model.train(was_training)
    return {
        name: float(correct[i] / total[i]) if total[i] else float("nan")
        for i, name in enumerate(scenes.classes)
    }
