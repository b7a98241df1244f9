import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.models.tiny_pipelines import write_pipeline
from tests.quant.tiny_unets import one_thread

import tfmq

PACKAGE_INIT = Path(tfmq.__file__)


def test_the_top_level_api_runs_the_documented_flow_on_a_latent_model(tmp_path):
    with one_thread():
        _run_the_documented_flow(tmp_path)


def _run_the_documented_flow(tmp_path):
    model = tfmq.load_model(write_pipeline("latent", tmp_path / "ldm"))
    sampler = tfmq.SamplerConfig(steps=4)
    calibration = tfmq.collect_calibration(model.unet, model.scheduler, 2, sampler, 2, progress=False)
    config = tfmq.TFMQConfig(w_bits=8, a_bits=8, recon_weight_iters=2, recon_act_iters=1)
    qunet = tfmq.quantize(model.unet, config, calibration, progress=False)
    loaded = tfmq.load_quantized(tfmq.save_quantized(qunet, tmp_path / "q"), model.unet)
    images = tfmq.sample(loaded, model.scheduler, 2, config=sampler, progress=False, decoder=model.decoder)
    assert images.shape == (2, 1, 16, 16)


def test_importing_the_package_and_the_cli_does_not_import_torch():
    # the CLI sets OMP_WAIT_POLICY for onnxruntime before torch starts its OpenMP pool (measured: the
    # int8 engine ran 1.0x FP32 torch with spinning torch threads, 2.2x without)
    for code in ("import tfmq, sys; dir(tfmq); assert 'torch' not in sys.modules",
                 "import tfmq, tfmq.cli, sys; assert 'torch' not in sys.modules"):
        subprocess.run([sys.executable, "-c", code], check=True)


def test_dir_lists_every_public_name_before_any_is_loaded():
    # in a fresh interpreter: here earlier tests have loaded the names into the module already
    code = "import tfmq; missing = set(tfmq.__all__) - set(dir(tfmq)); assert not missing, missing"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves_to_tfmqs_own_object():
    for name in tfmq.__all__:
        assert getattr(tfmq, name).__module__.startswith("tfmq"), name
    assert {"export_onnx", "OnnxUNet", "trajectory_inputs", "CalibrationSet", "QualityMetrics",
            "TfmqError"} <= set(tfmq.__all__)


def test_the_type_checking_imports_name_exactly_the_public_names_from_where_they_load():
    tree = ast.parse(PACKAGE_INIT.read_text())
    blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    imported = {alias.asname or alias.name: node.module for node in blocks[0].body
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert all(isinstance(node, ast.ImportFrom) for node in blocks[0].body)
    assert sorted(imported) == sorted(tfmq.__all__)
    for name, module in imported.items():  # a type checker sees the object a user gets
        assert getattr(importlib.import_module(module), name) is getattr(tfmq, name), name


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="'quantise'"):
        tfmq.quantise  # noqa: B018


def test_the_package_docstring_example_compiles_and_uses_public_names_only():
    from tests.test_readme import non_public_uses

    example = textwrap.dedent("\n".join(line for line in tfmq.__doc__.splitlines() if line.startswith("    ")))
    compile(example, "tfmq.__doc__", "exec")
    assert "import tfmq" in example and non_public_uses(example) == []
    assert 'tfmq.TFMQConfig(w_bits=4, a_bits=8)' in example
