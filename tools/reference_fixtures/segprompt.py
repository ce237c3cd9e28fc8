"""Fixtures of the released SegPrompt decoder (`aim-uofa__SegPrompt`) for
`tests/test_reference_segprompt.py`.

The release's `SegPrompt_MultiScaleMaskedTransformerDecoder` (the whole three-branch forward:
baseline queries, prompt queries ``p_c + r_k + s_c`` with reference attention, example
queries with example masked attention, and the prompt-cache update) is built at a small
size with the release's LVIS-OW defaults (`QUERY_REPEAT` K = 2, `OPEN_ATT_MASK`,
no `EXAMPLE_QUERY_PROJ`, no `ADDTIONAL_QUERY`) and a 2-way class head, on random weights
moved off their initialisation, non-square levels and masks, and a prompt cache in which
some rows are set and some still zero. Its package `__init__` files (which import every
dataset and model of the release) are bypassed; `torchshow` is stubbed.

The release's three criteria are then run on the decoder outputs, each from its own torch
seed (so both sides sample the same points): `SetCriterion_Example` (example supervision),
`SetCriterion_Open` with `HungarianMatcherClasswise` (prompt branch, `QUERY_REPEAT_ONLY_MATCH`,
`BINARY_CLASSIFICATION`) and the baseline `SetCriterion`, with the release's weights
(class 2, mask 5, dice 5, no-object 0.1, `OPEN_BRANCH_WEIGHT` 1). The prompt criterion runs
a second time on the same outputs with other ground truth (`_surplus_case`): classes with
more instances than K (the release's single assignment pairs the surplus with other classes'
queries) and a positive class without mask supervision (an LVIS not-exhaustive class: its
`mask_loss_masks` are off, so all its queries are "object").

Saved (`fixtures.pt`): the decoder state dict (release names, under
``sem_seg_head.predictor.``), the inputs (multi-scale features, mask features, candidate
class ids, example masks and labels), the baseline queries the release drew as r_k
(`torch.randint`, recorded), every level's outputs of the three branches, the final example
query states, the prompt cache after the update, and every weighted loss term of the three
criteria with their seeds.
"""

import sys
import types
from pathlib import Path
from typing import Dict, List

import torch

from ._stubs import add_reference_to_path

SEED = 11
HIDDEN = 32
NUM_QUERIES = 8
K = 2  # QUERY_REPEAT
NUM_CANDIDATE_CLASSES = 3  # C_max
MAX_EXAMPLES = 3
DEC_LAYERS = 4  # transformer layers (the release's DEC_LAYERS - 1)
LEVEL_SIZES = [(3, 5), (6, 10), (12, 20)]  # lowest resolution first
MASK_SIZE = (24, 40)  # mask features; ground-truth masks at 4x (the padded image)
PAD_ID = 1203
NUM_POINTS = 200
LOSS_SEEDS = {"example": 101, "prompt": 202, "baseline": 303, "prompt_surplus": 404}
WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _import_release_decoder(reference: Path):
    """The release's decoder module, without running its package __init__ files."""
    root = reference / "mask2former"
    for name, folder in (
        ("mask2former", root),
        ("mask2former.data", root / "data"),
        ("mask2former.utils", root / "utils"),
        ("mask2former.modeling", root / "modeling"),
        ("mask2former.modeling.transformer_decoder", root / "modeling" / "transformer_decoder"),
    ):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    sys.modules.setdefault("torchshow", types.ModuleType("torchshow"))
    import importlib

    return importlib.import_module(
        "mask2former.modeling.transformer_decoder.segprompt_transformer_decoder"
    )


def _build(module, save_dir: str):
    decoder = module.SegPrompt_MultiScaleMaskedTransformerDecoder(
        HIDDEN,
        True,
        num_classes=1,
        hidden_dim=HIDDEN,
        num_queries=NUM_QUERIES,
        nheads=4,
        dim_feedforward=48,
        dec_layers=DEC_LAYERS,
        pre_norm=False,
        mask_dim=HIDDEN,
        enforce_input_project=False,
        example_query_sigma=0.9,
        example_query_proj=False,
        example_query_loss=0.0,
        example_query_batchwise_loss=0.0,
        use_voc_emb=True,
        save_path=save_dir,
        use_clip_textemb=False,
        enforce_clip_proj=False,
        open_classification=False,
        clip_logit_weight=(1.0, 1.0),
        open_att_mask=True,
        query_repeat=K,
        addtional_query=False,
        open_branch_detached=False,
        open_self_att=False,
        no_att_mask=False,
        self_att_independent=False,
    )
    decoder.counter = 1  # skip the release's one-off attention-mask heatmap (seaborn)
    return decoder


def _move_off_init(decoder, generator) -> None:
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        bank = decoder.memory_bank.weight
        bank.copy_(torch.randn(bank.shape, generator=generator))
        bank[[2, 5]] = 0.0  # classes 2 and 5 have never been set (first update = the mean)


def _inputs(generator) -> Dict:
    batch = 2
    features = [torch.randn(batch, HIDDEN, h, w, generator=generator) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(batch, HIDDEN, *MASK_SIZE, generator=generator)
    image_size = (MASK_SIZE[0] * 4, MASK_SIZE[1] * 4)
    # ground truth: image 0 has classes 2, 7 (3 instances), image 1 class 5 (1 instance)
    gt = [
        {
            "labels": torch.tensor([7, 2, 7]),
            "boxes": [(4, 10, 40, 50), (30, 60, 90, 150), (50, 5, 95, 40)],
        },
        {"labels": torch.tensor([5]), "boxes": [(10, 20, 70, 110)]},
    ]
    masks = []
    for record in gt:
        m = torch.zeros(len(record["labels"]), *image_size)
        for i, (y0, x0, y1, x1) in enumerate(record["boxes"]):
            m[i, y0:y1, x0:x1] = 1.0
        masks.append(m)
    # the release's example selection with fewer instances than slots: all of them, in
    # annotation order, then padding slots (label 1203, empty mask)
    masks_e, labels_e = [], []
    for record, m in zip(gt, masks):
        pad = MAX_EXAMPLES - len(record["labels"])
        masks_e.append(torch.cat([m, torch.zeros(pad, *image_size)]))
        labels_e.append(torch.cat([record["labels"], torch.full((pad,), PAD_ID)]))
    # candidate classes, each repeated K times contiguously: positives then negatives
    candidates = torch.tensor([[2, 7, 4], [5, 1, 9]])
    candidate_ids = candidates.repeat_interleave(K, dim=1)
    return {
        "features": features,
        "mask_features": mask_features,
        "gt_masks": masks,
        "gt_labels": [r["labels"] for r in gt],
        "masks_e": torch.stack(masks_e),
        "labels_e": torch.stack(labels_e),
        "candidates": candidates,
        "positive": torch.tensor([[True, True, False], [True, False, False]]),
        "candidate_ids": candidate_ids,
    }


def _box_masks(boxes, image_size) -> torch.Tensor:
    masks = torch.zeros(len(boxes), *image_size, dtype=torch.bool)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


def _surplus_case() -> Dict:
    """Prompt-branch ground truth and class flags for the candidates [[2, 7, 4], [5, 1, 9]]
    (K = 2): image 0 has class 7 three times (supervised) and class 2 once (positive, not
    supervised: not exhaustive); image 1 has class 5 three times and classes 1 and 9 once,
    all three positive and supervised, so its surplus class-5 instance lands in a supervised
    group of another class."""
    image_size = (MASK_SIZE[0] * 4, MASK_SIZE[1] * 4)
    boxes = [
        [(4, 10, 40, 50), (30, 60, 90, 150), (50, 5, 95, 40), (10, 100, 45, 158)],
        [(10, 20, 70, 110), (0, 0, 30, 30), (60, 120, 96, 160), (20, 40, 50, 90), (5, 70, 40, 140)],
    ]
    return {
        "gt_labels": [torch.tensor([7, 2, 7, 7]), torch.tensor([5, 5, 5, 1, 9])],
        "gt_masks": [_box_masks(b, image_size) for b in boxes],
        "positive": torch.tensor([[True, True, False], [True, True, True]]),
        "supervised": torch.tensor([[False, True, False], [True, True, True]]),
    }


def _accepted_draws(draws: List[torch.Tensor], groups: int) -> torch.Tensor:
    """The release draws K baseline indices per class group with torch.randint and redraws
    while they repeat: keep the first duplicate-free draw of each group."""
    accepted = [d for d in draws if len(d.unique()) == len(d)]
    if len(accepted) != groups:
        raise RuntimeError(f"expected {groups} accepted r_k draws, got {len(accepted)}")
    return torch.stack(accepted)


def _release_losses(out: Dict, inputs: Dict) -> Dict[str, Dict[str, torch.Tensor]]:
    """Weighted loss terms of the release's three criteria, each started from its seed."""
    import importlib

    criterion_module = importlib.import_module("mask2former.modeling.criterion")
    matcher_module = importlib.import_module("mask2former.modeling.matcher")
    costs = dict(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=NUM_POINTS)
    common = dict(
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=NUM_POINTS,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    aux = {f"{k}_{i}": v for i in range(DEC_LAYERS) for k, v in WEIGHTS.items()}
    weights = {**WEIGHTS, **aux}
    weights2 = {
        k.replace("loss_ce", "loss_ce2")
        .replace("loss_mask", "loss_mask2")
        .replace("loss_dice", "loss_dice2"): v
        for k, v in weights.items()
    }
    baseline = criterion_module.SetCriterion(
        1, matcher=matcher_module.HungarianMatcher(**costs), weight_dict=weights, **common
    )
    prompt = criterion_module.SetCriterion_Open(
        1,
        matcher=matcher_module.HungarianMatcherClasswise(**costs),
        weight_dict=weights2,
        query_repeat=K,
        only_match=True,
        binary_class=True,
        **common,
    )
    example = criterion_module.SetCriterion_Example(
        1, matcher=matcher_module.HungarianMatcher(**costs), weight_dict=weights, **common
    )
    binary = [
        {"labels": torch.zeros_like(l), "masks": m}
        for l, m in zip(inputs["gt_labels"], inputs["gt_masks"])
    ]
    with_classes = [
        {"labels": l, "masks": m} for l, m in zip(inputs["gt_labels"], inputs["gt_masks"])
    ]
    results = {}
    torch.manual_seed(LOSS_SEEDS["example"])
    example_out = {
        "pred_logits": out["example_class"],
        "pred_masks": out["example_mask"],
        "aux_outputs": out["aux_outputs_example"],
    }
    results["example"] = {k: v * weights[k] for k, v in example(example_out, binary).items()}
    # candidate labels: 0 positive, 1 negative; mask loss for the positive classes
    candidate_labels = (~inputs["positive"]).float().repeat_interleave(K, dim=1)
    mask_loss_masks = inputs["positive"].repeat_interleave(K, dim=1)
    torch.manual_seed(LOSS_SEEDS["prompt"])
    losses2 = prompt(out, with_classes, inputs["candidate_ids"], candidate_labels, mask_loss_masks)
    results["prompt"] = {k: v * weights2[k] for k, v in losses2.items()}
    torch.manual_seed(LOSS_SEEDS["baseline"])
    results["baseline"] = {k: v * weights[k] for k, v in baseline(out, binary).items()}
    surplus = inputs["surplus"]
    surplus_targets = [
        {"labels": l, "masks": m.float()} for l, m in zip(surplus["gt_labels"], surplus["gt_masks"])
    ]
    prompt.mode = None
    torch.manual_seed(LOSS_SEEDS["prompt_surplus"])
    losses2 = prompt(
        out,
        surplus_targets,
        inputs["candidate_ids"],
        (~surplus["positive"]).float().repeat_interleave(K, dim=1),
        surplus["supervised"].repeat_interleave(K, dim=1),
    )
    results["prompt_surplus"] = {k: v * weights2[k] for k, v in losses2.items()}
    return results


def generate(reference_root: Path, out_dir: Path) -> None:
    reference = add_reference_to_path(Path(reference_root), "aim-uofa__SegPrompt")
    module = _import_release_decoder(reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    decoder = _build(module, str(out_dir / "release_scratch"))
    _move_off_init(decoder, generator)
    decoder.eval()
    inputs = _inputs(generator)
    inputs["surplus"] = _surplus_case()
    bank_before = decoder.memory_bank.weight.detach().clone()

    draws: List[torch.Tensor] = []
    original_randint = torch.randint

    def recording_randint(*args, **kwargs):
        value = original_randint(*args, **kwargs)
        draws.append(value.clone())
        return value

    torch.randint = recording_randint
    try:
        with torch.no_grad():
            out = decoder(
                inputs["features"],
                inputs["mask_features"],
                mask=inputs["gt_masks"],
                candidate_ids=inputs["candidate_ids"],
                masks_e=inputs["masks_e"],
                labels_e=inputs["labels_e"],
            )
    finally:
        torch.randint = original_randint
    rank_indices = _accepted_draws(draws, NUM_CANDIDATE_CLASSES)
    with torch.no_grad():
        losses = _release_losses(out, inputs)

    def levels(logits, masks):
        return [{"pred_logits": a, "pred_masks": b} for a, b in zip(logits, masks)]

    main = out["aux_outputs"] + [
        {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
    ]
    examples = out["aux_outputs_example"] + [
        {"pred_logits": out["example_class"], "pred_masks": out["example_mask"]}
    ]
    state = {"sem_seg_head.predictor." + k: v for k, v in decoder.state_dict().items()}
    state["sem_seg_head.predictor.memory_bank.weight"] = bank_before
    torch.save(
        {
            "state_dict": state,
            "inputs": inputs,
            "rank_indices": rank_indices,
            "main": main,
            "prompt": levels(out["openvoc_class"], out["openvoc_mask"]),
            "example": examples,
            "example_states": out["output"][-MAX_EXAMPLES:].transpose(0, 1).clone(),
            "bank_after": decoder.memory_bank.weight.detach().clone(),
            "losses": losses,
            "loss_seeds": LOSS_SEEDS,
            "settings": {
                "hidden": HIDDEN,
                "num_queries": NUM_QUERIES,
                "queries_per_class": K,
                "max_prompt_classes": NUM_CANDIDATE_CLASSES,
                "max_examples": MAX_EXAMPLES,
                "dec_layers": DEC_LAYERS + 1,
                "dim_feedforward": 48,
                "nheads": 4,
                "num_points": NUM_POINTS,
            },
        },
        out_dir / "fixtures.pt",
    )
    scratch = out_dir / "release_scratch"
    if scratch.exists():
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
