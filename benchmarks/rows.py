"""A benchmark row in a fresh process (its peak memory is its own): the child prints one ``ROW <json>`` line."""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "ROW "


def print_row(result: dict) -> None:
    """In the child: report the row's result to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_row(script: str, args: list[str]) -> dict:
    """In the parent: run ``script`` with ``args`` in a new interpreter and return the row it printed."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(next(line[len(PREFIX):] for line in out.splitlines() if line.startswith(PREFIX)))
