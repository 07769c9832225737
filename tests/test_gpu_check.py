"""The prepared GPU check (bench/gpu_check.py) runs rarely, on a lent machine. Keep it working by running its
quick mode on the CPU here (every section but the Qwen2-0.5B stage one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_quick_mode_runs_on_cpu_and_records_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--skip-stage-one", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    (row,) = res["student"]
    for amp in ("fp32", "bf16", "fp16"):
        for kind in ("reference", "auto"):
            r = row[f"{kind}_{amp}"]
            assert "error" not in r, (kind, amp, r)
            assert r["loss_finite"] and r["grads_finite"] and r["s"] > 0
    for amp in ("bf16", "fp16"):  # autocast keeps the fast path's loss close to fp32
        assert row[f"loss_rel_diff_{amp}"] < 1e-2
    assert len(res["crossover"]["rows"]) == 3
    assert {r["winner"] for r in res["crossover"]["rows"]} <= {"conv", "fft"}


def test_gpu_check_refuses_cuda_without_a_gpu_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no CUDA device")
