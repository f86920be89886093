"""sim/workers.py and the --workers mode of tools/generate.py and tools/eval_closed_loop.py.

The tool runs come first: each starts (and stops) its own local Ray cluster in a subprocess. The
in-process tests of ``run_jobs`` after them share one module-scoped cluster of two CPUs.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from planner_fixtures import untrained_red_light_checkpoint

from datasets.native import list_cavs
from models.config import apply_overrides
from models.planning.experiment import PlannerConfig, Policy
from models.planning.networks import Actor
from sim.workers import Job, JobAttemptFailed, JobFailed, run_jobs

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "tools" / "generate.py"
EVAL = ROOT / "tools" / "eval_closed_loop.py"


def run_tool(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# the tools: serial and --workers 2 give the same files
# ------------------------------------------------------------------------------------------------


def test_generate_with_workers_writes_the_serial_bytes_and_resumes(tmp_path):
    args = [
        "--scenario",
        "red_light",
        "--scenario",
        "merge",
        "--seeds",
        "3",
        "--frames",
        "2",
        "--lidar",
        "tiny",
    ]
    serial = run_tool(GENERATE, *args, "--out", str(tmp_path / "serial"))
    assert serial.returncode == 0, serial.stderr
    parallel = run_tool(GENERATE, *args, "--out", str(tmp_path / "parallel"), "--workers", "2")
    assert parallel.returncode == 0, parallel.stderr
    expected = tree_bytes(tmp_path / "serial")
    runs = {Path(k).parts[1] for k in expected}
    assert runs == {"red_light_s000003", "merge_s000003"}
    assert any(k.endswith("manifest.yaml") for k in expected)
    assert tree_bytes(tmp_path / "parallel") == expected  # manifests included
    assert "red_light_s000003: 2 frames" in parallel.stdout and "merge_s000003: 2 frames" in parallel.stdout

    # interrupted after frame 0 of one run: the same command with workers completes it
    run = tmp_path / "parallel" / "train" / "merge_s000003"
    for cav in list_cavs(run):
        for suffix in (".yaml", ".pcd", ".npz"):
            (run / str(cav) / f"000001{suffix}").unlink()
    resumed = run_tool(GENERATE, *args, "--out", str(tmp_path / "parallel"), "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming merge_s000003: 1 of 2 frames" in resumed.stdout
    assert "resuming red_light_s000003: 2 of 2 frames" in resumed.stdout
    assert tree_bytes(tmp_path / "parallel") == expected


def test_generate_run_lists_and_a_failed_run_named(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    args = generate.parse_args(["--scenario", "all", "--seeds", "0-2,5,1", "--frames", "1", "--out", "x"])
    specs = generate.run_specs(args)
    assert [s.seed for s in specs[:4]] == [0, 1, 2, 5] and len(specs) == 4 * len(generate.SCENARIOS)
    assert specs[0].run_name == f"{generate.SCENARIOS[0]}_s000000"
    assert generate.parse_args(["--scenario", "merge", "--frames", "1", "--out", "x"]).seed_list == [0]
    with pytest.raises(SystemExit):
        generate.parse_args(["--scenario", "merge", "--seeds", "3-1", "--frames", "1", "--out", "x"])
    with pytest.raises(SystemExit):
        generate.parse_args(
            ["--scenario", "merge", "--seeds", "0-1", "--run-name", "r", "--frames", "1", "--out", "x"]
        )

    # the second run's folder holds another generation: the tool stops with an error naming it
    base = ["--scenario", "red_light", "--frames", "1", "--lidar", "tiny", "--out", str(tmp_path)]
    assert run_tool(GENERATE, *base, "--seed", "1", "--cavs", "1").returncode == 0
    clash = run_tool(GENERATE, *base, "--seeds", "0-1")
    assert clash.returncode == 2
    assert (
        "job 'red_light_s000001' failed after 1 attempt" in clash.stderr and "other settings" in clash.stderr
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained single-agent policy (equal results need no good one)."""
    return untrained_red_light_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_eval_with_workers_gives_the_serial_json(checkpoint, tmp_path):
    args = ["--checkpoint", str(checkpoint), "--scenario", "red_light", "--scenario", "left_turn"]
    args += ["--episodes", "3", "--stochastic", "--record", "env.episode_s=3.0"]
    serial = run_tool(EVAL, *args, "--out", str(tmp_path / "serial"))
    assert serial.returncode == 0, serial.stderr
    parallel = run_tool(EVAL, *args, "--out", str(tmp_path / "parallel"), "--workers", "2")
    assert parallel.returncode == 0, parallel.stderr
    expected = json.loads((tmp_path / "serial" / "eval.json").read_text())
    assert [(e["scenario"], e["seed"]) for e in expected["episodes"]] == [
        (s, 1_000_000_000 + k) for s in ("red_light", "left_turn") for k in range(3)
    ]
    assert json.loads((tmp_path / "parallel" / "eval.json").read_text()) == expected
    for name in ("eval.md", "red_light_seed1000000000.gif", "left_turn_seed1000000000.gif"):
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()


# ------------------------------------------------------------------------------------------------
# run_jobs: serial without Ray, retries, failures for good
# ------------------------------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def flaky(marker: str, value: int, how: str) -> int:
    """Fails on its first attempt (raises, or kills its process with ``how="exit"``), then returns ``value``."""
    path = Path(marker)
    if not path.exists():
        path.write_text("attempted")
        if how == "exit":
            os._exit(1)
        raise RuntimeError(f"injected failure for {value}")
    return value


def always_fails(value: int) -> int:
    raise RuntimeError(f"broken job {value}")


def bad_settings(value: int) -> int:
    raise ValueError(f"bad setting {value}")


def test_serial_runs_in_order_in_process_without_ray():
    code = (
        "import sys; from sim.workers import Job, run_jobs\n"
        "out = [(r.index, r.value) for r in run_jobs([Job(f'j{k}', abs, (-k,)) for k in range(4)])]\n"
        "assert out == [(0, 0), (1, 1), (2, 2), (3, 3)], out\n"
        "assert 'ray' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_serial_retries_are_reported_and_failures_named(tmp_path):
    events: list[JobAttemptFailed] = []
    jobs = [Job("steady", square, (3,)), Job("flaky", flaky, (str(tmp_path / "m"), 7, "raise"))]
    results = list(run_jobs(jobs, on_retry=events.append))
    assert [(r.name, r.value, r.attempts) for r in results] == [("steady", 9, 1), ("flaky", 7, 2)]
    assert [(e.name, e.attempt, e.max_attempts, e.worker_died) for e in events] == [("flaky", 1, 3, False)]
    assert "injected failure for 7" in str(events[0]) and "'flaky'" in str(events[0])

    with pytest.raises(JobFailed, match=r"job 'doomed' failed after 2 attempts: RuntimeError: broken job 5"):
        list(run_jobs([Job("doomed", always_fails, (5,))], max_retries=1, on_retry=events.append))
    with pytest.raises(ValueError, match="unique"):
        run_jobs([Job("a", square, (1,)), Job("a", square, (2,))])


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of two CPUs for this module's in-process tests; nothing left after it."""
    import psutil
    import ray
    from ray import cloudpickle

    # the jobs below are defined in this test module, which Ray workers cannot import by name
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # children from earlier tests in the same session (e.g. multiprocessing's resource tracker) are not Ray's
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    def started_by_ray() -> list[psutil.Process]:
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]

    deadline = time.monotonic() + 30.0
    while started_by_ray() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p.name() for p in started_by_ray()]
    assert left == [], f"Ray processes left running: {left}"


def test_ray_retries_a_raising_job_and_a_dead_worker(ray_cluster, tmp_path):
    events: list[JobAttemptFailed] = []
    jobs = [
        Job("raises once", flaky, (str(tmp_path / "raise"), 1, "raise")),
        Job("dies once", flaky, (str(tmp_path / "exit"), 2, "exit")),
        *[Job(f"square {k}", square, (k,)) for k in range(4)],
    ]
    results = sorted(run_jobs(jobs, workers=2, on_retry=events.append), key=lambda r: r.index)
    assert [r.value for r in results] == [1, 2, 0, 1, 4, 9]
    assert [r.attempts for r in results] == [2, 2, 1, 1, 1, 1]
    reported = {e.name: e for e in events}
    assert set(reported) == {"raises once", "dies once"} and len(events) == 2
    assert (
        not reported["raises once"].worker_died and "injected failure for 1" in reported["raises once"].error
    )
    assert reported["dies once"].worker_died and "worker process died" in str(reported["dies once"])
    assert ray_cluster.is_initialized()  # a cluster the caller started is left to the caller


def test_ray_failures_for_good_name_the_job(ray_cluster):
    events: list[JobAttemptFailed] = []
    with pytest.raises(JobFailed) as failed:
        list(run_jobs([Job("doomed", always_fails, (3,))], workers=2, max_retries=2, on_retry=events.append))
    assert failed.value.name == "doomed" and failed.value.attempts == 3
    assert "job 'doomed' failed after 3 attempts: RuntimeError: broken job 3" in str(failed.value)
    assert isinstance(failed.value.cause, RuntimeError) and [e.attempt for e in events] == [1, 2]

    events.clear()
    with pytest.raises(JobFailed) as fatal:
        list(
            run_jobs(
                [Job("misconfigured", bad_settings, (4,))],
                workers=2,
                fatal=(ValueError,),
                on_retry=events.append,
            )
        )
    assert fatal.value.attempts == 1 and isinstance(fatal.value.cause, ValueError) and events == []
    assert "job 'misconfigured' failed after 1 attempt: ValueError: bad setting 4" in str(fatal.value)


@pytest.mark.parametrize("action_space", [spaces.Discrete(5), spaces.Box(-1.0, 1.0, (2,), np.float32)])
def test_a_stochastic_policy_samples_only_from_the_generator_it_is_given(action_space):
    config = apply_overrides(PlannerConfig(), ["learner.network.hidden_sizes=8"])
    actor = Actor(6, action_space, config.learner.network)
    checkpoint = {"actor_dim": 6, "num_agents": 2, "trainer": {"actor": actor.state_dict()}}
    policy = Policy(
        checkpoint,
        replace(config, learner=replace(config.learner, agent_id_in_obs=False)),
        action_space,
        ["cav_0", "cav_1"],
        deterministic=False,
    )
    obs = {a: np.linspace(-1.0, 1.0, 6, dtype=np.float32) * (k + 1) for k, a in enumerate(["cav_0", "cav_1"])}

    def sample(seed: int, global_seed: int) -> list:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(global_seed)  # the global generator must not matter
        return [np.asarray(policy.act(obs, generator=generator)[a]).tolist() for _ in range(8) for a in obs]

    assert sample(1, global_seed=0) == sample(1, global_seed=5)
    assert sample(1, global_seed=0) != sample(2, global_seed=0)
