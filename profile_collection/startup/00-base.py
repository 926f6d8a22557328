# 00-base.py — the RunEngine and the catalog.
#
# The catalog is $HXN_PTYCHO_CATALOG (a Tiled URL, a config file, or the folder of a catalog
# started with `hxn-ptycho serve --dir DIR`; the API key in $TILED_API_KEY or DIR/api_key). Without
# it, a local catalog is started in $HXN_PTYCHO_PROFILE_DIR (default ./hxn_ptycho_profile) for
# this session. Before any scan the session is checked (hxn_ptycho.callbacks.session): folders
# writable, and readable by the catalog's server, the catalog reachable with our key — a problem
# ends the start-up with one line giving the command that fixes it (exit status 2).
import atexit
import logging
import os
from pathlib import Path

from bluesky import RunEngine
from bluesky.preprocessors import SupplementalData
from bluesky.utils import PersistentDict
from hxn_ptycho.callbacks.catalog import EmbeddedServer, broker, tiled_writer
from hxn_ptycho.callbacks.session import check_ranks_available, check_session, session_folders
from hxn_ptycho.errors import HxnPtychoError

logging.getLogger("hxn_ptycho").setLevel(logging.INFO)
PROFILE_DIR = Path(os.environ.get("HXN_PTYCHO_PROFILE_DIR", "hxn_ptycho_profile")).resolve()

CATALOG = os.environ.get("HXN_PTYCHO_CATALOG")
try:
    if not CATALOG:
        _extra = [os.environ[k] for k in ("HXN_PTYCHO_WORK", "HXN_PTYCHO_DETECTOR_DIR") if os.environ.get(k)]
        for _f in _extra:
            Path(_f).expanduser().mkdir(parents=True, exist_ok=True)
        _server = EmbeddedServer(PROFILE_DIR / "catalog", readable=(str(PROFILE_DIR), *_extra)).start()
        atexit.register(_server.stop)
        CATALOG = str(_server.directory)
        os.environ["HXN_PTYCHO_CATALOG"] = CATALOG
        print(f"hxn-ptycho: local catalog at {_server.uri} ({CATALOG})")
    # where this session writes what the server must read: WORK_DIR (scan files, results, the job
    # queue) and the simulated detector's frames (WORK_DIR/detector)
    _work, DETECTOR_DIR = session_folders(CATALOG, PROFILE_DIR)
    WORK_DIR = str(_work)
    check_session(CATALOG, _work, DETECTOR_DIR if os.environ.get("HXN_PTYCHO_SIM", "1") != "0" else None)
    check_ranks_available(int(os.environ.get("HXN_PTYCHO_NPROCS", "1")))
except HxnPtychoError as _exc:
    print(f"hxn-ptycho: {_exc}", flush=True)
    raise SystemExit(_exc.exit_status) from None

# RE.md (and so scan_id) persists across sessions, as NSLS-II profiles keep it: HXN's own profile
# (NSLS2/hxn-profile-collection, startup/00-startup.py) calls nslsii.configure_base(...,
# redis_url=...), which backs RE.md with a RedisJSONDict (NSLS-II/nslsii, nslsii/__init__.py);
# without Redis, bluesky's PersistentDict (bluesky.utils, files in a per-user folder) does the same.
# One session at a time per folder (zict's limit); $HXN_PTYCHO_MD_DIR picks another folder.
MD_DIR = Path(os.environ.get("HXN_PTYCHO_MD_DIR", Path.home() / ".config" / "hxn-ptycho" / "md")).expanduser()
MD_DIR.mkdir(parents=True, exist_ok=True)
RE = RunEngine(PersistentDict(str(MD_DIR)))
print(f"hxn-ptycho: RE.md kept in {MD_DIR} (next scan_id {RE.md.get('scan_id', 0) + 1})")
sd = SupplementalData()
RE.preprocessors.append(sd)
# Raw runs into the catalog's 'raw' container; documents Tiled refuses are kept as JSON lines.
RE.subscribe(tiled_writer(CATALOG, "raw", max_array_size=0, backup_directory=str(PROFILE_DIR / "tiled_backup")))
# databroker v1 over the same client: db[-1], db[scan_id], db(plan_name=...)
db = broker(CATALOG, "raw")
