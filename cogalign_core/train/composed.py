"""The composed offline model: a stock ``FastVlmForConditionalGeneration`` that really sees.

Vision: a timm CNN (``TimmWrapperConfig``, no pooling) whose ImageNet weights come from a PyPI wheel
(:mod:`cogalign_core.train.vision_weights`); its final feature map ``(B, C, H/r, W/r)`` is
flattened to ``(H/r * W/r)`` image tokens (49 at 224 px for EfficientNet-Lite0, r = 32) and mapped
by FastVLM's two-layer projector into a small random-init Qwen3 text decoder. The processor is
the stock ``LlavaProcessor`` + ``CLIPImageProcessor`` (normalisation of the tower's weights), so
``AutoModelForImageTextToText`` / ``AutoProcessor`` reload the saved folder with no custom code.

LLaVA's own class cannot take a CNN tower (it feeds the 4-D map to a linear projector); FastVLM's
``get_image_features`` flattens it, which is why this is the architecture.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessor,
    FastVlmConfig,
    FastVlmForConditionalGeneration,
    GenerationConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen3Config,
    TimmWrapperConfig,
)

from cogalign_core.train import modeling, vision_weights
from cogalign_core.train.recipe import ComposedModelSpec

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (*modeling.CHAT_TOKENS, IMAGE_TOKEN)
CHAT_TEMPLATE = modeling.chat_template(image=IMAGE_TOKEN, video=IMAGE_TOKEN)


def image_tokens(spec: ComposedModelSpec, image_size: int) -> int:
    """Image tokens per canvas: one per cell of the tower's final feature map."""
    cells = image_size // vision_weights.wheel(spec.vision_weights).reduction
    return cells * cells


def train_tokenizer(corpus: list[str], spec: ComposedModelSpec) -> PreTrainedTokenizerFast:
    """BPE tokenizer on the train split's texts with the chat tokens and LLaVA's ``<image>`` token."""
    return modeling.train_tokenizer(corpus, spec.text.vocab_size, SPECIAL_TOKENS, spec.text.split_digits,
                                    CHAT_TEMPLATE)


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: ComposedModelSpec, image_size: int) -> LlavaProcessor:
    """Stock ``LlavaProcessor``: a ``CLIPImageProcessor`` at the canvas size with the tower's normalisation.

    Canvas images are already ``image_size`` squares, so resize and centre-crop keep them as they are.
    """
    w = vision_weights.wheel(spec.vision_weights)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_convert_rgb=True, image_mean=list(w.mean), image_std=list(w.std))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=w.reduction,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def build_config(spec: ComposedModelSpec, tokenizer: PreTrainedTokenizerFast, image_size: int) -> FastVlmConfig:
    """FastVLM config: the wheel's timm architecture (no pooling) + a small Qwen3 decoder sized by ``spec.text``."""
    w = vision_weights.wheel(spec.vision_weights)
    t = spec.text
    eos, pad = tokenizer.convert_tokens_to_ids(modeling.EOS_TOKEN), tokenizer.convert_tokens_to_ids(modeling.PAD_TOKEN)
    text = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos, pad_token_id=pad)
    vision = TimmWrapperConfig(architecture=w.architecture, hidden_size=w.feature_dim, do_pooling=False)
    return FastVlmConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=image_tokens(spec, image_size),
                         projector_hidden_act=spec.projector_hidden_act)


def build_model(spec: ComposedModelSpec, tokenizer: PreTrainedTokenizerFast, image_size: int, seed: int
                ) -> FastVlmForConditionalGeneration:
    """Seeded random projector + text model around the wheel's pretrained tower (loaded strictly).

    The tower's ImageNet classifier head is not part of the feature extractor, so it is the one key
    of the wheel left out; every other tensor must load.
    """
    config = build_config(spec, tokenizer, image_size)
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config)
    timm_model = model.model.vision_tower.timm_model
    weights = vision_weights.load_timm_state_dict(spec.vision_weights)
    head = {k for k in weights if k.startswith("classifier.")}
    missing, unexpected = timm_model.load_state_dict({k: v for k, v in weights.items() if k not in head},
                                                     strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"{spec.vision_weights} does not fit {type(timm_model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id)
    return model.eval()
