#!/usr/bin/env bash
# shellcheck disable=SC2317  # (shellcheck 0.9 takes the functions that main and the traps call for unreachable)
# bench.sh — homefs against sshfs, rclone, bindfs, a local directory, scp and rsync (issue 6).
#
# Everything runs on this machine, over loopback (127.0.0.1) only:
#   FUSE targets : homefs (fsd + netmount), sshfs (defaults), sshfs_perf (tuned options),
#                  rclone mount over sftp, bindfs (FUSE alone, no network), local dir (ceiling)
#   transfers    : netcp put/get of one big file and of a tree of small files (-r -j N),
#                  against scp (default and aes128-gcm) and rsync over the same private sshd
#   latency      : the metadata workloads again through a relay (scripts/bench/relay.py) that
#                  delays every chunk by LAT_DELAY_MS in each direction, in front of fsd and sshd
#   round trips  : in the latency phase, the chunks each client sent through its relay during each
#                  workload (about its round trips: the profile of where the time goes)
#   memory       : peak RSS (VmHWM) of netmount, fsd and the peers' daemons; ru_maxrss of netcp
# It installs what is missing (apt-get), builds homefs (cargo build --release), starts its own fsd
# (fsd init/user add/serve, port from its `listening on` line) and its own sshd on 127.0.0.1:
# $BENCH_SSH_PORT, never the system's, and on exit or Ctrl-C unmounts and stops all it started.
# Every wait is bounded; every workload command runs under `timeout WL_TIMEOUT`.
#
# Each workload runs ROUNDS times; inside a round it runs on every target in turn (order rotated
# per round), so the per-round ratios are the robust figure on a shared machine. The table shows
# median (min–max) and the median of per-round speed-ups of homefs against sshfs and the best peer.
# A homefs workload that fails is recorded as FAIL (details in the Notes and the command log) and
# the run goes on.
#
# Usage: scripts/bench.sh                      full run (slow: run it on a quiet machine)
#        QUICK=1 scripts/bench.sh              small sizes, for checking the machinery
#        scripts/bench.sh table RESULTS.tsv    re-render the table from a results file
#
# Environment (defaults: full / QUICK=1):
#   BENCH_DIR=/tmp/homefs-bench          work dir (fsd instance, keys, mounts, data, logs)
#   BENCH_TABLE=REPO/bench-results/table.md   table output; results.tsv and logs/ go beside it
#   BENCH_SSH_PORT (default: the first free port from 2241)   BENCH_FSD_PORT=0 (0: any free
#                  port, read from fsd's `listening on` line)
#   ROUNDS=3   LAT_ROUNDS=min(ROUNDS,2)   TARGETS="homefs sshfs sshfs_perf rclone bindfs local"
#   PHASES="fs xfer latency"   LAT_DELAY_MS=5   LAT_TARGETS="homefs sshfs" (sshfs_perf and rclone
#                  can be added; at 5 ms sshfs_perf measured the same as sshfs, rclone much slower)
#   XFER_TOOLS="netcp scp scp_aes128gcm rsync"   NETCP_JOBS=8
#   FS_WORKLOADS="seqwrite seqread randread create lsr find rmsmall tarx rmtree git dbench"
#   LAT_WORKLOADS="create lsr find rmsmall tarx rmtree git"
#   BIG_MB=1024/256  RAND_IOS=2000/500  NFILES=5000/1000  NDIRS=50  SMALL_SIZE=4096
#   TREE_SRC=/usr/include  TREE_EXCLUDE="node/openssl/archs"  TREE_MAX_FILES=0/1500 (0: all)
#   LAT_NFILES=1000/300  LAT_TREE_MAX_FILES=1000/300 (sshfs needs ~70 ms a file at 5 ms)
#   DBENCH_CLIENTS=4  DBENCH_TIME=8/4
#   XFER_MB=$BIG_MB  XFER_FILES=$NFILES   WL_TIMEOUT=900/300 (seconds, per command)
#   SSHFS_PERF_OPTS=Ciphers=aes128-gcm@openssh.com,Compression=no,max_conns=4,kernel_cache
#   RCLONE_CACHE_MODE=minimal   BINDFS_OPTS=""   NETMOUNT_OPTS="" (extra netmount arguments)
#   INSTALL=1 (apt-get what is missing)   BUILD=1 (cargo build --release -p fsd -p homefs-mount)
#   HOMEFS_BIN=${CARGO_TARGET_DIR:-REPO/target}/release   KEEP_DATA=0
#   FRESH_FS=1 (root only): each target's backing directory (fsd's storage root for homefs) and the
#                  transfers' directory on a fresh ext4 of its own (a sparse image of FS_IMG_MB
#                  (default 2 x BIG_MB + 3072) on a loop device with direct I/O), so that no target
#                  pays for another's deletions: ext4's inode allocator skips recently freed inodes
#                  (`recently_deleted`), which swung create / tar x / tree times up to 2x between
#                  runs when all targets shared the root file system. FRESH_FS=0: plain directories.
set -u -o pipefail
export LC_ALL=C
SELF=$(readlink -f "$0")
SCRIPTS=$(dirname "$SELF")
REPO=$(dirname "$SCRIPTS")
HELP=$SCRIPTS/bench/helper.py
RELAY=$SCRIPTS/bench/relay.py
PY=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}

if [ "${1:-}" = table ]; then
  exec "$PY" "$HELP" table "${2:?usage: bench.sh table RESULTS.tsv [META] [NOTES]}" "${3:-}" "${4:-}"
fi

QUICK=${QUICK:-0}
q() { if [ "$QUICK" = 1 ]; then echo "$1"; else echo "$2"; fi; }

WORK=${BENCH_DIR:-/tmp/homefs-bench}
TABLE_OUT=${BENCH_TABLE:-$REPO/bench-results/table.md}
OUTDIR=$(dirname "$TABLE_OUT")
RES=${RESULTS_TSV:-$OUTDIR/results.tsv}
SSH_PORT=${BENCH_SSH_PORT:-}
FSD_PORT=${BENCH_FSD_PORT:-0}
ROUNDS=${ROUNDS:-3}
LAT_ROUNDS=${LAT_ROUNDS:-$((ROUNDS < 2 ? ROUNDS : 2))}
BIG_MB=${BIG_MB:-$(q 256 1024)}
RAND_IOS=${RAND_IOS:-$(q 500 2000)}
NFILES=${NFILES:-$(q 1000 5000)}
NDIRS=${NDIRS:-50}
SMALL_SIZE=${SMALL_SIZE:-4096}
TREE_SRC=${TREE_SRC:-/usr/include}
TREE_EXCLUDE=${TREE_EXCLUDE:-node/openssl/archs}
TREE_MAX_FILES=${TREE_MAX_FILES:-$(q 1500 0)}
LAT_NFILES=${LAT_NFILES:-$(q 300 1000)}
LAT_TREE_MAX_FILES=${LAT_TREE_MAX_FILES:-$(q 300 1000)}
LAT_DELAY_MS=${LAT_DELAY_MS:-5}
DBENCH_CLIENTS=${DBENCH_CLIENTS:-4}
DBENCH_TIME=${DBENCH_TIME:-$(q 4 8)}
DBENCH_LOADFILE=${DBENCH_LOADFILE:-/usr/share/dbench/client.txt}
XFER_MB=${XFER_MB:-$BIG_MB}
XFER_FILES=${XFER_FILES:-$NFILES}
NETCP_JOBS=${NETCP_JOBS:-8}
WL_TIMEOUT=${WL_TIMEOUT:-$(q 300 900)}
TARGETS=${TARGETS:-homefs sshfs sshfs_perf rclone bindfs local}
LAT_TARGETS=${LAT_TARGETS:-homefs sshfs}
XFER_TOOLS=${XFER_TOOLS:-netcp scp scp_aes128gcm rsync}
PHASES=${PHASES:-fs xfer latency}
FS_WORKLOADS=${FS_WORKLOADS:-seqwrite seqread randread create lsr find rmsmall tarx rmtree git dbench}
LAT_WORKLOADS=${LAT_WORKLOADS:-create lsr find rmsmall tarx rmtree git}
SSHFS_PERF_OPTS=${SSHFS_PERF_OPTS:-Ciphers=aes128-gcm@openssh.com,Compression=no,max_conns=4,kernel_cache}
RCLONE_CACHE_MODE=${RCLONE_CACHE_MODE:-minimal}
BINDFS_OPTS=${BINDFS_OPTS:-}
NETMOUNT_OPTS=${NETMOUNT_OPTS:-}
INSTALL=${INSTALL:-1}
BUILD=${BUILD:-1}
BIN=${HOMEFS_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release}
KEEP_DATA=${KEEP_DATA:-0}
FRESH_FS=${FRESH_FS:-1}
FS_IMG_MB=${FS_IMG_MB:-$((BIG_MB * 2 + 3072))}

LOGS=$OUTDIR/logs
CMDLOG=$LOGS/commands.log
NOTES=$OUTDIR/notes.md
META=$OUTDIR/meta.md
SSHDIR=$WORK/ssh
SSHCFG=$SSHDIR/ssh_config
FSDDIR=$WORK/fsd
TARBALL=$WORK/tree.tar
LAT_TARBALL=$WORK/tree-lat.tar
HOMEFS_USER=bench

declare -A TDIR=() FPID=() BROKEN=() KIND=()
ACTIVE=()     # targets of the current phase, in order
BGPIDS=()     # relays we started
FRESH=()      # mount points of the fresh file systems we made (fresh_fs), in order
declare -A RELAY_PID=()  # relay name (ssh, fsd) -> pid
SSHD_PID=
CHILD=
FSD_PID=
FSD_ADDR=
FP=
DROP_OK=0
CLEANED=0
TABLE_DONE=1  # 0 once this run's results file is started (the cleanup then renders a partial table)
HOMEFS_OK=1   # 0 once the build or the server failed: homefs cells become FAIL

# the script's own stderr, kept: a trap may run while a function's stderr is redirected to a log
exec {ERR}>&2
log()  { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$LOGS/run.log" >&"$ERR"; }
note() { printf -- '- %s\n' "$*" >>"$NOTES"; log "NOTE: $*"; }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$RES"; }
elapsed() { local a=${1/./} b=${2/./}; local d=$((b - a)); printf '%d.%06d' $((d / 1000000)) $((d % 1000000)); }
mbps() { awk -v mb="$1" -v s="$2" 'BEGIN{ if (s > 0) printf "%.1f", mb * 1.048576 / s; else print "FAIL" }'; }
port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
has() { [[ " $1 " == *" $2 "* ]]; }
needs_homefs() { has "$TARGETS" homefs || has "$LAT_TARGETS" homefs || has "$XFER_TOOLS" netcp; }
vmhwm() { awk '/^VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null; }
# mounted, from the mount table: never touches the file system, so a hung mount cannot hang it
is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
# a mount that answers (a dead FUSE daemon gives ENOTCONN, a hung one the timeout)
mount_alive() { bounded 10 stat -f "$1" >/dev/null 2>&1 && is_mounted "$1" 2>/dev/null; }

# drop [PROGRAM...]: drop the page cache (root only; bounded, since sync on a hung mount never
# returns), then run each PROGRAM once with --version, so that the timed command's own program and
# libraries come back from the root disk before the clock starts: 'cold' is the target's cold cache,
# not the tool's (a cold exec of find costs 8-10 ms here, as much as a whole cold find on a mount).
drop() {
  local p
  bounded 120 sync
  if [ "$DROP_OK" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
  for p in "$@"; do bounded 30 "$p" --version >/dev/null 2>&1; done
}

# fresh_fs DIR NAME [MB]: DIR becomes the root of a fresh ext4 of its own (see FRESH_FS), with DIR's
# owner and mode; nothing if FRESH_FS=0, not root, DIR already a mount point, or a step fails
# (then DIR stays a plain directory, and the notes say so).
fresh_fs() {
  local dir=$1 name=$2 mb=${3:-$FS_IMG_MB} img=$WORK/images/$2.img own mode dev
  [ "$FRESH_FS" = 1 ] || return 0
  is_mounted "$dir" && return 0
  if [ "$(id -u)" != 0 ] || ! command -v mkfs.ext4 >/dev/null || ! command -v losetup >/dev/null; then
    note "FRESH_FS: needs root, mkfs.ext4 and losetup: $name stays on $(df --output=target "$dir" | tail -1)"; FRESH_FS=0; return 0
  fi
  mkdir -p "$dir" "$WORK/images"
  own=$(stat -c '%u:%g' "$dir"); mode=$(stat -c '%a' "$dir")
  rm -f "$img"
  if ! truncate -s "${mb}M" "$img" ||
    ! bounded 120 mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img" >>"$LOGS/run.log" 2>&1 ||
    ! dev=$(losetup -f --show --direct-io=on "$img" 2>>"$LOGS/run.log"); then
    note "FRESH_FS: could not make a file system for $name (see $LOGS/run.log): plain directory"; rm -f "$img"; return 0
  fi
  if ! mount -t ext4 "$dev" "$dir" 2>>"$LOGS/run.log"; then
    note "FRESH_FS: could not mount $dev on $dir: plain directory"; losetup -d "$dev"; rm -f "$img"; return 0
  fi
  FRESH+=("$dir")
  rmdir "$dir/lost+found" 2>/dev/null
  chown "$own" "$dir"; chmod "$mode" "$dir"
}

unmount_fresh() {  # after every FUSE mount and server that used them is gone
  local i m dev
  for ((i = ${#FRESH[@]} - 1; i >= 0; i--)); do
    m=${FRESH[$i]}
    dev=$(findmnt -n -o SOURCE --mountpoint "$m" 2>/dev/null | head -1)
    bounded 120 umount "$m" 2>>"$LOGS/run.log" || { log "umount $m failed; lazy"; umount -l "$m" 2>/dev/null; }
    [[ $dev == /dev/loop* ]] && losetup -d "$dev" 2>/dev/null
  done
  FRESH=()
  rm -rf "${WORK:?}/images"
}

# bounded SECS CMD... : run CMD under `timeout`, as a background job that this shell waits for, so
# that Ctrl-C or SIGTERM to the script runs the cleanup at once (a trap waits for a foreground
# command to finish); the cleanup stops the job (CHILD). stdout and stderr as given by the caller;
# stdin is /dev/null (bash gives a background job no other).
bounded() {
  local secs=$1; shift
  timeout -k 10 "$secs" "$@" &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=
  return "$rc"
}

# measure SECTION WORKLOAD TARGET ROUND CMD... : wall time of CMD under `timeout`, stdout
# discarded, stderr to the command log; records seconds (or FAIL) and sets LAST_S.
measure() {
  local sec=$1 wl=$2 tg=$3 rd=$4; shift 4
  printf '### %s | %s | %s | r%s | %s\n' "$sec" "$wl" "$tg" "$rd" "$*" >>"$CMDLOG"
  local t0=$EPOCHREALTIME
  bounded "$WL_TIMEOUT" "$@" >/dev/null 2>>"$CMDLOG"
  local rc=$?
  local t1=$EPOCHREALTIME
  LAST_S=$(elapsed "$t0" "$t1")
  if [ "$rc" -eq 0 ]; then
    record "$sec" "$wl" "$tg" "$rd" "$LAST_S" s
  else
    record "$sec" "$wl" "$tg" "$rd" FAIL s
    local why="rc=$rc"; [ "$rc" -ge 124 ] && [ "$rc" -le 137 ] && why="rc=$rc (timeout ${WL_TIMEOUT}s or killed)"
    note "$sec: '$wl' on $tg (round $rd) failed, $why after ${LAST_S}s: $(tail -n 2 "$CMDLOG" | tr '\n' ' ' | cut -c1-200)"
    LAST_S=
  fi
  return "$rc"
}

# ---------------------------------------------------------------- cleanup
unmount_one() {  # mountpoint [pid] [kind]
  local m=$1 pid=${2:-} kind=${3:-} i
  if is_mounted "$m" 2>/dev/null; then
    if [ "$kind" = homefs ]; then bounded 30 "$BIN/netmount" -u "$m" >>"$LOGS/netmount.log" 2>&1; fi
    if is_mounted "$m" 2>/dev/null; then
      bounded 20 fusermount3 -u "$m" 2>/dev/null || { sleep 1; bounded 20 fusermount3 -u "$m" 2>/dev/null; } ||
        { log "lazy unmount of $m"; bounded 20 fusermount3 -uz "$m" 2>/dev/null; }
    fi
  fi
  if [ -n "$pid" ]; then
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "daemon $pid of $m still running after unmount: SIGTERM"; kill "$pid" 2>/dev/null; fi
  fi
}

unmount_all() {
  local t
  for t in "${!TDIR[@]}"; do
    [ -n "${KIND[$t]:-}" ] && unmount_one "${TDIR[$t]}" "${FPID[$t]:-}" "${KIND[$t]}"
  done
  TDIR=(); FPID=(); KIND=(); ACTIVE=()
}

stop_pid() {  # pid name: SIGTERM, wait up to 20 s, then SIGKILL
  local p=$1 i
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
  kill "$p" 2>/dev/null
  for i in $(seq 200); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  log "$2 ($p) ignored SIGTERM for 20 s: SIGKILL"; kill -9 "$p" 2>/dev/null
}

cleanup() {
  [ "$CLEANED" = 1 ] && return
  CLEANED=1
  trap - EXIT INT TERM
  cd / || true
  log "cleanup: unmounting, stopping what we started"
  local p
  [ -n "$CHILD" ] && stop_pid "$CHILD" "running workload"
  for p in "${BGPIDS[@]}"; do stop_pid "$p" relay; done
  unmount_all
  local m
  for m in "$WORK"/mnt/*; do is_mounted "$m" 2>/dev/null && unmount_one "$m" "" homefs; done
  [ -n "$FSD_PID" ] && { record_fsd_mem; stop_pid "$FSD_PID" fsd; }
  stop_pid "$SSHD_PID" sshd
  if [ "$KEEP_DATA" != 1 ]; then
    unmount_fresh
    local still=0
    for m in "$WORK"/mnt/*; do is_mounted "$m" 2>/dev/null && still=1; done
    if [ "$still" = 0 ]; then
      rm -rf "${WORK:?}/backing" "${WORK:?}/mnt" "${WORK:?}/xfer" "${WORK:?}/rclone-cache" "$FSDDIR" "$TARBALL" "$LAT_TARBALL"
    else
      log "something is still mounted under $WORK/mnt; data left in place"
    fi
  fi
  if [ "$TABLE_DONE" = 0 ] && [ -s "$RES" ]; then  # interrupted: keep what was measured
    note "run interrupted: partial results"
    write_meta
    "$PY" "$HELP" table "$RES" "$META" "$NOTES" >"$TABLE_OUT" 2>>"$LOGS/run.log" &&
      log "partial table written to $TABLE_OUT"
  fi
  log "cleanup done"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- preparation
install_missing() {
  local pkgs=() tool
  for tool in sshfs:sshfs ssh:openssh-client scp:openssh-client /usr/sbin/sshd:openssh-server rsync:rsync \
    rclone:rclone bindfs:bindfs fio:fio dbench:dbench git:git /usr/bin/python3:python3 fusermount3:fuse3 \
    mountpoint:util-linux ss:iproute2 timeout:coreutils /usr/bin/time:time; do
    command -v "${tool%%:*}" >/dev/null || pkgs+=("${tool#*:}")
  done
  [ "${#pkgs[@]}" -gt 0 ] || return 0
  if [ "$INSTALL" != 1 ] || [ "$(id -u)" != 0 ]; then
    log "missing packages (INSTALL=$INSTALL, uid $(id -u)): ${pkgs[*]}"; return 0
  fi
  log "installing: ${pkgs[*]}"
  bounded 600 apt-get update -qq >>"$LOGS/apt.log" 2>&1 || log "apt-get update failed (see $LOGS/apt.log)"
  bounded 1800 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
    >>"$LOGS/apt.log" 2>&1 || log "apt-get install failed (see $LOGS/apt.log); going on with what is there"
}

prepare() {
  local own
  for own in backing mnt xfer fsd images; do  # the script empties (or mounts over) these
    case "$(readlink -m "$OUTDIR")/" in "$(readlink -m "$WORK/$own")"/*)
      echo "BENCH_TABLE's directory $OUTDIR is inside $WORK/$own, which the run empties: choose another" >&2; CLEANED=1; exit 2 ;;
    esac
  done
  mkdir -p "$LOGS" "$WORK"
  : >"$LOGS/run.log"
  install_missing
  [ "$(id -u)" = 0 ] || echo "warning: not root: drop_caches and some mounts may not work" >&2
  for tool in ssh fusermount3 "$PY" ss timeout git setsid; do
    command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 1; }
  done
  # leftovers of an earlier, killed run (under our own work dir only)
  local m
  for m in "$WORK"/mnt/*; do is_mounted "$m" 2>/dev/null && unmount_one "$m" "" homefs; done
  for m in "$WORK"/mnt/*; do
    if is_mounted "$m" 2>/dev/null; then echo "$m is still mounted; unmount it first" >&2; CLEANED=1; exit 1; fi
  done
  local f
  for f in "$WORK"/backing/* "$WORK"/fsd/homes "$WORK"/xfer; do  # fresh file systems of a killed run
    if is_mounted "$f" 2>/dev/null; then FRESH+=("$f"); fi
  done
  unmount_fresh
  rm -rf "${WORK:?}/backing" "${WORK:?}/mnt" "${WORK:?}/xfer" "${WORK:?}/rclone-cache" "$FSDDIR" "${WORK:?}/xdg" "$TARBALL" "$LAT_TARBALL"
  mkdir -p "$WORK/backing" "$WORK/mnt" "$WORK/xdg"
  : >"$RES"; : >"$NOTES"; : >"$CMDLOG"; : >"$WORK/loadavg.txt"; : >"$LOGS/mem.txt"
  TABLE_DONE=0
  if [ -w /proc/sys/vm/drop_caches ] && sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
    DROP_OK=1
  else
    note "drop_caches not permitted: 'cold' reads are NOT cold (page cache may hold the data)"
  fi
  export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
  # netmount/netcp pin and look up fingerprints under XDG: keep them out of the user's own config
  export XDG_CONFIG_HOME=$WORK/xdg
}

# ---------------------------------------------------------------- homefs: build, fsd
build_homefs() {
  if [ "$BUILD" = 1 ]; then
    log "building homefs: cargo build --release -p fsd -p homefs-mount (log: $LOGS/build.log)"
    if ! bounded 3600 nice -n 5 cargo build --manifest-path "$REPO/Cargo.toml" --release -p fsd -p homefs-mount >"$LOGS/build.log" 2>&1; then
      note "homefs: cargo build --release failed: $(grep -m1 -E '^error' "$LOGS/build.log" | cut -c1-200) (see $LOGS/build.log)"
      HOMEFS_OK=0; return
    fi
  fi
  local b
  for b in fsd netmount netcp; do
    [ -x "$BIN/$b" ] || { note "homefs: $BIN/$b not found"; HOMEFS_OK=0; }
  done
}

strip_ansi() { sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$@"; }

start_fsd() {
  local out=$LOGS/fsd.out i
  rm -rf "$FSDDIR"
  HOMEFS_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  export HOMEFS_PASSWORD  # read by netmount and netcp; a throwaway password of a throwaway instance
  if ! bounded 120 "$BIN/fsd" init "$FSDDIR" --listen "127.0.0.1:$FSD_PORT" >>"$LOGS/fsd-admin.log" 2>&1; then
    note "homefs: fsd init failed: $(tail -n1 "$LOGS/fsd-admin.log")"; HOMEFS_OK=0; return
  fi
  # the users' homes on a file system of their own (the storage root is `homes` in fsd's template)
  # (room also for what the transfers leave there: the get sources and one put per round)
  fresh_fs "$FSDDIR/homes" homefs $((FS_IMG_MB + XFER_MB * (ROUNDS + 2)))
  # (plain `timeout`: a background job of `bounded` would read /dev/null, not this pipe)
  if ! printf '%s\n' "$HOMEFS_PASSWORD" | timeout 120 "$BIN/fsd" user add "$HOMEFS_USER" --password-stdin \
    --config "$FSDDIR/fsd.toml" --quota 50G >>"$LOGS/fsd-admin.log" 2>&1; then
    note "homefs: fsd user add failed: $(tail -n1 "$LOGS/fsd-admin.log")"; HOMEFS_OK=0; return
  fi
  # setsid: a Ctrl-C on the terminal reaches this script only; its cleanup unmounts, then stops fsd
  setsid "$BIN/fsd" serve --config "$FSDDIR/fsd.toml" </dev/null >"$out" 2>&1 &
  FSD_PID=$!
  for i in $(seq 600); do  # 60 s
    strip_ansi "$out" | grep -q 'fingerprint SHA256:' && strip_ansi "$out" | grep -q 'listening on' && break
    kill -0 "$FSD_PID" 2>/dev/null || break
    sleep 0.1
  done
  FSD_ADDR=$(strip_ansi "$out" | sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' | head -1)
  FP=$(strip_ansi "$out" | sed -n "s/^fingerprint \(SHA256:[^ ]*\).*/\1/p" | head -1)
  if [ -z "$FSD_ADDR" ] || [ -z "$FP" ] || ! kill -0 "$FSD_PID" 2>/dev/null; then
    note "homefs: fsd serve did not print 'listening on' and 'fingerprint SHA256:' within 60 s: $(strip_ansi "$out" | tail -n2 | tr '\n' ' ' | cut -c1-200)"
    stop_pid "$FSD_PID" fsd; FSD_PID=; HOMEFS_OK=0; return
  fi
  log "fsd pid $FSD_PID on $FSD_ADDR, $FP"
}

record_fsd_mem() {
  local h; h=$(vmhwm "$FSD_PID")
  [ -n "$h" ] && record mem "fsd, whole run" fsd 1 "$h" MiB
  echo "fsd pid $FSD_PID: $(grep -E '^(VmHWM|VmRSS|Threads)' "/proc/$FSD_PID/status" 2>/dev/null | tr -s ' \t' ' ' | tr '\n' ';')" >>"$LOGS/mem.txt"
}

netmount_pid() {  # the netmount process serving MOUNTPOINT, found by its command line
  local m=$1 p exe
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    [[ $exe == */netmount || $exe == */netmount\ \(deleted\) ]] || continue
    tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF "$m" && { echo "${p#/proc/}"; return; }
  done
}

mount_homefs() {  # mountpoint port; sets FPID or returns 1
  local m=$1 port=$2 np i
  [ "$HOMEFS_OK" = 1 ] || return 1
  # shellcheck disable=SC2086
  setsid "$BIN/netmount" "$HOMEFS_USER@127.0.0.1:$port" "$m" --fingerprint "$FP" $NETMOUNT_OPTS </dev/null >>"$LOGS/netmount.log" 2>&1 &
  np=$!
  for i in $(seq 600); do  # 60 s for it to mount and return
    kill -0 "$np" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$np" 2>/dev/null; then
    if is_mounted "$m"; then
      note "homefs: netmount did not return within 60 s of being started although mounted (stays in the foreground?)"
    else
      note "homefs: netmount neither mounted nor returned within 60 s"; stop_pid "$np" netmount; return 1
    fi
  else
    wait "$np"; local rc=$?
    if [ "$rc" != 0 ] || ! is_mounted "$m"; then
      note "homefs: netmount exited $rc, mounted: $(is_mounted "$m" && echo yes || echo no): $(tail -n1 "$LOGS/netmount.log" | cut -c1-200)"
      return 1
    fi
  fi
  FPID[homefs]=$(netmount_pid "$m")
  [ -n "${FPID[homefs]}" ] || note "homefs: mounted, but no netmount process found for $m (memory not measured)"
}

# ---------------------------------------------------------------- sshd, relay
start_sshd() {
  local p
  if [ -z "$SSH_PORT" ]; then  # others may run an sshd of their own on loopback: take a free port
    for p in $(seq 2241 2290); do port_busy "$p" || { SSH_PORT=$p; break; }; done
  fi
  if [ -z "$SSH_PORT" ] || port_busy "$SSH_PORT"; then
    note "no free port for our sshd (${SSH_PORT:-2241-2290} in use; set BENCH_SSH_PORT): peers over ssh skipped"
    return 1
  fi
  mkdir -p "$SSHDIR"; chmod 700 "$SSHDIR"
  rm -f "$SSHDIR"/*
  ssh-keygen -q -t ed25519 -N '' -C homefs-bench-host -f "$SSHDIR/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C homefs-bench-client -f "$SSHDIR/id_ed25519"
  cp "$SSHDIR/id_ed25519.pub" "$SSHDIR/authorized_keys"
  echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$SSHDIR/host_ed25519.pub")" >"$SSHDIR/known_hosts"
  local user; user=$(id -un)
  cat >"$SSHDIR/sshd_config" <<EOF
# private sshd of scripts/bench.sh, not the system one
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSHDIR/host_ed25519
PidFile $SSHDIR/sshd.pid
AuthorizedKeysFile $SSHDIR/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers $user
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
MaxStartups 64
MaxSessions 64
Subsystem sftp internal-sftp
EOF
  cat >"$SSHCFG" <<EOF
Host peer peerlat
  HostName 127.0.0.1
  User $user
  IdentityFile $SSHDIR/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $SSHDIR/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ControlMaster no
  LogLevel ERROR
  ConnectTimeout 20
Host peer
  Port $SSH_PORT
EOF
  mkdir -p /run/sshd 2>/dev/null
  /usr/sbin/sshd -t -f "$SSHDIR/sshd_config" 2>>"$LOGS/sshd.log" || { note "sshd config test failed (see $LOGS/sshd.log)"; return 1; }
  setsid /usr/sbin/sshd -D -f "$SSHDIR/sshd_config" -E "$LOGS/sshd.log" </dev/null &
  SSHD_PID=$!
  local i
  for i in $(seq 50); do bounded 10 ssh -F "$SSHCFG" peer true 2>/dev/null && break; sleep 0.2; done
  # the sshd that answers must be ours (it exits at once if the port was taken meanwhile)
  kill -0 "$SSHD_PID" 2>/dev/null || { note "our sshd exited: $(tail -n1 "$LOGS/sshd.log")"; return 1; }
  bounded 10 ssh -F "$SSHCFG" peer true || { note "cannot log in to our sshd (see $LOGS/sshd.log)"; return 1; }
  SSH_CIPHER=$(bounded 10 ssh -v -F "$SSHCFG" peer true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1)
  log "sshd pid $SSHD_PID on 127.0.0.1:$SSH_PORT; default negotiated cipher: $SSH_CIPHER"
}

need_sshd() {
  local t
  for t in $TARGETS; do case $t in sshfs | sshfs_perf | rclone) has "$PHASES" fs && return 0 ;; esac; done
  for t in $LAT_TARGETS; do case $t in sshfs | sshfs_perf | rclone) has "$PHASES" latency && return 0 ;; esac; done
  for t in $XFER_TOOLS; do case $t in scp* | rsync) has "$PHASES" xfer && return 0 ;; esac; done
  return 1
}

start_relay() {  # upstream-port name; sets RELAY_PORT (empty if it did not start within 10 s)
  local pf=$WORK/relay-$2.port i
  rm -f "$pf"
  RELAY_PORT=
  # started by this shell itself (not in a subshell): the relay exits when its parent goes away
  rm -f "$WORK/relay-$2.stats"
  setsid "$PY" "$RELAY" --upstream-port "$1" --delay-ms "$LAT_DELAY_MS" --port-file "$pf" \
    --stats-file "$WORK/relay-$2.stats" >>"$LOGS/relay-$2.log" 2>&1 &
  BGPIDS+=("$!"); RELAY_PID[$2]=$!
  for i in $(seq 100); do [ -s "$pf" ] && break; sleep 0.1; done
  [ -s "$pf" ] && RELAY_PORT=$(cat "$pf")
}

relay_chunks() {  # name: prints the chunks relayed client->server so far (SIGUSR1, then its stats file)
  local f=$WORK/relay-$1.stats pid=${RELAY_PID[$1]:-} seq0=0 s i
  [ -n "$pid" ] || return 1
  [ -s "$f" ] && read -r seq0 _ <"$f"
  kill -USR1 "$pid" 2>/dev/null || return 1
  for i in $(seq 50); do  # 5 s for the relay to answer
    s=0; [ -s "$f" ] && read -r s _ <"$f"
    [ "$s" -gt "$seq0" ] && { awk '{print $2}' "$f"; return 0; }
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- the source tree
make_tarball() {  # out max_files ; sets TREE_FILES TREE_BYTES TREE_DIRS TREE_MB for that tarball
  local out=$1 max=$2 parent base prune=() e
  parent=$(dirname "$TREE_SRC"); base=$(basename "$TREE_SRC")
  for e in $TREE_EXCLUDE; do prune+=(-path "*/$e" -prune -o); done
  # regular files only (symlinks left out so every target can take them), the first MAX if set,
  # each preceded by its parent directories not yet listed
  (cd "$parent" && find "$base" "${prune[@]}" -type f -print) | sort |
    { if [ "$max" -gt 0 ]; then head -n "$max"; else cat; fi; } |
    awk '{ n = split($0, a, "/"); p = ""
           for (i = 1; i < n; i++) { p = (i == 1) ? a[1] : p "/" a[i]; if (!(p in seen)) { seen[p] = 1; print p } }
           print }' >"$out.list"
  tar -C "$parent" --no-recursion -cf "$out" -T "$out.list"
  read -r TREE_FILES TREE_BYTES TREE_DIRS < <(tar -tvf "$out" | awk '/^-/{n++; b+=$3} /^d/{d++} END{print n+0, b+0, d+0}')
  TREE_MB=$(awk -v b="$TREE_BYTES" 'BEGIN{printf "%.1f", b/1e6}')
  log "tree $out: $TREE_SRC (excl. $TREE_EXCLUDE, symlinks) -> $TREE_FILES files, $TREE_DIRS dirs, $TREE_BYTES bytes"
}

# ---------------------------------------------------------------- targets
wait_mount() {  # mountpoint pid
  local i
  for i in $(seq 150); do
    is_mounted "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# setup_targets PHASE TARGETS SSH_HOST SSH_PORT FSD_PORT BASE: mounts each target at
# $WORK/mnt/PHASE-T and makes the directory BASE in it; a target that cannot be set up stays in
# ACTIVE as BROKEN, so its cells read FAIL (homefs) or the target is skipped (peers).
setup_targets() {
  local ph=$1 targets=$2 host=$3 sport=$4 fport=$5 base=$6 t
  for t in $targets; do
    local mnt=$WORK/mnt/$ph-$t back=$WORK/backing/$t
    mkdir -p "$mnt" "$back"
    [ "$t" = homefs ] || fresh_fs "$back" "$t"
    unset "BROKEN[$t]"
    case $t in
      local)
        TDIR[$t]=$back ;;
      bindfs)
        if ! command -v bindfs >/dev/null; then note "bindfs not installed: target skipped"; continue; fi
        # shellcheck disable=SC2086
        setsid bindfs -f $BINDFS_OPTS "$back" "$mnt" </dev/null >>"$LOGS/bindfs.log" 2>&1 &
        FPID[$t]=$!; TDIR[$t]=$mnt; KIND[$t]=fuse ;;
      sshfs | sshfs_perf | rclone)
        if [ -z "$SSHD_PID" ]; then note "$t: our sshd is not running; target skipped"; continue; fi ;;&
      sshfs)
        setsid sshfs -f -F "$SSHCFG" -p "$sport" "$host:$back" "$mnt" </dev/null >>"$LOGS/sshfs.log" 2>&1 &
        FPID[$t]=$!; TDIR[$t]=$mnt; KIND[$t]=fuse ;;
      sshfs_perf)
        setsid sshfs -f -F "$SSHCFG" -p "$sport" "$host:$back" "$mnt" -o "$SSHFS_PERF_OPTS" </dev/null >>"$LOGS/sshfs_perf.log" 2>&1 &
        FPID[$t]=$!; TDIR[$t]=$mnt; KIND[$t]=fuse ;;
      rclone)
        if ! command -v rclone >/dev/null; then note "rclone not installed: target skipped"; continue; fi
        cat >"$WORK/rclone-$ph.conf" <<EOF
[peer]
type = sftp
host = 127.0.0.1
port = $sport
user = $(id -un)
key_file = $SSHDIR/id_ed25519
known_hosts_file = $SSHDIR/known_hosts
shell_type = unix
md5sum_command = none
sha1sum_command = none
disable_hashcheck = true
EOF
        setsid rclone --config "$WORK/rclone-$ph.conf" mount "peer:$back" "$mnt" \
          --vfs-cache-mode "$RCLONE_CACHE_MODE" --cache-dir "$WORK/rclone-cache" \
          --log-file "$LOGS/rclone.log" --log-level NOTICE </dev/null >>"$LOGS/rclone.stderr" 2>&1 &
        FPID[$t]=$!; TDIR[$t]=$mnt; KIND[$t]=fuse ;;
      homefs)
        ACTIVE+=("$t"); TDIR[$t]=$mnt; KIND[$t]=homefs
        if [ "$HOMEFS_OK" != 1 ]; then BROKEN[$t]="not built or server not running"; continue; fi
        if ! mount_homefs "$mnt" "$fport"; then BROKEN[$t]="netmount failed"; continue; fi
        if ! bounded 60 mkdir -p "$mnt/$base" 2>>"$CMDLOG"; then
          note "homefs: cannot create $base in the mount"; BROKEN[$t]="mkdir failed"
        fi
        continue ;;
      *) note "unknown target $t skipped"; continue ;;
    esac
    if [ -n "${FPID[$t]:-}" ]; then
      if ! wait_mount "$mnt" "${FPID[$t]}"; then
        note "$t: mount failed (see $LOGS/$t.log); target skipped"
        unmount_one "$mnt" "${FPID[$t]}"; unset "FPID[$t]" "TDIR[$t]" "KIND[$t]"; continue
      fi
    fi
    if ! bounded 60 mkdir -p "${TDIR[$t]}/$base" 2>>"$CMDLOG"; then note "$t: cannot create a directory in the mount; skipped"; continue; fi
    ACTIVE+=("$t")
  done
  log "$ph targets: ${ACTIVE[*]}${BROKEN[*]:+ (broken: ${!BROKEN[*]})}"
}

# ---------------------------------------------------------------- filesystem workloads
set_labels() {  # nfiles tree_files tree_mb
  L_SEQW="seq write ${BIG_MB} MiB + fsync"
  L_SEQW_R="↳ seq write (MB/s)"
  L_SEQR="seq read ${BIG_MB} MiB, cold"
  L_SEQR_R="↳ seq read (MB/s)"
  L_RR="rand 4K read x${RAND_IOS} (fio psync QD1), cold"
  L_RR_R="rand 4K read (IOPS, fio)"
  L_CREATE="create $1 x ${SMALL_SIZE} B files in ${NDIRS} dirs"
  L_LSR="ls -lR of them, cold"
  L_FIND="find over them, cold"
  L_RMSMALL="rm -rf of them"
  L_TARX="tar x of $2 files / $3 MB"
  L_RMTREE="rm -rf of that tree"
  L_GITSETUP="git init+add+commit of $2 files (once, n=1)"
  L_GITC="git status, cold (after drop_caches)"
  L_GITW="git status, warm (right after the cold one)"
  L_DB="dbench ${DBENCH_CLIENTS} clients ${DBENCH_TIME}s (MB/s)"
}

fail_wl() {  # sec wl target round: FAIL in every row the workload fills
  local s=$1 t=$3 r=$4
  case $2 in
    seqwrite) record "$s" "$L_SEQW" "$t" "$r" FAIL s ;;
    seqread) record "$s" "$L_SEQR" "$t" "$r" FAIL s ;;
    randread) record "$s" "$L_RR_R" "$t" "$r" FAIL IOPS ;;
    create) record "$s" "$L_CREATE" "$t" "$r" FAIL s ;;
    lsr) record "$s" "$L_LSR" "$t" "$r" FAIL s ;;
    find) record "$s" "$L_FIND" "$t" "$r" FAIL s ;;
    rmsmall) record "$s" "$L_RMSMALL" "$t" "$r" FAIL s ;;
    tarx) record "$s" "$L_TARX" "$t" "$r" FAIL s ;;
    rmtree) record "$s" "$L_RMTREE" "$t" "$r" FAIL s ;;
    git) record "$s" "$L_GITC" "$t" "$r" FAIL s; record "$s" "$L_GITW" "$t" "$r" FAIL s ;;
    dbench) record "$s" "$L_DB" "$t" "$r" FAIL MB/s ;;
  esac
}

# git init+add+commit of the directory $1 (a script, so that `timeout` can run it)
# shellcheck disable=SC2016
GIT_SETUP='git -C "$1" init -q && git -C "$1" add -A && git -C "$1" -c gc.auto=0 -c maintenance.auto=false -c user.name=bench -c user.email=bench@localhost commit -q -m tree'

prep_git() {  # sec target dir tarball [timed]
  local s=$1 t=$2 g=$3 tb=$4 timed=${5:-1}
  bounded 120 rm -rf "$g"; bounded 60 mkdir -p "$g"
  if ! bounded "$WL_TIMEOUT" tar -xf "$tb" -C "$g" --no-same-owner 2>>"$CMDLOG"; then
    note "$s: $t: tar x for the git repository failed"; [ "$timed" = 1 ] && record "$s" "$L_GITSETUP" "$t" 0 FAIL s
    return 1
  fi
  bounded 120 sync
  if [ "$timed" = 1 ]; then
    measure "$s" "$L_GITSETUP" "$t" 0 bash -c "$GIT_SETUP" _ "$g" || return 1
  else
    bounded "$WL_TIMEOUT" bash -c "$GIT_SETUP" _ "$g" >/dev/null 2>>"$CMDLOG" || return 1
  fi
  bounded "$WL_TIMEOUT" git -C "$g" status --porcelain >/dev/null 2>&1  # let git refresh its index once
}

# run_wl SEC WL TARGET ROUND BASE NFILES TARBALL; in the latency phase, also counts the chunks the
# target sent through its relay during the workload (about its round trips: the profile)
run_wl() {
  local s=$1 t=$3 r=$4 rl='' c0='' c1=''
  [ "$s" = lat ] && { rl=ssh; [ "$t" = homefs ] && rl=fsd; c0=$(relay_chunks "$rl"); }
  run_wl_once "$@"
  if [ "$s" = lat ] && [ -n "$c0" ] && [ -z "${BROKEN[$t]:-}" ] && c1=$(relay_chunks "$rl"); then
    record lat_rt "$(wl_label "$2")" "$t" "$r" $((c1 - c0)) count
  fi
}

wl_label() {  # the main row of a workload, for the round-trip table
  case $1 in
    create) echo "$L_CREATE" ;; lsr) echo "$L_LSR" ;; find) echo "$L_FIND" ;; rmsmall) echo "$L_RMSMALL" ;;
    tarx) echo "$L_TARX" ;; rmtree) echo "$L_RMTREE" ;; git) echo "git status, cold then warm" ;;
    dbench) echo "$L_DB" ;; *) echo "$1" ;;
  esac
}

run_wl_once() {  # sec wl target round base nfiles tarball
  local s=$1 wl=$2 t=$3 r=$4 d=${TDIR[$3]}/$5 n=$6 tb=$7
  if [ -n "${BROKEN[$t]:-}" ]; then fail_wl "$s" "$wl" "$t" "$r"; return; fi
  case $wl in
    seqwrite)
      bounded 120 rm -f "$d/big"; bounded 120 sync
      measure "$s" "$L_SEQW" "$t" "$r" "$PY" "$HELP" seqwrite "$d/big" "$BIG_MB" &&
        record "$s" "$L_SEQW_R" "$t" "$r" "$(mbps "$BIG_MB" "$LAST_S")" MB/s ;;
    seqread)
      [ -f "$d/big" ] || { record "$s" "$L_SEQR" "$t" "$r" FAIL s; note "$s: seqread on $t: no file to read (seqwrite failed?)"; return; }
      drop dd
      measure "$s" "$L_SEQR" "$t" "$r" dd if="$d/big" of=/dev/null bs=1M status=none &&
        record "$s" "$L_SEQR_R" "$t" "$r" "$(mbps "$BIG_MB" "$LAST_S")" MB/s ;;
    randread)
      [ -f "$d/big" ] || { record "$s" "$L_RR_R" "$t" "$r" FAIL IOPS; return; }
      drop fio
      local js=$LOGS/fio-randread-$s-$t-$r.json iops
      # the wall time (with fio's start-up) goes to a section the table leaves out; IOPS is the figure
      if measure "${s}_aux" "$L_RR" "$t" "$r" fio --name=randread --filename="$d/big" --rw=randread --bs=4k \
        --size="${BIG_MB}M" --number_ios="$RAND_IOS" --ioengine=psync --iodepth=1 --randrepeat=1 \
        --norandommap --output-format=json --output="$js"; then
        iops=$("$PY" "$HELP" fiojson "$js" read_iops 2>>"$CMDLOG") || iops=FAIL
        record "$s" "$L_RR_R" "$t" "$r" "$iops" IOPS
      else
        record "$s" "$L_RR_R" "$t" "$r" FAIL IOPS
      fi ;;
    create)
      bounded 300 rm -rf "$d/small"; bounded 120 sync
      measure "$s" "$L_CREATE" "$t" "$r" "$PY" "$HELP" mkfiles "$d/small" "$n" "$NDIRS" "$SMALL_SIZE" ;;
    lsr) drop ls; measure "$s" "$L_LSR" "$t" "$r" ls -lR "$d/small" ;;
    find) drop find; measure "$s" "$L_FIND" "$t" "$r" find "$d/small" ;;
    rmsmall) bounded 120 sync; measure "$s" "$L_RMSMALL" "$t" "$r" rm -rf "$d/small" ;;
    tarx)
      bounded 300 rm -rf "$d/tree"; bounded 60 mkdir -p "$d/tree"; bounded 120 sync
      measure "$s" "$L_TARX" "$t" "$r" tar -xf "$tb" -C "$d/tree" --no-same-owner ;;
    rmtree) bounded 120 sync; measure "$s" "$L_RMTREE" "$t" "$r" rm -rf "$d/tree" ;;
    git)  # cold then warm on the same target, back to back (a later drop would un-warm it)
      if [ ! -d "$d/git/.git" ]; then fail_wl "$s" git "$t" "$r"; return; fi
      drop git; measure "$s" "$L_GITC" "$t" "$r" git -C "$d/git" status --porcelain
      measure "$s" "$L_GITW" "$t" "$r" git -C "$d/git" status --porcelain ;;
    dbench)
      if ! command -v dbench >/dev/null; then record "$s" "$L_DB" "$t" "$r" FAIL MB/s; return; fi
      bounded 300 rm -rf "$d/dbench"; bounded 60 mkdir -p "$d/dbench"; bounded 120 sync
      local lg=$LOGS/dbench-$s-$t-$r.log tp errs
      bounded $((DBENCH_TIME + 120)) dbench -D "$d/dbench" -t "$DBENCH_TIME" -c "$DBENCH_LOADFILE" "$DBENCH_CLIENTS" >"$lg" 2>&1
      tp=$(awk '/^Throughput/{print $2}' "$lg")
      errs=$(grep -c -i 'error' "$lg")
      record "$s" "$L_DB" "$t" "$r" "${tp:-FAIL}" MB/s
      if [ -z "$tp" ] || [ "$errs" -gt 0 ]; then
        note "$s: dbench on $t round $r: throughput '${tp:-none}', $errs error lines: $(grep -m1 -i error "$lg" | cut -c1-160) (see $lg)"
      fi
      bounded 300 rm -rf "$d/dbench" ;;
  esac
  # a FUSE target whose daemon died or hangs would fail every later workload slowly: mark it
  if [ -n "${KIND[$t]:-}" ] && ! mount_alive "${TDIR[$t]}"; then
    BROKEN[$t]="mount dead or hung after $wl (round $r)"; note "$s: $t: ${BROKEN[$t]}"
  fi
}

record_mem() {  # label suffix (fs phase / latency phase)
  local t pid hwm
  for t in "${ACTIVE[@]}"; do
    pid=${FPID[$t]:-}; [ -n "$pid" ] || continue
    hwm=$(vmhwm "$pid")
    local name="$t daemon"; [ "$t" = homefs ] && name="netmount"
    [ -n "$hwm" ] && record mem "$name, $1" "$t" 1 "$hwm" MiB
    echo "$t daemon pid $pid ($1): $(grep -E '^(VmHWM|VmRSS|Threads)' "/proc/$pid/status" 2>/dev/null | tr -s ' \t' ' ' | tr '\n' ';')" >>"$LOGS/mem.txt"
  done
  # sshfs double-forks its ssh clients: find them by command line (our ssh_config + sftp)
  local c cmd h sum_d=0 sum_p=0
  for c in /proc/[0-9]*/cmdline; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$c") || continue
    case $cmd in ssh\ *"-F$SSHCFG "*sftp* | ssh\ *"-F $SSHCFG "*sftp*) ;; *) continue ;; esac
    h=$(awk '/^VmHWM/{print $2}' "${c%/cmdline}/status" 2>/dev/null); h=${h:-0}
    if [[ $cmd == *aes128-gcm* ]]; then sum_p=$((sum_p + h)); else sum_d=$((sum_d + h)); fi
  done
  has "${ACTIVE[*]}" sshfs && [ "$sum_d" -gt 0 ] &&
    record mem "sshfs ssh clients (summed), $1" sshfs 1 "$(awk -v k="$sum_d" 'BEGIN{printf "%.1f", k/1024}')" MiB
  has "${ACTIVE[*]}" sshfs_perf && [ "$sum_p" -gt 0 ] &&
    record mem "sshfs_perf ssh clients (summed), $1" sshfs_perf 1 "$(awk -v k="$sum_p" 'BEGIN{printf "%.1f", k/1024}')" MiB
  return 0
}

# run_rounds SEC ROUNDS BASE NFILES TARBALL WORKLOADS
run_rounds() {
  local s=$1 rounds=$2 base=$3 n=$4 tb=$5 wls=$6 t wl r i nt=${#ACTIVE[@]}
  for r in $(seq "$rounds"); do
    local order=()
    for i in $(seq 0 $((nt - 1))); do order+=("${ACTIVE[$(((i + r - 1) % nt))]}"); done
    log "$s round $r/$rounds (order: ${order[*]}; loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
    echo "$s round $r: loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/loadavg.txt"
    for wl in $wls; do
      for t in "${order[@]}"; do run_wl "$s" "$wl" "$t" "$r" "$base" "$n" "$tb"; done
      log "  $wl done"
    done
  done
}

phase_fs() {
  make_tarball "$TARBALL" "$TREE_MAX_FILES"
  FS_TREE="$TREE_FILES files, $TREE_DIRS dirs, $TREE_BYTES bytes"
  set_labels "$NFILES" "$TREE_FILES" "$TREE_MB"
  setup_targets fs "$TARGETS" peer "$SSH_PORT" "${FSD_ADDR##*:}" pb
  [ "${#ACTIVE[@]}" -gt 0 ] || { note "fs: no usable target"; return; }
  local t
  if has "$FS_WORKLOADS" git; then
    log "git repository setup on each target"
    for t in "${ACTIVE[@]}"; do
      if [ -n "${BROKEN[$t]:-}" ]; then record fs "$L_GITSETUP" "$t" 0 FAIL s; continue; fi
      prep_git fs "$t" "${TDIR[$t]}/pb/git" "$TARBALL"; log "  $t: ${LAST_S:-FAIL}s"
    done
  fi
  run_rounds fs "$ROUNDS" pb "$NFILES" "$TARBALL" "$FS_WORKLOADS"
  record_mem "fs phase"
  for t in "${ACTIVE[@]}"; do [ -z "${BROKEN[$t]:-}" ] && bounded 300 rm -rf "${TDIR[$t]}/pb" 2>>"$CMDLOG"; done
  unmount_all
}

phase_latency() {
  make_tarball "$LAT_TARBALL" "$LAT_TREE_MAX_FILES"
  LAT_TREE="$TREE_FILES files, $TREE_DIRS dirs, $TREE_BYTES bytes"
  set_labels "$LAT_NFILES" "$TREE_FILES" "$TREE_MB"
  local sport="" fport="" t
  if [ -n "$SSHD_PID" ]; then
    start_relay "$SSH_PORT" ssh; sport=$RELAY_PORT
    [ -n "$sport" ] || note "latency: the relay in front of sshd did not start (see $LOGS/relay-ssh.log)"
    if [ -n "$sport" ]; then
      echo "[127.0.0.1]:$sport $(cut -d' ' -f1,2 "$SSHDIR/host_ed25519.pub")" >>"$SSHDIR/known_hosts"
      printf 'Host peerlat\n  Port %s\n' "$sport" >>"$SSHCFG"
    fi
  fi
  if [ "$HOMEFS_OK" = 1 ] && has "$LAT_TARGETS" homefs; then
    start_relay "${FSD_ADDR##*:}" fsd; fport=$RELAY_PORT
    [ -n "$fport" ] || { note "latency: the relay in front of fsd did not start (see $LOGS/relay-fsd.log)"; HOMEFS_OK=0; }
  fi
  log "latency relays: sshd 127.0.0.1:${sport:-none}, fsd 127.0.0.1:${fport:-none}; ${LAT_DELAY_MS} ms each way"
  # the git repository is made over the fast path (no relay), where the peers' is their backing dir
  if has "$LAT_WORKLOADS" git; then
    for t in $LAT_TARGETS; do
      case $t in
        homefs)
          [ "$HOMEFS_OK" = 1 ] || continue
          local m=$WORK/mnt/latprep-homefs
          mkdir -p "$m"
          if mount_homefs "$m" "${FSD_ADDR##*:}"; then
            bounded 60 mkdir -p "$m/pbl"
            prep_git lat homefs "$m/pbl/git" "$LAT_TARBALL" 0 || note "latency: git repository setup on homefs failed"
            unmount_one "$m" "${FPID[homefs]:-}" homefs; unset "FPID[homefs]"
          fi ;;
        sshfs | sshfs_perf | rclone)
          fresh_fs "$WORK/backing/$t" "$t"
          mkdir -p "$WORK/backing/$t/pbl"
          prep_git lat "$t" "$WORK/backing/$t/pbl/git" "$LAT_TARBALL" 0 || note "latency: git repository setup for $t failed" ;;
      esac
    done
  fi
  local targets=""
  for t in $LAT_TARGETS; do
    case $t in
      homefs) targets+=" $t" ;;
      sshfs | sshfs_perf | rclone) [ -n "$sport" ] && targets+=" $t" ;;
      *) note "latency: $t has no network to delay; skipped" ;;
    esac
  done
  # rclone reads its port from its config, written by setup_targets from the port given here
  setup_targets lat "$targets" peerlat "${sport:-0}" "${fport:-0}" pbl
  [ "${#ACTIVE[@]}" -gt 0 ] || { note "latency: no usable target"; return; }
  # git's index was written by another view of the files (the disk itself for the peers, another
  # mount for homefs): inode numbers and owners may differ from what this mount shows, and then
  # the first status reads every file again. One untimed status through each target first, so
  # that the timed ones measure a repository in use (as the fs phase, where the same mount made it).
  if has "$LAT_WORKLOADS" git; then
    for t in "${ACTIVE[@]}"; do
      [ -z "${BROKEN[$t]:-}" ] && [ -d "${TDIR[$t]}/pbl/git/.git" ] &&
        bounded "$WL_TIMEOUT" git -C "${TDIR[$t]}/pbl/git" status --porcelain >/dev/null 2>>"$CMDLOG"
    done
  fi
  run_rounds lat "$LAT_ROUNDS" pbl "$LAT_NFILES" "$LAT_TARBALL" "$LAT_WORKLOADS"
  record_mem "latency phase"
  unmount_all
}

# ---------------------------------------------------------------- transfers
rss_of() {  # file: peak RSS in MiB written by /usr/bin/time -f %M (KiB)
  awk 'END{ if ($1 ~ /^[0-9]+$/) printf "%.1f", $1/1024 }' "$1" 2>/dev/null
}

# xfer_netcp LABEL ROUND MEMLABEL ARGS... : time one netcp run, record MB/s if MB given, and its RSS
xfer_netcp() {
  local wl=$1 r=$2 ml=$3 rf=$LOGS/netcp-rss.txt; shift 3
  local pre=()
  [ -x /usr/bin/time ] && pre=(/usr/bin/time -f %M -o "$rf")
  rm -f "$rf"
  if [ "$HOMEFS_OK" != 1 ]; then record xfer "$wl" netcp "$r" FAIL s; return 1; fi
  measure xfer "$wl" netcp "$r" "${pre[@]}" "$BIN/netcp" --fingerprint "$FP" "$@" || return 1
  local m; m=$(rss_of "$rf"); [ -n "$m" ] && record mem "$ml" netcp "$r" "$m" MiB
  return 0
}

phase_xfer() {
  local X=$WORK/xfer R r tool ft
  R=$X/remote
  fresh_fs "$X" xfer $((FS_IMG_MB + XFER_MB * 3))
  mkdir -p "$X/src" "$R" "$X/dl"
  log "preparing transfer sources"
  "$PY" "$HELP" seqwrite "$X/src/big.bin" "$XFER_MB" 0
  "$PY" "$HELP" mkfiles "$X/src/tree" "$XFER_FILES" "$NDIRS" "$SMALL_SIZE"
  cp "$X/src/big.bin" "$R/big_src.bin"; cp -a "$X/src/tree" "$R/tree_src"; sync
  local H="$HOMEFS_USER@127.0.0.1:${FSD_ADDR##*:}"
  if has "$XFER_TOOLS" netcp && [ "$HOMEFS_OK" = 1 ]; then  # the sources of the gets, untimed
    bounded "$WL_TIMEOUT" "$BIN/netcp" --fingerprint "$FP" "$X/src/big.bin" "$H:big_src.bin" >>"$LOGS/netcp.log" 2>&1 ||
      note "xfer: netcp put of the get source big_src.bin failed: $(tail -n1 "$LOGS/netcp.log" | cut -c1-200)"
    bounded "$WL_TIMEOUT" "$BIN/netcp" --fingerprint "$FP" -r -j "$NETCP_JOBS" "$X/src/tree" "$H:tree_src" >>"$LOGS/netcp.log" 2>&1 ||
      note "xfer: netcp -r put of the get source tree_src failed: $(tail -n1 "$LOGS/netcp.log" | cut -c1-200)"
  fi
  local E="ssh -F $SSHCFG" SCPO=(-q -F "$SSHCFG")
  local UP="upload ${XFER_MB} MiB file" DN="download ${XFER_MB} MiB file"
  local UPT="upload tree ${XFER_FILES} x ${SMALL_SIZE} B / ${NDIRS} dirs (netcp -r -j ${NETCP_JOBS}, scp -r, rsync -a)"
  local DNT="download that tree"
  local tools=() t
  for t in $XFER_TOOLS; do
    case $t in netcp) tools+=("$t") ;; scp | scp_aes128gcm | rsync) [ -n "$SSHD_PID" ] && tools+=("$t") ;; esac
  done
  local nt=${#tools[@]}
  [ "$nt" -gt 0 ] || { note "xfer: no usable tool"; return; }
  for r in $(seq "$ROUNDS"); do
    log "transfer round $r/$ROUNDS (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
    echo "xfer round $r: loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/loadavg.txt"
    local o=$(((r - 1) % nt)) order
    order=("${tools[@]:$o}" "${tools[@]:0:$o}")
    for tool in "${order[@]}"; do
      # Every tool writes into the blocks the previous round's upload freed: the peers' up.bin is
      # removed on the server's disk, and so is netcp's (under fsd, which then counts it against
      # the quota until it restarts: harmless under the bench's 50G). A new name per round made
      # netcp's uploads land on never-written blocks of the loop image, slower to allocate.
      rm -f "$R/up.bin" "$FSDDIR/homes/$HOMEFS_USER/up.bin"; sync
      ft=$tool
      case $tool in
        netcp) xfer_netcp "$UP" "$r" "netcp put/get of the big file" --no-resume "$X/src/big.bin" "$H:up.bin" ;;
        scp) measure xfer "$UP" scp "$r" scp "${SCPO[@]}" "$X/src/big.bin" "peer:$R/up.bin" ;;
        scp_aes128gcm) ft="scp (aes128-gcm)"; measure xfer "$UP" "$ft" "$r" scp "${SCPO[@]}" -o Ciphers=aes128-gcm@openssh.com "$X/src/big.bin" "peer:$R/up.bin" ;;
        rsync) measure xfer "$UP" rsync "$r" rsync -e "$E" "$X/src/big.bin" "peer:$R/up.bin" ;;
      esac && record xfer "↳ $UP (MB/s)" "$ft" "$r" "$(mbps "$XFER_MB" "$LAST_S")" MB/s
    done
    for tool in "${order[@]}"; do
      rm -f "$X/dl/big.bin"; sync
      ft=$tool
      case $tool in
        netcp) xfer_netcp "$DN" "$r" "netcp put/get of the big file" "$H:big_src.bin" "$X/dl/big.bin" ;;
        scp) measure xfer "$DN" scp "$r" scp "${SCPO[@]}" "peer:$R/big_src.bin" "$X/dl/big.bin" ;;
        scp_aes128gcm) ft="scp (aes128-gcm)"; measure xfer "$DN" "$ft" "$r" scp "${SCPO[@]}" -o Ciphers=aes128-gcm@openssh.com "peer:$R/big_src.bin" "$X/dl/big.bin" ;;
        rsync) measure xfer "$DN" rsync "$r" rsync -e "$E" "peer:$R/big_src.bin" "$X/dl/big.bin" ;;
      esac && record xfer "↳ $DN (MB/s)" "$ft" "$r" "$(mbps "$XFER_MB" "$LAST_S")" MB/s
      if [ "$tool" = netcp ] && [ "$r" = 1 ] && [ -f "$X/dl/big.bin" ] && ! cmp -s "$X/src/big.bin" "$X/dl/big.bin"; then
        note "xfer: the file netcp downloaded differs from the source"
      fi
    done
    for tool in "${order[@]}"; do
      rm -rf "$R/tree_up" "$FSDDIR/homes/$HOMEFS_USER/tree_up"; sync  # as for up.bin
      case $tool in
        netcp) xfer_netcp "$UPT" "$r" "netcp -r -j $NETCP_JOBS, tree" --no-resume -r -j "$NETCP_JOBS" "$X/src/tree" "$H:tree_up" ;;
        scp) measure xfer "$UPT" scp "$r" scp -r "${SCPO[@]}" "$X/src/tree" "peer:$R/tree_up" ;;
        rsync) measure xfer "$UPT" rsync "$r" rsync -a -e "$E" "$X/src/tree/" "peer:$R/tree_up/" ;;
      esac
    done
    for tool in "${order[@]}"; do
      rm -rf "$X/dl/tree"; sync
      case $tool in
        netcp) xfer_netcp "$DNT" "$r" "netcp -r -j $NETCP_JOBS, tree" -r -j "$NETCP_JOBS" "$H:tree_src" "$X/dl/tree" ;;
        scp) measure xfer "$DNT" scp "$r" scp -r "${SCPO[@]}" "peer:$R/tree_src" "$X/dl/tree" ;;
        rsync) measure xfer "$DNT" rsync "$r" rsync -a -e "$E" "peer:$R/tree_src/" "$X/dl/tree/" ;;
      esac
      if [ "$tool" = netcp ] && [ "$r" = 1 ] && [ -d "$X/dl/tree" ]; then
        local got; got=$(find "$X/dl/tree" -type f | wc -l)
        [ "$got" = "$XFER_FILES" ] || note "xfer: netcp -r download brought $got files, expected $XFER_FILES"
      fi
    done
  done
  rm -rf "${X:?}"/*
}

# ---------------------------------------------------------------- report
vers() { "$@" 2>&1 | head -1; }
write_meta() {
  {
    echo "## homefs against its peers — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r). homefs at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')."
    echo "Mode: QUICK=$QUICK, ROUNDS=$ROUNDS (latency: $LAT_ROUNDS), BIG_MB=$BIG_MB, RAND_IOS=$RAND_IOS, NFILES=$NFILES in $NDIRS dirs of $SMALL_SIZE B, dbench $DBENCH_CLIENTS clients x ${DBENCH_TIME}s, XFER_MB=$XFER_MB, XFER_FILES=$XFER_FILES, netcp -j $NETCP_JOBS. drop_caches permitted: $([ "$DROP_OK" = 1 ] && echo yes || echo NO)."
    echo "Tree: $TREE_SRC (excluding '$TREE_EXCLUDE' and symlinks): ${FS_TREE:-not used} (latency phase: ${LAT_TREE:-not used}; latency create: $LAT_NFILES files)."
    echo "Targets: homefs = fsd (release build, loopback TLS) + netmount ${NETMOUNT_OPTS:-(default options)}; sshfs = defaults (ssh cipher ${SSH_CIPHER:-?}); sshfs_perf = -o $SSHFS_PERF_OPTS; rclone = rclone mount over sftp, --vfs-cache-mode $RCLONE_CACHE_MODE; bindfs = bindfs ${BINDFS_OPTS:-defaults} over a local dir; local = plain dir. $([ "${#FRESH[@]}" -gt 0 ] && echo "Each target's backing directory (fsd's storage root for homefs) and the transfers' directory on a fresh ext4 of its own (${FS_IMG_MB} MiB sparse image, loop device with direct I/O), all on the same disk" || echo "All in plain directories on the same file system"); private sshd on 127.0.0.1:$SSH_PORT."
    echo "Latency profile: scripts/bench/relay.py delays every chunk ${LAT_DELAY_MS} ms in each direction (RTT $((LAT_DELAY_MS * 2)) ms), in front of fsd and sshd."
    echo "Versions: $(sshfs -V 2>&1 | grep -m1 '^SSHFS'), $(sshfs -V 2>&1 | grep -m1 'FUSE library'); $(ssh -V 2>&1); $(rclone version 2>/dev/null | head -1); $(vers bindfs --version); $(vers fio --version); rsync $(rsync --version 2>/dev/null | head -1 | awk '{print $3}'); $(vers git --version); dbench $(dpkg-query -W -f '${Version}' dbench 2>/dev/null); $(vers "$PY" --version)."
    echo "Method: wall time of each command (bash EPOCHREALTIME); 'cold' = sync + echo 3 > /proc/sys/vm/drop_caches before the command, then the command's program run once with --version (its binary back in memory; user-space caches of the FUSE daemons are not dropped). Writes: python, 1 MiB writes of random data + fsync; reads: dd bs=1M; small files: python, one write each; tar x --no-same-owner, no fsync. Transfers: warm page cache, no fsync by scp and rsync (netcp syncs once at the end), include connection setup and login (argon2 for netcp, ssh keys for scp/rsync); netcp verifies BLAKE3 end to end, scp and rsync do not."
    echo
    [ -s "$WORK/loadavg.txt" ] && { echo "Load average at the start of each round: $(tr '\n' ';' <"$WORK/loadavg.txt" | sed 's/;$//; s/;/; /g')."; echo; }
  } >"$META"
}

main() {
  local T0=$EPOCHREALTIME p
  prepare
  log "work dir $WORK; results $RES; table $TABLE_OUT; phases: $PHASES"
  if needs_homefs; then
    build_homefs
    [ "$HOMEFS_OK" = 1 ] && start_fsd
  fi
  if need_sshd; then start_sshd || { stop_pid "$SSHD_PID" sshd; SSHD_PID=; }; fi
  for p in $PHASES; do
    case $p in fs | xfer | latency) log "=== phase $p"; "phase_$p" ;; *) note "unknown phase $p" ;; esac
  done
  [ -n "$FSD_PID" ] && { record_fsd_mem; stop_pid "$FSD_PID" fsd; FSD_PID=; }
  note "total run time $(elapsed "$T0" "$EPOCHREALTIME" | cut -d. -f1) s"
  write_meta
  "$PY" "$HELP" table "$RES" "$META" "$NOTES" >"$TABLE_OUT"
  TABLE_DONE=1
  cat "$TABLE_OUT"
  log "table written to $TABLE_OUT; raw results in $RES; logs in $LOGS"
}

# one line: bash reads a script as it runs it, so an edit to this file during a run cannot
# make it go on past main
main "$@"; exit "$?"
