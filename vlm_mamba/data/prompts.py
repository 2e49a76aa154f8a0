"""Prompt templates and how a target follows its prompt.

The sequence the language model reads is ``[bos] prompt target [eos]`` after the image tokens. Caption
prompts are empty by default (BOS only, as in BLIP/VL-Mamba captioning); VQA uses the short
"Question: ... Answer:" form of the published Mamba VLMs. A target after a non-empty prompt gets one
leading space so the byte-level BPE sees the same word pieces it sees mid-sentence (" red", not "red");
:func:`clean_generation` strips it again from generated text.
"""

from __future__ import annotations

import re

CAPTION_PROMPT = ""
VQA_PROMPT = "Question: {q} Answer:"

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace and strip (COCO captions carry stray newlines and double spaces)."""
    return _WS.sub(" ", text).strip()


def check_template(template: str, task: str, key: str = "prompt") -> str:
    """Validate a template early, naming the config key: VQA templates need ``{q}``, captions none."""
    if task == "vqa":
        if "{q}" not in template:
            raise ValueError(f"{key}={template!r}: a VQA prompt template must contain '{{q}}' (the question)")
    elif "{" in template.replace("{{", "").replace("}}", ""):
        raise ValueError(f"{key}={template!r}: a caption prompt takes no fields; escape braces as '{{{{'")
    return template


def caption_prompt(template: str = CAPTION_PROMPT) -> str:
    return template.format()


def vqa_prompt(question: str, template: str = VQA_PROMPT) -> str:
    return template.format(q=normalize_text(question))


def target_text(target: str, prompt: str) -> str:
    """The target as encoded after ``prompt``: a leading space when the prompt is not empty."""
    target = normalize_text(target)
    return f" {target}" if prompt else target


def clean_generation(text: str) -> str:
    """Generated text -> the answer/caption string submitted to the scorers."""
    return normalize_text(text)
