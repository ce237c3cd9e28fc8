"""Category-level prompt cache of SegPrompt (Zhu et al. ICCV 2023, Sec. 3.2).

One D-dimensional prompt per known class, the momentum average of the features that the
prompt-extraction branch's example queries produce for that class (Eq. 5):
``p_c <- m * p_c + (1 - m) * mean_i f_i`` over the examples i of class c in the iteration (on
all ranks). The prompts are a buffer (checkpointed, never trained by gradient) and start at
zero. As in the release (the paper is silent), a prompt that is still all zero is set to the
class mean on its first update instead of being shrunk towards zero.
"""

import torch
from detectron2.utils import comm
from torch import Tensor, nn


class PromptCache(nn.Module):
    """Momentum-updated prompt per known class, identical on every rank after each update."""

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9):
        """
        Args:
            num_classes: rows of the cache (one per class id; unused rows stay zero).
            dim: prompt dimension (the decoder's hidden dimension).
            momentum: weight m of the old prompt in the update, in [0, 1).
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"PromptCache: num_classes must be positive, got {num_classes}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"PromptCache: momentum must be in [0, 1) (cfg.MODEL.SEGPROMPT.CACHE_MOMENTUM), "
                f"got {momentum}."
            )
        self.momentum = momentum
        self.register_buffer("prompts", torch.zeros(num_classes, dim))

    @property
    def num_classes(self) -> int:
        return self.prompts.shape[0]

    @torch.no_grad()
    def update(self, rows: Tensor, features: Tensor) -> None:
        """Fold this iteration's example features into the prompts of their classes.

        The per-class mean is taken over the examples of all ranks (sums and counts are
        all-reduced), so every rank applies the same update; every rank must call this in
        every iteration, also with no examples.

        Args:
            rows: [N] cache rows (known-class indices) of the examples.
            features: [N, D] example query features.
        """
        if rows.dim() != 1 or features.dim() != 2 or features.shape[0] != rows.shape[0]:
            raise ValueError(
                f"PromptCache.update: expected rows [N] and features [N, D], got "
                f"{tuple(rows.shape)} and {tuple(features.shape)}."
            )
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.num_classes):
            raise ValueError(
                f"PromptCache.update: rows must be in [0, {self.num_classes}), got "
                f"{rows.min().item()}..{rows.max().item()}."
            )
        # one tensor holding per-class sums (first D columns) and counts (last column)
        totals = torch.zeros(
            self.num_classes,
            self.prompts.shape[1] + 1,
            device=self.prompts.device,
            dtype=torch.float32,
        )
        values = torch.cat(
            [features.detach().float(), torch.ones_like(features[:, :1], dtype=torch.float32)],
            dim=1,
        ).to(totals.device)
        totals.index_add_(0, rows.to(totals.device), values)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(totals)
        counts = totals[:, -1]
        present = counts > 0
        means = totals[present, :-1] / counts[present, None]
        previous = self.prompts[present].float()
        never_set = (previous == 0).all(dim=1, keepdim=True)
        previous = torch.where(never_set, means, previous)
        updated = self.momentum * previous + (1 - self.momentum) * means
        self.prompts[present] = updated.to(self.prompts.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.prompts.shape[1]}, momentum={self.momentum}"
        )
