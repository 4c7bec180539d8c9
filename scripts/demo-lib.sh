# shellcheck shell=bash
# Sourced by scripts/demo (not run): the two-node "machine room" on one host and its teardown.
#
#   netns alpha                 netns switch (br0)                 netns beta
#   eth0 10.77.0.1  ── p-alpha ──┤            ├── p-beta ──  eth0 10.77.0.2
#   blockd, blockctl,            │            │              blockd, blockctl,
#   nbdfuse, loop, ext4,      p-client        │              (MariaDB after failover)
#   MariaDB, VIP 10.77.0.100     │
#                       netns client: eth0 10.77.0.10, the MariaDB client
#
# Each node also has its own persistent mount namespace ($WORK/ns/NODE), so /var/lib/mysql,
# /run/mysqld and the nbdfuse mount of one node are invisible to the other and to the host,
# exactly as on two machines. `on NODE CMD...` runs a command on a node (both namespaces).
# The caller sets WORK; every function here records what it created, and demo_teardown removes
# only that, by pid and by name, newest first.

# shellcheck disable=SC2034 # VIP_ADDR and KILL_TIME are for scripts/demo
NODES=(alpha beta)
SUBNET=10.77.0
VIP_ADDR=$SUBNET.100
declare -A IP=([alpha]=$SUBNET.1 [beta]=$SUBNET.2 [client]=$SUBNET.10)
declare -A MAC=([alpha]=02:77:00:00:00:01 [beta]=02:77:00:00:00:02 [client]=02:77:00:00:00:0a)
CREATED_NETNS=() # network namespaces this run created (only these are deleted)
CREATED_MNTNS=() # nodes whose mount namespace file exists
NS_DIR_BOUND='' # $WORK/ns is bind-mounted on itself (private), holding the namespace files

# on NODE CMD...: CMD inside NODE's network and mount namespaces.
on() {
  local node=$1
  shift
  nsenter --net="/run/netns/$node" --mount="$WORK/ns/$node" -- "$@"
}

# on_bg NODE CMD...: the same in the background; $! is then CMD's own pid (nsenter execs it),
# which `on NODE CMD &` would not give (that forks a subshell for the function).
on_bg() {
  local node=$1
  shift
  nsenter --net="/run/netns/$node" --mount="$WORK/ns/$node" -- "$@" &
}

# in_client CMD...: CMD in the client's network namespace (it shares the host's mounts).
in_client() { nsenter --net=/run/netns/client -- "$@"; }

# in_client_bg CMD...: the same in the background, CMD's pid in $!.
in_client_bg() { nsenter --net=/run/netns/client -- "$@" & }

# make_netns NAME: a new network namespace with loopback up; refuses to reuse an existing one
# (it could belong to someone else; a leftover of a killed demo is removed with `ip netns del`).
make_netns() {
  if [ -e "/run/netns/$1" ]; then
    echo "network namespace $1 already exists (a killed earlier demo? remove it: ip netns del $1)" >&2
    return 1
  fi
  ip netns add "$1"
  CREATED_NETNS+=("$1")
  ip -n "$1" link set lo up
}

# plug NS: a veth from NS (eth0, fixed MAC and address) to a port p-NS of the switch's bridge.
plug() {
  ip -n switch link add "p-$1" type veth peer name eth0 netns "$1"
  ip -n switch link set "p-$1" master br0 up
  ip -n "$1" link set eth0 address "${MAC[$1]}" up
  ip -n "$1" addr add "${IP[$1]}/24" dev eth0
  echo "  $1: eth0 ${IP[$1]}/24, MAC ${MAC[$1]}, plugged into switch port p-$1"
}

# make_network: the four network namespaces and the bridge.
make_network() {
  local ns
  for ns in switch alpha beta client; do make_netns "$ns"; done
  ip -n switch link add br0 type bridge
  ip -n switch link set br0 up
  for ns in alpha beta client; do plug "$ns"; done
}

# make_mount_namespaces: one persistent mount namespace per node. The files that keep them
# alive must sit on a private mount (else the new namespace would see its own file), hence
# the self bind mount of $WORK/ns. Inside, /run/mysqld becomes a private tmpfs.
make_mount_namespaces() {
  local node
  mkdir -p "$WORK/ns"
  mount --bind "$WORK/ns" "$WORK/ns"
  NS_DIR_BOUND=1
  mount --make-private "$WORK/ns"
  for node in "${NODES[@]}"; do
    touch "$WORK/ns/$node"
    unshare --mount="$WORK/ns/$node" --propagation private true
    CREATED_MNTNS+=("$node")
    on "$node" sh -c 'mkdir -p /run/mysqld /var/lib/mysql &&
      mount -t tmpfs -o mode=0755 demo-mysqld-run /run/mysqld &&
      chown mysql:mysql /run/mysqld'
    echo "  $node: mount namespace $WORK/ns/$node (private /run/mysqld)"
  done
}

# node_pids NODE: every process in NODE's network or mount namespace, one pid a line.
node_pids() {
  local mnt pid
  mnt=$(stat -L -c %i "$WORK/ns/$1" 2>/dev/null) || mnt=''
  {
    if [ -e "/run/netns/$1" ]; then ip netns pids "$1"; fi
    if [ -n "$mnt" ]; then
      for pid in /proc/[0-9]*; do
        if [ "$(readlink "$pid/ns/mnt" 2>/dev/null)" = "mnt:[$mnt]" ]; then echo "${pid#/proc/}"; fi
      done
    fi
  } | sort -un
}

# kill_node NODE: SIGKILL of every process of NODE (by pid), then waits until they are gone.
# KILL_TIME: when the signals went out ($EPOCHREALTIME).
kill_node() {
  local pids i
  pids=$(node_pids "$1" | xargs)
  [ -z "$pids" ] && return 0
  echo "  kill -KILL $pids  ($(ps -o comm= -p "${pids// /,}" | sort | uniq -c | xargs))"
  # shellcheck disable=SC2034
  KILL_TIME=$EPOCHREALTIME
  # shellcheck disable=SC2086 # one word per pid
  kill -KILL $pids 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [ -z "$(node_pids "$1")" ] && return 0
    sleep 0.1
  done
  echo "  processes of $1 still present: $(node_pids "$1" | tr '\n' ' ')" >&2
  return 1
}

# umount_node NODE: inside NODE's mount namespace, lazily unmounts what the demo or blockctl
# mounted there (the volume, nbdfuse, /run/mysqld, copies of $WORK's mounts), deepest first.
umount_node() {
  local m
  # shellcheck disable=SC2016 # awk's $5, not the shell's
  on "$1" awk '{print $5}' /proc/self/mountinfo |
    grep -E "^($WORK/|/var/lib/mysql$|/run/mysqld$)" | sort -r |
    while read -r m; do
      echo "  [$1] umount -l $m"
      on "$1" umount -l "$m" || true
    done
}

# detach_loops NODE: loop devices NODE set up on its nbdfuse files (under $WORK/NODE, or
# $WORK/prep for the preparation on alpha), listed from inside its mount namespace: seen from
# the host, a file on a FUSE mount of another namespace has a path relative to that mount
# only. A loop still used by a mounted filesystem is only marked to detach itself once
# unmounted, hence this runs before umount_node.
detach_loops() {
  local dev back
  on "$1" losetup -l -n -O NAME,BACK-FILE 2>/dev/null | while read -r dev back; do
    case "$back" in
      "$WORK/$1"/* | "$WORK/prep"/*) echo "  [$1] losetup -d $dev ($back)"; losetup -d "$dev" || true ;;
    esac
  done
}

# demo_teardown: everything above, undone: processes, mounts, loops, namespaces.
demo_teardown() {
  local node ns i pid
  for node in "${CREATED_MNTNS[@]}"; do kill_node "$node" || true; done
  for node in "${CREATED_MNTNS[@]}"; do
    detach_loops "$node"
    umount_node "$node"
  done
  for node in "${CREATED_MNTNS[@]}"; do umount "$WORK/ns/$node" || umount -l "$WORK/ns/$node"; done
  if [ -n "$NS_DIR_BOUND" ]; then umount "$WORK/ns" || umount -l "$WORK/ns"; fi
  for ((i = ${#CREATED_NETNS[@]} - 1; i >= 0; i--)); do
    ns=${CREATED_NETNS[i]}
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" && echo "  ip netns del $ns"
  done
}
