"""The Janus "deepseek" chat format and token layout, for understanding, generation and text samples.

    understanding: <bos>[system\n\n]<|User|>: <boi> 576 x <image_placeholder> <eoi>\n{question}\n\n
                   <|Assistant|>: {answer}<eos>          loss on " " + answer + EOS
    generation:    <bos><|User|>: {caption}\n\n<|Assistant|>:<boi>  then 576 VQ ids
    text:          <bos>{text}[<eos>]                       loss on everything after BOS

Captions, questions, answers and documents are data: each is encoded as plain text, so the string of a special
token inside one (`<｜end▁of▁sentence｜>`, `<image_placeholder>`, ...) never becomes that token. The format's own
tokens (BOS, roles, EOS, image markers) are inserted between those texts, where a one-pass encoding of the whole
string would cut them too; BOS by id, so the result does not depend on the tokenizer's add_bos setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from model.sample import GENERATION, TEXT, UNDERSTANDING, Sample
from model.tokenizer import ASSISTANT, EOS, FORMAT_TOKENS, IMAGE_PLACEHOLDER, USER, SpecialTokens

NUM_IMAGE_TOKENS = 576
# Janus-Pro's default system prompt for understanding; pass system=None to leave it out.
JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

# This format as the Jinja chat template of an exported JanusProcessor, for `processor.apply_chat_template`. Built
# like transformers' own Janus template: it writes neither BOS nor the default system prompt (the processor prepends
# it in text mode when `use_default_system_prompt` is on, and image mode appends <begin_of_image> instead). BOS is the
# tokenizer's to add, before that system prompt, which a template cannot reach: an export makes a tokenizer that adds
# none add it (model/tokenizer.py `with_bos`). Unlike that template, the images of a turn stay adjacent, as
# understanding_prompt_ids puts them. A first "system" message is written as "{text}\n\n": with the default turned
# off, it replaces it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "{%- set content = message['content'] if message['content'] is not string"
    " else [{'type': 'text', 'text': message['content']}] -%}"
    "{%- if role == 'user' -%}{{- '" + USER + ": ' -}}"
    "{%- elif role == 'assistant' -%}{{- '" + ASSISTANT + ": ' -}}"
    "{%- elif role != 'system' or not loop.first -%}"
    "{{- raise_exception('Janus chat roles are user and assistant, after an optional first system message') -}}"
    "{%- endif -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}"
    "{%- if not loop.first and content[loop.index0 - 1]['type'] == 'text' -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '" + IMAGE_PLACEHOLDER + "' -}}"
    "{%- if not loop.last and content[loop.index0 + 1]['type'] == 'text' -%}{{- '\\n' -}}{%- endif -%}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- if not loop.first and content[loop.index0 - 1]['type'] == 'text' -%}{{- ' ' -}}{%- endif -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if role == 'assistant' -%}{{- '" + EOS + "' -}}{%- else -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + ":' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Turn:
    """One chat turn. Its text is data, encoded as plain text; a user turn marks where each image goes with the
    sample's `image_marker`."""

    role: str  # "user" or "assistant"
    text: str


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text` as plain text: a special token's string in it is spelled out in ordinary
    tokens, never encoded as that token. Raises ValueError where the tokenizer cannot keep them apart."""
    return _encode_plain(tokenizer, text, control_ids(tokenizer))


def control_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids text must never produce: the tokenizer's special tokens and the format's own (unknown-token aside)."""
    ids = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(token) for token in FORMAT_TOKENS}
    return frozenset(ids - {tokenizer.unk_token_id, None})


def _encode_plain(tokenizer: PreTrainedTokenizerBase, text: str,
                  controls: frozenset[int]) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    leaked = controls.intersection(ids)
    if leaked:
        # split_special_tokens splits only the tokens marked special: a control added as a plain token still matches.
        names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(leaked)))
        raise ValueError(f"text holds {names}, which tokenizer {getattr(tokenizer, 'name_or_path', '')!r} encodes as "
                         "a control token even in plain text: mark it special")
    return ids, [tuple(o) for o in enc["offset_mapping"]]


class _Layout:
    """The format's pieces for one tokenizer: its token ids, and data texts encoded as plain text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.controls = control_ids(tokenizer)
        # Roles are the format's own strings, encoded as the tokenizer has them (one token each in Janus's).
        self.user = self._format(USER)
        # The answer starts right after the colon, its space included: inference prompts end at `<|Assistant|>:`,
        # and encoding the colon apart keeps the training prefix equal to that prompt whatever the tokenizer merges.
        self.assistant = self._format(ASSISTANT) + self.text(":")

    def _format(self, string: str) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=False, split_special_tokens=False)["input_ids"])

    def text(self, text: str) -> list[int]:
        return _encode_plain(self.tokenizer, text, self.controls)[0]

    def image(self, num_image_tokens: int) -> list[int]:
        special = self.special
        return [special.begin_of_image] + [special.image_placeholder] * num_image_tokens + [special.end_of_image]

    def user_turn(self, text: str, image_marker: str, num_image_tokens: int) -> tuple[list[int], int]:
        """`<|User|>: {text}\\n\\n`, an image in place of each `image_marker`; and how many images it holds."""
        pieces = text.split(image_marker) if image_marker else [text]
        ids, last = list(self.user), len(pieces) - 1
        for i, piece in enumerate(pieces):
            if i:
                ids += self.image(num_image_tokens)
            ids += self.text((": " if i == 0 else "") + piece + ("\n\n" if i == last else ""))
        return ids, last

    def conversation(self, turns: list[Turn], system: str | None, num_image_tokens: int,
                     image_marker: str) -> tuple[list[int], list[tuple[int, int]], int]:
        """BOS, `[system\\n\\n]` and the turns; each answer's loss span (" " + answer + EOS); the images marked."""
        ids = [self.special.bos] + (self.text(f"{system}\n\n") if system else [])
        answers: list[tuple[int, int]] = []
        n_images = 0
        for turn in turns:
            if turn.role == "user":
                turn_ids, n = self.user_turn(turn.text, image_marker, num_image_tokens)
                ids += turn_ids
                n_images += n
            elif turn.role == "assistant":
                ids += self.assistant
                start = len(ids)
                ids += self.text(f" {turn.text}") + [self.special.eos]
                answers.append((start, len(ids)))
            else:
                raise ValueError(f"unknown chat role {turn.role!r}")
        return ids, answers, n_images


def understanding_sample(tokenizer: PreTrainedTokenizerBase, turns: list[Turn], images: list[bytes],
                         system: str | None = None, num_image_tokens: int = NUM_IMAGE_TOKENS,
                         key: str = "", image_marker: str = IMAGE_PLACEHOLDER) -> Sample:
    """An image(s) + conversation sample; every assistant answer and its EOS is a loss target.

    An image goes wherever a user turn holds `image_marker`; everything else in the turns is text. Pass the data's own
    marker (LLaVA's "<image>") so that an `<image_placeholder>` written in the data stays text too.
    """
    ids, answers, n_marked = _Layout(tokenizer).conversation(turns, system, num_image_tokens, image_marker)
    if not answers:
        raise ValueError("an understanding sample needs at least one assistant answer")
    if n_marked != len(images):
        raise ValueError(f"{n_marked} {image_marker} marker(s) for {len(images)} image(s)")
    return Sample(task=UNDERSTANDING, input_ids=ids, loss_spans=answers, images=list(images), key=key)


def understanding_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, n_images: int = 1,
                             system: str | None = JANUS_SYSTEM_PROMPT,
                             num_image_tokens: int = NUM_IMAGE_TOKENS, image_marker: str = IMAGE_PLACEHOLDER,
                             ) -> list[int]:
    """The inference prompt of an understanding sample: everything before the answer, ending at
    `<|Assistant|>:` so the answer's first token (space included) is the model's to predict, as in training."""
    if question.count(image_marker) == 0 and n_images:
        question = image_marker * n_images + "\n" + question  # images first, as preprocessing puts them
    layout = _Layout(tokenizer)
    ids, _, found = layout.conversation([Turn("user", question)], system, num_image_tokens, image_marker)
    if found != n_images:
        raise ValueError(f"{found} {image_marker} marker(s) for {n_images} image(s)")
    return ids + layout.assistant


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, caption: str) -> list[int]:
    """`<bos><|User|>: {caption}\\n\\n<|Assistant|>:<begin_of_image>`, as training and inference use it."""
    layout = _Layout(tokenizer)
    return ([layout.special.bos] + layout.user + layout.text(f": {caption}\n\n") + layout.assistant
            + [layout.special.begin_of_image])


def generation_sample(tokenizer: PreTrainedTokenizerBase, caption: str, image_ids: list[int],
                      key: str = "") -> Sample:
    """A caption -> 576 VQ ids sample. The prompt span is every token strictly between BOS and BOI."""
    ids = generation_prompt_ids(tokenizer, caption)
    return Sample(task=GENERATION, input_ids=ids, prompt_span=(1, len(ids) - 1), image_ids=list(image_ids),
                  key=key)


def text_sample(tokenizer: PreTrainedTokenizerBase, text: str, add_eos: bool = True, key: str = "") -> Sample:
    """Plain next-token text; a piece cut from a longer document leaves `add_eos` off."""
    layout = _Layout(tokenizer)
    ids = [layout.special.bos] + layout.text(text) + ([layout.special.eos] if add_eos else [])
    return Sample(task=TEXT, input_ids=ids, loss_spans=[(1, len(ids))], key=key)
