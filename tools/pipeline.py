"""Run the whole stack on the embedded simulator and write one report.

    python tools/pipeline.py --config configs/pipeline/demo.yaml --out outputs/demo [key.sub=value ...]

Stages (each runs the project's own command-line tools, in child processes, into OUT):

  1. data        tools/generate.py: training runs and held-out test runs (other seeds) -> OUT/data
  2. detectors   tools/train.py twice, same data, steps and seed: ego-only (fusion ``none``) and
                 cooperative (perception.cooperative_method, default the perception config's
                 own) -> OUT/perception/runs
  3. perception  tools/eval.py on the test split: AP at each IoU, AP on the boxes hidden from the
                 ego, bytes per message and per frame, latency -> OUT/perception/eval
  4. planner     tools/train_planner.py with each observation source (ego_only, visible) on one
                 occlusion scenario; tools/eval_closed_loop.py on held-out scenario seeds
                 (success, collision, V2X bytes/s; a GIF of one episode) -> OUT/planner
  5. pictures    tools/visualize.py BEV PNGs of the test runs; training curves read back from the
                 tensorboard event files (matplotlib) -> OUT/pictures
  6. report      OUT/report.md: settings, wall time per stage, the two tables, the pictures

Resuming: every finished job is recorded in OUT/progress.json; running the same command again
skips the stages whose outputs are complete and continues an interrupted one (generation and
training resume where they stopped). A job re-runs when one it depends on did. OUT remembers its
settings (OUT/pipeline.yaml): other settings into the same OUT are refused (use another --out).
A failing job stops the pipeline with its exit status and a non-zero exit; finished jobs are kept.

Tensorboard logs of every training run: ``tensorboard --logdir OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from datasets.io import atomic_path, atomic_write_text
from datasets.native import read_manifest
from models.config import ConfigError, apply_overrides, load_config, save_resolved, to_dict
from models.experiment import ExperimentConfig, load_experiment
from models.planning.experiment import PlannerConfig
from sim.lidar import LIDAR_PRESETS
from sim.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "detectors", "perception", "planner", "pictures", "report")
VARIANTS = ("ego_only", "cooperative")  # the two perception models
SINGLE_AGENT_METHODS = ("none", "late")  # fusion methods with no cooperative training of their own


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSettings:
    """Stage 1: the generated dataset (LiDAR and cavs as the perception config expects)."""

    lidar: str = "tiny"
    """LiDAR preset (sim.lidar.LIDAR_PRESETS)"""
    cavs: int = 4
    """connected vehicles per run"""
    train_runs: tuple[str, ...] = ("random_traffic:1", "red_light:2")
    """training runs as scenario:seed"""
    train_frames: int = 20
    """frames per training run (10 per simulated second)"""
    test_runs: tuple[str, ...] = ("random_traffic:101", "red_light:102")
    """held-out test runs as scenario:seed (seeds must differ from the training seeds)"""
    test_frames: int = 10
    """frames per test run"""

    def validate(self) -> None:
        if self.lidar not in LIDAR_PRESETS:
            raise ValueError(f"data.lidar {self.lidar!r} is not one of {list(LIDAR_PRESETS)}")
        if self.cavs < 1 or self.train_frames < 1 or self.test_frames < 1:
            raise ValueError("data.cavs, data.train_frames and data.test_frames must be >= 1")
        if not self.train_runs or not self.test_runs:
            raise ValueError("data.train_runs and data.test_runs must each name at least one run")
        train_seeds = {seed for _, seed in parse_runs(self.train_runs, "data.train_runs")}
        test_seeds = {seed for _, seed in parse_runs(self.test_runs, "data.test_runs")}
        if train_seeds & test_seeds:
            raise ValueError(
                f"test seeds must be held out; also used for training: {sorted(train_seeds & test_seeds)}"
            )


@dataclass(frozen=True)
class PerceptionSettings:
    """Stages 2 and 3: the two detectors and their evaluation."""

    config: str = "configs/perception/tiny.yaml"
    """experiment YAML both detectors start from (relative to the repository root)"""
    cooperative_method: str | None = None
    """fusion method of the cooperative detector (None: the config's)"""
    steps: int = 200
    """optimiser steps of each detector"""
    overrides: tuple[str, ...] = ()
    """key.sub=value overrides of the experiment config, for both detectors"""
    eval_overrides: tuple[str, ...] = ("data.ego=scene",)
    """key.sub=value overrides for tools/eval.py (data.ego=scene: the scenario's own ego)"""


@dataclass(frozen=True)
class PlannerSettings:
    """Stage 4: planners trained and evaluated closed loop with each observation source."""

    config: str = "configs/planner/red_light.yaml"
    """planner YAML (an occlusion scenario; relative to the repository root)"""
    observations: tuple[str, ...] = ("ego_only", "visible")
    """observation sources compared (env.obs): what the ego senses alone / plus V2X detections"""
    steps: int = 4000
    """environment steps of training per planner"""
    overrides: tuple[str, ...] = ()
    """key.sub=value overrides of the planner config, for every planner"""
    eval_episodes: int = 20
    """closed-loop episodes per planner, on held-out scenario seeds"""
    record: bool = True
    """write a GIF of each planner's first evaluation episode"""


@dataclass(frozen=True)
class PictureSettings:
    """Stage 5: pictures."""

    bev_view: Literal["world", "ego"] = "world"
    """BEV drawn in world coordinates or in the ego LiDAR's frame"""
    bev_range_m: float = 50.0
    """half width of the BEV around the ego, metres"""
    dpi: int = 100
    """resolution of the PNGs"""


@dataclass(frozen=True)
class PipelineConfig:
    """The whole demo: data, detectors, planners, pictures. Seeds: ``seed`` trains every model."""

    name: str = "demo"
    """title of the report"""
    seed: int = 0
    """training seed of the detectors and planners"""
    data: DataSettings = field(default_factory=DataSettings)
    perception: PerceptionSettings = field(default_factory=PerceptionSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    pictures: PictureSettings = field(default_factory=PictureSettings)

    def validate(self) -> None:
        """Checks that need more than one field; raises ValueError."""
        self.data.validate()
        if self.perception.steps < 1 or self.planner.steps < 1 or self.planner.eval_episodes < 1:
            raise ValueError("perception.steps, planner.steps and planner.eval_episodes must be >= 1")
        if not self.planner.observations or len(set(self.planner.observations)) != len(
            self.planner.observations
        ):
            raise ValueError(
                f"planner.observations must be distinct and not empty, got {self.planner.observations}"
            )


def parse_runs(runs: tuple[str, ...], where: str) -> list[tuple[str, int]]:
    """``("red_light:2", ...)`` -> ``[("red_light", 2), ...]``; ValueError for a malformed item."""
    out = []
    for item in runs:
        scenario, _, seed = item.partition(":")
        if scenario not in SCENARIOS or not seed.strip().lstrip("-").isdigit():
            raise ValueError(
                f"{where}: {item!r} must be scenario:seed with a scenario among {list(SCENARIOS)}"
            )
        out.append((scenario, int(seed)))
    return out


def run_name(scenario: str, seed: int) -> str:
    """The run folder tools/generate.py names by default."""
    return f"{scenario}_s{seed:06d}"


def repo_path(path: str) -> Path:
    """A config path as given, else relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def detector_configs(cfg: PipelineConfig) -> dict[str, ExperimentConfig]:
    """The ego-only and cooperative experiment configs: same data, steps and seed; fusion differs.

    Raises:
        ConfigError, ValueError, FileNotFoundError: a bad perception config or override.
    """
    p = cfg.perception
    base = load_experiment(repo_path(p.config), p.overrides)
    method = p.cooperative_method or base.model.fusion.method
    if method in SINGLE_AGENT_METHODS:
        raise ValueError(
            f"the cooperative detector needs an intermediate or early fusion method, got {method!r} "
            "(set perception.cooperative_method, e.g. attfuse)"
        )
    out = {}
    for variant, fusion_method in (("ego_only", "none"), ("cooperative", method)):
        fusion = dataclasses.replace(base.model.fusion, method=fusion_method)
        experiment = dataclasses.replace(
            base,
            name=variant,
            model=dataclasses.replace(base.model, fusion=fusion),
            # epochs only bound the steps: max_steps ends the run
            train=dataclasses.replace(base.train, max_steps=p.steps, epochs=max(p.steps, 1), seed=cfg.seed),
        )
        experiment.validate()
        apply_overrides(experiment, p.eval_overrides).validate()  # fail now, not after training
        out[variant] = experiment
    return out


def planner_configs(cfg: PipelineConfig) -> dict[str, PlannerConfig]:
    """One planner config per observation source (same scenario, steps and seed).

    Raises:
        ConfigError, ValueError, FileNotFoundError: a bad planner config or override.
    """
    p = cfg.planner
    base = load_config(PlannerConfig, repo_path(p.config))
    # a time-limit curriculum keeps its share of the training: the config's anneal over N of its
    # total steps becomes the same fraction of the pipeline's steps (an explicit override wins)
    anneal = round(base.curriculum.anneal_steps * p.steps / max(base.learner.total_steps, 1))
    out = {}
    for obs in p.observations:
        overrides = [
            f"curriculum.anneal_steps={min(anneal, p.steps)}",
            *p.overrides,
            f"env.obs={obs}",
            f"learner.total_steps={p.steps}",
            f"learner.seed={cfg.seed}",
        ]
        planner = load_config(PlannerConfig, repo_path(p.config), overrides)
        planner.validate()
        if planner.env.obs == "perception":
            raise ValueError("planner.observations: 'perception' is not available to the planners yet")
        out[obs] = planner
    return out


# --- jobs, progress and resuming ----------------------------------------------------------------


class PipelineError(RuntimeError):
    """A job failed; the message says which and how to continue."""


@dataclass
class Job:
    """One unit of work: a tool command or a function, and the files it must leave behind.

    Attributes:
        name: unique, ``<stage>/<what>``.
        outputs: files that exist once the job is complete.
        command: argv of a child process (run from the repository root), or None.
        action: function run in this process instead of a command.
        after: names (or name prefixes) of jobs whose run in this invocation makes this one stale.
    """

    name: str
    outputs: tuple[Path, ...]
    command: list[str] | None = None
    action: Callable[[], None] | None = None
    after: tuple[str, ...] = ()


class Pipeline:
    """Runs jobs, records finished ones in ``OUT/progress.json``, skips complete ones."""

    def __init__(self, cfg: PipelineConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.progress_path = out / "progress.json"
        self.state: dict[str, Any] = {"jobs": {}}
        if self.progress_path.is_file():
            self.state = json.loads(self.progress_path.read_text(encoding="utf-8"))
        self.ran: list[str] = []
        self.start = time.perf_counter()

    def complete(self, job: Job) -> bool:
        stale = any(r.startswith(prefix) for r in self.ran for prefix in job.after)
        return job.name in self.state["jobs"] and not stale and all(p.exists() for p in job.outputs)

    def _save(self) -> None:
        atomic_write_text(self.progress_path, json.dumps(self.state, indent=2) + "\n")

    def run_stage(self, index: int, stage: str, jobs: list[Job]) -> None:
        title = f"[{index}/{len(STAGES)}] {stage}"
        if all(self.complete(job) for job in jobs):
            print(f"\n=== {title}: complete, skipped ===", flush=True)
            return
        print(f"\n=== {title} ({self.elapsed()} elapsed) ===", flush=True)
        for job in jobs:
            if self.complete(job):
                print(f"--- {job.name}: complete, skipped", flush=True)
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        self.state["jobs"].pop(job.name, None)  # not complete until it finishes again
        self._save()
        print(f"--- {job.name}", flush=True)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        if job.command is not None:
            print("$ " + shown_command(job.command), flush=True)
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
            code = subprocess.run(job.command, cwd=ROOT, env=env).returncode
            if code != 0:
                raise PipelineError(f"{job.name} failed (exit status {code}): {shown_command(job.command)}")
        elif job.action is not None:
            try:
                job.action()
            except Exception as err:
                traceback.print_exc()
                raise PipelineError(f"{job.name} failed: {err}") from err
        missing = [str(p) for p in job.outputs if not p.exists()]
        if missing:
            raise PipelineError(f"{job.name} finished but did not write {', '.join(missing)}")
        seconds = time.perf_counter() - start
        self.state["jobs"][job.name] = {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds() - cpu_start, 2),
            "command": shown_command(job.command) if job.command else None,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
        self._save()
        self.ran.append(job.name)
        print(f"--- {job.name}: done in {seconds:.1f} s ({self.elapsed()} elapsed)", flush=True)

    def elapsed(self) -> str:
        return format_seconds(time.perf_counter() - self.start)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children, seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def shown_command(command: list[str]) -> str:
    """The command as a shell line, with paths inside the repository made relative to it."""
    root = str(ROOT) + os.sep
    parts = ["python" if c == sys.executable else c.replace(root, "") for c in command]
    return shlex.join(parts)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def tool(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / name)]


def write_config_once(config: Any, path: Path) -> Path:
    """Save a resolved config; an existing different one at ``path`` is an error (OUT changed)."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        raise ConfigError(f"{path} holds other settings (did a source config change?); use another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_resolved(config, path)


# --- the stages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where everything goes under OUT."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    def detector_config(self, variant: str) -> Path:
        return self.out / "perception" / "configs" / f"{variant}.yaml"

    def detector_run(self, variant: str) -> Path:
        return self.out / "perception" / "runs" / variant

    def detector_eval(self, variant: str) -> Path:
        return self.out / "perception" / "eval" / variant

    def planner_config(self, obs: str) -> Path:
        return self.out / "planner" / "configs" / f"{obs}.yaml"

    def planner_run(self, obs: str) -> Path:
        return self.out / "planner" / "runs" / obs

    def planner_eval(self, obs: str) -> Path:
        return self.out / "planner" / "eval" / obs

    @property
    def pictures(self) -> Path:
        return self.out / "pictures"

    @property
    def curves(self) -> Path:
        return self.pictures / "training_curves.png"

    @property
    def report(self) -> Path:
        return self.out / "report.md"


def data_jobs(cfg: PipelineConfig, lay: Layout) -> list[Job]:
    d = cfg.data
    jobs = []
    for split, runs, frames in (
        ("train", d.train_runs, d.train_frames),
        ("test", d.test_runs, d.test_frames),
    ):
        for scenario, seed in parse_runs(runs, f"data.{split}_runs"):
            name = run_name(scenario, seed)
            command = [
                *tool("generate.py"),
                "--scenario", scenario, "--frames", str(frames), "--seed", str(seed), "--out", str(lay.data),
                "--split", split, "--lidar", d.lidar, "--cavs", str(d.cavs),
            ]  # fmt: skip
            jobs.append(Job(f"data/{split}/{name}", (lay.data / split / name / "manifest.yaml",), command))
    return jobs


def detector_jobs(cfg: PipelineConfig, lay: Layout, experiments: dict[str, ExperimentConfig]) -> list[Job]:
    jobs = []
    for variant, experiment in experiments.items():
        config_path = write_config_once(
            dataclasses.replace(
                experiment, data=dataclasses.replace(experiment.data, root=str(lay.data), split="train")
            ),
            lay.detector_config(variant),
        )
        run = lay.detector_run(variant)
        command = [*tool("train.py"), "--config", str(config_path), "--out", str(run.parent)]
        if (run / "checkpoint.pt").is_file():
            command.append("--resume")  # an interrupted run continues (a finished one stays as it is)
        jobs.append(
            Job(
                f"detectors/{variant}",
                (run / "checkpoint.pt", run / "config.yaml"),
                command,
                after=("data/train/",),
            )
        )
    return jobs


def perception_jobs(cfg: PipelineConfig, lay: Layout) -> list[Job]:
    jobs = []
    for variant in VARIANTS:
        out = lay.detector_eval(variant)
        command = [
            *tool("eval.py"),
            "--checkpoint", str(lay.detector_run(variant)), "--data", str(lay.data), "--split", "test",
            "--out", str(out), *cfg.perception.eval_overrides,
        ]  # fmt: skip
        jobs.append(
            Job(
                f"perception/{variant}",
                (out / "metrics.json",),
                command,
                after=(f"detectors/{variant}", "data/test/"),
            )
        )
    return jobs


def planner_jobs(cfg: PipelineConfig, lay: Layout, planners: dict[str, PlannerConfig]) -> list[Job]:
    jobs = []
    for obs, planner in planners.items():
        config_path = write_config_once(planner, lay.planner_config(obs))
        run = lay.planner_run(obs)
        command = [
            *tool("train_planner.py"),
            "--config",
            str(config_path),
            "--out",
            str(run),
            "--threads",
            "1",
        ]
        if (run / "checkpoint.pt").is_file():
            command.append("--resume")
        jobs.append(Job(f"planner/train_{obs}", (run / "checkpoint.pt",), command))
    for obs in planners:
        out = lay.planner_eval(obs)
        command = [
            *tool("eval_closed_loop.py"),
            "--checkpoint", str(lay.planner_run(obs) / "checkpoint.pt"),
            "--episodes", str(cfg.planner.eval_episodes), "--out", str(out),
        ]  # fmt: skip
        if cfg.planner.record:
            command.append("--record")
        jobs.append(
            Job(f"planner/eval_{obs}", (out / "eval.json",), command, after=(f"planner/train_{obs}",))
        )
    return jobs


def picture_jobs(cfg: PipelineConfig, lay: Layout) -> list[Job]:
    pics = cfg.pictures
    bev = lay.pictures / "bev"
    names = [run_name(s, seed) for s, seed in parse_runs(cfg.data.test_runs, "data.test_runs")]
    command = [
        *tool("visualize.py"),
        str(lay.data / "test"), "--out", str(bev), "--view", pics.bev_view, "--range", str(pics.bev_range_m),
        "--dpi", str(pics.dpi),
    ]  # fmt: skip
    return [
        Job("pictures/bev", tuple(bev / f"{n}.png" for n in names), command, after=("data/test/",)),
        Job(
            "pictures/curves",
            (lay.curves,),
            action=lambda: plot_training_curves(cfg, lay),
            after=("detectors/", "planner/train_"),
        ),
    ]


def report_jobs(cfg: PipelineConfig, lay: Layout, pipeline: Pipeline) -> list[Job]:
    return [
        Job("report/report.md", (lay.report,), action=lambda: write_report(cfg, lay, pipeline), after=("",))
    ]


# --- training curves ----------------------------------------------------------------------------


def read_scalars(tb_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one scalar in a tensorboard log folder (all its event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return [], []
    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags().get("scalars", []):
        return [], []
    events = accumulator.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def plot_training_curves(cfg: PipelineConfig, lay: Layout) -> Path:
    """Detector loss and planner return against training steps, read from the tensorboard logs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=cfg.pictures.dpi)
    ax_det, ax_plan = fig.subplots(1, 2)
    panels = (
        (
            ax_det,
            [(v, lay.detector_run(v) / "tb") for v in VARIANTS],
            "loss/total",
            "optimiser step",
            "detector training loss",
        ),
        (
            ax_plan,
            [(o, lay.planner_run(o) / "tb") for o in cfg.planner.observations],
            "episode/return",
            "environment step",
            "planner episode return (training)",
        ),
    )
    for ax, runs, tag, xlabel, title in panels:
        plotted = 0
        for label, tb in runs:
            steps, values = read_scalars(tb, tag)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
                plotted += 1
        if plotted:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no '{tag}' points logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(tag)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    lay.curves.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(lay.curves) as tmp:
        fig.savefig(tmp, format="png")
    return lay.curves


# --- the report ---------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def perception_tables(metrics: dict[str, dict]) -> list[str]:
    """AP table and communication / latency table, one row per detector (from metrics.json)."""
    first = next(iter(metrics.values()))
    thresholds = list(first["ap"]["bev"])
    header = ["detector", "fusion"]
    header += [f"BEV AP@{float(t):.1f}" for t in thresholds] + [f"3D AP@{float(t):.1f}" for t in thresholds]
    header += [f"hidden BEV AP@{float(t):.1f}" for t in thresholds]
    rows, comm_rows = [], []
    for variant, m in metrics.items():
        ap = m["ap"]
        row = [variant, f"`{m['fusion']}`"]
        row += [f"{ap['bev'][t]['all']['ap']:.3f}" for t in thresholds]
        row += [f"{ap['3d'][t]['all']['ap']:.3f}" for t in thresholds]
        row += [f"{ap['bev'][t]['others_only']['ap']:.3f}" for t in thresholds]
        rows.append(row)
        b, lat = m["bytes"], m["latency_ms"]
        comm_rows.append(
            [
                variant,
                f"{b['per_message']['mean']:.0f}",
                f"{b['per_frame']['mean']:.0f}",
                f"{b['per_frame']['max']:.0f}",
                f"{lat['compute']['mean']:.1f}",
                f"{lat['compute']['p90']:.1f}",
                f"{lat['link']['mean']:.1f}",
            ]
        )
    t0 = thresholds[0]
    n_all, n_hidden = first["ap"]["bev"][t0]["all"]["num_gt"], first["ap"]["bev"][t0]["others_only"]["num_gt"]
    lines = _table(header, rows)
    lines += [
        "",
        f"{first['frames']} test frames, {n_all} ground-truth boxes, {n_hidden} of them hidden from the ego "
        '(seen only by another connected vehicle\'s LiDAR). "hidden" = AP on those boxes.',
        "",
    ]
    comm_header = [
        "detector",
        "bytes / message (mean)",
        "bytes / frame (mean)",
        "bytes / frame (max)",
        "compute ms / frame (mean)",
        "compute ms / frame (p90)",
        "link latency ms / frame (mean)",
    ]
    lines += _table(comm_header, comm_rows)
    return lines


_CLOSED_LOOP = (
    ("episodes", "episodes", "{:.0f}"),
    ("success_rate", "success", "{:.2f}"),
    ("collision_rate", "collision", "{:.2f}"),
    ("timeout_rate", "timeout", "{:.2f}"),
    ("route_completion", "route completion", "{:.2f}"),
    ("average_speed", "speed m/s", "{:.1f}"),
    ("driving_score", "driving score", "{:.2f}"),
    ("bytes_per_second", "V2X bytes/s", "{:.0f}"),
)


def closed_loop_table(evals: dict[str, dict]) -> list[str]:
    """One row per planner (from eval.json's ``overall``)."""
    header = ["observations", *(label for _, label, _ in _CLOSED_LOOP)]
    rows = [
        [f"`{e['obs']}`", *(fmt.format(e["overall"][key]) for key, _, fmt in _CLOSED_LOOP)]
        for e in evals.values()
    ]
    return _table(header, rows)


def write_report(cfg: PipelineConfig, lay: Layout, pipeline: Pipeline) -> Path:
    """``OUT/report.md``: every number read from the files the tools and this pipeline wrote."""
    out = lay.out

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, out)).as_posix()

    metrics = {v: json.loads((lay.detector_eval(v) / "metrics.json").read_text()) for v in VARIANTS}
    evals = {o: json.loads((lay.planner_eval(o) / "eval.json").read_text()) for o in cfg.planner.observations}
    experiments = {v: load_experiment(lay.detector_run(v) / "config.yaml") for v in VARIANTS}
    planners = {
        o: load_config(PlannerConfig, lay.planner_run(o) / "config.yaml") for o in cfg.planner.observations
    }
    jobs = pipeline.state["jobs"]

    lines = [f"# Pipeline report: {cfg.name}", ""]
    lines += [
        f"Written {datetime.datetime.now().isoformat(timespec='seconds')} by `python tools/pipeline.py` "
        f"into `{out.name}/` ({os.cpu_count()} CPU cores). Settings: [`pipeline.yaml`](pipeline.yaml); "
        "what each job ran and when: [`progress.json`](progress.json).",
        "",
        "> **Tiny demo budgets, not the benchmark.** Each model here trains for minutes on a CPU "
        f"({cfg.perception.steps} detector steps, {cfg.planner.steps} planner environment steps, one seed), "
        "so the numbers show that every stage runs end to end and measures real quantities; they say "
        "little about the methods. Longer runs and their settings: `docs/results.md` (perception) and "
        "`docs/planning.md` (planning).",
        "",
    ]

    # what was run
    lines += ["## What was run", ""]
    data_rows = []
    for split in ("train", "test"):
        runs = cfg.data.train_runs if split == "train" else cfg.data.test_runs
        for scenario, seed in parse_runs(runs, split):
            manifest = read_manifest(lay.data / split / run_name(scenario, seed))
            boxes = sum(manifest.counts.boxes.values())
            data_rows.append(
                [split, scenario, str(seed), str(manifest.counts.frames_written), str(len(manifest.cavs)),
                 f"{manifest.counts.points:,}", f"{boxes:,}"]
            )  # fmt: skip
    lines += [f"Data (`tools/generate.py`, `{cfg.data.lidar}` LiDAR, embedded simulator), under `data/`:", ""]
    lines += _table(
        ["split", "scenario", "seed", "frames", "cavs", "points", "boxes (over frames)"], data_rows
    )
    e = experiments["cooperative"]
    lines += [
        "",
        f"Detectors (`tools/train.py`, from `{cfg.perception.config}`): ego-only (`none`) and cooperative "
        f"(`{e.model.fusion.method}`), {e.train.max_steps} steps of batch {e.train.batch_size} each, "
        f"seed {e.train.seed}, ego `{e.data.ego}` in training; evaluated by `tools/eval.py` with "
        f"`{' '.join(cfg.perception.eval_overrides) or 'no overrides'}` on the test split, "
        f"channel `{e.link.channel}`.",
        "",
    ]
    p = next(iter(planners.values()))
    seeds = [ep["seed"] for ev in evals.values() for ep in ev["episodes"]]
    lines += [
        f"Planners (`tools/train_planner.py`, from `{cfg.planner.config}`): {p.learner.algorithm.upper()} on "
        f"`{p.env.scenario}` ({p.env.controlled or 'default'} controlled), {p.learner.total_steps} environment "
        f"steps each, seed {p.learner.seed}, observations "
        + ", ".join(f"`{o}`" for o in planners)
        + f"; evaluated closed loop by `tools/eval_closed_loop.py`, {len(seeds) // len(evals)} episodes each "
        f"on held-out scenario seeds {min(seeds)}..{max(seeds)} (deterministic policy).",
        "",
    ]
    time_rows = []
    for stage in [*STAGES[:-1], None]:
        done = {
            k: v
            for k, v in jobs.items()
            if (k.startswith(f"{stage}/") if stage else not k.startswith("report/"))
        }
        seconds = sum(v["seconds"] for v in done.values())
        cpu = sum(v.get("cpu_seconds", 0.0) for v in done.values())
        load = max((v["load_average_1min"] for v in done.values()), default=0.0)
        time_rows.append(
            [
                stage or "**total**",
                str(len(done)),
                f"{seconds:.0f}",
                format_seconds(seconds),
                f"{cpu:.0f}",
                f"{load:.1f}",
            ]
        )
    lines += [
        f"Wall time per stage, summed over its jobs, on this machine ({os.cpu_count()} CPU cores); CPU seconds of "
        "the tools (user + system); load average: the machine's 1-minute load after each job, the highest "
        "(above the core count, other work shared the machine and the wall times are longer than on a quiet one):",
        "",
    ]
    lines += _table(["stage", "jobs", "seconds", "wall time", "CPU seconds", "max load average"], time_rows)
    lines += [""]

    lines += ["## Perception: ego-only vs cooperative", ""]
    lines += perception_tables(metrics)
    lines += [
        "",
        "AP: exact rotated IoU, detections of all frames sorted by score, VOC all-point interpolation "
        "(`docs/perception.md`). Bytes: `len()` of the encoded V2X messages. Compute: the model's "
        "wall-clock time per frame, every agent's work in one process. Full tables: "
        + ", ".join(f"[`{v}`]({rel(lay.detector_eval(v) / 'metrics.md')})" for v in VARIANTS)
        + ".",
        "",
    ]

    lines += [f"## Closed loop on `{p.env.scenario}`: ego-only vs cooperative observations", ""]
    lines += closed_loop_table(evals)
    lines += [
        "",
        "`ego_only`: the ego knows the vehicles its own LiDAR hits; `visible`: plus the vehicles other "
        "connected vehicles saw, if their detection messages arrived over the channel (`docs/planning.md`); "
        "the planners do not use the detectors above. With this few training steps and one seed the two "
        "policies often learn the same behaviour; `docs/planning.md` compares longer runs over several seeds. "
        "Full tables: " + ", ".join(f"[`{o}`]({rel(lay.planner_eval(o) / 'eval.md')})" for o in evals) + ".",
        "",
    ]

    lines += ["## Pictures", "", f"![training curves]({rel(lay.curves)})", ""]
    lines += [
        "Training curves, read back from the tensorboard event files: detector loss per optimiser step, "
        "planner team return of the episodes finished in each training iteration.",
        "",
    ]
    for png in sorted((lay.pictures / "bev").glob("*.png")):
        lines += [f"![BEV {png.stem}]({rel(png)})", ""]
    lines += [
        "BEV of one test frame per run (`tools/visualize.py`): every connected vehicle's points in its own "
        "colour; boxes green where the ego's LiDAR hit them, red where only other vehicles' did.",
        "",
    ]
    for obs in cfg.planner.observations:
        for gif in sorted(lay.planner_eval(obs).glob("*.gif")):
            lines += [
                f"Closed-loop episode with `{obs}` observations:",
                "",
                f"![{obs} episode]({rel(gif)})",
                "",
            ]

    lines += ["## Logs", ""]
    lines += [
        "Tensorboard logs of the four training runs (`perception/runs/*/tb`, `planner/runs/*/tb`):",
        "",
        "```bash",
        f"tensorboard --logdir {shown_command([str(out)])}",
        "```",
        "",
        "Commands, in order:",
        "",
        "```bash",
        *(v["command"] for v in jobs.values() if v.get("command")),
        "```",
        "",
    ]
    atomic_write_text(lay.report, "\n".join(lines))
    return lay.report


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="pipeline YAML (configs/pipeline/*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created; re-use it to resume)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. perception.steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        cfg.validate()
        experiments = detector_configs(cfg)
        planners = planner_configs(cfg)
        saved = out / "pipeline.yaml"
        if saved.is_file():
            before, now = to_dict(load_config(PipelineConfig, saved)), to_dict(cfg)
            differ = sorted(k for k in now if now[k] != before.get(k))
            if differ:
                raise ConfigError(
                    f"{out} was made with other settings ({', '.join(differ)}); use another --out"
                )
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, saved)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    lay = Layout(out)
    pipeline = Pipeline(cfg, out)
    print(f"pipeline {cfg.name} -> {out}", flush=True)
    try:
        stages = {
            "data": lambda: data_jobs(cfg, lay),
            "detectors": lambda: detector_jobs(cfg, lay, experiments),
            "perception": lambda: perception_jobs(cfg, lay),
            "planner": lambda: planner_jobs(cfg, lay, planners),
            "pictures": lambda: picture_jobs(cfg, lay),
            "report": lambda: report_jobs(cfg, lay, pipeline),
        }
        for index, stage in enumerate(STAGES, start=1):
            pipeline.run_stage(index, stage, stages[stage]())
    except (PipelineError, ConfigError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        print(f"finished jobs are kept in {out}; run the same command again to continue.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; finished jobs are kept in {out}; run the same command again to continue.",
            file=sys.stderr,
        )
        return 130
    print(f"\ndone in {pipeline.elapsed()}: {lay.report}", flush=True)
    print(f"tensorboard --logdir {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
