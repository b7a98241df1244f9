import torch
from torch import nn

from tfmq.models.training import TrainingRun, run_training


def _train(work_dir, steps: int, exported: dict) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))

    def step_loss(step: int) -> torch.Tensor:  # data drawn from the step number, as the trainers do
        batch = data[torch.randperm(64, generator=torch.Generator().manual_seed(step))[:8]]
        return (model(batch) - batch.sum(1, keepdim=True)).pow(2).mean()

    def export(emas, step, seconds):
        exported[step] = {name: ema.weight.clone() for name, ema in emas.items()}

    # warm-up 2 steps: the first 3 steps' learning rates do not depend on the total
    run = TrainingRun("toy", work_dir, steps=steps, learning_rate=1e-2, warmup=2, checkpoint_every=3, export_every=3)
    run_training(run, {"toy": model}, step_loss, export)
    return model


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight, resumed = {}, {}
    whole = _train(tmp_path / "a", 6, straight)
    _train(tmp_path / "b", 3, resumed)  # stops after its checkpoint at step 3
    again = _train(tmp_path / "b", 6, resumed)
    assert torch.equal(whole.weight, again.weight)
    assert torch.equal(straight[6]["toy"], resumed[6]["toy"])
    assert sorted(straight) == [3, 6]
