"""Catalog layout and habits on real HXN scan documents: nested containers (``hxn/raw``,
``hxn/processed``) as NSLS-II's Tiled has them, never created in a catalog we did not start; the
raw runs of the three scan types readable back through the server and as stored runs (frames
read from the files the catalog names, not downloaded), and databroker's v1 habits."""
from __future__ import annotations

import warnings

import conftest_bluesky
import numpy as np
import pytest
from hxn_ptycho.callbacks.catalog import (
    CatalogConfig,
    CatalogError,
    broker,
    runs,
    tiled_writer,
)
from hxn_ptycho.callbacks.export import ExportConfig, build_scan
from hxn_ptycho.callbacks.frames import stored_run
from hxn_sim import collect, make_re

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
KINDS = ["fly2dpd", "step", "FlyPlan2D"]


@pytest.fixture(scope="module")
def written(tiled_server):
    """The three scan types written by the TiledWriter into nested hxn/raw (and collected live)."""
    from hxn_ptycho.callbacks.sim_beamline import make_hxn, plan_for, simulated_scan
    # the API key comes from the server's key file (no TILED_API_KEY in the environment)
    cfg = CatalogConfig(uri=tiled_server.uri, api_key_file=str(tiled_server.directory / "api_key"),
                        raw="hxn/raw", processed="hxn/processed")
    hxn = make_hxn(tiled_server.directory / "det_layout")
    RE = make_re(hxn)
    RE.subscribe(tiled_writer(cfg, "raw", max_array_size=0))
    live = collect(RE)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, kind in enumerate(KINDS):
            sample, _truth = simulated_scan(kind, n_positions=9, seed=2)
            (uid,) = RE(plan_for(kind, hxn, sample), scan_id=900 + i)
            out[kind] = (uid, live[-1], sample)
    return cfg, out


def test_nested_containers_in_our_catalog(tiled_server, written):
    cfg, out = written
    from tiled.client import from_uri
    client = from_uri(tiled_server.uri, api_key=tiled_server.api_key)
    assert set(client["hxn"].keys()) >= {"raw", "processed"}
    assert [s.name for s in client["hxn"]["raw"].specs] == ["CatalogOfBlueskyRuns"]
    assert len(runs(cfg, "raw")) == 3 and out["step"][0] in runs(cfg, "raw")


def test_never_create_containers_in_a_catalog_we_did_not_start(tiled_server):
    from tiled.client import from_uri
    client = from_uri(tiled_server.uri, api_key=tiled_server.api_key)
    before = set(client.keys())
    foreign = CatalogConfig(uri=tiled_server.uri, api_key=tiled_server.api_key, raw="beamline/raw",
                            processed="beamline/processed")          # a plain URL: not ours
    assert not foreign.owns()
    with pytest.raises(CatalogError, match="the catalog has no container 'beamline'"):
        runs(foreign, "raw")
    assert set(client.keys()) == before


@pytest.mark.parametrize("kind", KINDS)
def test_stored_run_reads_the_same_frames_as_the_live_run(written, kind):
    cfg, out = written
    uid, live, _sample = out[kind]
    stored = stored_run(cfg, uid)
    a, b = build_scan(live, ExportConfig(crop=64)), build_scan(stored, ExportConfig(crop=64))
    np.testing.assert_array_equal(a.diffamp, b.diffamp)
    np.testing.assert_allclose(a.points, b.points)
    assert a.attrs["geometry_source"] == b.attrs["geometry_source"]
    files = {s["uri"] for s in stored.stream_resources.values()}
    assert all(u.startswith("file://") for u in files)            # read from the files the catalog names


def test_arrays_of_these_specs_are_served(written):
    cfg, out = written
    fly = runs(cfg, "raw")[out["fly2dpd"][0]]["primary"]
    assert fly["eiger2_image"].read().shape == (1, 9, 96, 96)
    assert fly["inenc2_val"].read().shape == (1, 90)
    assert fly["sclr1_ch4"].read().shape == (1, 9)
    step = runs(cfg, "raw")[out["step"][0]]["primary"]
    assert step["eiger1_image"].read().shape == (9, 1, 96, 96)


def test_databroker_habits(written):
    cfg, out = written
    db = broker(cfg)
    h = db[-1]
    assert h.start["uid"] == out["FlyPlan2D"][0]
    assert db[901].start["uid"] == out["step"][0]
    table = db[901].table()
    assert len(table) == 9 and "zpssx" in table and "sclr1_ch4" in table
    base = db.get_table(db[901], stream_name="baseline")
    assert "dcm_th" in base and len(base) == 2
    fly = db[900]
    assert [np.asarray(x).shape for x in fly.data("eiger2_image")] == [(9, 96, 96)]
    assert [np.asarray(x).shape for x in fly.data("inenc2_val")] == [(90,)]
    assert fly.table(fill=True).shape[0] == 1
    with pytest.raises(CatalogError, match=r"h\.data\('eiger2_image'\)"):
        db.get_table(db[901], fields=["eiger1_image", "zpssx"], fill=False)
    with pytest.raises(CatalogError, match="stored_run"):
        db.reg.retrieve("some-datum-id")
