"""`make mutation`: check that the tests pin the method maths, one deliberate bug at a time.

For every mutation of `tests/mutation/mutations.py` (a one-line change to the maths of one method, the
property it breaks, and the tests that must notice), this script copies the repository to a temporary
directory once, writes the mutated file into the copy, runs the named tests there with the copy's
`fedmole` package first on the path, and restores the file. A mutation is *killed* when those tests fail
and *survives* when they pass. A run past `--timeout` is reported as a timeout, neither killed nor
survived (on a busy machine, rerun those ids with a larger `--timeout`). The working tree is never
written, so an interrupted run (Ctrl-C or SIGTERM) leaves nothing behind: the running pytest process
group is stopped and the temporary copy removed on the way out.

    python tests/mutation/run.py                 # every mutation, after checking the tests pass unmutated
    python tests/mutation/run.py --list          # the mutations and their properties
    python tests/mutation/run.py ID [ID ...]     # only these (ids or prefixes, e.g. `fdlora`)

Exit status: 0 when every mutation is killed, 1 when one survives or times out, 2 when the list is stale (a
pattern that no longer matches exactly once, a mutation that does not compile) or the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.egg-info", "*.pyc")


def check(mutations: list[Mutation]) -> list[str]:
    """Problems with the list itself: unknown files, patterns not matching exactly once, invalid Python."""
    problems, seen = [], set()
    for m in mutations:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        path = ROOT / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        if "\n" in m.find or "\n" in m.replace:
            problems.append(f"{m.id}: a mutation changes one line; find/replace must not contain newlines")
        text = path.read_text()
        count = text.count(m.find)
        if count != 1:
            what = "pattern not found" if count == 0 else f"pattern matches {count} times"
            problems.append(f"{m.id}: {what} in {m.file}: {m.find!r} (the code changed: update the mutation)")
            continue
        try:
            compile(text.replace(m.find, m.replace), m.file, "exec")
        except SyntaxError as err:
            problems.append(f"{m.id}: the mutated {m.file} does not compile: {err}")
        for t in m.tests:
            if not (ROOT / t.split("::")[0]).is_file():
                problems.append(f"{m.id}: test file {t.split('::')[0]} does not exist")
    return problems


def pytest(copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, or None on timeout; the last lines of the output) of pytest on `tests` inside `copy`."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",  # a stale .pyc must never hide a mutation
           "COLUMNS": "400"}  # pytest's summary line (the failing test and why) in full
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "--no-header", *tests]
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except BaseException:  # timeout or Ctrl-C: stop the whole pytest process group we started
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
            return None, ""
        raise


def caught_by(out: str) -> str:
    """The first failing test and its exception, from pytest's short summary ("" when there is none)."""
    for line in out.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            node, _, reason = line.split(" ", 1)[1].partition(" - ")
            return f"{node.rsplit('::', 1)[-1]}: {reason}"[:120]
    return ""


def verdict(code: int | None) -> str:
    if code is None:
        return "TIMEOUT"
    if code == 0:
        return "SURVIVED"
    if code == 1:
        return "KILLED"
    if code == 5:
        return "ERROR (no test ran)"
    return f"KILLED (pytest exit {code})"


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even when started in the background
    signal.signal(signal.SIGTERM, _stop)  # `kill` cleans up too: the pytest group and the temporary copy
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="run only mutations whose id starts with one of these")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests unmutated first")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutation (default 300)")
    args = ap.parse_args(argv)

    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; the working tree was never modified")
        return 130


def _run(args: argparse.Namespace) -> int:
    chosen = [m for m in MUTATIONS if not args.ids or any(m.id.startswith(i) for i in args.ids)]
    if args.list:
        for m in chosen:
            print(f"{m.id:42s} {m.file}\n    breaks: {m.breaks}\n    tests:  {' '.join(m.tests)}")
        return 0
    if not chosen:
        print(f"no mutation id starts with {args.ids}; see --list")
        return 2
    problems = check(chosen)
    if problems:
        print("the mutation list is stale:\n  " + "\n  ".join(problems))
        return 2

    start = time.time()
    results: list[tuple[Mutation, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="fedmole-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=SKIP)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            t0 = time.time()
            code, out = pytest(copy, tests, args.timeout * 4)
            if code != 0:
                print(f"the tests fail without any mutation (exit {code}); fix them first:\n{out[-3000:]}")
                return 2
            print(f"baseline: {len(tests)} test targets pass unmutated ({time.time() - t0:.0f} s)")
        for i, m in enumerate(chosen, 1):
            target = copy / m.file
            original = target.read_text()
            target.write_text(original.replace(m.find, m.replace))
            t0 = time.time()
            try:
                code, out = pytest(copy, list(m.tests), args.timeout)
            finally:
                target.write_text(original)
            result = verdict(code)
            results.append((m, result, time.time() - t0))
            by = caught_by(out) if result.startswith("KILLED") else ""
            print(f"[{i:2d}/{len(chosen)}] {result:18s} {m.id:44s} {time.time() - t0:5.1f} s  {by}", flush=True)
            if not result.startswith("KILLED"):
                print(f"        breaks: {m.breaks}\n        {m.file}: {m.find!r} -> {m.replace!r}")
    killed = sum(r.startswith("KILLED") for _, r, _ in results)
    survived = [m.id for m, r, _ in results if r == "SURVIVED"]
    errors = [m.id for m, r, _ in results if r.startswith("ERROR")]
    timeouts = [m.id for m, r, _ in results if r == "TIMEOUT"]
    print(f"\nmutation summary: {killed} killed, {len(survived)} survived, {len(timeouts)} timed out, "
          f"{len(errors)} errors, of {len(results)} mutations in {time.time() - start:.0f} s")
    for label, ids in (("survived", survived), ("timed out", timeouts), ("errors", errors)):
        if ids:
            print(f"{label}: " + " ".join(ids))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
