"""Batched greedy answers from a Qwen-VL model for canvas images (used for parse-rate checks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from cogalign_core import answer_format


@torch.no_grad()
def generate_answers(model: PreTrainedModel, processor: ProcessorMixin, images: Sequence[Image.Image],
                     grounding: bool, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy completion text (special tokens stripped) for each canvas image, in input order."""
    prompt = processor.apply_chat_template(answer_format.prompt_messages(grounding), add_generation_prompt=True,
                                           tokenize=False)
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
            inputs = inputs.to(model.device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def parse_rate(texts: Sequence[str], grounding: bool) -> float:
    """Fraction of texts that parse as exactly valid answers."""
    if not texts:
        return 0.0
    return sum(answer_format.parse_answer(t, grounding=grounding).valid for t in texts) / len(texts)
