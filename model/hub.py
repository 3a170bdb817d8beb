"""Weights named by a Hugging Face hub id (`deepseek-ai/Janus-Pro-1B`) or by a local folder: the one resolver,
for training's `--init` and the inference commands' `--checkpoint`.

A folder that exists always wins: `weights/Janus-Pro-1B` on disk is that folder, never the hub repository of that
name. Otherwise a name shaped like `owner/name` is looked up in the local Hugging Face cache first, without asking
the hub (so every rank of a run, and every rerun, reads the same snapshot; `hf download` refreshes it), then, unless
`HF_HUB_OFFLINE` is set, downloaded. Where the cache is (`HF_HUB_CACHE`, else `HF_HOME/hub`) and whether the hub may
be asked are huggingface_hub's own settings, read by it when it is imported.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# huggingface_hub's own rule (validate_repo_id) plus exactly one "/": a bare `name` is far more often a
# mistyped local folder than a repository without owner.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


# Released models a hub id names without reading their config.json: a dry run plans them from the preset of the same
# architecture (model/config.py) when they are not cached, rather than download gigabytes to read one small file.
RELEASE_PRESETS = {"deepseek-ai/Janus-Pro-1B": "1b", "deepseek-ai/Janus-Pro-7B": "7b"}


class HubError(ValueError):
    """Weights that are neither a local folder nor a hub repository that could be found: one line saying what to
    do (callers print it as an `error:` line)."""


def is_repo_id(spec: str) -> bool:
    """Whether `spec` is shaped like a hub repository id (`owner/name`)."""
    return bool(_REPO_ID.match(spec)) and ".." not in spec and "--" not in spec and len(spec) <= 96


def download_command(repo_id: str) -> str:
    """The command that puts `repo_id` into the cache, with the CLI the installed huggingface_hub provides
    (`hf` since 0.34, `huggingface-cli` before it)."""
    try:
        has_hf = importlib.util.find_spec("huggingface_hub.cli.hf") is not None
    except ModuleNotFoundError:  # huggingface_hub.cli itself is missing in releases before `hf`
        has_hf = False
    return f"{'hf' if has_hf else 'huggingface-cli'} download {repo_id}"


def offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_weights(spec: str | Path, flag: str) -> Path:
    """The local folder `spec` names: itself where it exists (or does not look like a repo id: the caller says it
    is missing), else the cached or, online, freshly downloaded snapshot of the hub repository `spec`.

    Raises HubError naming `flag`, the cache and the download command when the repository is neither cached nor
    downloadable (offline, no network, no such repository, gated)."""
    path = Path(spec).expanduser()
    text = str(spec)
    if path.exists() or not is_repo_id(text):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - not (wholly) cached: whatever the reason, downloading decides
        cached_error = error
    fix = f"download it with `{download_command(text)}`, or give the local folder that holds it"
    where = f"no such folder here, and not in the Hugging Face cache {cache_dir()}"
    if offline():
        # A snapshot that is there but incomplete (an interrupted download) says so; plain absence needs no detail.
        detail = "" if type(cached_error).__name__ == "LocalEntryNotFoundError" else f" ({_reason(cached_error)})"
        raise HubError(f"{flag} {text}: {where}{detail}, and HF_HUB_OFFLINE is set; {fix}")
    try:
        return Path(snapshot_download(text))
    except Exception as error:  # noqa: BLE001 - any download failure is the same user action: said in one line
        raise HubError(f"{flag} {text}: {where}, and downloading it failed ({_reason(error)}); {fix}") from None


def cached_snapshot(repo_id: str) -> Path | None:
    """The complete cached snapshot of hub repository `repo_id`, or None; never asks the hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not (wholly) cached
        return None


def _reason(error: Exception) -> str:
    """An exception as a short single line (huggingface_hub's messages run over several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def hub_source(path: str | Path) -> str | None:
    """`owner/name@commit` when `path` is a snapshot folder of a hub cache (models--owner--name/snapshots/commit),
    else None: a run's record then says which release it started from, not only where the cache was."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1) + "@" + parts[-1]
    return None
