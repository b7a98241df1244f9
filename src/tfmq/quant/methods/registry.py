"""Methods as config types: `register_method(ConfigType)` binds a handler to a config type, and
`tfmq.quantize` runs the handler registered for the type of the config it is given (or of its nearest
registered base), the way torchao's `quantize_(model, config)` does. A method defined outside the package
registers the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tfmq.errors import TfmqError
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.config import QuantConfig
from tfmq.quant.nn.temporal import training_schedule
from tfmq.quant.timestep_table import calibrate_timestep_tables

if TYPE_CHECKING:
    from tfmq.quant.methods.resume import UnitCheckpoints


@dataclass(frozen=True)
class MethodInputs:
    """What a method's handler works from, besides the wrapped model it calibrates in place (weights and
    activation ranges already initialised): the full-precision original, the config and the calibration, and
    the run's per-unit checkpoints (None: none kept) that every reconstruction is handed."""

    full_precision: nn.Module
    config: QuantConfig
    calibration: CalibrationSet
    progress: bool = True
    checkpoints: UnitCheckpoints | None = None

    def weight_batches(self) -> list[dict[str, Any]]:
        """The weight-reconstruction steps of the calibration data (every `interval_length`-th), in batches."""
        data = self.calibration.for_weights()
        if len(data) == 0:
            raise TfmqError("the calibration set has no sample of the weight-reconstruction steps")
        return data.batches(self.config.batch_size)

    @property
    def table_schedule(self) -> torch.Tensor:
        """The timesteps the model's tables and caches get rows for: every training timestep for a schedule-free
        config (`train_timesteps`), else the calibration's schedule."""
        if self.config.train_timesteps is None:
            return self.calibration.schedule
        return training_schedule(self.config.train_timesteps)

    def calibrate_timestep_tables(self, model: nn.Module) -> None:
        """FSC as the config asks (nothing for scope "none"): a calibration step each method places in its recipe."""
        config = self.config
        if config.fsc_scope != "none":
            calibrate_timestep_tables(model, self.calibration, config.fsc_scope, momentum=config.fsc_momentum,
                                      init_samples=config.fsc_init_samples, table_schedule=self.table_schedule,
                                      fill=config.fsc_fill, progress=self.progress)


# The handler calibrates the model in place and returns the method's results, JSON-ready, for the provenance.
MethodHandler = Callable[[nn.Module, MethodInputs], dict[str, Any]]
_HANDLERS: dict[type[QuantConfig], MethodHandler] = {}


def register_method(config_type: type[QuantConfig]) -> Callable[[MethodHandler], MethodHandler]:
    """Decorator: `handler` quantizes for configs of `config_type` (a QuantConfig subclass naming a method)."""
    if not (isinstance(config_type, type) and issubclass(config_type, QuantConfig) and config_type.method):
        raise TfmqError(f"register_method takes a QuantConfig subclass declared with method=..., got {config_type!r}")

    def register(handler: MethodHandler) -> MethodHandler:
        _HANDLERS[config_type] = handler
        return handler

    return register


def handler_for(config: QuantConfig) -> MethodHandler:
    """The handler of `config`'s type, or of its nearest registered base."""
    for config_type in type(config).__mro__:
        if config_type in _HANDLERS:
            return _HANDLERS[config_type]
    registered = ", ".join(config_type.__name__ for config_type in _HANDLERS)
    raise TfmqError(f"no method is registered for {type(config).__name__} (registered: {registered}); "
                    "use tfmq.register_method")
