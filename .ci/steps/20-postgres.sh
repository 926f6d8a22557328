# Sourced by .ci/run before the tests: PostgreSQL from Debian's packages for the catalog tests.
# Installs and starts a cluster, creates the role 'hxn' and the databases 'hxn_catalog' (Tiled's
# catalog) and 'hxn_catalog_tables' (its tabular data), and exports HXN_PTYCHO_TEST_POSTGRES.
# Tests that need it skip when that variable is unset (e.g. on a laptop).
_pg_sudo=""
if [ "$(id -u)" -ne 0 ]; then _pg_sudo="sudo"; fi
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    $_pg_sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $_pg_sudo apt-get install -y -q postgresql >/dev/null
fi
_pg_ver="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$_pg_ver main"; then
    $_pg_sudo pg_createcluster "$_pg_ver" main >/dev/null
fi
$_pg_sudo pg_ctlcluster "$_pg_ver" main start >/dev/null 2>&1 || true    # already running is fine
_pg_port="$(pg_lsclusters -h | awk -v v="$_pg_ver" '$1 == v && $2 == "main" {print $3}')"
for _i in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$_pg_port" && break
    sleep 1
done
_pg_psql() { $_pg_sudo env PGOPTIONS=--client-min-messages=warning runuser -u postgres -- psql -q -p "$_pg_port" -v ON_ERROR_STOP=1 "$@"; }
if [ "$(id -u)" -ne 0 ]; then _pg_psql() { sudo -u postgres env PGOPTIONS=--client-min-messages=warning psql -q -p "$_pg_port" -v ON_ERROR_STOP=1 "$@"; }; fi
_pg_psql -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hxn') THEN CREATE ROLE hxn LOGIN PASSWORD 'hxn'; END IF; END \$\$;"
for _db in hxn_catalog hxn_catalog_tables; do
    _pg_psql -c "DROP DATABASE IF EXISTS $_db;"
    _pg_psql -c "CREATE DATABASE $_db OWNER hxn;"
done
export HXN_PTYCHO_TEST_POSTGRES="postgresql://hxn:hxn@127.0.0.1:${_pg_port}/hxn_catalog"
echo "PostgreSQL $_pg_ver on port $_pg_port: HXN_PTYCHO_TEST_POSTGRES=$HXN_PTYCHO_TEST_POSTGRES"
unset _pg_sudo _pg_ver _pg_port _i _db
unset -f _pg_psql
