"""Soak: N scans through ``hxn-ptycho listen`` (real 0MQ proxy, Tiled server, jobs) with random faults.

    .venv/bin/python benchmarks/soak.py [-n 200] [--fault-rate 0.3] [--seed 1]

Faults (one per faulty scan, drawn at random): the listener killed (-9) mid-scan or mid-job, the
catalog killed (-9) while the scan's job publishes (brought back once its documents are saved),
an event lost or duplicated, bad start metadata. Each scan is a renamed copy of one recorded
12-point RunEngine scan (32² frames; 2 iterations). At the end it prints: scans, events/s, faults
injected, derived runs per raw uid (all must be exactly 1, each with the status its fault implies)
and documents republished; the exit status is 1 if any raw run has not exactly one derived run of
the expected status. Not part of the test suite (it takes minutes); it reuses the fault suite's
helpers (tests/test_faults.py).
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

FAULTS = ("listener-kill-mid-scan", "listener-kill-mid-job", "catalog-kill-at-publish", "lost-event",
          "duplicated-event", "bad-metadata")
EXPECTED = {"none": "success", "listener-kill-mid-scan": "fail", "listener-kill-mid-job": "success",
            "catalog-kill-at-publish": "success", "lost-event": "fail", "duplicated-event": "fail",
            "bad-metadata": "fail"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--scans", type=int, default=200)
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the last derived run")
    args = ap.parse_args(argv)

    import logging
    logging.basicConfig(level=logging.WARNING)
    import test_faults as tf
    from bluesky.callbacks.zmq import Publisher
    from conftest_bluesky import wait_for

    from hxn_ptycho.callbacks.catalog import EmbeddedServer, free_port
    from hxn_ptycho.simulate import simulate_scan

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="hxn-ptycho-soak-"))
    server = EmbeddedServer(tmp / "catalog").start()
    import subprocess
    port_in, port_out = free_port(), free_port()
    proxy = subprocess.Popen([str(Path(sys.executable).with_name("bluesky-0MQ-proxy")), str(port_in), str(port_out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    listener = tf.Listener(server, port_out, server.directory / "work", tmp / "listener.log").start()
    pub = Publisher(f"127.0.0.1:{port_in}")
    time.sleep(0.5)
    sim, _ = simulate_scan(n=32, n_positions=tf.SMALL_POINTS, seed=3, photons=1e6)
    base = tf.record(sim, tmp / "det")
    expected: dict[str, str] = {}
    faults = collections.Counter()
    events = 0
    try:
        t0 = time.monotonic()
        for i in range(args.scans):
            fault = rng.choice(FAULTS) if rng.random() < args.fault_rate else "none"
            faults[fault] += 1
            docs = tf.renamed(base, scan_id=1000 + i)
            uid = docs[0][1]["uid"]
            expected[uid] = EXPECTED[fault]
            if fault in ("lost-event", "duplicated-event"):
                docs = tf.inject(docs, fault.split("-")[0])
            elif fault == "bad-metadata":
                docs[0][1].update(rng.choice([{"energy_kev": "abc"}, {"ptycho_center": [5]}, {"scan_id": 10**30}]))
            events += sum(1 for n, _ in docs if n == "event")
            if fault == "listener-kill-mid-scan":
                cut = next(k for k, (n, d) in enumerate(docs) if n == "event" and d["seq_num"] == 5)
                tf.send(pub, docs[:cut])
                wait_for(lambda: any(uid in p.read_text() for p in listener.work.glob("inflight.*.journal")), 60,
                         what="the journaled start")
                listener.kill9()
                listener.start()
                tf.send(pub, docs[cut:])
            elif fault == "listener-kill-mid-job":
                tf.send(pub, docs)
                listener.running_job(uid, timeout=600)
                listener.kill9()
                listener.start()
            elif fault == "catalog-kill-at-publish":
                tf.kill9_catalog(server)
                try:
                    tf.send(pub, docs)
                    wait_for(lambda: list((listener.work / "results").glob(f"*{uid}*.docs.jsonl")), 600,
                             what="the saved documents")
                finally:
                    server.start()
            else:
                tf.send(pub, docs)
        sent_s = time.monotonic() - t0

        def settled():
            found = collections.Counter()
            status: dict[str, list[str]] = collections.defaultdict(list)
            for r in tf.runs_metadata(server.config):
                raw = r["start"].get("raw_uid")
                if raw in expected and r.get("stop"):
                    found[raw] += 1
                    status[raw].append(r["stop"]["exit_status"])
            return (found, status) if len(found) == len(expected) else None
        found, status = wait_for(settled, args.timeout, interval=2.0, what="every derived run")
        time.sleep(3.0)
        found, status = settled() or (found, status)
        total_s = time.monotonic() - t0
    finally:
        listener.stop()
        pub._context.destroy(linger=0)
        proxy.terminate()
        server.stop()
    per_uid = collections.Counter(found.values())
    wrong = {u: (status[u], expected[u]) for u in expected if status.get(u) != [expected[u]]}
    republished = listener.text().count("republished the saved derived run")
    print(f"scans:                 {args.scans} ({sum(faults.values()) - faults['none']} with a fault; seed {args.seed})")
    print(f"events/s:              {events / sent_s:.0f} sent ({events} events in {sent_s:.1f} s, restarts included); "
          f"{events / total_s:.0f} end to end (last derived run after {total_s:.0f} s)")
    print("faults injected:       " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items()) if k != "none"))
    print("derived runs per raw uid: " + ", ".join(f"{k} run(s): {v} raw uids" for k, v in sorted(per_uid.items()))
          + ("  (all exactly 1)" if set(per_uid) == {1} else "  (NOT all exactly 1)"))
    print(f"status as expected:    {len(expected) - len(wrong)}/{len(expected)}"
          + (f"; wrong: {wrong}" if wrong else ""))
    print(f"documents republished: {republished} derived run(s) (saved while the catalog was down, sent later)")
    print(f"work folder:           {tmp}")
    return 0 if set(per_uid) == {1} and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
