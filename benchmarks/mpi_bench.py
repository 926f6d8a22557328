"""Synchronous-mode scaling: seconds per DM iteration on 1 rank and on K ranks (1 thread each),
through the real job (``python -m hxn_ptycho.job``) and the real ``mpiexec``.

    python benchmarks/mpi_bench.py                       # n = 128, 2000 views, 1 and 2 ranks
    python benchmarks/mpi_bench.py --ranks 1 2 --iterations 20 --repeats 3

Prints, per rank count, the seconds per iteration (the engine's loop time ``elapsed_s`` over the
iterations; the best of ``--repeats`` runs), the parallel efficiency t₁ / (K·t_K), and the fraction
of the loop spent inside ``MPI_Allreduce`` (``communication_s``; it includes waiting for the
slowest rank), and the CPU seconds of the whole job (all ranks; it shows whether a poor efficiency
is lost work or CPUs taken by other processes). The scan is simulated once into a temporary folder. The load average is printed
before and after: on a shared machine the figures mean little when it is high.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hxn_ptycho.resultfile import read_result
from hxn_ptycho.simulate import simulate_scan, write_simulation

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def make_scan(folder: Path, n: int, views: int) -> Path:
    path = folder / f"bench_{n}_{views}.h5"
    scan, truth = simulate_scan(n=n, n_positions=views, seed=5)
    write_simulation(path, scan, truth)
    return path


def run_once(scan: Path, ranks: int, params: dict, out: Path) -> dict[str, float]:
    """One job; its loop seconds, seconds per iteration and communication seconds."""
    argv = [sys.executable, "-m", "hxn_ptycho.job", str(scan), "-o", str(out), "--params", json.dumps(params),
            "--quiet"]
    if ranks > 1:
        argv = [str(MPIEXEC), "-n", str(ranks)] + argv
    t0, cpu0 = time.perf_counter(), _children_cpu()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode:
        raise SystemExit(f"the {ranks}-rank job failed ({done.returncode}):\n{done.stderr}")
    attrs = read_result(out).attrs
    loop = float(attrs["elapsed_s"])
    return {"loop_s": loop, "per_iteration_s": loop / params["iterations"], "wall_s": wall, "cpu_s": cpu,
            "communication_s": float(attrs.get("communication_s", 0.0))}


def _children_cpu() -> float:
    """User + system CPU seconds of all waited-for child processes (ranks included) so far."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def best_of(scan: Path, ranks: list[int], params: dict, folder: Path, repeats: int) -> dict[int, dict[str, float]]:
    """The fastest of ``repeats`` runs per rank count, the counts interleaved so they see alike load."""
    runs: dict[int, list[dict[str, float]]] = {k: [] for k in ranks}
    for _ in range(repeats):
        for k in ranks:
            runs[k].append(run_once(scan, k, params, folder / f"r{k}.h5"))
    return {k: min(r, key=lambda x: x["per_iteration_s"]) for k, r in runs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="frame size (default 128)")
    ap.add_argument("--views", type=int, default=2000, help="number of views (default 2000)")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="FFT threads per rank (default 1)")
    ap.add_argument("--precision", choices=("single", "double"), default="single")
    ap.add_argument("--repeats", type=int, default=2, help="runs per rank count; the fastest counts")
    args = ap.parse_args(argv)
    if any(k > 1 for k in args.ranks) and not MPIEXEC.exists():
        raise SystemExit(f"no mpiexec beside {sys.executable} (pip install mpich)")
    params = {"iterations": args.iterations, "threads": args.threads, "precision": args.precision}
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scan = make_scan(folder, args.n, args.views)
        print(f"scan: n = {args.n}, {args.views} views, {args.precision} precision, {args.iterations} iterations, "
              f"{args.threads} thread(s) per rank, best of {args.repeats}")
        results = best_of(scan, args.ranks, params, folder, args.repeats)
    base = results[min(args.ranks)]
    base_k = min(args.ranks)
    print(f"{'ranks':>5} {'s/iteration':>12} {'speed-up':>9} {'efficiency':>11} {'communication':>14} "
          f"{'job CPU s':>10}")
    for k, r in results.items():
        speedup = base["per_iteration_s"] / r["per_iteration_s"]
        eff = base["per_iteration_s"] * base_k / (k * r["per_iteration_s"])
        comm = r["communication_s"] / r["loop_s"]
        print(f"{k:>5} {r['per_iteration_s']:>12.3f} {speedup:>9.2f} {100 * eff:>10.1f}% {100 * comm:>13.1f}% "
              f"{r['cpu_s']:>10.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(json.dumps({str(k): r for k, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
