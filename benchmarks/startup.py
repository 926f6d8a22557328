"""A rank's start-up on the CPU: a fresh process imports the engine, gets the numba backend and loads
every kernel a reconstruction uses (``Backend.prepare``, what ``Reconstruction`` calls before it
allocates), with a warm on-disk kernel cache and, with ``--cold``, with an empty one (the kernels
compiled first).

    python benchmarks/startup.py [--repeats 5] [--cold]

One JSON line per process: ``imports_s`` (engine and backend), ``kernels_s`` (``prepare``),
``total_s`` (both; the interpreter's own start is not counted), ``cache`` (warm/cold) and the
1-minute load average. The warm runs use the cache beside ``hxn_ptycho/cpu_kernels.py`` (or
``$NUMBA_CACHE_DIR``), filled first by one untimed process; each cold run gets an empty temporary
``NUMBA_CACHE_DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, time
t0 = time.perf_counter()
import hxn_ptycho.engine  # noqa: F401
from hxn_ptycho.backend import get_backend
be = get_backend("numba")
t1 = time.perf_counter()
be.prepare()
t2 = time.perf_counter()
print(json.dumps({"imports_s": round(t1 - t0, 3), "kernels_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)}))
"""


def run_once(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="also start with an empty kernel cache (compiles)")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    run_once(env)                                   # fills the cache: the warm runs load from it
    for _ in range(args.repeats):
        print(json.dumps({**run_once(env), "cache": "warm", "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    if args.cold:
        for _ in range(max(1, args.repeats // 5)):
            with tempfile.TemporaryDirectory() as d:
                rec = run_once({**env, "NUMBA_CACHE_DIR": d})
            print(json.dumps({**rec, "cache": "cold", "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
