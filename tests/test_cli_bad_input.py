"""Every command against a table of bad values: each exits 2 with exactly one line on stderr, no traceback,
and leaves nothing behind.

The table runs in-process (`tfmq.cli.main`, stderr captured at the file-descriptor level, so C libraries'
output counts too): a subprocess per case would spend most of the suite's time importing torch and
diffusers. `tests/test_files.py` runs the CLI in a real subprocess for the case that once deleted files.
"""

import json
from pathlib import Path

import pytest
import torch

from tfmq.cli import main
from tfmq.files import PREVIOUS_TAG, STAGING_TAG

# {name} in an argument is replaced by the path of that name in the prepared folder (see `place`).
TABLE = {
    "sample": [
        ("--num 0", "positive integer"),
        ("--num -3", "positive integer"),
        ("--num many", "invalid positive value"),
        ("--num 10000000000", "memory"),
        ("--steps 0", "positive integer"),
        ("--steps 10000", "between 1 and 1000"),
        ("--sampler ddpm --steps 10000", "1000"),
        ("--sampler plms --steps 5000", "1000"),
        ("--sampler dpm-solver --steps 5000", "1000"),
        ("--eta nan", "finite number"),
        ("--eta inf", "finite number"),
        ("--eta -1", "finite number"),
        ("--seed -1", "integer >= 0"),
        ("--seed x", "invalid"),
        ("--guidance-scale nan", "finite number"),
        ("--guidance-scale 3", "unconditional"),
        ("--class-label 3", "unconditional"),
        ("--class-label -1", "integer >= 0"),
        ("--batch-size 0", "positive integer"),
        ("--model {missing}", "neither a shipped model"),
        ("--out {blocked}", "blocked.tfmq-progress exists and it was not written by tfmq"),
        ("--model {user_file}", "not a checkpoint"),
        ("--model {empty}", "has no unet/config.json"),
        ("--model {list_config}", "JSON object"),
        ("--model {binary_config}", "cannot read"),
        ("--model {unknown_transformer}", "holds a SD3Transformer2DModel; tfmq quantizes"),
        ("--model fashion-dit --class-label 10", "class labels [10] out of range: fashion-dit draws classes 0..9"),
        ("--model fashion-dit --prompt coat", "class-conditional: give class labels"),
        ("--quantized {missing}", "not a tfmq quantized checkpoint"),
        ("--quantized {user_file}", "not a tfmq quantized checkpoint"),
        ("--prompts {missing}", "cannot read prompts"),
        ("--engine onnxruntime", "needs --onnx"),
        ("--engine onnxruntime --onnx {missing}", "does not exist"),
        ("--engine onnxruntime --onnx {user_file}", "ONNX"),
        ("--engine openvino", "--engine openvino needs --onnx"),
        ("--engine openvino --onnx {user_file}", "ONNX"),
        ("--engine inductor", "--engine inductor compiles a quantized model: give --quantized"),
        ("--engine inductor --onnx {user_file}", "give --quantized (a folder written by `tfmq quantize`), not --onnx"),
        ("--engine tensorrt", "invalid choice"),
        ("--sampler euler", "invalid choice"),
        ("--device cuda:x", "device must be"),
        *([("--device cuda", "no CUDA GPU"), ("--device cuda:1", "no CUDA GPU")] if not torch.cuda.is_available() else []),
    ],
    "quantize": [
        ("--w-bits 1", "w_bits"),
        ("--w-bits 9", "w_bits"),
        ("--w-bits x", "invalid"),
        ("--a-bits 3", "a_bits"),
        ("--memory-budget-mb nan", "finite number"),
        ("--memory-budget-mb -1", "finite number"),
        ("--calib-samples 0", "positive integer"),
        ("--interval-length 0", "positive integer"),
        ("--calib-load {missing}", "calibration"),
        ("--calib-load {user_file}", "calibration"),
        ("--calib-save {empty}", "is a folder"),
        ("--calib-save {user_file}", "not written by tfmq"),
        ("--out {blocked} --method tfmq", "blocked.tfmq-checkpoints exists and it was not written by tfmq"),
        ("--device tpu", "device must be"),
        ("--dtype float64", "invalid choice"),
        ("--layer *=fp", "keep them all in full precision"),
        ("--layer conv_in=w1", "w_bits"),
        ("--layer conv_in", "a layer rule is PATTERN=fp"),
        ("--layer re:(=fp", "not a regular expression"),
        ("--steps 10000", "between 1 and 1000"),
        ("--eta nan", "finite number"),
        ("--temporal-selection --method tfmq", "temporal_cache"),
        ("--temporal-cache --method rtn", "--temporal-cache applies to method tfmq, not rtn"),
        ("--preset fast --method rtn", "--preset applies to method qdiff, tfmq, not rtn"),
        ("--a-bits none --fsc-scope temporal --method tfmq", "a_bits is None"),
        ("--model {unknown_transformer}", "holds a SD3Transformer2DModel; tfmq quantizes"),
    ],
    "eval": [
        ("{missing}", "does not exist"),
        ("{empty}", "no images in"),
        ("{not_images}", "is not an image"),
        ("{images} --reference {user_file}", "reference statistics"),
        ("{images} --json {user_file}", "not written by tfmq"),
        ("{images} --json {empty}", "is a folder"),
        ("{images} {missing}", "does not exist"),
        ("{images} --device tpu", "device must be"),
        *([("{images} --device cuda", "no CUDA GPU")] if not torch.cuda.is_available() else []),
    ],
    "export": [
        ("--out {empty}", "is a folder"),
        ("--out {user_file}", "not written by tfmq"),
        ("{missing} --out {new}", "not a tfmq quantized checkpoint"),
        ("--opset 5 --out {new}", "opset 5"),
        ("--steps 0 --out {new}", "positive integer"),
    ],
    "bench": [
        ("--batch 0", "positive integer"),
        ("--repeats 0", "positive integer"),
        ("--onnx {missing}", "does not exist"),
        ("--json {user_file}", "not written by tfmq"),
        ("--quantized {missing}", "not a tfmq quantized checkpoint"),
        ("--inductor", "the inductor engine compiles a quantized model: give --quantized"),
    ],
    "train": [
        ("ddpm --lr nan --out {new}", "finite number"),
        ("ddpm --lr 0 --out {new}", "finite number > 0"),
        ("ddpm --steps 0 --out {new}", "positive integer"),
        ("ddpm --out {user_file}", "is not a folder"),
        ("ldm --out {new}", "--autoencoder"),
        ("gan --out {new}", "invalid choice"),
    ],
    "reference-stats": [
        ("--out {user_file}", "not written by tfmq"),
        ("--out {empty}", "is a folder"),
    ],
    "demo": [
        ("--num 0", "positive integer"),
        ("--out {user_folder}", "was not written by tfmq"),
        ("--out {user_file}", "is not a folder"),
        ("--seed -2", "integer >= 0"),
    ],
}
# Commands that write an output folder get --out {new} unless the case names one.
NEEDS_OUT = ("sample", "quantize")
CASES = [(command, argv, fragment) for command, rows in TABLE.items() for argv, fragment in rows]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """A folder of bad inputs: missing paths, a user's file and folder, broken configs, non-images."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = {name: root / name for name in ("missing", "user_file", "user_folder", "empty", "list_config",
                                            "binary_config", "not_images", "images", "new", "blocked",
                                            "unknown_transformer")}
    (root / "blocked.tfmq-checkpoints").mkdir()
    (root / "blocked.tfmq-checkpoints" / "notes.txt").write_text("keep\n")
    (root / "blocked.tfmq-progress").mkdir()
    (root / "blocked.tfmq-progress" / "notes.txt").write_text("keep\n")
    paths["user_file"].write_text("a user's notes\n")
    paths["user_folder"].mkdir()
    (paths["user_folder"] / "notes.txt").write_text("keep\n")
    paths["empty"].mkdir()
    for name, content in (("list_config", b"[1, 2]"), ("binary_config", b"\xff\xfe\x00{")):
        (paths[name] / "unet").mkdir(parents=True)
        (paths[name] / "unet" / "config.json").write_bytes(content)
    paths["unknown_transformer"].mkdir()  # a bare model folder of a transformer class tfmq does not know
    (paths["unknown_transformer"] / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    paths["not_images"].mkdir()
    (paths["not_images"] / "a.png").write_text("not a picture")
    (paths["not_images"] / "b.png").write_text("not a picture")
    main(["sample", "--steps", "2", "--num", "2", "--out", str(paths["images"]), "--quiet"])
    return paths


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("command, argv, fragment", CASES, ids=[f"{c} {a}" for c, a, _ in CASES])
def test_bad_value_is_one_line_and_exit_2(command, argv, fragment, place, capfd):
    arguments = [part.format(**{name: str(path) for name, path in place.items()}) for part in argv.split()]
    if command in NEEDS_OUT and "--out" not in arguments:
        arguments += ["--out", str(place["new"])]
    root = place["new"].parent
    capfd.readouterr()
    before = _snapshot(root)
    code = main([command, *arguments, *(["--quiet"] if command in ("sample", "quantize") else [])])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert _snapshot(root) == before  # nothing written, nothing changed
    assert not place["new"].exists()
    assert not any(tag in path.name for tag in (STAGING_TAG, PREVIOUS_TAG) for path in root.rglob("*"))


def test_the_table_covers_every_command():
    from tfmq.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(TABLE) == set(commands)
    assert json.dumps(TABLE)  # plain data: the table is the documentation of what is refused
