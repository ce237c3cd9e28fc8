"""SegPrompt on a tiny ResNet-18 Mask2Former: attention isolation of class groups, prompt-cache
momentum (hand-computed, also across simulated ranks), many-to-one matching against brute
force, inference unchanged by the auxiliary branches, and a training step."""

import itertools
from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from openseg.config import load_config
from openseg.modeling.mask_decoder import QueryGroup
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.projects.segprompt import (
    PromptCache,
    SegPromptMaskFormer,
    many_to_one_assignment,
    select_examples,
    select_prompt_classes,
)
from openseg.projects.segprompt import prompt_cache as prompt_cache_module

DATASET = "openseg_test_segprompt_tiny"
KNOWN = [0, 2, 3]  # class 1 is "seen" (in images, never labelled), 4 "unseen"


@pytest.fixture(scope="module", autouse=True)
def tiny_metadata():
    if DATASET in MetadataCatalog.list():
        MetadataCatalog.remove(DATASET)
    MetadataCatalog.get(DATASET).set(
        thing_classes=["a", "b", "c", "d", "e"],
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(5)},
        class_splits={"known": KNOWN, "seen": [1], "unseen": [4]},
    )
    yield
    MetadataCatalog.remove(DATASET)


def tiny_cfg(**segprompt):
    cfg = load_config(
        opts=[
            "MODEL.DEVICE",
            "cpu",
            "MODEL.META_ARCHITECTURE",
            "SegPromptMaskFormer",
            "MODEL.BACKBONE.NAME",
            "build_resnet_backbone",
            "MODEL.BACKBONE.FREEZE_AT",
            "0",
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
            "MODEL.RESNETS.NORM",
            "BN",
            "MODEL.RESNETS.OUT_FEATURES",
            "['res2', 'res3', 'res4', 'res5']",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES",
            "['res2', 'res3', 'res4', 'res5']",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM",
            "32",
            "MODEL.SEM_SEG_HEAD.MASK_DIM",
            "32",
            "MODEL.SEM_SEG_HEAD.NORM",
            "GN",
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
            "1",
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",
            "4",
            "MODEL.MASK_FORMER.HIDDEN_DIM",
            "32",
            "MODEL.MASK_FORMER.NHEADS",
            "4",
            "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
            "64",
            "MODEL.MASK_FORMER.DEC_LAYERS",
            "3",
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
            "6",
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
            "64",
            "MODEL.MASK_FORMER.CLASS_AGNOSTIC",
            "True",
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON",
            "False",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON",
            "True",
            "TEST.DETECTIONS_PER_IMAGE",
            "5",
            "MODEL.SEGPROMPT.MAX_EXAMPLES_PER_IMAGE",
            "3",
            "MODEL.SEGPROMPT.MAX_PROMPT_CLASSES",
            "3",
            "MODEL.SEGPROMPT.QUERIES_PER_CLASS",
            "2",
            "DATASETS.TRAIN",
            f"('{DATASET}',)",
            "DATASETS.TEST",
            f"('{DATASET}',)",
        ]
    )
    for key, value in segprompt.items():
        cfg.MODEL.SEGPROMPT[key] = value
    return cfg


def synthetic_batch():
    """Two 64x64 images: classes [0, 0, 1] (1 is not known) and [3, 2]."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for classes in ([0, 0, 1], [3, 2]):
        image = torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)
        masks = torch.zeros(len(classes), 64, 64, dtype=torch.bool)
        for index in range(len(classes)):
            masks[index, 16 * index : 16 * index + 20, 8 * index : 8 * index + 30] = True
            image[:, masks[index]] = 60 * (index + 1)
        instances = Instances((64, 64))
        instances.gt_classes = torch.tensor(classes)
        instances.gt_masks = masks
        batch.append({"image": image, "height": 64, "width": 64, "instances": instances})
    return batch


def decoder_inputs(model, batch):
    images = model.preprocess_images(batch)
    features = model.backbone(images.tensor)
    mask_features, multi_scale = model.pixel_decoder.forward_features(features)
    return images, mask_features, multi_scale


def test_class_groups_do_not_see_each_other():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.eval()
    batch = synthetic_batch()
    with torch.no_grad():
        images, mask_features, multi_scale = decoder_inputs(model, batch)
        targets = model.prepare_targets(batch, images)
        groups, _ = model.prompt_groups(targets, mask_features)
        assert len(groups) == 3 and all(g.sees_main for g in groups)
        reference = model.transformer_decoder(multi_scale, mask_features, extra_groups=groups)
        perturbed = list(groups)
        perturbed[1] = QueryGroup(
            groups[1].content + torch.randn_like(groups[1].content), groups[1].pos
        )
        changed = model.transformer_decoder(multi_scale, mask_features, extra_groups=perturbed)
    for index in (0, 2):
        for key in ("pred_logits", "pred_masks", "pred_embeds"):
            assert torch.equal(reference["extra"][index][key], changed["extra"][index][key])
    assert not torch.allclose(
        reference["extra"][1]["pred_embeds"], changed["extra"][1]["pred_embeds"]
    )
    assert torch.equal(reference["pred_masks"], changed["pred_masks"])


def test_shared_attention_lets_classes_see_each_other():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(PROMPT_ATTENTION="shared"))
    model.eval()
    batch = synthetic_batch()
    with torch.no_grad():
        images, mask_features, multi_scale = decoder_inputs(model, batch)
        groups, _ = model.prompt_groups(model.prepare_targets(batch, images), mask_features)
        assert len(groups) == 1 and groups[0].content.shape[1] == 3 * 2
        reference = model.transformer_decoder(multi_scale, mask_features, extra_groups=groups)
        content = groups[0].content.clone()
        content[:, 2:4] += torch.randn_like(content[:, 2:4])
        changed = model.transformer_decoder(
            multi_scale, mask_features, extra_groups=[QueryGroup(content, groups[0].pos)]
        )
    assert not torch.allclose(
        reference["extra"][0]["pred_embeds"][:, :2], changed["extra"][0]["pred_embeds"][:, :2]
    )


def test_prompt_cache_momentum_update_by_hand():
    cache = PromptCache(3, 2, momentum=0.9)
    cache.prompts.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    cache.update(torch.tensor([0, 0, 2]), torch.tensor([[2.0, 2.0], [4.0, 0.0], [0.0, 10.0]]))
    # class 0: 0.9 * (1, 0) + 0.1 * mean((2, 2), (4, 0)) = (1.2, 0.1); class 1 untouched;
    # class 2: 0.9 * (2, 2) + 0.1 * (0, 10) = (1.8, 2.8)
    expected = torch.tensor([[1.2, 0.1], [0.0, 1.0], [1.8, 2.8]])
    assert torch.allclose(cache.prompts, expected)
    assert "prompts" in cache.state_dict()
    with pytest.raises(ValueError, match="rows must be in"):
        cache.update(torch.tensor([3]), torch.zeros(1, 2))


def test_prompt_cache_averages_over_ranks(monkeypatch):
    """Rank 0 has examples (2, 2) and (4, 0) of class 0; the simulated other rank has one
    example (6, 3) of class 0 and one (1, 1) of class 1. The mean over all three examples of
    class 0 is (4, 5/3), not the mean of the two rank means."""
    other_rank = torch.zeros(2, 3)
    other_rank[0] = torch.tensor([6.0, 3.0, 1.0])
    other_rank[1] = torch.tensor([1.0, 1.0, 1.0])

    def fake_all_reduce(tensor):
        tensor += other_rank

    monkeypatch.setattr(prompt_cache_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(prompt_cache_module.torch.distributed, "all_reduce", fake_all_reduce)
    cache = PromptCache(2, 2, momentum=0.5)
    cache.update(torch.tensor([0, 0]), torch.tensor([[2.0, 2.0], [4.0, 0.0]]))
    expected = torch.tensor([[0.5 * 4.0, 0.5 * 5.0 / 3.0], [0.5, 0.5]])
    assert torch.allclose(cache.prompts, expected)


def brute_force_many_to_one(cost):
    """Least total cost over every map query -> ground truth that uses each ground truth."""
    num_queries, num_targets = cost.shape
    best = None
    for choice in itertools.product(range(num_targets), repeat=num_queries):
        if len(set(choice)) < min(num_targets, num_queries):
            continue
        total = sum(cost[q, t].item() for q, t in enumerate(choice))
        best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("shape", [(4, 2), (5, 3), (3, 1), (4, 4)])
def test_many_to_one_matches_brute_force(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.rand(shape, generator=generator)
        rows, cols = many_to_one_assignment(cost)
        assert sorted(rows.tolist()) == list(range(shape[0]))  # every query matched
        assert set(cols.tolist()) == set(range(shape[1]))  # every ground truth used
        total = cost[rows, cols].sum().item()
        assert total == pytest.approx(brute_force_many_to_one(cost), abs=1e-6)


def test_many_to_one_with_fewer_queries_is_one_to_one():
    cost = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    rows, cols = many_to_one_assignment(cost)
    pairs = sorted(zip(rows.tolist(), cols.tolist()))
    best = min(itertools.permutations(range(3), 2), key=lambda p: cost[0, p[0]] + cost[1, p[1]])
    assert pairs == [(0, best[0]), (1, best[1])]


def test_example_and_class_selection():
    torch.manual_seed(0)
    rows = torch.tensor([1, 1, 1, -1, 2, 0])
    chosen = select_examples(rows, 3)
    assert sorted(rows[chosen].tolist()) == [0, 1, 2]  # distinct classes first
    assert select_examples(rows, 10).numel() == 5  # the -1 instance is never an example
    selected, positive = select_prompt_classes(
        [torch.tensor([2, 2, 0]), torch.tensor([], dtype=torch.long)], 4, 3
    )
    assert positive.tolist() == [[True, True, False], [False, False, False]]
    assert sorted(selected[0, :2].tolist()) == [0, 2] and selected[0, 2].item() in (1, 3)
    assert len(set(selected[1].tolist())) == 3
    with pytest.raises(ValueError, match="C_max"):
        select_prompt_classes([torch.tensor([0])], 2, 3)


def test_inference_identical_with_and_without_auxiliary_branches():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    baseline_cfg = tiny_cfg()
    baseline_cfg.MODEL.META_ARCHITECTURE = "OpenSegMaskFormer"
    baseline = build_model(baseline_cfg)
    assert type(baseline) is OpenSegMaskFormer
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("prompt_cache", "query_builder")) for k in unexpected)
    model.train()
    model(synthetic_batch())  # one training forward: the cache and BN statistics change
    baseline.load_state_dict(model.state_dict(), strict=False)
    model.eval()
    baseline.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in synthetic_batch()]
    with torch.no_grad():
        images, mask_features, multi_scale = decoder_inputs(model, synthetic_batch())
        targets = model.prepare_targets(synthetic_batch(), images)
        example_groups, _ = model.example_groups(targets, mask_features)
        prompt_groups, _ = model.prompt_groups(targets, mask_features)
        alone = model.transformer_decoder(multi_scale, mask_features)
        together = model.transformer_decoder(
            multi_scale, mask_features, extra_groups=example_groups + prompt_groups
        )
        ours, theirs = model(batch), baseline(batch)
    # equal up to float rounding: the extra queries only change the shapes of the matmuls
    assert torch.allclose(alone["pred_logits"], together["pred_logits"], atol=1e-5)
    assert torch.allclose(alone["pred_masks"], together["pred_masks"], atol=1e-5)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["instances"].scores, b["instances"].scores)
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)


def test_training_step_updates_prompts_and_trains_prompt_embeddings():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert isinstance(model, SegPromptMaskFormer)
    assert model.known_rows(torch.tensor([0, 1, 2, 3, 4])).tolist() == [0, -1, 1, 2, -1]
    model.train()
    losses = model(synthetic_batch())
    levels = ("", "_0", "_1")
    expected = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in levels}
    expected |= {f"loss_{n}_prompt{s}" for n in ("ce", "mask", "dice") for s in levels}
    expected |= {"loss_mask_example", "loss_dice_example"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    # the batch holds examples of known classes 0 (row 0), 2 (row 1), 3 (row 2)
    assert (model.prompt_cache.prompts.abs().sum(dim=1) > 0).tolist() == [True, True, True]
    # the cache started at zero, so the prompt projection gets a weight gradient from the
    # second iteration on
    model.zero_grad()
    sum(model(synthetic_batch()).values()).backward()
    builder = model.query_builder
    for parameter in (
        builder.rank_content.weight,
        builder.class_content.weight,
        builder.prompt_to_content.weight,
    ):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [
        {"AUXILIARY": "vanilla"},
        {
            "USE_PROMPT": False,
            "USE_CLASS_EMBEDDING": False,
            "PROMPT_ATTENTION": "self",
            "MATCHING": "one_to_one",
            "EXAMPLE_MASK_WEIGHT": 0.0,
        },
    ],
)
def test_ablation_variants_train(options):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**options))
    model.train()
    losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    if options.get("AUXILIARY") == "vanilla":
        assert "loss_ce_vanilla" in losses and not hasattr(model, "prompt_cache")
    else:
        assert "loss_mask_example" not in losses and "loss_ce_prompt" in losses
        assert not hasattr(model.query_builder, "class_content")
    sum(losses.values()).backward()


def test_bad_config_is_reported():
    with pytest.raises(ValueError, match="CLASS_AGNOSTIC"):
        cfg = tiny_cfg()
        cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC = False
        build_model(cfg)
    with pytest.raises(ValueError, match="PROMPT_ATTENTION"):
        build_model(tiny_cfg(PROMPT_ATTENTION="cross"))


@pytest.mark.parametrize(
    "config",
    [
        "lvis_ow/maskformer_R50_class_aware.yaml",
        "lvis_ow/maskformer_R50_class_agnostic.yaml",
        "lvis_ow/segprompt_R50.yaml",
        "coco_lvis/maskformer_R50_class_aware.yaml",
        "coco_lvis/maskformer_R50_class_agnostic.yaml",
        "coco_lvis/segprompt_R50.yaml",
        "demo/segprompt_R18.yaml",
        "demo/segprompt_R18_baseline.yaml",
    ],
)
def test_configs_load(config):
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / config))
    assert cfg.TEST.EVALUATORS == ["open_world_ar"]
    assert cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC == ("class_aware" not in config)
    if "segprompt" in config:
        assert cfg.MODEL.META_ARCHITECTURE == "SegPromptMaskFormer"
