"""Janus-Pro weights in and out: released checkpoints in both layouts, starting from parts, export.

Two layouts of the same weights exist (docs/facts.md):

- `transformers`: the converted `deepseek-community` layout, whose names are exactly our parameter
  names (`JanusProForTraining` adds no parameters to `JanusForConditionalGeneration`);
- `original`: deepseek-ai's `MultiModalityCausalLM` (`vision_model.vision_tower.*` with a fused SigLIP
  `qkv` and a `[1, N, D]` `pos_embed`, `aligner.layers.{0,2}`, `gen_vision_model.*` with LlamaGen's
  names, `gen_head.*`, `gen_embed`, `language_model.model.*`, `language_model.lm_head`).

The name mapping below is ours; everything else (modules, configs, from_pretrained) is transformers'.
Two original tensors have no place in the training model: SigLIP's attention-pool head and the VQ's
`codebook_used` counter. They are kept aside when they come in and written back on an original-layout
export (initialised as the official code initialises them when the source had none), so an export
loads into the official model with strict key checking.

Loading works unsharded and under `deepspeed.zero.Init`: each parameter is gathered on its own, filled
on rank 0 from one tensor read from disk, and re-partitioned, so a 7B is never whole on any rank.
Saving gathers one shard's worth of tensors at a time onto rank 0.

`python -m model.weights SRC DST --to original` converts between layouts.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import JanusConfig

from model.config import DTYPES, model_config, original_config

Layout = Literal["transformers", "original"]
LAYOUTS: tuple[Layout, ...] = ("transformers", "original")

TOWER = "vision_model.vision_tower."
ATTN_POOL = TOWER + "attn_pool."
CODEBOOK_USED = "gen_vision_model.quantize.codebook_used"
# LlamaGen's VectorQuantizer registers a usage counter of fixed length 65536, whatever the codebook size.
CODEBOOK_USED_LEN = 65_536
# Derived from the config, never learned; old Llama checkpoints still carry it.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 5 * 2**30


class WeightsError(ValueError):
    """A checkpoint does not fit the model: every missing, unexpected and mis-shaped key in one message."""


# ---------------------------------------------------------------------------------------------------
# Reading tensors lazily from a checkpoint (safetensors, or pickles only through weights_only=True)
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint or of a mapping: its shape, known without reading, and how to read it."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def _safetensors_entries(files: list[Path]) -> dict[str, Entry]:
    entries = {}
    for file in files:
        handle = safe_open(str(file), framework="pt")  # memory-maps; a tensor is read only when asked for
        for key in handle.keys():
            shape = tuple(handle.get_slice(key).get_shape())
            entries[key] = Entry(shape, lambda h=handle, k=key: h.get_tensor(k))
    return entries


def _pickle_entries(files: list[Path]) -> dict[str, Entry]:
    entries = {}
    for file in files:
        # weights_only: a third-party pickle must not run code. mmap: tensors stay on disk until used.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        # LlamaGen's VQ checkpoint nests the weights under "model" beside optimizer and discriminator states.
        while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            nested = [state[k] for k in ("model", "state_dict", "module") if isinstance(state.get(k), dict)]
            if not nested:
                raise WeightsError(f"{file}: no tensors at the top level nor under 'model'/'state_dict'/'module'")
            state = nested[0]
        for key, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                entries[key] = Entry(tuple(tensor.shape), lambda t=tensor: t)
    return entries


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (its index first, else every shard) or a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    for index_name in (INDEX, "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pt) in {path}")


def read_entries(path: str | Path) -> dict[str, Entry]:
    """Every tensor of a checkpoint, by name, read lazily (rotary `inv_freq` buffers dropped)."""
    files = checkpoint_files(path)
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    entries = _safetensors_entries(safetensors) if safetensors else _pickle_entries(files)
    return {k: e for k, e in entries.items() if not IGNORED.search(k)}


def detect_layout(keys: list[str] | Mapping[str, object]) -> Layout:
    """`original` if the names are deepseek-ai's, `transformers` if they are ours."""
    names = list(keys)
    if any(k.startswith(("language_model.model.", TOWER, "gen_vision_model.")) for k in names):
        return "original"
    if any(k.startswith(("model.language_model.", "model.vision_model.", "lm_head.")) for k in names):
        return "transformers"
    raise WeightsError(f"cannot tell the layout of a checkpoint whose first keys are {names[:5]}")


# ---------------------------------------------------------------------------------------------------
# The key mapping: our (transformers') names -> the original names
# ---------------------------------------------------------------------------------------------------

def _mlp_layer(prefix: str) -> Callable[[re.Match[str]], str]:
    # MlpProjector is nn.Sequential(Linear, GELU, Linear, GELU, ...): hidden layer i sits at index 2(i+1).
    return lambda m: f"{prefix}.layers.{2 * (int(m.group(1)) + 1)}."


# Applied in order to a name of ours; read against transformers' convert_janus_weights_to_hf.py MAPPINGS
# and deepseek-ai/Janus janus/models/{siglip_vit,vq_model,projector,modeling_vlm}.py.
_TO_ORIGINAL: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    # SigLIP (timm VisionTransformer inside CLIPVisionTower)
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", TOWER + "patch_embed.proj."),
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight$", TOWER + "pos_embed"),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.", TOWER + r"blocks.\1."),
    (r"^model\.vision_model\.post_layernorm\.", TOWER + "norm."),
    (r"^(vision_model\.vision_tower\.blocks\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^(vision_model\.vision_tower\.blocks\.\d+)\.self_attn\.[qkv]_proj\.", r"\1.attn.qkv."),
    (r"^(vision_model\.vision_tower\.blocks\.\d+)\.self_attn\.projection_layer\.", r"\1.attn.proj."),
    # Adaptors and generation heads
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
    (r"^model\.aligner\.hidden_layers\.(\d+)\.", _mlp_layer("aligner")),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.generation_aligner\.hidden_layers\.(\d+)\.", _mlp_layer("gen_aligner")),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    # VQ-16 (LlamaGen VQModel)
    (r"^model\.vqmodel\.", "gen_vision_model."),
    (r"^(gen_vision_model\.encoder)\.down\.", r"\1.conv_blocks."),
    (r"^(gen_vision_model\.decoder)\.up\.", r"\1.conv_blocks."),
    (r"^(gen_vision_model\.\w+\.conv_blocks\.\d+)\.block\.", r"\1.res."),
    (r"^(gen_vision_model\.\w+\.mid)\.block_1\.", r"\1.0."),
    (r"^(gen_vision_model\.\w+\.mid)\.attn_1\.", r"\1.1."),
    (r"^(gen_vision_model\.\w+\.mid)\.block_2\.", r"\1.2."),
    # DeepSeek-LLM (LlamaForCausalLM); its LM head is its own tensor
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
)
_ORIGINAL_PREFIXES = ("vision_model.", "aligner.", "gen_aligner.", "gen_embed.", "gen_head.", "gen_vision_model.",
                      "language_model.")


def original_name(name: str) -> str:
    """The original deepseek-ai name of one of our parameters (q/k/v_proj all name the fused `qkv`)."""
    out = name
    for pattern, repl in _TO_ORIGINAL:
        out = re.sub(pattern, repl, out)
    if not out.startswith(_ORIGINAL_PREFIXES):
        raise WeightsError(f"no original name for parameter {name}")
    return out


def original_groups(names: list[str]) -> dict[str, list[str]]:
    """Original name -> the names of ours it holds, in order (q, k, v for a fused qkv; one name otherwise)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(original_name(name), []).append(name)
    for orig, ours in groups.items():
        if orig.endswith((".qkv.weight", ".qkv.bias")):
            order = {".q_proj.": 0, ".k_proj.": 1, ".v_proj.": 2}
            ours.sort(key=lambda n: next(i for part, i in order.items() if part in n))
    return groups


def _split_from_original(orig: str, ours: list[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """How each of our tensors is cut from the original tensor `orig`."""
    if len(ours) == 3:  # fused qkv: rows [q; k; v]
        return {name: (lambda t, i=i: t.chunk(3, dim=0)[i].contiguous()) for i, name in enumerate(ours)}
    if orig == TOWER + "pos_embed":  # timm keeps a batch axis: [1, N, D] -> [N, D]
        return {ours[0]: lambda t: t.squeeze(0)}
    return {ours[0]: lambda t: t}


def _join_to_original(orig: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 3:
        return torch.cat(tensors, dim=0)
    if orig == TOWER + "pos_embed":
        return tensors[0].unsqueeze(0)
    return tensors[0]


def _meta_shape(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> tuple[int, ...]:
    # The mapped shape, computed on the meta device so nothing is read before the key check passes.
    return tuple(fn(torch.empty(shape, device="meta")).shape)


def is_kept_aside(original_key: str) -> bool:
    """Original tensors the training model has no place for (SigLIP attention pool, VQ codebook usage)."""
    return original_key.startswith(ATTN_POOL) or original_key == CODEBOOK_USED


def from_original(entries: Mapping[str, Entry],
                  names: list[str]) -> tuple[dict[str, Entry], dict[str, Entry], list[str]]:
    """Map original-layout entries onto our `names`: (ours, kept aside, unexpected original keys)."""
    ours: dict[str, Entry] = {}
    used = set()
    for orig, group in original_groups(names).items():
        if orig not in entries:
            continue
        used.add(orig)
        source = entries[orig]
        for name, cut in _split_from_original(orig, group).items():
            ours[name] = Entry(_meta_shape(cut, source.shape), lambda s=source, c=cut: c(s.read()))
    aside = {k: e for k, e in entries.items() if is_kept_aside(k)}
    unexpected = sorted(set(entries) - used - set(aside))
    return ours, aside, unexpected


# ---------------------------------------------------------------------------------------------------
# Checking and copying into a model, plain or ZeRO-3 partitioned
# ---------------------------------------------------------------------------------------------------

def _is_zero3(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if _is_zero3(tensor) else tuple(tensor.shape)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds: parameters and persistent buffers, by name."""
    keys = set(model.state_dict().keys())
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n in keys)
    missing = keys - set(tensors)
    if missing:  # a key state_dict has but named_parameters dropped: a tied parameter
        raise WeightsError(f"tied parameters {sorted(missing)}: the LM head must stay separate from the embedding")
    return {n: tensors[n] for n in model.state_dict().keys()}


def check_fit(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Entry],
              unexpected: Iterable[str] = (), source: str = "checkpoint") -> None:
    """Raise one WeightsError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(unexpected) | (set(found) - set(expected)))
    wrong = sorted(f"{k}: {found[k].shape} in {source}, {tuple(expected[k])} in the model"
                   for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"{source} does not fit the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
            if keys:
                parts.append(f"  {len(keys)} {title}:\n" + "\n".join(f"    {k}" for k in keys))
        raise WeightsError("\n".join(parts))


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _gathered(tensors: list[torch.Tensor], modifier_rank: int | None = None) -> AbstractContextManager:
    """Gather ZeRO-3 partitioned tensors for the duration of the block (a no-op for plain tensors)."""
    partitioned = [t for t in tensors if _is_zero3(t)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # only when the model is ZeRO-3 partitioned: model/ does not need deepspeed otherwise

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


@torch.no_grad()
def copy_into(model: nn.Module, entries: Mapping[str, Entry], names: list[str] | None = None) -> None:
    """Fill `names` (default: all) of `model` from entries, one tensor at a time; under ZeRO-3 rank 0 reads
    each tensor and DeepSpeed re-partitions it, so no rank ever holds more than one whole tensor."""
    tensors = model_tensors(model)
    for name in names if names is not None else list(tensors):
        target = tensors[name]
        with _gathered([target], modifier_rank=0):
            if not _is_zero3(target) or _rank() == 0:
                target.data.copy_(entries[name].read())


# ---------------------------------------------------------------------------------------------------
# Loading: a released checkpoint, or parts
# ---------------------------------------------------------------------------------------------------

def load_checkpoint(model: nn.Module, path: str | Path, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Load a Janus-Pro checkpoint of either layout into `model` (plain or built under zero.Init), strictly.

    Returns the tensors kept aside (original names: SigLIP attention pool, VQ codebook usage), to hand
    back to `save_checkpoint` for an original-layout export; empty for a transformers-layout source.
    """
    entries = read_entries(path)
    layout = layout or detect_layout(entries)
    expected = {n: _full_shape(t) for n, t in model_tensors(model).items()}
    if layout == "original":
        ours, aside, unexpected = from_original(entries, list(expected))
    else:
        ours, aside, unexpected = entries, {}, []
    check_fit(expected, ours, unexpected, source=f"{layout}-layout checkpoint {path}")
    copy_into(model, ours)
    return {k: e.read().clone() for k, e in aside.items()}


def kept_aside(path: str | Path) -> dict[str, torch.Tensor]:
    """Only the kept-aside tensors of a checkpoint (for exporting a model trained from it)."""
    return {k: e.read().clone() for k, e in read_entries(path).items() if is_kept_aside(k)}


def _prefixed(entries: Mapping[str, Entry], strip: str, add: str) -> dict[str, Entry]:
    return {add + k.removeprefix(strip): e for k, e in entries.items()}


def parts_entries(llm: str | Path, siglip: str | Path, vq: str | Path) -> dict[str, Entry]:
    """The three pretrained parts as original-layout entries.

    llm: a DeepSeek-LLM (Llama) transformers directory (`model.*`, `lm_head.weight`).
    siglip: timm SigLIP-L/16-384 weights (`pos_embed`, `blocks.*`, `attn_pool.*`; what the original code
        loads), bare or already prefixed `vision_model.vision_tower.`.
    vq: LlamaGen VQ-16 weights (`encoder.conv_blocks.*`, ...; nested under "model" in LlamaGen's release),
        bare or already prefixed `gen_vision_model.`.
    """
    # DeepSeek-LLM's `model.*` and `lm_head.weight` sit under `language_model.` in the original model
    out = {"language_model." + key: e for key, e in read_entries(llm).items()}
    out.update(_prefixed(read_entries(siglip), TOWER, TOWER))
    out.update(_prefixed(read_entries(vq), "gen_vision_model.", "gen_vision_model."))
    return out


PART_PREFIXES = ("model.language_model.", "lm_head.", "model.vision_model.", "model.vqmodel.")


def load_parts(model: nn.Module, llm: str | Path, siglip: str | Path, vq: str | Path) -> dict[str, torch.Tensor]:
    """Start from parts: DeepSeek-LLM, SigLIP and VQ weights into `model`, strictly for those three; the
    adaptors, generation embedding and generation head keep the model's fresh initialisation.

    Returns the kept-aside tensors (SigLIP attention pool; VQ codebook usage when the VQ file has it).
    """
    tensors = model_tensors(model)
    names = [n for n in tensors if n.startswith(PART_PREFIXES)]
    ours, aside, unexpected = from_original(parts_entries(llm, siglip, vq), names)
    check_fit({n: _full_shape(tensors[n]) for n in names}, ours, unexpected, source="parts")
    copy_into(model, ours, names)
    return {k: e.read().clone() for k, e in aside.items()}


def load_model(path: str | Path, zero_config: dict | None = None, dtype: torch.dtype = torch.float32,
               image_token_id: int | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build `JanusProForTraining` from a checkpoint's config and load its weights: (model, kept aside).

    With `zero_config` (a DeepSpeed config dict with ZeRO stage 3; torch.distributed initialised) the model
    is built under `deepspeed.zero.Init`, so each rank only ever holds its shard; its precision is then the
    config's (bf16/fp16 sections) and `dtype` applies to the unsharded model only.
    """
    from model.janus import JanusProForTraining

    config = model_config(path, image_token_id)
    if zero_config is None:
        context: AbstractContextManager = nullcontext()
    else:
        import deepspeed

        # No dtype here: the DeepSpeed config's bf16/fp16 setting decides (fp32 if neither). DeepSpeed 0.19
        # ignores an explicit dtype on an accelerator without fp16 (CPU) and silently builds bf16.
        context = deepspeed.zero.Init(config_dict_or_path=zero_config)
    with context:
        model = JanusProForTraining(config)
    if zero_config is None:
        model = model.to(dtype)
    return model, load_checkpoint(model, path)


# ---------------------------------------------------------------------------------------------------
# Saving: sharded safetensors with an index, in either layout
# ---------------------------------------------------------------------------------------------------

def initial_kept_aside(config: JanusConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kept-aside tensors as the official code initialises them (for sources that had none):
    timm's AttentionPoolLatent (latent ~ trunc_normal(dim**-0.5), torch-default Linears, LayerNorm at 1/0)
    and LlamaGen's all-zero codebook_used."""
    dim = config.vision_config.hidden_size
    hidden = int(dim * config.vision_config.mlp_ratio)
    layers = {"q": nn.Linear(dim, dim), "kv": nn.Linear(dim, 2 * dim), "proj": nn.Linear(dim, dim),
              "norm": nn.LayerNorm(dim), "mlp.fc1": nn.Linear(dim, hidden), "mlp.fc2": nn.Linear(hidden, dim)}
    out = {ATTN_POOL + "latent": nn.init.trunc_normal_(torch.empty(1, 1, dim), std=dim**-0.5)}
    for name, layer in layers.items():
        out.update({f"{ATTN_POOL}{name}.{k}": v.detach() for k, v in layer.state_dict().items()})
    out[CODEBOOK_USED] = torch.zeros(CODEBOOK_USED_LEN)
    return {k: v.to(dtype) for k, v in out.items()}


@dataclass(frozen=True)
class _Out:
    """One tensor to write: its name, the model tensors it is made of, and how they are joined."""

    key: str
    sources: list[str]
    nbytes: int
    join: Callable[[list[torch.Tensor]], torch.Tensor]


def _outputs(tensors: Mapping[str, torch.Tensor], layout: Layout, aside: Mapping[str, torch.Tensor]) -> list[_Out]:
    def nbytes(names: list[str]) -> int:
        return sum(math.prod(_full_shape(tensors[n])) * tensors[n].element_size() for n in names)

    if layout == "transformers":
        return [_Out(n, [n], nbytes([n]), lambda ts: ts[0]) for n in tensors]
    outs = [_Out(orig, group, nbytes(group), lambda ts, o=orig: _join_to_original(o, ts))
            for orig, group in original_groups(list(tensors)).items()]
    return outs + [_Out(k, [], v.numel() * v.element_size(), lambda ts, v=v: v) for k, v in aside.items()]


def _shards(outs: list[_Out], max_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        if shards[-1] and size + out.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    return shards


def _materialised(outs: list[_Out], tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    # Every rank joins each gather (a collective); only rank 0 keeps a CPU copy.
    for out in outs:
        sources = [tensors[n] for n in out.sources]
        with _gathered(sources):
            if _rank() == 0:
                yield out.key, out.join([t.detach().cpu().clone() for t in sources]).contiguous()


def save_checkpoint(model: nn.Module, path: str | Path, layout: Layout = "transformers",
                    aside: Mapping[str, torch.Tensor] | None = None, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` (plain or ZeRO-3) as sharded safetensors with an index and a config.json.

    An original-layout save also writes the kept-aside tensors (`aside`; any that are absent are
    initialised as the official code initialises them), so it holds every key of the official model.
    Collective under ZeRO-3: every rank must call it; rank 0 writes.
    """
    path = Path(path)
    tensors = model_tensors(model)
    config = model.config
    if layout == "original":
        initial = initial_kept_aside(config, dtype=next(iter(tensors.values())).dtype)
        aside = {**initial, **(aside or {})}
    else:
        aside = {}
    shards = _shards(_outputs(tensors, layout, aside), max_shard_bytes)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        written = dict(_materialised(shard, tensors))
        if _rank() == 0:
            save_file(written, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(written, name))
            total += sum(t.numel() * t.element_size() for t in written.values())
    if _rank() == 0:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if layout == "original":
            (path / "config.json").write_text(json.dumps(original_config(config), indent=2) + "\n")
        else:
            config.save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Janus-Pro checkpoint between the two layouts.")
    parser.add_argument("src", help="checkpoint directory (transformers or original layout)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", choices=LAYOUTS, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--image-token-id", type=int, default=None, help="needed for an original source")
    args = parser.parse_args(argv)
    model, aside = load_model(args.src, dtype=DTYPES[args.dtype], image_token_id=args.image_token_id)
    out = save_checkpoint(model, args.dst, args.to, aside)
    print(f"wrote {args.to}-layout checkpoint to {out}")


if __name__ == "__main__":
    main()
