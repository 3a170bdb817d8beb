"""The demo's training ranks meet on the loopback address (issue #27). Before: `torchrun --standalone`, whose
rendezvous is `localhost` and whose ranks are told the machine's hostname to reach each other."""

from __future__ import annotations

from pathlib import Path

from launchers.demo import train_command


def test_the_demo_ranks_meet_on_the_loopback_address():
    command = train_command(1, [Path("data")], Path("model"), Path("init"), Path("out"), Path("tok"), 1, [])
    assert "--standalone" not in command
    host, port = command[command.index("--rdzv-endpoint") + 1].split(":")
    assert host == "127.0.0.1" and int(port) > 0 and command[command.index("--local-addr") + 1] == "127.0.0.1"
    assert command[command.index("--rdzv-backend") + 1] == "c10d"
