"""The README's Python examples run as written, in order, on the shipped model, and use only `tfmq.<public name>`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import tfmq

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = "# not run by tests/test_readme.py:"
# Blocks that carry SKIP_MARK as their first line; a block marked by mistake fails this count.
EXPECTED_SKIPPED = 0
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    return _PYTHON_BLOCK.findall(text)


def non_public_uses(code: str) -> list[str]:
    """Imports of tfmq's modules and `tfmq.<name>` attributes that are not in `tfmq.__all__`."""
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tfmq":
            problems.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            problems += [f"import {alias.name}" for alias in node.names if alias.name.startswith("tfmq.")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tfmq"
              and node.attr not in tfmq.__all__):
            problems.append(f"tfmq.{node.attr}")
    return problems


def test_the_block_reader_finds_blocks_and_the_public_name_check_catches_deep_imports() -> None:
    text = "```bash\ntfmq demo\n```\n\n```python\nimport tfmq\n```\n\n```python\nx = 1\n```\n"
    assert python_blocks(text) == ["import tfmq\n", "x = 1\n"]
    assert non_public_uses("from tfmq.quant.api import quantize\nimport tfmq.export\ntfmq.quantize\n"
                           "tfmq.quant_model\n") == ["from tfmq.quant.api import ...", "import tfmq.export",
                                                     "tfmq.quant_model"]


def test_readme_python_blocks_use_public_names_only() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    for block in blocks:
        assert non_public_uses(block) == [], block


def test_readme_python_blocks_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text())
    runnable = [block for block in blocks if not block.startswith(SKIP_MARK)]
    assert len(blocks) - len(runnable) == EXPECTED_SKIPPED
    monkeypatch.chdir(tmp_path)  # the examples write q/ into the working folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__readme__"}
    try:
        for index, block in enumerate(runnable):
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "q" / "quantization.json").is_file()
    # the quantizing block compares the quantized model's images with the FP ones of the same seeds
    assert namespace["q_images"].shape == namespace["fp_images"].shape == namespace["images"].shape
    assert torch.equal(namespace["fp_images"], namespace["images"])
