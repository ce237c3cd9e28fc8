"""Intra-class matching of SegPrompt's prompt queries (Zhu et al. ICCV 2023, Sec. 3.4).

The K queries of a present class compete only for the ground truth of that class; a
Hungarian assignment pairs min(K, M) of them with the class's M ground-truth instances. The
paper: matched queries take label 1 and the mask loss of their ground truth; unmatched
queries (and every query of a negative class) take label 0 ("no object") and no mask loss.
The release reaches the same pairs with one Hungarian run over all queries in which
cross-class pairs cost 1000 (`HungarianMatcherClasswise`); solving each class separately is
identical whenever no class has more ground truth than K (with more, the release may pair the
surplus ground truth with queries of other classes at cost 1000; here it stays unmatched).
"""

from typing import Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def one_to_one_assignment(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """Hungarian assignment of a [K, M] cost: min(K, M) pairs (query, ground truth), int64 CPU
    tensors ordered by query."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
