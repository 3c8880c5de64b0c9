"""Config schema: defaults, overrides, and errors that name the key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from fedmole.config import ALGORITHMS, Config
from fedmole.config_io import apply_overrides, load_config, validate_config
from fedmole.errors import UserError


def test_defaults_validate_and_round_trip():
    cfg = validate_config({})
    again = validate_config(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.algorithm.name == "fedit"


def test_dotted_overrides_parse_yaml_values():
    data = apply_overrides({}, ["train.lr=1e-4", "algorithm.target_modules=[q_proj,k_proj]", "eval.init=true"])
    cfg = validate_config(data)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.algorithm.target_modules == ["q_proj", "k_proj"]
    assert cfg.eval.init is True


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError) as e:
        validate_config({"train": {"lrr": 0.1}})
    msg = str(e.value)
    assert "train.lrr" in msg and 'did you mean "lr"' in msg and "local_steps" in msg


def test_unknown_section_is_an_error():
    with pytest.raises(UserError, match='unknown key `trian`.*did you mean "train"'):
        validate_config({"trian": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(UserError) as e:
        validate_config({"train": {"batch_size": "four"}})
    assert "train.batch_size" in str(e.value) and "'four'" in str(e.value)


def test_literal_lists_allowed_values_with_suggestion():
    with pytest.raises(UserError) as e:
        validate_config({"train": {"optimizer": "adamm"}})
    msg = str(e.value)
    assert "train.optimizer" in msg and "'adam'" in msg and 'did you mean "adam"' in msg


def test_unknown_algorithm_lists_known_ones():
    with pytest.raises(UserError) as e:
        validate_config({"algorithm": {"name": "fedavgg"}})
    msg = str(e.value)
    assert "fedavgg" in msg
    for name in ALGORITHMS:
        assert name in msg


def test_algorithm_keys_are_validated_per_method():
    with pytest.raises(UserError, match="algorithm.personalize_by_finetune"):
        validate_config({"algorithm": {"name": "local", "personalize_by_finetune": True}})
    with pytest.raises(UserError, match="algorithm.rank"):
        validate_config({"algorithm": {"name": "fedit", "rank": 0}})


def test_impossible_combinations():
    with pytest.raises(UserError, match=r"clients_per_round \(5\) exceeds federation.num_clients \(3\)"):
        validate_config({"federation": {"num_clients": 3, "clients_per_round": 5}})
    with pytest.raises(UserError, match="partition.splits.test"):
        validate_config({"partition": {"splits": {"test": 0}}})
    with pytest.raises(UserError, match="fp16"):
        validate_config({"train": {"precision": "fp16", "device": "cpu"}})
    with pytest.raises(UserError, match="train.device"):
        validate_config({"train": {"device": "gpu"}})


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key.path=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_config(None, ["train.lr=1", "train.lr.x=2"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_cli_config_error_exits_2_before_loading_anything(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "run", str(cfg), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # failed before the run directory was created


def test_every_registered_algorithm_has_an_implementation():
    from fedmole.algorithms import get_algorithm

    for name in ALGORITHMS:
        mod = get_algorithm(name)
        assert mod.__name__ == ALGORITHMS[name].module
        assert hasattr(mod, "Server") and hasattr(mod, "Client") and hasattr(mod, "build_adapters")


def test_config_is_the_only_default_source():
    assert Config().train.local_steps == validate_config({}).train.local_steps


def test_docs_config_reference_is_current():
    """docs/config.md is generated from the schema; regenerate with `python -m fedmole.config_docs > docs/config.md`."""
    from pathlib import Path

    from fedmole.config_docs import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text().strip() == reference_markdown().strip()


def test_resolved_config_file_round_trips_every_key(tmp_path):
    """config.yaml in a run directory must reload to the same config, method keys included."""
    from fedmole.config_io import dump_config

    cfg = load_config(None, ["algorithm.rank=4", "algorithm.alpha=8", "algorithm.personalize_by_finetune=true",
                             "train.lr=3e-4", "tiers.mix=low-heavy"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.algorithm.rank == 4 and again.algorithm.personalize_by_finetune is True


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """Each file in configs/ passes validation (and each method's cross-checks) as shipped."""
    cfg = load_config(path)
    assert cfg.federation.num_clients >= 1 and cfg.algorithm.name
