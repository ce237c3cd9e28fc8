"""SegPrompt (Zhu et al. ICCV 2023): category-level prompts as auxiliary training of a
class-agnostic Mask2Former.

Three branches share every decoder weight (Fig. 2) and run in one decoder forward as query
groups (`openseg.modeling.mask_decoder.QueryGroup`):
- the class-agnostic baseline branch (Sec. 3.2): the ordinary learnable queries, trained with
  the class-agnostic set loss; the only branch at inference, and (except in the Table 7
  "SelfAttn" ablation) never reading the other groups, so its outputs do not depend on them;
- the prompt-extraction branch (Sec. 3.3): zero-initialised example queries whose masked
  cross-attention is fixed to one ground-truth mask each (Eq. 3) and which self-attend to each
  other, not to the baseline (Eq. 4); their final states update the prompt cache (Eq. 5), and
  "example supervision" trains their class ("object") and mask at every decoder level;
- the prompt-based prediction branch (Sec. 3.4): C_max known classes per image, K queries per
  class initialised ``p_c + r_k + s_c`` (Eq. 6); with reference attention (Eq. 7) a class
  group reads the baseline queries and itself. Intra-class Hungarian matching (the release's
  single assignment with costly cross-class pairs, `matching.py`); matched queries are
  "object" with the mask loss, unmatched and negative-class queries "no object" without mask
  loss; with LVIS's federated labels, positive classes that are not exhaustively annotated
  (or not among the image's examples) are "object" without matching (release).

The "Vanilla M2F" auxiliary of Table 5 instead decodes a parallel copy of the baseline
queries (every weight shared) whose own class head is trained class-aware on the known
classes. The transformer decoder runs inside `losses` during training because the extra
query groups are built from the targets, which the base `forward` prepares after
`forward_heads`.
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

from .config import AUXILIARY_MODES, NEGATIVE_POOLS, PROMPT_ATTENTIONS
from .matching import class_restricted_assignment
from .prompt_cache import PromptCache
from .queries import (
    PromptQueryBuilder,
    select_examples,
    select_prompt_classes,
    supervised_classes,
)

logger = logging.getLogger(__name__)

Indices = List[Tuple[Tensor, Tensor]]
OUTPUT_KEYS = ("pred_logits", "pred_masks", "pred_embeds", "pred_queries")
# dataset-dict keys of LVIS's federated labels in contiguous ids (openseg.data.datasets.lvis)
# -> target keys
FEDERATED_INPUTS = {"not_exhaustive_classes": "not_exhaustive", "neg_classes": "negative"}


def known_classes_of_dataset(dataset_name: str) -> Tuple[List[int], int]:
    """Contiguous ids of the classes labelled in training (`class_splits["known"]` of the
    dataset's metadata, else every class) and the number of classes of the dataset
    (`stuff_classes`, else `thing_classes`)."""
    metadata = MetadataCatalog.get(dataset_name)
    classes = metadata.get("stuff_classes", None) or metadata.get("thing_classes", None)
    if not classes:
        raise ValueError(
            f"SegPrompt: dataset '{dataset_name}' (cfg.DATASETS.TRAIN[0]) has no stuff_classes "
            "/ thing_classes in its metadata; the prompt cache needs the classes."
        )
    splits = metadata.get("class_splits", None)
    if splits and "known" in splits:
        return sorted(int(i) for i in splits["known"]), len(classes)
    return list(range(len(classes))), len(classes)


def concat_query_outputs(outputs: Sequence[Dict]) -> Dict:
    """Concatenate decoder outputs of several query groups along the query dimension
    (final prediction and every ``aux_outputs`` level)."""
    merged = {key: torch.cat([o[key] for o in outputs], dim=1) for key in OUTPUT_KEYS}
    merged["aux_outputs"] = [
        {
            key: torch.cat([o["aux_outputs"][level][key] for o in outputs], dim=1)
            for key in OUTPUT_KEYS
        }
        for level in range(len(outputs[0]["aux_outputs"]))
    ]
    return merged


def output_levels(outputs: Dict, deep_supervision: bool) -> List[Tuple[str, Dict]]:
    """(key suffix, outputs) of the final prediction and, with deep supervision, of every
    intermediate one: ("", final), ("_0", first aux), ..."""
    levels = [("", outputs)]
    if deep_supervision:
        levels += [(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]
    return levels


@META_ARCH_REGISTRY.register()
class SegPromptMaskFormer(OpenSegMaskFormer):
    """Class-agnostic Mask2Former trained with SegPrompt's auxiliary prompt branches.

    Training targets need per-instance ``gt_classes`` (contiguous ids); only the known classes
    (see `known_classes_of_dataset`) take part in the prompt branches. Input dicts may carry
    LVIS's federated labels (``not_exhaustive_classes``, ``neg_classes``: contiguous ids, see
    `openseg.data.datasets.lvis`); as in the release they steer the class selection only when
    the training set has classes that are not known (LVIS-OW; the release reads them when its
    `out_voc_id_set` is not empty, i.e. not on full LVIS).
    """

    @configurable
    def __init__(
        self,
        *,
        known_classes: Sequence[int],
        num_dataset_classes: int,
        auxiliary: str,
        max_examples: int,
        example_supervision: bool,
        cache_momentum: float,
        max_prompt_classes: int,
        queries_per_class: int,
        min_mask_area: int,
        negative_pool: str = "all",
        prompt_attention: str,
        use_prompt: bool,
        use_class_embedding: bool,
        prompt_projection: bool,
        rank_embedding: str,
        vanilla_criterion: Optional[SetCriterion] = None,
        **kwargs,
    ):
        """
        Args:
            known_classes: contiguous ids of the labelled (known) classes.
            num_dataset_classes: number of classes of the training set. As in the release,
                the prompt cache and the class embeddings s_c have one row per class of the
                dataset (row = contiguous class id; only known rows are used), so the release's
                LVIS tables load row for row.
            auxiliary: "segprompt", "vanilla_m2f" or "none" (Table 5).
            max_examples: example queries per image.
            example_supervision: train the example queries' class and mask.
            cache_momentum: momentum m of the prompt cache (Eq. 5).
            max_prompt_classes: C_max class groups per image.
            negative_pool: "all" (every class of the dataset, release) or "known": the
                classes random negative groups are drawn from.
            queries_per_class: K queries per class group.
            min_mask_area: known instances of at most this many pixels are dropped from the
                training targets (release MIN_MASK_AREA; not applied with auxiliary "none").
            prompt_attention: one of `PROMPT_ATTENTIONS` (Table 7).
            use_prompt, use_class_embedding, prompt_projection, rank_embedding: Eq. 6 terms,
                see `PromptQueryBuilder`.
            vanilla_criterion: class-aware criterion of the "vanilla_m2f" mode.
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
            ("NEGATIVE_POOL", negative_pool, NEGATIVE_POOLS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"cfg.MODEL.SEGPROMPT.{name}={value!r}; expected one of {allowed}."
                )
        known_classes = sorted(set(int(c) for c in known_classes))
        if not known_classes or known_classes[0] < 0 or known_classes[-1] >= num_dataset_classes:
            raise ValueError(
                f"SegPrompt: known classes must be ids in [0, {num_dataset_classes}), got "
                f"{known_classes}."
            )
        if auxiliary == "vanilla_m2f" and vanilla_criterion is None:
            raise ValueError("SegPrompt: AUXILIARY 'vanilla_m2f' needs a vanilla_criterion.")
        self.auxiliary = auxiliary
        self.max_examples = max_examples
        self.example_supervision = example_supervision
        self.negative_pool = (
            list(range(num_dataset_classes)) if negative_pool == "all" else known_classes
        )
        self.max_prompt_classes = min(max_prompt_classes, len(self.negative_pool))
        self.queries_per_class = queries_per_class
        self.min_mask_area = min_mask_area
        self.prompt_attention = prompt_attention
        self.known_classes = known_classes
        self.federated_labels = len(known_classes) < num_dataset_classes
        is_known = torch.zeros(num_dataset_classes, dtype=torch.bool)
        is_known[torch.tensor(known_classes)] = True
        self.register_buffer("is_known", is_known, persistent=False)

        hidden_dim = self.transformer_decoder.hidden_dim
        if auxiliary == "segprompt":
            if max_examples <= 0 or max_prompt_classes <= 0:
                raise ValueError(
                    "cfg.MODEL.SEGPROMPT.MAX_EXAMPLES_PER_IMAGE and MAX_PROMPT_CLASSES must be "
                    f"positive, got {max_examples} and {max_prompt_classes}."
                )
            self.prompt_cache = PromptCache(num_dataset_classes, hidden_dim, cache_momentum)
            self.query_builder = PromptQueryBuilder(
                num_dataset_classes,
                hidden_dim,
                queries_per_class,
                use_prompt=use_prompt,
                use_class_embedding=use_class_embedding,
                prompt_projection=prompt_projection,
                rank_embedding=rank_embedding,
            )
        if auxiliary == "vanilla_m2f":
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
        known, num_dataset_classes = known_classes_of_dataset(cfg.DATASETS.TRAIN[0])
        args.update(
            known_classes=known,
            num_dataset_classes=num_dataset_classes,
            auxiliary=sp.AUXILIARY,
            max_examples=sp.MAX_EXAMPLES_PER_IMAGE,
            example_supervision=sp.EXAMPLE_SUPERVISION,
            cache_momentum=sp.CACHE_MOMENTUM,
            max_prompt_classes=sp.MAX_PROMPT_CLASSES,
            queries_per_class=sp.QUERIES_PER_CLASS,
            min_mask_area=sp.MIN_MASK_AREA,
            negative_pool=sp.NEGATIVE_POOL,
            prompt_attention=sp.PROMPT_ATTENTION,
            use_prompt=sp.USE_PROMPT,
            use_class_embedding=sp.USE_CLASS_EMBEDDING,
            prompt_projection=sp.PROMPT_PROJECTION,
            rank_embedding=sp.RANK_EMBEDDING,
        )
        if sp.AUXILIARY == "vanilla_m2f":
            args["vanilla_criterion"] = cls.build_vanilla_criterion(cfg, len(known))
        return args

    @staticmethod
    def branch_weights(cfg) -> Dict[str, float]:
        """Class / mask / dice weights of the prompt-based branch: the baseline's times
        PROMPT_BRANCH_WEIGHT (release OPEN_BRANCH_WEIGHT)."""
        mf, multipliers = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEGPROMPT.PROMPT_BRANCH_WEIGHT
        if len(multipliers) != 3:
            raise ValueError(
                "cfg.MODEL.SEGPROMPT.PROMPT_BRANCH_WEIGHT must be [class, mask, dice] "
                f"multipliers, got {list(multipliers)}."
            )
        c, m, d = multipliers
        return {
            "loss_ce": mf.CLASS_WEIGHT * c,
            "loss_mask": mf.MASK_WEIGHT * m,
            "loss_dice": mf.DICE_WEIGHT * d,
        }

    @staticmethod
    def build_criterion(cfg) -> SetCriterion:
        """The baseline criterion plus the weights of the example (baseline weights, as
        released) and prompt loss terms."""
        criterion = OpenSegMaskFormer.build_criterion(cfg)
        mf = cfg.MODEL.MASK_FORMER
        criterion.weight_dict.update(
            {
                "loss_ce_example": mf.CLASS_WEIGHT,
                "loss_mask_example": mf.MASK_WEIGHT,
                "loss_dice_example": mf.DICE_WEIGHT,
            }
        )
        criterion.weight_dict.update(
            {f"{key}_prompt": w for key, w in SegPromptMaskFormer.branch_weights(cfg).items()}
        )
        return criterion

    @staticmethod
    def build_vanilla_criterion(cfg, num_known: int) -> SetCriterion:
        """Class-aware Mask2Former criterion over the known classes ("vanilla_m2f"), its loss
        keys suffixed ``_vanilla`` and weighted like the prompt-based branch."""
        class_aware_cfg = cfg.clone()
        class_aware_cfg.defrost()
        class_aware_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_known
        class_aware_cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC = False
        criterion = OpenSegMaskFormer.build_criterion(class_aware_cfg)
        criterion.weight_dict = {
            f"{key}_vanilla": w for key, w in SegPromptMaskFormer.branch_weights(cfg).items()
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
        """Class-agnostic targets plus ``known_rows`` [N]: each instance's class id if the class
        is known, else -1 (the prompt-cache row). With an auxiliary branch, known instances
        of at most MIN_MASK_AREA pixels are dropped (release `SegPrompt.forward`). Also
        ``not_exhaustive`` and ``negative``: the image's federated class ids (int64; empty
        without them or when `federated_labels` is off). With the prompt branch,
        ``prompt_gt``: the prompt branch's ground truth, every instance before that filter
        (``labels``, ``masks`` and ``classes``, the contiguous class ids), as the release's
        prompt criterion receives it."""
        targets = super().prepare_targets(batched_inputs, images)
        for target, x in zip(targets, batched_inputs):
            for key, target_key in FEDERATED_INPUTS.items():
                ids = x.get(key, []) if self.federated_labels else []
                target[target_key] = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
            classes = x["instances"].gt_classes.to(self.device).long()
            rows = self.known_rows(classes)
            if self.auxiliary == "segprompt":
                target["prompt_gt"] = {
                    "labels": target["labels"],
                    "masks": target["masks"],
                    "classes": classes,
                }
            if self.auxiliary != "none":
                area = target["masks"].flatten(1).sum(dim=1)
                keep = (rows < 0) | (area > self.min_mask_area)
                target["labels"], target["masks"], rows = (
                    target["labels"][keep],
                    target["masks"][keep],
                    rows[keep],
                )
            target["known_rows"] = rows
        return targets

    def losses(self, outputs: Dict, targets: List[Dict]) -> Dict[str, Tensor]:
        """Decode the baseline queries with the auxiliary groups, then every branch's losses."""
        mask_features = outputs["mask_features"]
        groups: List[QueryGroup] = []
        if self.auxiliary == "segprompt":
            example_group, selected = self.example_group(targets, mask_features)
            prompt_groups, prompt_plan = self.prompt_groups(targets, mask_features, selected)
            groups = [example_group] + prompt_groups
        elif self.auxiliary == "vanilla_m2f":
            groups = [self.vanilla_group(mask_features)]
        decoded = self.transformer_decoder(
            outputs["multi_scale_features"], mask_features, extra_groups=groups
        )
        losses = self.criterion.weighted(self.criterion(decoded, targets))
        if self.auxiliary == "segprompt":
            prompt_outputs = concat_query_outputs(decoded["extra"][1:])
            losses.update(self.example_losses(decoded["extra"][0], targets, selected))
            prompt_gt = [t["prompt_gt"] for t in targets]
            losses.update(self.prompt_losses(prompt_outputs, prompt_gt, prompt_plan))
        elif self.auxiliary == "vanilla_m2f":
            losses.update(self.vanilla_losses(decoded["extra"][0], targets))
        return losses

    # ------------------------------------------------------------------ helpers
    def known_rows(self, classes: Tensor) -> Tensor:
        """Prompt-cache row (= the class id) of each contiguous class id, -1 for classes that
        are not known."""
        classes = classes.long()
        in_range = (classes >= 0) & (classes < self.is_known.numel())
        rows = torch.full_like(classes, -1)
        known = in_range.clone()
        known[in_range] = self.is_known[classes[in_range]]
        rows[known] = classes[known]
        return rows

    def fully_visible(self) -> bool:
        """Table 7 row 1 ("SelfAttn"): every query reads every other, baseline included."""
        return self.prompt_attention == "SelfAttn"

    def example_group(
        self, targets: List[Dict], mask_features: Tensor
    ) -> Tuple[QueryGroup, List[Tensor]]:
        """One group of `max_examples` zero-initialised example queries per image (Eq. 3-4):
        cross-attention fixed to the example's ground-truth mask, self-attention among the
        image's example queries. As released, unused slots stay in the group as zero queries
        with an empty mask (they attend everywhere).

        Returns the group and, per image, the selected target indices (slot i = index i)."""
        batch, dim = mask_features.shape[0], self.transformer_decoder.hidden_dim
        height, width = targets[0]["masks"].shape[-2:]
        fixed = torch.zeros(
            batch, self.max_examples, height, width, dtype=torch.bool, device=mask_features.device
        )
        selected = []
        for image, target in enumerate(targets):
            chosen = select_examples(target["known_rows"], self.max_examples)
            selected.append(chosen)
            if chosen.numel():
                fixed[image, : chosen.numel()] = target["masks"][chosen.to(target["masks"].device)]
        zeros = mask_features.new_zeros(batch, self.max_examples, dim)
        visible = self.fully_visible()
        group = QueryGroup(
            zeros,
            zeros,
            fixed_masks=fixed,
            sees_main=visible,
            seen_by_main=visible,
            sees_other_groups=visible,
        )
        return group, selected

    def prompt_groups(
        self, targets: List[Dict], mask_features: Tensor, selected: List[Tensor]
    ) -> Tuple[List[QueryGroup], Tuple[Tensor, Tensor, Tensor]]:
        """C_max class groups of K queries ``p_c + r_k + s_c`` arranged for the Table 7
        attention variant; `selected` are the example indices of each image.

        Returns the groups and (rows [B, C], positive [B, C], supervised [B, C]), see
        `select_prompt_classes` and `supervised_classes`."""
        # present: known classes with eligible instances, and (release `labels_ouv`) the
        # classes of instances that are not known
        present = [
            torch.cat(
                [
                    t["known_rows"][t["known_rows"] >= 0],
                    t["prompt_gt"]["classes"][self.known_rows(t["prompt_gt"]["classes"]) < 0],
                ]
            )
            for t in targets
        ]
        none = torch.zeros(0, dtype=torch.int64)
        not_exhaustive = [t.get("not_exhaustive", none) for t in targets]
        negative = [t.get("negative", none) for t in targets]
        rows, positive = select_prompt_classes(
            present,
            self.negative_pool,
            self.max_prompt_classes,
            not_exhaustive=not_exhaustive,
            negative=negative,
        )
        example_rows = [
            t["known_rows"].cpu()[chosen.cpu()] for t, chosen in zip(targets, selected)
        ]
        supervised = supervised_classes(rows, example_rows, not_exhaustive, negative)
        rows = rows.to(mask_features.device)
        decoder = self.transformer_decoder
        content, pos = self.query_builder(
            rows, self.prompt_cache.prompts, decoder.query_feat.weight, decoder.query_embed.weight
        )
        attention = self.prompt_attention
        if attention in ("SelfAttn", "RefAttn_inter_class_visible"):
            visible = attention == "SelfAttn"
            groups = [
                QueryGroup(
                    content.flatten(1, 2),
                    pos.flatten(1, 2),
                    sees_main=True,
                    seen_by_main=visible,
                    sees_other_groups=visible,
                )
            ]
        else:
            sees_main = attention == "RefAttn_inter_class_invisible"
            groups = [
                QueryGroup(content[:, slot], pos[:, slot], sees_main=sees_main)
                for slot in range(rows.shape[1])
            ]
        device = mask_features.device
        return groups, (rows, positive.to(device), supervised.to(device))

    def vanilla_group(self, mask_features: Tensor) -> QueryGroup:
        """Table 5 "Vanilla M2F": a parallel copy of the baseline queries (same learnable
        query weights) that, like the prompt-based branch, reads the baseline queries."""
        decoder = self.transformer_decoder
        batch = mask_features.shape[0]
        return QueryGroup(
            decoder.query_feat.weight[None].expand(batch, -1, -1),
            decoder.query_embed.weight[None].expand(batch, -1, -1),
            sees_main=True,
        )

    def example_losses(
        self, outputs: Dict, targets: List[Dict], selected: List[Tensor]
    ) -> Dict[str, Tensor]:
        """Prompt-cache update with the example queries' final states (Eq. 5) and example
        supervision: slot i is "object" with the mask of its example, unused slots are
        "no object", at every decoder level (release `SetCriterion_Example`)."""
        valid = torch.zeros(outputs["pred_queries"].shape[:2], dtype=torch.bool)
        for image, chosen in enumerate(selected):
            valid[image, : chosen.numel()] = True
        rows = torch.cat(
            [t["known_rows"][c.to(t["known_rows"].device)] for t, c in zip(targets, selected)]
        )
        self.prompt_cache.update(rows, outputs["pred_queries"][valid.to(rows.device)])
        if not self.example_supervision:
            return {}
        indices = [
            (torch.arange(chosen.numel(), dtype=torch.int64), chosen.cpu()) for chosen in selected
        ]
        num_masks = self.criterion.get_num_masks(
            [{"labels": chosen} for chosen in selected], outputs["pred_masks"].device
        )
        losses = {}
        for suffix, level in output_levels(outputs, self.criterion.deep_supervision):
            losses.update(
                self.criterion.compute(
                    level, targets, num_masks, indices=indices, suffix="_example" + suffix
                )
            )
        return self.criterion.weighted(losses)

    def match_prompts(self, outputs: Dict, prompt_gt: List[Dict], rows: Tensor) -> Indices:
        """Intra-class matching (Sec. 3.4) as released (`HungarianMatcherClasswise`): per
        image one Hungarian assignment of all prompt queries (query q belongs to the class of
        group q // K) to all ground truth (``prompt_gt``: ``labels``, ``masks``, ``classes``
        per image), pairs of different classes at the release's cross-class cost
        (`matching.class_restricted_assignment`); one set of cost points per image. Pairs of
        any group are returned; `prompt_losses` decides which are supervised."""
        query_classes = rows.repeat_interleave(self.queries_per_class, dim=1)
        matcher = self.criterion.matcher
        indices = []
        for image, target in enumerate(prompt_gt):
            cost = matcher.cost_matrix(
                outputs["pred_logits"][image],
                outputs["pred_masks"][image],
                torch.zeros_like(target["labels"]),
                target["masks"],
            )
            indices.append(
                class_restricted_assignment(cost, query_classes[image], target["classes"])
            )
        return indices

    def prompt_losses(
        self, outputs: Dict, prompt_gt: List[Dict], plan: Tuple[Tensor, Tensor, Tensor]
    ) -> Dict[str, Tensor]:
        """Classification (every query) and mask losses of the prompt-based prediction branch
        against ``prompt_gt`` (see `match_prompts`), matched anew at every decoder level;
        normalised, as released (`SetCriterion_Open`), by the number of its ground-truth
        masks in the batch.

        As released (`QUERY_REPEAT_ONLY_MATCH`): in a supervised group (`supervised_classes`)
        the matched queries are "object" with the mask loss of their ground truth (also a
        surplus ground truth of another class, see `matching.py`) and the others "no object";
        every query of a positive group that is not supervised (not-exhaustive LVIS class, or
        not among the examples) is "object" without mask loss; negative groups are "no
        object", whatever they were matched to."""
        rows, positive, supervised = plan
        per_class = self.queries_per_class
        query_supervised = supervised.repeat_interleave(per_class, dim=1).cpu()
        always_object = (positive & ~supervised).repeat_interleave(per_class, dim=1).cpu()
        num_masks = self.criterion.get_num_masks(prompt_gt, outputs["pred_masks"].device)
        losses = {}
        for suffix, level in output_levels(outputs, self.criterion.deep_supervision):
            mask_pairs, object_pairs, object_targets = [], [], []
            matched = self.match_prompts(level, prompt_gt, rows)
            for image, (query_idx, target_idx) in enumerate(matched):
                keep = query_supervised[image][query_idx]
                mask_pairs.append((query_idx[keep], target_idx[keep]))
                objects = torch.cat(
                    [query_idx[keep], torch.nonzero(always_object[image]).flatten()]
                )
                object_pairs.append((objects, torch.arange(objects.numel())))
                object_targets.append({"labels": torch.zeros(objects.numel(), dtype=torch.int64)})
            losses.update(
                self.criterion.compute(
                    level, object_targets, num_masks, indices=object_pairs,
                    suffix="_prompt" + suffix, losses=["labels"],
                )
            )
            losses.update(
                self.criterion.compute(
                    level, prompt_gt, num_masks, indices=mask_pairs,
                    suffix="_prompt" + suffix, losses=["masks"],
                )
            )
        return self.criterion.weighted(losses)

    def vanilla_losses(self, outputs: Dict, targets: List[Dict]) -> Dict[str, Tensor]:
        """Class-aware Mask2Former losses of the parallel branch over the known classes (Table
        5 "Vanilla M2F"): its own class head on the shared decoder, its own matching."""
        index_of_class = torch.full_like(self.is_known, -1, dtype=torch.int64)
        index_of_class[self.is_known] = torch.arange(
            len(self.known_classes), device=self.is_known.device
        )
        known_targets = [
            {
                "labels": index_of_class[t["known_rows"][t["known_rows"] >= 0]],
                "masks": t["masks"][t["known_rows"] >= 0],
            }
            for t in targets
        ]
        criterion = self.vanilla_criterion
        num_masks = criterion.get_num_masks(known_targets, outputs["pred_masks"].device)
        losses = {}
        for suffix, level in output_levels(outputs, criterion.deep_supervision):
            class_aware = {
                "pred_logits": self.vanilla_head(level["pred_embeds"]),
                "pred_masks": level["pred_masks"],
            }
            losses.update(
                criterion.compute(class_aware, known_targets, num_masks, suffix="_vanilla" + suffix)
            )
        return criterion.weighted(losses)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, auxiliary={self.auxiliary}, "
            f"max_examples={self.max_examples}, C_max={self.max_prompt_classes}, "
            f"K={self.queries_per_class}, prompt_attention={self.prompt_attention}"
        )
