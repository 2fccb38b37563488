#!/bin/bash
# A one-machine SLURM cluster on 127.0.0.1 for tests and for trying the sbatch templates:
# munged + slurmctld + slurmd, state in $DIR (default /tmp/tributary-slurm). Needs root and
# Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`). Idempotent: a running
# cluster is left alone. Stop it with `slurm/loopback.sh stop`.
#
#   slurm/loopback.sh            # start; prints the SLURM_CONF to export
#   SLURM_CONF=/tmp/tributary-slurm/slurm.conf sinfo
set -euo pipefail

DIR=${TRIBUTARY_SLURM_DIR:-/tmp/tributary-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

if [[ ${1:-start} == stop ]]; then
  for d in slurmd slurmctld; do
    if [[ -f $DIR/$d.pid ]]; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; fi
  done
  exit 0
fi

for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || {
    echo "slurm/loopback.sh: $tool not found; install Debian's slurm-wlm and munge" >&2; exit 3; }
done
[[ $(id -u) == 0 ]] || { echo "slurm/loopback.sh: needs root (slurmd runs jobs as their users)" >&2; exit 3; }

alive() {  # running, and not a zombie left by a stop
  local pid
  pid=$(cat "$DIR/$1.pid" 2>/dev/null) && [[ -n $pid ]] && [[ $(ps -o stat= -p "$pid" 2>/dev/null) == [^Z]* ]]
}
# (a bare `sinfo` with no controller up retries for a minute before it fails)
if alive slurmctld && alive slurmd; then
  echo "SLURM_CONF=$CONF"; exit 0
fi

mkdir -p "$DIR"/{state,spool,log} /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
[[ -s /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || \
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged

HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$CONF.tmp" <<CONF
ClusterName=tributary
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SchedulerParameters=sched_interval=2
# `sbatch --wait` polls every 2 s only while MinJobAge/2 <= 2; larger values make it sleep
# 2, 8, then 32 s between polls (a 20 s job returned after 42 s with the default 300)
MinJobAge=4
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
mv "$CONF.tmp" "$CONF"

alive slurmctld || /usr/sbin/slurmctld -f "$CONF"
alive slurmd || /usr/sbin/slurmd -f "$CONF"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; then
    echo "SLURM_CONF=$CONF"; exit 0
  fi
  sleep 0.5
done
echo "slurm/loopback.sh: the node did not come up; see $DIR/log/" >&2
sinfo >&2 || true
exit 1
