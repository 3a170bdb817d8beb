"""The Janus "deepseek" chat format and token layout, for understanding, generation and text samples.

    understanding: <bos>[system\n\n]<|User|>: <boi> 576 x <image_placeholder> <eoi>\n{question}\n\n
                   <|Assistant|>: {answer}<eos>          loss on " " + answer + EOS
    generation:    <bos><|User|>: {caption}\n\n<|Assistant|>:<boi>  then 576 VQ ids
    text:          <bos>{text}[<eos>]                       loss on everything after BOS

Each sample is tokenised in one pass over its whole string (BOS inserted by id, so the result does
not depend on the tokenizer's add_bos setting); image placeholders are expanded by id afterwards and
loss spans are found from character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from model.sample import GENERATION, TEXT, UNDERSTANDING, Sample
from model.tokenizer import ASSISTANT, BEGIN_OF_IMAGE, EOS, IMAGE_PLACEHOLDER, USER, SpecialTokens

NUM_IMAGE_TOKENS = 576
# Janus-Pro's default system prompt for understanding; pass system=None to leave it out.
JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

# This format as the Jinja chat template of an exported JanusProcessor, for `processor.apply_chat_template`. Built
# like transformers' own Janus template: it writes neither BOS (the tokenizer adds it) nor the default system prompt
# (the processor prepends it in text mode when `use_default_system_prompt` is on, and image mode appends
# <begin_of_image> instead). Unlike that template, the images of a turn stay adjacent, as understanding_prompt_ids
# puts them. A first "system" message is written as "{text}\n\n": with the default turned off, it replaces it.
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
    """One chat turn. A user turn marks each of its images with `<image_placeholder>`."""

    role: str  # "user" or "assistant"
    text: str


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _token_spans(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges [start, end) covering each character span (a token overlapping it counts)."""
    spans = []
    for c_start, c_end in char_spans:
        hits = [i for i, (s, e) in enumerate(offsets) if s < c_end and e > c_start]
        if hits:
            spans.append((hits[0], hits[-1] + 1))
    return spans


def _expand_images(ids: list[int], special: SpecialTokens, num_image_tokens: int) -> tuple[list[int], list[int]]:
    """BOS, then each placeholder expanded to <boi> N x <image_placeholder> <eoi>; also where token i of `ids`
    landed (one more entry for the end), to shift loss spans."""
    expanded = [special.bos]
    index_map = []
    for tid in ids:
        index_map.append(len(expanded))
        if tid == special.image_placeholder:
            expanded += [special.begin_of_image] + [tid] * num_image_tokens + [special.end_of_image]
        else:
            expanded.append(tid)
    index_map.append(len(expanded))
    return expanded, index_map


def understanding_sample(tokenizer: PreTrainedTokenizerBase, turns: list[Turn], images: list[bytes],
                         system: str | None = None, num_image_tokens: int = NUM_IMAGE_TOKENS,
                         key: str = "") -> Sample:
    """An image(s) + conversation sample; every assistant answer and its EOS is a loss target."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    text = f"{system}\n\n" if system else ""
    answers: list[tuple[int, int]] = []
    for turn in turns:
        if turn.role == "user":
            text += f"{USER}: {turn.text}\n\n"
        elif turn.role == "assistant":
            # The target starts right after the colon, its space included: inference prompts end at
            # `<|Assistant|>:`, and a small vocabulary may encode that space as a token of its own.
            text += f"{ASSISTANT}:"
            answer = f" {turn.text}{EOS}"
            answers.append((len(text), len(text) + len(answer)))
            text += answer
        else:
            raise ValueError(f"unknown chat role {turn.role!r}")
    if not answers:
        raise ValueError("an understanding sample needs at least one assistant answer")
    ids, offsets = _encode(tokenizer, text)
    n_placeholders = ids.count(special.image_placeholder)
    if n_placeholders != len(images):
        raise ValueError(f"{n_placeholders} {IMAGE_PLACEHOLDER} marker(s) for {len(images)} image(s)")
    spans = _token_spans(offsets, answers)
    expanded, index_map = _expand_images(ids, special, num_image_tokens)
    loss_spans = [(index_map[s], index_map[e]) for s, e in spans]
    return Sample(task=UNDERSTANDING, input_ids=expanded, loss_spans=loss_spans, images=list(images), key=key)


def understanding_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, n_images: int = 1,
                             system: str | None = JANUS_SYSTEM_PROMPT,
                             num_image_tokens: int = NUM_IMAGE_TOKENS) -> list[int]:
    """The inference prompt of an understanding sample: everything before the answer, ending at
    `<|Assistant|>:` so the answer's first token (space included) is the model's to predict, as in training."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    if question.count(IMAGE_PLACEHOLDER) == 0 and n_images:
        question = IMAGE_PLACEHOLDER * n_images + "\n" + question  # images first, as preprocessing puts them
    text = (f"{system}\n\n" if system else "") + f"{USER}: {question}\n\n{ASSISTANT}:"
    ids, _ = _encode(tokenizer, text)
    found = ids.count(special.image_placeholder)
    if found != n_images:
        raise ValueError(f"{found} {IMAGE_PLACEHOLDER} marker(s) for {n_images} image(s)")
    return _expand_images(ids, special, num_image_tokens)[0]


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, caption: str) -> list[int]:
    """`<bos><|User|>: {caption}\\n\\n<|Assistant|>:<begin_of_image>`, as training and inference use it."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    ids, _ = _encode(tokenizer, f"{USER}: {caption}\n\n{ASSISTANT}:{BEGIN_OF_IMAGE}")
    return [special.bos] + ids


def generation_sample(tokenizer: PreTrainedTokenizerBase, caption: str, image_ids: list[int],
                      key: str = "") -> Sample:
    """A caption -> 576 VQ ids sample. The prompt span is every token strictly between BOS and BOI."""
    ids = generation_prompt_ids(tokenizer, caption)
    return Sample(task=GENERATION, input_ids=ids, prompt_span=(1, len(ids) - 1), image_ids=list(image_ids),
                  key=key)


def text_sample(tokenizer: PreTrainedTokenizerBase, text: str, add_eos: bool = True, key: str = "") -> Sample:
    """Plain next-token text; a piece cut from a longer document leaves `add_eos` off."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    ids, _ = _encode(tokenizer, text)
    ids = [special.bos] + ids + ([special.eos] if add_eos else [])
    return Sample(task=TEXT, input_ids=ids, loss_spans=[(1, len(ids))], key=key)
