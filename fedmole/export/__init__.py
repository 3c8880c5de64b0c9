"""Exporters of trained adapters to formats other tools load."""

from fedmole.export.peft_format import export_peft, peft_tensors

__all__ = ["export_peft", "peft_tensors"]
