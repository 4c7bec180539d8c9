# shellcheck shell=bash
# The mirror rows of bench/run (sourced by it; see bench/README.md "Mirror rows"):
#   blockd-mirror  blockd alpha (Primary) and beta in two network namespaces joined by a veth,
#   qsd-mirror     qemu-storage-daemon in alpha with an active (write-blocking) mirror to a
#                  qemu-nbd export in beta,
# plus the veth TCP round trip (fio's net engine, ping-pong) that the latency target needs.
# fio runs in the root namespace against alpha's unix socket: unix sockets are not isolated by
# network namespaces, so only the replication / mirror traffic crosses the veth.

# The namespaces and veth addresses. Addresses exist only inside the two namespaces.
NS_A=""
NS_B=""
A_IP=10.96.0.1
B_IP=10.96.0.2
VETH=bb0
REPL_PORT=7789
QNBD_PORT=10809
RTT_PORT=7790
# The second process of a mirror row (the peer in beta); stop_server stops it after SERVER_PID.
PEER_PID=""
# Set once the blockd-mirror volume has been written through completely (see row_blockd_mirror).
MIRROR_FILLED=""

# True when ROWS holds a mirror row, i.e. the namespaces are needed.
mirror_wanted() {
  case " $ROWS " in *" blockd-mirror "* | *" blockd-mirror-noenc "* | *" qsd-mirror "*) return 0 ;; esac
  return 1
}

# Creates both namespaces and the veth between them. NS_A/NS_B are set only once a namespace
# exists, so the EXIT trap deletes exactly what was created.
netns_up() {
  local stem="blockd-bench-$$" ns
  command -v ip >/dev/null || die "the mirror rows need ip (iproute2)"
  [ "$(id -u)" = 0 ] || die "the mirror rows need root (network namespaces)"
  command -v qemu-storage-daemon >/dev/null || die "qsd-mirror needs qemu-storage-daemon"
  ip netns add "$stem-a" || die "ip netns add $stem-a failed"
  NS_A="$stem-a"
  ip netns add "$stem-b" || die "ip netns add $stem-b failed"
  NS_B="$stem-b"
  ip link add "$VETH" netns "$NS_A" type veth peer name "$VETH" netns "$NS_B" ||
    die "cannot create the veth pair"
  for ns in "$NS_A:$A_IP" "$NS_B:$B_IP"; do
    if ! { ip -n "${ns%%:*}" link set lo up && ip -n "${ns%%:*}" addr add "${ns#*:}/24" dev "$VETH" &&
      ip -n "${ns%%:*}" link set "$VETH" up; }; then
      die "cannot configure ${ns%%:*}"
    fi
  done
}

# Deleting a namespace deletes its veth end and with it the peer end.
netns_down() {
  [ -z "$NS_A" ] || ip netns del "$NS_A" 2>/dev/null || log "could not delete netns $NS_A"
  [ -z "$NS_B" ] || ip netns del "$NS_B" 2>/dev/null || log "could not delete netns $NS_B"
  NS_A=""
  NS_B=""
}

# Measures the veth TCP round trip with 4 KiB messages (fio net engine, ping-pong: the client
# sends 4 KiB and waits for the 4 KiB echo) and writes p50 and p99 in µs to $WORK/json/rtt.
measure_rtt() {
  local n=$((20000 * 4096)) _
  log "veth TCP round trip (fio net ping-pong, 4 KiB)"
  ip netns exec "$NS_B" fio --name=rtt-srv --ioengine=net --protocol=tcp --port="$RTT_PORT" \
    --listen=1 --pingpong=1 --rw=read --bs=4k --size="$n" --output="$WORK/logs/rtt-srv.log" \
    >/dev/null 2>&1 &
  PEER_PID=$!
  for _ in $(seq 50); do
    ip netns exec "$NS_B" ss -Hltn "sport = :$RTT_PORT" 2>/dev/null | grep -q . && break
    sleep 0.1
  done
  if ! ip netns exec "$NS_A" fio --name=rtt --ioengine=net --protocol=tcp --hostname="$B_IP" \
    --port="$RTT_PORT" --pingpong=1 --rw=write --bs=4k --size="$n" --lat_percentiles=1 \
    --percentile_list=50:99 --output-format=json --output="$WORK/json/rtt.json" \
    >>"$WORK/logs/rtt.log" 2>&1; then
    log "round-trip measurement failed: $(tail -3 "$WORK/logs/rtt.log" | tr '\n' ' ')"
    rm -f "$WORK/json/rtt.json"
  fi
  stop_server
}

# blockctl next to the blockd binary (both come out of the same build).
blockctl_bin() {
  local ctl
  ctl="$(dirname "$BLOCKD")/blockctl"
  [ -x "$ctl" ] || { log "blockd-mirror: no blockctl next to $BLOCKD"; return 1; }
  echo "$ctl"
}

# Writes the two-node config and its secret (mode 0600, as blockd requires) once.
mirror_config() {
  local m=$WORK/mirror n
  [ -f "$m/blockd.toml" ] && return 0
  mkdir -p "$m"
  (umask 077 && head -c 32 /dev/urandom >"$m/secret")
  {
    printf '[cluster]\nsecret-file = "%s"\n\n' "$m/secret"
    for n in alpha:$A_IP beta:$B_IP; do
      mkdir -p "$m/${n%%:*}/data" "$m/${n%%:*}/run"
      printf '[node.%s]\nreplication = "%s:%s"\ndata-dir = "%s"\nrun-dir = "%s"\n\n' \
        "${n%%:*}" "${n#*:}" "$REPL_PORT" "$m/${n%%:*}/data" "$m/${n%%:*}/run"
    done
    # A log smaller than the volume makes random writes miss it (evictions, flushes on demand).
    [ -z "${BENCH_AL_EXTENTS:-}" ] ||
      printf '[resync]\nactivity-log-extents = %s\n\n' "$BENCH_AL_EXTENTS"
    printf '[[volume]]\nname = "bench"\nsize = "%sGiB"\n' "$SIZE_GIB"
  } >"$m/blockd.toml"
}

# mirror_ready CTL: true when alpha's status shows the peer Connected and both disks UpToDate
# (so no resync is running under the measurement).
mirror_ready() {
  local json
  json=$("$1" --config "$WORK/mirror/blockd.toml" --node alpha status --json 2>/dev/null) || return 1
  python3 - "$json" <<'PY'
import json, sys
def strings(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings(x)
    elif isinstance(v, str):
        yield v
doc = json.loads(sys.argv[1])
vols = doc.get("volumes", doc if isinstance(doc, list) else [doc])
ok = bool(vols)
for v in vols:
    s = list(strings(v))
    ok = ok and "Connected" in s and s.count("UpToDate") >= 2 and not any(
        x.startswith("Sync") for x in s)
sys.exit(0 if ok else 1)
PY
}

# Starts beta, then alpha, each in its namespace; waits up to 60 s for them to connect with no
# resync running; makes alpha Primary. Returns 1 (cells stay empty) if any step fails.
mirror_start_blockd() {
  local ctl=$1 cfg=$WORK/mirror/blockd.toml slog=$WORK/logs/blockd-mirror.log _
  rm -f -- "$WORK"/mirror/*/run/*.sock
  # Only the noenc row sets the key: a build older than issue 11 (bench/ab's A) refuses it.
  local enc=()
  [ -z "${MIRROR_ENCRYPTION:-}" ] || enc=("BLOCKD_CLUSTER__ENCRYPTION=$MIRROR_ENCRYPTION")
  ip netns exec "$NS_B" env "${enc[@]}" "$BLOCKD" --config "$cfg" --node beta \
    >>"$WORK/logs/blockd-beta.log" 2>&1 &
  PEER_PID=$!
  ip netns exec "$NS_A" env "${enc[@]}" "$BLOCKD" --config "$cfg" --node alpha >>"$slog" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null || ! kill -0 "$PEER_PID" 2>/dev/null; then break; fi
    if mirror_ready "$ctl"; then
      "$ctl" --config "$cfg" --node alpha role primary >>"$slog" 2>&1 && return 0
      log "blockd-mirror: role primary failed"
      return 1
    fi
    sleep 0.1
  done
  log "blockd-mirror: nodes did not connect; last status and log lines:"
  "$ctl" --config "$cfg" --node alpha status 2>&1 | tail -8 >&2 || true
  tail -5 "$slog" "$WORK/logs/blockd-beta.log" >&2 || true
  return 1
}

# blockd_mirror_up CTL: the two-node config, both daemons, alpha Primary and its export
# answering on MIRROR_URI (SERVER_PID alpha, PEER_PID beta). blockd creates both backing files on
# the first start; the first time the pair is up, the volume is written through completely over
# NBD (so a read reads real data and no write allocates), which also writes beta's copy.
# Returns 1 (after saying why) when any of it fails; the caller stops what was started.
MIRROR_URI=""
blockd_mirror_up() {
  MIRROR_URI="nbd+unix:///bench?socket=$WORK/mirror/alpha/run/bench.sock"
  mirror_config
  mirror_start_blockd "$1" && wait_nbd "$MIRROR_URI" || return 1
  if [ -z "$MIRROR_FILLED" ]; then
    log "prefill blockd-mirror through NBD (${SIZE_GIB} GiB)"
    if fio --name=prefill --ioengine=nbd --uri="$MIRROR_URI" --size="$SIZE" --rw=write --bs=1M \
      --iodepth=8 --output="$WORK/logs/prefill-mirror.log" >/dev/null; then
      MIRROR_FILLED=1
    else
      log "blockd-mirror: prefill failed (see logs/prefill-mirror.log)"
      return 1
    fi
  fi
}

# Fresh daemons for every workload, over the same data (blockd_mirror_up).
# ROW (default blockd-mirror) names the row; MIRROR_ENCRYPTION=off (row blockd-mirror-noenc)
# runs the same pair with `[cluster] encryption = "off"`: frames authenticated, not encrypted.
row_blockd_mirror() {
  local row=${1:-blockd-mirror} ctl
  [ -n "$BLOCKD" ] || return 0
  ctl=$(blockctl_bin) || return 0
  if blockd_mirror_up "$ctl"; then
    local id=${CUR_WORKLOADS[0]%% *}
    meta_counters "$ctl" >"$WORK/json/$row.$id.meta0"
    run_workloads "$row" --ioengine=nbd --uri="$MIRROR_URI"
    meta_counters "$ctl" >"$WORK/json/$row.$id.meta1"
  fi
  stop_server
}

# meta_counters CTL: alpha's "meta_writes bytes_written" counters (metadata writes per GiB).
meta_counters() {
  "$1" --config "$WORK/mirror/blockd.toml" --node alpha status --json 2>/dev/null |
    python3 -c 'import json,sys
d=json.load(sys.stdin); v=d.get("volumes", [d])[0]["counters"]
print(v.get("meta_writes", 0), v.get("bytes_written", 0))' 2>/dev/null || true
}

# Waits up to 30 s for beta's qemu-nbd to answer over the veth.
wait_qemu_nbd_tcp() {
  local _
  for _ in $(seq 300); do
    kill -0 "$PEER_PID" 2>/dev/null || return 1
    ip netns exec "$NS_A" nbdinfo --size "nbd://$B_IP:$QNBD_PORT/mirror" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# qsd_mirror_up IMAGE: qemu-nbd in beta (O_DIRECT, io_uring) over TCP on the veth (PEER_PID);
# qemu-storage-daemon in alpha (SERVER_PID) with IMAGE (O_DIRECT, io_uring) exported on the unix
# socket of QSD_URI, and an active synchronous mirror (blockdev-mirror sync=full
# copy-mode=write-blocking) to beta, waited to READY. Returns 1 (after saying why) on failure;
# the caller stops what was started.
QSD_URI=""
qsd_mirror_up() {
  local m=$WORK/mirror sock=$WORK/run/qsd.sock qmp=$WORK/run/qsd.qmp
  local slog=$WORK/logs/qsd-mirror.log
  QSD_URI="nbd+unix:///?socket=$sock"
  mkdir -p "$m"
  [ -f "$m/qsd-target.img" ] || truncate -s "$SIZE" "$m/qsd-target.img"
  rm -f -- "$sock" "$qmp"
  ip netns exec "$NS_B" qemu-nbd -t -b "$B_IP" -p "$QNBD_PORT" -x mirror -f raw --cache=none \
    --aio=io_uring "$m/qsd-target.img" >>"$WORK/logs/qemu-nbd-beta.log" 2>&1 &
  PEER_PID=$!
  if ! wait_qemu_nbd_tcp; then
    log "qsd-mirror: qemu-nbd in $NS_B did not come up: $(tail -3 "$WORK/logs/qemu-nbd-beta.log" | tr '\n' ' ')"
    return 1
  fi
  ip netns exec "$NS_A" qemu-storage-daemon \
    --blockdev "driver=file,node-name=src-file,filename=$1,cache.direct=on,aio=io_uring" \
    --blockdev driver=raw,node-name=src,file=src-file \
    --blockdev "driver=nbd,node-name=tgt,server.type=inet,server.host=$B_IP,server.port=$QNBD_PORT,export=mirror" \
    --nbd-server "addr.type=unix,addr.path=$sock" \
    --export type=nbd,id=exp0,node-name=src,name=,writable=on \
    --chardev "socket,id=qmp0,path=$qmp,server=on,wait=off" \
    --monitor chardev=qmp0,mode=control >>"$slog" 2>&1 &
  SERVER_PID=$!
  if ! python3 "$BENCH_DIR/qmp_mirror.py" "$qmp" "$SERVER_PID" >>"$slog" 2>&1 ||
    ! wait_nbd "$QSD_URI"; then
    log "qsd-mirror: mirror did not reach READY; last lines of its log:"
    tail -5 "$slog" >&2 || true
    return 1
  fi
}

# The qsd-mirror row on the prefilled peer.img; fresh processes per workload, like every other
# row.
row_qsd_mirror() {
  if qsd_mirror_up "$WORK/peer.img"; then
    run_workloads qsd-mirror --ioengine=nbd --uri="$QSD_URI"
  fi
  stop_server
}
