"""LoRA (with peft) on the LLM: which weights freeze, which train, and how adapters fold back into the weights.

With LoRA on (`--lora-rank R`), the parts LoRA adapts keep their own weights frozen (the LLM; SigLIP too, which
Stage III would otherwise train whole) and low-rank adapters on `--lora-target-modules` train instead; every other
part the stage trains (adaptors, generation embedding and head, LM head) still trains whole.

The adapters are injected in place (`peft.inject_adapter_in_model`), not by wrapping the model in a PeftModel: every
other parameter keeps transformers' name, so --init weights load as they are, and only an adapted layer's names
change (`...q_proj.weight` -> `...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`,
`...q_proj.lora_B.default.weight`). `merged_state` folds adapters back (W + alpha/r * B @ A), giving a state with
the plain names any export or the next stage loads; `adapter_state` gives peft's adapter file instead.

peft is imported only where adapters are made (training, the adapter export): merging and counting need only torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from model.stages import PARTS, part_of, set_trainable

# The LLM's attention and MLP projections (Llama's names): the default targets.
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A regular expression peft matches against whole module names (re.fullmatch). Anchored on the LLM's prefix: SigLIP's
# attention has q_proj, k_proj and v_proj too.
DEFAULT_TARGETS = (re.escape(PARTS["llm"]) + r"layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LLM_PROJECTIONS) + ")")
# Parts whose own weights freeze under LoRA: the adapters may sit only in them (the rest trains whole or never).
ADAPTED_PARTS = ("llm", "und_encoder")
ADAPTER = "default"  # peft's adapter name, part of the injected parameters' names
# The injected parameters: `<layer>.lora_A.default.weight` and `<layer>.lora_B.default.weight`.
ADAPTER_WEIGHT = re.compile(rf"^(?P<layer>.+)\.lora_(?P<which>[AB])\.{ADAPTER}\.weight$")
BASE_LAYER = ".base_layer."


@dataclass(frozen=True)
class LoraSettings:
    """What shapes the adapters; saved with the run (its config.yaml), so a resume rebuilds the same ones."""

    rank: int
    alpha: float
    dropout: float
    target_modules: str  # a regular expression over whole module names

    @property
    def scaling(self) -> float:
        """peft's factor on an adapter's output (without rsLoRA): alpha / rank."""
        return self.alpha / self.rank


def peft_config(settings: LoraSettings, modules_to_save: list[str] | None = None, base: str | None = None):
    """The peft LoraConfig of these settings (`modules_to_save`: parts an adapter folder carries whole)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, modules_to_save=modules_to_save,
                      base_model_name_or_path=base)


def target_names(model: nn.Module, targets: str) -> list[str]:
    """The names of the modules `targets` matches, as peft matches them (the whole name)."""
    pattern = re.compile(targets)
    return [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]


def target_problem(model: nn.Module, targets: str) -> str | None:
    """Why `targets` cannot be adapted on `model` (None when it can): it must match at least one module, only
    linear layers (what the adapters and their merge handle), and only in ADAPTED_PARTS."""
    names = target_names(model, targets)
    if not names:
        example = next(n for n, m in model.named_modules() if n.startswith(PARTS["llm"]) and isinstance(m, nn.Linear))
        return (f"matches no module (a regular expression over whole module names); the LLM's linear layers are "
                f"named like {example}, with projections {', '.join(LLM_PROJECTIONS)}")
    not_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if not_linear:
        return f"matches modules that are not linear layers, e.g. {not_linear[0]} ({len(not_linear)} in all)"
    outside = [n for n in names if part_of(n + ".") not in ADAPTED_PARTS]
    if outside:
        return (f"matches {outside[0]} (and {len(outside) - 1} more) outside the parts LoRA adapts "
                f"({', '.join(ADAPTED_PARTS)}): the others train whole or never")
    return None


def fully_trained(trainable: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The parts of a stage's `trainable` that still train whole under LoRA."""
    return tuple(part for part in trainable if part not in ADAPTED_PARTS)


def is_adapter(name: str) -> bool:
    return ADAPTER_WEIGHT.match(name) is not None


def inject(model: nn.Module, settings: LoraSettings, seed: int) -> list[str]:
    """Add the adapters to `model` in place (before a DeepSpeed engine is built: it makes them ZeRO-3 parameters);
    return their names. peft reads a layer's in/out features from the module, never its (partitioned) weight.

    lora_A is drawn from a seed of its own, so every rank draws the same adapters (ZeRO-3 does not broadcast
    parameters made outside zero.Init) and a resumed run rebuilds them before loading over them; lora_B starts at
    0, so the adapted model starts as the loaded one."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config(settings), model, adapter_name=ADAPTER)
    return [name for name, _ in model.named_parameters() if is_adapter(name)]


def set_trainable_with_lora(model: nn.Module, trainable: tuple[str, ...] | list[str]) -> list[str]:
    """The training rule under LoRA: the adapters and the parts `fully_trained` keeps train, nothing else (the
    adapted parts' own weights freeze); return the trainable names."""
    names = set_trainable(model, fully_trained(trainable))
    for name, param in model.named_parameters():
        if is_adapter(name):
            param.requires_grad_(True)
            names.append(name)
    return names


def adapter_parameter_count(model: nn.Module, settings: LoraSettings) -> int:
    """Parameters the adapters add: rank x (in + out) per adapted linear layer (counted on a meta model)."""
    layers = [model.get_submodule(name) for name in target_names(model, settings.target_modules)]
    return sum(settings.rank * (layer.in_features + layer.out_features) for layer in layers)


def adapted_inputs(model: nn.Module, settings: LoraSettings, prefix: str) -> list[int]:
    """The input widths of the adapted linear layers under `prefix` (one decoder layer, for the memory model)."""
    return [model.get_submodule(name).in_features for name in target_names(model, settings.target_modules)
            if name.startswith(prefix)]


def _adapter_pairs(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        found = ADAPTER_WEIGHT.match(name)
        if found:
            pairs.setdefault(found["layer"], {})[found["which"]] = tensor
    broken = sorted(layer for layer, pair in pairs.items() if set(pair) != {"A", "B"}
                    or layer + BASE_LAYER + "weight" not in state)
    if broken:
        raise ValueError(f"LoRA layers without lora_A, lora_B and base_layer.weight: {broken[:3]}")
    return pairs


def merged_state(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The adapters folded into their layers (W + alpha/r * B @ A, computed in fp32) under transformers' plain
    names: what a model without adapters loads and computes the same logits with (dropout is off at inference)."""
    pairs = _adapter_pairs(state)
    out = {}
    for name, tensor in state.items():
        if is_adapter(name):
            continue
        plain = name.replace(BASE_LAYER, ".")
        layer = name.split(BASE_LAYER)[0]
        if BASE_LAYER in name and name.endswith(BASE_LAYER + "weight"):
            a, b = pairs[layer]["A"].float(), pairs[layer]["B"].float()
            tensor = (tensor.float() + settings.scaling * (b @ a)).to(tensor.dtype)
        out[plain] = tensor
    return out


def adapter_state(state: dict[str, torch.Tensor], trainable: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """peft's adapter file (adapter_model.safetensors) of a LoRA run's state: the adapters, and the parts trained
    whole as `modules_to_save`, under the names `PeftModel.from_pretrained` reads (`base_model.model.` + the
    module's name; the adapter's name left out)."""
    prefixes = tuple(PARTS[part] for part in fully_trained(trainable))
    out = {}
    for name, tensor in state.items():
        found = ADAPTER_WEIGHT.match(name)
        if found:
            out[f"base_model.model.{found['layer']}.lora_{found['which']}.weight"] = tensor
        elif name.startswith(prefixes):
            out[f"base_model.model.{name}"] = tensor
    return out


def modules_to_save(trainable: tuple[str, ...] | list[str]) -> list[str]:
    """The modules an adapter folder carries whole: the parts trained whole, by module name (full names: peft
    matches a suffix, and `model.aligner` must not catch `model.generation_aligner`)."""
    return [PARTS[part].rstrip(".") for part in fully_trained(trainable)]
