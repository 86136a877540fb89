"""Training memory and step time of a fine-tuning method, measured on a fixed synthetic batch (random token ids): one
logical training step as compression.train runs it (the method prepares the model, its frozen part runs once, its
trainable part runs with autograd; DP through privacy.engine or plain SGD/AdamW). Nothing of any private data goes in,
so the numbers say nothing about it. Pure library; `measure_in_fresh_process` runs `measure` in a new interpreter, so
that its peak RSS is the configuration's own (as bench/memory.py does per configuration).

Memory on CPU: glibc's mmap threshold is fixed in the fresh process (MALLOC_ENV) so freed tensors go back to the OS;
after a warm-up step the RSS high-water mark is reset (/proc/self/clear_refs), and over the measured steps `peak_mb` is
VmHWM (libraries, model, optimizer state and batch included) and `step_mb` VmHWM minus the RSS just before them (the
steps' own working memory). On CUDA, torch.cuda.max_memory_allocated over the measured steps.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compression.methods import prepare, stage_plan
from compression.train import TrainConfig, make_optimizer
from privacy.engine import PrivateModel

MALLOC_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"}


def status_mb(key: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


class Stepper:
    """One logical training step of `method` on `model` (DP or not), over a synthetic batch of `batch_size` sequences
    of `seq_len` random token ids. The model is prepared for the method here (pass a fresh one)."""

    def __init__(self, model, method, *, batch_size: int, seq_len: int, dp: bool = True, optimizer: str = "sgd",
                 engine: str = "bookkeeping", device: str = "cpu", seed: int = 0):
        torch.manual_seed(seed)
        model = prepare(model.to(device), method)
        plan = stage_plan(model, method)
        vocab, g = model.encoder.config.vocab_size, torch.Generator().manual_seed(seed)
        ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch_size, seq_len), generator=g)
        self.mask = torch.ones_like(ids).to(device)
        self.labels = torch.randint(0, model.num_labels, (batch_size,), generator=g).to(device)
        plan.module.eval()
        with torch.no_grad():
            self.features = plan.features(ids.to(device), self.mask, torch.zeros_like(self.mask))
        plan.module.train()
        self.plan = plan
        self.optimizer = make_optimizer(plan.module, TrainConfig(optimizer=optimizer, engine=engine))
        self.private = None if not dp else PrivateModel(
            plan.module, self.optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
            mode=engine, generator=torch.Generator(device=device).manual_seed(0))
        self.trainable = sum(p.numel() for p in plan.module.parameters() if p.requires_grad)

    def step(self) -> float:
        sync = torch.cuda.synchronize if self.features.is_cuda else (lambda: None)
        sync()
        began = time.perf_counter()
        losses = F.cross_entropy(self.plan.logits(self.features, self.mask), self.labels, reduction="none")
        if self.private is None:
            self.optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            self.optimizer.step()
        else:
            self.private.backward(losses)
            self.private.step()
        sync()
        return time.perf_counter() - began


def measure(stepper: Stepper, *, steps: int, warmup: int = 1) -> dict:
    """trainable_parameters, peak_mb, step_mb, median_step_s (and cuda_peak_mb) of `steps` steps after `warmup`."""
    for _ in range(warmup):
        stepper.step()
    cuda = stepper.features.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = status_mb("VmRSS")
    times = [stepper.step() for _ in range(steps)]
    peak = status_mb("VmHWM")
    row = {"trainable_parameters": stepper.trainable, "peak_mb": peak, "rss_before_step_mb": base,
           "step_mb": peak - base, "median_step_s": statistics.median(times), "step_s": times}
    if cuda:
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def measure_in_fresh_process(job: dict, *, threads: int = 1, timeout_s: float = 1800) -> dict:
    """`measure` of `job` in a new interpreter: {"model": {name_or_path, num_labels, pooling}, "method": a method
    config as a dict, "batch_size", "seq_len", "steps", "dp", "optimizer", "engine"}. Raises RuntimeError with the
    worker's last line if it fails."""
    cmd = [sys.executable, "-m", "compression.profile", json.dumps(job), "--threads", str(threads)]
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"profiling worker exited {proc.returncode}: {tail[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_job(job: dict) -> dict:
    """`measure` of `job` (as for `measure_in_fresh_process`) in this process."""
    from pydantic import TypeAdapter

    from compression.methods import MethodConfig
    from compression.models import load_classifier

    spec = job["model"]
    model, _ = load_classifier(spec["name_or_path"], num_labels=spec["num_labels"], pooling=spec.get("pooling"),
                               dropout=0.0, seed=0)
    method = TypeAdapter(MethodConfig).validate_python(job["method"])
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        stepper = Stepper(model, method, batch_size=job["batch_size"], seq_len=job["seq_len"],
                          dp=job.get("dp", True), optimizer=job.get("optimizer", "sgd"),
                          engine=job.get("engine", "bookkeeping"), device=job.get("device", "cpu"))
        return measure(stepper, steps=job["steps"], warmup=job.get("warmup", 1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)
    print(json.dumps(run_job(json.loads(sys.argv[1]))))
