"""One definition of the final data error: the job's last line, the outcome record, the result file,
the derived run, the listing and the figure give the same number (the returned model's ε_D) — not
the last point of the per-iteration curve, which is one update older."""
from __future__ import annotations

import numpy as np


def test_the_final_data_error_is_one_number(tmp_path):
    from hxn_ptycho.callbacks.derived import result_documents
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.job import final_line
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.plots import quality
    from hxn_ptycho.resultfile import read_result, write_result
    from hxn_ptycho.simulate import simulate_scan, write_simulation

    scan, truth = simulate_scan(n=32, n_positions=40, seed=3)
    path = tmp_path / "scan.h5"
    write_simulation(path, scan, truth)
    res = reconstruct(scan, ReconParams(iterations=6))
    write_result(tmp_path / "r.h5", res)
    back = read_result(tmp_path / "r.h5")
    number = float(res.attrs["final_data_error"])
    assert back.final_data_error == number and quality(back) == number
    # the curve's last point is another quantity: a broken "one number" taking it would differ
    assert not np.isclose(float(back.error_data[-1]), number, rtol=1e-6, atol=0)
    docs = result_documents(tmp_path / "r.h5", "raw", {"params": {"iterations": 6}})
    (event,) = [d for name, d in docs if name == "event"]
    assert event["data"]["final_data_error"] == number
    line = final_line({"status": "success", "result_file": "r.h5",
                       "measured": {"final_data_error": number, "final_cost": 0.1, "elapsed_s": 1.0,
                                    "iterations_done": 6, "ranks": 1}})
    assert f"final data error {number:.4g}" in line
