"""SegPrompt (Zhu et al. ICCV 2023): category-level prompts as auxiliary training of a
class-agnostic Mask2Former.

Three branches share every decoder weight (Fig. 2):
- the class-agnostic baseline branch: the ordinary learnable queries, trained with the
  class-agnostic set loss; it is the only branch at inference, so inference costs nothing
  extra and its outputs do not depend on the auxiliary branches (the baseline queries never
  attend to the extra query groups);
- the prompt-extraction branch (Sec. 3.2): zero-initialised example queries whose masked
  cross-attention is restricted to one ground-truth mask each; their output features update
  the prompt cache by momentum, their masks are supervised by their own ground truth;
- the prompt-based prediction branch (Sec. 3.3): C_max known classes per image, K queries per
  class initialised ``p_c + r_k + s_c``; each class group attends to the baseline queries and
  its own group ("reference attention"), is matched only to ground truth of its class
  (intra-class many-to-one matching) and, for absent classes (negatives), is trained to
  predict "no object" with the classification loss only.

The transformer decoder runs inside `losses` during training because the extra query groups
are built from the targets, which the base `forward` prepares after `forward_heads`.
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import Tensor, nn

from openseg.modeling.losses import SetCriterion
from openseg.modeling.mask_decoder import QueryGroup
from openseg.modeling.meta_arch import OpenSegMaskFormer

from .config import AUXILIARY_MODES, PROMPT_ATTENTIONS
from .matching import MATCHINGS, intra_class_assignment
from .prompt_cache import PromptCache
from .queries import PromptQueryBuilder, select_examples, select_prompt_classes

logger = logging.getLogger(__name__)

Indices = List[Tuple[Tensor, Tensor]]


def known_classes_of_dataset(dataset_name: str) -> List[int]:
    """Contiguous ids of the classes labelled in training: `class_splits["known"]` of the
    dataset's metadata, else every class (`stuff_classes`, else `thing_classes`)."""
    metadata = MetadataCatalog.get(dataset_name)
    splits = metadata.get("class_splits", None)
    if splits and "known" in splits:
        return sorted(int(i) for i in splits["known"])
    classes = metadata.get("stuff_classes", None) or metadata.get("thing_classes", None)
    if not classes:
        raise ValueError(
            f"SegPrompt: dataset '{dataset_name}' (cfg.DATASETS.TRAIN[0]) has neither "
            "class_splits['known'] nor stuff_classes / thing_classes in its metadata; the "
            "prompt cache needs the known classes."
        )
    return list(range(len(classes)))


def concat_query_outputs(outputs: Sequence[Dict]) -> Dict:
    """Concatenate decoder outputs of several query groups along the query dimension
    (final prediction and every ``aux_outputs`` level)."""
    keys = ("pred_logits", "pred_masks", "pred_embeds")
    merged = {key: torch.cat([o[key] for o in outputs], dim=1) for key in keys}
    merged["aux_outputs"] = [
        {key: torch.cat([o["aux_outputs"][level][key] for o in outputs], dim=1) for key in keys}
        for level in range(len(outputs[0]["aux_outputs"]))
    ]
    return merged


@META_ARCH_REGISTRY.register()
class SegPromptMaskFormer(OpenSegMaskFormer):
    """Class-agnostic Mask2Former trained with SegPrompt's auxiliary prompt branches.

    Training targets need per-instance ``gt_classes`` (contiguous ids); only the known classes
    (see `known_classes_of_dataset`) take part in the prompt branches.
    """

    @configurable
    def __init__(
        self,
        *,
        known_classes: Sequence[int],
        auxiliary: str,
        max_examples: int,
        example_mask_weight: float,
        cache_momentum: float,
        max_prompt_classes: int,
        queries_per_class: int,
        prompt_attention: str,
        matching: str,
        use_prompt: bool,
        use_class_embedding: bool,
        vanilla_criterion: Optional[SetCriterion] = None,
        **kwargs,
    ):
        """
        Args:
            known_classes: contiguous ids of the labelled (known) classes; cache row i is
                class known_classes[i].
            auxiliary: "segprompt", "vanilla" (class-aware head on the baseline queries) or
                "none" (plain class-agnostic baseline).
            max_examples: example queries per image.
            example_mask_weight: weight of the example supervision (0 = off).
            cache_momentum: momentum of the prompt cache.
            max_prompt_classes: C_max class groups per image.
            queries_per_class: K queries per class group.
            prompt_attention: "reference", "self" or "shared" (see config.py).
            matching: "many_to_one" or "one_to_one".
            use_prompt, use_class_embedding: include p_c / s_c in the query initialisation.
            vanilla_criterion: class-aware criterion of the "vanilla" mode.
            kwargs: arguments of `OpenSegMaskFormer`.
        """
        super().__init__(**kwargs)
        if not self.class_agnostic:
            raise ValueError(
                "SegPromptMaskFormer improves a class-agnostic model: set "
                "cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC True."
            )
        for name, value, allowed in (
            ("AUXILIARY", auxiliary, AUXILIARY_MODES),
            ("PROMPT_ATTENTION", prompt_attention, PROMPT_ATTENTIONS),
            ("MATCHING", matching, MATCHINGS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"cfg.MODEL.SEGPROMPT.{name}={value!r}; expected one of {allowed}."
                )
        known_classes = sorted(set(int(c) for c in known_classes))
        if not known_classes or known_classes[0] < 0:
            raise ValueError(
                f"SegPrompt: known classes must be non-negative ids, got {known_classes}."
            )
        if auxiliary == "vanilla" and vanilla_criterion is None:
            raise ValueError("SegPrompt: AUXILIARY 'vanilla' needs a vanilla_criterion.")
        self.auxiliary = auxiliary
        self.max_examples = max_examples
        self.example_mask_weight = example_mask_weight
        self.max_prompt_classes = min(max_prompt_classes, len(known_classes))
        self.queries_per_class = queries_per_class
        self.prompt_attention = prompt_attention
        self.matching = matching
        lookup = torch.full((known_classes[-1] + 1,), -1, dtype=torch.int64)
        lookup[torch.tensor(known_classes)] = torch.arange(len(known_classes))
        self.register_buffer("known_row_of_class", lookup, persistent=False)

        hidden_dim = self.transformer_decoder.hidden_dim
        if auxiliary == "segprompt":
            if max_examples <= 0 or max_prompt_classes <= 0:
                raise ValueError(
                    "cfg.MODEL.SEGPROMPT.MAX_EXAMPLES_PER_IMAGE and MAX_PROMPT_CLASSES must be "
                    f"positive, got {max_examples} and {max_prompt_classes}."
                )
            self.prompt_cache = PromptCache(len(known_classes), hidden_dim, cache_momentum)
            self.query_builder = PromptQueryBuilder(
                len(known_classes), hidden_dim, queries_per_class, use_prompt, use_class_embedding
            )
        if auxiliary == "vanilla":
            self.vanilla_head = nn.Linear(hidden_dim, len(known_classes) + 1)
            self.vanilla_criterion = vanilla_criterion

    @classmethod
    def from_config(cls, cfg) -> Dict:
        args = super().from_config(cfg)
        sp = cfg.MODEL.SEGPROMPT
        if not cfg.DATASETS.TRAIN:
            raise ValueError(
                "SegPrompt: cfg.DATASETS.TRAIN is empty; the known classes come from it."
            )
        known = known_classes_of_dataset(cfg.DATASETS.TRAIN[0])
        args.update(
            known_classes=known,
            auxiliary=sp.AUXILIARY,
            max_examples=sp.MAX_EXAMPLES_PER_IMAGE,
            example_mask_weight=sp.EXAMPLE_MASK_WEIGHT,
            cache_momentum=sp.CACHE_MOMENTUM,
            max_prompt_classes=sp.MAX_PROMPT_CLASSES,
            queries_per_class=sp.QUERIES_PER_CLASS,
            prompt_attention=sp.PROMPT_ATTENTION,
            matching=sp.MATCHING,
            use_prompt=sp.USE_PROMPT,
            use_class_embedding=sp.USE_CLASS_EMBEDDING,
        )
        if sp.AUXILIARY == "vanilla":
            args["vanilla_criterion"] = cls.build_vanilla_criterion(cfg, len(known))
        return args

    @staticmethod
    def build_criterion(cfg) -> SetCriterion:
        """The baseline criterion with the weights of the example and prompt loss terms."""
        criterion = OpenSegMaskFormer.build_criterion(cfg)
        mf, sp = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEGPROMPT
        criterion.weight_dict.update(
            {
                "loss_mask_example": mf.MASK_WEIGHT * sp.EXAMPLE_MASK_WEIGHT,
                "loss_dice_example": mf.DICE_WEIGHT * sp.EXAMPLE_MASK_WEIGHT,
                "loss_ce_prompt": mf.CLASS_WEIGHT * sp.PROMPT_BRANCH_WEIGHT,
                "loss_mask_prompt": mf.MASK_WEIGHT * sp.PROMPT_BRANCH_WEIGHT,
                "loss_dice_prompt": mf.DICE_WEIGHT * sp.PROMPT_BRANCH_WEIGHT,
            }
        )
        return criterion

    @staticmethod
    def build_vanilla_criterion(cfg, num_known: int) -> SetCriterion:
        """Class-aware Mask2Former criterion over the known classes ("vanilla" auxiliary),
        its loss keys suffixed ``_vanilla`` and scaled by PROMPT_BRANCH_WEIGHT."""
        class_aware_cfg = cfg.clone()
        class_aware_cfg.defrost()
        class_aware_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_known
        criterion = OpenSegMaskFormer.build_criterion(class_aware_cfg)
        branch_weight = cfg.MODEL.SEGPROMPT.PROMPT_BRANCH_WEIGHT
        criterion.weight_dict = {
            f"{key}_vanilla": weight * branch_weight
            for key, weight in criterion.weight_dict.items()
        }
        return criterion

    # ------------------------------------------------------------------ overridden steps
    def forward_heads(self, features: Dict[str, Tensor]) -> Dict:
        """At inference the baseline heads; in training only the pixel decoder (the
        transformer decoder runs in `losses`, with the auxiliary query groups)."""
        if not self.training:
            return super().forward_heads(features)
        mask_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        return {"mask_features": mask_features, "multi_scale_features": multi_scale_features}

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Class-agnostic targets plus ``known_rows`` [N]: each instance's prompt-cache row
        (-1 for a class outside the known classes)."""
        targets = super().prepare_targets(batched_inputs, images)
        for target, x in zip(targets, batched_inputs):
            target["known_rows"] = self.known_rows(x["instances"].gt_classes.to(self.device))
        return targets

    def losses(self, outputs: Dict, targets: List[Dict]) -> Dict[str, Tensor]:
        """Decode the baseline queries with the auxiliary groups, then every branch's losses."""
        mask_features = outputs["mask_features"]
        groups: List[QueryGroup] = []
        example_plan = prompt_plan = None
        if self.auxiliary == "segprompt":
            example_groups, example_plan = self.example_groups(targets, mask_features)
            prompt_groups, prompt_plan = self.prompt_groups(targets, mask_features)
            groups = example_groups + prompt_groups
        decoded = self.transformer_decoder(
            outputs["multi_scale_features"], mask_features, extra_groups=groups
        )
        losses = self.criterion.weighted(self.criterion(decoded, targets))
        if self.auxiliary == "segprompt":
            num_example_groups = example_plan[1].shape[1]
            example_outputs = concat_query_outputs(decoded["extra"][:num_example_groups])
            prompt_outputs = concat_query_outputs(decoded["extra"][num_example_groups:])
            losses.update(self.example_losses(example_outputs, targets, example_plan))
            losses.update(self.prompt_losses(prompt_outputs, targets, prompt_plan))
        elif self.auxiliary == "vanilla":
            losses.update(self.vanilla_losses(decoded, targets))
        return losses

    # ------------------------------------------------------------------ helpers
    def known_rows(self, classes: Tensor) -> Tensor:
        """Prompt-cache row of each contiguous class id, -1 for classes that are not known."""
        classes = classes.long()
        in_range = (classes >= 0) & (classes < self.known_row_of_class.numel())
        rows = torch.full_like(classes, -1)
        rows[in_range] = self.known_row_of_class[classes[in_range]]
        return rows

    def example_groups(
        self, targets: List[Dict], mask_features: Tensor
    ) -> Tuple[List[QueryGroup], Tuple[List[Tensor], Tensor]]:
        """One single-query group per example slot (so padding slots never influence real
        examples): zero content and position, cross-attention fixed to the example's mask.

        Returns the groups and (per image the selected target indices, slot validity [B, E]).
        """
        batch, dim = mask_features.shape[0], self.transformer_decoder.hidden_dim
        height, width = targets[0]["masks"].shape[-2:]
        fixed = torch.ones(
            batch, self.max_examples, height, width, dtype=torch.bool, device=mask_features.device
        )
        valid = torch.zeros(batch, self.max_examples, dtype=torch.bool, device=mask_features.device)
        selected = []
        for image, target in enumerate(targets):
            chosen = select_examples(target["known_rows"], self.max_examples)
            selected.append(chosen)
            if chosen.numel():
                fixed[image, : chosen.numel()] = target["masks"][chosen.to(target["masks"].device)]
                valid[image, : chosen.numel()] = True
        zeros = mask_features.new_zeros(batch, 1, dim)
        groups = [
            QueryGroup(zeros, zeros, fixed_masks=fixed[:, slot : slot + 1], sees_main=False)
            for slot in range(self.max_examples)
        ]
        return groups, (selected, valid)

    def prompt_groups(
        self, targets: List[Dict], mask_features: Tensor
    ) -> Tuple[List[QueryGroup], Tuple[Tensor, Tensor]]:
        """C_max class groups of K queries ``p_c + r_k + s_c``; with "shared" attention all
        classes form one group. Returns the groups and (rows [B, C], positive [B, C])."""
        present = [t["known_rows"][t["known_rows"] >= 0] for t in targets]
        rows, positive = select_prompt_classes(
            present, self.prompt_cache.num_classes, self.max_prompt_classes
        )
        rows = rows.to(mask_features.device)
        content, pos = self.query_builder(rows, self.prompt_cache.prompts)
        if self.prompt_attention == "shared":
            groups = [QueryGroup(content.flatten(1, 2), pos.flatten(1, 2), sees_main=True)]
        else:
            sees_main = self.prompt_attention == "reference"
            groups = [
                QueryGroup(content[:, slot], pos[:, slot], sees_main=sees_main)
                for slot in range(rows.shape[1])
            ]
        return groups, (rows, positive.to(mask_features.device))

    def example_losses(
        self, outputs: Dict, targets: List[Dict], plan: Tuple[List[Tensor], Tensor]
    ) -> Dict[str, Tensor]:
        """Example supervision (each example query's final mask against its own ground
        truth) and the prompt-cache update with the example features."""
        selected, valid = plan
        indices = [
            (torch.arange(chosen.numel(), dtype=torch.int64), chosen.cpu()) for chosen in selected
        ]
        rows = torch.cat(
            [t["known_rows"][c.to(t["known_rows"].device)] for t, c in zip(targets, selected)]
        )
        self.prompt_cache.update(rows, outputs["pred_embeds"][valid])
        if self.example_mask_weight == 0:
            return {}
        num_masks = self.criterion.get_num_masks(
            [{"labels": chosen} for chosen in selected], outputs["pred_masks"].device
        )
        losses = self.criterion.compute(
            outputs, targets, num_masks, indices=indices, suffix="_example", losses=["masks"]
        )
        return self.criterion.weighted(losses)

    def match_prompts(
        self, outputs: Dict, targets: List[Dict], rows: Tensor, positive: Tensor
    ) -> Indices:
        """Intra-class matching: the K queries of a present class's group against the ground
        truth of that class; negative groups stay unmatched ("no object")."""
        per_class = self.queries_per_class
        indices = []
        for image, target in enumerate(targets):
            query_parts, target_parts = [], []
            for slot in torch.nonzero(positive[image]).flatten().tolist():
                gt = torch.nonzero(target["known_rows"] == rows[image, slot]).flatten()
                queries = slice(slot * per_class, (slot + 1) * per_class)
                cost = self.criterion.matcher.cost_matrix(
                    outputs["pred_logits"][image, queries],
                    outputs["pred_masks"][image, queries],
                    torch.zeros_like(gt),
                    target["masks"][gt],
                )
                query_idx, target_idx = intra_class_assignment(cost, self.matching)
                query_parts.append(query_idx + slot * per_class)
                target_parts.append(gt.cpu()[target_idx])
            if query_parts:
                query_idx, target_idx = torch.cat(query_parts), torch.cat(target_parts)
            else:
                query_idx = target_idx = torch.zeros(0, dtype=torch.int64)
            indices.append((query_idx, target_idx))
        return indices

    def prompt_losses(
        self, outputs: Dict, targets: List[Dict], plan: Tuple[Tensor, Tensor]
    ) -> Dict[str, Tensor]:
        """Classification (all groups) and mask losses (matched queries) of the prompt-based
        prediction branch, for the final prediction and each deep-supervision level."""
        rows, positive = plan
        levels = [("_prompt", outputs)]
        if self.criterion.deep_supervision:
            levels += [(f"_prompt_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]
        losses = {}
        num_masks = None
        for suffix, level_outputs in levels:
            indices = self.match_prompts(level_outputs, targets, rows, positive)
            if num_masks is None:
                num_masks = self.criterion.get_num_masks(
                    [{"labels": query_idx} for query_idx, _ in indices],
                    level_outputs["pred_masks"].device,
                )
            losses.update(
                self.criterion.compute(
                    level_outputs, targets, num_masks, indices=indices, suffix=suffix
                )
            )
        return self.criterion.weighted(losses)

    def vanilla_losses(self, decoded: Dict, targets: List[Dict]) -> Dict[str, Tensor]:
        """Class-aware Mask2Former losses of the baseline queries over the known classes
        (Table 5, "vanilla M2F auxiliary"): a separate class head, its own matching."""
        known_targets = [
            {
                "labels": t["known_rows"][t["known_rows"] >= 0],
                "masks": t["masks"][t["known_rows"] >= 0],
            }
            for t in targets
        ]

        def class_aware(level: Dict) -> Dict:
            return {
                "pred_logits": self.vanilla_head(level["pred_embeds"]),
                "pred_masks": level["pred_masks"],
            }

        criterion = self.vanilla_criterion
        num_masks = criterion.get_num_masks(known_targets, decoded["pred_masks"].device)
        losses = criterion.compute(
            class_aware(decoded), known_targets, num_masks, suffix="_vanilla"
        )
        if criterion.deep_supervision:
            for i, aux in enumerate(decoded["aux_outputs"]):
                losses.update(
                    criterion.compute(
                        class_aware(aux), known_targets, num_masks, suffix=f"_vanilla_{i}"
                    )
                )
        return criterion.weighted(losses)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, auxiliary={self.auxiliary}, "
            f"max_examples={self.max_examples}, C_max={self.max_prompt_classes}, "
            f"K={self.queries_per_class}, prompt_attention={self.prompt_attention}, "
            f"matching={self.matching}"
        )
