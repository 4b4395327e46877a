"""The trained arms: each model stage and the recipe method it trains with.

Its own module so the parameter models can name the arms without importing the recipe loader (a
stage's code fingerprint is its import closure: only stages that load recipes depend on them).
"""

from __future__ import annotations

from typing import Literal

Method = Literal["sft", "sft_cf", "grpo", "grpo_no_cf"]
METHODS: tuple[str, ...] = ("sft", "sft_cf", "grpo", "grpo_no_cf")
SFT_METHODS: tuple[str, ...] = ("sft", "sft_cf")
# DVC stage -> the recipe method it trains with. sft and sft_cf start from the base model; rl_no_cf and
# rl from the sft model.
ARM_METHODS: dict[str, Method] = {"sft": "sft", "sft_cf": "sft_cf", "rl_no_cf": "grpo_no_cf", "rl": "grpo"}
