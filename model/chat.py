"""Ask a question about an image, on an exported transformers checkpoint (the understanding path).

    python -m model.chat --checkpoint DIR --image photo.jpg --question "What is in this image?" [--device cuda]

The prompt is built by model/chat_format.py exactly as training built its samples (system prompt, the image as
<boi> 576 x <image_placeholder> <eoi>, question, `<|Assistant|>:`), the image by model/images.py's
understanding transform; transformers' own `generate` does the decoding, with the SigLIP features scattered
into the placeholder positions by `JanusForConditionalGeneration` itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
    from model.generate import add_device_arguments, checked_text, inference_device, load_exported

    parser = argparse.ArgumentParser(description="Janus-Pro: answer a question about an image.")
    parser.add_argument("--checkpoint", required=True, help="an exported transformers-layout checkpoint")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--system", default=JANUS_SYSTEM_PROMPT, help="system prompt; '' for none")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample (with --temperature) instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = inference_device(parser, args)
    question, system = checked_text(args.question, "--question"), checked_text(args.system, "--system")
    image = read_image(args.image)  # before loading the model: a wrong file is said at once
    model, tokenizer = load_exported(args.checkpoint, dtype, device)
    reply = answer(model, tokenizer, image, question, system or None, args.max_new_tokens,
                   greedy=not args.sample, temperature=args.temperature)
    print(reply)


if __name__ == "__main__":
    main()
