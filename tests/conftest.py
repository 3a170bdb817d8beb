"""Shared fixtures: one small tokenizer, one tiny model, the real photographs scikit-image ships.

Session-scoped and shared by tests/unit/ and tests/integration/ (one corpus, one tokenizer, one tiny checkpoint,
one Ray cluster). The layout rules of tests/ are in tests/support.py's docstring; in short: a fast test goes under
tests/unit/, a test that starts processes or takes over ~10 s under tests/integration/ (every test there is marked
`integration` by the hook below), and helpers shared between test modules live in tests/support.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from model.config import preset_config
from model.janus import JanusProForTraining
from model.tokenizer import SpecialTokens, build_tokenizer

TESTS = Path(__file__).resolve().parent


# The longest integration modules, longest first (`--durations` on a 2-core machine). Under `make test`'s
# `pytest -n 2 --dist loadfile --no-loadscope-reorder` a module runs whole on one worker (its module fixtures built
# once) and modules are handed out in collection order: longest first keeps the two workers busy to the end. The demo
# leads: the memorisation run that its tests start trains beside everything else.
LONGEST_FIRST = ("test_demo.py", "test_slurm.py", "test_training.py", "test_plan.py", "test_quickstart.py",
                 "test_preprocess_inputs.py", "test_bench.py", "test_levers.py", "test_lora.py", "test_faults.py",
                 "test_preprocess.py", "test_sample_grid.py", "test_gpu_check.py", "test_export.py", "test_config.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/integration/ is an integration test (`make test-fast` leaves it out by the mark); a
    test marked integration under tests/unit/ is misplaced: stop, naming it, rather than run it with the unit tests.
    Integration modules come first, the longest first (LONGEST_FIRST)."""
    for item in items:
        where = Path(str(item.path)).resolve()
        if where.is_relative_to(TESTS / "integration"):
            item.add_marker(pytest.mark.integration)
        elif where.is_relative_to(TESTS / "unit") and item.get_closest_marker("integration"):
            raise pytest.UsageError(f"{item.nodeid} is marked integration: move it to tests/integration/")

    def order(item) -> int:
        name, integration = Path(str(item.path)).name, item.get_closest_marker("integration") is not None
        if integration and name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (0 if integration else 1)

    items.sort(key=order)  # stable: within a rank, collection order


PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "camera.png", "logo.png")


def photo_path(name: str) -> Path:
    return Path(os.path.dirname(skimage.data.__file__)) / name


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photographs (and a few odd modes: camera is L, logo is RGBA), loaded once."""
    out = {}
    for name in PHOTOS:
        with Image.open(photo_path(name)) as im:
            im.load()
            out[name] = im
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def special(tokenizer) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tokenizer)


@pytest.fixture(scope="session")
def tiny_model(special) -> JanusProForTraining:
    torch.manual_seed(0)
    return JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder)).eval()


@pytest.fixture(scope="session")
def init_checkpoint(tmp_path_factory, special) -> Path:
    """A tiny model's initial weights (transformers layout): what the training runs here start from."""
    from model.weights import save_checkpoint

    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
    path = tmp_path_factory.mktemp("init")
    save_checkpoint(model, path, "transformers")
    return path


@pytest.fixture(scope="session")
def three_samples(tokenizer, photos) -> list:
    """One understanding, one generation and one text sample, real photo and tokenizer: the model tests' inputs."""
    from model.chat_format import Turn, generation_sample, text_sample, understanding_sample
    from model.images import encode_image, understanding_image

    torch.manual_seed(1)
    image = encode_image(understanding_image(photos["chelsea.png"]))
    und = understanding_sample(tokenizer, [Turn("user", "<image_placeholder>\nWhat animal is this?"),
                                           Turn("assistant", "A cat on a red carpet.")], [image])
    gen = generation_sample(tokenizer, "a coffee cup on a saucer", torch.randint(0, 1024, (576,)).tolist())
    text = text_sample(tokenizer, "The quick brown fox jumps over the lazy dog.")
    return [und, gen, text]


@pytest.fixture(scope="session")
def shard_corpus(tmp_path_factory, tokenizer, photos) -> dict[str, Path]:
    """One small real corpus for the data-path tests: a manifest directory per task, several shards each.

    Lengths vary as real data does: understanding ~600-650 tokens, generation ~590, text 10-900.
    """
    import random

    from model.chat_format import Turn, generation_sample, text_sample, understanding_sample
    from model.images import encode_image, understanding_image
    from model.manifest import Manifest, tokenizer_fingerprint, write_shard
    from model.sample import samples_to_table

    rng = random.Random(0)
    words = "the a cat dog red blue photo of sky over under bright quick brown fox jumps lazy".split()
    images = [encode_image(understanding_image(p)) for p in photos.values()]

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def understanding(i: int):
        turns = [Turn("user", f"<image_placeholder>\n{sentence(rng.randint(3, 30))}"),
                 Turn("assistant", sentence(rng.randint(2, 60)))]
        return understanding_sample(tokenizer, turns, [images[i % len(images)]], key=f"u{i}")

    made = {
        "understanding": [understanding(i) for i in range(30)],
        "generation": [generation_sample(tokenizer, sentence(rng.randint(2, 40)),
                                         [rng.randrange(1024) for _ in range(576)], key=f"g{i}") for i in range(30)],
        "text": [text_sample(tokenizer, sentence(rng.randint(5, 500)), key=f"t{i}") for i in range(40)],
    }
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for task, samples in made.items():
        directory = root / task
        directory.mkdir()
        manifest = Manifest(task=task, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
        for k in range(3):
            part = samples[k::3]
            manifest.shards.append(write_shard(samples_to_table(part), directory / f"{task}-{k:05d}.arrow"))
        manifest.rows_in = manifest.rows_written = len(samples)
        manifest.write(directory)
        out[task] = directory
    return out


# --- weights (issue 3): the official model's key set, and an original-layout checkpoint built from it ---

def official_key_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every key of deepseek-ai's MultiModalityCausalLM with its shape, written out from the official code
    (janus/models/{siglip_vit,vq_model,projector,modeling_vlm}.py, timm's AttentionPoolLatent) for any
    JanusConfig: independent of model/weights.py's mapping, so it can check that mapping."""
    from transformers import LlamaForCausalLM

    v, q, t = config.vision_config, config.vq_config, config.text_config
    d, p, mlp = v.hidden_size, v.patch_size, int(v.hidden_size * v.mlp_ratio)
    out: dict[str, tuple[int, ...]] = {}

    def linear(name, n_out, n_in):
        out[name + ".weight"], out[name + ".bias"] = (n_out, n_in), (n_out,)

    def norm(name, n):
        out[name + ".weight"], out[name + ".bias"] = (n,), (n,)

    tower = "vision_model.vision_tower."
    out[tower + "pos_embed"] = (1, (v.image_size // p) ** 2, d)
    out[tower + "patch_embed.proj.weight"], out[tower + "patch_embed.proj.bias"] = (d, 3, p, p), (d,)
    for i in range(v.num_hidden_layers):
        b = f"{tower}blocks.{i}."
        norm(b + "norm1", d), linear(b + "attn.qkv", 3 * d, d), linear(b + "attn.proj", d, d)
        norm(b + "norm2", d), linear(b + "mlp.fc1", mlp, d), linear(b + "mlp.fc2", d, mlp)
    norm(tower + "norm", d)
    out[tower + "attn_pool.latent"] = (1, 1, d)
    linear(tower + "attn_pool.q", d, d), linear(tower + "attn_pool.kv", 2 * d, d)
    linear(tower + "attn_pool.proj", d, d), norm(tower + "attn_pool.norm", d)
    linear(tower + "attn_pool.mlp.fc1", mlp, d), linear(tower + "attn_pool.mlp.fc2", d, mlp)

    for name, n_in, n_out, depth in (("aligner", d, v.projection_dim, v.depth),
                                     ("gen_aligner", q.embed_dim, q.projection_dim, q.num_hidden_layers)):
        linear(f"{name}.layers.0", n_out, n_in)
        for j in range(1, depth):
            linear(f"{name}.layers.{2 * j}", n_out, n_out)

    # LlamaGen VQModel: ch=base_channels, ch_mult=channel_multiplier, z_channels=latent_channels
    ch, mult, nres, z = q.base_channels, list(q.channel_multiplier), q.num_res_blocks, q.latent_channels
    vq = "gen_vision_model."

    def conv(name, n_out, n_in, k):
        out[name + ".weight"], out[name + ".bias"] = (n_out, n_in, k, k), (n_out,)

    def res(name, n_in, n_out):
        norm(name + ".norm1", n_in), conv(name + ".conv1", n_out, n_in, 3)
        norm(name + ".norm2", n_out), conv(name + ".conv2", n_out, n_out, 3)
        if n_in != n_out:
            conv(name + ".nin_shortcut", n_out, n_in, 1)

    def attn(name, n):
        norm(name + ".norm", n)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", n, n, 1)

    def mid(name, n):
        res(name + ".0", n, n), attn(name + ".1", n), res(name + ".2", n, n)

    conv(vq + "encoder.conv_in", ch, 3, 3)
    block_in = ch
    for level, m in enumerate(mult):
        block_in, block_out = ch * ([1] + mult)[level], ch * m
        for r in range(nres):
            res(f"{vq}encoder.conv_blocks.{level}.res.{r}", block_in, block_out)
            block_in = block_out
            if level == len(mult) - 1:
                attn(f"{vq}encoder.conv_blocks.{level}.attn.{r}", block_in)
        if level != len(mult) - 1:
            conv(f"{vq}encoder.conv_blocks.{level}.downsample.conv", block_in, block_in, 3)
    mid(vq + "encoder.mid", block_in)
    norm(vq + "encoder.norm_out", block_in), conv(vq + "encoder.conv_out", z, block_in, 3)

    block_in = ch * mult[-1]
    conv(vq + "decoder.conv_in", block_in, z, 3)
    mid(vq + "decoder.mid", block_in)
    for i, level in enumerate(reversed(range(len(mult)))):
        block_out = ch * mult[level]
        for r in range(nres + 1):
            res(f"{vq}decoder.conv_blocks.{i}.res.{r}", block_in, block_out)
            block_in = block_out
            if level == len(mult) - 1:
                attn(f"{vq}decoder.conv_blocks.{i}.attn.{r}", block_in)
        if level != 0:
            conv(f"{vq}decoder.conv_blocks.{i}.upsample.conv", block_in, block_in, 3)
    norm(vq + "decoder.norm_out", block_in), conv(vq + "decoder.conv_out", 3, block_in, 3)
    out[vq + "quantize.embedding.weight"] = (q.num_embeddings, q.embed_dim)
    out[vq + "quantize.codebook_used"] = (65536,)
    conv(vq + "quant_conv", q.embed_dim, z, 1), conv(vq + "post_quant_conv", z, q.embed_dim, 1)

    linear("gen_head.output_mlp_projector", q.projection_dim, t.hidden_size)
    linear("gen_head.vision_head", q.num_embeddings, q.projection_dim)
    out["gen_embed.weight"] = (q.num_embeddings, q.embed_dim)
    with torch.device("meta"):  # the official code's LLM is transformers' LlamaForCausalLM itself
        llm = LlamaForCausalLM(t)
    out.update({"language_model." + k: tuple(x.shape) for k, x in llm.state_dict().items()})
    return out


@pytest.fixture(scope="session")
def official_keys():
    """official_key_shapes, as a fixture (test modules do not import conftest)."""
    return official_key_shapes


@pytest.fixture(scope="session")
def original_checkpoint(tmp_path_factory) -> Path:
    """A tiny original-layout (deepseek-ai) checkpoint: every official key, random values, two safetensors
    shards with an index, and an original config.json."""
    import json

    from safetensors.torch import save_file

    from model.weights import original_config

    config = preset_config("tiny")
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(shape, generator=g) for k, shape in official_key_shapes(config).items()}
    path = tmp_path_factory.mktemp("original")
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(original_config(config)))
    return path


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names our private Ray temp dir: the ones this fixture started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="session")
def ray_cluster():
    """One `ray start --head` for the session: every server on the loopback address only, free ports, token auth on
    (the token is passed in the environment, so nothing is written to ~/.ray). Yields a dict with `address` (GCS),
    `dashboard` (job API URL), `env` (what a client needs) and `temp_dir` (its sessions and logs). Stopped by
    signalling the processes it started, not `ray stop`, which would also stop other Ray instances on a shared
    machine."""
    import secrets
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    import urllib.request

    from preprocess.job import SINGLE_NODE_ENV

    temp_dir = tempfile.mkdtemp(prefix="rayjp", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    # --node-ip-address and --dashboard-host still left the GCS, the raylet and two agents listening on every
    # interface; Ray's single-machine switch puts every server on 127.0.0.1, as in preprocess/job.py's embedded Ray.
    # A client needs the switch too (`env`, and ray_client): a driver without it timed out connecting.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", SINGLE_NODE_ENV: "0"}
    from tests.support import free_ports

    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env = free_ports(9)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", "--num-cpus=2",
           "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # answered (e.g. 401 without the token): the dashboard is up
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                tail = (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
                raise RuntimeError(f"ray start failed: {tail}") from None
            time.sleep(1)
    try:
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "env": env, "temp_dir": temp_dir}
    finally:
        proc.send_signal(signal.SIGINT)  # `ray start --block` then stops the node processes it started
        try:
            # After the session's jobs it sometimes took the whole 30 s it was once given (the suite's slowest
            # teardown); the loop below stops whatever it leaves.
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for _ in range(20):
            left = _pids_using(temp_dir)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL if _ > 5 else signal.SIGTERM)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This test process connected to the session's Ray cluster (the preprocess job reuses the connection)."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    from preprocess.job import SINGLE_NODE_ENV

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", SINGLE_NODE_ENV)}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({k: ray_cluster["env"][k] for k in saved})
    # Ray reads the auth mode, the token and the single-machine switch once per process (at import): make it see the
    # ones just set, so that this driver's own servers are on the loopback address too.
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray.init(address=ray_cluster["address"], logging_level="WARNING")
    try:
        yield ray_cluster
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def made(tmp_path_factory, shard_corpus, tiny_model) -> dict[str, Path]:
    """Inputs that are wrong in one way each, and tiny weights with a VQ to check manifests against (the config
    checks' user mistakes: tests.support.mistakes)."""
    from model.weights import save_checkpoint
    from tests.support import corpus_flags, run_to_resume

    root = tmp_path_factory.mktemp("mistakes")
    out = {"init": root / "init", "torn": root / "torn", "other-tok": root / "other-tok", "foreign": root / "foreign"}
    step = out["foreign"] / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)  # a run directory whose checkpoint this code did not write (nothing says its files)
    (step / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1}))
    out["stage1-run"] = run_to_resume(root / "stage1-run", 1, [*corpus_flags(shard_corpus), "--model", "tiny"])
    save_checkpoint(tiny_model, out["init"], "transformers")
    out["torn"].mkdir()  # a manifest whose shards are not there
    shutil.copy(shard_corpus["text"] / "manifest.json", out["torn"])
    out["truncated"] = root / "truncated"  # a shard cut short after its manifest was written
    shutil.copytree(shard_corpus["text"], out["truncated"])
    first = json.loads((out["truncated"] / "manifest.json").read_text())["shards"][0]["file"]
    with open(out["truncated"] / first, "r+b") as shard:
        shard.truncate(shard.seek(0, 2) - 100)
    out["other-tok"].mkdir()  # a tokenizer directory that does not hold a Janus tokenizer
    (out["other-tok"] / "tokenizer_config.json").write_text("{}")
    for name, field, value in (("retokenized", "tokenizer_fingerprint", "ab" * 32), ("other-vq", "vq_fingerprint",
                                                                                      "cd" * 32)):
        out[name] = root / name  # generation shards as made with another tokenizer or VQ
        shutil.copytree(shard_corpus["generation"], out[name])
        manifest = json.loads((out[name] / "manifest.json").read_text())
        (out[name] / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    return out


@pytest.fixture(scope="session")
def jpeg(photos) -> bytes:
    """A JPEG photograph (the preprocess input tests' good sample)."""
    from tests.support import encoded

    return encoded(photos["chelsea.png"].convert("RGB"), "JPEG", quality=90)
