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
from fedmole.config_io import load_config
from fedmole.errors import UserError
from fedmole.reporting import plots, report
from fedmole.reporting.report import RunData, comparison_rows, write_report
from fedmole.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.local_steps=2", "eval.max_examples=2", "eval.generation.max_new_tokens=2", "federation.rounds=2"]


def _run(root, name, config, overrides):
    run_dir = root / name
    run_dir.mkdir()
    run_experiment(load_config(ROOT / "configs" / config, overrides), run_dir, "none")
    return run_dir


def _mixed_tasks(path: Path) -> Path:
    """Classification rows (with choices) and generation rows (without) in one JSONL file."""
    rows = [{"instruction": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} if i % 2 else
            {"instruction": f"Spell the number {i}.", "response": f"number {i}"} for i in range(90)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _many_layer_run(root: Path, layers: int = 12, clients: int = 12) -> Path:
    """A FedAMoLE-like run directory written directly (no training): `layers` adapted modules, `clients` clients
    and a test split that mixes accuracy and ROUGE-L, so that ordering and labelling matter."""
    run_dir = root / "many-layers"
    run_dir.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for rnd in (1, 2, 3):
        for cid in range(clients):
            records.append({"round": rnd, "client": cid, "model": "local", "split": "train", "metric": "loss",
                            "value": float(3 - 0.5 * rnd + rng.random())})
            for split in ("val", "test"):
                acc, rouge = float(rng.integers(0, 101)), float(100 * rng.random())
                for metric, value in (("accuracy", acc), ("rouge_l", rouge), ("score", (acc + rouge) / 2)):
                    records.append({"round": rnd, "client": cid, "model": "personalized", "split": split,
                                    "metric": metric, "value": value})
        for split in ("val", "test"):
            for metric in ("accuracy", "rouge_l", "score"):
                values = [r["value"] for r in records if r["round"] == rnd and r["split"] == split
                          and r["metric"] == metric and r["client"] is not None]
                records.append({"round": rnd, "client": None, "model": "personalized", "split": split,
                                "metric": metric, "value": float(np.mean(values))})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(layers)]
    rng.shuffle(modules)  # the file's order must not matter either
    assignments = [{"round": rnd, "experts": {m: {str(c): sorted({(c + i) % 6, (c + 2 * i + rnd) % 6})
                                                  for c in range(clients)} for i, m in enumerate(modules)}}
                   for rnd in (0, 1, 2, 3)]
    (run_dir / "assignments.jsonl").write_text("".join(json.dumps(a) + "\n" for a in assignments))
    (run_dir / "config.yaml").write_text("algorithm: {name: fedamole, num_experts: 6}\n")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    mixed = _mixed_tasks(root / "mixed.jsonl")
    return {
        "fedit": _run(root, "fedit", "smoke.yaml", ["federation.num_clients=3", "data.source=jsonl",
                                                    f"data.path={mixed}", "data.max_examples=null",
                                                    "data.columns.choices=choices", "data.columns.label=label",
                                                    "partition.scheme=iid", "output.tensorboard=true", *FAST]),
        "fedamole": _run(root, "fedamole", "smoke_fedamole.yaml", ["federation.num_clients=4",
                                                                   "data.max_examples=400", *FAST]),
        "flame": _run(root, "flame", "smoke_flame_dense.yaml", ["federation.num_clients=3", "data.max_examples=300",
                                                                "partition.min_size=10", *FAST]),
        "many": _many_layer_run(root),
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


def test_assignment_heatmaps_order_modules_by_layer_number(runs):
    run = RunData.load(runs["many"])
    fig = plots.assignment_heatmap(run, 2)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    layers = [int(t.split(".")[1]) for t in titles]
    assert layers == sorted(layers) and layers[0] == 0 and layers[-1] == 11  # not 0, 1, 10, 11, 2, ...
    assert len(layers) == plots.MAX_MODULES  # evenly spaced over the model in its own order
    rec = next(a for a in run.assignments if a["round"] == 2)
    for ax, title in zip([ax for ax in fig.axes if ax.images], titles):  # each panel holds its own module
        grid = np.asarray(ax.images[0].get_array())
        assert all(set(np.flatnonzero(grid[c])) == set(rec["experts"]["model." + title][str(c)]) for c in range(12))
    assert plots.chosen_modules(["layers.10.q", "layers.2.q", "layers.1.q"]) == ["layers.1.q", "layers.2.q",
                                                                                "layers.10.q"]


def test_per_client_curves_are_labelled_with_their_client_and_distinct_colours(runs):
    run = RunData.load(runs["many"])
    fig = plots.metric_curves(run, "personalized")
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == [f"client {c}" for c in range(12)] + ["mean over clients"]
        colours = {tuple(line.get_color()) for line in ax.lines if line.get_label().startswith("client")}
        assert len(colours) == 12
        assert ax.get_ylabel() == "score (accuracy + ROUGE-L F)"
    loss = plots.train_loss(run).axes[0]
    assert [t.get_text() for t in loss.get_legend().get_texts()][:3] == ["client 0", "client 1", "client 2"]


def test_the_report_says_what_the_score_averages(runs):
    mixed = RunData.load(runs["fedit"])
    assert mixed.score_parts == ["accuracy", "rouge_l"]
    note = report.score_note(mixed)
    s = json.loads((runs["fedit"] / "summary.json").read_text())
    rnd = s["global"]["selected_round"]
    acc = next(r["value"] for r in mixed.metrics if r["metric"] == "accuracy" and r["round"] == rnd
               and r["client"] is None and r["model"] == "global" and r["split"] == "test")
    assert "mix both kinds" in note and f"global test @ round {rnd}: accuracy {acc:.2f}, ROUGE-L F " in note
    for kind, words in (("rouge_l", "score = ROUGE-L F ×100: every evaluated example is a generation"),
                        ("accuracy", "score = accuracy ×100: every evaluated example is a classification")):
        one = [{"round": 1, "client": c, "model": "global", "split": "test", "metric": m, "value": 50.0}
               for c in (0, None) for m in (kind, "score", "loss")]
        run = RunData("one-kind", runs["root"], None, {}, one, None, [], [], [])
        run.score_parts = report.score_parts(one)
        assert report.score_note(run).startswith(words)
        assert run.score_label == f"score ({report.SCORE_PARTS[kind]})"


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
        assert s["metric"] == "score" and row[:5] == [name, name, s["headline"], RunData.load(runs[name]).score_label,
                                                      head["selected_round"]]
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
    path = write_report([runs["fedit"], runs["fedamole"], runs["flame"], runs["many"]], out)
    html = path.read_text()
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
    assert "<title>fedmole report: 4 runs</title>" in dom and "Comparison" in dom
    # what each run's score averages, in its section and in the comparison table
    notes = re.findall(r'<p class="?score-note"?>(.*?)</p>', dom)
    assert len(notes) == 4 and "mix both kinds" in notes[0] and "mix both kinds" in notes[3]  # fedit, many-layers
    assert dom.count("<td>score (accuracy + ROUGE-L F)</td>") == sum(
        RunData.load(runs[name]).score_parts == ["accuracy", "rouge_l"] for name in ("fedit", "fedamole", "flame"))
    # the figures of the synthetic run: ordered heatmap panels, labelled curves (checked on the figures above)
    assert {"4_many-layers_assignment_round2.png", "4_many-layers_curves_personalized.png"} <= set(pngs)
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
