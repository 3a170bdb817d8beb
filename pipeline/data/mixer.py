"""Task mixing by the stage's ratio: und : text : gen, and by weight among the datasets of a task.

The mixer is deterministic "largest deficit first": the next sample comes from the task furthest
behind its share (in samples or tokens, `unit`), and within it from the dataset furthest behind its
weight. Shares then hold closely over every window, so every optimizer step mixes all tasks, and the
only state to save for an exact resume is what has been fed so far.
"""

from __future__ import annotations

from model.sample import TASKS


class Mixer:
    def __init__(self, ratio: tuple[float, ...], source_tasks: list[str], source_weights: list[float],
                 unit: str = "samples"):
        if unit not in ("samples", "tokens"):
            raise ValueError(f"ratio unit must be 'samples' or 'tokens', not {unit!r}")
        self.share = {task: r / sum(ratio) for task, r in zip(TASKS, ratio, strict=True)}
        for task, share in self.share.items():
            if share > 0 and task not in source_tasks:
                raise ValueError(f"the ratio asks for {task} data but no dataset of that task was given")
        self.source_tasks, self.source_weights, self.unit = source_tasks, source_weights, unit
        self.fed_task = {task: 0.0 for task in TASKS}
        self.fed_source = [0.0] * len(source_tasks)

    def next_source(self) -> int:
        """Index of the dataset to draw the next sample from."""
        task = min((t for t in TASKS if self.share[t] > 0), key=lambda t: (self.fed_task[t] / self.share[t], t))
        candidates = [i for i, t in enumerate(self.source_tasks) if t == task]
        return min(candidates, key=lambda i: (self.fed_source[i] / self.source_weights[i], i))

    def record(self, source: int, tokens: int) -> None:
        amount = 1.0 if self.unit == "samples" else float(tokens)
        self.fed_task[self.source_tasks[source]] += amount
        self.fed_source[source] += amount

    def state_dict(self) -> dict:
        return {"fed_task": dict(self.fed_task), "fed_source": list(self.fed_source)}

    def load_state_dict(self, state: dict) -> None:
        self.fed_task, self.fed_source = dict(state["fed_task"]), list(state["fed_source"])

    @staticmethod
    def mean_state(states: list[dict]) -> dict:
        """The mean of several ranks' states: a rank of a resized run keeps the old ranks' average deficits."""
        return {"fed_task": {t: sum(s["fed_task"][t] for s in states) / len(states) for t in TASKS},
                "fed_source": [sum(fed) / len(states) for fed in zip(*(s["fed_source"] for s in states), strict=True)]}
