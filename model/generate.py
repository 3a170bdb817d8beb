"""Text to image with classifier-free guidance, on an export or released weights (a folder or a hub id).

    python -m model.generate --checkpoint DIR|deepseek-ai/Janus-Pro-1B --prompt "a cat" ["a rocket" ...]
                             [--cfg 5 --temperature 1 -n 4 --seed 0 --greedy --device cuda --dtype bf16] --out grid.png

Each prompt is `<bos><|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>` (model/chat_format.py, as in
training); its unconditional twin keeps only BOS and BOI, every token between them becoming pad, which is
what guidance dropout trained. The 576 ids are decoded by the VQ decoder and saved as a grid (one row per
prompt, n columns).

Where transformers' image-mode `generate` does the job (guidance > 1) it is used. Guidance off
(`--cfg 1`; transformers 5.24 crashes there: it doubles the batch but never merges it) goes through
`cfg_image_ids`, our one hand-written loop with a KV cache, which a test holds token for token against
transformers' at guidance 5. A memorised model is checked without guidance: guidance pulls it off its
training image (docs/facts.md: 99.5% -> 63% measured).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

import torch
import transformers
from PIL import Image
from transformers import (
    DynamicCache,
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from model.chat_format import generation_prompt_ids
from model.config import DTYPES, model_config, num_image_tokens
from model.hub import HubError, resolve_weights
from model.tokenizer import SpecialTokens, load_tokenizer
from model.weights import detect_layout, load_checkpoint, read_entries

MIN_TRANSFORMERS = (5, 24)


def check_transformers_version() -> None:
    """Refuse a transformers older than 5.24: its Llama model swallows the `cache=` keyword cfg_image_ids passes
    and runs without a KV cache, so generated ids silently diverge from the second token on."""
    installed = transformers.__version__
    found = re.match(r"(\d+)\.(\d+)", installed)
    if found is None or tuple(map(int, found.groups())) < MIN_TRANSFORMERS:
        needed = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(f"transformers {installed} is installed but image generation needs transformers>={needed}"
                           f" (older ones ignore the KV cache it passes): pip install 'transformers>={needed},<6'")


GUIDANCE_SCALE = 5.0  # the paper's and the official code's classifier-free guidance weight


def generation_config(config: JanusConfig, special: SpecialTokens) -> GenerationConfig:
    """What transformers' image-mode `generate` reads besides the weights: guidance 5, the bos/eos/pad ids and
    `generation_kwargs` {boi_token_id, num_image_tokens} (it raises without them). An export saves it; released
    weights in deepseek-ai's layout carry none, so inference gives them this one."""
    return GenerationConfig(
        bos_token_id=special.bos, eos_token_id=special.eos, pad_token_id=special.pad,
        guidance_scale=GUIDANCE_SCALE, max_new_tokens=512,
        generation_kwargs={"boi_token_id": special.begin_of_image, "num_image_tokens": num_image_tokens(config)},
    )


def checked_checkpoint(spec: str, flag: str = "--checkpoint") -> Path:
    """The local folder of `spec` (an export, released weights, or a hub id such as deepseek-ai/Janus-Pro-1B,
    fetched through the Hugging Face cache: model/hub.py), or one `error:` line said before anything loads."""
    try:
        folder = resolve_weights(spec, flag)
    except HubError as error:
        usage_error(str(error))
    if not folder.is_dir():
        usage_error(f"{flag} {spec}: no such folder (a Hugging Face hub id is owner/name)")
    return folder


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                  ) -> tuple[JanusForConditionalGeneration, PreTrainedTokenizerBase]:
    """A checkpoint and its tokenizer, in eval mode, on `device`: an export of ours or transformers' converted
    release (`from_pretrained`), or deepseek-ai's original release (model/weights.py maps its names)."""
    tokenizer = load_tokenizer(path)
    entries = read_entries(path)
    if detect_layout(entries) == "transformers":
        model = JanusForConditionalGeneration.from_pretrained(str(path), dtype=dtype).to(device).eval()
        return model, tokenizer
    special = SpecialTokens.from_tokenizer(tokenizer)
    janus = model_config(path, special.image_placeholder)
    # Built on the device, in the dtype, without random initialisation: load_checkpoint then fills every tensor of
    # the state dict (strictly), and the buffers outside it (rotary frequencies) are computed in the constructor.
    with no_init_weights(), torch.device(device):
        model = JanusForConditionalGeneration._from_config(janus, dtype=dtype)
    load_checkpoint(model, path, "original")  # strict: every tensor of the model, no key left over
    model.generation_config = generation_config(janus, special)
    return model.eval(), tokenizer


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint` (or `--model`) of the inference commands."""
    parser.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                        help="an export of this pipeline, or released Janus-Pro weights in either layout: a folder, "
                             "or a Hugging Face hub id such as deepseek-ai/Janus-Pro-1B (from the cache; downloaded "
                             "unless HF_HUB_OFFLINE is set)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` of the inference commands: CUDA in bf16 where a GPU is, else the CPU in fp32."""
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu; default: cuda where a GPU is, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")


def usage_error(message: str) -> NoReturn:
    """A mistake in an inference command's arguments or the files they name: one `error:` line, exit 2, said
    before the model loads, never a traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def checked_text(value: str, flag: str) -> str:
    """`value` if it is text: an argument holding bytes that are not UTF-8 reaches Python as lone surrogates, which
    the tokenizer fails on (a TypeError) after the model has loaded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        usage_error(f"{flag}: {value.encode('utf-8', 'backslashreplace').decode()[:80]!r} is not valid UTF-8 text")
    return value


def checked_output(path: str) -> Path:
    """Where the grid goes: an image file name Pillow can write, not a directory, in a folder or where one can be
    made. Checked before the model loads: saving is the command's last step."""
    out = Path(path)
    if out.is_dir():
        usage_error(f"--out {path}: a directory; name the image file to write")
    if out.suffix.lower() not in Image.registered_extensions():
        usage_error(f"--out {path}: not an image file name (give one ending in .png, .jpg or .webp)")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        usage_error(f"--out {path}: a folder on its path is a file")
    return out


def inference_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `--device`/`--dtype` ask for (their defaults filled in); a wrong device is a usage
    error said before the model loads."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        usage_error(f"--device {args.device}: not one of cuda, cuda:N, cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        usage_error(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def unconditional(prompt: list[int], pad: int) -> list[int]:
    """BOS and BOI kept, every token between them pad: the row guidance dropout trained."""
    return [prompt[0]] + [pad] * (len(prompt) - 2) + [prompt[-1]]


@torch.no_grad()
def cfg_image_ids(model: JanusForConditionalGeneration, prompts: list[list[int]], pad: int, cfg: float = 5.0,
                  temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                  num_tokens: int | None = None) -> torch.Tensor:
    """[B, 576] image ids from prompt ids ending in BOI; cfg 1 turns guidance off (conditional rows only).

    logits = uncond + cfg * (cond - uncond) from the generation head at each step, one batched forward for
    both halves with a KV cache; prompts of different lengths are left-padded and masked.
    """
    check_transformers_version()
    num_tokens = num_tokens or num_image_tokens(model.config)
    guided = cfg != 1.0
    batch = len(prompts)
    rows = prompts + ([unconditional(p, pad) for p in prompts] if guided else [])
    ids, mask = _left_padded(rows, pad)
    device = model.device
    ids, mask = ids.to(device), mask.to(device)
    embeds = model.get_input_embeddings()(ids)
    cache = DynamicCache(config=model.config.text_config)
    language_model, head = model.model.language_model, model.model.generation_head
    out = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for i in range(num_tokens):
        hidden = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True).last_hidden_state[:, -1]
        logits = head(hidden)
        if guided:
            cond, uncond = logits.split(batch)
            logits = uncond + (cond - uncond) * cfg
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        out[:, i] = token
        step = torch.cat([token, token]) if guided else token
        embeds = model.prepare_embeddings_for_image_generation(step.unsqueeze(-1))
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out


@torch.no_grad()
def generate_image_ids(model: JanusForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       cfg: float = 5.0, temperature: float = 1.0, seed: int = 0, greedy: bool = False,
                       backend: str = "auto") -> torch.Tensor:
    """[len(prompts), 576] image ids. backend: `transformers` (its image-mode generate; needs cfg > 1), `loop`
    (cfg_image_ids), or `auto` (transformers where it works, else the loop)."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    rows = [generation_prompt_ids(tokenizer, p) for p in prompts]
    if backend == "auto":
        backend = "transformers" if cfg > 1.0 else "loop"
    if backend == "loop":
        generator = torch.Generator(device=model.device).manual_seed(seed)
        return cfg_image_ids(model, rows, special.pad, cfg, temperature, greedy, generator)
    if backend != "transformers":
        raise ValueError(f"backend must be auto, transformers or loop, not {backend!r}")
    if cfg <= 1.0:
        raise ValueError("transformers' image-mode generate needs cfg > 1 (5.24 crashes at 1); use backend='loop'")
    ids, mask = _left_padded(rows, special.pad)
    torch.manual_seed(seed)  # transformers samples from the global generator
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    return model.generate(ids.to(model.device), attention_mask=mask.to(model.device), generation_mode="image",
                          do_sample=not greedy, guidance_scale=cfg, **sampling)


@torch.no_grad()
def decode_images(model: JanusForConditionalGeneration, ids: torch.Tensor) -> list[Image.Image]:
    """VQ ids [B, 576] -> RGB images through the VQ decoder (which normalises its codebook rows)."""
    pixels = model.decode_image_tokens(ids.to(model.device)).float()  # [B, H, W, 3] in [-1, 1]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Janus-Pro text to image (classifier-free guidance).")
    add_checkpoint_argument(parser)
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts: one grid row each")
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance weight; 1 turns guidance off")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("-n", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--backend", choices=("auto", "transformers", "loop"), default="auto")
    add_device_arguments(parser)
    parser.add_argument("--out", default="grid.png",
                        help="the image file of the grid (.png, .jpg, .webp; folders made as needed)")
    args = parser.parse_args(argv)
    device, dtype = inference_device(parser, args)
    prompts = [checked_text(p, "--prompt") for p in args.prompt for _ in range(args.n)]
    out = checked_output(args.out)
    model, tokenizer = load_exported(checked_checkpoint(args.checkpoint), dtype, device)
    ids = generate_image_ids(model, tokenizer, prompts, args.cfg, args.temperature, args.seed, args.greedy,
                             args.backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(decode_images(model, ids), columns=args.n).save(out)
    print(f"wrote {out}: {len(args.prompt)} prompt(s) x {args.n}, guidance {args.cfg}")


if __name__ == "__main__":
    main()
