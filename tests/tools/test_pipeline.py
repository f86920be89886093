"""tools/pipeline.py: the smoke config end to end (report numbers = the tools' JSON, valid pictures),
skipping and resuming on a second invocation, job bookkeeping, configuration errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dataset_fixtures import load_tool
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "pipeline.py"
SMOKE = ROOT / "configs" / "pipeline" / "smoke.yaml"
DEMO = ROOT / "configs" / "pipeline" / "demo.yaml"


pipeline = load_tool("pipeline")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("pipeline") / "smoke"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(SMOKE), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def markdown_table(report: str, first_header: str) -> dict[str, dict[str, str]]:
    """The report's table whose header starts with ``first_header``: row label -> column -> cell."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


def test_report_holds_the_numbers_the_tools_wrote(smoke):
    out, result = smoke
    for banner in ("[1/6] data", "[2/6] detectors", "[3/6] perception", "[4/6] planner", "[5/6] pictures"):
        assert banner in result.stdout
    report = (out / "report.md").read_text()

    ap_table = markdown_table(report, "detector | fusion")
    comm_table = markdown_table(report, "detector | bytes / message (mean)")
    assert set(ap_table) == set(comm_table) == {"ego_only", "cooperative"}
    for variant in ("ego_only", "cooperative"):
        metrics = json.loads((out / "perception" / "eval" / variant / "metrics.json").read_text())
        row = ap_table[variant]
        assert row["fusion"] == f"`{metrics['fusion']}`"
        for t in ("0.30", "0.50", "0.70"):
            label = f"{float(t):.1f}"
            assert row[f"BEV AP@{label}"] == f"{metrics['ap']['bev'][t]['all']['ap']:.3f}"
            assert row[f"3D AP@{label}"] == f"{metrics['ap']['3d'][t]['all']['ap']:.3f}"
            assert row[f"hidden BEV AP@{label}"] == f"{metrics['ap']['bev'][t]['others_only']['ap']:.3f}"
        comm = comm_table[variant]
        assert comm["bytes / message (mean)"] == f"{metrics['bytes']['per_message']['mean']:.0f}"
        assert comm["bytes / frame (max)"] == f"{metrics['bytes']['per_frame']['max']:.0f}"
        assert comm["compute ms / frame (mean)"] == f"{metrics['latency_ms']['compute']['mean']:.1f}"
    assert ap_table["ego_only"]["fusion"] == "`none`" and ap_table["cooperative"]["fusion"] == "`early`"
    assert comm_table["ego_only"]["bytes / message (mean)"] == "0"  # nothing on the air without fusion
    assert int(comm_table["cooperative"]["bytes / message (mean)"]) > 0

    loop_table = markdown_table(report, "observations")
    assert set(loop_table) == {"ego_only", "visible"}
    for obs, row in loop_table.items():
        evaluation = json.loads((out / "planner" / "eval" / obs / "eval.json").read_text())
        assert evaluation["obs"] == obs
        overall = evaluation["overall"]
        assert row["episodes"] == f"{overall['episodes']:.0f}" == "1"
        assert row["success"] == f"{overall['success_rate']:.2f}"
        assert row["collision"] == f"{overall['collision_rate']:.2f}"
        assert row["driving score"] == f"{overall['driving_score']:.2f}"
        assert row["V2X bytes/s"] == f"{overall['bytes_per_second']:.0f}"
        assert min(e["seed"] for e in evaluation["episodes"]) >= 1_000_000_000  # held-out seeds
    assert loop_table["ego_only"]["V2X bytes/s"] == "0" and int(loop_table["visible"]["V2X bytes/s"]) > 0

    data_table = markdown_table(report, "split")
    manifest = yaml.safe_load((out / "data" / "test" / "red_light_s000101" / "manifest.yaml").read_text())
    assert data_table["test"]["frames"] == "2" and data_table["test"]["seed"] == "101"
    assert data_table["test"]["points"] == f"{manifest['counts']['points']:,}"

    progress = json.loads((out / "progress.json").read_text())["jobs"]
    timings = markdown_table(report, "stage")
    detectors = sum(v["seconds"] for k, v in progress.items() if k.startswith("detectors/"))
    assert timings["detectors"]["seconds"] == f"{detectors:.0f}" and timings["detectors"]["jobs"] == "2"
    assert "tensorboard --logdir" in report and "not the benchmark" in report
    assert list((out / "perception" / "runs" / "cooperative" / "tb").glob("events.out.tfevents.*"))


def test_pictures_in_the_report_are_valid_images(smoke):
    out, _ = smoke
    report = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "pictures/training_curves.png" in links
    assert "pictures/bev/red_light_s000101.png" in links
    assert sum(link.endswith(".gif") for link in links) == 2  # one recorded episode per planner
    for link in links:
        path = out / link
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == ("GIF" if link.endswith(".gif") else "PNG")
            assert image.size[0] > 100 and image.size[1] > 100


def test_second_invocation_skips_and_a_missing_output_is_redone(smoke, capsys):
    out, _ = smoke
    watched = [
        out / "report.md",
        out / "perception" / "runs" / "cooperative" / "checkpoint.pt",
        out / "planner" / "runs" / "visible" / "checkpoint.pt",
        out / "pictures" / "training_curves.png",
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    assert pipeline.main(["--config", str(SMOKE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for index, stage in enumerate(pipeline.STAGES, start=1):
        assert f"[{index}/6] {stage}: complete, skipped" in printed
    assert [p.stat().st_mtime_ns for p in watched] == before

    # a lost evaluation is redone, and the report after it; nothing else
    metrics = out / "perception" / "eval" / "cooperative" / "metrics.json"
    metrics.unlink()
    assert pipeline.main(["--config", str(SMOKE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--- perception/cooperative: done" in printed and "--- report/report.md: done" in printed
    assert "--- perception/ego_only: complete, skipped" in printed
    assert "[2/6] detectors: complete, skipped" in printed and "[4/6] planner: complete, skipped" in printed
    assert metrics.is_file() and (out / "report.md").stat().st_mtime_ns > before[0]
    assert [p.stat().st_mtime_ns for p in watched[1:]] == before[1:]

    # other settings into the same folder are refused
    assert pipeline.main(["--config", str(SMOKE), "--out", str(out), "perception.steps=3"]) == 2
    assert "other settings (perception)" in capsys.readouterr().err


def test_jobs_record_failures_and_rerun_after_their_dependencies(tmp_path):
    cfg = pipeline.PipelineConfig()
    runner = pipeline.Pipeline(cfg, tmp_path)
    calls = []

    def make(name: str, after: tuple[str, ...] = ()) -> pipeline.Job:
        path = tmp_path / f"{name}.txt"
        return pipeline.Job(
            f"s/{name}", (path,), action=lambda: calls.append(name) or path.write_text(name), after=after
        )

    jobs = [make("a"), make("b", after=("s/a",))]
    runner.run_stage(1, "s", jobs)
    assert calls == ["a", "b"]
    # a new invocation: both complete
    runner = pipeline.Pipeline(cfg, tmp_path)
    assert all(runner.complete(j) for j in jobs)
    (tmp_path / "a.txt").unlink()  # a is redone, so b is stale
    runner.run_stage(1, "s", jobs)
    assert calls == ["a", "b", "a", "b"]

    failing = pipeline.Job(
        "s/fails", (tmp_path / "never",), command=[sys.executable, "-c", "raise SystemExit(3)"]
    )
    with pytest.raises(pipeline.PipelineError, match="exit status 3"):
        runner.run_job(failing)
    silent = pipeline.Job("s/silent", (tmp_path / "never",), command=[sys.executable, "-c", "pass"])
    with pytest.raises(pipeline.PipelineError, match="did not write"):
        runner.run_job(silent)
    recorded = json.loads((tmp_path / "progress.json").read_text())["jobs"]
    assert set(recorded) == {"s/a", "s/b"}
    assert recorded["s/a"]["seconds"] >= 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["perception.stepz=3"], "valid keys"),
        (["data.test_runs=[red_light:1]"], "held out"),
        (["data.train_runs=[nowhere:1]"], "scenario:seed"),
        (["perception.cooperative_method=late"], "intermediate or early fusion"),
        (["planner.overrides=[env.obs=nonsense]"], "nonsense"),
    ],
)
def test_configuration_errors_stop_before_any_work(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert pipeline.main(["--config", str(SMOKE), "--out", str(out), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_demo_config_loads_and_holds_out_its_test_seeds():
    cfg = pipeline.load_config(pipeline.PipelineConfig, DEMO)
    cfg.validate()
    experiments = pipeline.detector_configs(cfg)
    assert experiments["ego_only"].model.fusion.method == "none"
    assert experiments["cooperative"].model.fusion.method == cfg.perception.cooperative_method == "early"
    assert experiments["ego_only"].train == experiments["cooperative"].train
    assert experiments["cooperative"].train.max_steps == cfg.perception.steps
    planners = pipeline.planner_configs(cfg)
    assert [p.env.obs for p in planners.values()] == ["ego_only", "visible"]
    assert {p.env.scenario for p in planners.values()} == {"red_light"}
    # the planner config's time-limit curriculum keeps its share of the (shorter) training
    base = pipeline.load_config(pipeline.PlannerConfig, pipeline.repo_path(cfg.planner.config))
    assert base.curriculum.anneal_steps > 0
    for planner in planners.values():
        assert planner.learner.total_steps == cfg.planner.steps
        share = planner.curriculum.anneal_steps / planner.learner.total_steps
        assert share == pytest.approx(base.curriculum.anneal_steps / base.learner.total_steps, abs=1e-3)


def test_every_demo_run_can_place_its_connected_vehicles():
    """The demo's data stage would stop on a scenario that cannot place ``data.cavs`` connected
    vehicles; scenarios change, so check each run's reset (no LiDAR cast)."""
    from sim.world import make_world

    cfg = pipeline.load_config(pipeline.PipelineConfig, DEMO)
    for runs in (cfg.data.train_runs, cfg.data.test_runs):
        for scenario, seed in pipeline.parse_runs(runs, "runs"):
            world = make_world(scenario, lidar=cfg.data.lidar, cavs=cfg.data.cavs)
            world.sensors_enabled = False
            frame = world.reset(seed)
            assert len(frame.connected_ids) == cfg.data.cavs, (scenario, seed)
            world.close()
