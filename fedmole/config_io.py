"""Reading and writing configs: YAML files, `--set` overrides, validation with errors that speak to the user.

A run is described by one YAML file plus dotted overrides (`--set train.lr=1e-4`). `load_config` merges
them and validates the result against the schema of `fedmole.config` before anything heavy is imported or
loaded. Every mistake becomes one `UserError` that names the key, the value given, what is allowed and, for
typos, the closest valid key (`format_validation_error`). YAML is read with a bound on what aliases may
expand to (`parse_yaml`), since configs also arrive from other machines (a Flower run config).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedmole.config import ALGORITHMS, Config
from fedmole.errors import UserError, did_you_mean
from fedmole.paths import atomic_write_text

MAX_YAML_VALUES = 100_000  # a config holds a few hundred; more means nested aliases (&a / *a) multiplying


def _expanded_size(data: Any, origin: str) -> int:
    """How many values `data` holds once YAML aliases are expanded (capped just above the limit); a
    UserError for a structure that contains itself."""
    done: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        if id(x) in done:
            return done[id(x)]
        if id(x) in active:
            raise UserError(f"{origin}: a YAML alias refers to the value that contains it (a value cannot hold "
                            f"itself); write the values out")
        active.add(id(x))
        items = [*x.keys(), *x.values()] if isinstance(x, dict) else x
        n = min(1 + sum(size(v) for v in items), MAX_YAML_VALUES + 1)
        active.discard(id(x))
        done[id(x)] = n
        return n

    return size(data)


def parse_yaml(text: str, origin: str) -> Any:
    """YAML text -> data, or one UserError naming `origin`: invalid YAML, nesting too deep, or aliases that
    expand to more than MAX_YAML_VALUES values (a "billion laughs" file)."""
    try:
        data = yaml.safe_load(text)
        too_many = _expanded_size(data, origin) > MAX_YAML_VALUES
    except yaml.YAMLError as err:
        raise UserError(f"{origin} is not valid YAML: {err}") from None
    except RecursionError:
        raise UserError(f"{origin}: the YAML is nested too deeply to be a config") from None
    if too_many:
        raise UserError(f"{origin}: the YAML expands to more than {MAX_YAML_VALUES} values (aliases `*name` "
                        f"repeating anchors `&name` within each other); a config needs a few hundred, write "
                        f"the values out")
    return data


def read_config_file(path: Path) -> dict:
    """The mapping in a YAML config file, or a UserError that names the file and what to fix."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise UserError(f"config path {path} is a directory{hint}; pass a YAML file, e.g. configs/smoke.yaml")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"config file {path} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                        f"save it as UTF-8") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        raise UserError(f"config file {path} is empty (or holds only comments), so every default would run on "
                        f"the whole data set; write the settings you want, e.g. start from configs/smoke.yaml "
                        f"(an explicit `{{}}` runs the defaults)")
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: the top level must be a mapping of sections (model, data, ...)")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise UserError(f'override "{item}" is not of the form key.path=value (e.g. --set train.lr=1e-4)')
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f'override "{item}" has an empty key; write e.g. --set train.lr=1e-4')
    try:
        value = parse_yaml(raw, f'override "{item}"') if raw.strip() else ""
    except UserError as err:
        if "not valid YAML" not in str(err):
            raise
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f'override "{item}": "{part}" is a value, not a section')
            node = child
        node[path[-1]] = value
    return data


def _section_fields(loc: tuple, data: dict) -> list[str]:
    """Field names valid at `loc` (the path of an unknown key), for did-you-mean suggestions."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None:
            return []
        if model is Config and part == "algorithm":
            name = (data.get("algorithm") or {}).get("name", "fedit")
            model = ALGORITHMS.get(name)
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return []
    return list(model.model_fields)


def format_validation_error(err: ValidationError, data: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        # pydantic adds the union member / validator name into locations; keep only real keys
        key = ".".join(loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            fields = _section_fields(loc, data)
            hint = did_you_mean(loc[-1], fields)
            section = ".".join(loc[:-1]) or "top level"
            allowed = f"; allowed keys in {section}: {', '.join(fields)}" if fields else ""
            lines.append(f"unknown key `{key}`{hint}{allowed}")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if kind == "value_error" and not key:
            lines.append(msg)
            continue
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        if kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            lines.append(f"`{key}`{shown}: allowed values are {expected}{did_you_mean(value, _literal_choices(expected))}")
        else:
            lines.append(f"`{key}`{shown}: {msg}")
    return "invalid config: " + "; ".join(lines)


def _literal_choices(expected: str) -> list[str]:
    return [c.strip().strip("'\"") for c in expected.replace(" or ", ",").split(",") if c.strip()]


def validate_config(data: dict) -> Config:
    if not isinstance(data, dict):
        raise UserError("invalid config: the top level must be a mapping of sections (model, data, ...)")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, data)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when `path` is None), apply overrides and validate."""
    data = read_config_file(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate_config(data)


def dump_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML (a run directory's config.yaml), written atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
