"""The mutation list of `make mutation` stays applicable: a refactoring that moves or rewrites a mutated line must
update the mutation in the same change, not at the next (25-minute, optional) `make mutation` run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "mutation" / "run.py"


def _runner():
    spec = importlib.util.spec_from_file_location("mutation_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutation_finds_its_line_exactly_once_and_still_compiles():
    runner = _runner()
    problems = runner.check(runner.MUTATIONS)
    assert not problems, "tests/mutation/mutations.py is out of date:\n" + "\n".join(problems)
    assert len(runner.MUTATIONS) >= 86


def test_a_mutation_whose_line_is_gone_is_reported(tmp_path):
    runner = _runner()
    m = runner.MUTATIONS[0]
    stale = runner.Mutation(m.id, m.file, m.find + "  # a line that no longer exists", m.replace, m.breaks, m.tests)
    assert any("pattern not found" in p for p in runner.check([stale]))
