"""OSM against the released OmniScientModel (fixtures of tools/reference_fixtures/osm.py): a tiny
random InstructBLIP saved in the Hugging Face layout, the OSM weights in the release's
checkpoint format; the same image, masks and prompts must give the same logits (1e-5), the
same greedy tokens and the same training loss."""

import os

import pytest
import torch

from openseg.projects.osm.omniscient import OmniScient, context_box_mask, load_released_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "reference", "osm")
CASES = torch.load(os.path.join(FIXTURES, "cases.pt"), weights_only=False)


def _model(case, tmp_path) -> OmniScient:
    from transformers import InstructBlipForConditionalGeneration

    base = InstructBlipForConditionalGeneration.from_pretrained(
        os.path.join(FIXTURES, "base_model"), local_files_only=True
    )
    model = OmniScient(base, input_size=case["input_size"], window_stride=case["stride"])
    path = tmp_path / "osm_final.pt"
    torch.save(case["checkpoint"], path)
    load_released_checkpoint(model, str(path))
    return model.eval()


@pytest.mark.parametrize("stride", sorted(CASES))
def test_logits_tokens_and_loss_match_release(stride, tmp_path):
    case = CASES[stride]
    model = _model(case, tmp_path)
    with torch.no_grad():
        embeds = model.encode_image(case["pixel_values"])
    torch.testing.assert_close(embeds, case["image_embeds"], atol=1e-5, rtol=0)
    masks, context = case["masks"][:, 0], case["context"][:, 0]
    common = (case["qformer_ids"], case["qformer_attention"])
    for mode in ("coco", "any"):
        modes = model.mode_indices([mode] * 2, embeds.device)
        with torch.no_grad():
            logits = model(embeds, masks, context, modes, *common, case["input_ids"], case["attention"]).logits
        torch.testing.assert_close(logits, case[f"logits_{mode}"], atol=1e-5, rtol=0)
    inputs_embeds, attention = model.prefix_inputs(
        embeds, masks, context, model.mode_indices(["any"] * 2, embeds.device), *common,
        case["input_ids"], case["attention"],
    )
    tokens, scores = model.generate(inputs_embeds, attention, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    assert torch.equal(tokens, case["generated"])
    torch.testing.assert_close(scores, case["scores"], atol=1e-5, rtol=0)
    model.train()
    embeds = model.encode_image(case["pixel_values"])
    logits = model(
        embeds, masks, context, model.mode_indices(["coco"] * 2, embeds.device), *common,
        case["text_ids"], case["text_attention"],
    ).logits
    loss = model.text_loss(logits, case["labels"])
    torch.testing.assert_close(loss.detach(), case["loss_coco"], atol=1e-5, rtol=0)
    loss.backward()
    assert model.mode_query["coco"].grad is not None and model.mode_query["coco"].grad.abs().sum() > 0
    assert model.base_model.language_model.lm_head.weight.grad is None  # the LLM stays frozen


def test_context_mask_matches_release():
    case = CASES[28]
    for mask, context, whole in zip(case["masks"][:, 0], case["context"][:, 0], case["context_global"][:, 0]):
        assert torch.equal(context_box_mask(mask, 0.5), context)
        assert torch.equal(context_box_mask(mask, -1.0), whole)
