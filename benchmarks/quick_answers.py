"""How long a user waits for quick answers: ``hxn-ptycho results --scan-id N`` (a fresh process, as
typed), publishing a 100-point result as a derived run, and reading it back — for this tree and,
interleaved round by round, for another tree (e.g. ``--other /work/main``) on the same catalog.

    python benchmarks/quick_answers.py [--other /work/main] [--rounds 3]

One embedded Tiled catalog (``EmbeddedServer``) in a temporary folder; one result of a simulated
100-view scan (64², 20 iterations) in its folder. Each measurement runs in a fresh process that
imports the package from the tree being measured (``hxn_ptycho`` from ``TREE/hxn_ptycho`` and
``hxn_ptycho.callbacks`` from ``TREE/callbacks``, as the editable install maps them). Prints the
machine's load average: on a shared machine the figures scatter with it — ``publish_cpu_s`` (the
CPU seconds of the publishing process and of the server during the second publish) much less so.
The second publish is also printed part by part: building the documents, sending them, the CPU of
the client and of the server, the requests' times. Both trees publish to this tree's server
(``benchmarks/publish_server.py`` compares servers).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Imports the package from TREE (argv[1]) whatever is installed, then runs argv[2:] as a command.
BOOT = r"""
import importlib.util, sys
tree = sys.argv[1]
def load(name, folder):
    spec = importlib.util.spec_from_file_location(name, f"{folder}/__init__.py", submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod); return mod
pkg = load("hxn_ptycho", f"{tree}/hxn_ptycho")
pkg.callbacks = load("hxn_ptycho.callbacks", f"{tree}/callbacks")
del sys.argv[1]
"""

CLI = BOOT + r"""
from hxn_ptycho.cli import main
sys.exit(main(sys.argv[1:]))
"""

PUBLISH = BOOT + r"""
import json, os, time, httpx
t0 = time.perf_counter()
from hxn_ptycho.callbacks.derived import publish_outcome, result_documents, write_documents
from hxn_ptycho.callbacks.query import results
t1 = time.perf_counter()
catalog, result, raw_uid, scan_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
recon = {"params": {"iterations": 20}, "source": {"scan_id": scan_id}, "measured": {"iterations_done": 20}}
sent = []                               # (method, seconds) of each request
_send = httpx.Client.send
def send(self, request, *a, **k):
    t = time.perf_counter()
    try:
        return _send(self, request, *a, **k)
    finally:
        sent.append((request.method, time.perf_counter() - t))
httpx.Client.send = send
def server_cpu():                       # the server's CPU seconds (user + system), from /proc
    try:
        fields = open(f"/proc/{os.environ['HXN_QUICK_SERVER_PID']}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (KeyError, OSError):
        return float("nan")
times, requests, cpu, parts = [], [], [], {}
for _ in range(2):                      # the first publish of a process pays the lazy imports
    sent.clear()
    t, c, s = time.perf_counter(), time.process_time(), server_cpu()
    docs = result_documents(result, raw_uid, recon)
    t_docs, c_docs = time.perf_counter(), time.process_time()
    write_documents(catalog, docs)
    times.append(time.perf_counter() - t)
    requests.append(len(sent))
    s_cpu = server_cpu() - s
    cpu.append(time.process_time() - c + s_cpu)
    # the breakdown: building the documents (sidecar included), sending them (the requests), the CPU
    # seconds of each side, and the sum of the requests' times as the client saw them (side by side
    # requests overlap, so it may exceed send_s)
    parts = {"docs_s": t_docs - t, "send_s": time.perf_counter() - t_docs, "docs_cpu_s": c_docs - c,
             "send_client_cpu_s": time.process_time() - c_docs, "server_cpu_s": s_cpu,
             "requests_sum_s": sum(d for _, d in sent),
             "request_max_s": max((d for _, d in sent), default=float("nan"))}
# the whole publish as the queue runner does it: the job's outcome checked (its digest), the
# documents saved beside the result, sent exactly once, the saved file removed
from hxn_ptycho import h5util
from hxn_ptycho.callbacks.derived import run_uid
from hxn_ptycho.spec import JobSpec, Source
if hasattr(h5util, "file_sha256_fingerprint"):     # what this tree's job writes into its outcome
    digest, stat = h5util.file_sha256_fingerprint(result)
    outcome = {"result_sha256": digest, "result_stat": stat}
elif hasattr(h5util, "file_sha256"):
    outcome = {"result_sha256": h5util.file_sha256(result)}
else:                                              # a tree before outcomes carried a digest
    outcome = {}
spec = JobSpec(source=Source(scan_file="scan.h5", result_file=result, raw_uid=raw_uid + "-outcome",
                             scan_id=scan_id, catalog=catalog))
outcome.update(status="success", reason=None, result_file=result, measured={"iterations_done": 20})
t = time.perf_counter()
publish_outcome(spec, outcome, uid=run_uid(spec))
outcome_s = time.perf_counter() - t
t = time.perf_counter()
res = results(catalog, raw_uid=raw_uid)
read = time.perf_counter() - t
assert res.ok and res.object is not None
print(json.dumps({"import_s": t1 - t0, "publish_first_s": times[0], "publish_s": times[1],
                  "publish_outcome_s": outcome_s, "requests": requests[1], "publish_cpu_s": cpu[1],
                  **parts, "read_back_s": read,
                  "file": __import__("hxn_ptycho.callbacks.derived").callbacks.derived.__file__}))
"""


def make_result(folder: Path) -> tuple[Path, int]:
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.resultfile import write_result
    from hxn_ptycho.simulate import simulate_scan
    scan, _truth = simulate_scan(n=64, n_positions=100, seed=2)
    res = reconstruct(scan, ReconParams(iterations=20))
    path = folder / "results" / "quick_100.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_result(path, res)
    return path, scan.n_views


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", help="another tree to measure interleaved with this one (e.g. /work/main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also print the medians as one JSON line")
    args = ap.parse_args()
    from hxn_ptycho.callbacks.catalog import EmbeddedServer

    trees = {"this tree": str(HERE)}
    if args.other:
        trees["other: " + args.other] = str(Path(args.other).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="hxn-quick-"))
    server = EmbeddedServer(tmp / "catalog").start()
    env = {**os.environ, "TILED_API_KEY": server.api_key, "HXN_QUICK_SERVER_PID": str(server.proc.pid)}
    try:
        result, views = make_result(server.directory)
        print(f"catalog {server.uri}; a {views}-view result ({result.stat().st_size / 1e6:.1f} MB); "
              f"load average before: {os.getloadavg()[0]:.1f}")
        figures: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
        for r in range(args.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                copy = result.with_name(f"quick_{r}_{abs(hash(name)) % 1000}.h5")
                shutil.copy(result, copy)
                raw_uid, scan_id = f"raw-quick-{r}-{abs(hash(name)) % 1000}", 7000 + r * 10 + len(name) % 10
                done = subprocess.run([sys.executable, "-c", PUBLISH, tree, str(server.directory), str(copy), raw_uid,
                                       str(scan_id)], capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    print(f"{name}: publish failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                m = json.loads(done.stdout.strip().splitlines()[-1])
                t = time.perf_counter()
                cli = subprocess.run([sys.executable, "-c", CLI, tree, "results", "--catalog", str(server.directory),
                                      "--scan-id", str(scan_id)], capture_output=True, text=True, env=env, check=False)
                m["cli_results_s"] = time.perf_counter() - t
                if cli.returncode:
                    print(f"{name}: results failed: {cli.stderr.strip()[-300:]}")
                for k, v in m.items():
                    if k != "file":
                        figures[name].setdefault(k, []).append(float(v))
        print(f"load average after: {os.getloadavg()[0]:.1f}  (2 shared cores: the figures scatter with the load)")
        if args.json:
            print(json.dumps({name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}))
        keys = ("cli_results_s", "import_s", "publish_first_s", "publish_s", "publish_outcome_s", "requests",
                "publish_cpu_s", "read_back_s")
        print(f"{'tree':<28}" + "".join(f"{k:>17}" for k in keys) + "   (median [min–max] of the rounds, s)")
        for name, f in figures.items():
            cells = "".join(f"{statistics.median(f[k]):>8.2f} [{min(f[k]):.1f}–{max(f[k]):.1f}]".rjust(17)
                            if f.get(k) else f"{'-':>17}" for k in keys)
            print(f"{name:<28}{cells}")
        keys = ("docs_s", "docs_cpu_s", "send_s", "send_client_cpu_s", "server_cpu_s", "requests_sum_s",
                "request_max_s")
        print(f"\nthe second publish, part by part:\n{'tree':<28}" + "".join(f"{k:>19}" for k in keys))
        for name, f in figures.items():
            cells = "".join(f"{statistics.median(f[k]):>10.3f} [{min(f[k]):.2f}–{max(f[k]):.2f}]".rjust(19)
                            if f.get(k) else f"{'-':>19}" for k in keys)
            print(f"{name:<28}{cells}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
