"""The simulated beamline's detector streams: the Eiger and PandA ZeroMQ streams in their wire formats.

What the simulated ``fly2dpd`` (:func:`.sim_beamline.fly2dpd` with ``streams=``) sends while it
"moves", as HXN's Eiger (through NSLS2/holoscan-proxy) and PandA do (formats: :mod:`.streamwire`):

- Eiger: a series opens with ``dheader-1.0``; each frame is a multipart message (``dimage-1.0``
  header with ``series``/``frame``, the ``dimage_d-1.0`` encoding header with shape [columns, rows],
  type and encoding, the bslz4 or LZ4 payload, ``dconfig-1.0`` times); ``dseries_end-1.0`` closes
  it. Frames are the **full** detector frame in the **raw** orientation: the frame the HDF5 file
  holds, placed at the file's ROI in a larger frame, then flipped left-right (the inverse of
  holoptycho's live ``detector_orientation = fliplr``).
- PandA: ``start``; ``data`` messages of ``samples_per_message`` samples (41, the PandA default
  holoptycho's replay uses) per channel with ``frame_number`` (a message counter) and
  ``starting_sample_number``; ``stop`` with ``emitted_frames``. Channels: the encoders the scan's
  motors read (``/INENC2.VAL.Value``…) with exactly the samples the PandA file gets, and the
  scaler (``scaler_channel``) with the SIS value of each point repeated over its samples.

At ``rate`` frames a second (paced; up to a few thousand on one core), with injected faults for
tests and benchmarks: ``drop`` (a fraction of frame ids never sent), ``duplicate`` (sent twice),
``reorder`` (sent a few frames late). Sockets are XPUB (what a subscriber sees is PUB's), so the
emitter can wait for its subscribers before the series starts.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .streamwire import compress, encoding_header, panda_data

log = logging.getLogger(__name__)


@dataclass
class SimStreamConfig:
    eiger: str = "tcp://127.0.0.1:*"              # bind addresses (a port of * is chosen by the system)
    panda: str = "tcp://127.0.0.1:*"
    rate: float = 1000.0                          # frames a second
    encoding: str = "bs32-lz4<"                   # or 'lz4<', 'raw'
    margin: tuple[int, int, int, int] = (8, 24, 6, 10)   # full frame around the file's ROI: top, left, bottom, right
    orientation: str = "fliplr"                   # raw = this applied to the global frame (its own inverse)
    samples_per_message: int = 41
    scaler_channel: str | None = "/FMC_IN.VAL1.Value"
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    seed: int = 0
    subscribers_wait_s: float = 5.0
    sndhwm: int = 100000
    process: bool = False                         # send from a forked process (a beamline's own CPU), not this one


@dataclass
class Emitted:
    series: int
    frames: int
    dropped: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    reordered: list[int] = field(default_factory=list)
    started_at: float = 0.0
    sent_at: list[float] = field(default_factory=list)       # when frame id i was (first) sent; nan if dropped
    elapsed_s: float = 0.0
    behind_s: float = 0.0                                    # how far the emitter ended behind its schedule


class SimStreams:
    """Two bound XPUB sockets; :meth:`emit` sends one scan's series and PandA run."""

    def __init__(self, config: SimStreamConfig | None = None) -> None:
        import zmq
        self.cfg = config or SimStreamConfig()
        self.series = 0
        self.emitted: list[Emitted] = []
        self._subscribed: list[Any] = []
        if self.cfg.process:                      # fixed ports, bound by each scan's sending process
            self._addresses = (_free_address(self.cfg.eiger), _free_address(self.cfg.panda))
            self.eiger_sock = self.panda_sock = None
            return
        self.ctx = zmq.Context.instance()
        self.eiger_sock = self._bind(self.cfg.eiger)
        self.panda_sock = self._bind(self.cfg.panda)

    def _bind(self, address: str) -> Any:
        import zmq
        s = self.ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.SNDHWM, self.cfg.sndhwm)
        s.setsockopt(zmq.LINGER, 2000)
        s.bind(address)
        return s

    @property
    def eiger_address(self) -> str:
        import zmq
        return self._addresses[0] if self.cfg.process else self.eiger_sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    @property
    def panda_address(self) -> str:
        import zmq
        return self._addresses[1] if self.cfg.process else self.panda_sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def roi(self, frame_shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """The file's window in the global full frame: what the receiver's ``roi`` must be."""
        top, left, _b, _r = self.cfg.margin
        return top, left, int(frame_shape[0]), int(frame_shape[1])

    def full_raw(self, frame: np.ndarray) -> np.ndarray:
        """The file's frame → the stream's full raw frame."""
        top, left, bottom, right = self.cfg.margin
        full = np.zeros((frame.shape[0] + top + bottom, frame.shape[1] + left + right), frame.dtype)
        full[top:top + frame.shape[0], left:left + frame.shape[1]] = frame
        if self.cfg.orientation == "fliplr":
            return full[:, ::-1]
        if self.cfg.orientation == "flipud":
            return full[::-1]
        return full

    def wait_for_subscribers(self) -> bool:
        """Until each socket has a subscriber (XPUB hears the subscription), at most ``subscribers_wait_s``."""
        import zmq
        for sock in (self.eiger_sock, self.panda_sock):
            if sock in self._subscribed:
                continue
            if sock.poll(int(1000 * self.cfg.subscribers_wait_s), zmq.POLLIN):
                sock.recv()
                self._subscribed.append(sock)
        return len(self._subscribed) == 2

    def emit(self, n: int, frame: Callable[[int], np.ndarray], channels: dict[str, np.ndarray],
             samples_per_frame: int) -> Emitted:
        """Send frames 0…n−1 (``frame(i)``: the file's frame of view i) and the PandA samples
        (``channels``: name → n × samples_per_frame values), interleaved as they would be measured."""
        self.series += 1
        if self.cfg.process:
            out = _in_child(self, n, frame, channels, samples_per_frame)
            self.emitted.append(out)
            return out
        self.wait_for_subscribers()
        return self._send(self.series, n, frame, channels, samples_per_frame)

    def _send(self, series: int, n: int, frame: Callable[[int], np.ndarray], channels: dict[str, np.ndarray],
              samples_per_frame: int) -> Emitted:
        import zmq
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed + series)
        ids = np.arange(n)
        k_drop, k_dup, k_re = (int(round(f * n)) for f in (cfg.drop, cfg.duplicate, cfg.reorder))
        chosen = rng.permutation(ids)
        dropped = set(chosen[:k_drop].tolist())
        duplicated = set(chosen[k_drop:k_drop + k_dup].tolist())
        reordered = set(chosen[k_drop + k_dup:k_drop + k_dup + k_re].tolist())
        out = Emitted(series=series, frames=n, dropped=sorted(dropped), duplicated=sorted(duplicated),
                      reordered=sorted(reordered))
        sample0 = frame(0) if n else np.zeros((1, 1), np.uint32)
        enc = encoding_header(self.full_raw(sample0).shape, sample0.dtype, cfg.encoding)
        es, ps = self.eiger_sock, self.panda_sock

        def send_frame(i: int) -> None:
            payload = compress(self.full_raw(frame(i)), cfg.encoding)
            t = time.time()
            es.send_multipart([json.dumps({"htype": "dimage-1.0", "series": series, "frame": int(i), "hash": ""}).encode(),
                               enc, payload,
                               json.dumps({"htype": "dconfig-1.0", "start_time": int(t * 1e9), "stop_time": int(t * 1e9),
                                           "real_time": int(1e9 / cfg.rate)}).encode()])

        es.send_multipart([json.dumps({"htype": "dheader-1.0", "series": series, "header_detail": "basic"}).encode(),
                           json.dumps({"nimages": n, "ntrigger": 1}).encode()])
        t0 = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        ps.send_json({"msg_type": "start", "arm_time": t0, "start_time": t0, "hw_time_offset_ns": None})
        total = n * samples_per_frame
        per_msg = cfg.samples_per_message
        sent_samples, msg_no = 0, 0
        delayed: dict[int, list[int]] = {}
        out.sent_at = [float("nan")] * n
        start = time.perf_counter()
        out.started_at = time.time()
        for i in range(n):
            due = start + i / cfg.rate
            ahead = due - time.perf_counter()
            if ahead > 0.001:
                time.sleep(ahead)
            if i in reordered:
                delayed.setdefault(i + int(rng.integers(1, 9)), []).append(i)
            elif i not in dropped:
                send_frame(i)
                out.sent_at[i] = time.time()
                if i in duplicated:
                    delayed.setdefault(i + 2, []).append(-1 - i)     # the same id again, two frames later
            for j in delayed.pop(i, []):
                send_frame(j if j >= 0 else -1 - j)
                if j >= 0:
                    out.sent_at[j] = time.time()
            while sent_samples < min(total, (i + 1) * samples_per_frame) and \
                    (total - sent_samples >= per_msg or i == n - 1):
                a, b = sent_samples, min(total, sent_samples + per_msg)
                if b > (i + 1) * samples_per_frame and i < n - 1:
                    break                                            # that message is not measured yet
                ps.send(panda_data(msg_no, {ch: (a, v[a:b]) for ch, v in channels.items()}), zmq.NOBLOCK)
                sent_samples, msg_no = b, msg_no + 1
        for i in sorted(delayed):
            for j in delayed[i]:
                send_frame(j if j >= 0 else -1 - j)
                if j >= 0:
                    out.sent_at[j] = time.time()
        out.elapsed_s = time.perf_counter() - start
        out.behind_s = max(0.0, out.elapsed_s - n / cfg.rate)
        es.send_multipart([json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()])
        ps.send_json({"msg_type": "stop", "emitted_frames": msg_no})
        if not cfg.process:
            self.emitted.append(out)
        log.info("simulated streams: series %d, %d frames in %.2f s (%d dropped, %d duplicated, %d late)",
                 series, n, out.elapsed_s, len(dropped), len(duplicated), len(reordered))
        return out

    def close(self) -> None:
        if self.eiger_sock is not None:
            self.eiger_sock.close()
            self.panda_sock.close()


def _free_address(address: str) -> str:
    """``tcp://HOST:*`` → ``tcp://HOST:PORT`` with a port free now (for a sending process to bind)."""
    import socket
    if not address.startswith("tcp://") or not address.endswith(":*"):
        return address
    host = address[len("tcp://"):-2]
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def _in_child(streams: SimStreams, n: int, frame: Callable[[int], np.ndarray], channels: dict[str, np.ndarray],
              samples_per_frame: int) -> Emitted:
    """One scan sent by a forked process (it inherits ``frame`` and the samples) on the fixed addresses."""
    import multiprocessing
    import pickle
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        import zmq
        streams.ctx = zmq.Context()               # never the parent's context in a forked process
        streams.eiger_sock = streams._bind(streams._addresses[0])
        streams.panda_sock = streams._bind(streams._addresses[1])
        streams._subscribed = []
        streams.wait_for_subscribers()
        out = streams._send(streams.series, n, frame, channels, samples_per_frame)
        streams.eiger_sock.close(2000)
        streams.panda_sock.close(2000)
        streams.ctx.term()
        send.send_bytes(pickle.dumps(out))
    proc = ctx.Process(target=child, name="sim-streams-sender", daemon=True)
    proc.start()
    send.close()
    try:
        data = recv.recv_bytes()
    except EOFError:
        raise RuntimeError(f"the simulated streams' sending process ended without a report (exit {proc.exitcode})") from None
    finally:
        proc.join(30)
    return pickle.loads(data)


def emit_scan(flyer: Any, then: Callable[[], Any]) -> Any:
    """The simulated PandA flyer's ``complete`` with streams: a thread sends the scan on the streams
    (frames as the detector's HDF5 file gets them, the encoder and scaler samples the PandA and SIS
    files get), then ``then()`` (the files and documents); the status finishes after both."""
    import threading

    from ophyd.status import StatusBase

    from .sim_beamline import PANDA_FIELDS
    st = StatusBase()
    streams: SimStreams = flyer.streams
    det = flyer.detectors[0]
    sample = flyer.sample
    ss = flyer.position_supersample
    enc_for, sis = flyer.recorded()
    channels = {"/" + PANDA_FIELDS[key]: counts.astype(np.float64) for key, counts in enc_for.items()}
    if streams.cfg.scaler_channel:
        channels[streams.cfg.scaler_channel] = np.repeat(sis["sclr1_ch4"].astype(np.float64), ss)

    def files_during_scan() -> None:
        """With a sending process: the detector's file is written here meanwhile, at the scan's pace
        (as the Eiger's file writer does), not all at once after the last frame."""
        n, step = sample.n_views, 256
        t0 = time.perf_counter()
        for c in range(0, n, step):
            time.sleep(max(0.0, t0 + min(n, c + step) / streams.cfg.rate - time.perf_counter()))
            for d in flyer.detectors:
                d.expose(list(range(c, min(n, c + step))))
        flyer.frames_written = True

    def work() -> None:
        try:
            writer = None
            if streams.cfg.process:
                writer = threading.Thread(target=files_during_scan, name="sim-detector-file", daemon=True)
                writer.start()
            streams.emit(sample.n_views, lambda i: sample.frame(i, det.dtype), channels, ss)
            if writer is not None:
                writer.join()
            then()
            st.set_finished()
        except Exception as exc:  # noqa: BLE001 - the status carries the failure to the RunEngine
            st.set_exception(exc)
    threading.Thread(target=work, name="sim-streams", daemon=True).start()
    return st
