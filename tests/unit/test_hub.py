"""Released weights named by a Hugging Face hub id (model/hub.py): training's --init and the inference commands'
--checkpoint take `owner/name` as well as a folder. Before: `--init deepseek-ai/Janus-Pro-1B` was refused as a
folder that does not exist, and the inference commands took only a folder.

The hub is never asked: each test builds the cache layout huggingface_hub writes (models--owner--name/ with
blobs/, snapshots/<commit>/ of symlinks to the blobs, refs/main) in a temporary folder, and points huggingface_hub
at it with offline mode on; a download that fails is injected by pointing it at a closed port on this machine.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

from model import hub
from model.hub import HubError, download_command, hub_source, is_repo_id, resolve_weights
from tests.support import COMMIT, cache_repo


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub, already imported, uses with offline mode on (it reads its
    environment once, at import; test_the_cache_is_where_huggingface_hubs_variables_put_it sets the variables)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: a connection there is refused at once


@pytest.mark.parametrize(("spec", "expected"), [
    ("deepseek-ai/Janus-Pro-1B", True), ("deepseek-ai/Janus-Pro-7B", True), ("owner/name", True),
    ("Janus-Pro-1B", False), ("/abs/path", False), ("./weights/x", False), ("a/b/c", False), ("~/x", False),
    ("owner/na--me", False), ("owner/..", False), ("owner/", False),
])
def test_repo_id_shape(spec, expected):
    assert is_repo_id(spec) is expected


def test_download_command_is_the_installed_cli(monkeypatch):
    import importlib.util

    assert download_command("deepseek-ai/Janus-Pro-1B") == "hf download deepseek-ai/Janus-Pro-1B"  # hub >= 0.34
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # an older huggingface_hub: no `hf`
    assert download_command("o/n") == "huggingface-cli download o/n"


def test_cached_repo_resolves_to_its_snapshot(hf_cache, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"a": 1}')
    snapshot = cache_repo(hf_cache, "deepseek-ai/Janus-Pro-1B", tmp_path / "src")
    found = resolve_weights("deepseek-ai/Janus-Pro-1B", "--init")
    assert found == snapshot
    assert (found / "config.json").read_text() == '{"a": 1}'  # through the blob symlink
    assert hub_source(found) == f"deepseek-ai/Janus-Pro-1B@{COMMIT}"
    assert hub_source(tmp_path / "src") is None


def test_local_folder_wins_over_a_cached_repo_of_that_name(hf_cache, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    cache_repo(hf_cache, "weights/Janus-Pro-1B", tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights" / "Janus-Pro-1B").mkdir(parents=True)
    assert resolve_weights("weights/Janus-Pro-1B", "--init") == Path("weights/Janus-Pro-1B")


def test_a_missing_path_that_is_no_repo_id_is_left_to_the_caller(hf_cache, tmp_path):
    missing = tmp_path / "nowhere" / "weights"
    assert resolve_weights(str(missing), "--init") == missing


def test_offline_and_not_cached_says_the_download_command(hf_cache):
    with pytest.raises(HubError) as caught:
        resolve_weights("deepseek-ai/Janus-Pro-7B", "--init")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--init deepseek-ai/Janus-Pro-7B: no such folder here")
    assert str(hf_cache) in message and "HF_HUB_OFFLINE is set" in message
    assert "`hf download deepseek-ai/Janus-Pro-7B`" in message


def test_an_interrupted_download_offline_says_what_is_missing(hf_cache, tmp_path):
    """A download cut short leaves a snapshot without some files; huggingface_hub knows from the file list it
    kept (trees/<commit>.json) and refuses the snapshot: the message says so and how to finish it."""
    import json

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    snapshot = cache_repo(hf_cache, "deepseek-ai/Janus-Pro-1B", tmp_path / "src")
    trees = snapshot.parents[1] / "trees"
    trees.mkdir()
    listed = {name: {"size": 2, "blob_id": "ab" * 20} for name in ("config.json", "pytorch_model.bin")}
    (trees / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": listed}))
    with pytest.raises(HubError) as caught:
        resolve_weights("deepseek-ai/Janus-Pro-1B", "--init")
    message = str(caught.value)
    assert "\n" not in message and "IncompleteSnapshotError" in message and "pytorch_model.bin" in message
    assert "HF_HUB_OFFLINE is set" in message and "`hf download deepseek-ai/Janus-Pro-1B`" in message


def test_a_failed_download_says_why_and_the_download_command(hf_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # the hub, unreachable
    with pytest.raises(HubError) as caught:
        resolve_weights("deepseek-ai/Janus-Pro-1B", "--checkpoint")
    message = str(caught.value)
    assert "\n" not in message
    assert "downloading it failed" in message and "ConnectError" in message
    assert "`hf download deepseek-ai/Janus-Pro-1B`" in message
    assert not (hf_cache / "models--deepseek-ai--Janus-Pro-1B" / "snapshots").exists()


@pytest.fixture
def hub_environment(monkeypatch):
    """Sets huggingface_hub's environment variables as a user would, and has it read them again (it reads them once,
    at import); afterwards the real environment is read back."""
    import importlib

    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def read(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        importlib.reload(constants)

    yield read
    monkeypatch.undo()
    importlib.reload(constants)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_the_cache_is_where_huggingface_hubs_variables_put_it(variable, hub_environment, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    hub_environment(**{variable: str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    cache = tmp_path / "hf" / ("hub" if variable == "HF_HOME" else "")
    snapshot = cache_repo(cache, "deepseek-ai/Janus-Pro-1B", tmp_path / "src")
    assert resolve_weights("deepseek-ai/Janus-Pro-1B", "--init") == snapshot
    with pytest.raises(HubError, match=re.escape(f"not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE is set")):
        resolve_weights("deepseek-ai/Janus-Pro-7B", "--init")


def test_offline_is_huggingface_hubs_setting(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.offline()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub.offline()


# --- training: --init takes a hub id ---

def test_training_init_takes_a_cached_hub_id(hf_cache, original_checkpoint, tokenizer_dir, tmp_path):
    from pipeline.config import resolve

    snapshot = cache_repo(hf_cache, "deepseek-ai/Janus-Pro-1B", original_checkpoint, tokenizer_dir)
    config, args = resolve(2, ["--init", "deepseek-ai/Janus-Pro-1B", "--output", str(tmp_path / "run")])
    assert config.model.init == str(snapshot)  # what the engine, the export and the next stage open
    assert config.model.model == str(snapshot) and config.model.tokenizer == str(snapshot)
    assert args.model_config.text_config.hidden_size == 64  # the tiny model's own config.json, read from the cache


def test_training_init_hub_id_not_cached_offline_is_one_config_error(hf_cache, tmp_path):
    from pipeline.config import ConfigError, resolve

    with pytest.raises(ConfigError) as caught:
        resolve(2, ["--init", "deepseek-ai/Janus-Pro-1B", "--output", str(tmp_path / "run")])
    assert str(caught.value).startswith("--init deepseek-ai/Janus-Pro-1B: no such folder here")
    assert "hf download deepseek-ai/Janus-Pro-1B" in str(caught.value)


def test_training_init_missing_folder_still_says_it_does_not_exist(hf_cache, tmp_path):
    from pipeline.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="it does not exist"):
        resolve(2, ["--init", str(tmp_path / "no" / "such"), "--output", str(tmp_path / "run")])


@pytest.fixture
def unreachable_hub(hf_cache, monkeypatch) -> Path:
    """An empty cache, online, with the hub unreachable: any download would fail (ConnectError), so a command that
    succeeds here downloaded nothing."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return hf_cache


@pytest.mark.parametrize("plan", ["--dry-run", "--write-ds-config"])
def test_a_plan_of_an_uncached_release_downloads_nothing(unreachable_hub, plan, tmp_path):
    """Before: `--init deepseek-ai/Janus-Pro-7B --dry-run` downloaded the whole release (15 GB) to read its config.json.
    A plan reads no weights: an uncached release is planned from the preset of its architecture."""
    from pipeline.config import resolve
    from pipeline.planning import dry_run

    flags = ["--init", "deepseek-ai/Janus-Pro-7B", plan, *([str(tmp_path / "ds.json")] if plan != "--dry-run" else [])]
    config, args = resolve(3, [*flags, "--world-size", "8"])
    assert config.model.model == "7b" and args.model_config.text_config.hidden_size == 4096
    assert config.optim.train_steps == 40_000  # Table 2's Stage III for the 7B
    assert "GiB" in dry_run(config, args.cluster, args.model_config)
    assert not any(unreachable_hub.iterdir())  # nothing was fetched into the cache


def test_a_plan_of_an_uncached_unknown_repository_asks_for_its_model(unreachable_hub, tmp_path):
    from pipeline.config import ConfigError, resolve

    with pytest.raises(ConfigError) as caught:
        resolve(2, ["--init", "someone/janus-finetune", "--dry-run"])
    message = str(caught.value)
    assert message.startswith("--model: give a preset") and "\n" not in message
    assert "--init someone/janus-finetune is not in the Hugging Face cache" in message
    assert "give --model" in message and "download someone/janus-finetune`" in message
    config, _ = resolve(2, ["--init", "someone/janus-finetune", "--dry-run", "--model", "1b"])  # as it says
    assert config.model.model == "1b"


def test_help_with_an_uncached_hub_id_downloads_nothing(unreachable_hub, capsys):
    from pipeline.config import resolve

    with pytest.raises(SystemExit) as exited:
        resolve(2, ["--init", "someone/janus-finetune", "--help"])
    assert exited.value.code == 0 and "--lora-rank" in capsys.readouterr().out


def test_a_run_still_downloads_an_uncached_release(unreachable_hub, tmp_path):
    """Only plans skip the download: a run needs the weights (here the download fails, said in one line)."""
    from pipeline.config import ConfigError, resolve

    with pytest.raises(ConfigError, match=r"downloading it failed \(.*ConnectError"):
        resolve(2, ["--init", "deepseek-ai/Janus-Pro-1B", "--output", str(tmp_path / "run")])


# --- inference: --checkpoint (or --model) takes a hub id ---

@pytest.fixture
def cached_release(hf_cache, original_checkpoint, tokenizer_dir) -> Path:
    """The tiny original-layout (deepseek-ai) release with its tokenizer, cached as deepseek-ai/Janus-Pro-1B."""
    return cache_repo(hf_cache, "deepseek-ai/Janus-Pro-1B", original_checkpoint, tokenizer_dir)


def test_generate_loads_the_cached_snapshot_of_a_hub_id(cached_release, tmp_path, monkeypatch):
    import model.generate

    loaded = []

    def load_exported(path, dtype, device):  # stops before 576 tokens (tests/integration/test_inference_cli.py)
        loaded.append(path)
        raise SystemExit(0)

    monkeypatch.setattr(model.generate, "load_exported", load_exported)
    with pytest.raises(SystemExit):
        model.generate.main(["--model", "deepseek-ai/Janus-Pro-1B", "--prompt", "a cat", "--out",
                             str(tmp_path / "g.png"), "--device", "cpu"])
    assert loaded == [cached_release]


def test_chat_from_a_cached_hub_id(cached_release, tmp_path, capsys):
    from PIL import Image

    from model.chat import main

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "photo.png")
    main(["--checkpoint", "deepseek-ai/Janus-Pro-1B", "--image", str(tmp_path / "photo.png"), "--question",
          "What is this?", "--max-new-tokens", "3", "--device", "cpu"])
    assert len(capsys.readouterr().out.splitlines()) == 1  # one answer line (random weights: any text)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_inference_hub_id_not_cached_offline_is_one_error_line(command, hf_cache, tmp_path, capsys):
    from PIL import Image

    from model import chat, generate

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    argv = {"generate": ["--prompt", "a cat", "--out", str(tmp_path / "g.png")],
            "chat": ["--image", str(tmp_path / "photo.png"), "--question", "What?"]}[command]
    main = {"generate": generate.main, "chat": chat.main}[command]
    with pytest.raises(SystemExit) as caught:
        main(["--checkpoint", "deepseek-ai/Janus-Pro-7B", "--device", "cpu", *argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --checkpoint deepseek-ai/Janus-Pro-7B: no such folder")
    assert "hf download deepseek-ai/Janus-Pro-7B" in err[0]
    assert not (tmp_path / "g.png").exists()


def test_preprocess_takes_hub_ids_for_its_tokenizer_and_vq(cached_release, tmp_path):
    """`python -m preprocess generation --tokenizer deepseek-ai/Janus-Pro-1B --vq deepseek-ai/Janus-Pro-1B`: both
    become the cached snapshot before the job starts (Ray's workers read that folder), and load from it."""
    from model.tokenizer import load_tokenizer
    from model.vq import load_vq
    from preprocess.cli import config_from_args, parser

    args = parser("generation").parse_args(["generation", "--input", str(tmp_path / "in.tar"), "--output",
                                            str(tmp_path / "out"), "--tokenizer", "deepseek-ai/Janus-Pro-1B",
                                            "--vq", "deepseek-ai/Janus-Pro-1B"])
    config = config_from_args(args)
    assert Path(config.convert.tokenizer) == cached_release and Path(config.vq) == cached_release
    load_tokenizer(config.convert.tokenizer)
    load_vq(config.vq)


def test_preprocess_hub_id_not_cached_offline_is_one_usage_error(hf_cache, tmp_path):
    from preprocess.cli import config_from_args, parser
    from preprocess.job import UsageError

    for flag in ("--tokenizer", "--vq"):
        argv = ["generation", "--input", str(tmp_path / "in.tar"), "--output", str(tmp_path / "out"),
                "--tokenizer", str(tmp_path), flag, "deepseek-ai/Janus-Pro-7B"]
        with pytest.raises(UsageError, match=rf"^{flag} deepseek-ai/Janus-Pro-7B: .*HF_HUB_OFFLINE is set; download "
                                             r"it with `(hf|huggingface-cli) download deepseek-ai/Janus-Pro-7B`"):
            config_from_args(parser("generation").parse_args(argv))
