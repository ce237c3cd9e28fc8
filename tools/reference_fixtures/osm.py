"""Fixtures of the released OmniScient Model (bytedance/OmniScient-Model, `modeling/osm.py`).

The reference `OmniScientModel` wraps an `InstructBlipForConditionalGeneration` built from a
tiny random `InstructBlipConfig` (ViT 28 px / patch 14, 2-layer Q-Former with its 32 query tokens,
2-layer Llama), with the trainable parts frozen / unfrozen as `modeling/factory.py` does.

Written to `out_dir`:
- `base_model/`: the InstructBLIP before OSM training (`save_pretrained`, safetensors);
- `osm_release_format.pt`: the OSM weights in the release's checkpoint format
  (`{"epoch", "model_state_dict": {"module.<name>": ...}}`, trainable parameters + buffers, as
  `train/train_utils.py:save_checkpoint` writes it), after perturbing every trained tensor so
  that a loader that skipped one would change the outputs;
- `cases.pt`: inputs and the reference's outputs (eval logits per mode, training loss, greedy
  tokens + scores, context masks of `utils.get_context_mask`) for two windowings: stride =
  window (the release's default) and stride = window / 2 (overlapping windows, averaged).

Runtime shims (the release targets transformers 4.33, the installed one is 5.x):
1. `modeling/osm.py` passes a 3-D `encoder_attention_mask` [B, queries, tokens] to the Q-Former;
   transformers 4.33 turned it into the additive bias `(1 - mask[:, None]) * finfo.min`
   (`ModuleUtilsMixin.invert_attention_mask`), 5.x only accepts 2-D masks or ready 4-D
   biases. The shim wraps the Q-Former's forward to do the 4.33 conversion.
2. `utils.py` imports `segment_anything` (only for SAM); a stub module stands in for it.
3. `generate` reads `text_config.architectures[0]`; the tiny config sets it to
   "LlamaForCausalLM" (so the release's Vicuna-0->2 token fix is not triggered).
"""
import sys
import types
from pathlib import Path

import torch

SEED = 0


def _tiny_config():
    from transformers import InstructBlipConfig

    config = InstructBlipConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=28, patch_size=14, attention_dropout=0.0,
        ),
        qformer_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            cross_attention_frequency=1, encoder_hidden_size=32, vocab_size=40,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        text_config=dict(
            model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=50, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"],
        ),
        num_query_tokens=32,  # modeling/osm.py hard-codes 32 mask queries
    )
    return config


def _shim_qformer(base_model) -> None:
    qformer = base_model.qformer
    forward = qformer.forward

    def forward_with_3d_mask(*args, encoder_attention_mask=None, encoder_hidden_states=None, **kwargs):
        if encoder_attention_mask is not None and encoder_attention_mask.dim() == 3:
            dtype = encoder_hidden_states.dtype
            encoder_attention_mask = (1.0 - encoder_attention_mask[:, None].to(dtype)) * torch.finfo(dtype).min
        return forward(*args, encoder_attention_mask=encoder_attention_mask,
                       encoder_hidden_states=encoder_hidden_states, **kwargs)

    qformer.forward = forward_with_3d_mask


def _release_checkpoint(model) -> dict:
    """train_utils.save_checkpoint + filter_state_dict_to_trainable, under DDP ("module.")."""
    state = model.state_dict()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad and name in state:
            del state[name]
    return {"epoch": 0, "model_state_dict": {"module." + k: v.clone() for k, v in state.items()}}


def _masks(batch: int, size: int) -> torch.Tensor:
    masks = torch.zeros(batch, 1, size, size)
    masks[0, 0, 9:30, 5:21] = 1
    masks[0, 0, 20:26, 18:40] = 1
    if batch > 1:
        masks[1, 0, 33:52, 30:50] = 1
    return masks


def generate(reference_root: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    sys.modules.setdefault("segment_anything", types.ModuleType("segment_anything"))
    stub = sys.modules["segment_anything"]
    for name in ("sam_model_registry", "SamAutomaticMaskGenerator", "SamPredictor"):
        setattr(stub, name, None)
    sys.path.insert(0, str((reference_root / "bytedance__OmniScient-Model").resolve()))
    from modeling.osm import OmniScientModel
    from transformers import InstructBlipForConditionalGeneration
    from utils import get_context_mask

    torch.manual_seed(SEED)
    base = InstructBlipForConditionalGeneration(_tiny_config()).eval()
    # InstructBLIP initialises its query tokens to zeros; give them values so that the
    # mask / context queries are distinguishable
    with torch.no_grad():
        base.query_tokens.normal_(std=0.5)
    base.save_pretrained(out_dir / "base_model")
    _shim_qformer(base)

    cases = {}
    input_size, window = 56, 28
    for stride in (28, 14):
        torch.manual_seed(SEED + stride)
        model = OmniScientModel(
            base_model=base if stride == 28 else InstructBlipForConditionalGeneration.from_pretrained(
                out_dir / "base_model"),
            input_size=input_size, sliding_window_size=window, sliding_window_stride=stride,
            backbone_output_stride=14, backbone_output_channel=32, maskqformer_channel=32,
            llm_channel=32,
        )
        if stride != 28:
            _shim_qformer(model.base_model)
        # modeling/factory.py's freezing
        model.requires_grad_(False)
        for part in (model.window_pos_embed, model.mask_query, model.context_query):
            part.requires_grad_(True)
        model.qformer_mode_query.requires_grad_(True)
        model.mode_query.requires_grad_(True)
        model.base_model.qformer.requires_grad_(True)
        model.base_model.language_projection.requires_grad_(True)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.05)
        checkpoint = _release_checkpoint(model)

        generator = torch.Generator().manual_seed(SEED + 1)
        batch = 2
        pixel_values = torch.randn(batch, 3, input_size, input_size, generator=generator)
        masks = _masks(batch, input_size)
        context = torch.stack([get_context_mask(m.view(1, input_size, input_size), input_size, 0.5) for m in masks])
        context_global = torch.stack([get_context_mask(m.view(1, input_size, input_size), input_size, -1.0) for m in masks])
        qformer_ids = torch.randint(1, 40, (batch, 6), generator=generator)
        qformer_attention = torch.ones_like(qformer_ids)
        input_ids = torch.randint(3, 50, (batch, 7), generator=generator)
        input_ids[:, 0] = 1
        attention = torch.ones_like(input_ids)
        # training text: right-padded with pad id 0, labels as train_utils.parse_data
        text_ids = torch.randint(3, 50, (batch, 9), generator=generator)
        text_ids[:, 0] = 1
        text_ids[0, 7:] = 0
        text_ids[0, 6] = 2
        text_ids[1, 8] = 2
        text_attention = (text_ids != 0).long()
        labels = text_ids.clone()
        labels[labels == 0] = -100
        labels[:, 0] = -100

        case = dict(
            input_size=input_size, window=window, stride=stride, pixel_values=pixel_values,
            masks=masks, context=context, context_global=context_global,
            qformer_ids=qformer_ids, qformer_attention=qformer_attention, input_ids=input_ids,
            attention=attention, text_ids=text_ids, text_attention=text_attention, labels=labels,
            checkpoint=checkpoint,
        )
        model.eval()
        with torch.no_grad():
            embeds = model.sliding_window_vit_forward(pixel_values) + model.window_pos_embed
            case["image_embeds"] = embeds
            for mode in ("coco", "any"):
                mask_att, context_att = model.generate_attention_mask(embeds, masks, context)
                q = model.maskqformer_encoding(embeds, mask_att, context_att, mode, qformer_ids, qformer_attention)
                out = model.llm_decoding(q, mode, input_ids, attention, is_generation=False)
                case[f"logits_{mode}"] = out[0]
            generated = model.generate(
                pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                qformer_attention_mask=qformer_attention, input_ids=input_ids, attention_mask=attention,
                segmentation_mask=masks, input_context_mask=context, dataset_type="any",
                max_new_tokens=5, num_beams=1, do_sample=False, return_dict_in_generate=True,
                output_scores=True,
            )
            scores = torch.stack(generated["scores"], dim=1)
            top2 = scores.topk(2, dim=-1).values
            assert (top2[..., 0] - top2[..., 1]).min() > 1e-3, "near-tie in greedy decoding; change SEED"
            case["generated"] = generated["sequences"][:, -scores.shape[1]:]
            case["scores"] = scores
        model.train()
        case["loss_coco"] = model(
            pixel_values=pixel_values, qformer_input_ids=qformer_ids,
            qformer_attention_mask=qformer_attention, input_ids=text_ids, attention_mask=text_attention,
            labels=labels, segmentation_mask=masks, input_context_mask=context, dataset_type="coco",
        ).detach()
        cases[stride] = case
    torch.save(cases, out_dir / "cases.pt")
    print(f"wrote {out_dir}")
