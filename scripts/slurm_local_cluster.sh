#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for developing and testing the SLURM launchers.
#
#   bash scripts/slurm_local_cluster.sh up [DIR]     # start; then: . DIR/env.sh; sinfo; sbatch ...
#   bash scripts/slurm_local_cluster.sh down [DIR]   # stop it and clean up
#
# DIR (default /tmp/moc-slurm-cluster) holds the config, keys, state, logs and the PIDs of what `up` started.
# `up` installs SLURM and munge with apt-get when they are missing, starts munged, one slurmctld and two
# slurmd (nodes node1 and node2, 2 CPUs each; each slurmd in its own UTS namespace with its own hostname,
# at 127.0.0.11 / 127.0.0.12, names added to /etc/hosts), waits until both nodes are idle and writes
# DIR/env.sh (exports SLURM_CONF). `down` kills only what `up` started, by PID (the daemons and, found by
# the nodes' UTS namespaces, their slurmstepd and job processes), and removes its /etc/hosts lines. Both
# verbs are idempotent. Needs root (daemons, /etc/hosts, namespaces). Tested with Debian 12's SLURM 22.05.
set -euo pipefail

PROG=slurm_local_cluster.sh
VERB=${1:-}
DIR=${2:-${SLURM_LOCAL_CLUSTER_DIR:-/tmp/moc-slurm-cluster}}
NODES=(node1 node2)
declare -A NODE_ADDR=([node1]=127.0.0.11 [node2]=127.0.0.12)
declare -A NODE_PORT=([node1]=17001 [node2]=17002)
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-16817}
HOSTS_MARKER="# moc-slurm-local-cluster"
START_TIMEOUT_S=30

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "[$PROG] $*"; }

# ---- processes -------------------------------------------------------------------------------------------

# alive PID NAME: the process exists and is NAME (a recorded PID may have been reused by now).
alive() { [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]; }

# The PIDs file: one "name pid" line per daemon started by `up`, plus "uts node ns" lines.
pids_file() { echo "$DIR/pids"; }
recorded() { [ -f "$(pids_file)" ] && awk -v n="$1" '$1 == n { print $2 }' "$(pids_file)" || true; }

# ns_members NS: PIDs of processes in UTS namespace NS (the recorded node's), ours excluded.
ns_members() {
  local ns=$1 p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$$" ] && continue
    [ "$(readlink "/proc/$p/ns/uts" 2>/dev/null)" = "$ns" ] && echo "$p"
  done
  return 0
}

# stop_pid PID NAME: SIGTERM, wait up to 5 s, then SIGKILL.
stop_pid() {
  local pid=$1 name=$2 i
  alive "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do alive "$pid" "$name" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 20); do alive "$pid" "$name" || return 0; sleep 0.1; done
}

# kill_sessions: SIGKILL what is left in the daemons' sessions (slurmctld's slurmscriptd, after a SIGKILL).
kill_sessions() {
  local sids p stat fields
  sids=" $(awk '$1 != "uts" { printf "%s ", $2 }' "$(pids_file)")"
  for p in /proc/[0-9]*; do
    stat=$(cat "$p/stat" 2>/dev/null) || continue
    read -r -a fields <<< "${stat##*) }"  # after "(comm) ", which may hold spaces: state ppid pgrp session
    case "$sids" in *" ${fields[3]:-none} "*) kill -KILL "${p#/proc/}" 2>/dev/null || true ;; esac
  done
  return 0
}

# kill_node_processes NODE: SIGKILL everything in the node's UTS namespace (slurmstepd, job scripts,
# srun tasks, torchrun and its ranks) except the slurmd itself.
kill_node_processes() {
  local ns pid slurmd_pid left i
  ns=$(awk -v n="$1" '$1 == "uts" && $2 == n { print $3 }' "$(pids_file)")
  [ -n "$ns" ] || return 0
  slurmd_pid=$(recorded "slurmd-$1")
  for i in 1 2 3; do  # a dying process may still fork: repeat until the namespace is empty
    left=$(ns_members "$ns" | grep -vx "${slurmd_pid:-none}" || true)
    [ -n "$left" ] || return 0
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 0.3
  done
}

# ---- /etc/hosts ------------------------------------------------------------------------------------------

# Only this cluster's lines (marker and DIR) are touched, rewritten in place (/etc/hosts may be a bind mount).
hosts_remove() {
  local tag="$HOSTS_MARKER $DIR" kept
  grep -qF -- "$tag" /etc/hosts 2>/dev/null || return 0
  kept=$(awk -v tag="$tag" 'substr($0, length($0) - length(tag) + 1) != tag' /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts
}

hosts_check_free() {
  local node
  for node in "${NODES[@]}"; do
    if getent hosts "$node" >/dev/null; then
      die "/etc/hosts (or DNS) already names $node ($(getent hosts "$node" | head -n1)): another cluster is up? stop it first"
    fi
  done
}

hosts_add() {
  local node
  for node in "${NODES[@]}"; do
    echo "${NODE_ADDR[$node]} $node $HOSTS_MARKER $DIR" >> /etc/hosts
  done
}

# ---- set-up ----------------------------------------------------------------------------------------------

install_if_missing() {
  local missing=() cmd
  for cmd in slurmctld slurmd sbatch sinfo scontrol munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed (${missing[*]} missing) and there is no apt-get"
  say "installing slurmctld slurmd slurm-client munge with apt-get (missing: ${missing[*]})"
  # No service is started by the packages' scripts: this script starts the daemons itself.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1; fi
  local log="$DIR/apt.log" status=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge >"$log" 2>&1 ||
      { apt-get update -q >>"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
          --no-install-recommends slurmctld slurmd slurm-client munge >>"$log" 2>&1; }
  } || status=$?
  [ "$own_policy" = 1 ] && rm -f "$policy"
  [ "$status" = 0 ] || die "apt-get could not install SLURM (exit $status): see $log"
}

write_config() {
  mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log" "$DIR/munge"
  chmod 755 "$DIR" "$DIR/munge"  # munged: "Socket is inaccessible: execute permissions for all required"
  local node
  {
    echo "# Written by scripts/slurm_local_cluster.sh: a two-node cluster on one machine."
    echo "ClusterName=moc-local"
    echo "SlurmctldHost=localhost(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10"  # a requeued job restarts after ~15 s
    echo "StateSaveLocation=$DIR/ctld"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/pgid"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$DIR/log/jobcomp.log"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=1"
    echo "MpiDefault=none"
    echo "SwitchType=switch/none"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "MinJobAge=3600"
    echo "KillWait=5"
    echo "MailProg=/bin/true"
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeHostname=localhost NodeAddr=${NODE_ADDR[$node]} Port=${NODE_PORT[$node]}" \
           "CPUs=2 RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$DIR/slurm.conf"
  echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env.sh"
}

# start NAME LOG CMD...: run CMD in the foreground of a new session, in the background of this script,
# and record its PID (setsid does not fork here: a background job of a script leads no process group).
start() {
  local name=$1 log=$2 pid
  shift 2
  setsid "$@" </dev/null >>"$log" 2>&1 &
  pid=$!
  echo "$name $pid" >> "$(pids_file)"
}

wait_idle() {
  local i states
  for i in $(seq $((START_TIMEOUT_S * 10))); do
    states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$states" = "node1=idle node2=idle " ] && return 0
    sleep 0.1
  done
  echo "$PROG: error: the nodes are not idle after ${START_TIMEOUT_S}s (sinfo: ${states:-no answer}); logs in $DIR/log" >&2
  return 1
}

cluster_up() {
  local name pid all_alive=1
  if [ -f "$(pids_file)" ]; then
    for name in munged slurmctld slurmd-node1 slurmd-node2; do
      pid=$(recorded "$name")
      alive "$pid" "${name%%-*}" || all_alive=0
    done
    if [ "$all_alive" = 1 ]; then
      export SLURM_CONF="$DIR/slurm.conf"
      wait_idle || exit 1
      say "already up ($DIR); . $DIR/env.sh"
      return 0
    fi
    say "a previous start in $DIR is incomplete: stopping it first"
    cluster_down quiet
  fi
  hosts_remove  # a stale line of this DIR from a killed run
  hosts_check_free
  mkdir -p "$DIR"
  install_if_missing
  write_config
  : > "$(pids_file)"
  trap 'cluster_down quiet' EXIT  # a failed start leaves nothing running
  export SLURM_CONF="$DIR/slurm.conf"

  mungekey -c -b 1024 -k "$DIR/munge/munge.key" -f >/dev/null 2>&1 || die "mungekey could not create $DIR/munge/munge.key"
  chmod 600 "$DIR/munge/munge.key"
  start munged "$DIR/log/munged.out" munged -F --force -S "$DIR/munge/munge.socket.2" \
    --key-file="$DIR/munge/munge.key" --log-file="$DIR/log/munged.log" \
    --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed"
  local i
  for i in $(seq 50); do [ -S "$DIR/munge/munge.socket.2" ] && break; sleep 0.1; done
  [ -S "$DIR/munge/munge.socket.2" ] || die "munged did not start: see $DIR/log/munged.log"

  hosts_add
  start slurmctld "$DIR/log/slurmctld.out" slurmctld -D -f "$SLURM_CONF" -c -i
  local node
  for node in "${NODES[@]}"; do
    # Each node its own hostname: torchrun's c10d rendezvous and gloo tell nodes apart by hostname.
    start "slurmd-$node" "$DIR/log/slurmd-$node.out" unshare --uts \
      sh -c "hostname $node && exec slurmd -D -f '$SLURM_CONF' -N $node"
  done
  for node in "${NODES[@]}"; do
    pid=$(recorded "slurmd-$node")
    for i in $(seq 100); do alive "$pid" slurmd && break; sleep 0.1; done  # unshare, sh, then slurmd
    alive "$pid" slurmd || die "slurmd $node did not start: see $DIR/log/slurmd-$node.out"
    echo "uts $node $(readlink "/proc/$pid/ns/uts")" >> "$(pids_file)"
  done
  alive "$(recorded slurmctld)" slurmctld || die "slurmctld did not start: see $DIR/log/slurmctld.out"
  wait_idle || exit 1
  trap - EXIT
  say "up: node1 (${NODE_ADDR[node1]}), node2 (${NODE_ADDR[node2]}); . $DIR/env.sh"
}

cluster_down() {
  local quiet=${1:-} node
  if [ ! -f "$(pids_file)" ]; then
    hosts_remove
    [ -n "$quiet" ] || say "not running ($DIR)"
    return 0
  fi
  # The daemons first, so that nothing restarts job steps; then whatever ran in the nodes' namespaces.
  for node in "${NODES[@]}"; do stop_pid "$(recorded "slurmd-$node")" slurmd & done
  stop_pid "$(recorded slurmctld)" slurmctld &
  wait
  for node in "${NODES[@]}"; do kill_node_processes "$node"; done
  stop_pid "$(recorded munged)" munged
  kill_sessions
  hosts_remove
  rm -f "$(pids_file)" "$DIR/munge/munge.socket.2" "$DIR/munge/munge.socket.2.lock"
  [ -n "$quiet" ] || say "down ($DIR)"
}

case "$VERB" in
  up|down) ;;
  *) echo "usage: $PROG up|down [DIR]   (DIR default /tmp/moc-slurm-cluster)" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (starts daemons, edits /etc/hosts, makes UTS namespaces)"
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
if [ "$VERB" = up ]; then cluster_up; else cluster_down; fi
