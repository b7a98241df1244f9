import json

import pytest

from tfmq.data.captions import read_prompts
from tfmq.errors import TfmqError


def test_plain_text_one_prompt_a_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a sneaker\n\n  a bag  \na coat\n")
    assert read_prompts(path) == ["a photo of a sneaker", "a bag", "a coat"]
    assert read_prompts(path, limit=2) == ["a photo of a sneaker", "a bag"]


def test_coco_captions_take_the_first_n_in_file_order(tmp_path):
    path = tmp_path / "captions_val2014.json"
    annotations = [{"image_id": index, "id": index, "caption": f"caption {index} "} for index in range(300)]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    prompts = read_prompts(path)
    assert len(prompts) == 128 and prompts[0] == "caption 0" and prompts[-1] == "caption 127"


@pytest.mark.parametrize("content, message", [
    ('{"images": []}', "not an MS-COCO captions file"), ("{broken", "not an MS-COCO captions file")])
def test_bad_caption_files_are_errors(tmp_path, content, message):
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(TfmqError, match=message):
        read_prompts(path)


def test_empty_or_missing_files_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(TfmqError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(TfmqError, match="cannot read prompts"):
        read_prompts(tmp_path / "missing.txt")
