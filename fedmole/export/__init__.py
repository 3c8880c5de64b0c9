"""Exporters of trained models to formats other tools load, and the loader of exported models."""

from fedmole.export.load import load_model
from fedmole.export.peft_format import export_peft, peft_tensors
from fedmole.export.run_export import export_run

__all__ = ["export_peft", "export_run", "load_model", "peft_tensors"]
