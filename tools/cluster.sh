#!/usr/bin/env bash
# A small real cluster on this machine, to try the launchers across a network (tests/test_multinode.py):
#
#   bash tools/cluster.sh up [--hosts N] [--slurm]   # N hosts (default 2), optionally SLURM
#   bash tools/cluster.sh exec amn2 -- CMD...          # run CMD on host amn2 (its network, hostname, /etc/hosts)
#   bash tools/cluster.sh crash amn2                   # SIGKILL amn2's processes (not its daemons)
#   bash tools/cluster.sh status | down
#
# Each host is a network namespace on one bridge (10.77.0.1, .2, ...) with its own hostname (UTS
# namespace) and mount namespace (its /etc/hosts, an ssh client config), an sshd that accepts one
# generated key (passwordless `ssh amn2` from any host), and, with --slurm, slurmctld on the first
# host plus one slurmd per host (generated slurm.conf, no munge). Every host sees this machine's
# filesystem, so the repository and CLUSTER_DIR/shared stand in for a shared filesystem. A host's own
# name resolves to 127.0.1.1, as on Debian and many clusters: what makes gloo pick loopback.
# Root only. Needs: ip, unshare, nsenter; openssh-server; pdsh (the deepspeed launcher); slurmctld,
# slurmd, slurm-client (--slurm). `up` is idempotent (a running cluster is taken down first); each
# problem is one line on stderr; exit 3 means "cannot build a cluster here" (the tests skip on it).
#   CLUSTER_DIR     state: keys, configs, logs, pids, shared/ (default: .cluster in the repository)
#   CLUSTER_PREFIX  host / namespace name prefix (default amn: hosts amn1, amn2, ...)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${CLUSTER_DIR:=$ROOT/.cluster}" "${CLUSTER_PREFIX:=amn}"
NET=10.77.0
BR=${CLUSTER_PREFIX}-br0

fail() { echo "cluster: $*" >&2; exit 1; }
skip() { echo "cluster: cannot build a cluster here: $*" >&2; exit 3; }
hosts() { cat "$CLUSTER_DIR/hosts.list" 2>/dev/null; }
holder() { cat "$CLUSTER_DIR/$1.holder" 2>/dev/null; }
# on HOST CMD...: run CMD in HOST's network, UTS and mount namespaces (what `exec` offers users), in the
# caller's directory (entering a mount namespace moves to its root)
on() {
  local pid; pid=$(holder "$1") || fail "no host $1 (is the cluster up? bash tools/cluster.sh up)"
  shift
  nsenter -t "$pid" --net --uts --mount -- bash -c 'cd "$1" || exit 1; shift; exec "$@"' _ "$PWD" "$@"
}

preflight() {
  [[ $(id -u) == 0 ]] || skip "needs root (network namespaces, sshd)"
  local tool
  for tool in ip unshare nsenter; do command -v "$tool" >/dev/null || skip "$tool not found"; done
  command -v /usr/sbin/sshd >/dev/null || skip "openssh-server is not installed (apt-get install -y openssh-server)"
  command -v ssh-keygen >/dev/null || skip "ssh-keygen not found (apt-get install -y openssh-client)"
  command -v pdsh >/dev/null || skip "pdsh is not installed (apt-get install -y pdsh; the deepspeed launcher needs it)"
  if [[ -n "$SLURM" ]]; then
    for tool in slurmctld slurmd sbatch scontrol; do
      command -v "$tool" >/dev/null || skip "$tool not found (apt-get install -y slurmctld slurmd slurm-client)"
    done
  fi
  ip netns add "${CLUSTER_PREFIX}-probe" 2>/dev/null || skip "ip netns add failed (no network namespaces in this container)"
  ip netns del "${CLUSTER_PREFIX}-probe"
}

up() {
  local n=2
  SLURM=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --hosts) n=$2; shift 2 ;;
      --slurm) SLURM=1; shift ;;
      *) echo "cluster: unknown option $1 (up [--hosts N] [--slurm])" >&2; exit 2 ;;
    esac
  done
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 200 ]] || { echo "cluster: --hosts $n must be 1..200" >&2; exit 2; }
  preflight
  down >/dev/null 2>&1
  mkdir -p "$CLUSTER_DIR/shared" "$CLUSTER_DIR/etc" /run/sshd || fail "cannot create $CLUSTER_DIR"
  : >"$CLUSTER_DIR/hosts.list"
  # one key for the clients, one host key for every sshd (the hosts are one admin domain)
  ssh-keygen -q -t ed25519 -N "" -f "$CLUSTER_DIR/id_ed25519" -C cluster <<<y >/dev/null 2>&1 || fail "ssh-keygen failed"
  ssh-keygen -q -t ed25519 -N "" -f "$CLUSTER_DIR/host_key" -C cluster-host <<<y >/dev/null 2>&1 || fail "ssh-keygen failed"
  cp "$CLUSTER_DIR/id_ed25519.pub" "$CLUSTER_DIR/authorized_keys"
  cat >"$CLUSTER_DIR/etc/ssh_config" <<EOF
Host *
  IdentityFile $CLUSTER_DIR/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 10
EOF
  ip link add "$BR" type bridge || fail "cannot create bridge $BR"
  ip link set "$BR" up
  local i name
  for ((i = 1; i <= n; i++)); do
    name=$CLUSTER_PREFIX$i
    echo "$name" >>"$CLUSTER_DIR/hosts.list"
    ip netns add "$name" || fail "ip netns add $name failed"
    ip link add "$name-v" type veth peer name eth0 netns "$name" || fail "veth for $name failed"
    ip link set "$name-v" master "$BR" up
    ip -n "$name" addr add "$NET.$i/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
  done
  [[ -n "$SLURM" ]] && slurm_conf "$n"
  for ((i = 1; i <= n; i++)); do
    name=$CLUSTER_PREFIX$i
    # this host's view: its own name on loopback (Debian's default), the others on the bridge
    { echo "127.0.0.1 localhost"; echo "127.0.1.1 $name"
      local j; for ((j = 1; j <= n; j++)); do [[ $j == "$i" ]] || echo "$NET.$j $CLUSTER_PREFIX$j"; done
    } >"$CLUSTER_DIR/etc/hosts.$name"
    # the holder keeps the host's UTS and mount namespaces alive; `on` enters them
    # (nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts slurmd needs)
    nsenter --net="/run/netns/$name" unshare --uts --mount --propagation private bash -c '
      hostname "$1"; mount --bind "$2" /etc/hosts; mount --bind "$3" /etc/ssh/ssh_config
      [[ -d "$4" ]] && mount --bind "$4" /etc/slurm
      exec sleep infinity' _ "$name" "$CLUSTER_DIR/etc/hosts.$name" "$CLUSTER_DIR/etc/ssh_config" \
      "${SLURM:+$CLUSTER_DIR/slurm/etc}" >/dev/null 2>&1 &
    echo $! >"$CLUSTER_DIR/$name.holder"
  done
  sleep 0.5
  for name in $(hosts); do
    [[ "$(on "$name" hostname 2>/dev/null)" == "$name" ]] || fail "host $name did not start (its namespaces)"
    cat >"$CLUSTER_DIR/etc/sshd_config.$name" <<EOF
ListenAddress 0.0.0.0
HostKey $CLUSTER_DIR/host_key
PidFile $CLUSTER_DIR/sshd.$name.pid
AuthorizedKeysFile $CLUSTER_DIR/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
MaxStartups 100
EOF
    on "$name" /usr/sbin/sshd -f "$CLUSTER_DIR/etc/sshd_config.$name" -E "$CLUSTER_DIR/sshd.$name.log" \
      || fail "sshd on $name did not start (see $CLUSTER_DIR/sshd.$name.log)"
  done
  local first; first=$(hosts | head -n 1)
  for name in $(hosts); do  # every host reaches every other over ssh
    on "$first" ssh "$name" true || fail "ssh $first -> $name failed (see $CLUSTER_DIR/sshd.$name.log)"
  done
  [[ -n "$SLURM" ]] && slurm_up
  echo "cluster up: $(hosts | tr '\n' ' ')(${NET}.1-$n) state in $CLUSTER_DIR${SLURM:+, SLURM}"
}

slurm_conf() {
  local n=$1 d=$CLUSTER_DIR/slurm i
  mkdir -p "$d/etc" "$d/state"
  [[ -d /etc/slurm ]] || fail "/etc/slurm missing (apt-get install -y slurm-client)"
  cp -r /etc/slurm/. "$d/etc/" 2>/dev/null
  local cpus; cpus=$(nproc)
  {
    cat <<EOF
ClusterName=amllm
SlurmctldHost=${CLUSTER_PREFIX}1($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmctldPidFile=$d/slurmctld.pid
SlurmctldLogFile=$d/slurmctld.log
StateSaveLocation=$d/state
SlurmdPidFile=$d/slurmd-%n.pid
SlurmdSpoolDir=$d/spool-%n
SlurmdLogFile=$d/slurmd-%n.log
EOF
    for ((i = 1; i <= n; i++)); do
      echo "NodeName=$CLUSTER_PREFIX$i NodeAddr=$NET.$i CPUs=$((cpus * 2)) State=UNKNOWN"
    done
    echo "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
  } >"$d/etc/slurm.conf"
}

slurm_up() {
  local d=$CLUSTER_DIR/slurm first name
  first=$(hosts | head -n 1)
  on "$first" slurmctld -i || fail "slurmctld on $first did not start (see $d/slurmctld.log)"
  for name in $(hosts); do
    on "$name" slurmd -N "$name" || fail "slurmd on $name did not start (see $d/slurmd-$name.log)"
  done
  local t
  for ((t = 0; t < 60; t++)); do  # every node idle: the cluster takes jobs
    if [[ $(on "$first" sinfo -h -o '%D %t' 2>/dev/null) == "$(hosts | wc -l) idle" ]]; then return 0; fi
    sleep 1
  done
  fail "SLURM nodes not idle after 60 s: $(on "$first" sinfo -h -N -o '%N:%t' 2>&1 | tr '\n' ' ')(see $d/*.log)"
}

down() {
  local name pid
  for name in $(hosts); do
    # every process in the host's network namespace (sshd, slurmd, ranks), then the namespace
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$name" 2>/dev/null
    ip link del "$name-v" 2>/dev/null
    rm -f "$CLUSTER_DIR/$name.holder"
  done
  ip link del "$BR" 2>/dev/null
  rm -f "$CLUSTER_DIR/hosts.list"
  rm -rf "$CLUSTER_DIR/slurm/state" "$CLUSTER_DIR"/slurm/spool-*
  echo "cluster down"
}

# crash HOST: SIGKILL every process of HOST but its daemons (sshd, slurmd, the namespace holder): what a
# host that died mid-run leaves behind, with the host back up at once so the relaunch can use it
crash() {
  local name=$1 pid keep
  holder "$name" >/dev/null || { echo "cluster: no host $name" >&2; return 1; }
  keep=" $(holder "$name") $(cat "$CLUSTER_DIR/sshd.$name.pid" 2>/dev/null) $(cat "$CLUSTER_DIR/slurm/slurmd-$name.pid" 2>/dev/null) "
  for pid in $(ip netns pids "$name"); do
    [[ "$keep" == *" $pid "* ]] || kill -9 "$pid" 2>/dev/null
  done
  echo "cluster: $name crashed (its processes SIGKILLed)"
}

status() {
  local name ok=0
  [[ -n "$(hosts)" ]] || { echo "cluster: down"; return 1; }
  for name in $(hosts); do
    if [[ -d /proc/$(holder "$name") ]]; then
      echo "$name $(ip -n "$name" -4 -o addr show eth0 | awk '{print $4}') processes=$(ip netns pids "$name" | wc -l)"
    else
      echo "cluster: host $name is gone (bash tools/cluster.sh up)" >&2; ok=1
    fi
  done
  [[ -f "$CLUSTER_DIR/slurm/etc/slurm.conf" ]] && on "$(hosts | head -n 1)" sinfo -N -h -o '%N %t' 2>&1
  return $ok
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  crash) crash "${2:?usage: crash HOST}" ;;
  exec)
    [[ $# -ge 3 && "$3" == "--" ]] || { echo "cluster: usage: exec HOST -- CMD..." >&2; exit 2; }
    host=$2; shift 3; on "$host" "$@" ;;
  *) echo "usage: bash tools/cluster.sh up [--hosts N] [--slurm] | exec HOST -- CMD... | crash HOST | status | down" >&2; exit 2 ;;
esac
