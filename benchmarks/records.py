"""The benchmarks' records: one JSON object a line, appended as each case finishes (so a stopped run keeps
what it measured) and read back by their ``--summarise``."""
from __future__ import annotations

import json
from typing import Any


def append_record(path: str | None, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (nothing when ``path`` is None: no ``--json`` given)."""
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_records(path: str) -> list[dict[str, Any]]:
    """Every record of the JSON-lines file ``path`` (blank lines skipped)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
