"""Two processes (gloo on the CPU) compute what one process computes: calibration sets bit for bit, evaluation
images bit for bit, reconstructed parameters within float rounding; only rank 0 writes; ranks that disagree
stop with one line.

Two forked ranks run every scenario (`_worker`) in one go; the tests compare what each rank saved with the
same work done here in one process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import DDPMPipeline

from tests.quant.methods.helpers import calibrated, input_batches
from tests.quant.tiny_unets import class_unet, one_thread, pixel_unet
from tests.test_cli import interrupted, sampled_batches
from tfmq import cli, distributed
from tfmq.errors import TfmqError
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.quant.config import QDiffusionConfig
from tfmq.quant.methods.adaround import adaptive_rounding
from tfmq.quant.methods.capture import capture, inputs_of_samples
from tfmq.quant.methods.reconstruction import _UnitData
from tfmq.quant.methods.units import unet_units
from tfmq.sampling import Conditioning, SamplerConfig, sample

WORLD = 2
SCHEDULER = fashion_ddpm_scheduler()
SAMPLER = SamplerConfig(steps=4, eta=0.5)  # eta > 0: every step draws from the images' own generators
RECONSTRUCTION = QDiffusionConfig(w_bits=4, a_bits=8, recon_weight_iters=12, recon_act_iters=6,
                                  recon_batch_size=4)
EARLY_UNITS = 5  # the first units of the tiny model: no weight of theirs ends at AdaRound's threshold
SAMPLE_ARGS = ["--num", "3", "--steps", "3", "--batch-size", "1", "--device", "cpu", "--quiet"]
QUANTIZE_ARGS = ["--method", "rtn", "--calib-samples", "2", "--steps", "3", "--batch-size", "1", "--device", "cpu",
                 "--quiet"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _guided_calibration() -> CalibrationSet:
    """3 class-conditional trajectories, one per batch, both guidance branches recorded: rank 0 samples one
    batch, rank 1 two."""
    conditioning = Conditioning({"class_labels": torch.tensor([0, 1, 2])}, {"class_labels": torch.tensor([3])},
                                guidance_scale=2.0)
    return collect_calibration(class_unet(), SCHEDULER, 3, SAMPLER, interval_length=2, batch_size=1,
                               progress=False, conditioning=conditioning)


def _calibration_tensors(calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    return {"samples": calibration.samples, "timesteps": calibration.timesteps,
            "step_indices": calibration.step_indices, "schedule": calibration.schedule,
            **{f"condition.{key}": value for key, value in calibration.conditions.items()}}


def _images() -> dict[str, torch.Tensor]:
    """5 images in batches of 2 (rank 0 one batch, rank 1 two), and 1 image (rank 0 samples nothing)."""
    unet = pixel_unet(channels=1)
    return {"five": sample(unet, SCHEDULER, 5, seed=3, config=SAMPLER, batch_size=2, progress=False),
            "one": sample(unet, SCHEDULER, 1, seed=3, config=SAMPLER, batch_size=2, progress=False)}


def _rounding_gradients() -> list[list[torch.Tensor]]:
    """The gradients of a resnet unit's AdaRound variables on two batches of its 6 samples (rank 0 holds 0-2,
    rank 1 holds 3-5; no sample of the second batch is on rank 1), summed over the ranks."""
    unet = pixel_unet()
    batches = input_batches(unet, 3, 2, seed=0)  # the ranks' shards cut the middle batch
    model = calibrated(unet, RECONSTRUCTION, batches)
    unit = next(unit for unit in unet_units(model, unet, batches[0]) if unit.name == "mid_block.resnets.0")
    held = distributed.shard(6)
    cache, templates = capture(unit, model, unet, inputs_of_samples(batches, held), budget_bytes=float("inf"))
    gradients = []
    with cache, adaptive_rounding(unit.layers) as roundings:
        data = _UnitData(unit, cache, templates, seed=0, total=6, held=held)
        parameters = [rounding.rounding for rounding in roundings]
        for indices in ([5, 0, 2, 3], [1, 0]):
            for parameter in parameters:
                parameter.grad = None
            loss = data.loss(torch.tensor(indices))
            if loss is not None:
                loss.backward()
            distributed.all_reduce_gradients(parameters)
            gradients.append([parameter.grad.clone() for parameter in parameters])
    return gradients


def _reconstructed() -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """qdiff on 6 weight samples (3 on each rank), batches of 4: the learnt state and each unit's record."""
    unet = pixel_unet()
    calibration = collect_calibration(unet, SCHEDULER, 3, SAMPLER, interval_length=2, batch_size=3, progress=False)
    model = quantize(unet, RECONSTRUCTION, calibration, progress=False)
    return ({key: value.clone() for key, value in model.state_dict().items()},
            model.tfmq_info.method_results["reconstruction"])


class _Writes:
    """Every file or folder this process creates, renames or removes under `root`, from Python's audit events."""

    EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.paths: list[str] = []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            _, mode, flags = args
            if not (mode and any(letter in mode for letter in "wax+")) and not flags & self.WRITE_FLAGS:
                return
        elif event not in self.EVENTS:
            return
        path = args[0]
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(self.root + os.sep):
            self.paths.append(os.path.relpath(path, self.root))


def _cli(*argv: str) -> tuple[int, str]:
    """tfmq's exit code and stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(arg) for arg in argv])
    return code, stderr.getvalue()


def _refuse() -> None:
    raise TfmqError("rank 0 refuses")


def _worker(rank: int, port: int, model_folder: Path, root: Path, results: Path) -> None:
    """One rank: the library scenarios in a process group, then the CLI's (which finds the group set up)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        result: dict[str, Any] = {"shards": [distributed.shard(count) for count in (0, 1, 5)]}
        result["calibration"] = _calibration_tensors(_guided_calibration())
        result["images"] = _images()
        result["gradients"] = _rounding_gradients()
        unused, one_sided = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        one_sided.grad = torch.full((2,), float(rank))  # a gradient on rank 1 only
        distributed.all_reduce_gradients([unused, one_sided])
        result["missing_gradients"] = (unused.grad, one_sided.grad)
        result["state"], result["reconstruction"] = _reconstructed()
        try:
            distributed.check_same_on_all_ranks({"w_bits": 4 + rank}, "the quantization config")
        except TfmqError as error:
            result["disagreement"] = str(error)
        result["on_main"] = distributed.on_main(distributed.rank)
        try:
            distributed.on_main(_refuse)
        except TfmqError as error:
            result["on_main_error"] = str(error)
        writes = _Writes(root)
        result["sample"] = _cli("sample", "--model", model_folder, "--out", root / "images", *SAMPLE_ARGS)
        with pytest.MonkeyPatch.context() as patch:
            result["resumed_batches"] = sampled_batches(patch)
            result["resumed"] = _cli("sample", "--model", model_folder, "--out", root / "resumed", *SAMPLE_ARGS)
        result["quantize"] = _cli("quantize", "--model", model_folder, "--out", root / "q",
                                  "--calib-save", root / "calibration.safetensors", *QUANTIZE_ARGS)
        result["bad_quantize"] = _cli("quantize", "--model", model_folder, "--out", root / "bad",
                                      "--w-bits", str(4 + rank), *QUANTIZE_ARGS)
        result["writes"] = writes.paths
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, results / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-ddpm"
    DDPMPipeline(unet=pixel_unet(channels=1), scheduler=SCHEDULER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, model_folder: Path) -> dict[str, Any]:
    """What each of two ranks computed and wrote: {"ranks": [rank 0's results, rank 1's], "root": outputs}."""
    root, results = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("results")
    with one_thread():  # the ranks continue this run: its first batch is kept, then Ctrl-C
        assert interrupted(lambda: _cli("sample", "--model", model_folder, "--out", root / "resumed",
                                        *SAMPLE_ARGS)[0], after=1) == 130
    # forked: the ranks start with the modules imported here, in no time
    mp.start_processes(_worker, args=(_free_port(), model_folder, root, results), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(results / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    return {"ranks": ranks, "root": root}


def test_one_process_takes_the_fast_path() -> None:
    assert not distributed.is_active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.shard(7) == range(7)
    tensors = {"images": torch.ones(2, 3)}
    assert distributed.gather_rows(tensors)["images"] is tensors["images"]
    distributed.check_same_on_all_ranks(object(), "anything")
    parameter = torch.nn.Parameter(torch.ones(3))
    distributed.all_reduce_gradients([parameter])
    assert parameter.grad is None


def test_ranks_share_out_a_range_in_order(two_ranks: dict) -> None:
    shards = [result["shards"] for result in two_ranks["ranks"]]
    assert shards[0] == [range(0, 0), range(0, 0), range(0, 2)]
    assert shards[1] == [range(0, 0), range(0, 1), range(2, 5)]


def test_two_ranks_record_the_calibration_set_of_one_process_bit_for_bit(two_ranks: dict) -> None:
    with one_thread():
        expected = _calibration_tensors(_guided_calibration())
    assert expected["condition.class_labels"].unique().tolist() == [0, 1, 2, 3]  # both branches
    for result in two_ranks["ranks"]:
        assert result["calibration"].keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(result["calibration"][key], tensor), key


def test_two_ranks_sample_the_images_of_one_process(two_ranks: dict) -> None:
    with one_thread():
        expected = _images()
    for result in two_ranks["ranks"]:
        for key, images in expected.items():
            assert torch.equal(result["images"][key], images), key


def test_summed_shares_of_a_batch_give_the_gradient_of_the_whole_batch(two_ranks: dict) -> None:
    with one_thread():
        expected = _rounding_gradients()
    for result in two_ranks["ranks"]:
        for got, want in zip(result["gradients"], expected, strict=True):
            for got_layer, want_layer in zip(got, want, strict=True):
                torch.testing.assert_close(got_layer, want_layer, rtol=1e-5, atol=1e-9)
        unused, one_sided = result["missing_gradients"]
        assert unused is None and torch.equal(one_sided, torch.ones(2))


def test_two_ranks_reconstruct_the_parameters_of_one_process(two_ranks: dict) -> None:
    """Equal on every rank. Against one process, equal up to float rounding, which can flip AdaRound's hard
    decision where a soft value ends at the threshold (one thread against two flips as many): the first
    units agree to float precision; later, a few weights are one grid step apart and the units that read
    them come out a little apart."""
    with one_thread():
        expected_state, expected_records = _reconstructed()
    first, second = two_ranks["ranks"]
    assert first["state"].keys() == second["state"].keys() == expected_state.keys()
    untimed = [[{**record, "seconds": None, "capture_seconds": None} for record in result["reconstruction"]]
               for result in (first, second)]
    assert untimed[0] == untimed[1]  # the global figures, on every rank
    early = tuple(record["name"] + "." for record in expected_records[:EARLY_UNITS])
    flipped = weights = 0
    for key, tensor in expected_state.items():
        got = first["state"][key]
        assert torch.equal(got, second["state"][key]), key  # the same steps on every rank
        if key.startswith(early):
            torch.testing.assert_close(got, tensor, rtol=1e-4, atol=1e-6, msg=key)
        grid = expected_state.get(key.removesuffix("weight") + "weight_quantizer.scale")
        if grid is not None:
            apart = (got - tensor).abs().flatten(1)
            flipped, weights = flipped + int((apart > 1e-5).sum()), weights + tensor.numel()
            assert (apart <= 1.01 * grid.reshape(-1, 1)).all(), key  # at most one grid step
    assert flipped <= 0.01 * weights
    for index, (got, want) in enumerate(zip(first["reconstruction"], expected_records, strict=True)):
        assert (got["name"], got["samples"]) == (want["name"], want["samples"]) and want["samples"] == 6
        tolerance = 1e-4 if index < EARLY_UNITS else 0.1
        assert got["mse_before"] == pytest.approx(want["mse_before"], rel=tolerance)
        assert got["mse_after"] == pytest.approx(want["mse_after"], rel=tolerance)


def test_ranks_that_disagree_stop_with_one_line(two_ranks: dict) -> None:
    messages = {result["disagreement"] for result in two_ranks["ranks"]}
    assert messages == {"the 2 processes disagree on the quantization config: rank 1 differs from rank 0; "
                        "start every rank with the same arguments and files"}
    for result in two_ranks["ranks"]:
        code, stderr = result["bad_quantize"]
        assert code == 2
        assert stderr.count("\n") == 1 and "disagree on the command line: rank 1 differs" in stderr
    assert not (two_ranks["root"] / "bad").exists()


def test_what_rank_zero_finds_reaches_every_rank(two_ranks: dict) -> None:
    for result in two_ranks["ranks"]:
        assert result["on_main"] == 0 and result["on_main_error"] == "rank 0 refuses"


def test_only_rank_zero_writes(two_ranks: dict) -> None:
    first, second = two_ranks["ranks"]
    assert [first[command][0] for command in ("sample", "quantize")] == [0, 0]
    assert [second[command][0] for command in ("sample", "quantize")] == [0, 0]
    assert second["writes"] == []
    written = {Path(path).parts[0] for path in first["writes"]}
    assert any(name.startswith(".images") for name in written)  # the staging folder swapped in
    assert any(name.startswith(".q") for name in written) and any("calibration" in name for name in written)
    root = two_ranks["root"]
    assert (root / "q").is_dir() and CalibrationSet.load(root / "calibration.safetensors")


def _image_folder(folder: Path) -> dict[str, bytes]:
    """The files of an image folder; samples.json without its timing."""
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "samples.json"}
    metadata = json.loads((folder / "samples.json").read_text())
    metadata.pop("seconds", None)
    files["samples.json"] = json.dumps(metadata, sort_keys=True).encode()
    return files


def test_cli_sample_on_two_ranks_writes_the_images_of_one_process(two_ranks: dict, model_folder: Path,
                                                                   tmp_path: Path) -> None:
    with one_thread():
        assert _cli("sample", "--model", model_folder, "--out", tmp_path / "one", *SAMPLE_ARGS)[0] == 0
    assert _image_folder(two_ranks["root"] / "images") == _image_folder(tmp_path / "one")


def test_two_ranks_continue_an_interrupted_run_sampling_only_the_missing_batches(two_ranks: dict, model_folder: Path,
                                                                                 tmp_path: Path) -> None:
    with one_thread():
        assert _cli("sample", "--model", model_folder, "--out", tmp_path / "one", *SAMPLE_ARGS)[0] == 0
    first, second = two_ranks["ranks"]
    assert first["resumed"][0] == second["resumed"][0] == 0
    assert (first["resumed_batches"], second["resumed_batches"]) == ([range(1, 2)], [range(2, 3)])
    assert _image_folder(two_ranks["root"] / "resumed") == _image_folder(tmp_path / "one")
    assert not (two_ranks["root"] / "resumed.tfmq-progress").exists()


@pytest.mark.slow  # three fresh interpreters importing torch: 35 s on 2 cores
def test_torchrun_runs_tfmq_sample(model_folder: Path, tmp_path: Path) -> None:
    """The launcher's own environment (RANK, WORLD_SIZE, MASTER_PORT) is all the CLI needs. `--` keeps torchrun
    from reading tfmq's flags (it takes --num for an abbreviation of its --numa-binding)."""
    with one_thread():
        assert _cli("sample", "--model", model_folder, "--out", tmp_path / "one", *SAMPLE_ARGS)[0] == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "tfmq.cli", "--", "sample", "--model", str(model_folder), "--out", str(tmp_path / "two"),
               *SAMPLE_ARGS]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.count("images in") == 1  # rank 0 alone reports
    assert _image_folder(tmp_path / "two") == _image_folder(tmp_path / "one")
