"""One typed configuration for training and evaluating a perception model, and what builds from it.

A YAML file under ``configs/perception/`` fills :class:`ExperimentConfig` through
:func:`models.config.load_config` (unknown keys are errors, ``key.sub=value`` overrides apply on
top); ``tools/train.py`` saves the resolved configuration next to its checkpoints and
``tools/eval.py`` rebuilds everything from that file.

The ground-truth range of the data is not configured: it is the model grid's x-y range
(:meth:`ExperimentConfig.dataset_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from datasets.coop_dataset import CoopDataset, CoopDatasetConfig
from models.comm import LinkConfig
from models.config import load_config
from models.perception import CooperativePerception, PerceptionModelConfig

__all__ = ["EvalConfig", "ExperimentConfig", "TrainConfig", "load_experiment", "resolve_device"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation.

    Attributes:
        epochs: passes over the training samples.
        max_steps: stop after this many optimiser steps in total (0: no limit).
        batch_size: samples per optimiser step, the global batch: under ``torchrun`` each of the N
            processes takes its share (``batch_size`` must be divisible by N).
        lr: peak learning rate (AdamW, one-cycle schedule).
        weight_decay: AdamW weight decay.
        grad_clip: gradient norm clip (0: off).
        num_workers: data-loader worker processes (0: load in the main process).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available); under ``torchrun``, CUDA
            is GPU ``LOCAL_RANK`` for each process.
        num_threads: torch CPU threads (1 avoids oversubscription with spconv's own threads on
            small machines; 0 leaves torch's default).
        seed: seeds torch, the sample order and the dataset's draws.
        log_every: steps between tensorboard scalars.
        checkpoint_every: steps between checkpoints (an epoch end always writes one).
    """

    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-2
    grad_clip: float = 10.0
    num_workers: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    num_threads: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_steps < 0:
            raise ValueError("TrainConfig: epochs and batch_size must be >= 1, max_steps >= 0")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig: lr must be > 0, weight_decay and grad_clip >= 0")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.num_workers < 0 or self.num_threads < 0:
            raise ValueError("TrainConfig: log_every, checkpoint_every >= 1; num_workers, num_threads >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation defaults (``tools/eval.py`` flags override them).

    Attributes:
        split: split folder evaluated.
        iou_thresholds: AP thresholds.
        score_threshold: detections below this score are dropped before AP (0: keep all the head
            returns).
    """

    split: str = "test"
    iou_thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)
    score_threshold: float = 0.0


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs.

    Attributes:
        name: run name (the run folder's default name).
        data: training data (``data.root`` / ``data.split``); evaluation reuses it with
            ``training=False`` on the evaluated folder.
        model: the model.
        link: V2X channel used in training and evaluation.
        train: optimisation.
        eval: evaluation defaults.
    """

    name: str = "perception"
    data: CoopDatasetConfig = field(default_factory=CoopDatasetConfig)
    model: PerceptionModelConfig = field(default_factory=PerceptionModelConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Checks across sections (after all overrides); raises ValueError."""
        self.model.fusion.validate()
        names = tuple(c.name for c in self.model.detection.classes)
        if names != self.data.class_names:
            raise ValueError(
                f"model.detection.classes {names} must name the data's classes {self.data.class_names} in order"
            )

    def dataset_config(self, root: str | None = None, split: str | None = None, training: bool = True) -> CoopDatasetConfig:
        """The data configuration with the ground-truth range of the model grid (and optionally
        another folder, split and mode)."""
        x0, y0, _, x1, y1, _ = self.model.grid.point_cloud_range
        return dataclasses.replace(
            self.data,
            root=self.data.root if root is None else root,
            split=self.data.split if split is None else split,
            training=training,
            gt_range=(x0, y0, x1, y1),
        )

    def dataset(self, root: str | None = None, split: str | None = None, training: bool = True) -> CoopDataset:
        return CoopDataset(self.dataset_config(root, split, training))


def load_experiment(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """:class:`ExperimentConfig` from a YAML file (None: defaults) and ``key.sub=value`` overrides,
    validated across sections once every override is applied."""
    config = load_config(ExperimentConfig, path, overrides)
    config.validate()
    return config


def run_paths(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint file) of a run folder of tools/train.py or of a checkpoint file in
    one; FileNotFoundError when the checkpoint or the run's config.yaml is missing."""
    run = path if path.is_dir() else path.parent
    checkpoint = run / "checkpoint.pt" if path.is_dir() else path
    if not checkpoint.is_file() or not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} has no checkpoint.pt and config.yaml")
    return run, checkpoint


def load_trained(
    config: ExperimentConfig, checkpoint: Path, device: torch.device
) -> tuple[CooperativePerception, list[str]]:
    """The eval-mode model of ``config`` on ``device`` with the weights of ``checkpoint``, and the
    checkpoint's tensors it does not use (another fusion method may leave modules of the trained
    one unused); ValueError when the checkpoint lacks weights the model needs."""
    model = CooperativePerception(config.model).to(device)
    state = torch.load(checkpoint, map_location=device, weights_only=False)["model"]
    missing, unused = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"the checkpoint has no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model.eval(), list(unused)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    match name:
        case "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case "cuda":
            if not torch.cuda.is_available():
                raise ValueError("train.device is cuda but torch sees no CUDA device")
            return torch.device("cuda")
        case "cpu":
            return torch.device("cpu")
    raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
