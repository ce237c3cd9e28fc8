"""Instruction templates for naming a mask with an LLM. `{mask}` marks where the mask-query
embeddings are inserted. Training samples one per mask; testing uses the first (OSM, Sec. 3.3)."""

from typing import List

MASK_PLACEHOLDER = "{mask}"

INSTRUCTION_TEMPLATES: List[str] = [
    "What is the category of the region {mask}? Answer with one name.",
    "Name the object in the region {mask}.",
    "What is shown in {mask}?",
    "Which category does {mask} belong to?",
    "Give the class name of the region {mask}.",
    "Region {mask}. What is it?",
    "Identify the thing or stuff in {mask}.",
    "What do you see in the masked area {mask}?",
    "Tell me the name of the object in {mask}.",
    "Classify the region {mask}.",
    "The region {mask} contains what?",
    "What is this segment {mask}?",
    "Describe the region {mask} with a category name.",
    "Label the masked region {mask}.",
    "What kind of object or material is in {mask}?",
    "Recognize the content of {mask}.",
    "Look at {mask}. What is its category?",
    "Predict the semantic class of {mask}.",
    "In one word or phrase, what is {mask}?",
]


def split_template(template: str) -> List[str]:
    """(text before, text after) the mask placeholder; exactly one placeholder is required."""
    parts = template.split(MASK_PLACEHOLDER)
    if len(parts) != 2:
        raise ValueError(f"Instruction template {template!r} must contain {MASK_PLACEHOLDER} once.")
    return parts
