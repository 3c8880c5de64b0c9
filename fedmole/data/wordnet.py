"""WordNet 3.0 as an offline, multi-domain instruction dataset.

A pure-Python reader of the four `data.*` files of the Princeton WordNet 3.0 database (Debian package
`wordnet-base`, installed to /usr/share/wordnet). Every synset becomes up to five examples, one per task:

| task       | instruction                                             | response                                  |
|------------|---------------------------------------------------------|-------------------------------------------|
| definition | Define the word 'X'.                                    | the gloss definition                      |
| pos        | Which part of speech is 'X' in the sense: <definition>? | noun, verb, adjective or adverb (choices) |
| synonym    | Give a synonym of the word 'X'.                         | the synset's second lemma                 |
| hypernym   | 'X' is a kind of what? / 'X' is an instance of what?    | first lemma of the first hypernym synset  |
| usage      | Write a sentence using the word 'X'.                    | the first quoted example                  |

'X' is the synset's first lemma. The domain of every example is the synset's lexicographer file
(noun.animal, verb.motion, ...), which gives natural non-IID client partitions. Nothing is random: the same
database always gives the same examples in the same order.

Parsing takes a couple of seconds, so `load_wordnet` reads a JSONL cache that `build_wordnet_cache` writes
once under the fedmole cache directory.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedmole.data.schema import Example
from fedmole.errors import UserError
from fedmole.paths import atomic_write_text, cache_dir

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
CACHE_FORMAT = "v1"  # bump when the examples derived from a synset change

TASKS = ("definition", "pos", "synonym", "hypernym", "usage")
POS_CHOICES = ["noun", "verb", "adjective", "adverb"]

# data file suffix -> the POS letter used in pointers and uids
POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
# synset type letter -> index into POS_CHOICES (adjective satellites `s` are adjectives)
SS_TYPE_TO_POS = {"n": 0, "v": 1, "a": 2, "s": 2, "r": 3}

# lexicographer file number (the `lex_filenum` field) -> name; the name is the example's domain
LEXICOGRAPHER_FILES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic marker on adjective lemmas, e.g. galore(ip)


@dataclass
class Synset:
    """The fields of one `data.*` line that the tasks need."""

    pos_file: str  # n, v, a or r: which data file (and offset space) the synset lives in
    offset: str  # 8-digit byte offset, the synset's id within its data file
    lexfile: int
    ss_type: str  # n, v, a, s or r
    lemmas: list[str]
    hypernym: tuple[str, str, str] | None  # (pointer symbol @ or @i, target offset, target POS letter)
    definition: str
    examples: list[str]


# ------------------------------------------------------------------------------------------ parsing
def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into (definition, quoted examples without their quotes).

    Parts are separated by "; ". A part that starts with a double quote is an example; an example whose
    closing quote is missing continues into the next part unless that part opens a new example (the
    database has a few unbalanced quotes). Text after an example's closing quote, such as an attribution
    ("- John Galsworthy"), is dropped. All other parts form the definition, joined by "; ".
    """
    parts: list[str] = []
    for part in gloss.split("; "):
        previous = parts[-1] if parts else ""
        if previous.startswith('"') and previous.count('"') % 2 == 1 and not part.startswith('"'):
            parts[-1] = previous + "; " + part
        else:
            parts.append(part)
    definition = "; ".join(p.strip() for p in parts if not p.startswith('"'))
    examples = [_unquote(p) for p in parts if p.startswith('"')]
    return definition, [e for e in examples if e]


def _unquote(part: str) -> str:
    """The text between the opening quote and the last closing quote (or the end)."""
    body = part[1:]
    end = body.rfind('"')
    return (body[:end] if end >= 0 else body).strip()


def parse_data_line(line: str, pos_file: str) -> Synset:
    """Parse one synset line: `offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt (ptr)* [frames] | gloss`."""
    head, _, gloss = line.partition("|")
    fields = head.split()
    w_cnt = int(fields[3], 16)
    words = fields[4 : 4 + 2 * w_cnt : 2]
    lemmas = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in words]
    p_at = 4 + 2 * w_cnt
    hypernym = None
    for i in range(int(fields[p_at])):
        symbol, target, target_pos = fields[p_at + 1 + 4 * i : p_at + 4 + 4 * i]
        if symbol in ("@", "@i"):
            hypernym = (symbol, target, target_pos)
            break
    definition, examples = split_gloss(gloss.strip())
    return Synset(pos_file, fields[0], int(fields[1]), fields[2], lemmas, hypernym, definition, examples)


def read_synsets(wordnet_dir: Path) -> list[Synset]:
    """All synsets of data.noun, data.verb, data.adj and data.adv, in file order."""
    synsets = []
    for suffix, letter in POS_FILES.items():
        with open(wordnet_dir / f"data.{suffix}", encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("  "):  # licence header lines start with two spaces
                    synsets.append(parse_data_line(line, letter))
    return synsets


# -------------------------------------------------------------------------------------------- tasks
def synset_examples(s: Synset, first_lemma: dict[tuple[str, str], str]) -> list[Example]:
    """The examples one synset gives, in task order. `first_lemma` maps (POS letter, offset) to a lemma."""
    word = s.lemmas[0]
    pos_index = SS_TYPE_TO_POS[s.ss_type]
    meta = {"domain": LEXICOGRAPHER_FILES[s.lexfile], "extra": {"pos": POS_CHOICES[pos_index]}}

    def make(task: str, **fields) -> Example:
        return Example(task=task, uid=f"wn:{task}:{s.pos_file}:{s.offset}", **meta, **fields)

    out = [
        make("definition", instruction=f"Define the word '{word}'.", response=s.definition),
        make(
            "pos",
            instruction=f"Which part of speech is '{word}' in the sense: {s.definition}?",
            response=POS_CHOICES[pos_index],
            choices=list(POS_CHOICES),
            label=pos_index,
        ),
    ]
    if len(s.lemmas) >= 2:
        out.append(make("synonym", instruction=f"Give a synonym of the word '{word}'.", response=s.lemmas[1]))
    answer = _hypernym_lemma(s, first_lemma)
    if answer is not None:
        question = "is an instance of what?" if s.hypernym[0] == "@i" else "is a kind of what?"
        out.append(make("hypernym", instruction=f"'{word}' {question}", response=answer))
    if s.examples:
        out.append(make("usage", instruction=f"Write a sentence using the word '{word}'.", response=s.examples[0]))
    return out


def _hypernym_lemma(s: Synset, first_lemma: dict[tuple[str, str], str]) -> str | None:
    """First lemma of the synset's first hypernym; None without one (or when an excerpt lacks the target)."""
    if s.hypernym is None:
        return None
    _, target, target_pos = s.hypernym
    return first_lemma.get(("a" if target_pos == "s" else target_pos, target))


def resolve_wordnet_dir(path: str | Path | None = None) -> Path:
    """The WordNet database directory: `path`, else $FEDMOLE_WORDNET_DIR, else /usr/share/wordnet."""
    directory = Path(path or os.environ.get("FEDMOLE_WORDNET_DIR") or DEFAULT_WORDNET_DIR)
    missing = [f"data.{s}" for s in POS_FILES if not (directory / f"data.{s}").is_file()]
    if missing:
        raise UserError(
            f"WordNet 3.0 database not found: {directory} lacks {', '.join(missing)}. Install it with "
            f"`sudo apt-get install wordnet-base`, or set FEDMOLE_WORDNET_DIR (or data.path) to a directory "
            f"holding data.noun, data.verb, data.adj and data.adv"
        )
    return directory


def build_wordnet(wordnet_dir: str | Path | None = None) -> list[Example]:
    """Parse the database and derive every task's examples (about 417k for WordNet 3.0)."""
    synsets = read_synsets(resolve_wordnet_dir(wordnet_dir))
    first_lemma = {(s.pos_file, s.offset): s.lemmas[0] for s in synsets}
    return [ex for s in synsets for ex in synset_examples(s, first_lemma)]


# -------------------------------------------------------------------------------------------- cache
def wordnet_cache_path(wordnet_dir: str | Path | None = None) -> Path:
    """The JSONL cache for a database directory; the name carries the format version and the directory."""
    directory = resolve_wordnet_dir(wordnet_dir).resolve()
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return cache_dir() / "data" / f"wordnet-{CACHE_FORMAT}-{digest}.jsonl"


def build_wordnet_cache(force: bool = False, wordnet_dir: str | Path | None = None) -> Path:
    """Write the examples as JSONL (atomically) unless the cache already exists; return its path."""
    path = wordnet_cache_path(wordnet_dir)
    if force or not path.is_file():
        lines = (json.dumps(_record(ex)) for ex in build_wordnet(wordnet_dir))
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _record(ex: Example) -> dict:
    """An example as a dict without its default-valued fields (a smaller file that parses faster)."""
    return {k: v for k, v in vars(ex).items() if v or (k == "label" and v is not None)}


def load_wordnet(wordnet_dir: str | Path | None = None) -> list[Example]:
    """All WordNet examples, read from the cache (built first if missing) in about two seconds."""
    path = build_wordnet_cache(wordnet_dir=wordnet_dir)
    loads = json.loads
    with _gc_paused(), open(path, encoding="utf-8") as fh:
        return [Example(**loads(line)) for line in fh]


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: it would rescan the growing list of examples over and over
    while 400k objects are allocated (about 40% of the load time); nothing here creates cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
