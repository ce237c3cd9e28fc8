"""Write a tiny random InstructBLIP directory in the Hugging Face layout, for tests and CPU
demos of OSM (`MODEL.OSM.BASE_MODEL`): config + safetensors weights, a word-level LLM
tokenizer (bos "<s>", eos "</s>"), a word-level Q-Former tokenizer in `qformer_tokenizer/`
and `preprocessor_config.json` with CLIP's mean / std (as InstructBLIP's). Its words are the
Table 4 templates and the given class names; anything else is "<unk>".

    python -m openseg.projects.osm.tiny_base_model OUTPUT_DIR [--classes a,b,c]
"""

import argparse
import json
import os
from typing import Sequence

import torch

from .templates import INSTRUCTION_TEMPLATES

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _word_tokenizer(words: Sequence[str], specials: Sequence[str], template: str, **special_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=list(specials)))
    first = template.split()[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tokenizer.token_to_id(t)) for t in {first, template.split()[-1]} if t != "$A"]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def write_tiny_base_model(path: str, class_names: Sequence[str] = (), seed: int = 0, num_query_tokens: int = 4,
                          vision_size: int = 28) -> str:
    """Write the directory; returns `path`."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    words = list(INSTRUCTION_TEMPLATES) + list(class_names)
    llm_tokenizer = _word_tokenizer(
        words, ["<unk>", "<pad>", "<s>", "</s>"], "<s> $A",
        unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    qformer_tokenizer = _word_tokenizer(
        words, ["[UNK]", "[PAD]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
    )
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=vision_size, patch_size=14),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            cross_attention_frequency=1, encoder_hidden_size=32, vocab_size=len(qformer_tokenizer),
                            max_position_embeddings=64, pad_token_id=qformer_tokenizer.pad_token_id,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),  # deterministic tests
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(llm_tokenizer),
                         max_position_embeddings=256, bos_token_id=llm_tokenizer.bos_token_id,
                         eos_token_id=llm_tokenizer.eos_token_id, pad_token_id=llm_tokenizer.pad_token_id,
                         initializer_range=0.5),  # confident logits, so a prefix can steer them
        num_query_tokens=num_query_tokens,
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    llm_tokenizer.save_pretrained(path)
    qformer_tokenizer.save_pretrained(os.path.join(path, "qformer_tokenizer"))
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "BlipImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                   "size": {"height": vision_size, "width": vision_size}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True}, f)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--classes", default="circle,square,triangle,cross,sky,grass,water,sand",
                        help="comma-separated class names added to the vocabulary (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_base_model(args.output, args.classes.split(","), args.seed))


if __name__ == "__main__":
    main()
