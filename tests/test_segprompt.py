"""SegPrompt on a tiny ResNet-18 Mask2Former: the self-attention patterns of Table 7 and of the
example queries (Eq. 4) against hand-written matrices and by perturbation, example masked
attention, prompt-cache update (hand-computed, also across simulated ranks), Eq. 6 by hand,
the release's example / class selection rules, intra-class matching against brute force,
inference unchanged by the auxiliary branches, and training steps of every variant."""

import itertools
import random
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from openseg.config import load_config
from openseg.modeling.mask_decoder import QueryGroup
from openseg.modeling.meta_arch import OpenSegMaskFormer
from openseg.projects.segprompt import (
    PromptCache,
    SegPromptMaskFormer,
    class_restricted_assignment,
    one_to_one_assignment,
    select_examples,
    select_prompt_classes,
    supervised_classes,
)
from openseg.projects.segprompt import prompt_cache as prompt_cache_module
from segprompt_test_config import tiny_segprompt_cfg

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
    cfg = tiny_segprompt_cfg(
        DATASET,
        hidden=32,
        nheads=4,
        dim_feedforward=64,
        dec_layers=3,
        num_queries=6,
        num_points=64,
        max_examples=3,
        max_prompt_classes=3,
        queries_per_class=2,
        opts=[
            "MODEL.BACKBONE.FREEZE_AT", "0",
            "MODEL.SEM_SEG_HEAD.NORM", "GN",
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
            "TEST.DETECTIONS_PER_IMAGE", "5",
        ],
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


def groups_for(model, batch):
    images, mask_features, multi_scale = decoder_inputs(model, batch)
    targets = model.prepare_targets(batch, images)
    example_group, selected = model.example_group(targets, mask_features)
    prompt_groups, plan = model.prompt_groups(targets, mask_features, selected)
    return multi_scale, mask_features, targets, example_group, prompt_groups, plan


def expected_visibility(variant, main=6, examples=3, classes=3, per_class=2):
    """Hand-written [T, T] "may attend" matrix in the order [baseline | examples | class
    groups], from Table 7 and Eq. 4 / Eq. 7 (and the release's masks)."""
    total = main + examples + classes * per_class
    allowed = torch.zeros(total, total, dtype=torch.bool)
    b, e, p = slice(0, main), slice(main, main + examples), slice(main + examples, total)
    if variant == "SelfAttn":  # row 1: every query sees every query
        allowed[:] = True
        return allowed
    allowed[b, b] = True  # the baseline sees only itself
    allowed[e, e] = True  # example queries see each other (Eq. 4), not the baseline
    if variant == "RefAttn_inter_class_visible":  # row 3
        allowed[p, b] = True
        allowed[p, p] = True
        return allowed
    for c in range(classes):
        start = main + examples + c * per_class
        group = slice(start, start + per_class)
        allowed[group, group] = True
        if variant == "RefAttn_inter_class_invisible":  # row 4 (Eq. 7): [q; v_c]
            allowed[group, b] = True
    return allowed


@pytest.mark.parametrize(
    "variant",
    [
        "SelfAttn",
        "SelfAttn_independent",
        "RefAttn_inter_class_visible",
        "RefAttn_inter_class_invisible",
    ],
)
def test_table7_self_attention_patterns(variant):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(PROMPT_ATTENTION=variant))
    with torch.no_grad():
        _, mask_features, _, example_group, prompt_groups, _ = groups_for(model, synthetic_batch())
        blocked = model.transformer_decoder._self_attention_mask(
            [example_group] + prompt_groups, mask_features.device
        )
    assert torch.equal(~blocked, expected_visibility(variant))


def test_default_attention_isolates_classes_and_examples_see_each_other():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.eval()
    assert model.prompt_attention == "RefAttn_inter_class_invisible"
    with torch.no_grad():
        multi_scale, mask_features, _, example_group, prompt_groups, _ = groups_for(
            model, synthetic_batch()
        )
        groups = [example_group] + prompt_groups
        reference = model.transformer_decoder(multi_scale, mask_features, extra_groups=groups)
        perturbed = list(groups)
        perturbed[2] = QueryGroup(
            groups[2].content + torch.randn_like(groups[2].content), groups[2].pos
        )
        content = example_group.content.clone()
        content[:, 0] += torch.randn_like(content[:, 0])
        perturbed[0] = QueryGroup(
            content, example_group.pos, fixed_masks=example_group.fixed_masks, sees_main=False
        )
        changed = model.transformer_decoder(multi_scale, mask_features, extra_groups=perturbed)
    for index in (1, 3):  # the other class groups are untouched
        assert torch.equal(
            reference["extra"][index]["pred_embeds"], changed["extra"][index]["pred_embeds"]
        )
    assert not torch.allclose(
        reference["extra"][2]["pred_embeds"], changed["extra"][2]["pred_embeds"]
    )
    # example slot 1 reads example slot 0 through self-attention
    assert not torch.allclose(
        reference["extra"][0]["pred_embeds"][:, 1], changed["extra"][0]["pred_embeds"][:, 1]
    )
    assert torch.equal(reference["pred_masks"], changed["pred_masks"])


def test_example_masked_attention_attends_where_resized_mask_is_positive():
    """A single foreground pixel of a 4x4 mask resizes (bilinear) to 0.25 on the 2x2 cell
    holding it: the release attends there (> 0), a 0.5 threshold would not."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    decoder = model.transformer_decoder
    fixed = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    fixed[0, 0, 0, 0] = True  # slot 1 stays empty: attends everywhere
    output = torch.randn(1, decoder.num_queries + 2, decoder.hidden_dim)
    mask_features = torch.randn(1, 32, 4, 4)
    start = decoder.num_queries
    *_, attn_mask = decoder._predict(output, mask_features, (2, 2), [(start, start + 2, fixed)])
    allowed = ~attn_mask.view(1, decoder.num_heads, -1, 4)[0, 0]
    assert allowed[start].tolist() == [True, False, False, False]
    assert allowed[start + 1].tolist() == [True, True, True, True]


def test_prompt_cache_update_by_hand():
    cache = PromptCache(4, 2, momentum=0.9)
    cache.prompts.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 0.0]]))
    cache.update(
        torch.tensor([0, 0, 2, 3]),
        torch.tensor([[2.0, 2.0], [4.0, 0.0], [0.0, 10.0], [5.0, -1.0]]),
    )
    # class 0: 0.9 * (1, 0) + 0.1 * mean((2, 2), (4, 0)) = (1.2, 0.1); class 1 untouched;
    # class 2: 0.9 * (2, 2) + 0.1 * (0, 10) = (1.8, 2.8); class 3 was never set: its mean
    expected = torch.tensor([[1.2, 0.1], [0.0, 1.0], [1.8, 2.8], [5.0, -1.0]])
    assert torch.allclose(cache.prompts, expected)
    assert "prompts" in cache.state_dict()
    with pytest.raises(ValueError, match="rows must be in"):
        cache.update(torch.tensor([4]), torch.zeros(1, 2))


def test_prompt_cache_averages_over_ranks(monkeypatch):
    """Rank 0 has examples (2, 2) and (4, 0) of class 0; the simulated other rank has one
    example (6, 3) of class 0 and one (1, 1) of class 1. The mean over all three examples of
    class 0 is (4, 5/3), not the mean of the two rank means; both rows start non-zero."""
    other_rank = torch.zeros(2, 3)
    other_rank[0] = torch.tensor([6.0, 3.0, 1.0])
    other_rank[1] = torch.tensor([1.0, 1.0, 1.0])

    def fake_all_reduce(tensor):
        tensor += other_rank

    monkeypatch.setattr(prompt_cache_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(prompt_cache_module.torch.distributed, "all_reduce", fake_all_reduce)
    cache = PromptCache(2, 2, momentum=0.5)
    cache.prompts.fill_(2.0)
    cache.update(torch.tensor([0, 0]), torch.tensor([[2.0, 2.0], [4.0, 0.0]]))
    expected = torch.tensor([[1.0 + 0.5 * 4.0, 1.0 + 0.5 * 5.0 / 3.0], [1.5, 1.5]])
    assert torch.allclose(cache.prompts, expected)


def test_eq6_query_initialisation_by_hand():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    builder, decoder = model.query_builder, model.transformer_decoder
    assert isinstance(builder.prompt_to_content, torch.nn.Identity)  # release: p_c as is
    prompts = torch.randn(5, 32)
    rows = torch.tensor([[2, 0, 3]])
    ranks = torch.tensor([[5, 1], [0, 3], [2, 4]])
    content, pos = builder(
        rows, prompts, decoder.query_feat.weight, decoder.query_embed.weight, ranks
    )
    for slot, row in enumerate(rows[0].tolist()):
        for k in range(2):
            index = ranks[slot, k]
            expected_content = (
                prompts[row] + builder.class_content.weight[row] + decoder.query_feat.weight[index]
            )
            expected_pos = (
                prompts[row] + builder.class_pos.weight[row] + decoder.query_embed.weight[index]
            )
            assert torch.allclose(content[0, slot, k], expected_content)
            assert torch.allclose(pos[0, slot, k], expected_pos)
    drawn = builder.rank_indices(4, decoder.num_queries)
    assert drawn.shape == (4, 2) and all(len(set(r.tolist())) == 2 for r in drawn)


def test_example_selection_follows_release():
    rows = torch.tensor([1, 1, 1, -1, 2, 0])
    # as many classes as slots: the first instance of each class, random order
    assert sorted(select_examples(rows, 3, random.Random(0)).tolist()) == [0, 4, 5]
    # fewer classes than slots: first instance per class (class order), then random others
    chosen = select_examples(rows, 5, random.Random(0)).tolist()
    assert chosen[:3] == [5, 0, 4] and sorted(chosen[3:]) == [1, 2]
    # fewer instances than slots: all of them in annotation order, never the -1 instance
    assert select_examples(rows, 10).tolist() == [0, 1, 2, 4, 5]
    selected, positive = select_prompt_classes(
        [torch.tensor([2, 2, 0]), torch.tensor([], dtype=torch.long)],
        [0, 2, 5, 7],
        3,
        random.Random(0),
    )
    assert positive.tolist() == [[True, True, False], [False, False, False]]
    assert selected[0, :2].tolist() == [0, 2] and selected[0, 2].item() in (5, 7)
    assert set(selected[1].tolist()) <= {0, 2, 5, 7}
    assert (
        selected[1].tolist() == sorted(set(selected[1].tolist()))
        and len(set(selected[1].tolist())) == 3
    )
    with pytest.raises(ValueError, match="C_max"):
        select_prompt_classes([torch.tensor([0])], [0, 2], 3)


def test_class_selection_with_lvis_federated_labels_follows_release():
    """Positives = present + not exhaustive (id order), then the verified-absent classes (id
    order, any class), then random known negatives outside both lists; the release draws one
    negative more than it needs and keeps the smallest after sorting."""
    t = torch.tensor
    rows, positive = select_prompt_classes(
        [t([2, 0]), t([], dtype=torch.long), t([0])],
        [0, 2, 5, 7, 9],
        4,
        random.Random(0),
        not_exhaustive=[t([8]), t([], dtype=torch.long), t([0])],
        negative=[t([7, 11]), t([9, 5, 2]), t([], dtype=torch.long)],
    )
    # image 0: positives 0, 2, 8 (8 is not known: a not-exhaustive LVIS class), then 7, 11
    # (11 cut by C_max); image 1: negatives 2, 5, 9 then one from {0, 7}: the release draws
    # two ({0, 7}), sorts them and keeps 0
    assert rows.tolist()[0] == [0, 2, 8, 7] and positive.tolist()[0] == [True, True, True, False]
    assert rows.tolist()[1] == [2, 5, 9, 0] and not positive[1].any()
    # image 2: the pool {2, 5, 7, 9} minus nothing; 3 needed, 4 drawn, the 3 smallest kept
    assert rows.tolist()[2] == [0, 2, 5, 7] and positive.tolist()[2] == [True, False, False, False]
    # without federated labels: as before (present classes, then random known negatives)
    plain, _ = select_prompt_classes([t([2])], [0, 2, 5, 7], 2, random.Random(1))
    assert plain[0].tolist() == [2, min(random.Random(1).sample([0, 5, 7], 2))]


def test_supervised_classes_are_example_classes_outside_the_federated_lists():
    rows = torch.tensor([[0, 2, 8, 7], [0, 3, 5, 6]])
    examples = [torch.tensor([2, 0, 2]), torch.tensor([5])]  # image 1: class 0 not an example
    supervised = supervised_classes(
        rows, examples, not_exhaustive=[torch.tensor([0, 8]), torch.tensor([], dtype=torch.long)],
        negative=[torch.tensor([7]), torch.tensor([], dtype=torch.long)],
    )
    assert supervised.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert supervised_classes(rows, examples).tolist() == [
        [True, True, False, False],
        [False, False, True, False],
    ]


def test_federated_labels_reach_the_targets_only_for_open_world_training_sets():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())  # 3 of 5 classes known: the lists are used
    batch = synthetic_batch()
    batch[0].update(not_exhaustive_classes=[4, 0], neg_classes=[3])
    targets = model.prepare_targets(batch, model.preprocess_images(batch))
    assert targets[0]["not_exhaustive"].tolist() == [4, 0]
    assert targets[0]["negative"].tolist() == [3]
    assert targets[1]["not_exhaustive"].numel() == 0 and targets[1]["negative"].numel() == 0
    model.train()
    losses = model(batch)  # a training step with the lists
    assert all(torch.isfinite(v) for v in losses.values())
    model.federated_labels = False  # every class known (full LVIS): the release ignores them
    targets = model.prepare_targets(batch, model.preprocess_images(batch))
    assert targets[0]["not_exhaustive"].numel() == 0 and targets[0]["negative"].numel() == 0


def release_matching_cost(cost, query_classes, target_classes):
    """The release's `HungarianMatcherClasswise` cost, written out as it reads: a query whose
    class has no ground truth costs 1000 everywhere, otherwise 1000 at the ground truth of the
    other classes."""
    cost = cost.clone()
    for q, c in enumerate(query_classes.tolist()):
        if c not in target_classes.tolist():
            cost[q, :] = 1000
        else:
            cost[q, [m for m, t in enumerate(target_classes.tolist()) if t != c]] = 1000
    return cost


def brute_force_optimum(cost):
    """Minimum total cost of assigning every ground truth (column) to a distinct query."""
    queries, gts = cost.shape
    return min(
        sum(float(cost[q, g]) for g, q in enumerate(p))
        for p in itertools.permutations(range(queries), gts)
    )


def test_matching_is_the_releases_single_class_restricted_assignment():
    """K = 2, groups [class 0 | class 2 | class 3 (negative)], ground truth [0, 0, 0, 2]:
    solving class by class leaves the third class-0 instance unmatched; the release's one
    assignment pairs it, at cost 1000, with a query of another group, and keeps the
    within-class pairs the brute-force optimum has."""
    generator = torch.Generator().manual_seed(3)
    cost = torch.rand(6, 4, generator=generator)
    query_classes = torch.tensor([0, 0, 2, 2, 3, 3])
    target_classes = torch.tensor([0, 0, 0, 2])
    queries, gts = class_restricted_assignment(cost, query_classes, target_classes)
    release = release_matching_cost(cost, query_classes, target_classes)
    assert len(queries) == 4 and sorted(gts.tolist()) == [0, 1, 2, 3]
    total = float(release[queries, gts].sum())
    assert total == pytest.approx(brute_force_optimum(release))
    expected = [torch.as_tensor(x) for x in linear_sum_assignment(release.numpy())]
    assert queries.tolist() == expected[0].tolist() and gts.tolist() == expected[1].tolist()
    surplus = [(q, g) for q, g in zip(queries.tolist(), gts.tolist()) if release[q, g] == 1000]
    assert len(surplus) == 1 and query_classes[surplus[0][0]] != 0
    # per class (the former openseg): 2 + 1 pairs, the surplus instance unmatched
    per_class = [one_to_one_assignment(cost[0:2, 0:3]), one_to_one_assignment(cost[2:4, 3:4])]
    assert sum(len(q) for q, _ in per_class) == 3
    within = sorted((q, g) for q, g in zip(queries.tolist(), gts.tolist()) if release[q, g] < 1000)
    # the within-class pairs are optimal among assignments that leave one class-0 instance out
    assert sum(float(cost[q, g]) for q, g in within) == pytest.approx(
        min(
            brute_force_optimum(cost[0:2][:, kept]) + float(cost[2:4, 3].min())
            for kept in ([0, 1], [0, 2], [1, 2])
        )
    )


def test_prompt_losses_supervise_as_released():
    """Groups [class 0 (3 instances, supervised) | class 2 (positive, not exhaustive: all
    "object", no mask) | class 3 (negative)], K = 2. Class targets by hand: the matched
    class-0 queries and both class-2 queries are "object"; the mask loss covers exactly the
    pairs of the class-0 group (the surplus class-0 instance, paired with a class-2 or class-3
    query, adds neither a mask loss nor an "object")."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    for i in range(4):
        masks[i, 3 * i : 3 * i + 5, 2 * i : 2 * i + 6] = True
    targets = [
        {
            "labels": torch.zeros(4, dtype=torch.long),
            "masks": masks,
            "classes": torch.tensor([0, 0, 0, 2]),
        }
    ]
    outputs = {"pred_logits": torch.randn(1, 6, 2), "pred_masks": torch.randn(1, 6, 16, 16)}
    rows = torch.tensor([[0, 2, 3]])
    positive = torch.tensor([[True, True, False]])
    supervised = torch.tensor([[True, False, False]])
    model.criterion.deep_supervision = False
    torch.manual_seed(1)
    ((queries, gts),) = model.match_prompts(outputs, targets, rows)
    torch.manual_seed(1)
    losses = model.prompt_losses(outputs, targets, (rows, positive, supervised))
    supervised_pairs = [(q, g) for q, g in zip(queries.tolist(), gts.tolist()) if q < 2]
    target = torch.tensor([1, 1, 0, 0, 1, 1])
    target[[q for q, _ in supervised_pairs]] = 0
    weights = model.criterion.weight_dict
    expected_ce = torch.nn.functional.cross_entropy(
        outputs["pred_logits"][0], target, model.criterion.empty_weight
    )
    assert torch.allclose(losses["loss_ce_prompt"], weights["loss_ce_prompt"] * expected_ce)
    torch.manual_seed(1)
    model.match_prompts(outputs, targets, rows)  # the same random draws as prompt_losses
    pairs = tuple(torch.tensor(column) for column in zip(*supervised_pairs))
    expected = model.criterion.compute(outputs, targets, 4.0, indices=[pairs], losses=["masks"])
    for key in ("loss_mask", "loss_dice"):
        assert torch.allclose(losses[key + "_prompt"], weights[key + "_prompt"] * expected[key])


def test_one_to_one_assignment_is_hungarian():
    cost = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    rows, cols = one_to_one_assignment(cost)
    pairs = sorted(zip(rows.tolist(), cols.tolist()))
    best = min(itertools.permutations(range(3), 2), key=lambda p: cost[0, p[0]] + cost[1, p[1]])
    assert pairs == [(0, best[0]), (1, best[1])]


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
        multi_scale, mask_features, _, example_group, prompt_groups, _ = groups_for(
            model, synthetic_batch()
        )
        alone = model.transformer_decoder(multi_scale, mask_features)
        together = model.transformer_decoder(
            multi_scale, mask_features, extra_groups=[example_group] + prompt_groups
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
    assert model.known_rows(torch.tensor([0, 1, 2, 3, 4])).tolist() == [0, -1, 2, 3, -1]
    model.train()
    losses = model(synthetic_batch())
    levels = ("", "_0", "_1")
    branches = ("", "_example", "_prompt")
    expected = {f"loss_{n}{b}{s}" for n in ("ce", "mask", "dice") for b in branches for s in levels}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    # the batch holds examples of the known classes 0, 2, 3; rows are class ids
    assert (model.prompt_cache.prompts.abs().sum(dim=1) > 0).tolist() == [
        True,
        False,
        True,
        True,
        False,
    ]
    model.zero_grad()
    sum(model(synthetic_batch()).values()).backward()
    for parameter in (
        model.query_builder.class_content.weight,
        model.transformer_decoder.query_feat.weight,
    ):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_min_mask_area_drops_small_known_instances():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(MIN_MASK_AREA=600))  # the synthetic masks have 600 pixels
    batch = synthetic_batch()
    batch[0]["instances"].gt_masks[0, 0, :] = True  # 630 pixels: kept
    targets = model.prepare_targets(batch, model.preprocess_images(batch))
    # image 0: [0 (kept), 0 (dropped), 1 (not known: kept)]; image 1: both known, dropped
    assert targets[0]["known_rows"].tolist() == [0, -1] and len(targets[1]["masks"]) == 0
    # the prompt branch's ground truth keeps every instance (the release's prompt criterion
    # reads the unfiltered targets), with class ids
    assert targets[0]["prompt_gt"]["classes"].tolist() == [0, 0, 1]
    assert targets[1]["prompt_gt"]["classes"].tolist() == [3, 2]
    assert torch.equal(targets[1]["prompt_gt"]["masks"], batch[1]["instances"].gt_masks)
    # positives: eligible known classes and the classes of instances that are not known
    # (release `labels_ouv`); image 1's known instances are too small, so it has none
    images, mask_features, _ = decoder_inputs(model, batch)
    _, selected = model.example_group(targets, mask_features)
    _, (rows, positive, supervised) = model.prompt_groups(targets, mask_features, selected)
    assert rows[0, :2].tolist() == [0, 1] and positive.tolist()[0] == [True, True, False]
    assert supervised.tolist()[0] == [True, False, False] and not positive[1].any()


def test_vanilla_m2f_is_a_parallel_branch_with_its_own_class_head_only():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(AUXILIARY="vanilla_m2f"))
    baseline_cfg = tiny_cfg()
    baseline_cfg.MODEL.META_ARCHITECTURE = "OpenSegMaskFormer"
    own = set(model.state_dict()) - set(build_model(baseline_cfg).state_dict())
    own = {key for key in own if "criterion." not in key}  # config-derived buffers
    assert own == {"vanilla_head.weight", "vanilla_head.bias"}
    assert model.vanilla_head.out_features == len(KNOWN) + 1
    model.train()
    losses = model(synthetic_batch())
    assert {"loss_ce_vanilla", "loss_mask_vanilla", "loss_dice_vanilla_1"} <= set(losses)
    sum(losses.values()).backward()
    assert model.vanilla_head.weight.grad.abs().sum() > 0
    # the branch decodes its own copy of the queries: the baseline class head gets no
    # gradient from the vanilla losses alone
    model.zero_grad()
    sum(v for k, v in model(synthetic_batch()).items() if "vanilla" in k).backward()
    assert (
        model.transformer_decoder.class_predictor.weight.grad is None
        or not model.transformer_decoder.class_predictor.weight.grad.any()
    )


@pytest.mark.parametrize(
    "options",
    [
        {"AUXILIARY": "none"},
        {"USE_PROMPT": False, "USE_CLASS_EMBEDDING": False, "EXAMPLE_SUPERVISION": False},
        {"RANK_EMBEDDING": "learned", "PROMPT_PROJECTION": True, "PROMPT_ATTENTION": "SelfAttn"},
    ],
)
def test_ablation_variants_train(options):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**options))
    model.train()
    losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    if options.get("AUXILIARY") == "none":
        assert not hasattr(model, "prompt_cache") and not any("_prompt" in k for k in losses)
    elif not options.get("EXAMPLE_SUPERVISION", True):
        assert "loss_mask_example" not in losses and "loss_ce_prompt" in losses
        assert not hasattr(model.query_builder, "class_content")
    elif options.get("RANK_EMBEDDING") == "learned":
        assert isinstance(model.query_builder.prompt_to_content, torch.nn.Linear)
        assert model.query_builder.rank_content.weight.shape == (2, 32)
    sum(losses.values()).backward()


def test_bad_config_is_reported():
    with pytest.raises(ValueError, match="CLASS_AGNOSTIC"):
        cfg = tiny_cfg()
        cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC = False
        build_model(cfg)
    with pytest.raises(ValueError, match="PROMPT_ATTENTION"):
        build_model(tiny_cfg(PROMPT_ATTENTION="self"))
    with pytest.raises(ValueError, match="PROMPT_BRANCH_WEIGHT"):
        build_model(tiny_cfg(PROMPT_BRANCH_WEIGHT=[1.0]))
    with pytest.raises(ValueError, match="NEGATIVE_POOL"):
        build_model(tiny_cfg(NEGATIVE_POOL="seen"))


def test_negative_pool_is_every_class_as_released_or_the_known_ones():
    torch.manual_seed(0)
    assert build_model(tiny_cfg()).negative_pool == [0, 1, 2, 3, 4]  # release: in_voc | out_voc
    assert build_model(tiny_cfg(NEGATIVE_POOL="known")).negative_pool == KNOWN
    rows, positive = select_prompt_classes([torch.tensor([0])], [0, 1, 2, 3, 4], 5)
    assert rows.tolist() == [[0, 1, 2, 3, 4]] and positive.tolist() == [[True] + [False] * 4]


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
        "demo/segprompt_R18_class_aware.yaml",
        "demo/segprompt_R18_shapes.yaml",
        "demo/segprompt_R18_shapes_baseline.yaml",
        "demo/segprompt_R18_shapes_class_aware.yaml",
    ],
)
def test_configs_load(config):
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / config))
    assert cfg.TEST.EVALUATORS == ["open_world_ar"]
    assert cfg.MODEL.MASK_FORMER.CLASS_AGNOSTIC == ("class_aware" not in config)
    if "segprompt" in config and "class_aware" not in config:
        assert cfg.MODEL.META_ARCHITECTURE == "SegPromptMaskFormer"
    if not config.startswith("coco_lvis"):  # Mask2Former's / the release's schedule
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
        assert cfg.SOLVER.STEPS[-1] < cfg.SOLVER.MAX_ITER


def test_lvis_ow_iteration_budgets_are_the_releases():
    root = Path(__file__).resolve().parents[1] / "configs" / "lvis_ow"
    baseline = load_config(str(root / "maskformer_R50_class_agnostic.yaml"))
    segprompt = load_config(str(root / "segprompt_R50.yaml"))
    assert (baseline.SOLVER.MAX_ITER, tuple(baseline.SOLVER.STEPS)) == (368750, (327778, 355092))
    # the release fine-tunes the trained class-agnostic baseline, backbone frozen
    assert (segprompt.SOLVER.MAX_ITER, tuple(segprompt.SOLVER.STEPS)) == (90000, (60000, 80000))
    assert segprompt.MODEL.BACKBONE.FREEZE_AT == 5
    assert segprompt.MODEL.WEIGHTS.endswith("maskformer_R50_class_agnostic/model_final.pth")


def test_lvis_ow_segprompt_loads_the_baseline_checkpoint(tmp_path):
    """configs/lvis_ow/segprompt_R50.yaml starts from the class-agnostic baseline's
    model_final.pth, which has no prompt cache or prompt-query tables: the config exempts
    exactly those from strict loading, and every baseline tensor is loaded."""
    from openseg.checkpoint import CheckpointError, OpenSegCheckpointer

    root = Path(__file__).resolve().parents[1] / "configs" / "lvis_ow"
    allow = load_config(str(root / "segprompt_R50.yaml")).MODEL.WEIGHTS_ALLOW_MISSING
    torch.manual_seed(0)
    baseline = build_model(tiny_cfg(AUXILIARY="none"))
    path = tmp_path / "model_final.pth"
    torch.save({"model": baseline.state_dict()}, path)
    with pytest.raises(CheckpointError, match="missing"):
        OpenSegCheckpointer(build_model(tiny_cfg())).load(str(path))
    torch.manual_seed(1)
    model = build_model(tiny_cfg())
    OpenSegCheckpointer(model, allow_missing=allow).load(str(path))
    state = model.state_dict()
    assert set(state) - set(baseline.state_dict()) == {
        "prompt_cache.prompts",
        "query_builder.class_content.weight",
        "query_builder.class_pos.weight",
    }
    for key, value in baseline.state_dict().items():
        assert torch.equal(state[key], value), key


def test_release_checkpoint_loads(tmp_path):
    """A state dict in the release's `SegPrompt` layout (names from its
    segprompt_transformer_decoder.py: 1204-row id tables with a padding row, an 81-way
    binary class head, criterion2/3) loads through OpenSegCheckpointer into the same tensors."""
    from openseg.checkpoint import OpenSegCheckpointer, convert_to_openseg, openseg_to_reference

    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.prompt_cache.prompts.normal_()
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    prompt_keys = {
        "prompt_cache.prompts": "memory_bank",
        "query_builder.class_content.weight": "id2feat",
        "query_builder.class_pos.weight": "id2pe",
    }
    released = openseg_to_reference({k: v for k, v in ours.items() if k not in prompt_keys})
    for key, name in prompt_keys.items():
        released[f"sem_seg_head.predictor.{name}.weight"] = torch.cat(
            [ours[key], torch.randn(1, 32)]
        )
    head = "sem_seg_head.predictor.class_embed."
    for suffix in ("weight", "bias"):
        full = torch.randn(81, *released[head + suffix].shape[1:])
        full[[0, 80]] = released[head + suffix]
        released[head + suffix] = full
    released["criterion2.empty_weight"] = released["criterion3.empty_weight"] = torch.ones(81)
    converted, checkpoint_format = convert_to_openseg(released)
    assert checkpoint_format.name == "segprompt"
    assert set(converted) == set(ours)
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    path = tmp_path / "segprompt_release.pth"
    torch.save({"model": released}, path)
    fresh = build_model(tiny_cfg())
    OpenSegCheckpointer(fresh).load(str(path))
    assert torch.equal(fresh.prompt_cache.prompts, model.prompt_cache.prompts)
    assert torch.equal(
        fresh.transformer_decoder.class_predictor.weight,
        model.transformer_decoder.class_predictor.weight,
    )
