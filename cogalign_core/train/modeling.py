"""Build the tiny Qwen3-VL model/tokenizer/processor offline, load any saved model offline, and the
pieces every offline-built model shares (tokenizer training, chat template, saving, the vision tower).

The tiny model has Qwen3-VL's exact architecture (``Qwen3VLForConditionalGeneration``: ViT with
deepstack mergers, M-RoPE text decoder) at toy size, a byte-level BPE tokenizer trained on the
train split's prompts and answers, Qwen's chat/vision special tokens and a Qwen-style chat
template. Everything is seeded, so two builds from the same corpus give identical files.
The composed (pretrained-tower) model is built in :mod:`cogalign_core.train.composed`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
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
from cogalign_core.settings import load_settings
from cogalign_core.train.recipe import TinyModelSpec

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
CHAT_TOKENS: tuple[str, ...] = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
SPECIAL_TOKENS: tuple[str, ...] = (
    *CHAT_TOKENS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def chat_template(image: str = QWEN_IMAGE, video: str = QWEN_VIDEO) -> str:
    """Qwen-style chat template: system/user/assistant turns; an image part becomes ``image``.

    The processor expands the image placeholder token to one token per image feature. Content may be
    a string or a list of typed parts.
    """
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- '{image}' -}}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{- '{video}' -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template()


def answer_tag_tokens() -> list[str]:
    """The answer format's tags, added as ordinary (non-special) tokens so decoding keeps them."""
    tags = [*answer_format.TAGS, answer_format.BOX_TAG]
    return [t for tag in tags for t in (f"<{tag}>", f"</{tag}>")]


def train_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = SPECIAL_TOKENS,
                    split_digits: bool = False, template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` with ``special_tokens`` and the answer tags.

    The byte alphabet is always included, so any text (also unseen) tokenizes without ``<unk>``.
    With ``split_digits`` every digit is its own pre-token (Qwen's rule), so numbers never merge.
    """
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    tok.add_tokens(answer_tag_tokens())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   model_max_length=4096, padding_side="right")
    fast.chat_template = template
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
    """``save_pretrained`` of model (safetensors) and processor (tokenizer included) into ``out_dir``.

    A tower frozen by :func:`freeze_vision_tower` is saved in its stock form (BatchNorm with its
    ``num_batches_tracked`` counters), so the folder reloads into the stock class with no missing key.
    """
    with _stock_batchnorm(model):
        model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


@contextlib.contextmanager
def _stock_batchnorm(model: Any) -> Iterator[None]:
    """Within the block, a frozen tower's BatchNorm layers are ordinary ones again (same tensors)."""
    from timm.layers import FrozenBatchNormAct2d
    from timm.utils.model import freeze, unfreeze
    from torchvision.ops.misc import FrozenBatchNorm2d

    try:
        tower = vision_tower(model)
    except ValueError:
        yield
        return
    if not any(isinstance(m, FrozenBatchNorm2d | FrozenBatchNormAct2d) for m in tower.modules()):
        yield
        return
    unfreeze(tower)
    try:
        yield
    finally:
        freeze(tower)


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




def configure_cpu_threads() -> int:
    """Set torch's intra-op threads for a CPU training/inference stage; returns the number set.

    Small models issue many tiny ops; on a shared (or oversubscribed) CPU every op's thread barrier
    spin-waits, so one thread per stage was 5x faster than two on a loaded 2-core machine (GRPO steps of
    the lite0-small recipe), and concurrent stages then use one core each. The ``torch_threads`` execution
    setting (``COGALIGN_TORCH_THREADS``, :mod:`cogalign_core.settings`) changes it; outputs do not depend on
    it. On a GPU it is left alone.
    """
    if torch.cuda.is_available():
        return torch.get_num_threads()
    n = load_settings().torch_threads
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def vision_tower(model: Any) -> torch.nn.Module:
    """The vision encoder of a Qwen-VL (``model.visual``) or LLaVA/FastVLM (``model.vision_tower``) model.

    Accepts PEFT-wrapped models. Raises ``ValueError`` when the model has neither.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "model", inner)
    for name in ("visual", "vision_tower"):
        tower = getattr(inner, name, None)
        if isinstance(tower, torch.nn.Module):
            return tower
    raise ValueError(f"{type(model).__name__} has no vision tower (visual / vision_tower)")


def freeze_vision_tower(model: Any) -> int:
    """Freeze the vision tower in place; returns the number of frozen parameters.

    Gradients stop (``requires_grad_(False)``) and every BatchNorm becomes timm's
    ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``: ``Trainer`` calls ``model.train()``, which
    would otherwise normalise with batch statistics and let the running statistics drift. Frozen BN
    keeps the same tensors (weight, bias, running mean/var), so a saved model reloads into the stock
    architecture unchanged.
    """
    from timm.utils.model import freeze

    tower = vision_tower(model)
    n = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    freeze(tower)  # params frozen and BatchNorm converted in place (timm.utils.model.freeze)
    return n


def count_image_tokens(canvas_size: int, patch_size: int, merge_size: int = 2) -> int:
    """Image tokens the language model sees per canvas."""
    return (canvas_size // (patch_size * merge_size)) ** 2
