"""The configuration reference (docs/config.md), generated from the schema in `fedmole.config`.

`python -m fedmole.config_docs > docs/config.md` writes it (the command the page names);
tests/test_config.py fails when the page and the schema differ.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from fedmole.config import ALGORITHMS, AlgorithmConfig, Config

def _default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    else:
        value = field.default
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _type_text(field) -> str:
    text = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("Literal", "one of ").replace("NoneType", "null")


def _section_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not AlgorithmConfig:
            rows.extend(_section_rows(ann, f"{prefix}{name}."))
            continue
        cells = [f"`{prefix}{name}`", f"`{_type_text(field)}`", f"`{_default_text(field)}`", field.description or ""]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def reference_markdown() -> str:
    """The configuration reference (docs/config.md), generated from the schema so it cannot drift."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `fedmole/config.py` by `python -m fedmole.config_docs > docs/config.md`; a test keeps it current.",
        "Every key can be set in the YAML file or overridden with `--set section.key=value`.",
        "",
    ]
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in Config.model_fields.items():
        if name == "algorithm":
            continue
        out += [f"## `{name}`", "", *header, *_section_rows(field.annotation, f"{name}."), ""]
    out += ["## `algorithm`", "", "`algorithm.name` selects the method; each method has its own keys.", ""]
    for name, cls in sorted(ALGORITHMS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        out += [f"### `{name}`", "", *(doc[:1] if doc else []), "", *header,
                *[row for row in _section_rows(cls, "algorithm.") if not row.startswith("| `algorithm.name`")], ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
