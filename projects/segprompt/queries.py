"""Query construction of SegPrompt's auxiliary branches (Zhu et al. ICCV 2023, Sec. 3.3-3.4).

Prompt-extraction branch (Sec. 3.3): at most `max_examples` ground-truth instances per image
become zero-initialised example queries, distinct classes first. The paper only says "we
prioritize different classes"; the choice among instances follows the release
(`SegPrompt.forward`): the first instance of each class (classes in id order); more classes
than slots: a random subset of classes; fewer: the remaining slots filled with random other
instances; no more instances than slots: all of them in annotation order.

Prompt-based prediction branch (Sec. 3.4): C_max classes per image (`select_prompt_classes`),
as the release's `SegPrompt.forward` with LVIS's federated labels: positives are the classes
present (known classes with eligible instances, and classes of instances that are not known)
and the image's not-exhaustively annotated classes, in id order (at most C_max); then the
classes verified absent (LVIS `neg_category_ids`), in id order; then random negatives from a
pool (release: every class of the vocabulary; or the known classes). The paper only says
"negative categories are uniformly selected from all negative classes". Of the positives,
only the classes of the image's examples that are neither not-exhaustive nor verified absent
take part in matching and the mask loss (`supervised_classes`, the release's
`mask_loss_masks`); the others' K queries are all "object". Query k of class c starts as
``p_c + r_k + s_c`` (Eq. 6), content and positional part alike.
"""

import random
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

RANK_EMBEDDINGS = ("baseline_queries", "learned")


def select_examples(rows: Tensor, max_examples: int, rng: Optional[random.Random] = None) -> Tensor:
    """Ground-truth indices to extract prompts from (see the module docstring).

    Args:
        rows: [M] class id of each ground truth, -1 for instances that do not take part
            (class not known, or too small).
        max_examples: example slots per image.
        rng: source of randomness (default: Python's global `random`, like the release).
    Returns:
        int64 CPU indices into `rows`, at most `max_examples`.
    """
    rng = rng or random
    rows = rows.cpu()
    candidates = torch.nonzero(rows >= 0).flatten()
    if candidates.numel() == 0 or max_examples <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if candidates.numel() < max_examples:
        return candidates
    candidate_rows = rows[candidates]
    classes = torch.unique(candidate_rows)
    first = torch.stack([candidates[candidate_rows == c][0] for c in classes])
    if classes.numel() >= max_examples:
        return first[torch.tensor(rng.sample(range(classes.numel()), max_examples))]
    others = sorted(set(candidates.tolist()) - set(first.tolist()))
    fill = rng.sample(others, max_examples - classes.numel())
    return torch.cat([first, torch.tensor(fill, dtype=torch.int64)])


def select_prompt_classes(
    present: List[Tensor],
    pool: List[int],
    max_classes: int,
    rng: Optional[random.Random] = None,
    not_exhaustive: Optional[List[Tensor]] = None,
    negative: Optional[List[Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """Classes of each image's C_max prompt groups (see the module docstring).

    Args:
        present: per image, the class ids of its ground truth that make a class present.
        pool: ids of the classes random negatives are drawn from.
        max_classes: C_max, groups per image (at most len(pool)).
        rng: source of randomness (default: Python's global `random`, like the release).
        not_exhaustive, negative: per image, LVIS's not-exhaustive / verified-absent class ids
            (any class of the dataset; None or empty: none).
    Returns:
        class ids [B, C_max] int64 and positive [B, C_max] bool.

    As released, positives (present + not exhaustive) come first, then the verified-absent
    classes, then random negatives from the pool classes in none of them; the release draws
    one random negative more than it needs, sorts them and keeps the smallest (its candidate
    list is cut to C_max after the draw), which this reproduces.
    """
    if not 0 < max_classes <= len(pool):
        raise ValueError(
            f"C_max={max_classes} must be in [1, {len(pool)}] (number of classes negatives are "
            "drawn from); check cfg.MODEL.SEGPROMPT.MAX_PROMPT_CLASSES / NEGATIVE_POOL."
        )
    rng = rng or random
    empty = torch.zeros(0, dtype=torch.int64)
    not_exhaustive = not_exhaustive or [empty] * len(present)
    negative = negative or [empty] * len(present)
    all_ids, all_positive = [], []
    for ids, extra, absent in zip(present, not_exhaustive, negative):
        positives = torch.unique(torch.cat([ids.cpu().long(), extra.cpu().long()]))
        verified = torch.unique(absent.cpu().long())
        chosen = torch.cat([positives, verified])[:max_classes]
        missing = max_classes - chosen.numel()
        if missing > 0:
            absent = sorted(set(pool) - set(positives.tolist()) - set(verified.tolist()))
            drawn = sorted(rng.sample(absent, min(missing + 1, len(absent))))[:missing]
            chosen = torch.cat([chosen, torch.tensor(drawn, dtype=torch.int64)])
        all_ids.append(chosen)
        all_positive.append(torch.arange(max_classes) < positives.numel())
    return torch.stack(all_ids), torch.stack(all_positive)


def supervised_classes(
    rows: Tensor,
    example_rows: List[Tensor],
    not_exhaustive: Optional[List[Tensor]] = None,
    negative: Optional[List[Tensor]] = None,
) -> Tensor:
    """[B, C] bool: the group's class takes part in matching and the mask loss.

    As the release's `mask_loss_masks`: the class is one of the image's example classes
    (`select_examples`; with more classes than example slots, only the sampled ones) and in
    neither federated list. The queries of a positive group that is not supervised are all
    "object" without mask loss (release `SetCriterion_Open`, `QUERY_REPEAT_ONLY_MATCH`).
    """
    empty = torch.zeros(0, dtype=torch.int64)
    not_exhaustive = not_exhaustive or [empty] * len(example_rows)
    negative = negative or [empty] * len(example_rows)
    result = []
    for image_rows, examples, extra, absent in zip(rows, example_rows, not_exhaustive, negative):
        allowed = examples.to(image_rows.device)
        excluded = torch.cat([extra, absent]).to(image_rows.device)
        result.append(torch.isin(image_rows, allowed) & ~torch.isin(image_rows, excluded))
    return torch.stack(result)


class PromptQueryBuilder(nn.Module):
    """Initial content and positional embedding ``p_c + r_k + s_c`` (Eq. 6).

    As released: p_c is the cached prompt itself (the release's `EXAMPLE_QUERY_PROJ` off; with
    `prompt_projection` a linear layer each for content and position), s_c a learnable
    embedding per known class (one for content, one for position), r_k the baseline's
    learnable query feature / embedding at K distinct indices drawn at random per class group
    in every forward (`rank_embedding="baseline_queries"`, the release's default), or K
    learnable embeddings of its own (`"learned"`, the release's `ADDTIONAL_QUERY`).
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        queries_per_class: int,
        use_prompt: bool = True,
        use_class_embedding: bool = True,
        prompt_projection: bool = False,
        rank_embedding: str = "baseline_queries",
    ):
        super().__init__()
        if queries_per_class <= 0:
            raise ValueError(
                f"K={queries_per_class} queries per class must be positive "
                "(cfg.MODEL.SEGPROMPT.QUERIES_PER_CLASS)."
            )
        if rank_embedding not in RANK_EMBEDDINGS:
            raise ValueError(
                f"cfg.MODEL.SEGPROMPT.RANK_EMBEDDING={rank_embedding!r}; expected one of "
                f"{RANK_EMBEDDINGS}."
            )
        self.queries_per_class = queries_per_class
        self.hidden_dim = hidden_dim
        self.use_prompt = use_prompt
        self.use_class_embedding = use_class_embedding
        self.rank_embedding = rank_embedding
        if rank_embedding == "learned":
            self.rank_content = nn.Embedding(queries_per_class, hidden_dim)
            self.rank_pos = nn.Embedding(queries_per_class, hidden_dim)
        if use_prompt and prompt_projection:
            self.prompt_to_content = nn.Linear(hidden_dim, hidden_dim)
            self.prompt_to_pos = nn.Linear(hidden_dim, hidden_dim)
        else:
            self.prompt_to_content = self.prompt_to_pos = nn.Identity()
        if use_class_embedding:
            self.class_content = nn.Embedding(num_classes, hidden_dim)
            self.class_pos = nn.Embedding(num_classes, hidden_dim)

    def rank_indices(self, num_groups: int, num_baseline: int) -> Tensor:
        """[num_groups, K] distinct baseline-query indices per class group (release: drawn anew
        in every forward, the same for every image of the batch)."""
        if self.queries_per_class > num_baseline:
            raise ValueError(
                f"K={self.queries_per_class} exceeds the {num_baseline} baseline queries that "
                "r_k is drawn from; lower cfg.MODEL.SEGPROMPT.QUERIES_PER_CLASS or use "
                "RANK_EMBEDDING 'learned'."
            )
        return torch.stack(
            [torch.randperm(num_baseline)[: self.queries_per_class] for _ in range(num_groups)]
        )

    def forward(
        self,
        rows: Tensor,
        prompts: Tensor,
        baseline_content: Tensor,
        baseline_pos: Tensor,
        rank_indices: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """rows [B, C] class ids, prompts [num_classes, D], baseline_content / baseline_pos
        [Q, D] (the baseline's query_feat / query_embed weights) -> content, pos [B, C, K, D].

        rank_indices [C, K]: the baseline queries used as r_k (drawn when not given)."""
        batch, groups = rows.shape
        shape = (batch, groups, self.queries_per_class, self.hidden_dim)
        if self.rank_embedding == "learned":
            content = self.rank_content.weight[None, None].expand(shape)
            pos = self.rank_pos.weight[None, None].expand(shape)
        else:
            if rank_indices is None:
                rank_indices = self.rank_indices(groups, baseline_content.shape[0])
            rank_indices = rank_indices.to(baseline_content.device)
            content = baseline_content[rank_indices][None].expand(shape)
            pos = baseline_pos[rank_indices][None].expand(shape)
        if self.use_prompt:
            selected = prompts[rows].to(baseline_content.dtype)
            content = content + self.prompt_to_content(selected)[:, :, None]
            pos = pos + self.prompt_to_pos(selected)[:, :, None]
        if self.use_class_embedding:
            content = content + self.class_content(rows)[:, :, None]
            pos = pos + self.class_pos(rows)[:, :, None]
        return content, pos
