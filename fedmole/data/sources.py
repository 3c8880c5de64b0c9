"""Data sources: every dataset becomes one list of `Example`s.

`load_examples(cfg, seed)` reads the source named by `data.source`, keeps the configured tasks and domains,
and optionally samples `data.max_examples` of them. Sources:

| source               | `data.path`                                   | task / domain                       |
|----------------------|-----------------------------------------------|-------------------------------------|
| wordnet              | WordNet dict directory (optional)             | wordnet task / lexicographer file   |
| jsonl, json, csv     | local file, mapped with `data.columns`        | from the mapped columns             |
| hf                   | Hugging Face dataset id, mapped with columns  | from the mapped columns             |
| dolly                | local .jsonl/.json, else databricks-dolly-15k | category / category                 |
| snli                 | local .jsonl/.json, else stanfordnlp/snli     | snli / snli (classification)        |
| natural_instructions | unpacked natural-instructions v2.8 directory  | taskNNN / the task's first category |
| alpaca               | local .json/.jsonl, else tatsu-lab/alpaca     | alpaca / alpaca                     |

Every mistake a user can make (a missing file, a malformed line, a missing column, an unknown task, a
dataset that is not available offline) becomes a `UserError` that says what to change.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

from fedmole.config import ColumnMap, DataConfig
from fedmole.data.schema import Example
from fedmole.data.wordnet import load_wordnet
from fedmole.errors import UserError, did_you_mean

HF_IDS = {"dolly": "databricks/databricks-dolly-15k", "snli": "stanfordnlp/snli", "alpaca": "tatsu-lab/alpaca"}
SNLI_CHOICES = ["Yes", "Maybe", "No"]  # verbalisers of labels 0 entailment, 1 neutral, 2 contradiction
SNLI_LABEL_NAMES = {"entailment": 0, "neutral": 1, "contradiction": 2}
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
MAX_LISTED = 60  # names shown when listing the available tasks or domains


def load_examples(cfg: DataConfig, seed: int) -> list[Example]:
    """The configured dataset as examples: read, filtered by `data.tasks`/`data.domains`, then sampled."""
    examples = LOADERS[cfg.source](cfg)
    examples = _keep(examples, "task", cfg.tasks)
    examples = _keep(examples, "domain", cfg.domains)
    if cfg.max_examples is not None and cfg.max_examples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), cfg.max_examples))
        examples = [examples[i] for i in keep]
    if not examples:
        where = f" at {cfg.path}" if cfg.path else ""
        raise UserError(f"data.source={cfg.source}{where} gave no examples; check the file or the filters")
    return examples


def _keep(examples: list[Example], field: str, wanted: list[str] | None) -> list[Example]:
    """Examples whose `field` (task or domain) is in `wanted`; an unknown name is an error."""
    if wanted is None:
        return examples
    available = sorted({getattr(ex, field) for ex in examples})
    for name in wanted:
        if name not in available:
            shown = ", ".join(available[:MAX_LISTED]) + (
                f", ... ({len(available) - MAX_LISTED} more)" if len(available) > MAX_LISTED else ""
            )
            hint = did_you_mean(name, available)
            raise UserError(f'data.{field}s: unknown {field} "{name}"{hint}; available: {shown}')
    wanted_set = set(wanted)
    return [ex for ex in examples if getattr(ex, field) in wanted_set]


# ------------------------------------------------------------------------------------ reading records
def read_records(path: Path, fmt: str) -> list[dict]:
    """Rows of a local jsonl, json (a list of objects, or JSON Lines) or csv file."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist (data.path)")
    text = _decode(path)
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data" after the first value: the file is JSON Lines
                raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        else:
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path}: expected a JSON list of objects (one per example)")
            return data
    return _jsonl_records(text, path)


def _decode(path: Path) -> str:
    """The file's text (UTF-8, a byte-order mark tolerated), or a UserError naming the line that is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None


def _jsonl_records(text: str, path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def hf_records(name: str, split: str, local_hint: str) -> list[dict]:
    """Rows of a Hugging Face dataset split (from the local cache when offline)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - any failure here is about the id, split, cache or network
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE:
            raise UserError(
                f'the Hugging Face dataset "{name}" (split "{split}") could not be loaded offline '
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not in the local cache; {reason}); "
                f"{local_hint}"
            ) from None
        raise UserError(
            f'could not load the Hugging Face dataset "{name}" (split "{split}"): {reason}; check data.path '
            f"and data.split, or {local_hint}"
        ) from None
    return ds.to_list()


def _named_records(cfg: DataConfig) -> tuple[list[dict], str]:
    """Rows of dolly/snli/alpaca: a local file at `data.path`, else the Hugging Face dataset."""
    hint = f"set data.path to a local copy (a .jsonl or .json file with the {cfg.source} fields)"
    if cfg.path is None or not _looks_local(cfg.path):
        name = cfg.path or HF_IDS[cfg.source]
        return hf_records(name, cfg.split, hint), name
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        return hf_records(str(path), cfg.split, hint), str(path)
    fmt = FILE_FORMATS.get(path.suffix)
    if fmt is None:
        raise UserError(f"data.path={cfg.path}: unsupported file type; use one of {', '.join(FILE_FORMATS)}")
    return read_records(path, fmt), str(path)


def _looks_local(path: str) -> bool:
    """A path (rather than a Hugging Face id): it exists, starts like a path, or has a data-file suffix."""
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or p.suffix in FILE_FORMATS


def _require(record: dict, columns: list[str], origin: str, index: int, why: str = "") -> None:
    missing = [c for c in columns if c not in record]
    if missing:
        raise UserError(
            f"{origin}: record {index + 1} has no column {', '.join(map(repr, missing))}"
            f"{f' ({why})' if why else ''}; columns present: {', '.join(record) or '(none)'}"
        )


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _string(record: dict, column: str, origin: str, index: int) -> str:
    """A text field every example needs (instruction, response): it must be a string, not null or a number
    turned into text behind the user's back."""
    value = record[column]
    if not isinstance(value, str):
        raise UserError(f"{origin}: record {index + 1}: column {column!r} must be text, got {value!r} "
                        f"({type(value).__name__}); write it as a string (quoted) or drop the record")
    return value


# --------------------------------------------------------------------------------- generic mapping
def map_columns(records: list[dict], cols: ColumnMap, origin: str, uid_prefix: str) -> list[Example]:
    """Examples from rows via `data.columns`. Optional columns under their default names (context, task,
    domain) may be absent; any other column the user named must exist.

    With `choices` mapped, the rows may mix both kinds (as Natural Instructions-style mixtures do): a row
    whose choices cell holds a list is a classification example, its gold index from `label` (an index, or
    the gold choice's text) or else from the `response` text; a row without one (no such key, null, an
    empty cell or an empty list) is a generation example and needs `response`."""
    required = [cols.instruction]
    if cols.choices is None:
        required.append(cols.response)
    # an optional column is required only when the user renamed it: a resolved config.yaml (run, resume,
    # eval) spells out the default names too, and those may be absent
    required += [getattr(cols, k) for k in ("context", "task", "domain")
                 if k in cols.model_fields_set and getattr(cols, k) != ColumnMap.model_fields[k].default]
    required = [c for c in required if c is not None]
    if cols.choices is not None and records and not any(cols.choices in rec for rec in records):
        raise UserError(
            f"{origin}: no record has the choices column {cols.choices!r} (data.columns.choices); columns of "
            f"record 1: {', '.join(records[0]) or '(none)'}"
        )
    examples = []
    for i, rec in enumerate(records):
        _require(rec, required, origin, i)
        choices = label = None
        if cols.choices is not None and not _no_choices(rec.get(cols.choices)):
            choices = _parse_choices(rec[cols.choices], origin, i)
            gold = cols.label if cols.label is not None else cols.response
            _require(rec, [gold], origin, i, "a row with choices needs its gold choice")
            label = _parse_label(rec[gold], choices, origin, i)
            response = choices[label]
        else:
            _require(rec, [cols.response], origin, i, "a row without choices is a generation example")
            response = _string(rec, cols.response, origin, i)
        examples.append(
            Example(
                instruction=_string(rec, cols.instruction, origin, i),
                response=response,
                context=_text(rec.get(cols.context)) if cols.context else "",
                choices=choices,
                label=label,
                task=_text(rec.get(cols.task)) if cols.task else "",
                domain=_text(rec.get(cols.domain)) if cols.domain else "",
                uid=f"{uid_prefix}:{i}",
            )
        )
    return examples


def _no_choices(value) -> bool:
    """Whether a choices cell is empty: no value, an empty string or list (also a JSON "[]" CSV cell)."""
    if isinstance(value, str):
        return value.strip() in ("", "[]")
    return value is None or value == []


def _parse_choices(value, origin: str, index: int) -> list[str]:
    """A list of choices, given as a list or as a JSON-encoded list string (as CSV cells are)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(
            f'{origin}: record {index + 1}: the choices column must hold a list of at least two choices, e.g. '
            f'["Yes", "No"] (a JSON list in CSV files)'
        )
    return [_text(c) for c in value]


def _parse_label(value, choices: list[str], origin: str, index: int) -> int:
    """The gold index from an int, a digit string, or the text of the gold choice."""
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return value
    raise UserError(
        f"{origin}: record {index + 1}: label {value!r} is neither an index 0..{len(choices) - 1} nor one of "
        f"the choices {choices}"
    )


def _load_table(cfg: DataConfig) -> list[Example]:
    """jsonl / json / csv: a local file mapped with `data.columns`."""
    if cfg.path is None:
        raise UserError(f"data.source={cfg.source} needs data.path, the file to read")
    path = Path(cfg.path).expanduser()
    return map_columns(read_records(path, cfg.source), cfg.columns, str(path), path.stem)


def _load_hf(cfg: DataConfig) -> list[Example]:
    """hf: a Hugging Face dataset id (or local dataset directory) mapped with `data.columns`."""
    if cfg.path is None:
        raise UserError("data.source=hf needs data.path, a Hugging Face dataset id such as tatsu-lab/alpaca")
    hint = "set data.path to a local copy and data.source to jsonl, json or csv"
    return map_columns(hf_records(cfg.path, cfg.split, hint), cfg.columns, cfg.path, cfg.path)


# ------------------------------------------------------------------------------------ named datasets
def _load_dolly(cfg: DataConfig) -> list[Example]:
    """databricks-dolly-15k: instruction, context, response; its `category` is both task and domain."""
    records, origin = _named_records(cfg)
    out = []
    for i, rec in enumerate(records):
        _require(rec, ["instruction", "context", "response", "category"], origin, i)
        category = _text(rec["category"])
        out.append(
            Example(
                instruction=_string(rec, "instruction", origin, i),
                response=_string(rec, "response", origin, i),
                context=_text(rec["context"]),
                task=category,
                domain=category,
                uid=f"dolly:{i}",
            )
        )
    return out


def _load_snli(cfg: DataConfig) -> list[Example]:
    """SNLI as 3-way classification with the reference's prompt and verbalisers.

    Rows without a gold label (label -1, or "-" in the original release) are dropped here, explicitly, for
    every partition scheme. To use all of the reference's data set data.split="train+validation+test".
    """
    records, origin = _named_records(cfg)
    out = []
    for i, rec in enumerate(records):
        _require(rec, ["premise", "hypothesis", "label"], origin, i)
        label = _snli_label(rec["label"], origin, i)
        if label is None:
            continue
        out.append(
            Example(
                instruction=f'Suppose {rec["premise"]} Can we infer that "{rec["hypothesis"]}"? Yes, No, or Maybe?',
                response=SNLI_CHOICES[label],
                choices=list(SNLI_CHOICES),
                label=label,
                task="snli",
                domain="snli",
                uid=f"snli:{i}",
            )
        )
    return out


def _snli_label(value, origin: str, index: int) -> int | None:
    """0 entailment, 1 neutral, 2 contradiction; None for an unlabelled row (-1 or "-")."""
    if value in (-1, "-", "-1"):
        return None
    if isinstance(value, str) and value in SNLI_LABEL_NAMES:
        return SNLI_LABEL_NAMES[value]
    if value in (0, 1, 2):
        return int(value)
    raise UserError(
        f"{origin}: record {index + 1}: SNLI label {value!r} is not one of 0, 1, 2, -1 or "
        f"{', '.join(SNLI_LABEL_NAMES)}"
    )


def _load_alpaca(cfg: DataConfig) -> list[Example]:
    """Stanford Alpaca: instruction, input (the context) and output; task and domain are "alpaca"."""
    records, origin = _named_records(cfg)
    out = []
    for i, rec in enumerate(records):
        _require(rec, ["instruction", "input", "output"], origin, i)
        out.append(
            Example(
                instruction=_string(rec, "instruction", origin, i),
                response=_string(rec, "output", origin, i),
                context=_text(rec["input"]),
                task="alpaca",
                domain="alpaca",
                uid=f"alpaca:{i}",
            )
        )
    return out


def _load_natural_instructions(cfg: DataConfig) -> list[Example]:
    """Natural Instructions v2.8: the `data.ni_num_tasks` largest tasks of splits/default/train_tasks.txt.

    Each instance becomes instruction = the task's Definition[0], context = its input, response = its first
    output; task = the `taskNNN` prefix of the file name and domain = the task's first category. Ties in
    size go to the smaller task name. Tasks are then ordered lexicographically as strings ("task1000"
    before "task101"), like the reference's label encoding, so that sorted task names give the same
    client order in a `meta` partition. Every listed task file is parsed once to count its instances and
    the kept ones once more, so that memory holds only the kept tasks.
    """
    root = _ni_root(cfg.path)
    listed = (root / "splits/default/train_tasks.txt").read_text(encoding="utf-8").splitlines()
    names = [n.strip() for n in listed if n.strip()]
    sizes = {name: len(_ni_task(root, name)["Instances"]) for name in names}
    largest = sorted(names, key=lambda n: (-sizes[n], n))[: cfg.ni_num_tasks]
    out = []
    for name in sorted(largest, key=lambda n: (n.split("_")[0], n)):
        out += _ni_examples(name, _ni_task(root, name))
    return out


def _ni_root(path: str | None) -> Path:
    if path is None:
        raise UserError(
            "data.source=natural_instructions needs data.path, the unpacked natural-instructions v2.8 "
            "directory (the one holding tasks/ and splits/)"
        )
    root = Path(path).expanduser()
    if not (root / "splits/default/train_tasks.txt").is_file():
        raise UserError(
            f"data.path={path} is not a natural-instructions directory: splits/default/train_tasks.txt is "
            f"missing (download and unpack the v2.8 release of allenai/natural-instructions)"
        )
    return root


def _ni_task(root: Path, name: str) -> dict:
    path = root / "tasks" / f"{name}.json"
    if not path.is_file():
        raise UserError(f"{path} is listed in splits/default/train_tasks.txt but does not exist")
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    _require(task, ["Definition", "Categories", "Instances"], str(path), 0)
    return task


def _ni_examples(name: str, task: dict) -> list[Example]:
    """One example per instance with at least one output."""
    task_id = name.split("_")[0]
    definition = _text(task["Definition"][0]) if task["Definition"] else ""
    category = _text(task["Categories"][0]) if task["Categories"] else ""
    return [
        Example(
            instruction=definition,
            response=_text(inst["output"][0]),
            context=_text(inst["input"]),
            task=task_id,
            domain=category,
            uid=f"ni:{inst.get('id') or f'{task_id}-{i}'}",
        )
        for i, inst in enumerate(task["Instances"])
        if inst.get("output")
    ]


def _load_wordnet(cfg: DataConfig) -> list[Example]:
    return load_wordnet(cfg.path, cfg.tasks)


LOADERS: dict[str, Callable[[DataConfig], list[Example]]] = {
    "wordnet": _load_wordnet,
    "jsonl": _load_table,
    "json": _load_table,
    "csv": _load_table,
    "hf": _load_hf,
    "dolly": _load_dolly,
    "snli": _load_snli,
    "natural_instructions": _load_natural_instructions,
    "alpaca": _load_alpaca,
}
