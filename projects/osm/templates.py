"""OSM's instruction templates: Table 4 of Yu, Shen and Chen, "Towards Open-Ended Visual
Recognition with Large Language Model" (also `train/data.py:MASK_PROMPT` of the release).

Training picks one at random and appends the ground-truth class name: the LLM text is
"<template> <class name></s>" (Table 4's "Assistant: {class_name}"; the release appends the
tokenizer's eos). Testing uses only the first template (Sec. 3.3) and reads the answer as
the greedy continuation up to eos."""

from typing import List

INSTRUCTION_TEMPLATES: List[str] = [
    "What is in the segmentation mask? Assistant:",
    "Describe what is in the segmentation mask. Assistant:",
    "What does this segmentation mask show? Assistant:",
    "What is this segmentation mask? Assistant:",
    "What is the segmentation mask region of the image? Assistant:",
    "Briefly describe what you perceive in the segmentation mask region. Assistant:",
    "Please tell the category of what is indicated by the segmentation mask. Assistant:",
    "What does this segmentation mask segments? Assistant:",
    "What does this segmentation mask capture? Assistant:",
    "Answer the name of what is in the segmentation mask region. Assistant:",
    "What is the semantic class of the area given the segmentation mask? Assistant:",
    "Can you describe what is in the segmentation mask region? Assistant:",
    "From the image and segmentation mask provided, tell the category of the indicated region. Assistant:",
    "Could you use a few words to describe what is in the segmentation mask region? Assistant:",
    "Given the image and segmentation mask, answer what is in the region. Assistant:",
    "Tell me what you see in the segmentation mask region. Assistant:",
    "What can you see in the segmentation mask region? Assistant:",
    "Let me know what you can perceive in the mask region. Assistant:",
    "Give me the name of the object in the segmentation mask. Assistant:",
]


def answer_text(template: str, class_name: str, eos_token: str) -> str:
    """The training text of one mask (Table 4 format, as `train/data.py` builds it)."""
    return f"{template} {class_name.strip()}{eos_token}"
