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

Four more tasks are multiple-choice classification (accuracy by choice scoring), built on demand: they are
loaded only when `data.tasks` names them, so a config without `data.tasks` reads the five tasks above.

| task            | instruction                                                | choices (gold)                             |
|-----------------|------------------------------------------------------------|--------------------------------------------|
| category        | 'X' (<definition>): which category?                        | 8 noun categories (the synset's lexfile)   |
| isa             | Is 'X' a kind of 'Y'? / Is 'X' an instance of 'Y'?         | no, yes (Y: the true hypernym or another)  |
| synonym_choice  | Which word is a synonym of 'X'?                            | 4 words (the synset's second lemma)        |
| hypernym_choice | 'X' is a kind of what? / 'X' is an instance of what?       | 4 words (the first hypernym's first lemma) |

`category` covers the noun synsets of eight lexicographer files (artifact, person, plant, animal, act,
communication, state, attribute): its label is the file, so a Dirichlet partition over `label` gives the
label skew of the papers' SNLI / AG News settings. The wrong words of `isa`, `synonym_choice` and
`hypernym_choice` are first lemmas (synonym_choice) or hypernym lemmas (the other two) of other synsets of
the same lexicographer file, so they are plausible for the domain, drawn with a generator seeded by the
example's uid. `isa` asks about the true hypernym for about half of the synsets (again by the uid), and the
gold word's position among the four choices is drawn the same way, so these tasks are as deterministic as
the others.

'X' is the synset's first lemma. The domain of every example is the synset's lexicographer file
(noun.animal, verb.motion, ...), which gives natural non-IID client partitions. Nothing is random: the same
database always gives the same examples in the same order.

Parsing takes a couple of seconds, so `load_wordnet` reads a JSONL cache that `build_wordnet_cache` writes
once under the fedmole cache directory.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedmole.data.schema import Example
from fedmole.errors import UserError, did_you_mean
from fedmole.paths import atomic_write_text, cache_dir

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
CACHE_FORMAT = "v1"  # bump when the examples derived from a synset change
CHOICE_CACHE_FORMAT = "v2"  # the same for the classification tasks' file

TASKS = ("definition", "pos", "synonym", "hypernym", "usage")  # what `data.tasks: null` loads
CHOICE_TASKS = ("category", "isa", "synonym_choice", "hypernym_choice")  # loaded when named in data.tasks
ALL_TASKS = TASKS + CHOICE_TASKS
POS_CHOICES = ["noun", "verb", "adjective", "adverb"]
CATEGORIES = ["artifact", "person", "plant", "animal", "act", "communication", "state", "attribute"]  # noun.*
ISA_CHOICES = ["no", "yes"]
NUM_CHOICES = 4  # synonym_choice and hypernym_choice: the gold word and three others

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


# ------------------------------------------------------------------------------ classification tasks
def _uid_rng(uid: str) -> random.Random:
    """A generator determined by an example's uid (so the wrong choices never change)."""
    return random.Random(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big"))


def _others(rng: random.Random, pool: list[str], exclude: set[str], n: int) -> list[str]:
    """`n` distinct words of `pool` outside `exclude`, drawn with `rng`."""
    out: list[str] = []
    while len(out) < n:
        word = pool[rng.randrange(len(pool))]
        if word not in exclude and word not in out:
            out.append(word)
    return out


def _multiple_choice(rng: random.Random, gold: str, others: list[str]) -> tuple[list[str], int]:
    """`others` with `gold` inserted at a position drawn with `rng`: (choices, label)."""
    label = rng.randrange(len(others) + 1)
    return others[:label] + [gold] + others[label:], label


def choice_examples(synsets: list[Synset]) -> list[Example]:
    """The examples of the classification tasks (CHOICE_TASKS), synset by synset in file order."""
    first_lemma = {(s.pos_file, s.offset): s.lemmas[0] for s in synsets}
    words: dict[int, set[str]] = {}  # lexicographer file -> first lemmas (synonym_choice's wrong words)
    hypernyms: dict[int, set[str]] = {}  # lexicographer file -> hypernym lemmas (isa's, hypernym_choice's)
    for s in synsets:
        words.setdefault(s.lexfile, set()).add(s.lemmas[0])
        if (h := _hypernym_lemma(s, first_lemma)) is not None:
            hypernyms.setdefault(s.lexfile, set()).add(h)
    pools = Pools({k: sorted(v) for k, v in words.items()}, {k: sorted(v) for k, v in hypernyms.items()})
    return [ex for s in synsets for ex in _synset_choice_examples(s, first_lemma, pools)]


@dataclass
class Pools:
    """Wrong-answer candidates per lexicographer file: the wrong words come from the synset's own file
    (plausible, domain-specific), so the tasks test the knowledge a domain's data teaches."""

    words: dict[int, list[str]]
    hypernyms: dict[int, list[str]]

    MIN = 50  # a file with fewer candidates than this gives no choice examples


def _synset_choice_examples(s: Synset, first_lemma, pools: Pools) -> list[Example]:
    word = s.lemmas[0]
    domain = LEXICOGRAPHER_FILES[s.lexfile]
    meta = {"domain": domain, "extra": {"pos": POS_CHOICES[SS_TYPE_TO_POS[s.ss_type]]}}

    def make(task: str, instruction: str, choices: list[str], label: int) -> Example:
        return Example(task=task, uid=f"wn:{task}:{s.pos_file}:{s.offset}", instruction=instruction,
                       response=choices[label], choices=choices, label=label, **meta)

    def rng(task: str) -> random.Random:
        return _uid_rng(f"wn:{task}:{s.pos_file}:{s.offset}")

    out = []
    if domain.startswith("noun.") and domain[5:] in CATEGORIES:
        out.append(make("category", f"'{word}' ({s.definition}): which category?",
                        list(CATEGORIES), CATEGORIES.index(domain[5:])))
    answer = _hypernym_lemma(s, first_lemma)
    hyper_pool = pools.hypernyms.get(s.lexfile, [])
    if answer is not None and len(hyper_pool) >= Pools.MIN:
        relation = "an instance of" if s.hypernym[0] == "@i" else "a kind of"
        r = rng("isa")
        truth = r.random() < 0.5
        asked = answer if truth else _others(r, hyper_pool, {answer, *s.lemmas}, 1)[0]
        out.append(make("isa", f"Is '{word}' {relation} '{asked}'?", list(ISA_CHOICES), int(truth)))
    word_pool = pools.words.get(s.lexfile, [])
    if len(s.lemmas) >= 2 and len(word_pool) >= Pools.MIN:
        r = rng("synonym_choice")
        choices, label = _multiple_choice(r, s.lemmas[1], _others(r, word_pool, set(s.lemmas), NUM_CHOICES - 1))
        out.append(make("synonym_choice", f"Which word is a synonym of '{word}'?", choices, label))
    if answer is not None and len(hyper_pool) >= Pools.MIN:
        r = rng("hypernym_choice")
        choices, label = _multiple_choice(r, answer, _others(r, hyper_pool, {answer, *s.lemmas}, NUM_CHOICES - 1))
        question = "is an instance of what?" if s.hypernym[0] == "@i" else "is a kind of what?"
        out.append(make("hypernym_choice", f"'{word}' {question}", choices, label))
    return out


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


def build_wordnet(wordnet_dir: str | Path | None = None, choice_tasks: bool = False) -> list[Example]:
    """Parse the database and derive the five tasks' examples (about 417k for WordNet 3.0), or, with
    `choice_tasks`, the classification tasks' (CHOICE_TASKS, about 300k)."""
    synsets = read_synsets(resolve_wordnet_dir(wordnet_dir))
    if choice_tasks:
        return choice_examples(synsets)
    first_lemma = {(s.pos_file, s.offset): s.lemmas[0] for s in synsets}
    return [ex for s in synsets for ex in synset_examples(s, first_lemma)]


# -------------------------------------------------------------------------------------------- cache
def wordnet_cache_path(wordnet_dir: str | Path | None = None, choice_tasks: bool = False) -> Path:
    """The JSONL cache for a database directory; the name carries the format version and the directory
    (one file for the five tasks, one for the classification tasks)."""
    directory = resolve_wordnet_dir(wordnet_dir).resolve()
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    kind = f"choice-{CHOICE_CACHE_FORMAT}" if choice_tasks else CACHE_FORMAT
    return cache_dir() / "data" / f"wordnet-{kind}-{digest}.jsonl"


def build_wordnet_cache(force: bool = False, wordnet_dir: str | Path | None = None, choice_tasks: bool = False) -> Path:
    """Write the examples as JSONL (atomically) unless the cache already exists; return its path."""
    path = wordnet_cache_path(wordnet_dir, choice_tasks)
    if force or not path.is_file():
        lines = (json.dumps(_record(ex)) for ex in build_wordnet(wordnet_dir, choice_tasks))
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _record(ex: Example) -> dict:
    """An example as a dict without its default-valued fields (a smaller file that parses faster)."""
    return {k: v for k, v in vars(ex).items() if v or (k == "label" and v is not None)}


def load_wordnet(wordnet_dir: str | Path | None = None, tasks: list[str] | None = None) -> list[Example]:
    """WordNet examples from the caches (built first if missing): the five tasks (TASKS, about two seconds)
    unless `tasks` names a classification task, which adds the classification tasks' file. The examples
    come synset by synset in file order, and within a synset in ALL_TASKS order; filtering by `tasks` is
    the caller's (`data.tasks`). A process that loads the same files again (a long-lived worker running many
    runs) gets the examples from memory: they are never modified downstream."""
    unknown = [t for t in tasks or [] if t not in ALL_TASKS]
    if unknown:
        raise UserError(f"data.tasks names {unknown}, which WordNet does not have{did_you_mean(unknown[0], ALL_TASKS)}; "
                        f"its tasks: {', '.join(ALL_TASKS)}")
    five = tasks is None or any(t in TASKS for t in tasks)
    choice = tasks is not None and any(t in CHOICE_TASKS for t in tasks)
    paths = (build_wordnet_cache(wordnet_dir=wordnet_dir) if five else None,
             build_wordnet_cache(wordnet_dir=wordnet_dir, choice_tasks=True) if choice else None)
    return list(_read_caches(*paths))


@functools.lru_cache(maxsize=1)
def _read_caches(five: Path | None, choice: Path | None) -> tuple[Example, ...]:
    """The examples of the five tasks' cache file and/or the classification tasks' one, merged by synset."""
    examples = _read_cache(five) if five else []
    if choice:
        choices = _read_cache(choice)
        examples = _merge_by_synset(examples, choices) if five else choices
    return tuple(examples)


def _merge_by_synset(five: list[Example], choices: list[Example]) -> list[Example]:
    """Both lists in file order (every synset has a definition example in `five`): one list, synset by
    synset in file order and within a synset in ALL_TASKS order, as if one pass had built both."""
    rank: dict[str, int] = {}
    for ex in five:
        rank.setdefault(_synset_of(ex), len(rank))
    order = {task: i for i, task in enumerate(ALL_TASKS)}
    return sorted(five + choices, key=lambda ex: (rank[_synset_of(ex)], order[ex.task]))


def _synset_of(ex: Example) -> str:
    return ex.uid.rsplit(":", 2)[1] + ex.uid.rsplit(":", 1)[1]


def _read_cache(path: Path) -> list[Example]:
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
