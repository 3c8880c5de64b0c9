"""fedmole: federated fine-tuning of LLMs with mixtures of LoRA experts.

The package's own API is `load_model` (a model written by `fedmole export`, ready for inference); the modules
and their layers are mapped in docs/design.md."""


def load_model(path, device=None, precision=None):
    """(model, tokenizer) of a `fedmole export` directory, ready for inference (see `fedmole.export.load`)."""
    from fedmole.export.load import load_model as _load

    return _load(path, device=device, precision=precision)


__all__ = ["load_model"]
