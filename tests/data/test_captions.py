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


@pytest.mark.parametrize("content, fragment", [
    ({"annotations": [{"caption": "a bag"}, {"caption": None}]}, "caption of annotation 1 is null, not a string"),
    ({"annotations": [{"caption": ["a", "b"]}]}, r'caption of annotation 0 is \["a", "b"\], not a string'),
    ({"annotations": [{"caption": "a"}, {"caption": "b"}, {"caption": 5}]}, "caption of annotation 2 is 5, not a"),
    ({"annotations": [{"caption": "a"}, "a coat"]}, "annotation 1 has no caption"),
    ({"annotations": [{"id": 3}]}, "annotation 0 has no caption"),
    ([{"caption": "a bag"}], "its top level is a list, not an object"),
    ({"annotations": {"caption": "a bag"}}, "annotations is a dict, not a list"),
    ({"annotations": "a bag"}, "annotations is a str, not a list"),
])
def test_malformed_coco_entries_are_refused_with_their_index(tmp_path, content, fragment):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(content))
    with pytest.raises(TfmqError, match=fragment) as raised:
        read_prompts(path)
    assert "\n" not in str(raised.value)
