"""One ptychography run's documents, collected cheaply while the scan runs.

A :class:`RunCollector` is an event-model ``DocumentRouter`` made per run by the router. While
the RunEngine runs it only appends to lists and dicts (no file access, no arrays); at the stop
document it hands a :class:`CollectedRun` to ``on_complete``, which must itself be cheap (the
router puts it on a worker queue). Reading frames happens later, in :mod:`.export`.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from event_model import DocumentRouter, Filler

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
    points_from_stream_datums: set[str] = field(default_factory=set)    # streams counted by their StreamDatums

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

    def __init__(self, start: dict, on_complete: Callable[[CollectedRun], None],
                 keep: Callable[[str, dict], bool] | None = None) -> None:
        super().__init__()
        self.run = CollectedRun(start=dict(start))
        self._on_complete = on_complete
        self._streams: dict[str, str] = {}   # descriptor uid -> stream name
        self._keep = keep                    # (key, data_key) -> keep its column? None: keep all
        self._kept: dict[tuple[str, str], bool] = {}     # (descriptor uid, key) -> keep (cached)
        self._next_seq: dict[str, int] = {}  # stream -> the seq_num expected next
        self._irregular: set[str] = set()    # streams whose seq_nums were not 1, 2, 3, ... in order
        self._stream_only: dict[str, list[str]] = {}        # descriptor uid -> its keys, if all are STREAM:
        self._covered: dict[str, dict[str, int]] = {}       # descriptor uid -> data key -> seq stop covered

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

    # Only the columns the export uses (``keep``: positions, scaler, datum ids) are copied, so an
    # event page costs time in proportion to its rows × kept columns, not to all its columns.
    def _keeps(self, descriptor: str, key: str) -> bool:
        found = self._kept.get((descriptor, key))
        if found is None:
            data_key = (self.run.descriptors[descriptor].get("data_keys") or {}).get(key) or {}
            found = self._kept[(descriptor, key)] = self._keep is None or bool(self._keep(key, data_key))
        return found

    def _track_seq(self, stream: str, seq_nums: list) -> None:
        """O(1) per event or page: note a stream whose seq_nums do not run on from the last one.

        A page's first and last seq_num are checked here; :func:`sequence_problems` checks every
        one at the stop (only for a stream noted here) and again off the RunEngine's thread, at
        export (:func:`~.export.check_complete`).
        """
        if not seq_nums:
            return
        first = self._next_seq.get(stream, 1)
        if seq_nums[0] != first or seq_nums[-1] != first + len(seq_nums) - 1:
            self._irregular.add(stream)
        self._next_seq[stream] = first + len(seq_nums)

    def event(self, doc: dict) -> None:
        descriptor = doc.get("descriptor")
        stream = self._streams.get(descriptor)
        if stream is None:
            self._problem(f"an event for unknown descriptor {descriptor!r} was ignored")
            return
        cols, seq = self.run.columns[stream], self.run.seq_nums[stream]
        n = len(seq)
        seq_num = doc.get("seq_num", n + 1)
        self._track_seq(stream, [seq_num])
        for key, value in doc.get("data", {}).items():
            if not self._keeps(descriptor, key):
                continue
            col = cols.get(key)
            if col is None:
                col = cols[key] = [None] * n          # a key that appears late: pad earlier events
            col.append(value)
        for key, col in cols.items():                 # a key missing from this event: None
            if len(col) == n:
                col.append(None)
        # counted last: a reader on another thread (the live feed) that sees n events finds their
        # n rows in every column (it once saw the count before the row: "frames ... not described yet")
        seq.append(seq_num)

    def event_page(self, doc: dict) -> None:
        descriptor = doc.get("descriptor")
        stream = self._streams.get(descriptor)
        if stream is None:
            self._problem(f"an event page for unknown descriptor {descriptor!r} was ignored")
            return
        data = doc.get("data", {})
        seq_nums = list(doc.get("seq_num", []))
        count = len(seq_nums)
        cols, seq = self.run.columns[stream], self.run.seq_nums[stream]
        n = len(seq)
        self._track_seq(stream, seq_nums)
        for key, values in data.items():
            if not self._keeps(descriptor, key):
                continue
            col = cols.get(key)
            if col is None:
                col = cols[key] = [None] * n
            col.extend(values)
        for key, col in cols.items():
            if len(col) < n + count:
                col.extend([None] * (n + count - len(col)))
        seq.extend(seq_nums)                          # counted last (see event)

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
        self._count_stream_points(doc)

    def _count_stream_points(self, doc: dict) -> None:
        """A stream with no events of its own (every data key of its descriptor ``external: 'STREAM:'``,
        as a flyer under bluesky's ``collect_while_completing`` writes it): its points are the
        StreamDatums' ``seq_nums``. A point counts (in ``seq_nums``, as an event would) once every
        data key of the descriptor has a StreamDatum covering it, so that a reader of the run so far
        finds frames, positions and scaler for each counted point. O(keys) per StreamDatum."""
        descriptor = doc.get("descriptor")
        stream = self._streams.get(descriptor)
        if stream is None:
            return
        keys = self._stream_only.get(descriptor)
        if keys is None:
            data_keys = self.run.descriptors[descriptor].get("data_keys") or {}
            external = [k for k, dk in data_keys.items() if str(dk.get("external", "")).upper().startswith("STREAM")]
            keys = self._stream_only[descriptor] = external if len(external) == len(data_keys) else []
        if not keys:
            return                                   # events carry this stream's points
        sr = self.run.stream_resources.get(doc.get("stream_resource")) or {}
        seq = doc.get("seq_nums") or {}
        covered = self._covered.setdefault(descriptor, {})
        key = sr.get("data_key")
        covered[key] = max(covered.get(key, 1), int(seq.get("stop", 1) or 1))
        upto = min(covered.get(k, 1) for k in keys)  # exclusive
        points = self.run.seq_nums[stream]
        first = points[-1] + 1 if points else 1
        self.run.points_from_stream_datums.add(stream)
        if upto > first:
            new = list(range(first, upto))
            self._track_seq(stream, new)
            points.extend(new)

    def stop(self, doc: dict) -> None:
        self.run.stop = doc
        self._check_events(doc.get("num_events") or {})
        self._on_complete(self.run)

    def _check_events(self, num_events: dict) -> None:
        """Lost, duplicated or out-of-order events (``seq_num``, the stop's ``num_events``) → problems.

        O(1) per stream when nothing looked wrong while the events came; a faulty stream is
        analysed event by event (:func:`sequence_problems`).
        """
        for stream, seq in self.run.seq_nums.items():
            expected = num_events.get(stream) if isinstance(num_events, dict) else None
            if stream in self._irregular or (expected is not None and expected != len(seq)):
                for message in sequence_problems(stream, seq, expected):
                    self._problem(message)

    def _problem(self, message: str) -> None:
        log.warning("run %s: %s", self.run.uid, message)
        self.run.problems.append(message)


def sequence_problems(stream: str, seq: list, expected: Any = None,
                      counted_by: str = "the stop document counts") -> list[str]:
    """What is wrong with one stream's ``seq_num`` list (1, 2, ... N expected; N = ``expected`` if given)."""
    if seq == list(range(1, len(seq) + 1)) and (expected is None or expected == len(seq)):
        return []
    counts = Counter(seq)
    numbers = [s for s in counts if isinstance(s, int)]
    last = max([*numbers, expected if isinstance(expected, int) else 0])
    missing = sorted(set(range(1, last + 1)) - set(numbers))
    twice = sorted(s for s in numbers if counts[s] > 1)
    out = []
    if missing:
        out.append(f"stream '{stream}': {len(missing)} event(s) missing (seq_num {_span(missing)}); "
                   f"{len(counts)} distinct arrived, {counted_by} {expected}")
    if twice:
        out.append(f"stream '{stream}': event(s) seq_num {_span(twice)} arrived more than once")
    late = next((i for i in range(1, len(seq)) if _before(seq[i], seq[i - 1])), None)
    if late is not None:
        out.append(f"stream '{stream}': events out of order (seq_num {seq[late]} arrived after {seq[late - 1]})")
    if not out:
        out.append(f"stream '{stream}': {len(seq)} events arrived, {counted_by} {expected}")
    return out


def _span(numbers: list[int], most: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > most else "")


def _before(a: Any, b: Any) -> bool:
    try:
        return bool(a < b)
    except TypeError:
        return False


class PassThroughFiller(Filler):
    """For event_model's ``RunRouter(filler_class=...)``: events and pages pass through untouched.

    The default filler unpacks every event page into events and packs it again to check each
    datum reference: O(rows × all columns) on the RunEngine's thread (15 s for a 200 000-row page
    of 104 columns). Frames are read later, in :mod:`.export`, which names a missing datum itself.
    """

    def event(self, doc: dict) -> dict:
        return doc

    def event_page(self, doc: dict) -> dict:
        return doc
