"""`fedmole report`: figures from the run artefacts, the self-contained HTML (rendered in headless Chromium),
CSV and TensorBoard exports."""

import base64
import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedmole
from fedmole.config import load_config
from fedmole.errors import UserError
from fedmole.reporting import plots
from fedmole.reporting.report import RunData, comparison_rows, write_report
from fedmole.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.local_steps=2", "eval.max_examples=2", "eval.generation.max_new_tokens=2", "federation.rounds=2"]


def _run(root, name, config, overrides):
    run_dir = root / name
    run_dir.mkdir()
    run_experiment(load_config(ROOT / "configs" / config, overrides), run_dir, "none")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return {
        "fedit": _run(root, "fedit", "smoke.yaml", ["federation.num_clients=3", "data.max_examples=300",
                                                    "partition.min_size=10", "output.tensorboard=true", *FAST]),
        "fedamole": _run(root, "fedamole", "smoke_fedamole.yaml", ["federation.num_clients=4",
                                                                   "data.max_examples=400", *FAST]),
        "flame": _run(root, "flame", "smoke_flame_dense.yaml", ["federation.num_clients=3", "data.max_examples=300",
                                                                "partition.min_size=10", *FAST]),
        "root": root,
    }


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _embedded(html: str) -> dict[str, bytes]:
    return {f: base64.b64decode(d) for d, f in re.findall(r'src="data:image/png;base64,([^"]+)"[^>]*data-file="([^"]+)"',
                                                         html)}


def test_one_fedamole_run_gets_its_figures_and_notes_for_the_rest(runs):
    out = runs["root"] / "rep-fedamole"
    html = write_report([runs["fedamole"]], out).read_text()
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"curves_personalized.png", "curves_global.png", "train_loss.png", "partition.png",
                    "experts_per_client.png", "assignment_round0.png", "assignment_round1.png",
                    "assignment_round2.png", "expert_holders.png", "bytes.png"}
    embedded = _embedded(html)
    assert set(embedded) == pngs  # self-contained: every figure is in the page, byte for byte
    assert all(embedded[name] == (out / name).read_bytes() for name in pngs)
    assert "src=\"http" not in html and "<link" not in html
    assert "routing utilisation: not shown" in html and "activation frequencies per tier: not shown" in html


def test_assignment_heatmap_cells_are_the_assigned_experts(runs):
    run = RunData.load(runs["fedamole"])
    rec = next(a for a in run.assignments if a["round"] == 2)
    fig = plots.assignment_heatmap(run, 2)
    modules = sorted(rec["experts"])
    for ax, module in zip(fig.axes, modules):
        grid = np.asarray(ax.images[0].get_array())
        assert grid.shape == (4, run.num_experts)
        for cid in range(4):
            assert set(np.flatnonzero(grid[cid])) == set(rec["experts"][module][str(cid)])


def test_flame_activation_frequencies_sum_to_each_tiers_k(runs):
    run = RunData.load(runs["flame"])
    fig = plots.activation_by_tier(run)
    ax = fig.axes[0]
    tiers = sorted({int(c["k"]) for a in run.activations for c in a["clients"]}, reverse=True)
    assert len(ax.containers) == len(tiers)
    for k, bars in zip(tiers, ax.containers):
        # every token is routed to exactly k experts, so a/S summed over the experts is k
        assert sum(b.get_height() for b in bars) == pytest.approx(k, rel=1e-6)
    routing = plots.routing_utilisation(run).axes[0].images[0].get_array()
    assert np.allclose(np.asarray(routing).sum(1), 1.0)  # shares of each layer's routed tokens


def test_two_runs_get_a_comparison_table_overlaid_curves_and_a_csv(runs):
    out = runs["root"] / "rep-two"
    html = write_report([runs["fedit"], runs["fedamole"]], out, csv=True).read_text()
    for name in ("compare_global_test.png", "compare_personalized_test.png", "compare_bytes.png",
                 "1_fedit_curves_global.png", "2_fedamole_assignment_round2.png"):
        assert (out / name).is_file(), name
    rows = comparison_rows([RunData.load(runs["fedit"]), RunData.load(runs["fedamole"])])
    for row, name in zip(rows, ("fedit", "fedamole")):
        s = json.loads((runs[name] / "summary.json").read_text())
        head = s[s["headline"]]
        assert row[:5] == [name, name, s["headline"], s["metric"], head["selected_round"]]
        assert row[6] == head["mean"] and row[10] == s["comm"]["megabytes"]
        assert f"<td>{name}</td>" in html
    # the fedit run has no personalised model: its line is absent from that comparison, fedamole's is there
    fig = plots.compare_curves([RunData.load(runs["fedit"]), RunData.load(runs["fedamole"])], "personalized", "test")
    assert [line.get_label() for line in fig.axes[0].lines] == ["fedamole"]
    with (out / "metrics.csv").open() as fh:
        table = list(csv.DictReader(fh))
    for name in ("fedit", "fedamole"):
        records = [json.loads(x) for x in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        mine = [r for r in table if r["run"] == name]
        assert len(mine) == len(records)
        assert [float(r["value"]) for r in mine] == [float(r["value"]) for r in records]


def test_metrics_csv_and_tensorboard_files_hold_the_run_metrics(runs):
    run_dir = runs["fedit"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records)
    assert all(r["metric"] == rec["metric"] and float(r["value"]) == rec["value"] for r, rec in zip(rows, records))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    want = {r["round"]: r["value"] for r in records if r["client"] is None and r["model"] == "global"
            and r["split"] == "test" and r["metric"] == "score"}
    got = {e.step: e.value for e in acc.Scalars("global/test/score")}
    assert got.keys() == want.keys() == {1, 2}
    assert all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    comm = [json.loads(x) for x in (run_dir / "comm.jsonl").read_text().splitlines()]
    cumulative = {e.step: e.value for e in acc.Scalars("comm/cumulative_bytes")}
    assert cumulative[2] == sum(r["bytes"] for r in comm)


def test_report_of_a_missing_or_foreign_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report([tmp_path / "nope"])
    with pytest.raises(UserError, match="not a fedmole run directory"):
        write_report([tmp_path])


def _chromium() -> str:
    exe = os.environ.get("FEDMOLE_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None:
        if os.environ.get("FEDMOLE_SKIP_BROWSER") == "1":
            pytest.skip("FEDMOLE_SKIP_BROWSER=1: the headless-Chromium check of report.html was switched off")
        pytest.fail("Chromium is not installed, so report.html cannot be checked in a browser. Install it with "
                    "`apt-get install chromium` (`make test` does this as root), point FEDMOLE_CHROMIUM at a "
                    "Chromium/Chrome binary, or set FEDMOLE_SKIP_BROWSER=1 to skip this check explicitly")
    return exe


CHECK = ('<script>window.addEventListener("load",()=>{const r=[...document.images].map(i=>[i.dataset.file||"",'
         'i.complete,i.naturalWidth,i.naturalHeight]);const p=document.createElement("pre");'
         'p.id="img-check";p.textContent=JSON.stringify(r);document.body.appendChild(p);});</script>')
BROKEN = '<img src="data:image/png;base64,iVBORw0KGgoAAAA" data-file="broken-control">'


def test_report_renders_in_headless_chromium_with_every_image_decoded(runs, tmp_path):
    exe = _chromium()
    out = runs["root"] / "rep-three"
    report = write_report([runs["fedit"], runs["fedamole"], runs["flame"]], out)
    html = report.read_text()
    pngs = {name: data for name, data in _embedded(html).items()}
    assert len(pngs) >= 25
    # the check writes each image's decoded size into the DOM; a broken image shows that it can fail
    page = tmp_path / "check.html"
    page.write_text(html.replace("</body>", CHECK + BROKEN + "</body>"))
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<title>fedmole report: 3 runs</title>" in dom and "Comparison" in dom
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom)
    assert found, "the page's load event never ran: " + dom[:500]
    images = {f: (complete, w, h) for f, complete, w, h in json.loads(found.group(1).replace("&quot;", '"'))}
    assert images.pop("broken-control") == (True, 0, 0)
    assert images.keys() == pngs.keys()
    for name, data in pngs.items():
        assert images[name] == (True, *_png_size(data)), name


def test_report_command_line(runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(fedmole.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "fedmole.cli", "report", str(runs["flame"]), "--out",
                           str(tmp_path / "r"), "--csv"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "metrics.csv").is_file()
    assert {"routing.png", "activation_tiers.png", "curves_global_k1.png"} <= {p.name for p in (tmp_path / "r").iterdir()}
    bad = subprocess.run([sys.executable, "-m", "fedmole.cli", "report", str(runs["flame"]), "--rounds", "x"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "--rounds" in bad.stderr
