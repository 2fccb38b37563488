#!/bin/bash
# A SLURM cluster on this one machine, for tests and for trying the sbatch templates:
# munged + slurmctld + one slurmd per node, state in $DIR (default /tmp/tributary-slurm).
# Needs root and Debian's slurm-wlm, munge and (for two nodes) iproute2.
#
#   slurm/loopback.sh               # start one node on 127.0.0.1; prints the SLURM_CONF to export
#   slurm/loopback.sh --nodes 2     # start two nodes, each with its own address (below)
#   slurm/loopback.sh kill-node 1   # SIGKILL node 1's slurmd and everything it started
#   slurm/loopback.sh stop          # stop the daemons, remove the namespace and the hosts lines
#   SLURM_CONF=/tmp/tributary-slurm/slurm.conf sinfo
#
# One node: NodeName=<short hostname>, NodeAddr=127.0.0.1, as any single box would have it.
#
# Two nodes: tributary0 is this machine's own network namespace, tributary1 a network
# namespace of its own (tributary-node1), joined by a veth pair: tributary0 is $NET.1 on
# tribslurm0, tributary1 is $NET.2 on tribslurm1 (NET=10.219.7 unless
# TRIBUTARY_SLURM_NET says otherwise). slurmctld runs beside tributary0 and is reached at
# $NET.1 from both. Everything node 1's slurmd starts (batch shells, srun tasks, the ranks
# and their loader workers) stays in its namespace, so traffic between the nodes' ranks
# crosses the virtual link. The filesystem, the munge socket and the process table are
# shared. The node names resolve through lines this script adds to /etc/hosts (marked
# "tributary-slurm", removed by `stop`): the sbatch templates turn `scontrol show
# hostnames` into the head node's address, as on a real cluster, so names must resolve on
# every node. The host name itself still resolves to loopback (launch/netif.py picks the
# interface towards the head node for gloo).
#
# Idempotent: a running cluster with at least the nodes asked for is left alone, except
# that a missing slurmd (as after kill-node) is started again and its node returns to
# service when it registers (ReturnToService=2). Asking for two nodes while one runs
# restarts the daemons with the two-node configuration (jobs in flight are lost).
set -euo pipefail

DIR=${TRIBUTARY_SLURM_DIR:-/tmp/tributary-slurm}
CONF=$DIR/slurm.conf
NET=${TRIBUTARY_SLURM_NET:-10.219.7}
NS=tributary-node1
VETH=(tribslurm0 tribslurm1)
HOSTS_TAG="# tributary-slurm loopback node"
export SLURM_CONF=$CONF

action=start nodes=1
while (($#)); do
  case $1 in
    start) action=start ;;
    stop) action=stop ;;
    kill-node) action=kill-node; victim=${2:?usage: slurm/loopback.sh kill-node 1}; shift ;;
    --nodes) nodes=${2:?usage: slurm/loopback.sh --nodes 1|2}; shift ;;
    --nodes=*) nodes=${1#--nodes=} ;;
    *) echo "usage: slurm/loopback.sh [start] [--nodes 1|2] | kill-node 1 | stop" >&2; exit 2 ;;
  esac
  shift
done
[[ $nodes == [12] ]] || { echo "slurm/loopback.sh: --nodes is 1 or 2, not $nodes" >&2; exit 2; }

pid_alive() {  # running, and not a zombie left by a stop
  [[ -n ${1:-} ]] && [[ $(ps -o stat= -p "$1" 2>/dev/null) == [^Z]* ]]
}
alive() { pid_alive "$(cat "$DIR/$1.pid" 2>/dev/null)"; }
names_for() { if [[ $1 == 1 ]]; then hostname -s; else echo tributary0 tributary1; fi; }
running_nodes() {  # nodes in the running configuration, 0 when its controller is down
  if alive slurmctld && [[ -f $CONF ]]; then grep -c '^NodeName=' "$CONF"; else echo 0; fi
}

stop_pids() {  # SIGTERM, then SIGKILL what is still there after 5 s
  local pids=("$@") pid
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    for pid in "${pids[@]}"; do pid_alive "$pid" && break; pid=; done
    [[ -z ${pid:-} ]] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

remove_network() {
  if ip netns list 2>/dev/null | grep -qw "^$NS"; then
    # a namespace lives while a process is in it: end what node 1 started first
    local pids; pids=$(ip netns pids "$NS" 2>/dev/null || true)
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
    ip netns del "$NS" || true   # takes the veth pair with it
  fi
  ip link del "${VETH[0]}" 2>/dev/null || true
  if grep -q "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    # rewritten in place: /etc/hosts is often a bind mount that cannot be replaced
    local kept; kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
  fi
}

stop_daemons() {
  local pids=() f
  for f in "$DIR"/slurmd*.pid "$DIR"/slurmctld.pid; do
    [[ -f $f ]] && pid_alive "$(cat "$f")" && pids+=("$(cat "$f")")
  done
  stop_pids "${pids[@]}"
  rm -f "$DIR"/slurmd*.pid "$DIR"/slurmctld.pid
}

if [[ $action == stop ]]; then
  stop_daemons
  command -v ip >/dev/null && remove_network
  exit 0
fi

if [[ $action == kill-node ]]; then
  [[ $victim == 1 ]] || { echo "slurm/loopback.sh: only node 1 can be killed (node 0 is this namespace)" >&2; exit 2; }
  ip netns list 2>/dev/null | grep -qw "^$NS" || { echo "slurm/loopback.sh: no node 1 running" >&2; exit 1; }
  # the node vanishes: its slurmd, its step daemons, its batch shells and ranks, at once
  # (again until none is left: one may have been forking while the first round was sent)
  killed=0
  for _ in $(seq 50); do
    pids=$(ip netns pids "$NS")
    [[ -z $pids ]] && break
    kill -9 $pids 2>/dev/null || true
    killed=$((killed + $(echo $pids | wc -w)))
    sleep 0.1
  done
  [[ -z $(ip netns pids "$NS") ]] || { echo "slurm/loopback.sh: node 1 still has processes" >&2; exit 1; }
  echo "killed node 1 (tributary1): $killed process(es)"
  exit 0
fi

for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || {
    echo "slurm/loopback.sh: $tool not found; install Debian's slurm-wlm and munge" >&2; exit 3; }
done
[[ $(id -u) == 0 ]] || { echo "slurm/loopback.sh: needs root (slurmd runs jobs as their users)" >&2; exit 3; }
if ((nodes > 1)); then
  for tool in ip nsenter; do
    command -v "$tool" >/dev/null || {
      echo "slurm/loopback.sh: two nodes need $tool (Debian's iproute2, util-linux)" >&2; exit 3; }
  done
fi

# a running two-node cluster serves one-node jobs too: keep it
running=$(running_nodes)
((running > nodes)) && nodes=$running
read -r -a NAMES <<< "$(names_for "$nodes")"

setup_network() {
  if ! ip netns list | grep -qw "^$NS"; then
    ip link del "${VETH[0]}" 2>/dev/null || true
    ip netns add "$NS"
  fi
  if ! ip -n "$NS" addr show "${VETH[1]}" 2>/dev/null | grep -q "inet $NET.2/"; then
    ip -n "$NS" link del "${VETH[1]}" 2>/dev/null || true
    ip link del "${VETH[0]}" 2>/dev/null || true
    ip link add "${VETH[0]}" type veth peer name "${VETH[1]}"
    ip link set "${VETH[1]}" netns "$NS"
    ip addr add "$NET.1/24" dev "${VETH[0]}"
    ip -n "$NS" addr add "$NET.2/24" dev "${VETH[1]}"
  fi
  ip link set "${VETH[0]}" up
  ip -n "$NS" link set "${VETH[1]}" up
  ip -n "$NS" link set lo up
  local want="$NET.1 tributary0 $HOSTS_TAG"$'\n'"$NET.2 tributary1 $HOSTS_TAG"
  if [[ $(grep "$HOSTS_TAG" /etc/hosts 2>/dev/null) != "$want" ]]; then
    local kept; kept=$(grep -v "$HOSTS_TAG" /etc/hosts 2>/dev/null || true)
    printf '%s\n%s\n' "$kept" "$want" > /etc/hosts
  fi
}

mkdir -p "$DIR"/{state,spool,log} /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
[[ -s /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || \
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
((nodes > 1)) && setup_network

HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
if ((nodes == 1)); then
  CTLD_ADDR=127.0.0.1
  NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
else
  CTLD_ADDR=$NET.1
  NODE_LINES="NodeName=tributary0 NodeAddr=$NET.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=tributary1 NodeAddr=$NET.2 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
fi
PARTITION_NODES=$(IFS=,; echo "${NAMES[*]}")
cat > "$CONF.tmp" <<CONF
ClusterName=tributary
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
# per node (%n): each slurmd has its own spool, pid file and log
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SchedulerParameters=sched_interval=2
# \`sbatch --wait\` polls every 2 s only while MinJobAge/2 <= 2; larger values make it sleep
# 2, 8, then 32 s between polls (a 20 s job returned after 42 s with the default 300)
MinJobAge=4
# a node whose slurmd stops answering is DOWN after this many seconds (default 300), and
# its jobs are requeued (--requeue); it returns to service when its slurmd registers again
SlurmdTimeout=10
ReturnToService=2
$NODE_LINES
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

if alive slurmctld && ! cmp -s "$CONF.tmp" "$CONF"; then
  echo "slurm/loopback.sh: restarting the daemons with a $nodes-node configuration" >&2
  stop_daemons
fi
# an earlier one-node cluster's slurmd (its pid file had no node name)
if alive slurmd; then stop_pids "$(cat "$DIR/slurmd.pid")"; rm -f "$DIR/slurmd.pid"; fi
mv "$CONF.tmp" "$CONF"

alive slurmctld || /usr/sbin/slurmctld -f "$CONF"
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  alive "slurmd-$name" && continue
  mkdir -p "$DIR/spool/$name"
  if ((nodes > 1 && i == 1)); then
    # nsenter, not `ip netns exec`: that one also remounts /sys, without the cgroup
    # filesystem slurmd wants
    nsenter --net=/run/netns/"$NS" /usr/sbin/slurmd -f "$CONF" -N "$name"
  else
    /usr/sbin/slurmd -f "$CONF" -N "$name"
  fi
done
# (a bare `sinfo` with no controller up retries for a minute before it fails)
for _ in $(seq 120); do
  # responding (-r) nodes that can take work
  up=$(sinfo -h -N -r -o '%N %T' 2>/dev/null | grep -c -E ' (idle|mixed|allocated|completing)$' || true)
  if ((up >= ${#NAMES[@]})); then
    echo "SLURM_CONF=$CONF"; exit 0
  fi
  sleep 0.5
done
echo "slurm/loopback.sh: the node(s) did not come up; see $DIR/log/" >&2
sinfo -N >&2 || true
exit 1
