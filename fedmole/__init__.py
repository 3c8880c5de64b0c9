"""fedmole."""


def load_model(path, device=None, precision=None):
    """(model, tokenizer) of a `fedmole export` directory, ready for inference (see `fedmole.export.load`)."""
    from fedmole.export.load import load_model as _load

    return _load(path, device=device, precision=precision)


__all__ = ["load_model"]
