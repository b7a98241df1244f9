"""The process group of a run: several processes launched by `torchrun` share one run's work.

Every rank loads the same model and arguments; sampling (evaluation images and calibration trajectories)
splits its batches between the ranks and gathers the images, and block reconstruction splits each batch's
samples and sums the gradients, so N ranks compute what one process computes. The backend is gloo on the
CPU and nccl on CUDA. With one process no group is initialised and every function here returns at once, so
nothing changes for a single process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from argparse import Namespace
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tfmq.errors import TfmqError

# What torchrun sets in every process it starts.
WORLD_SIZE_VARIABLE = "WORLD_SIZE"
LOCAL_RANK_VARIABLE = "LOCAL_RANK"
Result = TypeVar("Result")


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run directly)."""
    value = os.environ.get(WORLD_SIZE_VARIABLE, "1")
    try:
        return int(value)
    except ValueError:
        raise TfmqError(f"{WORLD_SIZE_VARIABLE}={value!r} is not a process count") from None


def is_active() -> bool:
    """Whether this process shares its run with others (a process group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Whether this process writes the run's files and prints its results (rank 0)."""
    return rank() == 0


def rank_device(device: str | torch.device | None) -> torch.device:
    """The device this process computes on when the run names `device`: launched with several processes,
    "cuda" (and "auto" on a GPU machine) is this rank's own GPU, LOCAL_RANK; an explicit cuda:N stays."""
    from tfmq.devices import resolve_device

    resolved = resolve_device(device)
    if resolved.type != "cuda" or launched_world_size() <= 1 or ":" in str(device):
        return resolved
    return resolve_device(f"cuda:{os.environ.get(LOCAL_RANK_VARIABLE, '0')}")


def init_from_environment(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    nccl when the run computes on CUDA (each rank on its `rank_device`), gloo on the CPU. True if this call
    initialised the group; False with one process or a group already initialised by the caller."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    resolved = rank_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return True


@contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[torch.device]:
    """The run's process group from the environment for the duration of the block (nothing with one
    process); yields the device this rank computes on."""
    started = init_from_environment(device)
    try:
        yield rank_device(device)
    finally:
        if started:
            dist.destroy_process_group()


@contextmanager
def launched_command(arguments: Namespace, commands: Collection[str]) -> Iterator[None]:
    """A CLI command's share of a torchrun launch for the block: the process group joined, every rank
    checked to have the same command line, and `arguments.device` set to this rank's device. With one
    process, nothing; a command outside `commands` (those that shard their work) is refused."""
    if launched_world_size() <= 1:
        yield
        return
    if arguments.command not in commands:
        raise TfmqError(f"tfmq {arguments.command} runs in one process: start it without torchrun")
    with process_group(arguments.device) as device:
        check_same_on_all_ranks({key: value for key, value in vars(arguments).items() if key != "func"},
                                "the command line")
        arguments.device = str(device)  # --device cuda: this rank's GPU
        yield


def on_main(work: Callable[[], Result]) -> Result:
    """`work()` done by rank 0 alone, its result (or its error, as a one-line TfmqError) handed to every
    rank: for what only the writer can see, such as what its output folders already hold."""
    if not is_active():
        return work()
    payload: list[Any] = [None]
    failure: Exception | None = None
    if is_main():
        try:
            payload = [(work(), None)]
        except Exception as exc:  # the other ranks must not wait in the broadcast for a result never sent
            failure, payload = exc, [(None, str(exc) or type(exc).__name__)]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    result, error = payload[0]
    if error is not None:
        raise TfmqError(error)
    return result


def shard(count: int) -> range:
    """This rank's contiguous share of range(count); the shares of the ranks in order make up the range and
    differ in size by one at most."""
    world, index = world_size(), rank()
    return range(index * count // world, (index + 1) * count // world)


def _collective_device() -> torch.device:
    """Where the backend wants the tensors it exchanges: this rank's GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's tensors of each name concatenated along dim 0 in rank order, on every rank (on the CPU).

    A rank with nothing to give passes {}. Rows travel as raw bytes, so the result is bit for bit what the
    ranks hold, whatever the dtype. With one process it returns `tensors` as they are.
    """
    if not is_active():
        return dict(tensors)
    layouts: list[dict[str, tuple[tuple[int, ...], torch.dtype]] | None] = [None] * world_size()
    dist.all_gather_object(layouts, {key: (tuple(value.shape), value.dtype) for key, value in tensors.items()})
    device = _collective_device()
    gathered = {}
    for key in dict.fromkeys(key for layout in layouts for key in layout):
        shape, dtype = next(layout[key] for layout in layouts if key in layout)
        counts = [layout[key][0][0] if key in layout else 0 for layout in layouts]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        mine = tensors.get(key, torch.empty((0, *shape[1:]), dtype=dtype, device="cpu"))
        rows = mine.detach().contiguous().reshape(len(mine), math.prod(shape[1:])).view(torch.uint8).to(device)
        padded = torch.zeros((max(counts), row_bytes), dtype=torch.uint8, device=device)
        padded[:len(rows)] = rows
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded)
        raw = torch.cat([piece[:count] for piece, count in zip(pieces, counts)]).cpu()
        gathered[key] = raw.view(dtype).reshape(sum(counts), *shape[1:])
    return gathered


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over the ranks, on every rank (on `values`' device); `values` with one process."""
    if not is_active():
        return values
    total = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(values.device)


def all_reduce_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of `parameters` over the ranks, so every rank takes the same optimizer step.

    A rank that computed no gradient for a parameter counts zero; a parameter no rank has a gradient for
    keeps None (an optimizer skips it, as it would with one process).
    """
    if not is_active():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for parameter in parameters:
        by_dtype.setdefault(parameter.dtype, []).append(parameter)
    device = _collective_device()
    for dtype, group in by_dtype.items():
        # each parameter's gradient (or zeros), then one flag per parameter: whether this rank has a gradient
        flat = torch.cat([
            *((torch.zeros(p.numel(), dtype=dtype, device=device) if p.grad is None else p.grad.detach().reshape(-1)).to(device)
              for p in group),
            torch.tensor([float(p.grad is not None) for p in group], dtype=dtype, device=device),
        ])
        dist.all_reduce(flat)
        offset = 0
        for parameter in group:
            gradient = flat[offset:offset + parameter.numel()].view_as(parameter).to(parameter.device)
            offset += parameter.numel()
            if parameter.grad is None:
                parameter.grad = gradient.clone()
            else:
                parameter.grad.copy_(gradient)
        for parameter, present in zip(group, flat[offset:].tolist()):
            if present == 0:
                parameter.grad = None


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """Refuse a run whose ranks were started with different `value`s (JSON-ready: a config's dict, a model
    fingerprint): they would compute pieces of different runs. Every rank raises the same one-line TfmqError."""
    if not is_active():
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    differing = [index for index, other in enumerate(digests) if other != digests[0]]
    if differing:
        ranks = f"rank {differing[0]} differs" if len(differing) == 1 else \
            f"ranks {', '.join(str(index) for index in differing)} differ"
        raise TfmqError(f"the {len(digests)} processes disagree on {what}: {ranks} from rank 0; "
                        "start every rank with the same arguments and files")
