"""The embedded catalog server's share of a publish: the same derived runs published, round by
round, to two embedded servers in one process — one as ``EmbeddedServer`` starts it, one with the
speed guards of ``callbacks/tiled_guard.py`` off (guard 4: SQLite's write-ahead log; guard 5:
FastAPI's dependants built once) — printing each one's publish time and the server's CPU seconds.

    python benchmarks/quick_answers.py  # the publish as a user waits for it (this tree's server)
    python benchmarks/publish_server.py [--rounds 8] [--json]

``quick_answers.py`` measures both trees against one server (this tree's), so it shows what the
publisher changed; this shows what the server changed. Prints the machine's load average: on a
shared machine the times scatter with it, the server's CPU seconds much less so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# tiled_guard with guards 4 and 5 off: the server as it was before them
PLAIN = ("import sys\nfrom hxn_ptycho.callbacks import tiled_guard\n"
         "tiled_guard._catalog_wal = lambda: None\ntiled_guard._file_wal = lambda path: None\n"
         "tiled_guard._dependants_once = lambda: None\nsys.exit(tiled_guard.main())\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="also print the medians as one JSON line")
    args = ap.parse_args()
    from quick_answers import make_result

    from hxn_ptycho.callbacks import catalog, derived

    class PlainServer(catalog.EmbeddedServer):
        def command(self) -> list[str]:
            cmd = super().command()
            i = cmd.index("-m")
            return [*cmd[:i], "-c", PLAIN, *cmd[i + 2:]]

    tmp = Path(tempfile.mkdtemp(prefix="hxn-pubserver-"))
    servers = {"guards on (as started)": catalog.EmbeddedServer(tmp / "on"),
               "speed guards off": PlainServer(tmp / "off")}
    try:
        for s in servers.values():
            s.start()
        results = {name: make_result(s.directory)[0] for name, s in servers.items()}

        def cpu(pid: int) -> float:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def publish(name: str, i: int) -> tuple[float, float]:
            s = servers[name]
            os.environ["TILED_API_KEY"] = s.api_key
            copy = results[name].with_name(f"publish_{i}.h5")
            shutil.copy(results[name], copy)
            c, t = cpu(s.proc.pid), time.perf_counter()
            docs = derived.result_documents(copy, f"raw-{i}", {"params": {"iterations": 20},
                                                                "source": {"scan_id": 100 + i}})
            derived.write_documents(str(s.directory), docs)
            return time.perf_counter() - t, cpu(s.proc.pid) - c

        print(f"load average before: {os.getloadavg()[0]:.1f}")
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for i in range(args.rounds + 2):                   # two warm-up rounds (connections, imports)
            for name in (list(servers) if i % 2 else list(servers)[::-1]):
                got = publish(name, i)
                if i >= 2:
                    figures[name].append(got)
        print(f"load average after: {os.getloadavg()[0]:.1f}  (2 shared cores: the times scatter with the load)")
        medians = {name: {"publish_s": statistics.median(a for a, _ in f), "server_cpu_s": statistics.median(b for _, b in f)}
                   for name, f in figures.items()}
        for name, f in figures.items():
            print(f"{name:<24} publish {medians[name]['publish_s']:.3f} s [{min(a for a, _ in f):.2f}–"
                  f"{max(a for a, _ in f):.2f}]   server CPU {medians[name]['server_cpu_s']:.3f} s "
                  f"[{min(b for _, b in f):.2f}–{max(b for _, b in f):.2f}]   (median [min–max] of {len(f)})")
        if args.json:
            print(json.dumps(medians))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
