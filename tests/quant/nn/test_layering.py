"""What lives inside a quantized model imports no calibration, method, CLI or progress-bar code, and
loading or exporting a saved model needs no method module: checked in a fresh interpreter, whose
`sys.modules` holds exactly what the imports pulled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Imports the runtime package and every module of it, then the loading and export modules, and prints
# after each of the two what was loaded and which tfmq modules ran an import statement of tqdm (diffusers
# loads tqdm itself, so its presence in sys.modules says nothing about tfmq).
PROBE = """
import builtins, importlib, json, pkgutil, sys

tqdm_importers = set()
builtin_import = builtins.__import__


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and name.split(".")[0] == "tqdm" and importer.split(".")[0] == "tfmq":
        tqdm_importers.add(importer)
    return builtin_import(name, globals, locals, fromlist, level)


builtins.__import__ = recording_import
runtime, *loading_and_export = sys.argv[1:]
package = importlib.import_module(runtime)
for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"{runtime}.{info.name}")
stages = {"runtime": {"modules": sorted(sys.modules), "tqdm_importers": sorted(tqdm_importers)}}
for name in loading_and_export:
    importlib.import_module(name)
stages["loading_and_export"] = {"modules": sorted(sys.modules)}
print(json.dumps(stages))
"""
RUNTIME = "tfmq.quant.nn"
RUNTIME_MODULES = {f"{RUNTIME}.{name}" for name in ("quantizer", "layers", "attention", "step_table", "temporal",
                                                          "output_correction")}
NOT_RUNTIME = ("tfmq.quant.methods", "tfmq.quant.calibration", "tfmq.cli", "tfmq.quant.timestep_table",
               "tfmq.quant.output_correction")
LOADING_AND_EXPORT = ("tfmq.quant.checkpoint", "tfmq.export.graph")


@pytest.fixture(scope="module")
def imported() -> dict[str, dict[str, list[str]]]:
    """What importing the runtime modules, then also the loading and export modules, loads."""
    result = subprocess.run([sys.executable, "-c", PROBE, RUNTIME, *LOADING_AND_EXPORT],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def loaded_from(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    return [module for module in modules if any(module == p or module.startswith(p + ".") for p in packages)]


def test_the_runtime_modules_import_no_calibration_method_cli_or_progress_bar(
    imported: dict[str, dict[str, list[str]]],
) -> None:
    runtime = imported["runtime"]
    assert RUNTIME_MODULES <= set(runtime["modules"])  # the probe did import them all
    assert loaded_from(runtime["modules"], NOT_RUNTIME) == []
    assert runtime["tqdm_importers"] == []


def test_loading_and_exporting_import_no_method(imported: dict[str, dict[str, list[str]]]) -> None:
    modules = imported["loading_and_export"]["modules"]
    assert set(LOADING_AND_EXPORT) <= set(modules)
    assert loaded_from(modules, ("tfmq.quant.methods",)) == []
