"""Export (issue 8): ZeRO-3 checkpoints of 1 and 2 CPU ranks -> transformers and original layouts; generation.

Both runs train Stage III for one step at learning rate 0 from the same initial weights, so their checkpoints
hold those weights exactly (frozen VQ included) while being real ZeRO-3 checkpoints of different world sizes.
"""

import hashlib
from pathlib import Path

import pytest
import torch

from tests.support import REPO, Ranks, forged_run, relisted, run_ranks

pytestmark = pytest.mark.integration  # every test uses the checkpoints the ranks write

LAUNCHER = str(Path(REPO) / "launchers" / "stage3.py")


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory, special) -> Path:
    from model.config import preset_config
    from model.janus import JanusProForTraining
    from model.weights import save_checkpoint

    torch.manual_seed(3)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
    return save_checkpoint(model, tmp_path_factory.mktemp("init"), "transformers")


def stage3_args(shard_corpus, tokenizer_dir, init: Path, run: Path) -> list[str]:
    return [LAUNCHER, "--tokenizer", str(tokenizer_dir), "--init", str(init), "--output", str(run),
            "--data", *[str(shard_corpus[t]) for t in ("understanding", "generation", "text")],
            "--seq-len", "1400", "--rows-per-step", "2", "--train-steps", "1", "--save-every", "1",
            "--learning-rate", "0", "--num-workers", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shard_corpus, tokenizer_dir, init_weights) -> dict[int, Path]:
    out = {}
    for world in (2, 1):
        run = tmp_path_factory.mktemp(f"run{world}")
        run_ranks(stage3_args(shard_corpus, tokenizer_dir, init_weights, run), world_size=world, timeout=300)
        out[world] = run
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[tuple[int, str], Path]:
    from pipeline.export import export

    root = tmp_path_factory.mktemp("exports")
    return {(world, layout): export(runs[world], root / f"{layout}-{world}", layout, dtype="fp32").path
            for world in (1, 2) for layout in ("transformers", "original")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from model.weights import read_entries

    return {k: e.read() for k, e in read_entries(path).items()}


def test_transformers_export_loads_and_gives_the_training_models_logits(exported, init_weights, tokenizer):
    from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor

    from model.chat_format import text_sample
    from model.weights import load_model

    path = exported[(2, "transformers")]
    model, info = JanusForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    processor = JanusProcessor.from_pretrained(str(path))
    assert list(processor.image_processor.image_mean) == [0.5] * 3 == list(processor.image_processor.image_std)
    assert processor.num_image_tokens == 576 and processor.image_token == "<image_placeholder>"
    generation = GenerationConfig.from_pretrained(str(path))
    special = tokenizer.convert_tokens_to_ids
    assert generation.guidance_scale == 5 and generation.pad_token_id == special("<｜▁pad▁｜>")
    assert generation.bos_token_id == tokenizer.bos_token_id
    assert generation.generation_kwargs == {"boi_token_id": special("<begin_of_image>"), "num_image_tokens": 576}
    assert (path / "preprocessor_config.json").is_file() and (path / "tokenizer.json").is_file()

    training, _ = load_model(init_weights)  # the training model, with the weights both runs started from
    ids = torch.tensor([text_sample(tokenizer, "The quick brown fox jumps over the lazy dog.").input_ids])
    with torch.no_grad():
        ours = JanusForConditionalGeneration.forward(training.eval(), input_ids=ids).logits
        theirs = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_checksums_cover_every_file(exported):
    for path in exported.values():
        lines = (path / "SHA256SUMS").read_text().splitlines()
        listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
        on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
        assert set(listed) == on_disk and "README.md" in listed  # the model card too
        for name, digest in listed.items():
            assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest, name


def test_two_rank_export_equals_one_rank_export_and_the_weights(exported, init_weights):
    start = tensors(init_weights)
    for layout in ("transformers", "original"):
        two, one = tensors(exported[(2, layout)]), tensors(exported[(1, layout)])
        assert sorted(two) == sorted(one)
        for k in two:
            assert torch.equal(two[k], one[k]), (layout, k)
    two = tensors(exported[(2, "transformers")])
    assert sorted(two) == sorted(start)  # every tensor, the frozen VQ included, came through ZeRO-3
    for k in start:
        assert torch.equal(two[k], start[k]), k


def test_original_export_has_the_official_keys_and_reimports_losslessly(exported, init_weights, official_keys):
    from model.config import preset_config
    from model.weights import load_model, read_entries

    path = exported[(2, "original")]
    shapes = {k: tuple(e.shape) for k, e in read_entries(path).items()}
    assert shapes == official_keys(preset_config("tiny"))
    model, aside = load_model(path)
    start = tensors(init_weights)
    state = model.state_dict()
    assert sorted(state) == sorted(start) and len(aside) > 0
    for k in start:
        assert torch.equal(state[k], start[k]), k
    assert (path / "tokenizer.json").is_file()


def test_export_refuses_a_checkpoint_missing_a_parameter(runs, tmp_path, monkeypatch):
    from model.weights import WeightsError
    from pipeline import checkpoint
    from pipeline.export import export

    real = checkpoint.consolidated_state

    def without_vq_codebook(source):
        state = real(source)
        del state["model.vqmodel.quantize.embedding.weight"]  # e.g. frozen parameters excluded at save
        return state

    monkeypatch.setattr(checkpoint, "consolidated_state", without_vq_codebook)
    with pytest.raises(WeightsError, match="1 missing"):
        export(runs[1], tmp_path / "out", "transformers", dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_export_never_replaces_its_run_or_a_folder_that_is_not_an_export(runs, tmp_path):
    from pipeline.export import export

    run = runs[1]
    for out in (run, run.parent):  # the run itself, a folder holding it
        with pytest.raises(ValueError, match="the export would replace"):
            export(run, out, "transformers", dtype="fp32")
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("step-*/COMPLETE"))
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not an export"):
        export(run, precious, "transformers", dtype="fp32")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_export_refuses_a_damaged_checkpoint(runs, tmp_path):
    import shutil

    from pipeline.checkpoint import latest_checkpoint
    from pipeline.export import export

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    shard = sorted(latest_checkpoint(run).glob("*model_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"is damaged: {shard.name} does not match its sha256"):
        export(run, tmp_path / "out", "transformers", dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_our_guidance_loop_equals_transformers_generate(exported, tokenizer):
    from model.generate import decode_images, generate_image_ids, load_exported

    model, tokenizer = load_exported(exported[(1, "transformers")])
    prompts = ["A red motorcycle.", "A brown tabby cat with green eyes looks to the side."]  # ragged: left-padded
    theirs = generate_image_ids(model, tokenizer, prompts, cfg=5, greedy=True, backend="transformers")
    ours = generate_image_ids(model, tokenizer, prompts, cfg=5, greedy=True, backend="loop")
    assert theirs.shape == (2, 576)
    assert torch.equal(theirs, ours)
    alone = generate_image_ids(model, tokenizer, prompts[:1], cfg=5, greedy=True, backend="loop")
    assert torch.equal(alone[0], ours[0])  # padding a shorter prompt changes nothing
    sampled = generate_image_ids(model, tokenizer, prompts, cfg=5, seed=1)
    assert torch.equal(sampled, generate_image_ids(model, tokenizer, prompts, cfg=5, seed=1))  # seeded
    unguided = generate_image_ids(model, tokenizer, prompts, cfg=1, greedy=True)  # guidance off: our loop
    assert unguided.shape == (2, 576)
    images = decode_images(model, ours)
    assert len(images) == 2 and images[0].size == (384, 384)


def test_exported_chat_template_gives_the_training_prompts(exported, tokenizer, photos):
    from transformers import JanusProcessor

    from model.chat_format import (
        JANUS_SYSTEM_PROMPT,
        Turn,
        generation_prompt_ids,
        understanding_prompt_ids,
        understanding_sample,
    )
    from model.tokenizer import IMAGE_PLACEHOLDER

    processor = JanusProcessor.from_pretrained(str(exported[(1, "transformers")]))
    question, answer, caption = "What is in this image?", "A cat.", "A brown tabby cat with green eyes."
    asked = [{"role": "user", "content": [{"type": "image", "image": photos["chelsea.png"]},
                                          {"type": "text", "text": question}]}]
    drawn = [{"role": "user", "content": [{"type": "text", "text": caption}]}]

    def ids(conversation: list[dict], generation_prompt: bool = True, **kwargs) -> list[int]:
        out = processor.apply_chat_template(conversation, add_generation_prompt=generation_prompt, tokenize=True,
                                            return_dict=True, **kwargs)
        return out["input_ids"][0].tolist()

    assert ids(asked) == understanding_prompt_ids(tokenizer, question)  # the default system prompt included
    assert ids(drawn, processor_kwargs={"generation_mode": "image"}) == generation_prompt_ids(tokenizer, caption)
    assert ids(drawn, generation_mode="image") == generation_prompt_ids(tokenizer, caption)  # the older spelling
    answered = [*asked, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    trained = understanding_sample(tokenizer, [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"),
                                               Turn("assistant", answer)], [b""], system=JANUS_SYSTEM_PROMPT)
    assert ids(answered, generation_prompt=False) == trained.input_ids  # a whole training sample, answer and EOS
    processor.use_default_system_prompt = False
    assert ids(asked) == understanding_prompt_ids(tokenizer, question, system=None)
    assert ids([{"role": "system", "content": "Be brief."}, *asked]) == understanding_prompt_ids(
        tokenizer, question, system="Be brief.")


def test_export_refuses_a_tokenizer_that_breaks_the_chat_template(tokenizer_dir):
    from tokenizers import processors
    from transformers import JanusImageProcessor, JanusProcessor

    from model.chat_format import CHAT_TEMPLATE
    from pipeline.export import check_chat_template, processor_tokenizer

    tokenizer = processor_tokenizer(tokenizer_dir)
    processor = JanusProcessor(JanusImageProcessor(), tokenizer, chat_template=CHAT_TEMPLATE,
                               use_default_system_prompt=True)
    check_chat_template(processor)  # adds BOS when encoding, as DeepSeek's tokenizer does
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # one that does not
    with pytest.raises(ValueError, match="add BOS"):
        check_chat_template(processor)


def test_model_card_names_what_it_was_trained_from_and_its_snippet_runs(exported, runs, init_weights, shard_corpus,
                                                                         tokenizer, photos, tmp_path, monkeypatch):
    from model.manifest import MANIFEST_NAME, file_sha256, tokenizer_fingerprint

    for layout in ("transformers", "original"):
        card = (exported[(2, layout)] / "README.md").read_text()
        assert "# Janus-Pro: stage 3, step 1" in card and f"`{runs[2]}` | 1 |" in card
        assert f"Started from `{init_weights}`" in card
        for task, manifest in shard_corpus.items():
            assert f"| {task} |" in card and file_sha256(manifest / MANIFEST_NAME) in card, task
        assert card.count(tokenizer_fingerprint(tokenizer)) == 4  # the three manifests' and the exported one
    path = exported[(2, "transformers")]
    snippet = card_python(path / "README.md")
    photos["chelsea.png"].save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet.replace('path = "."', f"path = {str(path)!r}"), scope)  # the card's own loading code
    assert isinstance(scope["answer"], str)
    assert scope["images"][0].size == (384, 384) and (tmp_path / "apple.png").is_file()


def card_python(card: Path) -> str:
    text = card.read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_export_refuses_a_forged_or_foreign_checkpoint_and_runs_none_of_it(runs, tmp_path):
    """A run whose DeepSpeed file carries a pickle payload, re-listed in its COMPLETE by whoever wrote it there: the
    export refuses it in one line and the payload never runs; a COMPLETE this code did not write needs
    --trust-checkpoint, and even then nothing in its files runs."""
    from pipeline.checkpoint import COMPLETE, latest_checkpoint
    from pipeline.export import export, main
    from pipeline.safe_load import UnsafeCheckpoint

    marker, out = tmp_path / "payload-ran", tmp_path / "out"
    forged = forged_run(runs[1], tmp_path / "forged", marker)
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(forged), "--out", str(out), "--dtype", "fp32"])
    assert exited.value.code == 2
    foreign = forged_run(runs[1], tmp_path / "foreign", marker)
    (latest_checkpoint(foreign) / COMPLETE).write_text('{"step": 1, "world_size": 1}')  # nothing listed
    with pytest.raises(ValueError, match="not written by janus-pipeline.*--trust-checkpoint"):
        export(foreign, out, "transformers", dtype="fp32")
    with pytest.raises(UnsafeCheckpoint, match="refused to load.*GLOBAL io.open is not allowed"):
        export(foreign, out, "transformers", dtype="fp32", trust=True)
    assert not marker.exists() and not out.exists()


def test_export_removes_only_folders_it_made_itself(runs, tmp_path):
    """A run (or any folder) named like the export's work folder, OUT.partial, is never taken for it."""
    import shutil

    from pipeline.checkpoint import latest_checkpoint
    from pipeline.export import export

    run = tmp_path / "release.partial"
    shutil.copytree(runs[1], run)
    export(run, tmp_path / "release", "transformers", dtype="fp32")
    assert (run / "config.yaml").is_file() and latest_checkpoint(run) is not None
    unrelated = tmp_path / "other.partial"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    export(runs[1], tmp_path / "other", "transformers", dtype="fp32")
    assert (unrelated / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "other.partial", "release", "release.partial"]


def test_init_consolidation_is_redone_once_its_checkpoint_is_saved_again(runs, tmp_path):
    """consolidated/step-N serves the next stage's --init only while step N is the checkpoint it was made from: a
    re-save of the step (a rollback, --resume none into the same --output) makes it stale."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.checkpoint import consolidate, latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    made = consolidate(run)
    weights = load_file(str(made / "model.safetensors"))
    old = {k: torch.zeros_like(v) for k, v in weights.items()}  # what an earlier save of step 1 held
    save_file(old, str(made / "model.safetensors"))
    assert load_file(str(consolidate(run) / "model.safetensors")).keys() == old.keys()  # reused while current
    relisted(latest_checkpoint(run))  # step 1 saved again: its COMPLETE is another
    again = load_file(str(consolidate(run) / "model.safetensors"))
    for name, tensor in weights.items():
        assert torch.equal(again[name], tensor), name


def test_resume_init_and_universal_conversion_refuse_a_forged_checkpoint(runs, shard_corpus, tokenizer_dir,
                                                                         init_weights, tmp_path):
    """On one rank: resuming a forged 1-rank run, resuming a forged 2-rank run (through DeepSpeed's universal
    conversion) and starting from one with --init each stop with one error line, exit 2, and nothing of it runs."""
    marker = tmp_path / "payload-ran"
    resume_same = forged_run(runs[1], tmp_path / "same", marker)
    resume_resized = forged_run(runs[2], tmp_path / "resized", marker)
    cases = {"resume": (init_weights, resume_same), "universal": (init_weights, resume_resized),
             "init": (resume_same, tmp_path / "next")}
    for name, (init, output) in cases.items():
        ranks = Ranks(stage3_args(shard_corpus, tokenizer_dir, init, output), world_size=1)
        with pytest.raises(AssertionError, match="exited 2"):
            ranks.wait(timeout=300)
        said = [line for line in ranks.output(0).splitlines() if "error:" in line]
        assert len(said) == 1 and "refused to load" in said[0] and "GLOBAL io.open" in said[0], (
            name, ranks.output(0)[-3000:])
        assert "Traceback" not in ranks.output(0), name
        assert not marker.exists(), name


# --- #28: the run's tokenizer only, and BOS whatever the tokenizer does ---

@pytest.fixture(scope="module")
def no_bos_tokenizer_dir(tmp_path_factory) -> Path:
    """The session tokenizer's vocabulary and merges, but encoding adds no BOS (many tokenizers do not)."""
    from model.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("no-bos-tokenizer")
    build_tokenizer(path, add_bos=False)
    return path


@pytest.mark.parametrize("add_bos", [True, False])
def test_exported_processor_gives_the_training_prompts_whether_the_tokenizer_adds_bos(add_bos, tmp_path):
    """Before: a tokenizer adding no BOS trained fine (training inserts BOS by id) and the export then refused it."""
    from transformers import JanusProcessor

    from model.chat_format import generation_prompt_ids, understanding_prompt_ids
    from model.config import preset_config
    from model.tokenizer import SpecialTokens, adds_bos, build_tokenizer, load_tokenizer
    from pipeline.export import write_inference_files

    build_tokenizer(tmp_path / "tok", add_bos=add_bos)
    trained = load_tokenizer(tmp_path / "tok")
    assert adds_bos(trained) is add_bos
    write_inference_files(tmp_path / "out", preset_config("tiny"), tmp_path / "tok")
    processor = JanusProcessor.from_pretrained(str(tmp_path / "out"))
    bos = SpecialTokens.from_tokenizer(trained).bos
    asked = [{"role": "user", "content": [{"type": "text", "text": "What is a cat?"}]}]

    def ids(**kwargs) -> list[int]:
        return processor.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             **kwargs)["input_ids"][0].tolist()

    understanding, generation = ids(), ids(processor_kwargs={"generation_mode": "image"})
    assert understanding == understanding_prompt_ids(trained, "What is a cat?", n_images=0)
    assert generation == generation_prompt_ids(trained, "What is a cat?")
    assert understanding.count(bos) == generation.count(bos) == 1 and understanding[0] == generation[0] == bos
    assert adds_bos(load_tokenizer(tmp_path / "out"))  # DeepSeek's own code encodes with it too


def test_export_refuses_another_tokenizer_unless_allowed(runs, no_bos_tokenizer_dir, tmp_path, capsys):
    from transformers import JanusProcessor

    from model.chat_format import generation_prompt_ids
    from model.manifest import tokenizer_fingerprint
    from model.tokenizer import adds_bos, load_tokenizer
    from pipeline.export import export, main

    args = ["--checkpoint", str(runs[1]), "--out", str(tmp_path / "out"), "--dtype", "fp32",
            "--tokenizer", str(no_bos_tokenizer_dir)]
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --tokenizer {no_bos_tokenizer_dir}: not the tokenizer "
                                               f"{runs[1]} trained with (fingerprint ")
    assert "leave --tokenizer out" in err[0] and "--allow-other-tokenizer" in err[0]
    assert not (tmp_path / "out").exists()

    # Told: exported, and the tokenizer that adds no BOS is made to, so the processor gives training's prompts.
    other = load_tokenizer(no_bos_tokenizer_dir)
    for layout in ("transformers", "original"):
        out = export(runs[1], tmp_path / layout, layout, dtype="fp32", tokenizer_dir=no_bos_tokenizer_dir,
                     allow_other_tokenizer=True).path
        assert adds_bos(load_tokenizer(out)), layout
        card = (out / "README.md").read_text()
        assert f"the one training used (`{tokenizer_fingerprint(other)}`), made to add BOS" in card, layout
    processor = JanusProcessor.from_pretrained(str(tmp_path / "transformers"))
    drawn = [{"role": "user", "content": [{"type": "text", "text": "A red apple."}]}]
    ids = processor.apply_chat_template(drawn, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        processor_kwargs={"generation_mode": "image"})["input_ids"][0].tolist()
    assert ids == generation_prompt_ids(other, "A red apple.")


def test_export_refuses_a_run_tokenizer_changed_since_training(runs, tmp_path):
    import json
    import shutil

    from pipeline.export import export
    from pipeline.run_dir import fingerprints_file

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    recorded = json.loads(fingerprints_file(run).read_text())
    fingerprints_file(run).write_text(json.dumps({**recorded, "tokenizer_fingerprint": "ab" * 32}))
    with pytest.raises(ValueError, match=r"the run's tokenizer .* \(changed since\): not the tokenizer .* the run's "
                                         r"abababababab in fingerprints.json\): pass --tokenizer"):
        export(run, tmp_path / "out", "transformers", dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_model_card_names_a_hub_release_the_run_started_from(runs, init_weights, tmp_path):
    """A run whose --init was a hub id records the snapshot folder; the card says which release and commit."""
    import shutil

    import yaml

    from pipeline.export import export
    from pipeline.run_dir import config_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--deepseek-ai--Janus-Pro-1B" / "snapshots" / commit
    shutil.copytree(init_weights, snapshot)
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    saved = yaml.safe_load(config_file(run).read_text())
    saved["model"]["init"] = str(snapshot)  # what resolve() records for --init deepseek-ai/Janus-Pro-1B
    config_file(run).write_text(yaml.safe_dump(saved))
    card = (export(run, tmp_path / "out", "transformers", dtype="fp32").path / "README.md").read_text()
    assert f"Started from `deepseek-ai/Janus-Pro-1B@{commit}` (from the Hugging Face cache, `{snapshot}`)" in card
