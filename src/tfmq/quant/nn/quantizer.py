"""Uniform affine fake quantization with a learnable step size (LSQ) and range initialisation.

`q = clamp(round(x / s) + z, 0, 2^b - 1)`, `x^ = (q - z) * s`. Rounding passes gradients straight
through, so both the input and the step `s` receive gradients: reconstruction can train either.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq.quant.config import RANGE_INITS
from tfmq.quant.nn.step_table import StepRows, selected_rows

QUANTIZER_BITS = range(2, 17)
# Clipping candidates of the MSE search: the observed range shrunk by 1 - i * MSE_SHRINK_STEP,
# i < MSE_NUM_CANDIDATES (down to 21 % of the range), scored by the mean |x - x^|^MSE_ERROR_POWER.
# The values of the TFMQ-DM authors' scripts.
MSE_NUM_CANDIDATES = 80
MSE_SHRINK_STEP = 0.01
MSE_ERROR_POWER = 2.4
# Activation values kept (a uniform random sample over all calibration batches) for the MSE search.
OBSERVED_SAMPLE_SIZE = 1 << 16
# Candidates x values scored at once by the MSE search (bounds its temporary memory to ~16 MB).
SEARCH_CHUNK_ELEMENTS = 1 << 22
# Floor of the step size: a constant (e.g. all-zero) channel must not divide by zero.
MIN_SCALE = 1e-8


def round_ste(values: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (the straight-through estimator)."""
    return values + (torch.round(values) - values).detach()


def range_to_scale_zero_point(
    low: torch.Tensor, high: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point of a `bits`-bit grid covering [low, high], widened to contain 0.

    Zero must be exactly representable: zero padding and ReLU/SiLU zeros stay exact.
    """
    low = low.clamp(max=0.0)
    high = high.clamp(min=0.0)
    scale = ((high - low) / (2**bits - 1)).clamp_min(MIN_SCALE)
    return scale, torch.round(-low / scale)


def quantize_codes(
    values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """The integer codes q (as floats), with the straight-through gradient of rounding."""
    return torch.clamp(round_ste(values / scale) + zero_point, 0, 2**bits - 1)


def _fake_quantized(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """`(quantize_codes(...) - zero_point) * scale` without a gradient: the same values from one new tensor
    worked on in place, which is most of a quantizer's cost per call at small batches."""
    codes = torch.div(values, scale)
    return codes.round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)


def search_range(
    rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range per row of `rows` (channels x values), starting from the observed [low, high].

    "minmax" keeps the observed range; "mse" tries shrunken ranges and keeps, per row, the one with
    the lowest Lp error, trading clipped outliers for a finer grid on the bulk of the values.
    "symmetric" is "mse" on a grid centred on zero: zero point 2^(b-1), so that the codes less it are signed
    b-bit integers and 8-bit weights run on integer engines as exact int8 (`tfmq.export.qdq.WeightCodes`).
    Candidates are scored in chunks, several at once, to keep the op count low on small layers.
    """
    if method == "minmax":
        return low, high
    if method == "symmetric":
        half = 2 ** (bits - 1)
        high = torch.maximum(low.abs(), high.abs())
        low = -high * half / (half - 1)
    factors = 1.0 - torch.arange(MSE_NUM_CANDIDATES, device=rows.device) * MSE_SHRINK_STEP
    best_error = torch.full_like(low, float("inf"))
    best_factor = torch.ones_like(low)
    chunk = max(1, SEARCH_CHUNK_ELEMENTS // rows.numel())
    with torch.no_grad():
        for start in range(0, MSE_NUM_CANDIDATES, chunk):
            chunk_factors = factors[start : start + chunk, None]
            scale, zero_point = range_to_scale_zero_point(low * chunk_factors, high * chunk_factors, bits)
            scale, zero_point = scale[..., None], zero_point[..., None]
            codes = torch.clamp(torch.round(rows / scale) + zero_point, 0, 2**bits - 1)
            error = ((codes - zero_point) * scale - rows).abs().pow(MSE_ERROR_POWER).mean(dim=-1)
            chunk_error, best_index = error.min(dim=0)
            better = chunk_error < best_error
            best_error = torch.where(better, chunk_error, best_error)
            best_factor = torch.where(better, chunk_factors[best_index, 0], best_factor)
    return low * best_factor, high * best_factor


class _Observation:
    """Running min/max and a uniform random sample of everything a quantizer saw while calibrating.

    The sample is a bottom-k sample: each value gets a random key and the values with the smallest
    keys over all batches are kept, so every value seen has the same chance to be in it. Without
    `keep_sample` only the min/max is tracked (all a min-max range needs).
    """

    def __init__(self, device: torch.device, keep_sample: bool = True) -> None:
        self.keep_sample = keep_sample
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.values = torch.empty(0, device=device)
        self.keys = torch.empty(0, device=device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.detach().flatten().float()
        batch_low, batch_high = batch.min(), batch.max()
        self.low = batch_low if self.low is None else torch.minimum(self.low, batch_low)
        self.high = batch_high if self.high is None else torch.maximum(self.high, batch_high)
        if not self.keep_sample:
            return
        keys = torch.rand(batch.numel(), generator=self.generator, device=batch.device)
        if self.values.numel() + batch.numel() > OBSERVED_SAMPLE_SIZE:
            batch, keys = self._candidates(batch, keys)
        values = torch.cat([self.values, batch])
        keys = torch.cat([self.keys, keys])
        if values.numel() > OBSERVED_SAMPLE_SIZE:
            kept = torch.topk(keys, OBSERVED_SAMPLE_SIZE, largest=False, sorted=False).indices
            values, keys = values[kept], keys[kept]
        self.values, self.keys = values, keys

    def sample(self) -> torch.Tensor:
        """The kept values in the order of their keys: the same values in the same order whatever the batches."""
        return self.values[self.keys.argsort(stable=True)]

    def _candidates(self, batch: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of `batch` that may be among the kept ones (a superset of them): below the largest kept
        key once the sample is full, and below a bound that about twice the sample's size of uniform keys pass
        (all of them where fewer pass). Selecting them costs far less than ranking the whole batch."""
        full = self.values.numel() == OBSERVED_SAMPLE_SIZE
        limit = self.keys.max() if full else keys.new_tensor(1.0)
        bound = torch.minimum(limit, keys.new_tensor(2 * OBSERVED_SAMPLE_SIZE / batch.numel()))
        passing = keys < bound
        if bool(bound < limit) and int(passing.sum()) < OBSERVED_SAMPLE_SIZE:
            passing = keys < limit  # too few under the bound: all that the limit lets through
        return batch[passing], keys[passing]


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake quantizer, per tensor or per channel along axis 0.

    The step `scale` is an `nn.Parameter` (LSQ); `zero_point` and `initialized` are buffers, all
    registered with their final shapes so a freshly built quantizer loads a saved state exactly.
    `bits=None` makes the quantizer the identity (full precision).

    A per-tensor quantizer can carry a timestep table instead (finite-set calibration, see
    `tfmq.quant.timestep_table`): one step and zero point per sampling timestep, buffers `table_scale`,
    `table_zero_point` and `table_initialized`, read at the row that the model's `step_rows` holds for the
    call (`tfmq.quant.nn.step_table`). The shared `scale` is then not used; a table without a selected row
    is an error, never a fallback to it.
    """

    def __init__(self, bits: int | None, *, channels: int | None = None, init: str = "mse",
                 device: torch.device | None = None) -> None:
        super().__init__()
        if bits is not None and (isinstance(bits, bool) or bits not in QUANTIZER_BITS):
            raise ValueError(f"bits must be an int in 2..16 or None, got {bits!r}")
        if init not in RANGE_INITS:
            raise ValueError(f"init must be one of {', '.join(RANGE_INITS)}; got {init!r}")
        self.bits = bits
        self.channels = channels
        self.init = init
        self.enabled = True
        self._observation: _Observation | None = None
        # Python mirrors of `initialized` and of a complete `table_initialized`, read on every call instead
        # of the buffers (reading a GPU buffer would wait for the device); True once seen True.
        self._range_known = False
        self._table_complete = False
        size = 1 if channels is None else channels
        self.scale = nn.Parameter(torch.ones(size, device=device))
        self.register_buffer("zero_point", torch.zeros(size, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        # None until enable_timestep_table(): absent from the state_dict of a quantizer without a table.
        self.register_buffer("table_scale", None)
        self.register_buffer("table_zero_point", None)
        self.register_buffer("table_initialized", None)
        self.step_rows: StepRows | None = None

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    @property
    def observing(self) -> bool:
        return self._observation is not None

    @property
    def has_timestep_table(self) -> bool:
        return self.table_scale is not None

    def extra_repr(self) -> str:
        granularity = f"channels={self.channels}" if self.per_channel else "per_tensor"
        table = f", timestep_rows={len(self.table_scale)}" if self.has_timestep_table else ""
        return f"bits={self.bits}, {granularity}, init={self.init}, enabled={self.enabled}{table}"

    def enable_timestep_table(self, rows: int, step_rows: StepRows) -> None:
        """Give this quantizer `rows` ranges, one per sampling timestep, all still uncalibrated, read at the
        rows of `step_rows` (the model's)."""
        if self.per_channel:
            raise ValueError("timestep tables are for per-tensor activation quantizers, this one is per channel")
        if self.bits is None:
            raise ValueError("a full-precision quantizer (bits=None) has no range to tabulate")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"a timestep table needs a positive number of rows, got {rows!r}")
        if self.has_timestep_table:
            raise ValueError(f"this quantizer already has a timestep table of {len(self.table_scale)} rows")
        device = self.scale.device
        self.table_scale = torch.ones(rows, device=device)
        self.table_zero_point = torch.zeros(rows, device=device)
        self.table_initialized = torch.zeros(rows, dtype=torch.bool, device=device)
        self._table_complete = False
        self.step_rows = step_rows

    def set_table_range(self, row: int, low: torch.Tensor, high: torch.Tensor) -> None:
        """Fix the grid of timestep row `row` to cover [low, high]."""
        self.set_table_ranges(torch.tensor([row], device=low.device), low.reshape(1), high.reshape(1))

    def set_table_ranges(self, rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
        """Fix the grid of each timestep row of `rows` (int64, (n,)) to cover its [low, high] ((n,) each)."""
        if not self.has_timestep_table:
            raise RuntimeError("set_table_ranges() on a quantizer without a timestep table")
        scale, zero_point = range_to_scale_zero_point(low, high, self.bits)
        with torch.no_grad():
            self.table_scale[rows] = scale
            self.table_zero_point[rows] = zero_point
            self.table_initialized[rows] = True

    def table_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) of every timestep row's grid: the range each row covers, (rows,) each."""
        if not self.has_timestep_table:
            raise RuntimeError("table_ranges() on a quantizer without a timestep table")
        low = -self.table_zero_point * self.table_scale
        return low, low + (2**self.bits - 1) * self.table_scale

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._range_known = self._table_complete = False  # the loaded buffers say again

    def has_range(self) -> bool:
        """Whether the grid is set (by an init, a calibration or a loaded state)."""
        self._range_known = self._range_known or bool(self.initialized)
        return self._range_known

    def _broadcast(self, param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return param.view(-1, *([1] * (like.dim() - 1)))
        return param

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Fix the grid to cover [low, high] (one value per channel, or one for the tensor)."""
        scale, zero_point = range_to_scale_zero_point(low, high, self.bits)
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
            self.initialized.fill_(True)

    def init_range(self, values: torch.Tensor) -> None:
        """Set the range from one tensor seen whole (a weight), by this quantizer's init method."""
        if self.bits is None:
            return
        values = values.detach().float()
        rows = values.reshape(values.shape[0] if self.per_channel else 1, -1)
        low, high = rows.min(dim=1).values, rows.max(dim=1).values
        self.set_range(*search_range(rows, low, high, self.bits, self.init))

    def start_observing(self, keep_sample: bool = True) -> None:
        """Calibration mode: the forward pass records its inputs and returns them unchanged.

        `keep_sample=False` records only the min/max, for a caller that wants nothing else.
        """
        if self.per_channel:
            raise RuntimeError("observation covers whole tensors; use init_range for per-channel quantizers")
        if self.bits is not None:
            self._observation = _Observation(self.scale.device, keep_sample)

    def observe(self, values: torch.Tensor) -> None:
        """Record one batch (the forward pass does this by itself while observing)."""
        if self._observation is None:
            raise RuntimeError("observe() called outside calibration: call start_observing() first")
        self._observation.update(values)

    def cancel_observing(self) -> None:
        """Leave calibration mode without touching the range."""
        self._observation = None

    def take_observed_range(self, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Leave calibration mode and return the clipping range (low, high) of everything observed, by
        `method` (default: this quantizer's init method), without setting it; None if nothing was seen."""
        observation, self._observation = self._observation, None
        if observation is None or observation.low is None:
            return None
        method = self.init if method is None else method
        if method != "minmax" and not observation.keep_sample:
            raise RuntimeError(f"a {method} range needs the observed values: start_observing(keep_sample=True)")
        rows = observation.sample().reshape(1, -1)
        low, high = observation.low.reshape(1), observation.high.reshape(1)
        return search_range(rows, low, high, self.bits, method)

    def finalize_range(self) -> None:
        """Leave calibration mode, setting the range from everything observed (if anything was)."""
        observed_range = self.take_observed_range()
        if observed_range is not None:
            self.set_range(*observed_range)

    def _grid(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point shaped to broadcast against `like`."""
        if self.has_timestep_table:
            return self._table_grid()
        if not self.has_range():
            raise RuntimeError(
                f"UniformQuantizer({self.extra_repr()}) has no range yet: initialise or calibrate it, "
                "or load a state_dict"
            )
        return self._broadcast(self.scale.clamp_min(MIN_SCALE), like), self._broadcast(self.zero_point, like)

    def _table_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = selected_rows(self.step_rows, self)
        if rows.numel() != 1:
            raise ValueError(f"UniformQuantizer({self.extra_repr()}) has a timestep table: all samples of a "
                             f"batch must share one timestep, got {rows.numel()} rows")
        rows = rows.reshape(1)
        self._table_complete = self._table_complete or bool(self.table_initialized.all())
        if not self._table_complete and not bool(self.table_initialized[rows].all()):
            raise RuntimeError(
                f"UniformQuantizer({self.extra_repr()}) has no range for timestep row {int(rows)}: "
                "calibrate_timestep_tables has not calibrated it"
            )
        return self.table_scale[rows].clamp_min(MIN_SCALE), self.table_zero_point[rows]

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self._observation is not None:
            self.observe(values)
            return values
        if self.bits is None or not self.enabled:
            return values
        scale, zero_point = self._grid(values)
        # the grid arithmetic in float32 (a half-precision step of 8-bit codes is not exact); the result
        # in the input's dtype, for the layer that reads it
        if torch.is_grad_enabled() and (values.requires_grad or scale.requires_grad):
            quantized = (quantize_codes(values.float(), scale, zero_point, self.bits) - zero_point) * scale
        else:
            quantized = _fake_quantized(values.float(), scale, zero_point, self.bits)
        return quantized.to(values.dtype)

    def integer_values(self, values: torch.Tensor) -> torch.Tensor:
        """The integer codes q of `values` as uint8, for packing quantized weights into a checkpoint."""
        if self.bits is None or self.bits > 8:
            raise ValueError(f"integer_values needs a quantizer of at most 8 bits, this one has {self.bits}")
        with torch.no_grad():
            scale, zero_point = self._grid(values)
            return quantize_codes(values.float(), scale, zero_point, self.bits).to(torch.uint8)
