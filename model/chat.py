"""Ask questions about an image, on an export or released weights (a folder or a hub id): the understanding path.

    python -m model.chat --checkpoint DIR|deepseek-ai/Janus-Pro-1B --image photo.jpg --question "What is in it?"
                         [--interactive] [--device cuda]

The prompt is built by model/chat_format.py exactly as training built its samples (system prompt, the image as
<boi> 576 x <image_placeholder> <eoi>, question, `<|Assistant|>:`), the image by model/images.py's
understanding transform; transformers' own `generate` does the decoding, with the SigLIP features scattered
into the placeholder positions by `JanusForConditionalGeneration` itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from transformers import JanusForConditionalGeneration, PreTrainedTokenizerBase

from model.chat_format import JANUS_SYSTEM_PROMPT, understanding_prompt_ids
from model.config import num_image_tokens
from model.images import open_encoded, pixel_values, understanding_image
from model.tokenizer import SpecialTokens


@torch.no_grad()
def answer(model: JanusForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, image: Image.Image,
           question: str, system: str | None = JANUS_SYSTEM_PROMPT, max_new_tokens: int = 64,
           greedy: bool = True, temperature: float = 1.0) -> str:
    """The model's answer to `question` about `image` (greedy by default)."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    ids = understanding_prompt_ids(tokenizer, question, 1, system, num_image_tokens(model.config))
    input_ids = torch.tensor([ids], device=model.device)
    pixels = pixel_values([understanding_image(image)]).to(model.device, model.dtype)
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                         max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=special.eos,
                         pad_token_id=special.pad, generation_mode="text", **sampling)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def greedy_answer_ids(model: JanusForConditionalGeneration, prompt_ids: list[int], pixels: torch.Tensor, eos: int,
                      max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """The greedy answer's ids (up to, not including, EOS) to an understanding prompt whose image placeholders take
    the SigLIP features of `pixels` [n_images, 3, H, W] in [-1, 1]; `answer` without sampling, token for token.

    A loop of our own with a KV cache, as generation's `cfg_image_ids` is: it also runs on model/janus.py's training
    subclass, whose packed `forward` transformers' `generate` cannot drive. stop_at_eos=False runs all
    `max_new_tokens` forwards whatever comes out: under ZeRO-3 every forward is collective, so every rank must run
    as many of them, and ranks whose greedy tokens differ in the last bit would otherwise stop apart.
    """
    from transformers import DynamicCache

    from model.generate import check_transformers_version

    check_transformers_version()
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    embeds = model.get_input_embeddings()(ids)
    if pixels.shape[0]:
        features = model.model.aligner(model.model.vision_model(pixels.to(device, embeds.dtype)).last_hidden_state)
        at = (ids[0] == model.config.image_token_id).nonzero().squeeze(-1)
        embeds = embeds.index_copy(1, at, features.flatten(0, 1)[None].to(embeds.dtype))
    cache = DynamicCache(config=model.config.text_config)
    positions = torch.arange(ids.shape[1], device=device)[None]
    tokens = []
    for _ in range(max_new_tokens):
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions, cache=cache,
                                            use_cache=True).last_hidden_state[:, -1]
        token = model.lm_head(hidden).argmax(-1)
        tokens.append(token)
        if stop_at_eos and token.item() == eos:
            break
        embeds = model.get_input_embeddings()(token[:, None])
        positions = positions[:, -1:] + 1
    out = torch.cat(tokens).tolist() if tokens else []
    return out[:out.index(eos)] if eos in out else out


def read_image(path: str) -> Image.Image:
    """The `--image` file decoded, or one `error:` line: missing, unreadable, not an accepted format, truncated,
    a decompression bomb (Pillow's DecompressionBombError is no OSError), or whatever else a decoder raises."""
    from model.generate import usage_error

    try:
        image = open_encoded(Path(path).read_bytes())
        image.load()
    except Exception as exc:
        usage_error(f"--image {path}: {exc} ({type(exc).__name__})")
    return image


def main(argv: list[str] | None = None) -> None:
    from model.generate import (
        add_checkpoint_argument,
        add_device_arguments,
        checked_checkpoint,
        checked_text,
        inference_device,
        load_exported,
        usage_error,
    )

    parser = argparse.ArgumentParser(description="Janus-Pro: answer a question about an image.")
    add_checkpoint_argument(parser)
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", help="the question; with --interactive, the first one (optional)")
    parser.add_argument("--interactive", action="store_true",
                        help="then read questions about the same image from stdin, one a line, each answered on its "
                             "own (no history), until end of input, an empty line or `exit`")
    parser.add_argument("--system", default=JANUS_SYSTEM_PROMPT, help="system prompt; '' for none")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample (with --temperature) instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = inference_device(parser, args)
    if args.question is None and not args.interactive:
        usage_error("--question: give one, or --interactive to read questions from stdin")
    question = None if args.question is None else checked_text(args.question, "--question")
    system = checked_text(args.system, "--system")
    image = read_image(args.image)  # before loading the model: a wrong file is said at once
    model, tokenizer = load_exported(checked_checkpoint(args.checkpoint), dtype, device)

    def reply(text: str) -> None:
        print(answer(model, tokenizer, image, text, system or None, args.max_new_tokens, greedy=not args.sample,
                     temperature=args.temperature), flush=True)

    if question is not None:
        reply(question)
    if args.interactive:
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 must not end the chat
        for text in questions(sys.stdin):
            reply(text)


def questions(lines: TextIO) -> Iterator[str]:
    """The questions of an interactive chat: one a line until end of input, an empty line or `exit`. A line that is
    not UTF-8 is said on stderr and skipped: the model stays loaded for the next one."""
    prompt = lines.isatty()
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        text = line.strip()
        if not text or text == "exit":
            return
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # the bytes as read
            print(f"error: {shown[:80]!r} is not valid UTF-8 text; "
                  "ask again", file=sys.stderr, flush=True)
            continue
        yield text


if __name__ == "__main__":
    main()
