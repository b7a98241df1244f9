from __future__ import annotations

import torch

from tfmq.quant.methods.capture import inputs_of_samples


def test_inputs_of_samples_cut_the_batches_to_a_shard_and_keep_static_values() -> None:
    batches = [{"sample": torch.arange(start, start + 3), "timestep": torch.tensor(7), "flag": True}
               for start in (0, 3, 6)]
    shard = inputs_of_samples(batches, range(2, 7))
    assert [batch["sample"].tolist() for batch in shard] == [[2], [3, 4, 5], [6]]
    assert shard[1] is batches[1]  # a whole batch is passed as it is
    assert all(batch["timestep"] == 7 and batch["flag"] is True for batch in shard)
    assert inputs_of_samples(batches, range(0, 0)) == []
    assert [len(batch["sample"]) for batch in inputs_of_samples(batches, range(0, 9))] == [3, 3, 3]
