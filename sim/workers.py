"""Run independent jobs serially in-process or as Ray tasks, with bounded, reported retries.

The tools that repeat one piece of work over seeds (``tools/generate.py``: one simulator run per
scenario and seed; ``tools/eval_closed_loop.py``: chunks of evaluation episodes) describe each
piece as a :class:`Job` (a name, a picklable callable and its arguments) and hand the list to
:func:`run_jobs`:

- ``workers=0`` and no ``ray_address``: the jobs run one after the other in this process, in
  order; Ray is not imported at all.
- ``workers=N >= 1``: a local Ray cluster with ``N`` CPUs is started (and shut down at the end),
  each job one task of one CPU; with ``ray_address`` the jobs go to that existing cluster instead,
  at most ``N`` at a time (the cluster's nodes must have the package installed and see the paths
  the jobs name). If Ray is already initialised in this process, that connection is used and left
  open.

Results are yielded as jobs complete (in job order when serial), each carrying its job's index,
so a caller can drive a progress bar and still assemble the results in a fixed order. The result
of a job does not depend on the worker that ran it: jobs are expected to be deterministic in
their arguments (seeded), which is what makes a parallel run identical to the serial one.

Failures: a job that raises, or whose Ray worker process dies, is submitted again, up to
``max_retries`` times; every failed attempt is reported through ``on_retry`` (default: a logging
warning) with the job's name and the error. Exceptions of the types in ``fatal`` (bad settings,
which would fail again) are not retried. A job that fails for good raises :class:`JobFailed`
naming it; the jobs still running are cancelled.

Ray's own task retries are switched off (``max_retries=0``) so that every retry goes through
here and is reported; Ray still detects the dead worker and raises ``WorkerCrashedError``.

Example:
    jobs = [Job(f"merge seed {s}", simulate, (s,)) for s in range(10)]
    for result in tqdm(run_jobs(jobs, workers=2), total=len(jobs)):
        values[result.index] = result.value
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Job", "JobAttemptFailed", "JobFailed", "JobResult", "exit_status_of", "run_jobs"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job(Generic[T]):
    """One independent piece of work.

    Attributes:
        name: how messages name the job (e.g. ``"merge_s000003"``).
        fn: the callable; it and its arguments must be picklable (module-level functions and
            dataclasses are) and importable where the Ray workers run.
        args, kwargs: its arguments.
    """

    name: str
    fn: Callable[..., T]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult(Generic[T]):
    """A completed job: its position in the submitted list, its name, what it returned, and the
    attempts it took (1 when it succeeded at once)."""

    index: int
    name: str
    value: T
    attempts: int


@dataclass(frozen=True)
class JobAttemptFailed:
    """One failed attempt of a job that will be tried again (what ``on_retry`` receives).

    Attributes:
        name: the job's name.
        attempt: the attempt that failed, from 1.
        max_attempts: ``1 + max_retries``.
        error: the error in one line (exception type and message, or the worker's death).
        worker_died: the worker process died (rather than the job raising).
    """

    name: str
    attempt: int
    max_attempts: int
    error: str
    worker_died: bool = False

    def __str__(self) -> str:
        what = "its worker process died" if self.worker_died else "it raised"
        return (
            f"job {self.name!r} failed on attempt {self.attempt} of {self.max_attempts} ({what}: "
            f"{self.error}); retrying"
        )


class JobFailed(RuntimeError):
    """A job that failed for good: after ``attempts`` attempts, or at once for a ``fatal`` error.

    Attributes:
        name: the job's name.
        attempts: attempts made.
        cause: the job's own exception (``None`` when its worker process died).
        details: the full error text (the job's traceback, as the worker saw it).
    """

    def __init__(self, name: str, attempts: int, error: str, cause: BaseException | None, details: str):
        self.name = name
        self.attempts = attempts
        self.cause = cause
        self.details = details
        plural = "s" if attempts != 1 else ""
        super().__init__(f"job {name!r} failed after {attempts} attempt{plural}: {error}")


def exit_status_of(err: JobFailed, settings_errors: tuple[type[BaseException], ...]) -> int:
    """Print a failed job for a command-line tool and return its exit status: 2 for a settings
    error (the message only), 1 otherwise (the last attempt's traceback, then the message)."""
    import sys

    if isinstance(err.cause, settings_errors):
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(err.details, file=sys.stderr)
    print(f"error: {err}", file=sys.stderr)
    return 1


def _log_retry(event: JobAttemptFailed) -> None:
    logger.warning("%s", event)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def run_jobs(
    jobs: Sequence[Job[T]],
    workers: int = 0,
    ray_address: str | None = None,
    max_retries: int = 2,
    fatal: tuple[type[BaseException], ...] = (),
    on_retry: Callable[[JobAttemptFailed], None] | None = None,
) -> Iterator[JobResult[T]]:
    """Run ``jobs``; yield a :class:`JobResult` for each as it completes (see the module docstring).

    Args:
        jobs: the work, each independent of the others.
        workers: 0 = serial in this process; N >= 1 = N Ray workers (a local cluster of N CPUs,
            or at most N tasks at a time on ``ray_address``).
        ray_address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``).
        max_retries: further attempts after a job's first failure.
        fatal: exception types that fail a job at once, without retries.
        on_retry: called with every failed attempt that is retried (default: a logging warning).

    Raises:
        JobFailed: a job failed on every attempt or with a ``fatal`` error.
        ValueError: bad ``workers`` or ``max_retries``, or two jobs with the same name.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"job names must be unique; repeated: {', '.join(duplicated)}")
    report = on_retry or _log_retry
    if workers == 0 and ray_address is None:
        return _run_serial(list(jobs), max_retries, fatal, report)
    return _run_ray(list(jobs), workers, ray_address, max_retries, fatal, report)


def _run_serial(
    jobs: list[Job[T]],
    max_retries: int,
    fatal: tuple[type[BaseException], ...],
    report: Callable[[JobAttemptFailed], None],
) -> Iterator[JobResult[T]]:
    for index, job in enumerate(jobs):
        attempt = 1
        while True:
            try:
                value = job.fn(*job.args, **job.kwargs)
            except Exception as err:
                details = traceback.format_exc()
                if isinstance(err, fatal) or attempt > max_retries:
                    raise JobFailed(job.name, attempt, _one_line(err), err, details) from err
                report(JobAttemptFailed(job.name, attempt, 1 + max_retries, _one_line(err)))
                attempt += 1
                continue
            yield JobResult(index, job.name, value, attempt)
            break


def _call(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    """The body of every Ray task."""
    return fn(*args, **kwargs)


def _run_ray(
    jobs: list[Job[T]],
    workers: int,
    ray_address: str | None,
    max_retries: int,
    fatal: tuple[type[BaseException], ...],
    report: Callable[[JobAttemptFailed], None],
) -> Iterator[JobResult[T]]:
    import ray
    from ray.exceptions import RayError, RayTaskError

    started_here = False
    if not ray.is_initialized():
        if ray_address is None:
            # "local": always a fresh cluster of exactly `workers` CPUs, even if RAY_ADDRESS is set
            ray.init(address="local", num_cpus=workers, include_dashboard=False)
        else:
            ray.init(address=ray_address)
        started_here = True
    task = ray.remote(num_cpus=1, max_retries=0)(_call)
    limit = workers if workers > 0 else len(jobs)
    pending = list(range(len(jobs)))[::-1]  # a stack: pop() gives the next index in job order
    attempts = [0] * len(jobs)
    running: dict[Any, int] = {}  # ObjectRef -> job index

    def submit(index: int) -> None:
        job = jobs[index]
        attempts[index] += 1
        running[task.options(name=job.name).remote(job.fn, job.args, job.kwargs)] = index

    try:
        while pending or running:
            while pending and len(running) < limit:
                submit(pending.pop())
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            index = running.pop(ref)
            job = jobs[index]
            try:
                value = ray.get(ref)
            except RayError as err:
                cause = err.cause if isinstance(err, RayTaskError) else None
                worker_died = not isinstance(err, RayTaskError)
                error = _one_line(cause) if cause is not None else _one_line(err)
                if isinstance(cause, fatal) or attempts[index] > max_retries:
                    raise JobFailed(job.name, attempts[index], error, cause, str(err)) from err
                report(JobAttemptFailed(job.name, attempts[index], 1 + max_retries, error, worker_died))
                submit(index)
                continue
            yield JobResult(index, job.name, value, attempts[index])
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
