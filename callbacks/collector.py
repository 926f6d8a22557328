"""One ptychography run's documents, collected cheaply while the scan runs.

A :class:`RunCollector` is an event-model ``DocumentRouter`` made per run by the router. While
the RunEngine runs it only appends to lists and dicts (no file access, no arrays); at the stop
document it hands a :class:`CollectedRun` to ``on_complete``, which must itself be cheap (the
router puts it on a worker queue). Reading frames happens later, in :mod:`.export`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from event_model import DocumentRouter

log = logging.getLogger(__name__)


@dataclass
class CollectedRun:
    """Everything :mod:`.export` needs, as plain documents and columns."""

    start: dict
    stop: dict | None = None
    descriptors: dict[str, dict] = field(default_factory=dict)          # uid -> descriptor
    columns: dict[str, dict[str, list]] = field(default_factory=dict)   # stream -> key -> values
    seq_nums: dict[str, list[int]] = field(default_factory=dict)        # stream -> seq_num per event
    resources: dict[str, dict] = field(default_factory=dict)            # uid -> resource
    datums: dict[str, dict] = field(default_factory=dict)               # datum_id -> datum
    stream_resources: dict[str, dict] = field(default_factory=dict)     # uid -> stream_resource
    stream_datums: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)                   # malformed documents seen

    @property
    def uid(self) -> str:
        return str(self.start.get("uid"))

    @property
    def scan_id(self) -> Any:
        return self.start.get("scan_id")

    @property
    def exit_status(self) -> str | None:
        return None if self.stop is None else self.stop.get("exit_status")

    def stream_descriptors(self, stream: str) -> list[dict]:
        return [d for d in self.descriptors.values() if d.get("name") == stream]

    def data_keys(self, stream: str) -> dict[str, dict]:
        keys: dict[str, dict] = {}
        for d in self.stream_descriptors(stream):
            keys.update(d.get("data_keys", {}))
        return keys

    def object_keys(self, stream: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d in self.stream_descriptors(stream):
            for obj, keys in (d.get("object_keys") or {}).items():
                out.setdefault(obj, []).extend(k for k in keys if k not in out.get(obj, []))
        return out


class RunCollector(DocumentRouter):
    """Collects one run; calls ``on_complete(CollectedRun)`` at its stop document."""

    def __init__(self, start: dict, on_complete: Callable[[CollectedRun], None]) -> None:
        super().__init__()
        self.run = CollectedRun(start=dict(start))
        self._on_complete = on_complete
        self._streams: dict[str, str] = {}   # descriptor uid -> stream name

    # -- documents --------------------------------------------------------------------------
    def start(self, doc: dict) -> None:
        pass  # the start was given to __init__ by the router

    def descriptor(self, doc: dict) -> None:
        uid, name = doc.get("uid"), doc.get("name", "primary")
        if not uid:
            self._problem("a descriptor without a uid was ignored")
            return
        self.run.descriptors[uid] = doc
        self._streams[uid] = name
        self.run.columns.setdefault(name, {})
        self.run.seq_nums.setdefault(name, [])

    def event(self, doc: dict) -> None:
        stream = self._streams.get(doc.get("descriptor"))
        if stream is None:
            self._problem(f"an event for unknown descriptor {doc.get('descriptor')!r} was ignored")
            return
        cols, seq = self.run.columns[stream], self.run.seq_nums[stream]
        n = len(seq)
        seq.append(doc.get("seq_num", n + 1))
        for key, value in doc.get("data", {}).items():
            col = cols.get(key)
            if col is None:
                col = cols[key] = [None] * n          # a key that appears late: pad earlier events
            col.append(value)
        for key, col in cols.items():                 # a key missing from this event: None
            if len(col) == n:
                col.append(None)

    def event_page(self, doc: dict) -> None:
        stream = self._streams.get(doc.get("descriptor"))
        if stream is None:
            self._problem(f"an event page for unknown descriptor {doc.get('descriptor')!r} was ignored")
            return
        data = doc.get("data", {})
        count = len(doc.get("seq_num", []))
        cols, seq = self.run.columns[stream], self.run.seq_nums[stream]
        n = len(seq)
        seq.extend(doc.get("seq_num", []))
        for key, values in data.items():
            col = cols.get(key)
            if col is None:
                col = cols[key] = [None] * n
            col.extend(values)
        for key, col in cols.items():
            if len(col) < n + count:
                col.extend([None] * (n + count - len(col)))

    def resource(self, doc: dict) -> None:
        self.run.resources[doc.get("uid")] = doc

    def datum(self, doc: dict) -> None:
        self.run.datums[doc.get("datum_id")] = doc

    def datum_page(self, doc: dict) -> None:
        ids = doc.get("datum_id", [])
        kwargs = doc.get("datum_kwargs", {})
        for i, datum_id in enumerate(ids):
            self.run.datums[datum_id] = {"datum_id": datum_id, "resource": doc.get("resource"),
                                         "datum_kwargs": {k: v[i] for k, v in kwargs.items()}}

    def stream_resource(self, doc: dict) -> None:
        self.run.stream_resources[doc.get("uid")] = doc

    def stream_datum(self, doc: dict) -> None:
        self.run.stream_datums.append(doc)

    def stop(self, doc: dict) -> None:
        self.run.stop = doc
        self._on_complete(self.run)

    def _problem(self, message: str) -> None:
        log.warning("run %s: %s", self.run.uid, message)
        self.run.problems.append(message)
