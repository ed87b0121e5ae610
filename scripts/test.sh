#!/usr/bin/env bash
# scripts/test.sh: the one test command of homefs (the README's "Tests"; .ci/run runs exactly this).
#
#   scripts/test.sh [CARGO TEST ARGS...]     e.g. scripts/test.sh -p homefs-tests --test e2e -- mount
#
# 1. Installs what the tests use and the machine lacks, when it can: as root, with apt-get, only the
#    missing ones of fuse3 (fusermount3), sqlite3, git, util-linux (script, flock); the file system
#    exerciser `fsx` from crates.io into target/tools (put on PATH). Without root it says what to
#    install and goes on.
# 2. Builds the binaries the end-to-end tests run (fsd, netmount, netcp): `cargo test` alone does not
#    build another package's binaries.
# 3. Runs `cargo test --workspace` with the arguments given (without --workspace when they choose
#    packages with -p).
#
# Tests that need FUSE skip, saying why, when /dev/fuse or fusermount3 is missing; with
# HOMEFS_REQUIRE_FUSE=1 (as CI sets) they fail instead.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root_dir=$PWD

say() { printf 'test.sh: %s\n' "$*" >&2; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# --- 1. system packages -------------------------------------------------------------------------
# tool the tests run -> the Debian package that has it
declare -A package_of=(
    [fusermount3]=fuse3
    [sqlite3]=sqlite3
    [git]=git
    [script]=util-linux
    [flock]=util-linux
)
missing=()
for tool in fusermount3 sqlite3 git script flock; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        pkg=${package_of[$tool]}
        [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if is_root && command -v apt-get >/dev/null 2>&1; then
        say "installing missing packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! timeout 900 apt-get update -qq || ! timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
            say "could not install ${missing[*]}; tests that need them will skip or fail"
        fi
    else
        say "missing: ${missing[*]}. Install with: sudo apt-get install -y ${missing[*]}"
        say "running the tests anyway; the ones that need these skip (or fail under HOMEFS_REQUIRE_FUSE=1)"
    fi
fi

if [ ! -e /dev/fuse ]; then
    say "/dev/fuse is missing (try: sudo modprobe fuse): FUSE tests will skip, or fail under HOMEFS_REQUIRE_FUSE=1"
elif ! is_root && ! command -v fusermount3 >/dev/null 2>&1; then
    say "fusermount3 is missing (package fuse3): FUSE tests will skip, or fail under HOMEFS_REQUIRE_FUSE=1"
fi

# --- fsx, the file system exerciser (crates.io) ---------------------------------------------------
tools_dir=$root_dir/target/tools
if [ ! -x "$tools_dir/bin/fsx" ]; then
    say "installing fsx into target/tools (cargo install fsx --locked)"
    if ! timeout 1800 cargo install fsx --locked --root "$tools_dir"; then
        say "could not install fsx; the fsx test will skip (or fail under HOMEFS_REQUIRE_FUSE=1)"
    fi
fi
export PATH="$tools_dir/bin:$PATH"

# --- 2. the binaries the end-to-end tests start ---------------------------------------------------
# Same profile as the tests: release only if the caller asked for it. The whole workspace unless
# the caller chose packages (cargo would ignore -p next to --workspace).
profile=()
scope=(--workspace)
for arg in "$@"; do
    case $arg in
        --) break ;;
        --release) profile=(--release) ;;
        -p | -p?* | --package | --package=* | --workspace | --all) scope=() ;;
    esac
done
say "building fsd, netmount, netcp"
cargo build --workspace --bins "${profile[@]}"

# --- 3. the tests ---------------------------------------------------------------------------------
say "cargo test ${scope[*]} $*"
exec cargo test "${scope[@]}" "$@"
