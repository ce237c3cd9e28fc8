"""A tiny random SigLIP-like open_clip model, built locally: a 2-block timm ViT with an
attention-pooling ("map") head registered in timm as `openseg_test_vit_map`, the open_clip
config tests/data/open_clip/openseg-test-siglip.json, and a word-level Hugging Face tokenizer
written to a folder (`write_tokenizer`). Nothing is downloaded."""
import os

import open_clip
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "open_clip")
SIGLIP = "openseg-test-siglip"
WORDS = ["a", "photo", "of", "the", "circle", "square", "triangle", "cross", "sky", "grass",
         "water", "sand", "cat", "dog", "."]

if "openseg_test_vit_map" not in __import__("timm").list_models("openseg_test_vit_map"):

    @register_model
    def openseg_test_vit_map(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        kwargs.setdefault("img_size", 64)
        return VisionTransformer(
            patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False, **kwargs
        )

open_clip.add_model_config(CONFIG_DIR)


def write_tokenizer(folder: str) -> str:
    """Save a word-level tokenizer (pad 0, unk 1, eos 2, then WORDS) to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder
