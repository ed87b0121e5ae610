#!/usr/bin/env python3
"""Workloads and the Markdown table of scripts/bench.sh (its one Python helper).

Subcommands:
  seqwrite PATH MIB [FSYNC=1]        write MIB MiB of random data in 1 MiB writes, fsync at the end
  mkfiles ROOT N NDIRS SIZE          create N files of SIZE bytes spread over NDIRS directories
  fiojson FILE read_iops             print a figure from fio's JSON output
  table RESULTS.tsv [META] [NOTES]   render the Markdown table from the results file

RESULTS.tsv has one measurement a line: section, workload, target, round, value (or FAIL), unit.
Sections: fs (workloads on the mounts), lat (the same through the latency relay), lat_rt (chunks
sent through the relay per workload), xfer (transfers), mem (peak resident memory, MiB); any other
section (e.g. fs_aux: fio's wall time) stays in the file and out of the table.
"""
import collections
import json
import os
import statistics
import sys


def seqwrite(path, mib, do_fsync="1"):
    """O_WRONLY|O_CREAT|O_TRUNC, 1 MiB writes of incompressible data, one fsync at the end."""
    m = 1 << 20
    buf = memoryview(os.urandom(16 * m))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(int(mib)):
            chunk = buf[(i % 16) * m:(i % 16 + 1) * m]
            while len(chunk):
                chunk = chunk[os.write(fd, chunk):]
        if do_fsync == "1":
            os.fsync(fd)
    finally:
        os.close(fd)


def mkfiles(root, n, ndirs, size):
    """N files of SIZE bytes in NDIRS directories under ROOT (created), one write each."""
    n, ndirs, size = int(n), int(ndirs), int(size)
    pool = os.urandom(size * 64)
    os.mkdir(root)
    for d in range(ndirs):
        os.mkdir(os.path.join(root, "d%03d" % d))
    for i in range(n):
        p = os.path.join(root, "d%03d" % (i % ndirs), "f%05d" % i)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            data = memoryview(pool)[(i % 64) * size:(i % 64 + 1) * size]
            while len(data):
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)


def fiojson(path, key):
    txt = open(path).read()
    job = json.loads(txt[txt.index("{"):])["jobs"][0]
    if key == "read_iops":
        print("%.1f" % job["read"]["iops"])
    else:
        raise SystemExit("unknown fio key %s" % key)


# ------------------------------------------------------------------ table

# Column order of the filesystem tables; only targets that have results are shown.
FS_COLS = ["homefs", "sshfs", "sshfs_perf", "rclone", "bindfs", "local"]
FS_PEERS = ["sshfs", "sshfs_perf", "rclone"]
XFER_COLS = ["netcp", "scp", "scp (aes128-gcm)", "rsync"]
XFER_PEERS = ["scp", "scp (aes128-gcm)", "rsync"]


def fmt(v):
    a = abs(v)
    if a >= 1000:
        return "%.0f" % v
    if a >= 100:
        return "%.1f" % v
    if a >= 1:
        return "%.2f" % v
    return "%.3f" % v


def cell(rounds):
    vals = [float(v) for v in rounds.values() if v != "FAIL"]
    fails = sum(1 for v in rounds.values() if v == "FAIL")
    if not vals:
        return "FAIL" if fails else "–"
    s = fmt(vals[0]) if len(vals) == 1 else "%s (%s–%s)" % (
        fmt(statistics.median(vals)), fmt(min(vals)), fmt(max(vals)))
    if fails:
        s += " [%d FAIL]" % fails
    return s


def speedup(ours, theirs, unit):
    """How many times faster `ours` is than `theirs` (>1: ours faster), or None."""
    if ours in (None, "FAIL") or theirs in (None, "FAIL"):
        return None
    o, t = float(ours), float(theirs)
    if unit == "s":
        return t / o if o > 0 else None
    return o / t if t > 0 else None


def ratio_median(per, ours, peers, unit):
    """Median over rounds of the speed-up of `ours` against the best of `peers` in that round."""
    rs = []
    for rd, v in per.get(ours, {}).items():
        best = None
        for p in peers:
            s = speedup(v, per.get(p, {}).get(rd), unit)
            if s is not None and (best is None or s < best):
                best = s  # the best peer is the one we beat by the least
        if best is not None:
            rs.append(best)
    if rs:
        return statistics.median(rs)
    if per.get(ours) and all(v == "FAIL" for v in per[ours].values()):
        return "FAIL"
    return None


def show_ratio(r):
    if r is None:
        return "–"
    if r == "FAIL":
        return "FAIL"
    return "%.2f×" % r


def goal_of(sec, wl, unit):
    """The issue-6 goal for a row: (text, check) where check(per) -> bool or None."""
    def at_least(factor, peers, label):
        def check(per):
            r = ratio_median(per, "homefs" if sec != "xfer" else "netcp", peers, unit)
            return None if r is None else (r != "FAIL" and r >= factor)
        return ("≥%g× %s" % (factor, label), check)

    if sec == "xfer":
        if "tree" in wl:
            return at_least(2, ["rsync"], "rsync")
        return at_least(1.5, ["scp (aes128-gcm)"], "scp aes128-gcm")
    if sec == "lat":
        return at_least(3, ["sshfs"], "sshfs")
    w = wl.lower()
    if w.startswith("seq write"):
        def check(per):
            r = ratio_median(per, "homefs", ["local"], unit)
            return None if r is None else (r != "FAIL" and r >= 1 / 1.3)
        return ("≤1.3× local", check)
    if w.startswith("seq read"):
        return at_least(2, ["sshfs_perf"], "sshfs_perf")
    if w.startswith("rand 4k"):
        return at_least(2, ["sshfs"], "sshfs")
    if w.startswith("git status, cold"):
        return at_least(10, ["sshfs"], "sshfs")
    if w.startswith(("create", "ls -lr", "find", "rm -rf", "tar x", "dbench")):
        return at_least(3, ["sshfs"], "sshfs")
    return at_least(1, FS_PEERS, "best peer")


def table(tsv, meta=None, notes=None):
    data = collections.OrderedDict()  # section -> workload -> target -> round -> value
    units = {}
    for line in open(tsv):
        if not line.strip() or line.startswith("#"):
            continue
        sec, wl, tg, rd, val, unit = line.rstrip("\n").split("\t")
        data.setdefault(sec, collections.OrderedDict()).setdefault(wl, collections.OrderedDict()) \
            .setdefault(tg, collections.OrderedDict())[rd] = val
        units[(sec, wl)] = unit
    out = []
    if meta and os.path.exists(meta):
        out.append(open(meta).read().rstrip() + "\n")
    titles = {
        "fs": "Filesystem workloads on loopback (seconds unless stated; median (min–max) over rounds)",
        "lat": "Metadata workloads through the latency relay (seconds unless stated; median (min–max))",
        "xfer": "Transfers (seconds unless stated; median (min–max) over rounds)",
    }
    ratio_note = ("Speed-up columns: median over rounds of the per-round ratio, >1 means %s is faster "
                  "(time ratio for seconds, rate ratio for MB/s and IOPS); 'best peer' is the fastest of "
                  "%s in that round.")
    for sec in ["fs", "lat", "xfer"]:
        if sec not in data:
            continue
        present = {tg for per in data[sec].values() for tg in per}
        if sec == "xfer":
            cols = [c for c in XFER_COLS if c in present] + sorted(present - set(XFER_COLS))
            ours, peers, rname = "netcp", XFER_PEERS, "netcp/scp (aes128-gcm)"
            ref = "scp (aes128-gcm)"
        else:
            cols = [c for c in FS_COLS if c in present] + sorted(present - set(FS_COLS))
            ours, peers, rname, ref = "homefs", FS_PEERS, "homefs/sshfs", "sshfs"
        out.append("### " + titles[sec] + "\n")
        out.append(ratio_note % (ours, ", ".join(peers)) + "\n")
        head = ["workload"] + cols + [rname + " speed-up", ours + "/best peer", "goal (issue 6)"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---" * len(head) + "|")
        for wl, per in data[sec].items():
            unit = units[(sec, wl)]
            row = [cell(per.get(c, {})) for c in cols]
            if sec == "xfer" and "tree" in wl:
                rref = ratio_median(per, ours, ["rsync"], unit)
            else:
                rref = ratio_median(per, ours, [ref], unit)
            rbest = ratio_median(per, ours, peers, unit)
            if wl.startswith("↳") or "(once" in wl:
                gtxt = ""
            else:
                text, check = goal_of(sec, wl, unit)
                ok = check(per)
                beat = rbest not in (None, "FAIL") and rbest >= 1
                gtxt = text + (" –" if ok is None else (" ✓" if ok and beat else " ✗"))
            label = wl if unit in ("s", "count") or ("(" + unit) in wl else "%s [%s]" % (wl, unit)
            out.append("| " + " | ".join([label] + row + [show_ratio(rref), show_ratio(rbest), gtxt]) + " |")
        out.append("")
    if "lat_rt" in data:
        present = {tg for per in data["lat_rt"].values() for tg in per}
        cols = [c for c in FS_COLS if c in present]
        out.append("### Round trips: chunks each client sent through the latency relay per workload "
                   "(median over rounds; about one per round trip for serial operations)\n")
        out.append("| workload | " + " | ".join(cols) + " | homefs/sshfs |")
        out.append("|---" * (len(cols) + 2) + "|")
        for wl, per in data["lat_rt"].items():
            med = {c: statistics.median([float(v) for v in per.get(c, {}).values()]) for c in cols if per.get(c)}
            row = ["%.0f" % med[c] if c in med else "–" for c in cols]
            ratio = "%.2f" % (med["homefs"] / med["sshfs"]) if med.get("sshfs") and "homefs" in med else "–"
            out.append("| " + " | ".join([wl] + row + [ratio]) + " |")
        out.append("")
    if "mem" in data:
        out.append("### Peak resident memory (VmHWM, or ru_maxrss for netcp), MiB\n")
        out.append("| process | peak RSS (MiB) | goal (issue 6) |")
        out.append("|---|---|---|")
        for wl, per in data["mem"].items():
            vals = [float(v) for rounds in per.values() for v in rounds.values() if v != "FAIL"]
            v = "%.1f" % max(vals) if vals else "FAIL"
            goal = ""
            if wl.startswith(("netmount", "fsd")):
                goal = "< 64 MiB" + ("" if not vals else (" ✓" if max(vals) < 64 else " ✗"))
            out.append("| %s | %s | %s |" % (wl, v, goal))
        out.append("")
    if notes and os.path.exists(notes) and os.path.getsize(notes):
        out.append("### Notes\n")
        out.append(open(notes).read().rstrip() + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"seqwrite": seqwrite, "mkfiles": mkfiles, "fiojson": fiojson, "table": table}[cmd](*args)
