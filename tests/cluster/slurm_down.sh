#!/usr/bin/env bash
# Stop the test cluster that slurm_up.sh started (same DIR argument); safe to run when it is not up.
# Removes DIR as well unless KEEP=1 (keep the logs to read them).
set -uo pipefail

DIR=${1:-${LDMFLOW_SLURM_DIR:-${TMPDIR:-/tmp}/ldmflow-slurm}}
[ -d "$DIR" ] || { echo "slurm_down: nothing in $DIR"; exit 0; }
DIR=$(cd "$DIR" && pwd)

stop() {  # stop the daemon whose pid file is $1, politely then firmly
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

if [ -f "$DIR/etc/slurm.conf" ]; then
  SLURM_CONF=$DIR/etc/slurm.conf scancel --full --quiet --partition "$(awk -F'[= ]' '/^PartitionName=/ {print $2}' "$DIR/etc/slurm.conf")" 2>/dev/null || true
fi
stop "$DIR/run/slurmd.pid"
stop "$DIR/run/slurmctld.pid"
stop "$DIR/munge/munged.pid"

for link in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
  if [ -L "$link" ] && [[ "$(readlink "$link")" == "$DIR"/* ]]; then
    rm -f "$link"
  fi
done
if [ "${KEEP:-0}" = 1 ]; then
  echo "slurm_down: stopped; kept $DIR"
else
  rm -rf "$DIR"
  echo "slurm_down: stopped; removed $DIR"
fi
