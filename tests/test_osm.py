"""OSM on CPU with a tiny random CLIP ViT and a tiny random Llama saved to a local folder:
attention regions of mask vs context queries, the sliding-window encoder, forward / backward,
the next-token loss against a hand-written loop, and greedy decoding against a cache-free one."""

import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Instances

from openseg.config import load_config
from openseg.projects.osm import OSM, context_region, mask_region
from openseg.projects.osm.templates import INSTRUCTION_TEMPLATES

open_clip.add_model_config(os.path.join(os.path.dirname(__file__), "data", "open_clip"))
CLASS_NAMES = ["circle", "square", "triangle", "cross", "sky", "grass", "water", "sand"]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny random Llama + word-level tokenizer, saved like a downloaded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tokenizer.train_from_iterator(INSTRUCTION_TEMPLATES + CLASS_NAMES, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    config = LlamaConfig(
        vocab_size=len(wrapped),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=wrapped.bos_token_id,
        eos_token_id=wrapped.eos_token_id,
        pad_token_id=wrapped.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    wrapped.save_pretrained(path)
    return str(path)


def _cfg(llm_dir, contrastive_weight=0.0):
    return load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "osm_tiny_test.yaml"),
        ["MODEL.OSM.LLM_PATH", llm_dir, "MODEL.OSM.CONTRASTIVE_WEIGHT", str(contrastive_weight)],
    )


@pytest.fixture(scope="module")
def model(llm_dir):
    torch.manual_seed(0)
    return build_model(_cfg(llm_dir))


def _inputs(num_images=2, height=96, width=128):
    generator = torch.Generator().manual_seed(1)
    batch = []
    for index in range(num_images):
        masks = torch.zeros(3, height, width, dtype=torch.bool)
        masks[0, 10:40, 20:60] = True
        masks[1, 50:90, 70:120] = True
        masks[2] = ~(masks[0] | masks[1])
        instances = Instances((height, width))
        instances.gt_masks = masks
        instances.gt_classes = torch.tensor([0, 1 + index, 5])
        image = torch.randint(0, 255, (3, height, width), generator=generator, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def test_attention_regions_of_mask_and_context_queries():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 20:28, 36:44] = True  # box 8x8 at y 20..28, x 36..44
    grid = (8, 8)  # 8x8-pixel cells, centres at 4, 12, ..., 60
    region = mask_region(masks, grid)
    context = context_region(masks, grid, ratio=0.5)
    expected_region = torch.zeros(8, 8, dtype=torch.bool)
    expected_context = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        for j in range(8):
            cell = masks[0, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
            expected_region[i, j] = bool(cell.any())
            cy, cx = 8 * i + 4, 8 * j + 4  # box enlarged by 2 px per side: y 18..30, x 34..46
            expected_context[i, j] = (18 <= cy <= 30 and 34 <= cx <= 46) or bool(cell.any())
    assert torch.equal(region[0], expected_region)
    assert torch.equal(context[0], expected_context)
    assert region[1].all() and context[1].all()  # an empty mask may look everywhere
    assert expected_region.sum() == 4 and expected_context.sum() == 4  # pixels 20..28 span 2 cells
    wide = context_region(masks, grid, ratio=3.0)[0]  # box grows by 12 px per side
    assert wide.sum() == 16 and not torch.equal(wide, region[0])


def test_query_attention_mask(model):
    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 16:48, 16:48] = True  # cells of 16 px: rows / cols 1-2
    blocked = model.maskq_former.attention_blocked(masks, (8, 8))
    nm, nc = model.maskq_former.num_mask_queries, model.maskq_former.num_context_queries
    assert blocked.shape == (1, 1 + nm + nc, 64)
    assert not blocked[0, 0].any()  # mode query sees the whole image
    allowed_mask = (~blocked[0, 1 : 1 + nm]).reshape(nm, 8, 8)
    allowed_context = (~blocked[0, 1 + nm :]).reshape(nc, 8, 8)
    assert allowed_mask[:, 1:3, 1:3].all() and allowed_mask.sum() == 4 * nm
    # ratio 0.5: the 32 px box grows by 8 px per side to 8..56, cell centres 8, 24, 40, 56
    assert allowed_context[:, :4, :4].all() and allowed_context.sum() == 16 * nc


def test_sliding_window_encoder_matches_per_window_clip(model):
    torch.manual_seed(0)
    encoder = model.encoder
    images = torch.randn(1, 3, 128, 128)
    features = encoder(images)
    assert features.shape == (1, encoder.width, 8, 8)
    # window (row 1, col 0) = image rows 64..128, cols 0..64 -> feature rows 4..8, cols 0..4
    _, tokens, grid = encoder.clip.vit_tokens(images[:, :, 64:, :64])
    window = tokens[0, 1:].reshape(*grid, -1) + encoder.window_pos[2]
    assert torch.allclose(features[0, :, 4:, :4].permute(1, 2, 0), window, atol=1e-5)


def test_forward_backward_trains_only_new_modules(model):
    torch.manual_seed(0)
    model.train()
    losses = model(_inputs())
    assert set(losses) == {"loss_text"} and torch.isfinite(losses["loss_text"])
    model.zero_grad(set_to_none=True)
    losses["loss_text"].backward()
    assert model.maskq_former.mask_queries.grad is not None
    assert model.maskq_former.context_queries.grad.abs().sum() > 0
    assert model.encoder.window_pos.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.encoder.clip.parameters())
    assert not model.llm.training


def test_next_token_loss_is_answer_cross_entropy(model):
    torch.manual_seed(0)
    embeds = torch.randn(2, 4, 32)
    inputs, attention, labels = model.build_sequences(embeds, [0, 3], ["water", "sand"])
    loss = model.next_token_loss(inputs, attention, labels)
    logits = model.llm(inputs_embeds=inputs, attention_mask=attention).logits
    tokenizer, terms = model.tokenizer, []
    for row, (template, answer) in enumerate(zip([0, 3], ["water", "sand"])):
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        length = int(attention[row].sum())
        start = length - len(answer_ids)  # answer tokens occupy the last positions of the row
        for offset, token in enumerate(answer_ids):
            log_probs = logits[row, start + offset - 1].log_softmax(-1)
            terms.append(-log_probs[token])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_contrastive_loss(llm_dir):
    torch.manual_seed(0)
    model = build_model(_cfg(llm_dir, contrastive_weight=0.5)).train()
    losses = model(_inputs())
    assert set(losses) == {"loss_text", "loss_contrastive"}
    sum(losses.values()).backward()
    assert model.contrastive_proj.weight.grad.abs().sum() > 0
    # independent InfoNCE on the model's own embeddings of a fixed batch
    embeds = torch.randn(3, 4, 32)
    names = ["sky", "circle", "sky"]
    text = F.normalize(model.text_embeddings(["circle", "sky"]), dim=-1)
    masks = F.normalize(model.contrastive_proj(embeds.mean(1)), dim=-1)
    logits = masks @ text.T / model.contrastive_temperature
    expected = -(logits.log_softmax(-1)[torch.arange(3), torch.tensor([1, 0, 1])]).mean()
    assert model.contrastive_loss(embeds, names).item() == pytest.approx(expected.item(), rel=1e-5)


def test_greedy_generation_matches_cache_free_decoding(model):
    torch.manual_seed(0)
    model.eval()
    outputs = model(_inputs(num_images=1, height=60, width=80))
    instances = outputs[0]["instances"]
    assert len(instances.pred_texts) == 3 and instances.pred_masks.shape == (3, 60, 80)
    assert ((instances.scores > 0) & (instances.scores <= 1)).all()

    embeds = torch.randn(2, 4, 32)
    inputs, attention, _ = model.build_sequences(embeds, [0, 0])
    texts, _ = model.generate(inputs, attention)
    eos = model.tokenizer.eos_token_id
    for row in range(2):
        sequence, ids = inputs[row : row + 1], []
        for _ in range(model.max_new_tokens):
            token = int(model.llm(inputs_embeds=sequence).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
            sequence = torch.cat(
                [sequence, model.llm.get_input_embeddings()(torch.tensor([[token]]))], 1
            )
        assert texts[row] == model.tokenizer.decode(ids, skip_special_tokens=True).strip()


class _FixedProposals(torch.nn.Module):
    """Stands in for a class-agnostic meta-arch: instances at the original image size."""

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            instances = Instances((x["height"], x["width"]))
            masks = torch.zeros(3, x["height"], x["width"], dtype=torch.bool)
            masks[0, :30], masks[1, 30:], masks[2, :, :10] = True, True, True
            instances.pred_masks = masks
            instances.scores = torch.tensor([0.2, 0.9, 0.5])
            outputs.append({"instances": instances})
        return outputs


def test_proposal_masks_top_k(model):
    torch.manual_seed(0)
    model.eval()
    model.proposal_model, model.proposal_topk = _FixedProposals(), 2
    try:
        batch = _inputs(num_images=1, height=60, width=80)
        batch[0]["image"] = F.interpolate(batch[0]["image"][None].float(), size=(30, 40))[0].byte()
        instances = model(batch)[0]["instances"]
    finally:
        model.proposal_model = None
    assert instances.pred_masks.shape == (2, 60, 80)
    assert instances.pred_masks[0, 30:].all() and not instances.pred_masks[0, :30].any()
    assert instances.pred_masks[1, :, :10].all() and not instances.pred_masks[1, :, 10:].any()
    assert (instances.scores <= torch.tensor([0.9, 0.5])).all() and len(instances.pred_texts) == 2


def test_mode_queries(model):
    assert model.maskq_former.mode_queries.num_embeddings == 2  # demo train + agnostic
    model.eval()
    assert model.mode_of({}) == 1  # TEST_MODE "" = vocabulary-agnostic
    model.train()
    model.agnostic_mode_prob = 0.0
    assert model.mode_of({}) == 0 and model.dataset_of({}) == "openseg_demo_train"
    model.agnostic_mode_prob = 1.0
    assert model.mode_of({}) == 1
    model.agnostic_mode_prob = 0.5


def test_missing_llm_path_is_reported():
    with pytest.raises(FileNotFoundError, match="LLM_PATH"):
        build_model(
            load_config(
                os.path.join(
                    os.path.dirname(__file__), "..", "configs", "demo", "osm_tiny_test.yaml"
                ),
                ["MODEL.OSM.LLM_PATH", "meta-llama/Llama-2-7b"],
            )
        )
    assert OSM is not None


def test_proposals_from_a_registered_class_agnostic_model(llm_dir, tmp_path):
    """MASK_SOURCE 'proposals' runs a class-agnostic MaskFormer built from its YAML + saved
    weights and names its top-k masks: the masks equal that model's own top-k instances."""
    import cv2
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog

    proposal_config = os.path.join(
        os.path.dirname(__file__), "..", "configs", "demo", "maskformer_R18_class_agnostic.yaml"
    )
    torch.manual_seed(0)
    proposal = build_model(load_config(proposal_config)).eval()
    DetectionCheckpointer(proposal, save_dir=str(tmp_path)).save("proposal")
    cfg = _cfg(llm_dir)
    cfg.merge_from_list([
        "MODEL.OSM.MASK_SOURCE", "proposals", "MODEL.OSM.PROPOSAL_CONFIG", proposal_config,
        "MODEL.OSM.PROPOSAL_WEIGHTS", str(tmp_path / "proposal.pth"), "MODEL.OSM.PROPOSAL_TOPK", "3",
    ])
    osm = build_model(cfg).eval()

    record = DatasetCatalog.get("openseg_demo_val")[0]
    image = cv2.imread(record["file_name"])[:, :, ::-1]  # both models read RGB
    batch = [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()),
              "height": image.shape[0], "width": image.shape[1]}]
    with torch.no_grad():
        expected = proposal(batch)[0]["instances"]
        named = osm(batch)[0]["instances"]
    top = expected.scores.argsort(descending=True)[:3]
    assert len(named) == 3 and len(named.pred_texts) == 3
    assert torch.equal(named.pred_masks, expected.pred_masks[top].bool())


def test_instruction_templates_from_config(llm_dir):
    cfg = _cfg(llm_dir)
    cfg.merge_from_list(["MODEL.OSM.INSTRUCTION_TEMPLATES", ["Name {mask} please.", "What is {mask}?"]])
    assert build_model(cfg).templates == [["Name ", " please."], ["What is ", "?"]]
    cfg.merge_from_list(["MODEL.OSM.INSTRUCTION_TEMPLATES", ["no placeholder"]])
    with pytest.raises(ValueError, match="no placeholder"):
        build_model(cfg)
