"""Live previews in the catalog: one ``live`` node per raw run in the processed container.

The live job (``python -m hxn_ptycho.job SPEC --follow``, :mod:`hxn_ptycho.live`) publishes
nothing: it replaces its preview file (``<result>.preview.h5``) at most once a second. A
:class:`LivePublisher` (a daemon thread of the callback or launcher process, never the RunEngine's
thread) notices a newer preview file and writes it to the node ``processed["live-<raw_uid>"]``:
arrays ``object_amplitude``, ``object_phase``, ``probe_amplitude``, ``probe_phase`` and the metadata
``live`` (views, iteration, data error, when the newest included view became readable, when the
preview was written), latest-wins (a preview not yet sent is replaced by a newer one; the arrays are
overwritten in place). The node is not a run: it has no ``start`` document and no ``plan_name``, so
the queries for derived runs never see it, and there is still exactly one derived run per raw run.

NSLS2/holoptycho keeps its previews at ``hxn/processed/holoptycho/{run_uid}/live``; here the node
sits beside the derived runs under a fixed key, so a reader finds it from the raw uid alone.

Read it with :func:`live_preview` (``hxn_ptycho.callbacks.live_preview(catalog, raw_uid=...)``) or
``hxn-ptycho results --live --raw-uid UID``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import CatalogError, connect, resolve_catalog, runs

log = logging.getLogger(__name__)

ARRAYS = ("object_amplitude", "object_phase", "probe_amplitude", "probe_phase")
META_KEYS = ("views", "iteration", "data_error", "newest_readable_at", "written_at", "taken_at", "final",
             "receiver_falling_behind", "receiver_undecided_views", "receiver_missing_ids")   # the stream receiver's


def live_key(raw_uid: str) -> str:
    return f"live-{raw_uid}"


class _Processed:
    """The processed container, and its nodes looked up by path from the root (the runs client's
    ``[]`` searches partial run uids, which a live node has none of)."""

    def __init__(self, catalog: Any) -> None:
        cfg = resolve_catalog(catalog)
        self.container = runs(cfg, "processed")
        self.root = connect(cfg)
        self.path = cfg.processed

    def get(self, key: str) -> Any:
        try:
            return self.root[f"{self.path.strip('/')}/{key}"]
        except KeyError:
            return None


def _live_node(processed: _Processed, key: str, meta: dict[str, Any]) -> Any:
    """The live node ``key``, created where missing."""
    node = processed.get(key)
    if node is not None:
        return node
    try:
        return processed.container.create_container(key=key, metadata=meta)
    except Exception:                   # created meanwhile by another publisher: take it
        node = processed.get(key)
        if node is None:
            raise
        return node


def publish_preview(processed: "_Processed", raw_uid: str, preview: dict[str, Any]) -> None:
    """Write (or replace) the live node of ``raw_uid`` from a preview dict (:func:`hxn_ptycho.live.read_preview`)."""
    key = live_key(raw_uid)
    meta = {"raw_uid": raw_uid, "kind": "live preview",
            "live": {k: (float(preview[k]) if k in preview else None) for k in META_KEYS},
            "published_at": time.time()}
    node = _live_node(processed, key, meta)
    for name in ARRAYS:
        arr = np.ascontiguousarray(preview[name], dtype=np.float32)
        if name in node and tuple(node[name].shape) == arr.shape:
            node[name].write(arr)                        # latest wins: overwritten in place
        else:
            if name in node:                             # the canvas grew: a new array
                node[name].delete(external_only=False)
            node.write_array(arr, key=name)
    node.update_metadata(metadata=meta)                  # last: the numbers describe arrays already there


class LivePublisher:
    """Follow a job's preview file and publish each newer one to the catalog (latest-wins, ≤ 1/``interval_s``)."""

    def __init__(self, catalog: Any, raw_uid: str, preview_path: str | os.PathLike, interval_s: float = 1.0,
                 poll_s: float = 0.2) -> None:
        self.catalog, self.raw_uid = catalog, raw_uid
        self.path = Path(preview_path)
        self.interval, self.poll = float(interval_s), float(poll_s)
        self.published: list[dict[str, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hxn-ptycho-live-{raw_uid[:8]}", daemon=True)

    def start(self) -> "LivePublisher":
        self._thread.start()
        return self

    def _run(self) -> None:
        from hxn_ptycho.live import read_preview
        processed = None
        seen = 0.0
        last = 0.0
        while True:
            stopping = self._stop.is_set()
            try:
                mtime = self.path.stat().st_mtime if self.path.exists() else 0.0
                if mtime > seen and (stopping or time.time() - last >= self.interval):
                    preview = read_preview(self.path)       # the newest: earlier ones were replaced
                    seen = mtime
                    if processed is None:
                        processed = _Processed(self.catalog)
                    publish_preview(processed, self.raw_uid, preview)
                    last = time.time()
                    self.published.append({"published_at": last, "views": float(preview.get("views", 0)),
                                           "written_at": float(preview.get("written_at", 0.0))})
            except (OSError, CatalogError, KeyError) as exc:
                self.errors += 1
                log.warning("live preview of %s not published: %s", self.raw_uid, exc)
            except Exception as exc:  # noqa: BLE001 - a preview never stops the publisher or the scan
                self.errors += 1
                log.warning("live preview of %s not published: %s: %s", self.raw_uid, type(exc).__name__, exc)
            if stopping:
                return
            self._stop.wait(self.poll)

    def stop(self, timeout: float = 30.0) -> None:
        """Publish the newest preview once more if it changed, then end the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def live_preview(catalog: Any = None, *, raw_uid: str) -> dict[str, Any] | None:
    """The live preview of the raw run ``raw_uid``: arrays and numbers, or None if there is none."""
    node = _Processed(catalog).get(live_key(raw_uid))
    if node is None:
        return None
    out: dict[str, Any] = dict(node.metadata.get("live") or {})
    out["published_at"] = node.metadata.get("published_at")
    for name in ARRAYS:
        if name in node:
            out[name] = node[name].read()
    return out


def newest_live(catalog: Any = None) -> str | None:
    """The raw uid of the most recently published live preview, or None (the keys are listed: the
    runs container's searches see only runs)."""
    processed = _Processed(catalog)
    best: tuple[float, str] | None = None
    for key in list(processed.container):
        if not str(key).startswith("live-"):
            continue
        node = processed.get(str(key))
        if node is None:
            continue
        at = float(node.metadata.get("published_at") or 0.0)
        if best is None or at > best[0]:
            best = (at, str(node.metadata.get("raw_uid")))
    return None if best is None else best[1]


def phase_limits(phase: np.ndarray) -> tuple[float, float]:
    """Colour limits of an object phase: its 1st and 99th percentiles, so the few wild pixels at the
    canvas's unlit edge do not wash out the sample (as the summary figure scales it)."""
    lo, hi = np.percentile(phase, [1, 99]) if phase.size else (0.0, 1.0)
    return float(lo), float(hi) if hi > lo else float(lo) + 1e-6


def draw(prev: dict[str, Any], fig: Any = None) -> Any:
    """The preview as a figure: object phase, probe amplitude, the data error and the views so far."""
    import matplotlib.pyplot as plt
    if fig is None:
        fig = plt.figure(figsize=(9, 4))
    fig.clf()
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.imshow(prev["object_phase"], cmap="gray", clim=phase_limits(np.asarray(prev["object_phase"])))
    a.set_title(f"object phase: {int(prev.get('views') or 0)} views")
    b.imshow(prev["probe_amplitude"][0], cmap="magma")
    err = prev.get("data_error")
    b.set_title(f"probe: iteration {int(prev.get('iteration') or 0)}, data error "
                f"{float(err) if err is not None else float('nan'):.3g}")
    for ax in (a, b):
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


class LiveFigure:
    """A figure that follows the live reconstruction while ``RE(...)`` runs: ``RE.subscribe(LiveFigure(feed))``.

    Four panels: the object phase, the probe (first mode's amplitude), the views so far over the
    scan area (their window centres on the object canvas), and the data error of every preview so
    far. A reader thread looks for a newer preview file (the live job's ``<result>.preview.h5`` of
    the run the :class:`~.livefeed.LiveFeed` follows, or ``preview_path``) at most once an
    ``interval_s`` and loads it — never the RunEngine's thread. With ``png``, that thread also draws
    the figure (Agg) and replaces the PNG in place: the RunEngine does nothing. Without it (a
    window), the RunEngine's callback only moves the newest loaded preview into the artists
    (``set_data``) and asks for a redraw (``draw_idle``), which the GUI's event loop — bluesky's
    during-task on the main thread — performs; a document that finds nothing new costs one check.
    """

    def __init__(self, feed: Any = None, *, preview_path: str | os.PathLike | None = None,
                 png: str | os.PathLike | None = None, interval_s: float = 1.0, say: Any = None) -> None:
        self.feed, self.fixed = feed, (Path(preview_path) if preview_path is not None else None)
        self.png = None if png is None else Path(png)
        self.interval, self.say = float(interval_s), say
        self.history: list[tuple[int, float]] = []     # (iteration, data error) of every preview shown
        self.shown = 0                                  # previews drawn
        self.seconds = 0.0                              # spent on the RunEngine's thread
        self.raw_uid: str | None = None
        self.fig: Any = None
        self._artists: dict[str, Any] = {}
        self._slot: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen = 0.0
        self._thread = threading.Thread(target=self._read, name="hxn-ptycho-live-figure", daemon=True)
        self._thread.start()

    # -- the RunEngine's thread: cheap -----------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        t0 = time.perf_counter()
        if name == "start":
            self.raw_uid = str(doc.get("uid"))
            with self._lock:
                self._slot, self._seen = None, 0.0
            self.history = []
        if self._slot is not None and self.png is None:
            with self._lock:
                prev, self._slot = self._slot, None
            if prev is not None:
                try:
                    self.update(prev)
                    self.fig.canvas.draw_idle()
                except Exception as exc:  # noqa: BLE001 - a figure never disturbs the scan
                    log.warning("live figure not updated: %s: %s", type(exc).__name__, exc)
        self.seconds += time.perf_counter() - t0

    # -- the reader thread -----------------------------------------------------------------------------
    def _path(self) -> Path | None:
        if self.fixed is not None:
            return self.fixed
        if self.feed is None or self.raw_uid is None:
            return None
        live = self.feed.runs.get(self.raw_uid)
        if live is None:
            return None
        from hxn_ptycho.live import preview_path_for
        return preview_path_for(live.result_path)

    def _read(self) -> None:
        from hxn_ptycho.live import read_preview
        while not self._stop.wait(self.interval):
            self.poll(read_preview)

    def poll(self, read: Any = None) -> bool:
        """Load the preview if it is newer than the last (the reader thread calls this); True if so."""
        if read is None:
            from hxn_ptycho.live import read_preview as read
        path = self._path()
        try:
            mtime = path.stat().st_mtime if path is not None else 0.0
            if mtime <= self._seen:
                return False
            prev = read(path)
        except (OSError, KeyError) as exc:
            log.debug("live figure: preview not read (%s)", exc)
            return False
        self._seen = mtime
        if self.png is not None:
            try:
                self.update(prev)
                from hxn_ptycho.h5util import atomic_path
                with atomic_path(self.png) as tmp:
                    self.fig.savefig(tmp, dpi=72, format="png")
            except Exception as exc:  # noqa: BLE001
                log.warning("live figure not written: %s: %s", type(exc).__name__, exc)
                return False
        else:
            with self._lock:
                self._slot = prev
        if self.say is not None:
            self.say(f"live: {int(prev.get('views') or 0)} views, iteration {int(prev.get('iteration') or 0)}, "
                     f"data error {float(prev.get('data_error', float('nan'))):.4g}")
        return True

    # -- drawing -----------------------------------------------------------------------------------------
    def _figure(self) -> Any:
        if self.png is not None:
            from matplotlib.figure import Figure
            return Figure(figsize=(10, 7))
        import matplotlib.pyplot as plt
        return plt.figure("hxn-ptycho live", figsize=(10, 7))

    def update(self, prev: dict[str, Any]) -> None:
        """Move a preview into the figure (created on first use)."""
        phase, amp = np.asarray(prev["object_phase"]), np.asarray(prev["probe_amplitude"])[0]
        pos = np.asarray(prev.get("positions_px", np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
        n = amp.shape[-1]
        it, err = int(prev.get("iteration") or 0), float(prev.get("data_error", float("nan")))
        if np.isfinite(err) and (not self.history or self.history[-1][0] != it):
            self.history.append((it, err))
        a = self._artists
        if self.fig is None or a.get("shape") != phase.shape:
            if self.fig is None:
                self.fig = self._figure()
            self.fig.clf()
            ax = self.fig.subplots(2, 2)
            a.clear()
            a["shape"] = phase.shape
            a["phase"] = ax[0, 0].imshow(phase, cmap="gray")
            a["probe"] = ax[0, 1].imshow(amp, cmap="magma")
            ax[1, 0].set_xlim(0, phase.shape[1])
            ax[1, 0].set_ylim(phase.shape[0], 0)
            ax[1, 0].set_aspect("equal")
            a["views"] = ax[1, 0].scatter([], [], s=4, c="tab:blue")
            ax[1, 0].set_title("views so far over the scan area")
            (a["error"],) = ax[1, 1].semilogy([], [], "o-", ms=3)
            ax[1, 1].set_xlabel("iteration")
            ax[1, 1].set_title("data error")
            a["axes"] = ax
            for x in (ax[0, 0], ax[0, 1]):
                x.set_xticks([])
                x.set_yticks([])
        ax = a["axes"]
        a["phase"].set_data(phase)
        a["phase"].set_clim(*phase_limits(phase))
        a["probe"].set_data(amp)
        a["probe"].set_clim(0.0, float(amp.max()) or 1.0)
        a["views"].set_offsets(pos[:, ::-1] + n / 2 if pos.size else np.zeros((0, 2)))
        if self.history:
            xs, ys = zip(*self.history)
            a["error"].set_data(xs, ys)
            ax[1, 1].relim()
            ax[1, 1].autoscale_view()
        ax[0, 0].set_title(f"object phase: {int(prev.get('views') or 0)} views")
        ax[0, 1].set_title(f"probe: iteration {it}")
        self.shown += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def write_png(prev: dict[str, Any], path: str | os.PathLike) -> Path:
    """The preview figure, replaced in place (temporary name, then rename)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hxn_ptycho.h5util import atomic_path
    fig = draw(prev)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


def watch(catalog: Any = None, *, raw_uid: str | None = None, png: str | os.PathLike | None = None,
          interval_s: float = 1.0, idle_exit_s: float | None = None, say: Any = print) -> int:
    """Follow the live preview of ``raw_uid`` (default: the newest one): redraw a window, or replace
    the PNG ``png``, whenever it changes; end after ``idle_exit_s`` without a change (None: never)."""
    uid = raw_uid or newest_live(catalog)
    if uid is None:
        say("hxn-ptycho watch: no live preview in the catalog yet")
        return 1
    fig = None
    last: float | None = None
    changed = time.monotonic()
    while True:
        prev = live_preview(catalog, raw_uid=uid)
        stamp = None if prev is None else prev.get("written_at")
        if prev is not None and stamp != last:
            last, changed = stamp, time.monotonic()
            if png is not None:
                write_png(prev, png)
            else:
                import matplotlib.pyplot as plt
                fig = draw(prev, fig)
                plt.pause(0.01)
            say(f"{uid}: {int(prev.get('views') or 0)} views, iteration {int(prev.get('iteration') or 0)}")
        if idle_exit_s is not None and time.monotonic() - changed > idle_exit_s:
            return 0
        time.sleep(interval_s)


def not_followed(params: dict) -> str | None:
    """Why no live job is started for a scan reconstructed with ``params`` (None: one is): the held-out
    probe-mode count (``auto_rule='heldout'``) needs the finished scan, so such a scan's growing file is
    still written and its reconstruction is the post-stop job's."""
    from hxn_ptycho.mode_count import wants_count
    from hxn_ptycho.params import ReconParams
    if wants_count(ReconParams.from_dict(dict(params))):
        return ("auto_rule='heldout' counts the probe modes of the finished scan: no live job, the scan is "
                "reconstructed at its stop")
    return None


def start_live_job(*, params: dict, nprocs: int, catalog: Any, work_dir: str | os.PathLike, queue: Any,
                   scan_path: Path, result_path: Path, raw_uid: str, scan_id: Any,
                   nice: int = 0) -> tuple[Any, Any, LivePublisher | None]:
    """Start the live job of a scan being measured (the document feed, :mod:`.livefeed`, and the
    detector-stream receiver, :mod:`.stream`): its :class:`~hxn_ptycho.spec.JobSpec` on the growing
    ``scan_path``, started at once through ``queue`` (the callback's :class:`~.launcher.JobQueue`;
    None: one in ``WORK/queue``) by :meth:`~.launcher.JobQueue.start_now` with the spec beside
    ``result_path`` (``X.h5`` → ``X.spec.json``, its outcome ``X.outcome.json``), and, with a catalog,
    the :class:`LivePublisher` of its previews. Returns (spec, live job handle, publisher or None)."""
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.spec import Execution, JobSpec, Source

    from .launcher import Job, JobQueue
    spec = JobSpec(params=ReconParams.from_dict(dict(params)), execution=Execution(ranks=nprocs),
                   source=Source(scan_file=str(Path(scan_path).resolve()), result_file=str(Path(result_path).resolve()),
                                 raw_uid=raw_uid, scan_id=scan_id if isinstance(scan_id, int) else None,
                                 catalog=catalog))
    Path(result_path).parent.mkdir(parents=True, exist_ok=True)
    queue = queue if queue is not None else JobQueue(Path(work_dir) / "queue")
    job = queue.start_now(Job(spec=spec.to_dict(), follow=True, nice=int(nice)),
                          spec_file=Path(result_path).with_suffix(".spec.json"))
    publisher = None
    if catalog is not None:
        from hxn_ptycho.live import preview_path_for
        publisher = LivePublisher(catalog, raw_uid, preview_path_for(Path(result_path))).start()
    return spec, job, publisher
