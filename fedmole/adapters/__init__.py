"""Adapter layers (LoRA, mixtures of LoRA experts), their injection, and state by expert id."""

from fedmole.adapters.inject import AdapterSet, inject, matches
from fedmole.adapters.lora import LoRALinear
from fedmole.adapters.state import key, parse_key, state_digest

__all__ = ["AdapterSet", "LoRALinear", "inject", "key", "matches", "parse_key", "state_digest"]
