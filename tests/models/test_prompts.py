import torch

from tfmq.models.prompts import CLASS_WORDS, MAX_TOKENS, build_tokenizer, prompt_class, prompt_for, tokenize


def test_every_generated_prompt_names_its_class():
    generator = torch.Generator().manual_seed(0)
    for label in range(len(CLASS_WORDS)):
        for _ in range(20):
            assert prompt_class(prompt_for(label, generator)) == label


def test_prompt_class_takes_the_longest_name_and_knows_when_none_is_named():
    assert prompt_class("A T-shirt on a table") == 0  # not "shirt"
    assert prompt_class("an ankle boot") == 9
    assert prompt_class("a dog on a sofa") is None


def test_tokenizer_pads_truncates_and_maps_unknown_words():
    tokenizer = build_tokenizer()
    ids = tokenize(tokenizer, ["a photo of a sneaker", "", "zebra " * 40])
    assert ids.shape == (3, MAX_TOKENS)
    bos, eos, pad, unk = (tokenizer.convert_tokens_to_ids(t) for t in ("[BOS]", "[EOS]", "[PAD]", "[UNK]"))
    assert ids[0, 0] == bos and ids[0, 6] == eos and ids[0, 7] == pad
    assert ids[1, :2].tolist() == [bos, eos]
    assert (ids[2, 1:-1] == unk).all()
