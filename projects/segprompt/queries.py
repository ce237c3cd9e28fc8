"""Query construction of SegPrompt's auxiliary branches (Zhu et al. ICCV 2023, Sec. 3.2-3.3).

Prompt-extraction branch: up to `max_examples` ground-truth instances per image become
example queries (zero-initialised, cross-attention restricted to their ground-truth mask);
distinct classes are taken first so one iteration refreshes as many prompts as possible.

Prompt-based prediction branch: C_max known classes per image (the classes present first,
then negatives drawn uniformly among the absent known classes), K queries per class, query
k of class c initialised as ``p_c + r_k + s_c``: the cached prompt (projected), a learnable
per-rank embedding shared by all classes and a learnable per-class embedding. Content and
positional parts each have their own projection / embeddings.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


def select_examples(
    rows: Tensor, max_examples: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Ground-truth indices to extract prompts from, at most `max_examples`, classes first.

    Args:
        rows: [M] known-class row of each ground truth, -1 for classes outside the cache.
        max_examples: slots per image.
    Returns:
        int64 indices into `rows` (known classes only): one random instance of each class in
        random class order, then the remaining instances in random order, truncated.
    """
    candidates = torch.nonzero(rows >= 0).flatten().cpu()
    if candidates.numel() == 0 or max_examples <= 0:
        return torch.zeros(0, dtype=torch.int64)
    candidates = candidates[torch.randperm(candidates.numel(), generator=generator)]
    candidate_rows = rows.cpu()[candidates]
    first_of_class = torch.zeros(candidates.numel(), dtype=torch.bool)
    seen = set()
    for position, row in enumerate(candidate_rows.tolist()):
        if row not in seen:
            seen.add(row)
            first_of_class[position] = True
    ordered = torch.cat([candidates[first_of_class], candidates[~first_of_class]])
    return ordered[:max_examples]


def select_prompt_classes(
    present: List[Tensor],
    num_known: int,
    max_classes: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Known classes of each image's class groups: positives first, negatives uniformly.

    Args:
        present: per image, the distinct cache rows of its ground truth.
        num_known: number of known classes (cache rows).
        max_classes: C_max, groups per image (at most num_known).
    Returns:
        rows [B, C_max] int64 and positive [B, C_max] bool (the class is in the image).
        Images with more than C_max classes present keep a uniformly random subset.
    """
    if not 0 < max_classes <= num_known:
        raise ValueError(
            f"C_max={max_classes} must be in [1, {num_known}] (number of known classes); "
            "check cfg.MODEL.SEGPROMPT.MAX_PROMPT_CLASSES."
        )
    all_rows, all_positive = [], []
    for rows in present:
        rows = torch.unique(rows.cpu())
        rows = rows[torch.randperm(rows.numel(), generator=generator)][:max_classes]
        absent = torch.ones(num_known, dtype=torch.bool)
        absent[rows] = False
        absent_rows = torch.nonzero(absent).flatten()
        num_negatives = max_classes - rows.numel()
        negatives = absent_rows[
            torch.randperm(absent_rows.numel(), generator=generator)[:num_negatives]
        ]
        all_rows.append(torch.cat([rows, negatives]))
        all_positive.append(torch.arange(max_classes) < rows.numel())
    return torch.stack(all_rows), torch.stack(all_positive)


class PromptQueryBuilder(nn.Module):
    """Initial content and positional embedding ``p_c + r_k + s_c`` of the prompt queries.

    These are the only parameters of SegPrompt not shared with the baseline decoder; the
    terms disabled by `use_prompt` / `use_class_embedding` (ablations "w/o p", "w/o s")
    have no parameters at all.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        queries_per_class: int,
        use_prompt: bool = True,
        use_class_embedding: bool = True,
    ):
        super().__init__()
        if queries_per_class <= 0:
            raise ValueError(
                f"K={queries_per_class} queries per class must be positive "
                "(cfg.MODEL.SEGPROMPT.QUERIES_PER_CLASS)."
            )
        self.queries_per_class = queries_per_class
        self.use_prompt = use_prompt
        self.use_class_embedding = use_class_embedding
        self.rank_content = nn.Embedding(queries_per_class, hidden_dim)
        self.rank_pos = nn.Embedding(queries_per_class, hidden_dim)
        if use_prompt:
            self.prompt_to_content = nn.Linear(hidden_dim, hidden_dim)
            self.prompt_to_pos = nn.Linear(hidden_dim, hidden_dim)
        if use_class_embedding:
            self.class_content = nn.Embedding(num_classes, hidden_dim)
            self.class_pos = nn.Embedding(num_classes, hidden_dim)

    def forward(self, rows: Tensor, prompts: Tensor) -> Tuple[Tensor, Tensor]:
        """rows [B, C] cache rows, prompts [num_known, D] -> content, pos [B, C, K, D]."""
        content = self.rank_content.weight[None, None]
        pos = self.rank_pos.weight[None, None]
        if self.use_prompt:
            selected = prompts[rows].to(self.rank_content.weight.dtype)
            content = content + self.prompt_to_content(selected)[:, :, None]
            pos = pos + self.prompt_to_pos(selected)[:, :, None]
        if self.use_class_embedding:
            content = content + self.class_content(rows)[:, :, None]
            pos = pos + self.class_pos(rows)[:, :, None]
        shape = (*rows.shape, self.queries_per_class, self.rank_content.weight.shape[1])
        return content.expand(shape), pos.expand(shape)
