"""Build the tiny Qwen3-VL model/tokenizer/processor offline, and load any saved model offline.

The tiny model has Qwen3-VL's exact architecture (``Qwen3VLForConditionalGeneration``: ViT with
deepstack mergers, M-RoPE text decoder) at toy size, a byte-level BPE tokenizer trained on the
train split's prompts and answers, Qwen's chat/vision special tokens and a Qwen-style chat
template. Everything is seeded, so two builds from the same corpus give identical files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from cogalign_core import answer_format
from cogalign_core.train.recipe import TinyModelSpec

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN, "<|im_start|>", EOS_TOKEN, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen-style template: system/user/assistant turns, an image part becomes
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> to one token per
# merged patch). Content may be a string or a list of typed parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def answer_tag_tokens() -> list[str]:
    """The answer format's tags, added as ordinary (non-special) tokens so decoding keeps them."""
    tags = [*answer_format.TAGS, answer_format.BOX_TAG]
    return [t for tag in tags for t in (f"<{tag}>", f"</{tag}>")]


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` with Qwen's special tokens and the answer tags.

    The byte alphabet is always included, so any text (also unseen) tokenizes without ``<unk>``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    tok.add_tokens(answer_tag_tokens())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=4096, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_processor_for_canvas(canvas_size: int, patch_size: int, merge_size: int = 2) -> Qwen2VLImageProcessor:
    """Qwen2-VL-style image processor that keeps a ``canvas_size`` square canvas at its size.

    Tokens per image = (canvas_size / patch_size / merge_size) ** 2.
    """
    if canvas_size % (patch_size * merge_size):
        raise ValueError(f"canvas {canvas_size} px is not a multiple of patch {patch_size} x merge {merge_size}")
    pixels = canvas_size * canvas_size
    return Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                 size={"shortest_edge": pixels, "longest_edge": pixels},
                                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, canvas_size: int) -> Qwen3VLProcessor:
    """The stock Qwen3-VL processor around the trained tokenizer."""
    image_processor = image_processor_for_canvas(canvas_size, spec.patch_size)
    video_processor = Qwen3VLVideoProcessor(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)


def tiny_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, canvas_size: int) -> Qwen3VLConfig:
    """Qwen3-VL config at toy size; token ids come from ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    grid = canvas_size // spec.patch_size
    text = {
        "vocab_size": len(tokenizer), "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads, "head_dim": spec.head_dim,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": spec.mrope_section,
                            "mrope_interleaved": True},
        "bos_token_id": None, "eos_token_id": ids[EOS_TOKEN], "pad_token_id": ids[PAD_TOKEN],
    }
    vision = {
        "depth": spec.vision_depth, "hidden_size": spec.vision_hidden_size, "num_heads": spec.vision_heads,
        "intermediate_size": spec.vision_intermediate_size, "patch_size": spec.patch_size, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": spec.hidden_size, "num_position_embeddings": grid * grid,
        "deepstack_visual_indexes": list(range(min(spec.vision_depth, spec.num_hidden_layers))),
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, canvas_size: int
                     ) -> Qwen3VLForConditionalGeneration:
    """Randomly initialised (seeded) tiny Qwen3-VL model with a matching generation config."""
    config = tiny_config(spec, tokenizer, canvas_size)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id)
    return model.eval()


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from a recipe's dtype name."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model_and_processor(path: str | os.PathLike[str], dtype: str = "float32", attn_implementation: str = "sdpa",
                             **kwargs: Any) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a saved model and its processor from a local directory, never touching the network."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} holds no saved model (config.json missing)")
    model = AutoModelForImageTextToText.from_pretrained(p, local_files_only=True, dtype=torch_dtype(dtype),
                                                        attn_implementation=attn_implementation, **kwargs)
    processor = AutoProcessor.from_pretrained(p, local_files_only=True)
    return model, processor


def save_model_and_processor(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | os.PathLike[str]
                             ) -> None:
    """``save_pretrained`` of model (safetensors) and processor (tokenizer included) into ``out_dir``."""
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def save_trained(model: Any, processor: ProcessorMixin, out_dir: Path, lora: bool) -> Any:
    """Save a trained model into ``out_dir``: ``adapter/`` (LoRA only) and the merged ``model/``.

    Each directory appears atomically (complete or not at all). Returns the merged model.
    """
    from cogalign_core.io import atomic_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    if lora:
        with atomic_dir(out_dir / "adapter") as tmp_adapter:
            model.save_pretrained(tmp_adapter)
        model = model.merge_and_unload()
    with atomic_dir(out_dir / "model") as tmp_model:
        save_model_and_processor(model, processor, tmp_model)
    return model


def count_image_tokens(canvas_size: int, patch_size: int, merge_size: int = 2) -> int:
    """Image tokens the language model sees per canvas."""
    return (canvas_size // (patch_size * merge_size)) ** 2
