"""openseg's SegPrompt decodes what the released SegPrompt decoder decodes.

The fixtures (`tests/fixtures/reference/segprompt/fixtures.pt`) come from
`tools/make_reference_fixtures.py --reference-root ../shared/reference --only segprompt`: the
release's `SegPrompt_MultiScaleMaskedTransformerDecoder` with random weights (LVIS-OW
defaults: K = 2 queries per class, reference attention with classes invisible to each other,
`p_c` without projection, r_k drawn from the baseline queries), two images with different
class sets, a prompt cache with set and unset rows. The release's weights and cache go
through the `segprompt` checkpoint format into `SegPromptMaskFormer`; the class selection
and r_k draws of the release are injected (they are random on both sides). Within 1e-5 of
the tensor scale:

* the baseline queries' logits and masks at every decoder level (unchanged by the branches);
* the prompt-based branch (Eq. 6 initialisation, RefAttn) at every level;
* the example branch (example masked attention, self-attention among examples, padding
  slots) at every level, and the final example states;
* the prompt cache after the update (momentum, first update of unset rows);
* every weighted loss term (final and each deep-supervision level) of the example
  supervision, the prompt-based branch (intra-class matching, only-matched positives, no
  mask loss for unmatched queries) and the baseline, each criterion started from the seed
  the release's ran from, so both sample the same points;
* the prompt-based branch's loss terms once more on other ground truth: classes with more
  instances than K (the release's single assignment pairs the surplus with other classes'
  queries, also of a supervised group) and a positive class without mask supervision (an
  LVIS not-exhaustive class: all its queries "object").
"""

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from openseg.projects.segprompt import meta_arch as segprompt_meta_arch
from openseg.projects.segprompt.checkpoint import release_to_openseg
from openseg.projects.segprompt.meta_arch import concat_query_outputs

from reference_utils import load_reference, one_thread  # noqa: F401  (one_thread: autouse fixture)
from segprompt_test_config import tiny_segprompt_cfg

DATASET = "openseg_reference_segprompt_fixture"
NUM_LVIS_CLASSES = 1203
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    return load_reference("segprompt")


@pytest.fixture(scope="module")
def lvis_like_metadata():
    if DATASET in MetadataCatalog.list():
        MetadataCatalog.remove(DATASET)
    MetadataCatalog.get(DATASET).set(
        thing_classes=[f"c{i}" for i in range(NUM_LVIS_CLASSES)],
        class_splits={"known": [1, 2, 4, 5, 7, 9]},
    )
    yield
    MetadataCatalog.remove(DATASET)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= TOLERANCE * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


def model_for(settings):
    s = settings
    cfg = tiny_segprompt_cfg(
        DATASET,
        hidden=s["hidden"],
        nheads=s["nheads"],
        dim_feedforward=s["dim_feedforward"],
        dec_layers=s["dec_layers"],
        num_queries=s["num_queries"],
        num_points=s["num_points"],
        max_examples=s["max_examples"],
        max_prompt_classes=s["max_prompt_classes"],
        queries_per_class=s["queries_per_class"],
        opts=["MODEL.SEGPROMPT.MIN_MASK_AREA", "0"],
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def decoded(reference, lvis_like_metadata):
    """openseg's three-branch decoder forward on the fixture's inputs, then every branch's
    losses (the example losses also update the cache), each from the release's seed."""
    model = model_for(reference["settings"])
    converted = release_to_openseg(reference["state_dict"])
    own = model.state_dict()
    assert set(converted) <= set(own)
    assert {k for k in own if k.startswith("transformer_decoder.")} <= set(converted)
    model.load_state_dict(converted, strict=False)
    inputs = reference["inputs"]
    targets = []
    for labels, masks in zip(inputs["gt_labels"], inputs["gt_masks"]):
        gt = {"labels": torch.zeros_like(labels), "masks": masks.bool(), "classes": labels}
        targets.append({**gt, "known_rows": labels, "prompt_gt": gt})
    patch = pytest.MonkeyPatch()
    # the release's random choices, injected: classes (SegPrompt.forward), r_k (the decoder)
    # and the example order (all instances in annotation order, as fed to the decoder)
    patch.setattr(
        segprompt_meta_arch,
        "select_prompt_classes",
        lambda present, known, max_classes, **federated: (inputs["candidates"], inputs["positive"]),
    )
    patch.setattr(
        segprompt_meta_arch, "select_examples", lambda rows, n: torch.arange(len(rows))[:n]
    )
    patch.setattr(model.query_builder, "rank_indices", lambda groups, n: reference["rank_indices"])
    try:
        with torch.no_grad():
            example_group, selected = model.example_group(targets, inputs["mask_features"])
            prompt_groups, plan = model.prompt_groups(targets, inputs["mask_features"], selected)
            out = model.transformer_decoder(
                inputs["features"],
                inputs["mask_features"],
                extra_groups=[example_group] + prompt_groups,
            )
            seeds = reference["loss_seeds"]
            torch.manual_seed(seeds["example"])
            losses = {"example": model.example_losses(out["extra"][0], targets, selected)}
            torch.manual_seed(seeds["prompt"])
            prompt_outputs = concat_query_outputs(out["extra"][1:])
            prompt_gt = [t["prompt_gt"] for t in targets]
            losses["prompt"] = model.prompt_losses(prompt_outputs, prompt_gt, plan)
            torch.manual_seed(seeds["baseline"])
            losses["baseline"] = model.criterion.weighted(model.criterion(out, targets))
            surplus = inputs["surplus"]
            surplus_targets = [
                {"labels": torch.zeros_like(labels), "masks": masks, "classes": labels}
                for labels, masks in zip(surplus["gt_labels"], surplus["gt_masks"])
            ]
            surplus_plan = (inputs["candidates"], surplus["positive"], surplus["supervised"])
            torch.manual_seed(seeds["prompt_surplus"])
            losses["prompt_surplus"] = model.prompt_losses(
                prompt_outputs, surplus_targets, surplus_plan
            )
            torch.manual_seed(seeds["prompt_surplus"])  # the final level's pairs above
            model.surplus_pairs = model.match_prompts(
                prompt_outputs, surplus_targets, inputs["candidates"]
            )
    finally:
        patch.undo()
    model.fixture_losses = losses
    return model, out


def levels(outputs):
    return outputs["aux_outputs"] + [outputs]


def test_weights_and_cache_load_through_the_release_format(reference, decoded):
    model, _ = decoded
    bank = reference["state_dict"]["sem_seg_head.predictor.memory_bank.weight"]
    assert bank.shape[0] == NUM_LVIS_CLASSES + 1  # the release's padding row is dropped
    assert model.query_builder.class_content.weight.shape[0] == NUM_LVIS_CLASSES


def test_baseline_branch_matches(reference, decoded):
    _, out = decoded
    for level, (ours, theirs) in enumerate(zip(levels(out), reference["main"])):
        for key in ("pred_logits", "pred_masks"):
            assert_close(ours[key], theirs[key], f"baseline {key} level {level}")


def test_prompt_branch_matches(reference, decoded):
    _, out = decoded
    prompt = concat_query_outputs(out["extra"][1:])
    assert len(levels(prompt)) == len(reference["prompt"])
    for level, (ours, theirs) in enumerate(zip(levels(prompt), reference["prompt"])):
        for key in ("pred_logits", "pred_masks"):
            assert_close(ours[key], theirs[key], f"prompt {key} level {level}")


def test_example_branch_matches(reference, decoded):
    _, out = decoded
    example = out["extra"][0]
    for level, (ours, theirs) in enumerate(zip(levels(example), reference["example"])):
        for key in ("pred_logits", "pred_masks"):
            assert_close(ours[key], theirs[key], f"example {key} level {level}")
    assert_close(example["pred_queries"], reference["example_states"], "final example states")


def test_prompt_cache_update_matches(reference, decoded):
    model, _ = decoded
    expected = reference["bank_after"][:NUM_LVIS_CLASSES]
    assert_close(model.prompt_cache.prompts, expected, "prompt cache after the update")
    before = reference["state_dict"]["sem_seg_head.predictor.memory_bank.weight"]
    changed = (expected != before[:NUM_LVIS_CLASSES]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 5, 7]  # classes with examples; 2 and 5 were unset


def release_name(branch: str, ours: str) -> str:
    """openseg loss key -> the release's: ``loss_ce_prompt_2`` -> ``loss_ce2_2``,
    ``loss_mask_example_0`` -> ``loss_mask_0`` (of SetCriterion_Example)."""
    for suffix, replacement in (("_prompt", "2"), ("_example", "")):
        if suffix in ours:
            name, _, level = ours.partition(suffix)
            return name + replacement + level
    return ours


@pytest.mark.parametrize("branch", ["example", "prompt", "baseline", "prompt_surplus"])
def test_every_loss_term_matches(reference, decoded, branch):
    model, _ = decoded
    ours = model.fixture_losses[branch]
    theirs = reference["losses"][branch]
    assert sorted(release_name(branch, k) for k in ours) == sorted(theirs)
    for key, value in ours.items():
        assert_close(value, theirs[release_name(branch, key)], f"{branch} {key}")


def test_surplus_case_exercises_cross_class_pairs(reference, decoded):
    """The fixture's surplus ground truth does reach other classes' queries: in both images
    one instance is paired with a query of another class (final level), in image 1 with a
    query of a supervised group."""
    model, _ = decoded
    candidates = reference["inputs"]["candidates"]
    labels = reference["inputs"]["surplus"]["gt_labels"]
    supervised = reference["inputs"]["surplus"]["supervised"]
    for image, (queries, gts) in enumerate(model.surplus_pairs):
        groups = queries // 2
        cross = candidates[image][groups] != labels[image][gts]
        assert int(cross.sum()) == 1
        if image == 1:
            assert supervised[image][groups[cross]].all()
