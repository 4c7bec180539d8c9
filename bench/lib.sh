# shellcheck shell=bash
# Helpers shared by bench/run and bench/db (sourced by both): logging, stopping a process by
# pid, the private work directory, prefilling a file, waiting for an NBD export, the blockd
# binary and a single-node blockd config. They read the caller's WORK, TMP_PARENT, SIZE,
# SIZE_GIB, REPO and SERVER_PID.

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

# stop_pid PID: TERM, then KILL after 5 s, and reaps it.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "server $pid ignored SIGTERM for 5 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  local st=0
  wait "$pid" 2>/dev/null || st=$?
  # 143 = died of the SIGTERM itself, which is how nbdkit and qemu-nbd stop.
  case "$st" in 0 | 143) ;; *) log "server $pid exited with status $st" ;; esac
}

# make_workdir [NAME]: makes $TMP_PARENT/NAME.XXXXXX (default NAME blockd-bench) as WORK. Test
# files must sit on a disk filesystem that takes O_DIRECT: tmpfs would measure memory.
make_workdir() {
  local fstype
  mkdir -p "$TMP_PARENT"
  fstype=$(findmnt -n -o FSTYPE -T "$TMP_PARENT" 2>/dev/null || stat -f -c %T "$TMP_PARENT")
  case "$fstype" in tmpfs | ramfs | overlayfs) die "$TMP_PARENT is $fstype; set BENCH_TMPDIR to a disk" ;; esac
  WORK=$(mktemp -d "$TMP_PARENT/${1:-blockd-bench}.XXXXXX")
  mkdir -p "$WORK/json" "$WORK/logs" "$WORK/data" "$WORK/run"
  FSTYPE=$fstype
}

# Writes every block of FILE once, so reads hit real data and writes never allocate or convert
# unwritten extents (which would make the first row pay for the filesystem).
prefill() {
  log "prefill $1 (${SIZE_GIB} GiB)"
  fio --name=prefill --filename="$1" --size="$SIZE" --rw=write --bs=1M --ioengine=io_uring \
    --iodepth=8 --direct=1 --output="$WORK/logs/prefill.log" >/dev/null ||
    die "prefill of $1 failed (see $WORK/logs/prefill.log)"
}

# wait_nbd URI: waits up to 30 s for the export to answer, failing early if the server died.
wait_nbd() {
  local _
  for _ in $(seq 300); do
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# Uses BENCH_BLOCKD if set; otherwise builds target/release/blockd (a no-op when it is up to date,
# and it keeps a stale binary from being measured).
blockd_bin() {
  if [ -n "${BENCH_BLOCKD:-}" ]; then
    echo "$BENCH_BLOCKD"
    return
  fi
  # blockctl too: the blockd-mirror row makes alpha Primary with it.
  log "cargo build --release -p blockd -p blockctl"
  if ! (cd "$REPO" && cargo build --release -p blockd -p blockctl) >"$WORK/logs/build.log" 2>&1; then
    log "blockd: build failed; last lines:"
    tail -5 "$WORK/logs/build.log" >&2
    return 1
  fi
  echo "$REPO/target/release/blockd"
}


# blockd_config FILE: a single-node config (node "bench", volume "bench" of SIZE_GIB GiB, data
# and run directories in WORK); callers append sections ([console], [metrics]) as they need.
blockd_config() {
  cat >"$1" <<TOML
[node.bench]
data-dir = "$WORK/data"
run-dir = "$WORK/run"

[[volume]]
name = "bench"
size = "${SIZE_GIB}GiB"
TOML
}
