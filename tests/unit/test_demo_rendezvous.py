"""The demo's training ranks meet on the loopback address (issue #27). Before: `torchrun --standalone`, whose
rendezvous is `localhost` and whose ranks are told the machine's hostname to reach each other.

The command is read from a child Python: only launchers import launchers (tests/unit/test_layers.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO

PRINT_COMMAND = ("import json; from pathlib import Path; from launchers.demo import train_command; "
                 "print(json.dumps([str(a) for a in train_command(1, [Path('data')], Path('model'), Path('init'), "
                 "Path('out'), Path('tok'), 1, [])]))")


def test_the_demo_ranks_meet_on_the_loopback_address():
    command = json.loads(subprocess.run([sys.executable, "-c", PRINT_COMMAND], cwd=REPO, capture_output=True,
                                        text=True, check=True, timeout=60).stdout)
    assert "--standalone" not in command
    host, port = command[command.index("--rdzv-endpoint") + 1].split(":")
    assert host == "127.0.0.1" and int(port) > 0 and command[command.index("--local-addr") + 1] == "127.0.0.1"
    assert command[command.index("--rdzv-backend") + 1] == "c10d"
