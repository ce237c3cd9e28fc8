"""Intra-class matching of SegPrompt's prompt queries (Zhu et al. ICCV 2023, Sec. 3.3).

The K queries of a class group compete only for the ground truth of that class. With
many-to-one matching every query of a present class is assigned a ground truth of its class
and every such ground truth receives at least one query (when K >= M); the assignment of
least total cost is found exactly by one Hungarian run on the cost matrix augmented with
K - M "any ground truth" columns whose cost is each query's cheapest ground truth: the
M real columns pick one distinct query per ground truth, the other queries take their
cheapest ground truth.
"""

from typing import Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MATCHINGS = ("many_to_one", "one_to_one")


def one_to_one_assignment(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Hungarian assignment of a [K, M] cost: min(K, M) pairs (query, ground truth)."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def many_to_one_assignment(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Least-cost assignment of every query to a ground truth, each ground truth used at least
    once; with fewer queries than ground truth (K < M) it is the one-to-one assignment.

    Args:
        cost: [K, M] cost of query k predicting ground truth m.
    Returns:
        (query indices, ground-truth indices) int64 CPU tensors, ordered by query; K pairs when
        K >= M > 0, else min(K, M).
    """
    num_queries, num_targets = cost.shape
    if num_queries <= num_targets or num_targets == 0:
        return one_to_one_assignment(cost)
    cost = cost.detach().float().cpu()
    cheapest_cost, cheapest_target = cost.min(dim=1)
    extra = cheapest_cost[:, None].expand(num_queries, num_queries - num_targets)
    rows, cols = one_to_one_assignment(torch.cat([cost, extra], dim=1))
    cols = torch.where(cols < num_targets, cols, cheapest_target[rows])
    return rows, cols


def intra_class_assignment(cost: Tensor, matching: str) -> Tuple[Tensor, Tensor]:
    """`many_to_one_assignment` or `one_to_one_assignment` by name (cfg SEGPROMPT.MATCHING)."""
    if matching == "many_to_one":
        return many_to_one_assignment(cost)
    if matching == "one_to_one":
        return one_to_one_assignment(cost)
    raise ValueError(f"cfg.MODEL.SEGPROMPT.MATCHING={matching!r}; expected one of {MATCHINGS}.")
