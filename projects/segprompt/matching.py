"""Intra-class matching of SegPrompt's prompt queries (Zhu et al. ICCV 2023, Sec. 3.4).

The paper: the K queries of a positive class are matched to the ground truth of that class;
matched queries take label 1 and the mask loss of their ground truth, unmatched queries (and
every query of a negative class) label 0 and no mask loss. The release
(`HungarianMatcherClasswise`) realises "intra-class" as ONE Hungarian problem per image over
all prompt queries and all ground truth, in which every pair of different classes costs
`CROSS_CLASS_COST` (a query whose class has no ground truth costs it everywhere). With at
most K instances per class this is the per-class assignment; a class with more than K
instances has its surplus ground truth paired at that cost with queries of other classes
(whichever the solver picks among the equal costs), and those pairs are then supervised like
any other (see `SegPromptMaskFormer.prompt_losses`). `class_restricted_assignment` builds the
same matrix and solves it with the same solver, so the pairs, ties included, are the release's.
"""

from typing import Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

CROSS_CLASS_COST = 1000.0  # the release's cost of a query / ground-truth pair of two classes


def one_to_one_assignment(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Hungarian assignment of a [K, M] cost: min(K, M) pairs (query, ground truth), int64 CPU
    tensors ordered by query."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def class_restricted_assignment(
    cost: Tensor, query_classes: Tensor, target_classes: Tensor
) -> Tuple[Tensor, Tensor]:
    """One assignment of all queries [Q] to all ground truth [M] of an image (see the module
    docstring): `cost` [Q, M] where the classes agree, `CROSS_CLASS_COST` elsewhere.

    Returns min(Q, M) pairs (query, ground truth) as `one_to_one_assignment`."""
    same = query_classes.to(cost.device)[:, None] == target_classes.to(cost.device)[None, :]
    return one_to_one_assignment(torch.where(same, cost, torch.full_like(cost, CROSS_CLASS_COST)))
