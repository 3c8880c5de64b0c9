"""The one example schema every data source produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Example:
    """One instruction example.

    Generation examples have a free-text `response`. Classification examples also carry `choices` (the
    verbalisers) and `label` (the index of the gold choice); their `response` is `choices[label]`.
    `task` and `domain` describe where the example comes from and are what partitions split on.
    """

    instruction: str
    response: str
    context: str = ""
    choices: list[str] | None = None
    label: int | None = None
    task: str = ""
    domain: str = ""
    uid: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_classification(self) -> bool:
        return self.choices is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(**d)
