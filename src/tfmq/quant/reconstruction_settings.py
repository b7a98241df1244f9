"""How long and how fast a reconstruction unit is optimised: the settings a QDiffusionConfig (and TFMQ's
TIAR) resolves to, the held-out rounding checks, and the named presets. Free of torch, as the configs are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReconstructionSettings:
    """How long and how fast each reconstruction unit is optimised (resolved from a QDiffusionConfig).

    `weight_iters` AdaRound steps, then `act_iters` LSQ steps on the activation step sizes, each on
    random batches of `batch_size` cached calibration samples. Cached unit inputs and targets larger
    than `memory_budget_mb` go to a temporary folder on disk instead of memory (as the calibration set
    does beyond it, `tfmq.quant.calibration`); a budget below one batch of a unit's data is an error.
    `rounding_stop` checks a unit's AdaRound decisions on held-out samples (None: no checks); `rounding_start`
    is "nearest" (AdaRound's own start) or "gptq" (from GPTQ's rounding where it measures better,
    `tfmq.quant.methods.gptq`).
    """

    weight_iters: int
    act_iters: int
    batch_size: int
    weight_lr: float
    act_lr: float
    memory_budget_mb: float
    rounding_stop: RoundingStop | None = None
    rounding_start: str = "nearest"


@dataclass(frozen=True)
class RoundingStop:
    """Held-out checks of a unit's AdaRound decisions: the best are kept, and a stall may end the steps early.

    Every `check_every` steps the unit's loss with its weights rounded hard is measured on `holdout_samples`
    calibration samples kept out of its training batches (at most a quarter of them; all of them when
    there are too few to hold any out), and the decisions of the best check are kept. The first check is
    at step 0 (round-to-nearest or the GPTQ start), so a unit never ends worse than that on its held-out
    samples. With `patience`, the rounding ends once that many checks in a row have not lowered the best
    loss so far by `tolerance` (relative): that can keep a unit near its start (README,
    "Calibration cost"); None runs every step.
    """

    check_every: int = 100
    patience: int | None = 3
    tolerance: float = 0.01
    holdout_samples: int = 128


# "paper": the Q-Diffusion / TFMQ-DM scripts (20k AdaRound and 5k LSQ steps a unit, batch 32, Adam at 1e-3
# on the rounding and 4e-5 on the step sizes). "fast": for a CPU, a hundredth of the steps, the rounding at
# ten times the learning rate (V lives in logit space: 200 steps of 1e-2 can flip a decision). The step
# sizes keep 4e-5: Adam moves every step by about lr whatever its size, and 50 steps of 4e-4 already
# wreck a softmax step of 1/255. "balanced": fast's settings with ten times its rounding steps (README,
# "Reconstruction length"). "auto": 1,300 rounding steps at balanced's rate on batches of 16, each step about
# half as costly: the regulariser anneals over many cheap steps, which fewer steps at a higher rate did not
# match (README, "Calibration cost").
ROUNDING_STARTS = ("nearest", "gptq")
RECON_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"weight_iters": 20_000, "act_iters": 5_000, "batch_size": 32, "weight_lr": 1e-3, "act_lr": 4e-5},
    "balanced": {"weight_iters": 2_000, "act_iters": 50, "batch_size": 32, "weight_lr": 1e-2, "act_lr": 4e-5},
    "fast": {"weight_iters": 200, "act_iters": 50, "batch_size": 32, "weight_lr": 1e-2, "act_lr": 4e-5},
    "auto": {"weight_iters": 1_300, "act_iters": 50, "batch_size": 16, "weight_lr": 1e-2, "act_lr": 4e-5},
}
# tfmq's blocks under a preset, where they differ from qdiff's: with `auto` 1,200 rounding steps (the output
# correction that `auto` turns on for tfmq takes off much of what the last steps gain) at 1e-1 (at 1e-2 too few
# decisions moved in them: each block ended with about 1.4x the error that `balanced`'s 2,000 at batch 32 leave;
# README, "Calibration cost").
TFMQ_BLOCK_PRESETS: dict[str, dict[str, Any]] = {"auto": {"weight_iters": 1_200, "weight_lr": 1e-1}}
# TIAR's unit under a preset, where it differs from the blocks': with `auto` batches of 128 at 1e-1 for 300
# steps, which reach the images of 1,300. 128 holds every timestep of a 50- or 100-step schedule, so a UNet's
# unit learns on its whole set each step; a DiT's has a sample per (timestep, label) pair, 1,100, and its
# modulation path at full batch took a quarter of the calibration.
TIAR_PRESETS: dict[str, dict[str, Any]] = {"auto": {"weight_iters": 300, "batch_size": 128, "weight_lr": 1e-1}}
