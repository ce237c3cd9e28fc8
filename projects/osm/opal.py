"""OPAL, the OPen ALignment method ("Benchmarking Open-Ended Segmentation", Sec. 4 and App. B)
on OSM's language model.

OPAL trains a region-aware MLLM with two losses, each from its own forward pass (App. B.1,
Fig. 6): (a) the generative next-token loss with the image and the region in the prompt (OSM's
`loss_text`), and (b) a contrastive loss between the region's mask embedding and "the last
language embedding" of the LLM prompted with *only* the textual description. The LLM is
fine-tuned with LoRA adapters (Sec. 4; the paper's Osprey setting), so gradients reach both
sides: the mask embedding through the MaskQ-Former and projection, the text embedding through
the LoRA adapters.

Where the paper is silent this implementation chooses, and says so: the mask embedding is the
mean of the projected mask-query outputs (the region tokens OSM feeds to the LLM, like
Osprey's mask tokens), the text embedding the last layer's hidden state at the description's
last token (bos + description, no eos), both L2-normalised without extra heads; the loss is
the symmetric InfoNCE of CLIP over the distinct descriptions of the batch (a description
shared by several masks is one class: mask -> text cross-entropy, and text -> mask with all
its masks as positives), with a fixed temperature (MODEL.OSM.OPAL.TEMPERATURE) and weight
(MODEL.OSM.OPAL.WEIGHT).
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .omniscient import tokenize_padded

__all__ = ["OPAL", "add_lora", "contrastive_alignment_loss"]


def contrastive_alignment_loss(mask_embeds: Tensor, text_embeds: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between M mask embeddings [M, D] and U description embeddings
    [U, D]; `targets` [M] gives each mask's description. Mask -> text: cross-entropy over the
    U descriptions; text -> mask: minus the log of the softmax mass (over the M masks) of the
    description's own masks. The two directions are averaged."""
    logits = F.normalize(mask_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T / temperature
    mask_to_text = F.cross_entropy(logits, targets)
    positives = targets[:, None] == torch.arange(text_embeds.shape[0], device=targets.device)[None]  # [M, U]
    log_probs = logits.log_softmax(dim=0)  # over masks, per description
    text_to_mask = -torch.logsumexp(log_probs.masked_fill(~positives, float("-inf")), dim=0).mean()
    return (mask_to_text + text_to_mask) / 2


def add_lora(language_model: nn.Module, rank: int, alpha: int, dropout: float, target_modules: Sequence[str]) -> None:
    """Inject LoRA adapters (peft) into the LLM in place; only the adapters are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    inject_adapter_in_model(config, language_model)
    for name, parameter in language_model.named_parameters():
        parameter.requires_grad_("lora_" in name)


class OPAL:
    """The contrastive pass of OPAL (see the module docstring). Not an nn.Module: it holds
    the tokenizer and a reference to OSM's language model, whose LoRA adapters it trains."""

    def __init__(self, tokenizer, language_model: nn.Module, weight: float = 1.0, temperature: float = 0.07):
        self.tokenizer = tokenizer
        self.language_model = language_model
        self.weight = weight
        self.temperature = temperature

    def text_embeddings(self, descriptions: List[str]) -> Tensor:
        """The second forward pass: the LLM prompted with each description alone; the last
        layer's hidden state at its last token [U, D] (with gradients)."""
        device = self.language_model.get_input_embeddings().weight.device
        ids, attention = tokenize_padded(self.tokenizer, descriptions, device)
        hidden = self.language_model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        return hidden[torch.arange(len(descriptions), device=device), attention.sum(1) - 1]

    def losses(self, mask_embeds: Tensor, descriptions: List[str]) -> Dict[str, Tensor]:
        """mask_embeds [M, Q, D] (projected mask-query outputs), one description per mask."""
        names = sorted(set(descriptions))
        targets = torch.tensor([names.index(d) for d in descriptions], device=mask_embeds.device)
        loss = contrastive_alignment_loss(mask_embeds.mean(dim=1), self.text_embeddings(names), targets, self.temperature)
        return {"loss_opal": self.weight * loss}
