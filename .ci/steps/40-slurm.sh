# Sourced by .ci/run before the tests: a real single-node Slurm (Debian's slurm-wlm and munge) and
# Open MPI, for the Slurm and facility-MPI tests (tests/test_slurm.py).
# - munged, slurmctld and slurmd on this machine, one node with the CPUs it has (2 in CI), one
#   partition 'debug'; containers have no cgroups: proctrack/linuxproc, task/none (as in Debian's
#   /usr/share/doc/slurmctld/examples/slurm.conf.simple.gz), select/cons_tres, no accounting.
#   MpiDefault=pmi2: the PMI the bundled MPICH wheel understands (it refuses PMIx); Open MPI runs
#   under srun --mpi=pmix.
# - Open MPI (openmpi-bin): the mpi4py wheel carries an Open MPI build too, chosen with
#   MPI4PY_LIBMPI=<Open MPI's libmpi.so.40>, so `mpirun -n 2` runs the job with no rebuild.
# Exports HXN_PTYCHO_TEST_SLURM (the partition) and HXN_PTYCHO_TEST_OPENMPI (Open MPI's libmpi);
# the tests that need them skip where they are unset (e.g. on a laptop).
# Idempotent: a second run finds the packages and the running daemons, and only checks.
_sl_sudo=""
if [ "$(id -u)" -ne 0 ]; then _sl_sudo="sudo"; fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
    $_sl_sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $_sl_sudo apt-get install -y -q slurm-wlm munge openmpi-bin libopenmpi-dev >/dev/null
fi
_sl_host="$(hostname -s)"
_sl_cpus="$(nproc)"
_sl_conf="$(mktemp)"
cat >"$_sl_conf" <<EOF
# written by hxn-ptycho's .ci/steps/40-slurm.sh: one node, for the tests
ClusterName=hxnci
SlurmctldHost=$_sl_host
SlurmUser=slurm
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=pmi2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmdParameters=config_overrides
NodeName=$_sl_host CPUs=$_sl_cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
_sl_changed=0
if ! cmp -s "$_sl_conf" /etc/slurm/slurm.conf; then
    $_sl_sudo install -m 644 "$_sl_conf" /etc/slurm/slurm.conf
    _sl_changed=1
fi
rm -f "$_sl_conf"
$_sl_sudo install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
$_sl_sudo install -d -o munge -g munge -m 755 /run/munge
[ -s /etc/munge/munge.key ] || $_sl_sudo runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    $_sl_sudo runuser -u munge -- /usr/sbin/munged
fi
# a daemon is (re)started only when it is not answering, or when the configuration changed
if [ "$_sl_changed" = 1 ] && [ -s /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
    $_sl_sudo scontrol reconfigure >/dev/null 2>&1 || true
fi
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    $_sl_sudo /usr/sbin/slurmctld
fi
if ! { [ -s /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; }; then
    $_sl_sudo /usr/sbin/slurmd
fi
for _sl_i in $(seq 1 60); do
    _sl_state="$(sinfo -h -n "$_sl_host" -o %t 2>/dev/null | head -n 1)"
    case "$_sl_state" in idle|mix|alloc) break ;; esac
    case "$_sl_state" in down*|drain*) $_sl_sudo scontrol update NodeName="$_sl_host" State=RESUME >/dev/null 2>&1 || true ;; esac
    sleep 1
done
if ! srun -p debug -n 2 -t 1 true 2>/dev/null; then
    echo "Slurm did not run a 2-task test job: see /var/log/slurm/slurmctld.log and slurmd.log" >&2
    sinfo >&2 || true
    return 1 2>/dev/null || exit 1
fi
export HXN_PTYCHO_TEST_SLURM="debug"
echo "Slurm $(sinfo -V | cut -d' ' -f2) on $_sl_host ($_sl_cpus CPUs, node $_sl_state): HXN_PTYCHO_TEST_SLURM=$HXN_PTYCHO_TEST_SLURM"
_sl_ompi="$(mpicc.openmpi --showme:libdirs 2>/dev/null | cut -d' ' -f1)"
if [ -e "$_sl_ompi/libmpi.so" ] && command -v mpirun.openmpi >/dev/null 2>&1; then
    export HXN_PTYCHO_TEST_OPENMPI="$_sl_ompi/libmpi.so"
    echo "Open MPI $(mpirun.openmpi --version 2>/dev/null | head -n 1 | awk '{print $NF}'): HXN_PTYCHO_TEST_OPENMPI=$HXN_PTYCHO_TEST_OPENMPI"
fi
unset _sl_ompi _sl_sudo _sl_host _sl_cpus _sl_conf _sl_changed _sl_i _sl_state
