"""The prompt language of `fashion-cond`: a word-level tokenizer over garment names and caption words.

Stable Diffusion reads prompts through CLIP's BPE tokenizer and text encoder. `fashion-cond` keeps that
path (a transformers `CLIPTextModel` behind a transformers tokenizer, saved in the pipeline folder) at a
size a CPU trains in minutes: a few hundred words, 16 tokens, two layers. Unknown words map to [UNK], so
any caption file (MS-COCO's included) can calibrate it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

MAX_TOKENS = 16
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
# What each Fashion-MNIST class may be called in a prompt (class index -> names, with their article).
CLASS_WORDS = (
    ("a t-shirt", "a top", "a tee"),
    ("trousers", "a pair of trousers", "pants"),
    ("a pullover", "a sweater", "a jumper"),
    ("a dress", "a gown"),
    ("a coat", "a jacket"),
    ("a sandal", "a summer sandal"),
    ("a shirt", "a blouse"),
    ("a sneaker", "a trainer", "a running shoe"),
    ("a bag", "a handbag", "a purse"),
    ("an ankle boot", "a boot", "a winter boot"),
)
TEMPLATES = (
    "{}", "a photo of {}", "a picture of {}", "an image of {}", "a small {}", "a grey {}",
    "a photo of {} on a black background", "{} on a black background", "a low resolution photo of {}",
)
# Words of everyday captions (MS-COCO style) beyond the templates: known, so they get an embedding, but
# never trained on garments; the model learns to read the garment word.
CAPTION_WORDS = (
    "the an is are on in with of and at to for by near next front white black dark light person man woman "
    "wearing holding standing sitting table picture shoe shoes clothes clothing fashion item new old"
).split()


def prompt_for(label: int, generator: torch.Generator) -> str:
    """A random prompt naming class `label`: a random template around a random name of the class."""
    names = CLASS_WORDS[label]
    name = names[int(torch.randint(len(names), (1,), generator=generator))]
    template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=generator))]
    if template.startswith(("a small", "a grey")):  # an adjective takes the article's place
        name = name.split(" ", 1)[1] if name.startswith(("a ", "an ")) else name
    return template.format(name)


def calibration_prompts(count: int = 128, seed: int = 1) -> list[str]:
    """`count` prompts from the training distribution, every class in turn: what `fashion-cond` ships as
    its calibration_prompts.txt (the stand-in for the paper's 128 MS-COCO captions)."""
    generator = torch.Generator().manual_seed(seed)
    return [prompt_for(index % len(CLASS_WORDS), generator) for index in range(count)]


def prompt_class(prompt: str) -> int | None:
    """The Fashion-MNIST class a prompt names (its longest class name found in it), None if none or two
    different classes are named as long."""
    text = " " + " ".join(prompt.lower().replace("-", " ").split()) + " "
    found: dict[int, int] = {}
    for label, names in enumerate(CLASS_WORDS):
        for name in names:
            bare = name.split(" ", 1)[1] if name.startswith(("a ", "an ")) else name
            if f" {bare.replace('-', ' ')} " in text:
                found[label] = max(found.get(label, 0), len(bare))
    if not found:
        return None
    longest = max(found.values())
    winners = [label for label, length in found.items() if length == longest]
    return winners[0] if len(winners) == 1 else None


def vocabulary() -> list[str]:
    words = set(CAPTION_WORDS)
    for names in CLASS_WORDS:
        for name in names:
            words.update(name.replace("-", " ").split())
    for template in TEMPLATES:
        words.update(template.replace("{}", " ").split())
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased, punctuation-free words; [BOS] words [EOS], padded with [PAD] to MAX_TOKENS."""
    vocab = {word: index for index, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Punctuation(behavior="removed")])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", model_max_length=MAX_TOKENS)


def build_text_encoder(vocab_size: int, width: int = 64) -> CLIPTextModel:
    """A two-layer CLIP text transformer: the same class (and call) as Stable Diffusion's text encoder."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.Tensor:
    """Token ids (N, tokenizer.model_max_length), as the Stable Diffusion pipeline pads and truncates."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
