"""The CUDA path (``spconv-cu*``, a GPU): every fusion method gives the CPU's losses, gradients and
detections on the GPU, and tools/train.py + tools/eval.py run there end to end, their checkpoints
loadable on CPU. Skipped where torch sees no GPU (CI machines); run on a GPU machine with
``pytest tests/perception/test_perception_cuda.py tests/models/test_spconv_cpu.py``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from perception_helpers import build_model, synthetic_sample

from datasets.collate import CoopCollate
from models.comm import LinkConfig, V2XLink
from models.perception import FUSION_METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and the spconv-cu* wheel")

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "perception" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _full_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compare in full float32: no TF32 in cuDNN's convolutions (torch's matmuls default to full
    float32 already, which the first assert keeps honest)."""
    assert torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_fusion_on_cuda_matches_cpu(method: str) -> None:
    """Same weights, same batch (3 agents and 2 agents): losses, encoder gradients, fused maps and
    the number of messages agree between CPU and GPU."""
    cpu_model = build_model(method).train()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    batch = CoopCollate(cpu_model.config.grid)([synthetic_sample(21, 3), synthetic_sample(22, 2)])
    results = {}
    for name, model, device in (("cpu", cpu_model, "cpu"), ("cuda", gpu_model, "cuda")):
        output, loss = model(batch.to(device), V2XLink(LinkConfig()))
        loss.total.backward()
        grad = next(p.grad for n, p in model.named_parameters() if n.startswith("encoder.") and p.grad is not None)
        results[name] = (output, loss, grad)
    (out_c, loss_c, grad_c), (out_g, loss_g, grad_g) = results["cpu"], results["cuda"]
    assert out_g.fused_features.is_cuda
    torch.testing.assert_close(loss_g.total.detach().cpu(), loss_c.total.detach(), rtol=1e-3, atol=1e-4)
    gpu_terms = loss_g.scalars()
    for key, value in loss_c.scalars().items():
        assert gpu_terms[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    torch.testing.assert_close(grad_g.cpu(), grad_c, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(out_g.fused_features.detach().cpu(), out_c.fused_features.detach(), rtol=1e-3, atol=1e-3)
    assert [len(r) for r in out_g.link.records] == [len(r) for r in out_c.link.records]


@pytest.mark.parametrize("method", ["none", "early", "core"])
def test_detections_on_cuda_match_cpu(method: str) -> None:
    """The dense detection maps agree; the decoded boxes agree as sets. An untrained head scores
    many anchors within float rounding of each other, so which of those near-ties make the cut
    (and NMS's order) can differ between devices: most boxes, not all, must be found on both."""
    model = build_model(method).eval()
    gpu_model = copy.deepcopy(model).cuda()
    batch = CoopCollate(model.config.grid)([synthetic_sample(31, 4)])
    with torch.no_grad():
        cpu_out, _ = model(batch, V2XLink(LinkConfig()), with_loss=False, with_detections=True)
        gpu_out, _ = gpu_model(batch.to("cuda"), V2XLink(LinkConfig()), with_loss=False, with_detections=True)
    for name in ("cls_logits", "box_deltas"):
        torch.testing.assert_close(
            getattr(gpu_out.detection_maps, name).cpu(), getattr(cpu_out.detection_maps, name), rtol=1e-3, atol=1e-3
        )
    got, want = gpu_out.detections[0].boxes, cpu_out.detections[0].boxes
    assert len(want) > 10 and abs(len(got) - len(want)) <= 0.1 * len(want)
    matched = (np.abs(got[:, None, :] - want[None, :, :]).max(axis=2) < 1e-3).any(axis=1)
    assert matched.mean() >= 0.9, f"{matched.sum()} of {len(got)} GPU boxes found on CPU"


@pytest.mark.slow
def test_train_and_eval_tools_on_cuda(coop_data: Path, tmp_path: Path) -> None:
    """tools/train.py with ``train.device=cuda`` (3 steps, then resumed to 4), tools/eval.py on the
    GPU, and the GPU checkpoint evaluated on CPU."""
    runs = tmp_path / "runs"
    common = [f"data.root={coop_data}", "name=gpu", "train.device=cuda", "data.cache_frames=0"]
    for steps, resume in ((3, []), (4, ["--resume"])):
        result = subprocess.run(
            [sys.executable, "tools/train.py", "--config", str(TINY), *common, f"train.max_steps={steps}",
             "--out", str(runs), *resume],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(runs / "gpu" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    for device in ("cuda", "cpu"):
        out = tmp_path / f"eval_{device}"
        result = subprocess.run(
            [sys.executable, "tools/eval.py", "--checkpoint", str(runs / "gpu"), "--data", str(coop_data),
             "--split", "test", "--out", str(out), f"train.device={device}"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["device"].startswith(device)
        assert metrics["frames"] > 0 and np.isfinite(metrics["ap"]["bev"]["0.50"]["all"]["ap"])
