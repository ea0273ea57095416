"""The trainer picks its device, process-group backend and autocast from `device` (auto: CUDA when
available): gloo on CPUs, NCCL with one GPU per rank. The CPU path is what the rest of the training
tests run; the CUDA run below is what scripts/gpu_check.sh runs on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_loop import tiny_cfg

from trimode.train.loop import backend_for, train, train_device


def test_auto_is_the_cpu_without_a_gpu_and_cpu_uses_gloo(tmp_path):
    if torch.cuda.is_available():
        assert train_device(tiny_cfg(tmp_path, device="auto")).type == "cuda"
    else:
        assert train_device(tiny_cfg(tmp_path, device="auto")) == torch.device("cpu")
    assert train_device(tiny_cfg(tmp_path, device="cpu")) == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


def test_bad_devices_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        train_device(tiny_cfg(tmp_path, device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_device(tiny_cfg(tmp_path, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only (run by scripts/gpu_check.sh on a GPU)")
def test_a_short_cuda_run_trains_and_resumes(tmp_path):
    cfg = tiny_cfg(tmp_path, device="cuda", steps=6, bf16=True)
    out = train(cfg, log=lambda *a: None)
    assert math.isfinite(out["ar_loss"]) and math.isfinite(out.get("diff_loss", 0.0))
    again = train(tiny_cfg(tmp_path, device="cuda", steps=8, bf16=True, resume=True), log=lambda *a: None)
    assert again["step"] == 8
