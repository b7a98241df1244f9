"""Calibration prompts from a file: plain text (one prompt a line) or an MS-COCO `captions_*.json`.

The paper calibrates Stable Diffusion on the first 128 captions of MS-COCO; any caption file in COCO's
annotation format works the same way here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfmq.errors import TfmqError

DEFAULT_NUM_PROMPTS = 128


def read_prompts(path: str | Path, limit: int | None = DEFAULT_NUM_PROMPTS) -> list[str]:
    """The first `limit` prompts of `path` (all with None); blank lines are skipped."""
    path = Path(path)
    if limit is not None and limit <= 0:
        raise TfmqError(f"the number of prompts must be positive, got {limit}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TfmqError(f"cannot read prompts from {path}: {exc}") from exc
    if path.suffix == ".json":
        prompts = [caption.strip() for caption in _coco_captions(path, text)]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise TfmqError(f"{path} holds no prompt")
    return prompts[:limit]


def _coco_captions(path: Path, text: str) -> list[str]:
    """Every annotation's caption, refused when one is not a string: str() would turn a null, a number or a
    list into a prompt ("None", "5") that nobody wrote."""
    def refuse(reason: str) -> TfmqError:
        return TfmqError(f"{path} is not an MS-COCO captions file (annotations[].caption): {reason}")

    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise refuse(str(exc)) from exc
    if not isinstance(document, dict):
        raise refuse(f"its top level is a {type(document).__name__}, not an object")
    if "annotations" not in document:
        raise refuse("it has no annotations")
    annotations = document["annotations"]
    if not isinstance(annotations, list):
        raise refuse(f"annotations is a {type(annotations).__name__}, not a list")
    captions = []
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "caption" not in annotation:
            raise refuse(f"annotation {index} has no caption")
        caption = annotation["caption"]
        if not isinstance(caption, str):
            raise refuse(f"the caption of annotation {index} is {json.dumps(caption)[:40]}, not a string")
        captions.append(caption)
    return captions
