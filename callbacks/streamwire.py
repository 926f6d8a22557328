"""The wire formats of HXN's detector streams: the Eiger's ZeroMQ frames and the PandA's JSON messages.

Followed (read, not copied):

- NSLS2/holoptycho ``holoptycho/datasource.py``: ``EigerZmqRxOp`` (SUB socket, ``RCVHWM`` 20000,
  ``RECONNECT_IVL_MAX`` 1 s, CurveZMQ keys ``SERVER_PUBLIC_KEY``/``CLIENT_PUBLIC_KEY``/``CLIENT_SECRET_KEY``,
  all three or none), ``decode_json_message`` (a multipart message: a JSON header with ``frame``
  (and ``series``), a JSON encoding header ``htype: dimage_d-1.0`` with ``shape`` = [columns, rows],
  ``type`` uint16/uint32 and ``encoding`` ``bs32-lz4<``/``bs16-lz4<`` (bitshuffle + LZ4),
  ``lz4<`` or ``raw``, then the payload); ``PositionRxOp`` (PandA JSON messages, ``msg_type``
  start/data/stop, ``frame_number``, ``datasets[channel]['data']`` with ``starting_sample_number``
  and ``size``).
- NSLS2/holoptycho ``scripts/replay_from_tiled.py`` ``_encode_frame``/``_eiger_encoding_msg``/
  ``publish_panda``: the bslz4 payload is a 12-byte big-endian header (uncompressed bytes: u64,
  block bytes: u32) followed by bitshuffle-LZ4 blocks (the layout of the HDF5 bitshuffle filter
  and of DECTRIS' ``dectris.compression``); PandA messages bundle 41 samples.
- NSLS2/holoscan-proxy ``main.cpp``/``config.yml``: the proxy PULLs from the detector and copies every
  message part unchanged to each receiver (PUB or PUSH, optionally CurveZMQ-encrypted), so the
  receiver sees the detector's own multipart messages.
- DECTRIS SIMPLON stream API 1.x (``htype`` ``dheader-1.0`` opens a series, ``dimage-1.0`` heads a
  frame with ``series``/``frame``/``hash``, ``dseries_end-1.0`` closes it).

Decompression uses maintained packages (``bitshuffle`` for bslz4, ``lz4`` for LZ4), the optional
extra ``hxn-ptycho[stream]``; no decoder is written here.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from hxn_ptycho.errors import BadInput

#: the Eiger's ``encoding`` names → the codec used
ENCODINGS = {"bs32-lz4<": "bslz4", "bs16-lz4<": "bslz4", "bs8-lz4<": "bslz4", "lz4<": "lz4", "raw": "raw"}
TYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "float32": np.float32}
BSLZ4_HEADER = struct.Struct(">QI")      # uncompressed bytes, block bytes (big-endian)


class StreamError(BadInput):
    """A stream message that cannot be read or placed; the message names it."""


_MODULES: dict[str, Any] = {}


def _need(module: str) -> Any:
    if module in _MODULES:
        return _MODULES[module]
    import importlib
    import os
    if module == "bitshuffle" and "bitshuffle" not in __import__("sys").modules:
        # bitshuffle decompresses with OpenMP threads: on a shared machine their start-up costs 10× a
        # frame (measured: 150 µs against 18 µs for a 100×120 frame); one thread unless told otherwise
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        _MODULES[module] = importlib.import_module(module)
        return _MODULES[module]
    except ImportError:
        raise StreamError(f"the detector stream needs the '{module.split('.')[0]}' package: "
                          "pip install 'hxn-ptycho[stream]'") from None


def decompress(payload: bytes | memoryview, encoding: str, dtype: Any, rows: int, cols: int) -> np.ndarray:
    """One frame (rows, cols) from its payload; refuses an unknown encoding or a wrong size by name."""
    codec = ENCODINGS.get(encoding)
    if codec is None:
        raise StreamError(f"Eiger frame encoding {encoding!r} is not supported (known: {sorted(ENCODINGS)})")
    dt = np.dtype(dtype)
    nbytes = rows * cols * dt.itemsize
    if codec == "raw":
        if len(payload) != nbytes:
            raise StreamError(f"raw Eiger frame of {len(payload)} bytes for {rows}×{cols} {dt}")
        return np.frombuffer(payload, dt).reshape(rows, cols).copy()
    if codec == "lz4":
        block = _need("lz4.block")
        try:
            data = block.decompress(bytes(payload), uncompressed_size=nbytes)
        except Exception as exc:  # noqa: BLE001 - lz4 raises its own error types
            raise StreamError(f"LZ4 Eiger frame does not decompress to {nbytes} bytes ({exc})") from None
        return np.frombuffer(data, dt).reshape(rows, cols).copy()
    bitshuffle = _need("bitshuffle")
    if len(payload) < BSLZ4_HEADER.size:
        raise StreamError("bslz4 Eiger frame shorter than its 12-byte header")
    total, block_bytes = BSLZ4_HEADER.unpack_from(payload, 0)
    if total != nbytes or block_bytes % dt.itemsize:
        raise StreamError(f"bslz4 Eiger frame says {total} bytes in blocks of {block_bytes}; "
                          f"{rows}×{cols} {dt} is {nbytes} bytes")
    body = np.frombuffer(payload, np.uint8, offset=BSLZ4_HEADER.size)
    try:
        out = bitshuffle.decompress_lz4(body, (rows * cols,), dt, block_bytes // dt.itemsize)
    except Exception as exc:  # noqa: BLE001 - bitshuffle raises ValueError/RuntimeError
        raise StreamError(f"bslz4 Eiger frame does not decompress ({exc})") from None
    return np.asarray(out).reshape(rows, cols)


def compress(frame: np.ndarray, encoding: str = "bs32-lz4<") -> bytes:
    """A frame's payload as the Eiger sends it (the simulator's side of :func:`decompress`)."""
    codec = ENCODINGS.get(encoding)
    flat = np.ascontiguousarray(frame).ravel()
    if codec == "raw":
        return flat.tobytes()
    if codec == "lz4":
        return bytes(_need("lz4.block").compress(flat.tobytes(), store_size=False))
    if codec != "bslz4":
        raise StreamError(f"Eiger frame encoding {encoding!r} is not supported")
    bitshuffle = _need("bitshuffle")
    block = 8192 // flat.dtype.itemsize          # DECTRIS' and the HDF5 filter's default: 8 KiB blocks
    body = np.asarray(bitshuffle.compress_lz4(flat, block_size=block)).tobytes()
    return BSLZ4_HEADER.pack(flat.nbytes, block * flat.dtype.itemsize) + body


def encoding_header(shape: tuple[int, int], dtype: Any, encoding: str) -> bytes:
    """The ``dimage_d-1.0`` part: shape as the Eiger reports it, [columns, rows]."""
    name = next((k for k, v in TYPES.items() if np.dtype(v) == np.dtype(dtype)), None)
    if name is None:
        raise StreamError(f"Eiger frames of type {np.dtype(dtype)} are not in the wire format")
    return json.dumps({"htype": "dimage_d-1.0", "shape": [int(shape[1]), int(shape[0])], "type": name,
                       "encoding": encoding}).encode()


@dataclass
class EigerMessage:
    kind: str                       # 'start' (dheader), 'frame', 'end' (dseries_end), 'other'
    series: int | None
    frame: int | None = None
    image: np.ndarray | None = None
    header: dict | None = None


def _json(part: bytes | memoryview, what: str) -> dict:
    try:
        d = json.loads(bytes(part))
    except (ValueError, UnicodeDecodeError):
        raise StreamError(f"Eiger message: its {what} is not JSON") from None
    if not isinstance(d, dict):
        raise StreamError(f"Eiger message: its {what} is not a JSON object")
    return d


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def peek_eiger(parts: list) -> EigerMessage:
    """What a multipart Eiger message is, without decompressing (the receiver's cheap look)."""
    if not parts:
        raise StreamError("empty Eiger message")
    head = _json(parts[0], "first part")
    htype = str(head.get("htype", ""))
    series = _int_or_none(head.get("series"))
    if htype.startswith("dheader"):
        return EigerMessage("start", series, header=head)
    if htype.startswith("dseries_end"):
        return EigerMessage("end", series, header=head)
    if "frame" in head:
        frame = _int_or_none(head.get("frame"))
        if frame is None or frame < 0:
            raise StreamError(f"Eiger frame header with frame id {head.get('frame')!r}: not a frame number")
        if len(parts) < 3:
            raise StreamError(f"Eiger frame {frame}: {len(parts)} message part(s), expected header, "
                              "encoding header and payload")
        return EigerMessage("frame", series, frame, header=head)
    return EigerMessage("other", series, header=head)


_ENCODING_CACHE: dict[bytes, dict] = {}


def decode_eiger(parts: list, msg: EigerMessage | None = None) -> EigerMessage:
    """A multipart Eiger message with its frame decompressed (rows, cols) in the detector's raw
    orientation (``msg``: its :func:`peek_eiger`, if already made)."""
    msg = msg or peek_eiger(parts)
    if msg.kind != "frame":
        return msg
    key = bytes(parts[1])
    enc = _ENCODING_CACHE.get(key)         # every frame of a series has the same encoding header
    if enc is None:
        enc = _json(key, "encoding header")
        if len(_ENCODING_CACHE) < 64:
            _ENCODING_CACHE[key] = enc
    if enc.get("htype") != "dimage_d-1.0":
        raise StreamError(f"Eiger frame {msg.frame}: encoding header htype {enc.get('htype')!r}, expected 'dimage_d-1.0'")
    shape, typ = enc.get("shape"), enc.get("type")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise StreamError(f"Eiger frame {msg.frame}: encoding header shape {shape!r} is not [columns, rows]")
    if typ not in TYPES:
        raise StreamError(f"Eiger frame {msg.frame}: pixel type {typ!r} is not supported (known: {sorted(TYPES)})")
    cols, rows = shape
    msg.image = decompress(memoryview(parts[2]), str(enc.get("encoding")), TYPES[typ], rows, cols)
    return msg


@dataclass
class PandaMessage:
    kind: str                                  # 'start', 'data', 'stop', 'other'
    number: int | None = None                  # the message's frame_number (a message counter)
    samples: dict[str, tuple[int, np.ndarray]] | None = None   # channel → (first sample number, values)
    raw: dict | None = None


def decode_panda(data: bytes | dict) -> PandaMessage:
    """One PandA JSON message; a data message's channels as (starting sample number, float64 values)."""
    if not isinstance(data, dict):
        try:
            data = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError):
            raise StreamError("PandA message is not JSON") from None
    if not isinstance(data, dict):
        raise StreamError("PandA message is not a JSON object")
    kind = data.get("msg_type")
    if kind in ("start", "stop"):
        return PandaMessage(str(kind), raw=data)
    if kind != "data":
        return PandaMessage("other", raw=data)
    number = _int_or_none(data.get("frame_number"))
    sets = data.get("datasets")
    if not isinstance(sets, dict):
        raise StreamError(f"PandA data message {number}: no 'datasets'")
    out: dict[str, tuple[int, np.ndarray]] = {}
    for ch, d in sets.items():
        if not isinstance(d, dict):
            continue
        start = _int_or_none(d.get("starting_sample_number"))
        if start is None or start < 0:
            raise StreamError(f"PandA data message {number}: channel {ch} has no starting_sample_number, so its "
                              "samples cannot be placed by frame id (refused)")
        values = np.asarray(d.get("data", []), dtype=np.float64).ravel()
        out[str(ch)] = (start, values)
    return PandaMessage("data", number, out, raw=data)


def panda_data(number: int, samples: dict[str, tuple[int, np.ndarray]]) -> bytes:
    """A PandA data message (the simulator's side of :func:`decode_panda`)."""
    return json.dumps({"msg_type": "data", "frame_number": int(number), "datasets": {
        ch: {"dtype": "float64", "size": int(len(v)), "starting_sample_number": int(s),
             "data": [float(x) for x in v]} for ch, (s, v) in samples.items()}}).encode()
