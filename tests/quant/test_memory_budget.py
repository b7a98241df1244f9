"""A memory budget bounds what a calibration holds, whatever the size of its calibration set: the set and
the unit caches beyond it live in memory-mapped files. Measured in a child process as RssAnon (the memory
no file backs), with glibc returning freed blocks at once so that each run's peak is its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET_MB = 4.0
TOKENS, WIDTH = 256, 256  # a conditioning row of 256 KB: Stable Diffusion's text states dominate its set too
RUNS = [(2, BUDGET_MB), (16, BUDGET_MB), (16, 4096.0)]  # (trajectories, budget): the set grows 8x
BUDGETED_RUNS = f"""
import gc, json, sys
import torch
from tests.quant.tiny_unets import text_unet
from tfmq.memory import AnonymousMemoryPeak
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import QDiffusionConfig
from tfmq.sampling import Conditioning, SamplerConfig

torch.set_num_threads(1)
unet = text_unet(cross_attention_dim={WIDTH})
text = torch.randn(16, {TOKENS}, {WIDTH}, generator=torch.Generator().manual_seed(0))
unconditional = {{"encoder_hidden_states": torch.zeros(1, {TOKENS}, {WIDTH})}}

def run(trajectories, budget):
    conditioning = Conditioning({{"encoder_hidden_states": text[:trajectories]}}, unconditional, guidance_scale=2.0)
    # activation ranges see 4 samples a step whatever the set's size (act_samples_per_step)
    config = QDiffusionConfig(batch_size=8, act_samples_per_step=4, recon_weight_iters=1, recon_act_iters=1, recon_batch_size=4,
                              memory_budget_mb=budget)
    with AnonymousMemoryPeak(interval_s=0.002) as peak:
        calibration = collect_calibration(unet, fashion_ddpm_scheduler(), trajectories, SamplerConfig(steps=4),
                                          interval_length=2, batch_size=8, progress=False, conditioning=conditioning,
                                          memory_budget_mb=budget, spill_dir=sys.argv[1])
        units = quantize(unet, config, calibration, progress=False).tfmq_info.method_results["reconstruction"]
    set_bytes = sum(t.numel() * t.element_size() for t in [calibration.samples, *calibration.conditions.values()])
    return {{"growth_mb": peak.growth_mb, "set_mb": set_bytes / 2**20, "spilled": calibration.spill is not None,
             "units_on_disk": sum(unit["on_disk"] for unit in units)}}

run(1, 4096.0)  # imports and first calls: not what is measured
results = []
for trajectories, budget in {RUNS}:
    gc.collect()
    results.append(run(trajectories, budget))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], Path]:
    spill = tmp_path_factory.mktemp("spill")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # freed tensors go back to the system, not to a heap that stays
    finished = subprocess.run([sys.executable, "-c", BUDGETED_RUNS, str(spill)], capture_output=True, text=True,
                              cwd=ROOT, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1]), spill


def test_the_budget_holds_while_the_calibration_set_grows_8x(runs) -> None:
    (small, large, _), spill = runs
    assert large["set_mb"] == pytest.approx(8 * small["set_mb"]) and large["set_mb"] > 4 * BUDGET_MB
    assert large["spilled"] and large["units_on_disk"] > 0
    # The set grew by 28 MB; what the run holds grew by its budget (a unit cache kept in memory) and a batch.
    assert large["growth_mb"] - small["growth_mb"] < 2 * BUDGET_MB
    assert list(spill.iterdir()) == []  # every spill folder went with its set


def test_without_the_budget_the_large_set_sits_in_memory(runs) -> None:
    (small, large, unbounded), _ = runs
    assert not unbounded["spilled"] and unbounded["units_on_disk"] == 0
    assert unbounded["growth_mb"] - small["growth_mb"] > unbounded["set_mb"] - small["set_mb"]
