"""Base model and tokenizer loading."""

from fedmole.models.loader import BUILTINS, load_model, load_tokenizer, resolve_device

__all__ = ["BUILTINS", "load_model", "load_tokenizer", "resolve_device"]
