"""`make demo`: the whole pipeline end to end on the CPU, from real photographs to an exported model.

    python -m launchers.demo        # DEMO_STEPS (stage II steps; default 300), DEMO_OUTPUT (default demo-output)

1. data:        photographs scikit-image ships, with descriptions and a question each, written as webdataset
                tars (understanding, generation) and a JSONL text file; a small BPE tokenizer; the tiny model's
                initial weights, whose VQ (saved on its own with save_pretrained) tokenises the images;
2. preprocess:  `python -m preprocess` on an embedded Ray, one job per task, to Arrow shards + manifests;
3. train:       Stage I -> II -> III through launchers/stage{1,2,3}.py on 2 CPU ranks (torchrun, ZeRO-3,
                gloo), each stage starting from the previous stage's run directory;
4. export:      launchers/export.py to a transformers checkpoint;
5. use it:      `python -m model.generate` (an image grid from training captions), `python -m model.chat`
                (a question about one photo), and a loss-curve plot of the three stages.

Every step is the command a user would run (printed before it runs); nothing here is demo-only logic
except the choice of photographs and the step counts. The tiny model is random at the start and its VQ is
untrained (no download), so the grid shows what a few hundred CPU steps learn, not the photographs.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name in skimage/data -> (caption, question, answer)
PHOTOS = {
    "astronaut.png": ("An astronaut in a white suit smiles in front of an American flag.",
                      "Who is in this photo?", "An astronaut."),
    "chelsea.png": ("A brown tabby cat with green eyes looks to the side.",
                    "What animal is this?", "A tabby cat."),
    "coffee.png": ("A cup of coffee on a saucer with a spoon, seen from above.",
                   "What drink is shown?", "Coffee."),
    "rocket.jpg": ("A rocket lifts off from its launch pad into a clear blue sky.",
                   "What is taking off?", "A rocket."),
    "motorcycle_left.png": ("A red motorcycle parked in a room next to a wall.",
                            "What vehicle is this?", "A motorcycle."),
    "hubble_deep_field.jpg": ("Hundreds of distant galaxies glow against the black of deep space.",
                              "What do we see here?", "Distant galaxies."),
}
TEXTS = [
    "Photographs of people, animals, drinks, rockets, motorcycles and galaxies.",
    "A tabby cat has a striped coat; an astronaut wears a white suit.",
    "Deep space holds hundreds of galaxies, each with billions of stars.",
]


def photo_file(name: str) -> Path:
    import skimage.data

    return Path(os.path.dirname(skimage.data.__file__)) / name


def run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> None:
    """Run one step as the user would; its output goes to `log` (and the tail to stderr if it fails)."""
    print("$ " + shlex.join(str(c) for c in cmd), flush=True)
    started = time.time()
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    with open(log, "w") if log else open(os.devnull, "w") as out:
        code = subprocess.call([str(c) for c in cmd], env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        tail = log.read_text()[-4000:] if log else ""
        raise SystemExit(f"step failed (exit {code}): {shlex.join(str(c) for c in cmd)}\n{tail}")
    print(f"  ok in {time.time() - started:.0f}s" + (f" (log {log})" if log else ""), flush=True)


def build_sources(out: Path, photos: dict[str, tuple[str, str, str]]) -> dict[str, Path]:
    """Tars, JSONL, tokenizer, initial weights and the VQ: the inputs a user would bring."""
    import torch
    import webdataset as wds

    from model.chat_format import JANUS_SYSTEM_PROMPT
    from model.config import preset_config
    from model.janus import JanusProForTraining
    from model.tokenizer import SpecialTokens, build_tokenizer
    from model.weights import save_checkpoint
    from preprocess.records import DEFAULT_INSTRUCTIONS

    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    paths = {"und": raw / "understanding-00000.tar", "gen": raw / "generation-00000.tar", "text": raw / "text.jsonl",
             "tokenizer": out / "tokenizer", "init": out / "init", "vq": out / "vq"}
    corpus = [t for entry in photos.values() for t in entry] + TEXTS + [JANUS_SYSTEM_PROMPT, *DEFAULT_INSTRUCTIONS]
    tokenizer = build_tokenizer(paths["tokenizer"], corpus=corpus, vocab_size=900)
    special = SpecialTokens.from_tokenizer(tokenizer)

    with wds.TarWriter(str(paths["und"])) as und, wds.TarWriter(str(paths["gen"])) as gen:
        for name, (caption, question, answer) in photos.items():
            key, suffix = Path(name).stem, Path(name).suffix.lstrip(".").replace("jpeg", "jpg")
            image = photo_file(name).read_bytes()
            conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            und.write({"__key__": key, suffix: image, "json": {"conversations": conversation}})
            gen.write({"__key__": key, suffix: image, "txt": caption})
    paths["text"].write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS + [c for c, _, _ in
                                                                                       photos.values()]))

    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
    save_checkpoint(model, paths["init"], "transformers")
    model.model.vqmodel.save_pretrained(str(paths["vq"]))  # the generation tokenizer: frozen in every stage
    return paths


def loopback_rendezvous() -> list[str]:
    """torchrun's flags for a one-machine rendezvous on 127.0.0.1 at a free port. (torch's TCPStore server itself
    binds every interface whatever host it is given: what this sets is where ranks connect and what they are told.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"demo-{os.getpid()}",
            "--nnodes", "1", "--local-addr", "127.0.0.1"]


def train_command(stage: int, data: list[Path], model: Path, init: Path, output: Path, tokenizer: Path, steps: int,
                  extra: list[str]) -> list[str]:
    # torchrun starts 2 local ranks with the environment DeepSpeed reads. The rendezvous is on the loopback address
    # (--standalone's is `localhost`, and its workers are told the machine's hostname): the ranks meet over 127.0.0.1.
    return [sys.executable, "-m", "torch.distributed.run", *loopback_rendezvous(), "--nproc-per-node", "2",
            str(REPO / "launchers" / f"stage{stage}.py"), "--model", model, "--init", init, "--tokenizer", tokenizer,
            "--output", output, "--data", *data, "--train-steps", str(steps), "--save-every", str(steps),
            "--keep-last", "1", "--log-every", "5", "--num-workers", "1", *extra]


# Per stage: (share of DEMO_STEPS, flags). Small rows (one or two samples) keep a CPU step short; a high
# learning rate lets the tiny model learn 6 photographs in minutes, which Table 2's rates would take hours for,
# and Stage II decays it to 0 by its last step, which a short run needs to settle (tests/integration/test_demo.py).
# The warm-up is the default for a run shorter than Table 2's: a small share of its steps (pipeline/config.py).
STAGE_PLAN = {
    1: (0.2, ["--learning-rate", "3e-3"]),
    2: (1.0, ["--learning-rate", "3e-3", "--lr-decay-style", "linear", "--ratio", "1", "1", "3"]),
    3: (0.1, ["--learning-rate", "1e-3"]),
}
COMMON = ["--seq-len", "1400", "--rows-per-step", "2", "--guidance-dropout", "0.1"]


def main() -> None:
    steps = int(os.environ.get("DEMO_STEPS", "300"))
    out = Path(os.environ.get("DEMO_OUTPUT", "demo-output")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.time()
    cpu = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    print(f"[1/5] data: {len(PHOTOS)} photographs from scikit-image -> webdataset tars + JSONL", flush=True)
    src = build_sources(out, PHOTOS)

    print("[2/5] preprocess on an embedded Ray", flush=True)
    data = out / "data"
    for task, source, extra in (("understanding", src["und"], []), ("generation", src["gen"], ["--vq", src["vq"]]),
                                ("text", src["text"], [])):
        run([sys.executable, "-m", "preprocess", task, "--input", source, "--output", data / task,
             "--tokenizer", src["tokenizer"], "--cpus", "2", "--no-progress", *extra],
            log=logs / f"preprocess-{task}.log")

    print("[3/5] train Stage I -> II -> III on 2 CPU ranks (DeepSpeed ZeRO-3)", flush=True)
    init = src["init"]
    for stage in (1, 2, 3):
        share, flags = STAGE_PLAN[stage]
        tasks = ["understanding", "generation"] + (["text"] if stage > 1 else [])
        run_dir = out / "runs" / f"stage{stage}"
        run(train_command(stage, [data / t for t in tasks], src["init"], init, run_dir, src["tokenizer"],
                          max(1, round(steps * share)), COMMON + flags), env=cpu, log=logs / f"stage{stage}.log")
        init = run_dir

    print("[4/5] export", flush=True)
    exported = out / "export"
    run([sys.executable, str(REPO / "launchers" / "export.py"), "--checkpoint", init, "--out", exported,
         "--layout", "transformers", "--dtype", "fp32", "--tokenizer", src["tokenizer"]], log=logs / "export.log")

    print("[5/5] generate, chat, plot", flush=True)
    grid = out / "grid.png"
    captions = [caption for caption, _, _ in PHOTOS.values()]
    run([sys.executable, "-m", "model.generate", "--checkpoint", exported, "--prompt", *captions, "-n", "1",
         "--cfg", "1", "--greedy", "--out", grid], log=logs / "generate.log")
    name, (_, question, answer) = next(iter(PHOTOS.items()))
    run([sys.executable, "-m", "model.chat", "--checkpoint", exported, "--image", photo_file(name),
         "--question", question, "--max-new-tokens", "16"], log=logs / "chat.log")
    reply = (logs / "chat.log").read_text().strip().splitlines()[-1]
    curve = out / "loss.png"
    from pipeline.plot import loss_curve_png
    from pipeline.run_dir import metrics_file

    loss_curve_png([metrics_file(out / "runs" / f"stage{s}") for s in (1, 2, 3)], curve)

    print(f"\n{name}: Q: {question}\n  model: {reply}\n  training answer: {answer}")
    print(f"\ndemo finished in {time.time() - started:.0f}s (DEMO_STEPS={steps})")
    print(f"image grid:          {grid}")
    print(f"loss curve:          {curve}")
    print(f"exported checkpoint: {exported}")


if __name__ == "__main__":
    main()
