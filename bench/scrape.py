#!/usr/bin/env python3
"""The cost of a /metrics scrape, with 100,000 leads and 20 businesses.

    python3 bench/scrape.py [--businesses 20] [--leads 5000] [--scrapes 2000]

Starts `leadsync sandbox` (20 x 5,000 leads) and `leadsync run` with the
admin listener (table gauges refreshed every second, so readings of the
mirror overlap the scrapes), then times scrapes over one keep-alive
connection, as Prometheus does:

1. while the first full sync writes the 100,000 leads;
2. once the mirror is complete (and the daemon idle but for its refreshes).

Target: p99 <= 5 ms. Uses the release binary and Python's standard library
only; results are printed and written to bench/out/scrape.md.
"""

import argparse
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "leadsync")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Scraper:
    def __init__(self, port):
        self.port = port
        self.conn = None

    def scrape(self):
        """Returns (seconds, body) of one scrape, or None when not listening yet."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            start = time.perf_counter()
            self.conn.request("GET", "/metrics")
            resp = self.conn.getresponse()
            body = resp.read()
            took = time.perf_counter() - start
            if resp.status != 200:
                raise RuntimeError(f"/metrics answered {resp.status}")
            return took, body.decode()
        except (ConnectionError, OSError, http.client.HTTPException):
            self.conn = None
            return None


def series(body, name):
    """Sum of every sample of `name`, by label string."""
    out = {}
    for line in body.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def summary(label, times):
    ms = [t * 1000 for t in times]
    return {
        "phase": label,
        "scrapes": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--businesses", type=int, default=20)
    ap.add_argument("--leads", type=int, default=5000)
    ap.add_argument("--scrapes", type=int, default=2000)
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="leadsync-scrape-")
    sandbox = daemon = None
    try:
        sb_port, admin_port = free_port(), free_port()
        sandbox = subprocess.Popen(
            [BIN, "sandbox", "--listen", f"127.0.0.1:{sb_port}", "--businesses", str(args.businesses),
             "--leads-per-business", str(args.leads), "--max-page-size", "100",
             "--write-config", work, "--static-tokens"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in sandbox.stdout:
            if "configuration written" in line:
                break
        overrides = os.path.join(work, "bench.toml")
        with open(overrides, "w") as f:
            f.write("[api]\nmax_requests_per_second = 100000\n\n[poll]\npage_size = 100\n\n"
                    f"[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nrefresh_secs = 1\n")
        daemon = subprocess.Popen(
            [BIN, "--config", os.path.join(work, "leadsync.toml"), "--config", overrides, "run"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "daemon.log"), "w"),
            env={**os.environ, "LEADSYNC_LOG": "warn"})

        scraper = Scraper(admin_port)
        total = args.businesses * args.leads
        during, after = [], []
        deadline = time.time() + 600
        body = ""
        # Phase 1: scrape while the first full sync runs, until every pass is done.
        while time.time() < deadline:
            r = scraper.scrape()
            if r is None:
                time.sleep(0.01)
                continue
            took, body = r
            passes = series(body, "leadsync_sync_passes_total")
            done = sum(v for k, v in passes.items() if 'kind="full"' in k and 'outcome="ok"' in k)
            if done >= args.businesses:
                break
            during.append(took)
        else:
            sys.exit("the first full sync did not finish in 10 minutes")
        # Wait for a reading of the complete mirror.
        while sum(series(body, "leadsync_leads").values()) < total:
            time.sleep(0.2)
            r = scraper.scrape()
            body = r[1] if r else body
        # Phase 2: the complete mirror.
        for _ in range(args.scrapes):
            r = scraper.scrape()
            if r is None:
                sys.exit("the admin listener went away")
            after.append(r[0])
        refresh = series(body, "leadsync_tables_refresh_duration_seconds").get("", float("nan"))
        size = len(body.encode())

        rows = []
        if during:
            rows.append(summary(f"during the first full sync of {total:,} leads", during))
        rows.append(summary(f"{total:,} leads, {args.businesses} businesses, idle", after))
        lines = [
            f"# /metrics scrape ({args.businesses} businesses x {args.leads:,} leads; "
            f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
            "",
            "| phase | scrapes | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['phase']} | {r['scrapes']} | {r['p50']:.2f} | {r['p90']:.2f} | "
                         f"{r['p99']:.2f} | {r['max']:.2f} |")
        lines += ["", f"body: {size:,} bytes; table gauges read from the mirror in "
                      f"{refresh * 1000:.1f} ms (every second, off the scrape path)"]
        verdict = "PASS" if rows[-1]["p99"] <= 5.0 else "FAIL"
        lines.append(f"target p99 <= 5 ms (complete mirror): {verdict}")
        text = "\n".join(lines) + "\n"
        print(text)
        os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
        with open(os.path.join(ROOT, "bench", "out", "scrape.md"), "w") as f:
            f.write(text)
        return 0 if verdict == "PASS" else 1
    finally:
        for p in (daemon, sandbox):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
