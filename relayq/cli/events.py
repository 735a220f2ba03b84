"""relayq events ...: the event log as operators use it (replay: relayq.cli.replays)."""

from __future__ import annotations

import argparse

from relayq.cli import replays


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    events = commands.add_parser("events", help="the event log: replay events")
    sub = events.add_subparsers(dest="events_command", required=True, metavar="command")
    replays.add_replay_command(sub)
