#!/usr/bin/env bash
# scripts/quickstart.sh: the README's first command. A homefs server with a demo user on the
# default settings, that user's home mounted at ./homefs-demo/mnt, what to try, and a clean stop.
#
#   scripts/quickstart.sh             run until Ctrl-C, then unmount and stop the server
#   scripts/quickstart.sh --no-wait   leave both running and print how to stop them
#   scripts/quickstart.sh --stop      stop what an earlier --no-wait left running
#
# What it does: builds the release binaries (cargo build --release); installs fuse3 if it is
# missing and we are root (else says what to install); makes ./homefs-demo/ (reused when there):
# `fsd init homefs-demo/server --listen 127.0.0.1:7373`, user `demo` with password `demo`; starts
# `fsd serve` in the background (log: homefs-demo/fsd.log), waits for its "listening on" and
# "fingerprint" lines, and mounts with netmount. Without FUSE it still starts the server and shows
# how to use netcp instead. Every way out (Ctrl-C, an error, the server dying) unmounts and stops
# the server, unless --no-wait asked to leave them running.
set -euo pipefail

usage() { sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

mode="wait"
case "${1:-}" in
    "") ;;
    --no-wait) mode=no-wait ;;
    --stop) mode=stop ;;
    -h | --help) usage; exit 0 ;;
    *) echo "quickstart: unknown option $1" >&2; usage >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root_dir=$PWD
demo=homefs-demo
server_dir=$demo/server
config=$server_dir/fsd.toml
mnt=$demo/mnt
log=$demo/fsd.log
pid_file=$demo/fsd.pid
listen=127.0.0.1:7373
target_dir=${CARGO_TARGET_DIR:-$root_dir/target}
[[ $target_dir = /* ]] || target_dir=$root_dir/$target_dir
bin=$target_dir/release
# Bounds on every wait: the server's start (it scans the demo home), netmount (it returns once the
# mount is ready), an unmount, and the server's clean stop (its shutdown_timeout_secs is 30).
start_timeout=30
mount_timeout=60
unmount_timeout=30
stop_timeout=40

say() { printf '%s\n' "$*"; }
warn() { printf 'quickstart: %s\n' "$*" >&2; }
die() { warn "$*"; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
is_mounted() { grep -qs " $(realpath -m "$1") fuse" /proc/mounts; }
# A zombie is not alive: it has exited and waits to be reaped.
is_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"; }

# Unmounts the demo mount, if mounted: netmount -u, then fusermount3 -u as a fallback (also for a
# mount whose daemon died), each bounded.
unmount_demo() {
    is_mounted "$mnt" || return 0
    say "unmounting $mnt"
    if [ -x "$bin/netmount" ] && timeout "$unmount_timeout" "$bin/netmount" -u "$root_dir/$mnt"; then
        return 0
    fi
    timeout "$unmount_timeout" fusermount3 -u "$root_dir/$mnt" 2>/dev/null ||
        timeout "$unmount_timeout" fusermount3 -uz "$root_dir/$mnt" 2>/dev/null ||
        warn "could not unmount $mnt: try 'fusermount3 -u $mnt'"
}

# Stops the demo server with SIGTERM (it finishes in-flight writes, then exits), bounded; SIGKILL
# only if it does not stop in time.
stop_server() {
    local pid=${1:-}
    is_alive "$pid" || { rm -f "$pid_file"; return 0; }
    say "stopping fsd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + stop_timeout))
    while is_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if is_alive "$pid"; then
        warn "fsd did not stop within ${stop_timeout}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

# The pid of a demo server an earlier run left running, if it is still that server.
previous_server() {
    local pid
    pid=$(cat "$pid_file" 2>/dev/null) || return 0
    if is_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "fsd serve --config $root_dir/$config"; then
        echo "$pid"
    fi
}

if [ "$mode" = stop ]; then
    unmount_demo
    stop_server "$(previous_server)"
    say "homefs demo stopped (its files stay in $demo/)"
    exit 0
fi

# --- build ----------------------------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust from https://rustup.rs, then run this again"
say "== building release binaries (cargo build --release; the first build takes a few minutes)"
cargo build --release
for b in fsd netmount netcp; do
    [ -x "$bin/$b" ] || die "$bin/$b was not built"
done

# --- FUSE: can we mount? -------------------------------------------------------------------------
fuse_reason=""
if ! command -v fusermount3 >/dev/null 2>&1; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        say "== installing fuse3 (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        { timeout 600 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends fuse3; } ||
            warn "apt-get install fuse3 failed"
    fi
    command -v fusermount3 >/dev/null 2>&1 || fuse_reason="fusermount3 is missing: install it with 'sudo apt-get install fuse3'"
fi
if [ -z "$fuse_reason" ] && [ ! -e /dev/fuse ]; then
    is_root && { modprobe fuse 2>/dev/null || true; }
    [ -e /dev/fuse ] || fuse_reason="/dev/fuse is missing: load the module with 'sudo modprobe fuse' (in a container, pass --device /dev/fuse)"
fi

# --- the demo instance ----------------------------------------------------------------------------
# A server from an earlier --no-wait run would hold the port: stop it and start afresh.
old=$(previous_server)
if [ -n "$old" ]; then
    say "== stopping the demo an earlier run left running"
    unmount_demo
    stop_server "$old"
fi
unmount_demo # a mount left behind by a daemon that died

mkdir -p "$demo" "$mnt"
if [ ! -f "$config" ]; then
    say "== fsd init $server_dir --listen $listen"
    "$bin/fsd" init "$root_dir/$server_dir" --listen "$listen"
else
    say "== reusing $server_dir"
fi
users_file=$server_dir/users.toml
if ! grep -qsE '^\[users\.("demo"|demo)\]' "$users_file"; then
    say "== adding user demo (password: demo)"
    printf 'demo\n' | "$bin/fsd" user add demo --password-stdin --config "$root_dir/$config"
fi

# From here on every exit cleans up, unless --no-wait succeeded.
fsd_pid=""
mounted_by_us=0
leave_running=0
# shellcheck disable=SC2317 # called by the traps
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$leave_running" = 1 ]; then
        exit "$status"
    fi
    [ "$mounted_by_us" = 1 ] && unmount_demo
    stop_server "$fsd_pid"
    case $status in
        0 | 130 | 143) ;;
        *) warn "stopped after an error; the server's log is $log" ;;
    esac
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "== starting fsd serve --config $config (log: $log)"
: >"$log"
# setsid: its own session, so a Ctrl-C in this terminal reaches only this script, which then stops
# the server in order (unmount first); with --no-wait it outlives the terminal.
setsid "$bin/fsd" serve --config "$root_dir/$config" >>"$log" 2>&1 </dev/null &
fsd_pid=$!
echo "$fsd_pid" >"$pid_file"

# fsd prints "listening on ADDR" and "fingerprint SHA256:..." once it accepts connections.
deadline=$((SECONDS + start_timeout))
addr="" fingerprint=""
while [ -z "$fingerprint" ]; do
    is_alive "$fsd_pid" || { tail -n 20 "$log" >&2; die "fsd exited before it was ready (log above, in $log)"; }
    ((SECONDS < deadline)) || { tail -n 20 "$log" >&2; die "fsd printed no 'listening on' and 'fingerprint' lines within ${start_timeout}s"; }
    addr=$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$log" | head -n 1)
    fingerprint=$(sed -n 's/^fingerprint \(SHA256:[^ ]*\).*/\1/p' "$log" | head -n 1)
    if [ -z "$addr" ] || [ -z "$fingerprint" ]; then
        fingerprint=""
        sleep 0.1
    fi
done
say "fsd is listening on $addr, certificate $fingerprint"

remote=demo@$addr
if [ -z "$fuse_reason" ]; then
    say "== netmount $remote $mnt --fingerprint $fingerprint"
    if HOMEFS_PASSWORD=demo timeout "$mount_timeout" "$bin/netmount" "$remote" "$root_dir/$mnt" --fingerprint "$fingerprint"; then
        mounted_by_us=1
        is_mounted "$mnt" || die "netmount returned 0 but $mnt is not mounted"
    else
        die "netmount failed (see above; the server's log is $log)"
    fi
fi

# --- what to try ----------------------------------------------------------------------------------
rel_bin=${bin#"$root_dir"/}
cat <<EOF

homefs demo is running: server $addr, user demo, password demo.
EOF
if [ "$mounted_by_us" = 1 ]; then
    cat <<EOF
demo's home is mounted at $mnt. Try, in another terminal, from $root_dir:

  ls -la $mnt
  cp README.md $mnt/ && cat $mnt/README.md | head -n 3
  mkdir -p $mnt/a/b && cp -r shared $mnt/a/b/ && ls -lR $mnt/a | head
  df -h $mnt                  # size = demo's quota
  echo hello >>$mnt/notes.txt && cat $mnt/notes.txt
EOF
else
    cat <<EOF
Not mounted: $fuse_reason.
Use netcp instead (it needs no FUSE):
EOF
fi
cat <<EOF

Verified transfers with netcp (the password comes from HOMEFS_PASSWORD, never from argv):

  export HOMEFS_PASSWORD=demo
  $rel_bin/netcp --fingerprint $fingerprint README.md $remote:readme.md
  $rel_bin/netcp --fingerprint $fingerprint $remote:readme.md /tmp/readme-back.md
  $rel_bin/netcp -r --fingerprint $fingerprint shared $remote:shared-copy
  $rel_bin/netcp shell --fingerprint $fingerprint $remote      # ls, cd, get, put, help, exit

The server's log: $log; demo's files on the server: $server_dir/homes/demo
EOF

if [ "$mode" = no-wait ]; then
    leave_running=1
    manual="kill -TERM $fsd_pid"
    [ "$mounted_by_us" = 1 ] && manual="$rel_bin/netmount -u $mnt; $manual"
    cat <<EOF

Left running (fsd pid $fsd_pid). To stop: scripts/quickstart.sh --stop
  (that is: $manual)
EOF
    exit 0
fi

say ""
say "Press Ctrl-C to unmount and stop the server."
# Returns when fsd exits on its own, or at once when a signal arrives (the trap then cleans up).
set +e
wait "$fsd_pid"
status=$?
set -e
fsd_pid=""
warn "fsd exited by itself (status $status); see $log"
exit 1
