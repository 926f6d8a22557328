"""The derived run: publish_result / publish_failure against a real Tiled server, read back."""
from __future__ import annotations

import conftest_bluesky
import numpy as np
import pytest
from conftest_bluesky import make_result

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
from hxn_ptycho.callbacks import derived
from hxn_ptycho.callbacks.catalog import CatalogError, resolve_catalog, runs


def test_publish_result_round_trip(tiled_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    result = tiled_server.directory / "results" / "result_7.h5"
    res = make_result(result, iterations=6)
    recon = {"params": {"iterations": 6, "beta": 0.8}, "ranks": 2, "gpus": 0, "scan_id": 7}
    uid = derived.publish_result(tiled_server.uri, str(result), "raw-uid-7", recon)
    run = runs(tiled_server.uri, "processed")[uid]
    start = run.metadata["start"]
    assert start["plan_name"] == "hxn_ptycho_dm" and start["plan_type"] == "analysis"
    assert start["raw_uid"] == "raw-uid-7" and start["scan_id"] == 7
    assert start["recon"]["params"]["beta"] == 0.8 and start["recon"]["ranks"] == 2
    assert "hxn-ptycho" in start["versions"] and start["host"]
    assert run.metadata["stop"]["exit_status"] == "success"
    p = run["primary"]
    np.testing.assert_allclose(p["object"].read()[0], res.object, rtol=1e-6)
    np.testing.assert_allclose(p["probe"].read()[0], res.probe, rtol=1e-6)
    np.testing.assert_allclose(p["positions_px"].read()[0], res.positions_px)
    np.testing.assert_allclose(p["probe_power_fraction"].read()[0], res.probe_power_fraction)
    assert p["final_data_error"].read()[0] == pytest.approx(res.error_data[-1])
    np.testing.assert_allclose(run["iterations"]["data_error"].read(), res.error_data)
    assert run["iterations"]["probe_error"].read().shape == (6, 2)
    # scan_id lookup in the processed container finds it too
    assert runs(tiled_server.uri, "processed")[7].metadata["start"]["uid"] == uid


def test_refined_positions_are_published_beside_the_nominal_ones(tiled_server, monkeypatch):
    import dataclasses

    from hxn_ptycho.resultfile import write_result

    from hxn_ptycho import callbacks as hxn_callbacks
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    result = tiled_server.directory / "results" / "result_refined.h5"
    res = make_result(result, iterations=4, scan_id=8)
    refined = res.positions_px + np.array([[0.25, 0.5], [0.0, 0.75], [1.25, 0.0]])
    write_result(result, dataclasses.replace(res, positions_refined_px=refined))
    uid = derived.publish_result(tiled_server.uri, str(result), "raw-uid-8", {"params": {"iterations": 4}})
    got = hxn_callbacks.results(tiled_server.uri, uid=uid)
    np.testing.assert_allclose(got.positions_px, res.positions_px)
    np.testing.assert_allclose(got.positions_refined_px, refined)


def test_publish_failure_records_reason(tiled_server, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    uid = derived.publish_failure(tiled_server.uri, "raw-x", {"scan_id": 99}, "scan has no frames")
    run = runs(tiled_server.uri, "processed")[uid]
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert run.metadata["stop"]["reason"] == "scan has no frames"
    assert run.metadata["start"]["raw_uid"] == "raw-x"


def test_config_file_and_api_key_file(tiled_server, monkeypatch):
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    cfg = resolve_catalog(str(tiled_server.directory))          # the folder's catalog.json
    assert cfg.uri == tiled_server.uri and cfg.resolve_api_key() == tiled_server.api_key
    from hxn_ptycho.callbacks.catalog import connect
    root = connect(cfg)
    assert {"raw", "processed"} <= set(root.keys())
    assert "CatalogOfBlueskyRuns" in [s.name for s in root["raw"].specs]


def test_wrong_api_key_is_a_clear_error(tiled_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", "not-the-key")
    result = tmp_path / "r.h5"
    make_result(result)
    with pytest.raises(CatalogError, match="could not write derived run"):
        derived.publish_result(tiled_server.uri, str(result), "u", {})
    assert (tmp_path / "r.h5.docs.jsonl").exists()


def test_unreachable_catalog_saves_documents_and_republishes(tiled_server, tmp_path, monkeypatch):
    from hxn_ptycho.callbacks.catalog import free_port
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    result = tiled_server.directory / "results" / "r2.h5"
    make_result(result, scan_id=8)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CatalogError, match=f"could not write derived run .* {dead}.*saved in"):
        derived.publish_result(dead, str(result), "u8", {})
    backup = str(result) + ".docs.jsonl"
    uid = derived.republish(backup, tiled_server.uri)
    assert runs(tiled_server.uri, "processed")[uid].metadata["stop"]["exit_status"] == "success"


def _record_requests(monkeypatch) -> list[tuple[str, str]]:
    import httpx
    sent: list[tuple[str, str]] = []
    real = httpx.Client.send

    def send(self, request, *args, **kwargs):
        sent.append((request.method, request.url.path))
        return real(self, request, *args, **kwargs)
    monkeypatch.setattr(httpx.Client, "send", send)
    return sent


def test_a_derived_run_is_sent_once_node_by_node(tiled_server, monkeypatch):
    """One request per node (bluesky's TiledWriter: 49 for this run; 16 here), nothing copied into the catalog
    (every array is served from the job's files), and the streams closed only where the server may
    have subscribers (a URL: not known; the embedded server's folder: none)."""
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    folder = str(tiled_server.directory)
    result = tiled_server.directory / "results" / "few.h5"
    res = make_result(result, iterations=4)
    derived.write_documents(folder, derived.result_documents(result, "raw-warm", {}))   # the connection is kept
    data_before = sorted(p.name for p in (tiled_server.directory / "data").rglob("*"))
    sent = _record_requests(monkeypatch)
    docs = derived.result_documents(result, "raw-few", {})
    uid = derived.write_documents(folder, docs)
    routes = sorted(f"{m} {p.split('/api/v1/')[1].split('/')[0]}" for m, p in sent)
    # the run, 2 streams, 2 tables; 8 arrays; 2 table rows; the stop — and no GET of the run's state
    assert routes == sorted(["POST metadata"] * 5 + ["POST register"] * 8 + ["PATCH table"] * 2
                            + ["PATCH metadata"]), sent
    assert sent[0] == ("POST", "/api/v1/metadata/processed") and sent[-1][0] == "PATCH", sent   # run first, stop last
    assert not [p for _, p in sent if "/stream/close/" in p]
    assert sorted(p.name for p in (tiled_server.directory / "data").rglob("*")) == data_before   # no copy
    run = runs(folder, "processed")[uid]
    np.testing.assert_array_equal(run["primary"]["probe_power_fraction"].read(), res.probe_power_fraction[None])
    np.testing.assert_array_equal(run["primary"]["final_probe_error"].read(), res.error_probe[-1:])
    np.testing.assert_array_equal(run["iterations"]["object_error"].read(), res.error_object)
    sources = run["iterations"]["object_error"].data_sources()
    assert [a.data_uri for a in sources[0].assets] == [result.resolve().as_uri()]       # the job's own file
    sent.clear()                # the same run again: its POST answers 409, its state is read, nothing sent
    assert derived.write_documents(folder, docs) == uid
    assert [(m, p.split("/api/v1/")[1]) for m, p in sent] == [("POST", "metadata/processed"),
                                                              ("GET", f"metadata/processed/{uid}")], sent
    assert len(runs(folder, "processed")[uid]["primary"]) == len(run["primary"])
    sent.clear()
    derived.write_documents(tiled_server.uri, derived.result_documents(result, "raw-url", {}))
    closed = [p for _, p in sent if "/stream/close/" in p]
    assert len(closed) == 13 and closed[-1].endswith(closed[0].split("/")[-3]), closed    # every node, the run last


def test_documents_of_an_older_layout_are_still_written(tiled_server, monkeypatch):
    """Saved documents of an older version (arrays inline in the events) go through TiledWriter."""
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    result = tiled_server.directory / "results" / "older.h5"
    make_result(result, iterations=3)
    docs = derived.result_documents(result, "raw-older", {})
    for name, doc in docs:
        if name == "descriptor" and doc["name"] == "primary":
            doc["data_keys"]["inline_modes"] = {"source": "test", "dtype": "array", "shape": [2], "dtype_numpy": "<f8"}
        if name == "event":
            doc["data"]["inline_modes"], doc["timestamps"]["inline_modes"] = [0.75, 0.25], doc["time"]
    from hxn_ptycho.callbacks.runwriter import Unsupported, plan_run
    with pytest.raises(Unsupported, match="arrays"):
        plan_run(docs)
    uid = derived.write_documents(str(tiled_server.directory), docs)
    run = runs(str(tiled_server.directory), "processed")[uid]
    np.testing.assert_array_equal(run["primary"]["inline_modes"].read(), [[0.75, 0.25]])
    assert run.metadata["stop"]["exit_status"] == "success"


def _tree(node, path=""):
    """Every node below ``node``: path → (structure family, spec names, metadata, value)."""
    out = {}
    for key in node:
        child = node[key]
        here = f"{path}/{key}"
        family = str(child.structure_family).split(".")[-1]
        value = None
        if family == "array":
            value = np.asarray(child.read())
        elif family == "table":
            value = child.read().drop(columns=["time"] + [c for c in child.read().columns if c.startswith("ts_")])
        out[here] = (family, sorted(s.name for s in child.specs), dict(child.metadata), value)
        if family == "container":
            out.update(_tree(child, here))
    return out


def test_our_run_writer_gives_the_layout_tiledwriter_gives(tiled_server, monkeypatch):
    """The same derived-run documents through our writer (callbacks/runwriter.py) and through
    bluesky's TiledWriter: the same nodes, structure families, specs, metadata and values (read as
    a user reads them), apart from the one documented difference (a [1]-shaped data key keeps its axis)."""
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    from bluesky_tiled_plugins import TiledWriter
    folder = str(tiled_server.directory)
    result = tiled_server.directory / "results" / "layout.h5"
    make_result(result, iterations=4)
    docs = derived.result_documents(result, "raw-layout", {})
    uid = derived.write_documents(folder, docs)
    ours = runs(folder, "processed")[uid]
    theirs_container = runs(folder, "raw")
    tw = TiledWriter(theirs_container)
    for name, doc in docs:
        tw(name, doc)
    theirs = theirs_container[uid]
    a, b = _tree(ours), _tree(theirs)
    assert sorted(a) == sorted(b)
    assert {k: v[:2] for k, v in a.items()} == {k: v[:2] for k, v in b.items()}
    assert dict(ours.metadata)["start"] == dict(theirs.metadata)["start"]
    assert dict(ours.metadata)["stop"] == dict(theirs.metadata)["stop"]
    assert sum(isinstance(v[3], np.ndarray) for v in a.values()) >= 5      # the run's arrays were compared
    for key in a:
        assert a[key][2] == b[key][2], key                                 # descriptors, array metadata
        va, vb = a[key][3], b[key][3]
        if va is None:
            continue
        if isinstance(va, np.ndarray):
            if va.shape != vb.shape:            # the documented difference: ours keeps a [1] axis
                assert va.shape[-1:] == (1,) and va.shape[:-1] == vb.shape, (key, va.shape, vb.shape)
                va = va[..., 0]
            np.testing.assert_array_equal(va, vb, err_msg=key)
        else:
            assert sorted(va.columns) == sorted(vb.columns), key
            for c in va.columns:
                np.testing.assert_array_equal(va[c].to_numpy(), vb[c].to_numpy(), err_msg=f"{key}:{c}")
