"""Export a training run's ZeRO-3 checkpoint (written by any number of ranks) as a release.

    python launchers/export.py --checkpoint RUN_DIR [--step N] --out DIR --layout {transformers,original}

- `transformers`: what `JanusForConditionalGeneration.from_pretrained` and `JanusProcessor.from_pretrained`
  load: config.json, sharded safetensors with an index, the tokenizer, processor and preprocessor configs
  (mean = std = 0.5, grey padding) and a generation config that transformers' image-mode `generate` needs
  (guidance 5, bos/pad ids, `generation_kwargs` {boi_token_id, num_image_tokens}).
- `original`: deepseek-ai's layout for the official inference code (model/weights.py), kept-aside tensors
  (SigLIP attention pool, VQ codebook usage) carried over from the run's original-layout initial weights
  when it had them, else initialised as the official code does; the tokenizer beside it.

The weights come from DeepSpeed's own consolidation (pipeline/checkpoint.py, one process, no
torch.distributed), reading the checkpoint's files as data only; like training, the export verifies the
checkpoint against its COMPLETE and loads one this code did not write only with --trust-checkpoint. It refuses
unless it holds every tensor of the model, frozen ones included, and ends with a model card (README.md: what it
was trained from, its data's fingerprints, how to load it) and SHA256SUMS over every file it wrote.

The tokenizer is the run's own (its fingerprint in the run's fingerprints.json; another only with
--allow-other-tokenizer). One that adds no BOS when encoding is exported made to add it: JanusProcessor prepends the
default system prompt to what the chat template writes, and DeepSeek's code encodes its prompts with the tokenizer's
special tokens, so only the tokenizer can put BOS first, as training did (model/tokenizer.py `with_bos`).

A LoRA run (--lora-rank) exports `--lora-export merged` by default: its adapters folded into their layers
(W + alpha/r * B @ A) under transformers' plain names, so the release is exactly like any other. `--lora-export
adapter` writes a peft adapter folder instead (adapter_config.json, adapter_model.safetensors with the adapters and,
as peft's `modules_to_save`, the parts the stage trained whole): `PeftModel.from_pretrained(base, folder)` on the
weights the run started from (its --init; for a run that started from another run, that run's export).

It writes into a folder of its own making beside --out (a fresh name, never an existing folder), then moves it
into place: the only folders it removes are that one and an earlier export at --out (its export.json says so).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model.chat_format import CHAT_TEMPLATE, generation_prompt_ids, understanding_prompt_ids
from model.config import DTYPES, num_image_tokens
from model.config import model_config as resolve_model_config
from model.generate import generation_config
from model.hub import hub_source
from model.janus import JanusProForTraining
from model.manifest import MANIFEST_NAME, Manifest, file_sha256, tokenizer_fingerprint
from model.tokenizer import (
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE_PLACEHOLDER,
    SpecialTokens,
    adds_bos,
    load_tokenizer,
    with_bos,
)
from model.weights import (
    LAYOUTS,
    Entry,
    Layout,
    check_fit,
    detect_layout,
    from_original,
    initial_kept_aside,
    kept_aside,
    model_tensors,
    read_entries,
    save_checkpoint,
)
from pipeline import checkpoint
from pipeline.config import TrainConfig
from pipeline.run_dir import CONFIG, config_file, fingerprints_file, is_run_directory

CHECKSUMS = "SHA256SUMS"
LORA_EXPORTS = ("merged", "adapter")  # --lora-export: what a LoRA run's export holds
MODEL_CARD = "README.md"
# How a model card says to load each layout; tests/integration/test_export.py runs the transformers one.
USAGE = {
    "transformers": """```python
import torch
from PIL import Image
from transformers import JanusForConditionalGeneration, JanusProcessor

path = "."  # this directory, or the repository it is published as
model = JanusForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
processor = JanusProcessor.from_pretrained(path)

# Understanding: the chat template and the processor write the prompt exactly as training did
# (system prompt, image tokens, "<|Assistant|>:" at the end).
image = Image.open("photo.jpg").convert("RGB")
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in this image?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.device, dtype=model.dtype)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False, generation_mode="text")
answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

# Generation: 576 image tokens, classifier-free guidance 5 (generation_config.json), decoded by the VQ.
messages = [{"role": "user", "content": [{"type": "text", "text": "A red apple on a wooden table."}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", processor_kwargs={"generation_mode": "image"})
ids = model.generate(**inputs.to(model.device), generation_mode="image", do_sample=True)
pixels = model.decode_image_tokens(ids).float()  # [batch, 384, 384, 3] in [-1, 1]
images = [Image.fromarray(((p.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()) for p in pixels]
images[0].save("apple.png")
```
""",
    "original": """In deepseek-ai's original layout (its official inference code's), with the tokenizer beside it.
janus-pipeline converts its weights to the transformers layout:
`python -m model.weights THIS_DIR OUT --to transformers`.
""",
}


@dataclass(frozen=True)
class Exported:
    path: Path
    source: Path     # the ZeRO checkpoint it came from
    tensors: int     # tensors written (the original layout fuses SigLIP's q/k/v and adds the kept-aside ones)
    files: list[str]


def run_config(run_dir: Path) -> TrainConfig:
    """The resolved configuration a run saved beside its checkpoints."""
    path = config_file(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG}; is it a training run directory (launchers/stageN.py)?")
    return TrainConfig.load(path)


def _run_facts(config: TrainConfig) -> dict:
    """What an export reads of a run's saved config: the one place that names its fields."""
    return {"stage": config.stage, "init": config.model.init, "tokenizer": config.model.tokenizer,
            "data": list(config.data.data)}


def _aside_for(root: str | None, model_config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kept-aside tensors: those of the weights the chain of runs started from (`root`) if in the original
    layout, else initialised as the official code does, from a fixed seed so that re-exports are identical."""
    root = Path(root) if root else None
    if root is not None and root.exists() and detect_layout(read_entries(root)) == "original":
        return {k: v.to(dtype) for k, v in kept_aside(root).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return initial_kept_aside(model_config, dtype)


def write_checksums(directory: Path) -> list[str]:
    """`sha256sum -c SHA256SUMS` checks the export; returns the files it covers."""
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    (directory / CHECKSUMS).write_text("".join(f"{file_sha256(directory / f)}  {f}\n" for f in files))
    return files


def processor_tokenizer(path: str | Path):
    """The tokenizer with the named tokens JanusProcessor reads (`image_token`, `boi_token`, `eoi_token`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), extra_special_tokens={
        "image_token": IMAGE_PLACEHOLDER, "boi_token": BEGIN_OF_IMAGE, "eoi_token": END_OF_IMAGE})


def check_chat_template(processor) -> None:
    """Refuse a processor whose chat template does not give the training prompts (model/chat_format.py), e.g.
    with a tokenizer that does not add BOS as DeepSeek's does (the template leaves BOS to the tokenizer)."""
    user = [{"role": "user", "content": [{"type": "text", "text": "Describe a cat."}]}]
    tokenizer, image = processor.tokenizer, {"generation_mode": "image"}
    pairs = {"understanding": (processor.apply_chat_template(user, add_generation_prompt=True, tokenize=True),
                               understanding_prompt_ids(tokenizer, "Describe a cat.", n_images=0)),
             "generation": (processor.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                          processor_kwargs=image),
                            generation_prompt_ids(tokenizer, "Describe a cat."))}
    for task, (theirs, ours) in pairs.items():
        theirs = torch.as_tensor(theirs)[0].tolist()
        if theirs != ours:
            raise ValueError(f"the exported processor's {task} prompt is not the one training used:\n"
                             f"  chat template {theirs}\n  training      {ours}\n"
                             f"(does the tokenizer add BOS {tokenizer.bos_token!r} when encoding, as DeepSeek's does?)")


def write_inference_files(out: Path, model_config, tokenizer_dir: str | Path) -> None:
    """Tokenizer, processor and generation config of a transformers-layout export."""
    from transformers import JanusImageProcessor, JanusProcessor

    tokenizer = with_bos(processor_tokenizer(tokenizer_dir))
    special = SpecialTokens.from_tokenizer(tokenizer)
    size = model_config.vision_config.image_size
    # Janus' images: long side to 384, padded with grey 127 (= 0.5 * 255), scaled to [-1, 1] (mean = std = 0.5).
    image_processor = JanusImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3)
    # The chat template and the default system prompt, as the public Janus checkpoints carry them, so that
    # `apply_chat_template` gives the prompts training used (model/chat_format.py).
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               use_default_system_prompt=True, num_image_tokens=num_image_tokens(model_config))
    processor.save_pretrained(str(out))  # processor_config.json (with the image processor inside)
    check_chat_template(JanusProcessor.from_pretrained(str(out)))
    image_processor.save_pretrained(str(out))  # preprocessor_config.json, which older readers look for
    generation_config(model_config, special).save_pretrained(str(out))


def _checkpoint_step(source: Path) -> int:
    """The step of a complete checkpoint, from the marker written once every rank had saved it."""
    return int(json.loads((source / checkpoint.COMPLETE).read_text())["step"])


def _lineage(run_dir: Path, source: Path) -> tuple[list[dict], str | None]:
    """The runs behind an export, oldest first (each started from the one before it through --init), with the
    step each reached (an earlier run: its latest checkpoint, which --init takes), and what the oldest started
    from: released weights, or None for random weights."""
    runs: list[dict] = []
    path: Path | None = run_dir
    while path is not None and is_run_directory(path) and len(runs) < 16:
        facts = _run_facts(run_config(path))
        latest = source if not runs else checkpoint.latest_checkpoint(path)
        runs.append({**facts, "run": str(path), "step": _checkpoint_step(latest) if latest else None})
        path = Path(facts["init"]) if facts["init"] else None
    return runs[::-1], (str(path) if path is not None else None)


def _manifest_row(stage: int, path: str) -> str:
    """A data manifest as a table row: its task, rows and sha256, and the tokenizer and VQ it was made with."""
    file = Path(path) / MANIFEST_NAME if Path(path).is_dir() else Path(path)
    try:
        m = Manifest.read(file)
    except (OSError, ValueError) as exc:  # moved or from another schema version: say so, still export
        return f"| {stage} | `{path}` | unreadable: {type(exc).__name__} | | | | |"
    return (f"| {stage} | `{path}` | {m.task} | {m.rows_written} | `{file_sha256(file)}` | `{m.tokenizer_fingerprint}`"
            f" | `{m.vq_fingerprint or '-'}` |")


def model_card(run_dir: Path, source: Path, layout: Layout, dtype: str, tokenizer_fp: str,
               trained_fp: str | None = None) -> str:
    """README.md of an export: what it was trained from, on which data, and how to load it. `trained_fp`: the
    fingerprint of the tokenizer as training had it, where the export made it add BOS (so `tokenizer_fp` differs)."""
    runs, root = _lineage(run_dir, source)
    started = f"`{root}`" if root else "random weights"
    if root and hub_source(root):
        started = f"`{hub_source(root)}` (from the Hugging Face cache, `{root}`)"
    tokenizer_line = f"The tokenizer exported here has the fingerprint `{tokenizer_fp}`."
    if trained_fp:
        tokenizer_line = (f"The tokenizer exported here has the fingerprint `{tokenizer_fp}`: the one training used "
                          f"(`{trained_fp}`), made to add BOS when encoding, which transformers' processor and "
                          "DeepSeek's code leave to the tokenizer (training inserted it itself).")
    last = runs[-1]
    rows = [f"| {r['stage']} | `{r['run']}` | {r['step']} |" for r in runs]
    data = [_manifest_row(r["stage"], m) for r in runs for m in r["data"]]
    header = "---\nlibrary_name: transformers\npipeline_tag: any-to-any\ntags:\n- janus-pro\n---\n\n"
    return "\n".join([
        (header if layout == "transformers" else "") + f"# Janus-Pro: stage {last['stage']}, step {last['step']}",
        "",
        f"Trained with janus-pipeline and exported from checkpoint `{source.name}` of the run `{run_dir}`, "
        f"in the {layout} layout, {dtype}.",
        "",
        "## Training",
        "",
        f"Started from {started}, then these runs, oldest first "
        "(each started from the one before it):",
        "",
        "| stage | run | step |", "|---|---|---|", *rows,
        "",
        "## Data",
        "",
        "The manifests each stage trained on, with the fingerprints of the tokenizer and VQ that made them.",
        "",
        "| stage | manifest | task | rows | manifest sha256 | tokenizer fingerprint | VQ fingerprint |",
        "|---|---|---|---|---|---|---|", *data,
        "",
        tokenizer_line,
        "",
        "## Use",
        "",
        USAGE[layout],
        "## Files",
        "",
        f"`sha256sum -c {CHECKSUMS}` checks every file; `export.json` names the checkpoint it came from.",
        "",
    ])


def check_run_tokenizer(run_dir: Path, tokenizer, tokenizer_dir: str | Path, given: bool) -> None:
    """Refuse a tokenizer other than the one the run trained with (its fingerprint in the run's fingerprints.json):
    the export would pair the weights with other token ids. A run from before fingerprints were kept is not
    checked. `given`: named by --tokenizer (else the run's own path, whose tokenizer may have changed since)."""
    recorded = fingerprints_file(run_dir)
    try:
        theirs = json.loads(recorded.read_text()).get("tokenizer_fingerprint")
    except (OSError, ValueError, AttributeError):
        return
    ours = tokenizer_fingerprint(tokenizer)
    if not theirs or theirs == ours:
        return
    which = f"--tokenizer {tokenizer_dir}" if given else f"the run's tokenizer {tokenizer_dir} (changed since)"
    fix = ("leave --tokenizer out to export the run's own" if given else
           "pass --tokenizer with the tokenizer the run trained with")
    raise ValueError(f"{which}: not the tokenizer {run_dir} trained with (fingerprint {ours[:12]}, the run's "
                     f"{theirs[:12]} in {recorded.name}): {fix}, or --allow-other-tokenizer if it encodes text to "
                     "the same ids")


def export(run_dir: str | Path, out: str | Path, layout: Layout = "transformers", step: int | None = None,
           dtype: str = "bf16", tokenizer_dir: str | Path | None = None, trust: bool = False,
           allow_other_tokenizer: bool = False, lora_export: str = "merged") -> Exported:
    """A run's checkpoint at `step` (default: its latest complete one) as a release in `layout`; `trust`: export
    a checkpoint this code did not write (unverified; still read as data only); `allow_other_tokenizer`: export
    with a `tokenizer_dir` whose fingerprint is not the one the run recorded; `lora_export`: a LoRA run's adapters
    merged into the weights, or as a peft adapter folder."""

    if lora_export not in LORA_EXPORTS:
        raise ValueError(f"--lora-export must be one of {LORA_EXPORTS}, not {lora_export!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    run_dir, out = Path(run_dir), Path(out)
    check_out(run_dir, out)
    config = run_config(run_dir)
    facts = _run_facts(config)
    lora = config.lora.settings()
    if lora_export == "adapter" and (lora is None or layout != "transformers"):
        raise ValueError(f"--lora-export adapter: {run_dir} trained without LoRA (--lora-rank 0): export it whole"
                         if lora is None else "--lora-export adapter: peft adapters apply to the transformers layout; "
                         "drop --layout original")
    source = checkpoint.find_checkpoint(run_dir, step)
    damaged = checkpoint.problems(source, trust=trust)
    if damaged and not checkpoint.written_here(source) and not trust:
        raise ValueError(f"{source}: {damaged[0]}")
    if damaged:
        raise ValueError(f"{source} is damaged: {'; '.join(damaged[:3])}; export another --step")
    given = tokenizer_dir is not None
    tokenizer_dir = tokenizer_dir or facts["tokenizer"] or facts["init"]
    tokenizer = load_tokenizer(tokenizer_dir)
    if not allow_other_tokenizer:
        check_run_tokenizer(run_dir, tokenizer, tokenizer_dir, given)
    special = SpecialTokens.from_tokenizer(tokenizer)
    model_config = resolve_model_config(config.model.model, special.image_placeholder)

    if lora_export == "adapter":
        return _export_adapter(run_dir, out, source, config, DTYPES[dtype])
    state = checkpoint.plain_state(source, lora)
    with torch.device("meta"):  # shapes and names only: the consolidated tensors become the parameters
        model = JanusProForTraining(model_config)
    expected = {name: tuple(t.shape) for name, t in model_tensors(model).items()}
    found = {name: Entry(tuple(t.shape), lambda t=t: t) for name, t in state.items()}
    check_fit(expected, found, source=f"consolidated ZeRO checkpoint {source}")
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, strict=True, assign=True)
    del state

    aside = _aside_for(_lineage(run_dir, source)[1], model_config, DTYPES[dtype]) if layout == "original" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    trained_fp = None if adds_bos(tokenizer) else tokenizer_fingerprint(tokenizer)  # before the export adds BOS
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # new: this command's own
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a release is read by others
        written = _write_release(model, tmp, layout, aside, expected, model_config, tokenizer, tokenizer_dir)
        (tmp / "export.json").write_text(json.dumps({"source": str(source.resolve()), "layout": layout,
                                                     "dtype": dtype, "stage": facts["stage"]}, indent=2) + "\n")
        card = model_card(run_dir, source, layout, dtype, tokenizer_fingerprint(with_bos(tokenizer)), trained_fp)
        (tmp / MODEL_CARD).write_text(card)
        files = write_checksums(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(path=out, source=source, tensors=written, files=files)


def _export_adapter(run_dir: Path, out: Path, source: Path, config: TrainConfig, dtype: torch.dtype) -> Exported:
    """A LoRA run's checkpoint as a peft adapter folder, checked to hold an adapter for every adapted layer."""
    from safetensors.torch import save_file

    from model.lora import adapter_state, modules_to_save, peft_config

    lora, trainable = config.lora.settings(), config.optim.trainable
    state = checkpoint.consolidated_state(source)
    tensors = {k: v.to(dtype).contiguous() for k, v in adapter_state(state, trainable).items()}
    layers = {k.split(".base_layer.")[0] for k in state if ".base_layer." in k}
    if not layers or len([k for k in tensors if ".lora_" in k]) != 2 * len(layers):
        raise ValueError(f"{source}: not a LoRA checkpoint of {len(layers)} adapted layers")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        peft_config(lora, modules_to_save(trainable), base=config.model.init).save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "export.json").write_text(json.dumps({"source": str(source.resolve()), "layout": "transformers",
                                                     "lora_export": "adapter", "base": config.model.init,
                                                     "stage": config.stage}, indent=2) + "\n")
        (tmp / MODEL_CARD).write_text(ADAPTER_CARD.format(step=_checkpoint_step(source), run=run_dir,
                                                          base=config.model.init, rank=lora.rank, alpha=lora.alpha))
        files = write_checksums(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(path=out, source=source, tensors=len(tensors), files=files)


ADAPTER_CARD = """# Janus-Pro LoRA adapter: step {step} of `{run}`

LoRA rank {rank}, alpha {alpha:g}, with the parts the stage trained whole as peft's `modules_to_save`. It applies to
the weights the run started from, `{base}` (for a run that started from another run: that run's export):

```python
from peft import PeftModel
from transformers import JanusForConditionalGeneration

base = JanusForConditionalGeneration.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, ".").eval()  # or .merge_and_unload()
```

`sha256sum -c SHA256SUMS` checks every file; `export.json` names the checkpoint it came from.
"""


def _write_release(model, tmp: Path, layout: Layout, aside, expected: dict, model_config, tokenizer,
                   tokenizer_dir) -> int:
    """The weights, checked, and the files that load them into `tmp`; returns how many tensors were written."""
    save_checkpoint(model, tmp, layout, aside)
    written = read_entries(tmp)
    if layout == "original":
        ours, _, unexpected = from_original(written, list(expected))
        check_fit(expected, ours, unexpected, source=f"written {tmp}")
    else:
        check_fit(expected, written, source=f"written {tmp}")
    if layout == "transformers":
        write_inference_files(tmp, model_config, tokenizer_dir)
    else:
        with_bos(tokenizer).save_pretrained(str(tmp))  # DeepSeek's code encodes prompts with the tokenizer's BOS
    return len(written)


def _move_into_place(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`, whole (a reader never sees a half-written export); an earlier export there (check_out
    allowed only that) is first moved aside under a fresh name of this command's own, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def check_out(run_dir: Path, out: Path) -> None:
    """An export replaces --out: never the run it reads (or a folder holding it), nor a folder that is not an
    earlier export."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise ValueError(f"--out {out}: it {'is' if target == run else 'holds'} the run directory {run_dir}, which "
                         "the export would replace; choose a new folder")
    if target.is_dir() and any(target.iterdir()) and not is_export(target):
        raise ValueError(f"--out {out}: an existing folder that is not an export (no export.json); the export "
                         "replaces --out, so choose a new or empty folder")


def is_export(path: Path) -> bool:
    """Whether `path` holds an export this code wrote: its export.json names the source and layout."""
    try:
        marker = json.loads((path / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and "source" in marker and marker.get("layout") in LAYOUTS


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export a training run's ZeRO-3 checkpoint as a release.")
    parser.add_argument("--checkpoint", required=True, help="a training run directory (OUTPUT of launchers/stageN.py)")
    parser.add_argument("--step", type=int, default=None, help="which complete checkpoint (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory (replaced if it holds an earlier export)")
    parser.add_argument("--layout", choices=LAYOUTS, default="transformers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokenizer", default=None, help="default: the run's --tokenizer or --init")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="export with a --tokenizer other than the one the run trained with (its fingerprint "
                             "differs): only one that encodes text to the same ids")
    parser.add_argument("--lora-export", choices=LORA_EXPORTS, default="merged",
                        help="a LoRA run's export: merged (the adapters folded into the weights, a release like any "
                             "other) or adapter (a peft adapter folder for the weights the run started from)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="export a checkpoint this code did not write (its files unverified, still read as "
                             "data only)")
    args = parser.parse_args(argv)
    try:
        result = export(args.checkpoint, args.out, args.layout, args.step, args.dtype, args.tokenizer,
                        args.trust_checkpoint, args.allow_other_tokenizer, args.lora_export)
    except (ValueError, FileNotFoundError) as error:  # a wrong path or an unfit checkpoint: say it in one line
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None  # as training's refusals: a person must act, a retry fails the same way
    print(f"exported {result.source} -> {result.path} ({args.layout} layout, {args.dtype}, {result.tensors} tensors, "
          f"{len(result.files)} files, checksums in {result.path / CHECKSUMS})")
