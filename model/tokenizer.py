"""Janus special tokens, resolved from a tokenizer, and a small real BPE tokenizer for tests and the demo.

Token ids always come from the tokenizer: the 1B and 7B tokenizers differ, and a hard-coded id
is a silent bug waiting for the other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_PLACEHOLDER = "<image_placeholder>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
# The tokens the format writes itself; data encoded as text never produces them (model/chat_format.py).
FORMAT_TOKENS = (BOS, EOS, PAD, IMAGE_PLACEHOLDER, BEGIN_OF_IMAGE, END_OF_IMAGE, USER, ASSISTANT)


@dataclass(frozen=True)
class SpecialTokens:
    """The ids of the tokens the Janus token layout is built from."""

    bos: int
    eos: int
    pad: int
    image_placeholder: int
    begin_of_image: int
    end_of_image: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
        """Resolve every id; a token the tokenizer lacks is an error that names it."""
        missing = []

        def token_id(token: str) -> int:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
                missing.append(token)
                return -1
            return int(tid)

        ids = {
            "bos": token_id(tokenizer.bos_token or BOS),
            "eos": token_id(tokenizer.eos_token or EOS),
            "pad": token_id(PAD),
            "image_placeholder": token_id(IMAGE_PLACEHOLDER),
            "begin_of_image": token_id(BEGIN_OF_IMAGE),
            "end_of_image": token_id(END_OF_IMAGE),
        }
        if missing:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks the Janus special token(s) "
                f"{', '.join(missing)}; use a Janus-Pro tokenizer or build_tokenizer()"
            )
        return cls(**ids)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """What `AutoTokenizer.from_pretrained` loads, checked to carry the Janus special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    SpecialTokens.from_tokenizer(tokenizer)
    return tokenizer


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding with special tokens puts one BOS in front of the text and adds nothing else, as DeepSeek's
    tokenizer does. Read from an encoding: transformers' `add_bos_token` attribute says False for a tokenizer whose
    tokenizer.json adds BOS."""
    bos = SpecialTokens.from_tokenizer(tokenizer).bos
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return list(tokenizer("a")["input_ids"]) == [bos, *plain]


def with_bos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer`, made to add BOS when encoding if it adds no special token at all (in place; its own
    post-processing kept, BOS after it). Training inserts BOS by id whatever the tokenizer does, but transformers'
    JanusProcessor and DeepSeek's inference code leave BOS to the tokenizer, and the processor prepends the default
    system prompt to what the chat template wrote: only the tokenizer can put BOS in front of it. Raises ValueError
    for a tokenizer that adds something else (it cannot be given BOS without changing the rest)."""
    if adds_bos(tokenizer):
        return tokenizer
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if backend is None or list(tokenizer("a")["input_ids"]) != plain:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} adds special tokens other than one "
                         f"BOS when encoding, and its prompts would not be training's: use one that adds BOS "
                         f"{tokenizer.bos_token or BOS!r} or nothing")
    bos_token = tokenizer.bos_token or BOS
    bos = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
                                        special_tokens=[(bos_token, SpecialTokens.from_tokenizer(tokenizer).bos)])
    backend.post_processor = bos if backend.post_processor is None else processors.Sequence(
        [backend.post_processor, bos])
    if "add_bos_token" in tokenizer.init_kwargs:  # saved, and then rebuilds the post-processor when loaded
        tokenizer.init_kwargs["add_bos_token"] = True
    return tokenizer


DEFAULT_CORPUS = (
    "A photograph of a cat sitting on a wooden table next to a window.",
    "An astronaut floating in space above the blue earth.",
    "A red brick building with white windows under a clear sky.",
    "What is in this image? Describe the picture in detail.",
    "The coffee cup is white and sits on a saucer with a spoon.",
    "Two people walk along a beach at sunset while waves roll in.",
    "A bowl of fresh fruit: apples, oranges, bananas and grapes.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
)


def build_tokenizer(out_dir: str | Path, corpus: tuple[str, ...] | list[str] = DEFAULT_CORPUS,
                    vocab_size: int = 512, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with the Janus special tokens and save it to `out_dir`.

    It is a real tokenizer (merges, offsets, special-token splitting), only small: the tiny model's
    vocabulary must hold `len(tokenizer)` ids. add_bos=False: encoding adds no BOS, as many tokenizers other than
    DeepSeek's do (training inserts BOS by id either way; an export must make up for it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(FORMAT_TOKENS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    # Encoding with special tokens adds BOS, as DeepSeek's tokenizer does: an exported processor relies on it.
    if add_bos:
        bos = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                            special_tokens=[(BOS, bpe.token_to_id(BOS))])
        bpe.post_processor = processors.Sequence([bpe.post_processor, bos])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IMAGE_PLACEHOLDER, BEGIN_OF_IMAGE, END_OF_IMAGE, USER, ASSISTANT],
        model_max_length=4096,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
