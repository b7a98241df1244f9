"""onnx and onnxruntime are the `onnx` extra: without them export is a one-line error naming it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tfmq.cli import main
from tfmq.errors import TfmqError
from tfmq.export import dependencies
from tfmq.export.dependencies import require

ROOT = Path(__file__).resolve().parents[2]
EXTRA_HINT = "pip install 'tfmq[onnx]'"


def test_an_importable_module_is_returned():
    assert require("json") is json


@pytest.mark.parametrize("module_name", ["onnx", "onnxruntime"])
def test_a_missing_module_is_a_one_line_error_naming_the_extra(monkeypatch, module_name):
    monkeypatch.setitem(sys.modules, module_name, None)
    with pytest.raises(TfmqError, match=f"{module_name} cannot be imported") as caught:
        require(module_name)
    assert str(caught.value).endswith(f"need the onnx extra: {EXTRA_HINT}")
    assert "\n" not in str(caught.value)


def test_a_multi_line_import_error_keeps_its_first_line(monkeypatch):
    def broken(name):
        raise ImportError("libonnxruntime.so: cannot open shared object file\n  (more detail)")

    monkeypatch.setattr(dependencies.importlib, "import_module", broken)
    with pytest.raises(TfmqError, match=re.escape("(libonnxruntime.so: cannot open shared object file);")) as caught:
        require("onnxruntime")
    assert "\n" not in str(caught.value)


def test_the_cli_without_onnxruntime_exits_2_with_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    code = main(["sample", "--engine", "onnxruntime", "--onnx", str(tmp_path / "unet.onnx"),
                 "--out", str(tmp_path / "images")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and EXTRA_HINT in err


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_onnx_is_an_extra_that_the_test_extra_pulls_in():
    project = _project()
    base = {Requirement(line).name for line in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not base & {"onnx", "onnxruntime"}
    assert {Requirement(line).name for line in extras["onnx"]} == {"onnx", "onnxruntime"}
    assert any(Requirement(line).name == "tfmq" and "onnx" in Requirement(line).extras for line in extras["test"])


def test_every_requirement_is_a_range_that_its_ci_pin_satisfies():
    project = _project()
    requirements = [Requirement(line) for line in project["dependencies"]]
    requirements += [Requirement(line) for lines in project["optional-dependencies"].values() for line in lines
                     if Requirement(line).name != "tfmq"]
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pinned = Requirement(line)
            pins[pinned.name.lower().replace("_", "-")] = next(iter(pinned.specifier)).version
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{requirement}: a lower and an upper bound"
        pin = pins[requirement.name.lower()]
        assert requirement.specifier.contains(pin), f"{requirement} excludes the tested {pin}"
        lower = next(spec.version for spec in requirement.specifier if spec.operator == ">=")
        assert lower == pin, f"{requirement}: the lower bound is the tested version {pin}"
