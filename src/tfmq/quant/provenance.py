"""Where a quantized model came from: a typed record that `tfmq.quantize` makes once, the model carries as
`tfmq_info`, and a checkpoint saves beside its manifest. It explains the model; loading does not need it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tfmq.devices import DTYPES, dtype_name, module_dtype
from tfmq.errors import TfmqError
from tfmq.quant.config import CONFIG_TYPES, QuantConfig


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's class, config and every tensor of its state: the identity of a base model."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        # keys like `_name_or_path` say where a model was read from, not what it is
        public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseModel:
    """The full-precision model a quantized one was made from: where it was loaded from, its fingerprint, its
    class, for a single-file checkpoint the config folder it loads with, and the dtype it ran in (the
    quantized model runs in it too; its quantizers' grids are float32 whatever it is)."""

    source: str
    fingerprint: str
    class_name: str
    config_folder: str = ""
    dtype: str = "float32"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "fingerprint": self.fingerprint, "class": self.class_name,
                "config": self.config_folder, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BaseModel:
        for key in ("source", "fingerprint", "class", "config"):
            if not isinstance(values.get(key), str):
                raise ValueError(f"base_model.{key} must be a string, got {values.get(key)!r}")
        dtype = values.get("dtype", "float32")  # the checkpoints written before half precision was handled
        if dtype not in DTYPES:
            raise ValueError(f"base_model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return cls(values["source"], values["fingerprint"], values["class"], values["config"], dtype)


@dataclass(frozen=True)
class Provenance:
    """The config (a dict when its method is not registered in this process), the base model, the calibration
    data's record (`CalibrationProvenance` and interval length) and what the method reported."""

    config: QuantConfig | dict[str, Any]
    base_model: BaseModel
    calibration: dict[str, Any] | None = None
    method_results: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, config: QuantConfig, base: nn.Module, *, source: str = "", config_folder: str = "",
           calibration: dict[str, Any] | None = None, method_results: dict[str, Any] | None = None) -> Provenance:
        """The record of `config` applied to `base` (fingerprinted now)."""
        identity = BaseModel(source, model_fingerprint(base), type(base).__name__, config_folder,
                             dtype_name(module_dtype(base)))
        return cls(config, identity, calibration, dict(method_results or {}))

    @property
    def method(self) -> str:
        return self.config.method if isinstance(self.config, QuantConfig) else str(self.config["method"])

    def to_dict(self) -> dict[str, Any]:
        config = self.config.to_dict() if isinstance(self.config, QuantConfig) else self.config
        return {"quant_config": config, "base_model": self.base_model.to_dict(), "calibration": self.calibration,
                "method_results": self.method_results}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Provenance:
        """Inverse of `to_dict`; raises ValueError naming the first bad entry."""
        if not isinstance(values, dict) or set(values) != {"quant_config", "base_model", "calibration",
                                                           "method_results"}:
            raise ValueError("provenance must be an object of quant_config, base_model, calibration and "
                             "method_results")
        config = values["quant_config"]
        if not isinstance(config, dict) or not isinstance(config.get("method"), str):
            raise ValueError("provenance.quant_config must be an object naming its method")
        if config["method"] in CONFIG_TYPES:
            try:
                config = QuantConfig.from_dict(config)
            except (TfmqError, TypeError) as exc:  # TypeError: a value the checks cannot even inspect
                raise ValueError(f"quant_config: {exc}") from exc
        if not isinstance(values["base_model"], dict):
            raise ValueError(f"base_model must be an object, got {values['base_model']!r}")
        if values["calibration"] is not None and not isinstance(values["calibration"], dict):
            raise ValueError("provenance.calibration must be an object or null")
        if not isinstance(values["method_results"], dict):
            raise ValueError("provenance.method_results must be an object")
        return cls(config, BaseModel.from_dict(values["base_model"]), values["calibration"], values["method_results"])
