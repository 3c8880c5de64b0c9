"""What a Flower run config carries for fedmole, and how the apps read it.

Keys (`context.run_config`, or bound by `make_server_app` / `make_client_app`): `config` (the fedmole config
as YAML text, or the path of a YAML file present on every machine), `out` (run directory; server only),
`overwrite` (bool), `resume` (bool; server only), `state-dir`, `engine-name` (the `engine` written to
summary.json), `progress`.
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from fedmole.config import Config
from fedmole.config_io import load_config, parse_yaml, validate_config
from fedmole.errors import UserError


def config_text(cfg: Config) -> str:
    """The config as YAML text: what travels in the run config under `config`. Only the keys that were set
    are written (some checks depend on what the user named, e.g. optional data columns), unless that would
    lose a value set on the object after loading; then the whole resolved config."""
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    if validate_config(yaml.safe_load(text) or {}).to_dict() != cfg.to_dict():
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return text


def config_from_text(text: str) -> Config:
    """The config from the run config's `config`: YAML text, or the path of a YAML file on this machine."""
    if "\n" not in text.strip() and text.strip().endswith((".yaml", ".yml")):
        return load_config(text.strip())
    return validate_config(parse_yaml(text, "the run config key `config`") or {})


def run_settings(run_config: Mapping, bound: dict | None) -> dict:
    """The run config with the `bound` settings on top, after checking that it holds a fedmole config."""
    settings = {**dict(run_config), **(bound or {})}
    if "config" not in settings:
        raise UserError("the Flower run config has no `config` key (the fedmole config as YAML text); write the "
                        "app with `fedmole flower app CONFIG --out DIR`")
    return settings
