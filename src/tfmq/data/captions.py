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
        try:
            annotations = json.loads(text)["annotations"]
            prompts = [str(annotation["caption"]).strip() for annotation in annotations]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TfmqError(f"{path} is not an MS-COCO captions file (annotations[].caption): {exc}") from exc
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise TfmqError(f"{path} holds no prompt")
    return prompts[:limit]
