#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (loopback, no accounting database) for the `slurm` tests.
#
#   tests/cluster/slurm_up.sh [DIR]     # DIR defaults to $LDMFLOW_SLURM_DIR or ${TMPDIR:-/tmp}/ldmflow-slurm
#   tests/cluster/slurm_down.sh [DIR]
#
# Needs root and the Debian packages slurm-wlm and munge (`apt-get install -y slurm-wlm munge`).
# Everything (munge key and socket, slurm.conf, state, spool, logs, pids) lives under DIR, except one
# symlink: /etc/slurm/slurm.conf -> DIR/etc/slurm.conf. The SLURM executor plugin's job step runs its
# nested `srun` with SLURM_* variables (SLURM_CONF included) removed, so the config has to be found at
# the default path as well.
#
# The node declares fake GPUs (gres.conf `File=/dev/null`), so a job that asks for `--gpus=1` is
# scheduled here; SLURM then sets CUDA_VISIBLE_DEVICES in the job as it would on a GPU node.
# Running it again while the cluster is up does nothing. Prints the folder and the config on success.
set -euo pipefail

DIR=${1:-${LDMFLOW_SLURM_DIR:-${TMPDIR:-/tmp}/ldmflow-slurm}}
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
CONF=$DIR/etc/slurm.conf
DEFAULT_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
CPUS=${LDMFLOW_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # nproc obeys OMP_NUM_THREADS
GPUS=${LDMFLOW_SLURM_GPUS:-2}
PARTITION=${LDMFLOW_SLURM_PARTITION:-debug}
CTLD_PORT=${LDMFLOW_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LDMFLOW_SLURM_SLURMD_PORT:-6818}
# what the node offers to jobs: the machine's memory less 1 GiB for everything else
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))

for tool in munged mungekey slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || { echo "slurm_up: $tool not found; apt-get install -y slurm-wlm munge" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm_up: must run as root (slurmd starts jobs as their users)" >&2; exit 1; }

trap 'echo "slurm_up: failed (line $LINENO); logs in $DIR/log" >&2' ERR

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && SLURM_CONF=$CONF sinfo -h >/dev/null 2>&1; then
  echo "slurm_up: already up in $DIR (SLURM_CONF=$CONF)"
  exit 0
fi

mkdir -p "$DIR"/{etc,munge,run,log,state,spool}
chmod 0755 "$DIR" "$DIR/munge"   # munge clients must reach the socket

# ---- munge: its own key, socket, pid, log and seed files ----------------------------------------
if ! alive "$DIR/munge/munged.pid"; then
  [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
  chmod 0600 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
fi

# ---- slurm.conf and gres.conf --------------------------------------------------------------------
# Harmless character devices stand in for GPU device files: without File= slurmd 22.05 reports 0 GPUs
# (node INVAL), and each GPU needs a file of its own.
FAKE_DEVICES=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom)
(( GPUS <= ${#FAKE_DEVICES[@]} )) || { echo "slurm_up: at most ${#FAKE_DEVICES[@]} fake GPUs" >&2; exit 1; }
: > "$DIR/etc/gres.conf"
for ((i = 0; i < GPUS; i++)); do
  echo "NodeName=$NODE Name=gpu File=${FAKE_DEVICES[$i]}" >> "$DIR/etc/gres.conf"
done

cat > "$CONF" <<CONF
# Written by tests/cluster/slurm_up.sh: a loopback test cluster, not a template for a real site.
ClusterName=ldmflow-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to squeue and scontrol for an hour (the test profile checks status with squeue,
# and the test reads every job of a run back at its end: ten minutes on a busy shared machine)
MinJobAge=3600
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

# the job step's nested srun reads the default path (see the header)
mkdir -p "$(dirname "$DEFAULT_CONF")"
if [ -e "$DEFAULT_CONF" ] && [ ! -L "$DEFAULT_CONF" ]; then
  echo "slurm_up: $DEFAULT_CONF exists and is not a symlink; not replacing a real site's config" >&2
  exit 1
fi
ln -sfn "$CONF" "$DEFAULT_CONF"
ln -sfn "$DIR/etc/gres.conf" "$(dirname "$DEFAULT_CONF")/gres.conf"

# ---- daemons -------------------------------------------------------------------------------------
export SLURM_CONF=$CONF
alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" -i
alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"

for _ in $(seq 1 60); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$state" in
    idle*|mixed*|allocated*) break ;;
  esac
  sleep 0.5
done
if ! [[ "${state:-}" =~ ^(idle|mixed|allocated) ]]; then
  echo "slurm_up: node $NODE is '${state:-unreachable}' after 30 s; see $DIR/log/" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
fi
printf 'export SLURM_CONF=%s\n' "$CONF" > "$DIR/env.sh"
echo "slurm_up: cluster up in $DIR: node $NODE ($CPUS CPUs, ${MEM_MB} MB, $GPUS fake GPUs), partition $PARTITION"
echo "slurm_up: SLURM_CONF=$CONF (also linked from $DEFAULT_CONF); logs in $DIR/log; stop with tests/cluster/slurm_down.sh"
