"""Adapter layers (LoRA, mixtures of LoRA experts), their injection, and state by expert id."""

from fedmole.adapters.base import Adapter, LoRAAdapter
from fedmole.adapters.inject import AdapterSet, inject, matches
from fedmole.adapters.lora import LoRALinear
from fedmole.adapters.state import key, parse_key, state_digest

__all__ = ["Adapter", "AdapterSet", "LoRAAdapter", "LoRALinear", "inject", "key", "matches", "parse_key", "state_digest"]
