#!/usr/bin/env python3
"""leadsync with many businesses (SPEC §11), against the built-in sandbox.

    python3 bench/many.py                 # 1,000 and 10,000 businesses
    python3 bench/many.py --sizes 1000    # one size

For each size N: N businesses with 3 leads each in the sandbox (its own
process, loopback), api.max_requests_per_second = 1000, one conf.d-style
file per business (passed as --config files, the way conf.d merges) and the
same businesses in one file. Measured:

- `config check` wall time, conf.d files and one file (median of 3)
- time from start to READY=1 (a notify socket of our own)
- time until every business has one `ok` pass
- idle CPU of the daemon over 60 s between passes (the head schedule is set
  to every 6 hours so no tick falls in the window), RSS now and peak
- reload: SIGHUP adding one business (an extra file), until the log says
  "configuration reloaded", and until that business has an `ok` pass;
  SIGHUP removing it again
- SIGTERM to exit

The machine's load average is printed with each size: other engineers
compile on the same 2 cores. Results go to stdout and bench/out/many.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "leadsync")
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, deadline, f, every=0.1):
    end = time.monotonic() + deadline
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {deadline}s waiting for {what}")
        time.sleep(every)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def mem_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def count(db, sql):
    try:
        c = sqlite3.connect(db, timeout=10)
        try:
            return c.execute(sql).fetchone()[0]
        finally:
            c.close()
    except sqlite3.Error:
        return 0


def load():
    return "load %.1f/%.1f/%.1f" % os.getloadavg()


def prepare(workdir, n):
    """Sandbox with n + 1 businesses; files for n of them, one held back."""
    port = free_port()
    sb = subprocess.Popen(
        [BIN, "sandbox", "--listen", f"127.0.0.1:{port}", "--businesses", str(n + 1),
         "--leads-per-business", "3", "--write-config", os.path.join(workdir, "sb"), "--static-tokens"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in sb.stdout:
        if "configuration written" in line:
            break
    text = open(os.path.join(workdir, "sb", "leadsync.toml")).read()
    first = text.index("[[businesses]]")
    header, blocks = text[:first], ["[[businesses]]" + b for b in text[first:].split("[[businesses]]")[1:]]
    header = re.sub(r"max_requests_per_second = \d+", "max_requests_per_second = 1000", header)
    header += '[poll]\nschedule = "0 0 */6 * * *"\n'
    main = os.path.join(workdir, "main.toml")
    open(main, "w").write(header)
    confd = os.path.join(workdir, "conf.d")
    os.makedirs(confd)
    files = [main]
    for b in blocks[:n]:
        bid = re.search(r'id = "(\d+)"', b).group(1)
        p = os.path.join(confd, f"{bid}.toml")
        open(p, "w").write(b)
        files.append(p)
    one = os.path.join(workdir, "one.toml")
    open(one, "w").write(header + "".join(blocks[:n]))
    held = blocks[n]
    held_id = re.search(r'id = "(\d+)"', held).group(1)
    extra = os.path.join(workdir, "extra.toml")
    open(extra, "w").write("")
    return sb, files, one, extra, held, held_id


def config_check(args):
    times = []
    for _ in range(3):
        t = time.monotonic()
        r = subprocess.run([BIN] + args + ["config", "check"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        times.append(time.monotonic() - t)
        if r.returncode != 0:
            raise SystemExit(f"config check failed: {r.stderr}")
    warnings = [l for l in r.stdout.splitlines() if l.startswith("# budget") or l.startswith("# warning")]
    return statistics.median(times), warnings


def run_size(n, keep):
    workdir = tempfile.mkdtemp(prefix=f"leadsync-many-{n}-")
    out = {"n": n, "load_before": load()}
    sb, files, one, extra, held, held_id = prepare(workdir, n)
    try:
        db = os.path.join(workdir, "sb", "leadsync.db")
        cargs = []
        for f in files:
            cargs += ["--config", f]
        out["check_confd_s"], warnings = config_check(cargs)
        out["check_one_s"], _ = config_check(["--config", one])
        out["budget"] = warnings

        sock_path = os.path.join(workdir, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(0.05)
        log_path = os.path.join(workdir, "daemon.log")
        log = open(log_path, "w")
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        env.pop("LEADSYNC_LOG", None)
        t0 = time.monotonic()
        d = subprocess.Popen([BIN] + cargs + ["--config", extra, "run"], stderr=log, env=env)

        def ready():
            try:
                return b"READY=1" in sock.recv(4096)
            except socket.timeout:
                return False
        wait_for("READY=1", 300, ready, every=0)
        # Keep reading the socket, as systemd does.
        import threading
        def drain_notify():
            while True:
                try:
                    sock.recv(4096)
                except socket.timeout:
                    pass
                except OSError:
                    return
        threading.Thread(target=drain_notify, daemon=True).start()
        out["ready_s"] = time.monotonic() - t0
        all_ok = f"SELECT count(*) FROM businesses WHERE configured = 1 AND last_sync_outcome = 'ok'"
        wait_for("every business ok", 1800, lambda: count(db, all_ok) >= n, every=0.2)
        out["all_ok_s"] = time.monotonic() - t0
        out["passes"] = count(db, "SELECT count(*) FROM sync_runs")

        time.sleep(3)  # let the last STATUS and lag writes settle
        c0, w0 = cpu_ticks(d.pid), time.monotonic()
        time.sleep(60)
        c1, w1 = cpu_ticks(d.pid), time.monotonic()
        out["idle_cpu_pct"] = 100.0 * (c1 - c0) / CLK / (w1 - w0)
        out["rss_mib"] = mem_kib(d.pid, "VmRSS") / 1024
        out["peak_rss_mib"] = mem_kib(d.pid, "VmHWM") / 1024

        def reloads():
            return open(log_path).read().count("configuration reloaded")
        before = reloads()
        open(extra, "w").write(held)
        t = time.monotonic()
        d.send_signal(signal.SIGHUP)
        wait_for("reload (add)", 300, lambda: reloads() > before, every=0.01)
        out["reload_add_s"] = time.monotonic() - t
        ok_held = f"SELECT count(*) FROM businesses WHERE business_id = '{held_id}' AND last_sync_outcome = 'ok'"
        wait_for("added business synced", 300, lambda: count(db, ok_held) == 1, every=0.02)
        out["added_synced_s"] = time.monotonic() - t
        before = reloads()
        open(extra, "w").write("")
        t = time.monotonic()
        d.send_signal(signal.SIGHUP)
        wait_for("reload (remove)", 300, lambda: reloads() > before, every=0.01)
        out["reload_remove_s"] = time.monotonic() - t
        apply_ms = [int(m) for m in re.findall(r"configuration reloaded.*elapsed_ms=(\d+)", open(log_path).read())]
        out["reload_apply_ms"] = apply_ms

        t = time.monotonic()
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=60)
        out["stop_s"] = time.monotonic() - t
        out["exit"] = d.returncode
        out["load_after"] = load()
    finally:
        sb.terminate()
        sb.wait()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    a = ap.parse_args()
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release")
    results = []
    for n in [int(x) for x in a.sizes.split(",")]:
        print(f"== {n} businesses ({load()})", flush=True)
        r = run_size(n, a.keep)
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    rows = [
        ("config check, one conf.d file each (s)", "check_confd_s", "%.2f"),
        ("config check, one file (s)", "check_one_s", "%.2f"),
        ("start to READY=1 (s)", "ready_s", "%.2f"),
        ("start to every business with one ok pass (s)", "all_ok_s", "%.1f"),
        ("idle CPU over 60 s (%)", "idle_cpu_pct", "%.2f"),
        ("RSS after the first passes (MiB)", "rss_mib", "%.1f"),
        ("peak RSS (MiB)", "peak_rss_mib", "%.1f"),
        ("reload adding one business, SIGHUP to done (s)", "reload_add_s", "%.2f"),
        ("... until that business has an ok pass (s)", "added_synced_s", "%.2f"),
        ("reload removing it (s)", "reload_remove_s", "%.2f"),
        ("SIGTERM to exit (s)", "stop_s", "%.2f"),
    ]
    md = ["| measure | " + " | ".join(f"{r['n']:,}" for r in results) + (" | ratio |" if len(results) == 2 else " |"),
          "|---|" + "---|" * len(results) + ("---|" if len(results) == 2 else "")]
    for label, key, fmt in rows:
        cells = [fmt % r[key] for r in results]
        ratio = ""
        if len(results) == 2 and results[0][key]:
            ratio = " %.1f× |" % (results[1][key] / results[0][key])
        md.append(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    md.append("")
    md.append("Load: " + "; ".join(f"{r['n']:,}: before {r['load_before']}, after {r['load_after']}" for r in results))
    text = "\n".join(md)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "many.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
