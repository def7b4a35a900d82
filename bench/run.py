#!/usr/bin/env python3
"""leadsync benchmarks, against the built-in sandbox on loopback.

    python3 bench/run.py            # everything (a few minutes on 2 cores)
    python3 bench/run.py --quick    # smaller sizes, for a smoke run

Uses only public tools: the release binary, Python's standard library and
GNU time (/usr/bin/time) for peak RSS. Results are printed and written to
bench/out/results.md.

1. Poller: full sync of 100,000 leads (20 businesses x 5,000, page size 100)
   into a fresh database, then an unchanged re-sync (with a trigger counting
   any write to `negotiations`), and peak RSS at 25k / 50k / 100k leads.
   A plain Python urllib + sqlite3 script doing the same work is timed too.
2. Drainer: 10,000 transitions over 2,000 negotiations, sandbox latency
   20 ms per request, outbox.concurrency = 16; then the delay from INSERT to
   delivery of single rows into an idle daemon (poll_interval_ms = 1000).
3. Mixed drain: the same setup with 6,000 transitions and 4,000 replies
   (message_outbox) over the same 2,000 negotiations, shuffled: the one
   drainer sends both.
"""

import argparse
import datetime
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "leadsync")
TIME = "/usr/bin/time"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sandbox:
    """`leadsync sandbox` in its own process, with a configuration written for it."""

    def __init__(self, workdir, businesses, leads, latency_ms=0, shape=None):
        self.dir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [BIN, "sandbox", "--listen", f"127.0.0.1:{self.port}", "--businesses", str(businesses),
             "--leads-per-business", str(leads), "--max-page-size", "100", "--latency-ms", str(latency_ms),
             "--write-config", workdir, "--static-tokens"] + (["--shape", shape] if shape else []),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.proc.stdout:
            if "configuration written" in line:
                break
        self.config = os.path.join(workdir, "leadsync.toml")

    def get(self, path):
        with urllib.request.urlopen(self.base + path) as r:
            return json.load(r)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def write_overrides(workdir, sync_concurrency=None, **outbox):
    path = os.path.join(workdir, "bench.toml")
    lines = ["[api]", "max_requests_per_second = 100000", "", "[poll]", "page_size = 100", ""]
    if sync_concurrency is not None:
        lines += ["[daemon]", f"sync_concurrency = {sync_concurrency}", ""]
    lines += ["[outbox]"]
    lines += [f"{k} = {v}" for k, v in outbox.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def timed(args, cpu=False):
    """Runs leadsync under GNU time; returns (wall seconds, peak RSS MiB, stdout),
    and CPU seconds (user + system) after them when `cpu`."""
    out = subprocess.run([TIME, "-v", BIN] + args, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"leadsync {' '.join(args)} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", out.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    if cpu:
        user = float(re.search(r"User time \(seconds\): (\S+)", out.stderr).group(1))
        system = float(re.search(r"System time \(seconds\): (\S+)", out.stderr).group(1))
        return seconds, rss_kb / 1024, out.stdout, user + system
    return seconds, rss_kb / 1024, out.stdout


def python_baseline(sandbox, businesses, db_path):
    """What a plain script does: list every page, insert every payload, one transaction per page."""
    tokens = {}
    with open(sandbox.config) as f:
        text = f.read()
    for bid, token_file in re.findall(r'id = "(\d+)"\nname = "[^"]*"\naccess_token_file = "([^"]+)"', text):
        with open(token_file) as t:
            tokens[bid] = t.read().strip()
    start = time.monotonic()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE negotiations (negotiation_id TEXT PRIMARY KEY, business_id TEXT, status TEXT, payload TEXT)")
    n = 0
    for bid in list(tokens)[:businesses]:
        query = "limit=100"
        while True:
            url = f"{sandbox.base}/api/v4/businesses/{bid}/negotiations?{query}"
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tokens[bid]}"})
            with urllib.request.urlopen(req) as r:
                page = json.load(r)
            with db:
                for lead in page["data"]:
                    db.execute("INSERT OR REPLACE INTO negotiations VALUES (?, ?, ?, ?)",
                               (lead["negotiationID"], bid, lead.get("status"), json.dumps(lead)))
                    n += 1
            # The sandbox's default, the documented v4 style: the next page's query in `next`.
            pagination = page.get("pagination", {})
            if pagination.get("next"):
                query = urllib.parse.urlsplit(pagination["next"]).query
            elif pagination.get("nextPageToken"):
                query = urllib.parse.urlencode({"limit": 100, "pageToken": pagination["nextPageToken"]})
            else:
                break
    db.close()
    return time.monotonic() - start, n


def bench_sync(quick, results):
    per_business = 1250 if quick else 5000
    sizes = [per_business // 4, per_business // 2, per_business]
    rss = []
    for leads in sizes:
        work = tempfile.mkdtemp(prefix="leadsync-bench-")
        sb = Sandbox(work, 20, leads)
        try:
            overrides = write_overrides(work)
            total = 20 * leads
            wall, peak, _ = timed(["--config", sb.config, "--config", overrides, "sync", "--full"])
            rss.append((total, peak))
            if leads != per_business:
                continue
            db_path = os.path.join(work, "leadsync.db")
            db = sqlite3.connect(db_path)
            got = db.execute("SELECT count(*) FROM negotiations").fetchone()[0]
            assert got == total, f"mirrored {got} of {total} leads"
            db.executescript("""
                CREATE TABLE bench_writes (n INTEGER);
                CREATE TRIGGER bench_u AFTER UPDATE ON negotiations BEGIN INSERT INTO bench_writes VALUES (1); END;
                CREATE TRIGGER bench_i AFTER INSERT ON negotiations BEGIN INSERT INTO bench_writes VALUES (1); END;
            """)
            db.close()
            rewall, repeak, _ = timed(["--config", sb.config, "--config", overrides, "sync", "--full"])
            db = sqlite3.connect(db_path)
            rewrites = db.execute("SELECT count(*) FROM bench_writes").fetchone()[0]
            db.close()
            base_wall, base_n = python_baseline(sb, 20, os.path.join(work, "baseline.db"))
            results["sync"] = {
                "leads": total,
                "full_wall_s": round(wall, 2),
                "full_leads_per_s": round(total / wall),
                "full_peak_rss_mib": round(peak, 1),
                "resync_wall_s": round(rewall, 2),
                "resync_speedup": round(wall / rewall, 1),
                "resync_payload_rewrites": rewrites,
                "resync_peak_rss_mib": round(repeak, 1),
                "python_baseline_wall_s": round(base_wall, 2),
                "python_baseline_leads": base_n,
            }
        finally:
            sb.stop()
            shutil.rmtree(work, ignore_errors=True)
    results["sync"]["peak_rss_by_leads"] = [{"leads": n, "peak_rss_mib": round(m, 1)} for n, m in rss]

def tokens_of(sandbox):
    with open(sandbox.config) as f:
        text = f.read()
    out = {}
    for bid, token_file in re.findall(r'id = "(\d+)"\nname = "[^"]*"\naccess_token_file = "([^"]+)"', text):
        with open(token_file) as t:
            out[bid] = t.read().strip()
    return out


def fetch_floor(sandbox, per_business):
    """The fetch floor: every page of every business, in order, over one
    keep-alive connection; the bytes are read and nothing is parsed.
    Returns (wall seconds, bytes)."""
    import http.client
    tokens = tokens_of(sandbox)
    conn = http.client.HTTPConnection("127.0.0.1", sandbox.port)
    n = 0
    start = time.monotonic()
    for bid, token in tokens.items():
        for offset in range(0, per_business, 100):
            conn.request("GET", f"/api/v4/businesses/{bid}/negotiations?limit=100&offset={offset}",
                         headers={"Authorization": f"Bearer {token}"})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                sys.exit(f"fetch floor: HTTP {r.status}")
            n += len(body)
    wall = time.monotonic() - start
    conn.close()
    return wall, n


def write_floor(businesses, per_business, *extra):
    """The write floor: examples/write_floor.rs (same rows, the mirror's
    schema, indexes and pragmas, one transaction per page, no HTTP, no JSON).
    `extra`: `--pages-per-tx N` (a full scan's batches), `--bare` (no change
    rows, no index beyond the primary key: what the schema's extras cost),
    `--sequential-ids` (time-ordered ids instead of random ones: what the
    primary-key index written at random costs). Returns (wall seconds, CPU
    seconds, MB handed to write calls) of the writes alone."""
    work = tempfile.mkdtemp(prefix="leadsync-bench-")
    try:
        exe = os.path.join(ROOT, "target", "release", "examples", "write_floor")
        out = subprocess.run([exe, os.path.join(work, "floor.db"), str(businesses), str(per_business), *extra],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["rows"] == businesses * per_business
        return r["wall_s"], r["cpu_s"], r.get("written_mb", 0.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load():
    return round(os.getloadavg()[0], 1)


def bench_limit(quick, results, rss400, repeat=1):
    """Issue 16: the sync against its physical limit, max(fetch floor, write
    floor), schema-shaped payloads, concurrency 1 and 4, latency 0 and 2 ms.
    Each sync is run `repeat` times (fresh database each time); medians are
    reported, with the load average before each run."""
    per_business = 1250 if quick else 5000
    total = 20 * per_business
    wf_wall, wf_cpu, wf_mb = min((write_floor(20, per_business) for _ in range(3)), key=lambda r: r[0])
    out = {"leads": total, "write_floor_wall_s": round(wf_wall, 3), "write_floor_cpu_s": round(wf_cpu, 3),
           "write_floor_written_mb": wf_mb, "runs": []}
    # The CPU a full sync cannot go below with this schema: its batches (up
    # to 8 pages a transaction), then the same without the change rows and
    # secondary indexes. Medians of 3.
    # And with time-ordered ids (the sandbox's are random): how much of the
    # floor is the primary-key index dirtying pages all over it each commit.
    for key, extra in (("write_floor_8_pages", ("--pages-per-tx", "8")),
                       ("write_floor_8_pages_bare", ("--pages-per-tx", "8", "--bare")),
                       ("write_floor_sequential_ids", ("--sequential-ids",))):
        runs = [write_floor(20, per_business, *extra) for _ in range(3)]
        out[key + "_cpu_s"] = round(statistics.median(r[1] for r in runs), 3)
        out[key + "_written_mb"] = round(statistics.median(r[2] for r in runs), 1)
    for latency in (0, 2):
        work = tempfile.mkdtemp(prefix="leadsync-bench-")
        sb = Sandbox(work, 20, per_business, latency_ms=latency, shape="schema")
        try:
            ff = min(fetch_floor(sb, per_business)[0] for _ in range(3))
            floor = max(ff, wf_wall)
            db_path = os.path.join(work, "leadsync.db")
            for conc in (1, 4):
                overrides = write_overrides(work, sync_concurrency=conc)
                args = ["--config", sb.config, "--config", overrides, "sync", "--full"]
                full, resync = [], []
                for _ in range(repeat):
                    for suffix in ("", "-wal", "-shm"):
                        if os.path.exists(db_path + suffix):
                            os.remove(db_path + suffix)
                    la = load()
                    wall, peak, _, cpu = timed(args, cpu=True)
                    full.append((wall, peak, cpu, la))
                    db = sqlite3.connect(db_path)
                    got = db.execute("SELECT count(*) FROM negotiations").fetchone()[0]
                    assert got == total, f"mirrored {got} of {total} leads"
                    db.executescript("""
                        CREATE TABLE bench_writes (n INTEGER);
                        CREATE TRIGGER bench_u AFTER UPDATE ON negotiations BEGIN INSERT INTO bench_writes VALUES (1); END;
                        CREATE TRIGGER bench_i AFTER INSERT ON negotiations BEGIN INSERT INTO bench_writes VALUES (1); END;
                    """)
                    db.close()
                    rla = load()
                    rewall, repeak, _, recpu = timed(args, cpu=True)
                    db = sqlite3.connect(db_path)
                    rewrites = db.execute("SELECT count(*) FROM bench_writes").fetchone()[0]
                    db.executescript("DROP TRIGGER bench_u; DROP TRIGGER bench_i; DROP TABLE bench_writes;")
                    db.close()
                    resync.append((rewall, repeak, recpu, rla, rewrites))
                med = lambda rows, i: statistics.median(r[i] for r in rows)
                wall, cpu, rewall, recpu = med(full, 0), med(full, 2), med(resync, 0), med(resync, 2)
                out["runs"].append({
                    "latency_ms": latency, "concurrency": conc, "repeat": repeat,
                    "fetch_floor_s": round(ff, 3), "limit_s": round(floor, 3),
                    "full_wall_s": round(wall, 2), "full_cpu_s": round(cpu, 2),
                    "full_peak_rss_mib": round(max(r[1] for r in full), 1),
                    "full_vs_limit": round(wall / floor, 2), "full_vs_fetch_floor": round(wall / ff, 2),
                    "full_load": [r[3] for r in full], "full_cpu_runs": [round(r[2], 2) for r in full],
                    "resync_wall_s": round(rewall, 2), "resync_cpu_s": round(recpu, 2),
                    "resync_vs_fetch_floor": round(rewall / ff, 2),
                    "resync_rows_written": max(r[4] for r in resync),
                    "resync_peak_rss_mib": round(max(r[1] for r in resync), 1),
                    "resync_load": [r[3] for r in resync], "resync_cpu_runs": [round(r[2], 2) for r in resync],
                })
        finally:
            sb.stop()
            shutil.rmtree(work, ignore_errors=True)
    rss = []
    for leads in ([per_business // 4, per_business] + ([per_business * 4] if rss400 else [])):
        work = tempfile.mkdtemp(prefix="leadsync-bench-")
        sb = Sandbox(work, 20, leads, shape="schema")
        try:
            overrides = write_overrides(work, sync_concurrency=4)
            _, peak, _ = timed(["--config", sb.config, "--config", overrides, "sync", "--full"])
            rss.append({"leads": 20 * leads, "peak_rss_mib": round(peak, 1)})
        finally:
            sb.stop()
            shutil.rmtree(work, ignore_errors=True)
    out["peak_rss_by_leads"] = rss
    results["limit"] = out


def bench_drain(quick, results):
    negotiations = 400 if quick else 2000
    work = tempfile.mkdtemp(prefix="leadsync-bench-")
    sb = Sandbox(work, 20, negotiations // 20, latency_ms=20)
    try:
        overrides = write_overrides(work, concurrency=16)
        timed(["--config", sb.config, "--config", overrides, "sync", "--full"])
        db_path = os.path.join(work, "leadsync.db")
        db = sqlite3.connect(db_path)
        ids = [r[0] for r in db.execute("SELECT negotiation_id FROM negotiations")]
        rows = [(n, s, f"2024-06-{10 + k:02d}T10:00:00Z")
                for n in ids
                for k, s in enumerate(["appt_scheduled", "job_complete", "invoice_paid", "not_scheduled", "pro_cancel"])]
        random.Random(7).shuffle(rows)
        db.executemany("INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?, ?, ?)", rows)
        db.commit()
        wall, peak, out = timed(["--config", sb.config, "--config", overrides, "drain"])
        sent = db.execute("SELECT count(*) FROM outbox WHERE state = 'sent'").fetchone()[0]
        assert sent == len(rows), f"{sent} of {len(rows)} sent: {out}"
        results["drain"] = {
            "transitions": len(rows),
            "negotiations": len(ids),
            "latency_ms": 20,
            "concurrency": 16,
            "wall_s": round(wall, 2),
            "transitions_per_s": round(len(rows) / wall),
            "ceiling_per_s": round(16 * 1000 / 20),
            "peak_rss_mib": round(peak, 1),
        }

        # Idle delay: one row at a time into a running daemon (default poll interval).
        idle = write_overrides(work, concurrency=16, poll_interval_ms=1000)
        log = open(os.path.join(work, "daemon.log"), "w")
        daemon = subprocess.Popen([BIN, "--config", sb.config, "--config", idle, "run"], stderr=log)
        try:
            time.sleep(2)
            delays = []
            rnd = random.Random(11)
            for i in range(20 if not quick else 8):
                before = len(sb.get("/_sandbox/deliveries"))
                time.sleep(rnd.uniform(0.0, 1.0))
                t0 = time.time()
                db.execute("INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?, 'appt_scheduled', ?)",
                           (ids[i], f"2024-07-01T10:00:{i:02d}Z"))
                db.commit()
                while True:
                    d = sb.get("/_sandbox/deliveries")
                    if len(d) > before:
                        received = d[-1]["received_at"].replace("Z", "+00:00")
                        t1 = datetime.datetime.fromisoformat(received).timestamp()
                        delays.append((t1 - t0) * 1000)
                        break
                    time.sleep(0.005)
            delays.sort()
            results["idle_delay"] = {
                "rows": len(delays),
                "poll_interval_ms": 1000,
                "p50_ms": round(statistics.median(delays)),
                "p90_ms": round(delays[int(len(delays) * 0.9) - 1]),
                "max_ms": round(delays[-1]),
            }
        finally:
            daemon.terminate()
            daemon.wait()
    finally:
        sb.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench_mixed(quick, results):
    negotiations = 400 if quick else 2000
    work = tempfile.mkdtemp(prefix="leadsync-bench-")
    sb = Sandbox(work, 20, negotiations // 20, latency_ms=20)
    try:
        overrides = write_overrides(work, concurrency=16)
        timed(["--config", sb.config, "--config", overrides, "sync", "--full"])
        db_path = os.path.join(work, "leadsync.db")
        db = sqlite3.connect(db_path)
        ids = [r[0] for r in db.execute("SELECT negotiation_id FROM negotiations")]
        transitions = [(n, s, f"2024-06-{10 + k:02d}T10:00:00Z")
                       for n in ids
                       for k, s in enumerate(["appt_scheduled", "job_complete", "invoice_paid"])]
        replies = [(n, f"Reply {k} — see you soon 👋") for n in ids for k in range(2)]
        rows = [("t", r) for r in transitions] + [("m", r) for r in replies]
        random.Random(7).shuffle(rows)
        for kind, r in rows:
            if kind == "t":
                db.execute("INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?, ?, ?)", r)
            else:
                db.execute("INSERT INTO message_outbox (negotiation_id, text) VALUES (?, ?)", r)
        db.commit()
        wall, peak, out = timed(["--config", sb.config, "--config", overrides, "drain"])
        sent = db.execute("SELECT (SELECT count(*) FROM outbox WHERE state = 'sent')"
                          " + (SELECT count(*) FROM message_outbox WHERE state = 'sent')").fetchone()[0]
        assert sent == len(rows), f"{sent} of {len(rows)} sent: {out}"
        got = len(sb.get("/_sandbox/replies"))
        assert got == len(replies), f"the sandbox accepted {got} of {len(replies)} replies"
        results["mixed"] = {
            "transitions": len(transitions),
            "replies": len(replies),
            "negotiations": len(ids),
            "latency_ms": 20,
            "concurrency": 16,
            "wall_s": round(wall, 2),
            "rows_per_s": round(len(rows) / wall),
            "ceiling_per_s": round(16 * 1000 / 20),
            "peak_rss_mib": round(peak, 1),
        }
    finally:
        sb.stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--only", choices=["sync", "drain", "mixed", "limit"], help="run one of the benchmarks")
    ap.add_argument("--rss-400k", action="store_true", help="also measure peak RSS at 400,000 leads (limit)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per sync in `limit`; medians are reported")
    args = ap.parse_args()
    if not os.path.exists(TIME):
        sys.exit("GNU time is needed at /usr/bin/time (Debian: apt-get install time)")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "leadsync", "--example", "write_floor"],
                   cwd=ROOT, check=True)
    results = {"machine": f"{os.cpu_count()} cores", "quick": args.quick}
    if args.only in (None, "sync"):
        bench_sync(args.quick, results)
    if args.only in (None, "limit"):
        bench_limit(args.quick, results, args.rss_400k, max(1, args.repeat))
    if args.only in (None, "drain"):
        bench_drain(args.quick, results)
    if args.only in (None, "mixed"):
        bench_mixed(args.quick, results)
    lines = ["| benchmark | result | target |", "|---|---|---|"]
    if "sync" in results:
        s = results["sync"]
        lines += [
            f"| full sync, {s['leads']:,} leads | {s['full_wall_s']} s, **{s['full_leads_per_s']:,} leads/s** | ≥ 50,000 leads/s |",
            f"| unchanged re-sync | {s['resync_wall_s']} s ({s['resync_speedup']}× faster), {s['resync_payload_rewrites']} lead rows written | ≥ 2× faster, 0 rewrites |",
            "| peak RSS, full sync | " + ", ".join(f"{r['leads']:,} leads: {r['peak_rss_mib']} MiB" for r in s["peak_rss_by_leads"]) + " | ≤ 64 MiB, flat |",
            f"| plain Python (urllib + sqlite3), same sync | {s['python_baseline_wall_s']} s | (reference) |",
        ]
    if "limit" in results:
        m = results["limit"]
        lines += [f"| write floor (rusqlite, same rows, page transactions) | {m['write_floor_wall_s']} s wall, {m['write_floor_cpu_s']} s CPU, {m['write_floor_written_mb']} MB written | |",
                  f"| write floor, 8 pages a transaction (a full scan's batches) | {m['write_floor_8_pages_cpu_s']} s CPU, {m['write_floor_8_pages_written_mb']} MB written | |",
                  f"| the same without change rows and secondary indexes | {m['write_floor_8_pages_bare_cpu_s']} s CPU, {m['write_floor_8_pages_bare_written_mb']} MB written | |",
                  f"| write floor with time-ordered ids (page transactions) | {m['write_floor_sequential_ids_cpu_s']} s CPU, {m['write_floor_sequential_ids_written_mb']} MB written | |"]
        lines += ["", "| latency | concurrency | fetch floor | limit | full sync wall | × fetch floor | × limit | full CPU | RSS "
                  "| re-sync wall | re-sync × fetch floor | re-sync CPU | rows written | load (1 min) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["runs"]:
            lines += [
                f"| {r['latency_ms']} ms | {r['concurrency']} | {r['fetch_floor_s']} s | {r['limit_s']} s | {r['full_wall_s']} s "
                f"| **{r['full_vs_fetch_floor']}×** | **{r['full_vs_limit']}×** | {r['full_cpu_s']} s | {r['full_peak_rss_mib']} MiB "
                f"| {r['resync_wall_s']} s | **{r['resync_vs_fetch_floor']}×** | {r['resync_cpu_s']} s | {r['resync_rows_written']} "
                f"| {max(r['full_load'] + r['resync_load'])} |",
            ]
        lines += ["", f"Targets: full-sync CPU ≤ 1.0 s and wall ≤ 1.5× limit; re-sync ≤ 1.3× fetch floor with 0 rows written "
                  f"(medians of {m['runs'][0]['repeat']} runs; limit = max(fetch floor, write floor)).", "",
                  "| benchmark | result | target |", "|---|---|---|"]
        lines += ["| peak RSS, schema leads | " + ", ".join(f"{r['leads']:,}: {r['peak_rss_mib']} MiB" for r in m["peak_rss_by_leads"]) + " | ≤ 64 MiB, flat |"]
    if "drain" in results:
        d, i = results["drain"], results["idle_delay"]
        lines += [
            f"| drain {d['transitions']:,} transitions / {d['negotiations']:,} negotiations, 20 ms, concurrency 16 | {d['wall_s']} s, **{d['transitions_per_s']} transitions/s** (ceiling {d['ceiling_per_s']}) | ≥ 500/s |",
            f"| INSERT → delivery, idle daemon, poll 1000 ms | p50 {i['p50_ms']} ms, p90 {i['p90_ms']} ms, max {i['max_ms']} ms | p50 ≤ 1050 ms |",
        ]
    if "mixed" in results:
        m = results["mixed"]
        lines += [
            f"| drain {m['transitions']:,} transitions + {m['replies']:,} replies / {m['negotiations']:,} negotiations, 20 ms, concurrency 16 | {m['wall_s']} s, **{m['rows_per_s']} rows/s** (ceiling {m['ceiling_per_s']}) | ≥ 500/s |",
        ]
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "results.md"), "w") as f:
        f.write(table + "\n\n```json\n" + json.dumps(results, indent=2) + "\n```\n")
    with open(os.path.join(ROOT, "bench", "out", "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
