//! The admin listener from outside, as Prometheus and a load balancer see
//! it: `/metrics` parsed by the exposition-format rules with specific series
//! moving after a pass and a send, `/healthz` turning 503 while a loop is
//! really stuck, `/readyz`, and the loopback rule.

mod common;

use common::{Env, FAST, count, text};
use leadsync::sandbox::{Faults, Mutation, SandboxOptions};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

/// `leadsync run` in the background, its admin listener on the port the
/// daemon reported (port 0 in the configuration: nothing is guessed).
struct Daemon {
    child: Child,
    /// Its log file.
    log: PathBuf,
    /// `http://` and the admin listener's address.
    base: String,
}

impl Daemon {
    /// Starts the daemon of `env` (whose `admin.listen` is port 0) and waits
    /// until it logs where its admin listener, and each of `more`, listens.
    async fn start(env: &Env, more: &[&str]) -> (Daemon, Vec<SocketAddr>) {
        let mut markers = vec!["admin listener"];
        markers.extend_from_slice(more);
        let (child, at) = env.spawn_daemon_listening(&markers).await;
        let daemon = Daemon {
            child,
            log: env.dir.path().join("daemon.log"),
            base: format!("http://{}", at[0]),
        };
        (daemon, at[1..].to_vec())
    }

    /// Fails the test, with the daemon's log, if the daemon has exited.
    fn assert_running(&mut self, during: &str) {
        let status = match self.child.try_wait() {
            Ok(None) => return,
            Ok(Some(status)) => status.to_string(),
            Err(e) => e.to_string(),
        };
        panic!(
            "the daemon exited ({status}) while waiting for: {during}; its log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only a child not reaped yet: the pid of one already waited for
        // may belong to another process by now (another test's daemon).
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, not reaped yet.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP client (leadsync's builder installs the TLS provider).
fn http() -> reqwest::Client {
    leadsync::thumbtack::client::http_client(Duration::from_secs(5), "admin-test").expect("client")
}

async fn get(url: &str) -> Option<(u16, String, String)> {
    let client = http();
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((status, ct, r.text().await.ok()?))
}

/// One sample of the text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text exposition format (0.0.4) and checks its
/// rules: HELP/TYPE before samples, valid metric and label names, quoted
/// and escaped label values, float values, one TYPE per family, no
/// duplicate series, sample names that fit their family's type, cumulative
/// histogram buckets ending in `+Inf` equal to `_count`.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    fn value(s: &str) -> Result<f64, String> {
        match s {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => s.parse().map_err(|_| format!("bad value {s:?}")),
        }
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    let mut series = HashSet::new();
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            match kw {
                "HELP" if !is_name(name, true) || !helps.insert(name.to_string()) => {
                    return Err(at("bad or repeated HELP".into()));
                }
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(at(format!("unknown type {t}")));
                    }
                    if samples.iter().any(|s: &Sample| s.name.starts_with(name)) {
                        return Err(at("TYPE after samples of its family".into()));
                    }
                    if types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(at("repeated TYPE".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // name{labels} value [timestamp]
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                // label name
                let start = chars
                    .peek()
                    .map(|(i, _)| *i)
                    .ok_or_else(|| at("open labels".into()))?;
                if body[start..].starts_with('}') {
                    rest = &body[start + 1..];
                    break;
                }
                let eq = body[start..]
                    .find('=')
                    .ok_or_else(|| at("label without =".into()))?
                    + start;
                let lname = &body[start..eq];
                if !is_name(lname, false) {
                    return Err(at(format!("bad label name {lname:?}")));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(at("label value not quoted".into()));
                }
                let mut v = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => v.push('\\'),
                            Some('"') => v.push('"'),
                            Some('n') => v.push('\n'),
                            other => return Err(at(format!("bad escape {other:?}"))),
                        },
                        Some('"') => break,
                        Some('\n') | None => return Err(at("unterminated label value".into())),
                        Some(c) => v.push(c),
                    }
                }
                if labels.insert(lname.to_string(), v).is_some() {
                    return Err(at(format!("label {lname} twice")));
                }
                match chars.peek().map(|(_, c)| *c) {
                    Some(',') => {
                        chars.next();
                    }
                    Some('}') => {}
                    _ => return Err(at("expected , or }".into())),
                }
            }
        }
        let mut fields = rest.trim_start_matches(' ').split(' ');
        let v = value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next()
            && ts.parse::<i64>().is_err()
        {
            return Err(at("bad timestamp".into()));
        }
        // The family: the name itself, or without a type's suffix.
        let family = [
            ("", ""),
            ("_total", "counter"),
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
        ]
        .iter()
        .find_map(|(suffix, t)| {
            let base = name.strip_suffix(suffix)?;
            let declared = types.get(base)?;
            (suffix.is_empty() || declared == t).then(|| declared.clone())
        })
        .ok_or_else(|| at(format!("sample {name} has no TYPE of its family")))?;
        if family == "counter" && v < 0.0 {
            return Err(at("negative counter".into()));
        }
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(at("duplicate series".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: v,
        });
    }
    // Histograms: cumulative buckets, +Inf equal to _count.
    for s in samples.iter().filter(|s| s.name.ends_with("_count")) {
        let base = s.name.trim_end_matches("_count");
        if types.get(base).map(String::as_str) != Some("histogram") {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|b| b.name == format!("{base}_bucket"))
            .filter(|b| {
                let mut l = b.labels.clone();
                l.remove("le");
                l == s.labels
            })
            .map(|b| (value(&b.labels["le"]).unwrap_or(f64::NAN), b.value))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{base}: buckets are not cumulative"));
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() && *n == s.value => {}
            _ => return Err(format!("{base}: no +Inf bucket equal to _count")),
        }
    }
    Ok(samples)
}

/// The value of the series `name` whose labels include `want` (0 when absent).
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(base: &str) -> Option<Vec<Sample>> {
    let (status, ct, body) = get(&format!("{base}/metrics")).await?;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    Some(parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}")))
}

/// Waits until a scrape satisfies `f`; fails at once if the daemon exits.
async fn wait_metrics(
    daemon: &mut Daemon,
    what: &str,
    f: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    // Generous: a loaded machine may take long; success returns at once.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        daemon.assert_running(what);
        let s = scrape(&daemon.base).await;
        if let Some(s) = &s
            && f(s)
        {
            return s.clone();
        }
        if std::time::Instant::now() > end {
            let dump: Vec<String> = s
                .unwrap_or_default()
                .iter()
                .map(|x| format!("{} {:?} {}", x.name, x.labels, x.value))
                .collect();
            panic!("timed out waiting for: {what}\n{}", dump.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn admin_overrides(listen: &str, extra: &str) -> String {
    format!("{FAST}\n[admin]\nlisten = \"{listen}\"\nrefresh_secs = 0.2\n{extra}")
}

/// Listeners configured on port 0 get a port from the system, and the
/// daemon says which: tests (and containers) use that instead of picking a
/// "free" port, releasing it and hoping nobody takes it before the daemon
/// binds it (another test's server did, once: the test waited for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_zero_listeners_report_the_ports_they_got() {
    let env = Env::small().await;
    let pw = common::write(env.dir.path(), "webhook_password", "hook-secret\n");
    env.set_overrides(&format!(
        "{}\n[webhooks]\nlisten = \"127.0.0.1:0\"\npath = \"/hooks\"\nusername = \"thumbtack\"\npassword_file = \"{}\"\n",
        admin_overrides("127.0.0.1:0", ""),
        pw.display()
    ));
    let out = env.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (child, at) = env
        .spawn_daemon_listening(&["admin listener", "webhook receiver listening"])
        .await;
    let _daemon = Daemon {
        child,
        log: env.dir.path().join("daemon.log"),
        base: format!("http://{}", at[0]),
    };
    let (admin, hooks) = (at[0], at[1]);
    assert!(
        admin.port() != 0 && hooks.port() != 0 && admin != hooks,
        "{at:?}"
    );
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match get(&format!("http://{admin}/healthz")).await {
            Some((200, _, body)) => {
                assert!(body.starts_with("ok"), "{body}");
                break;
            }
            other => assert!(
                std::time::Instant::now() < end,
                "/healthz at the reported {admin} did not answer 200: {other:?}\n{}",
                env.daemon_log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = http()
        .post(format!("http://{hooks}/hooks"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("the receiver answers at the reported address");
    assert_eq!(refused.status().as_u16(), 401);
}

/// What the old tests did: a port bound, read and released, which another
/// test's server (or the sandbox, which binds port 0 too) then takes before
/// the daemon binds it. The daemon cannot start; the wait for its listener
/// ends at once with why, instead of after 30 s of asking a port that never
/// answers (the flake seen in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_before_the_daemon_binds_it_fails_the_wait_at_once() {
    let released = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    // Another server gets the port between its release and the daemon's bind.
    let Ok(_neighbour) = std::net::TcpListener::bind(released) else {
        // Someone else was even quicker: the race, as above.
        return;
    };
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &admin_overrides(&released.to_string(), ""),
    )
    .await;
    let started = std::time::Instant::now();
    let waited = tokio::spawn(async move {
        let (mut child, _) = env.spawn_daemon_listening(&["admin listener"]).await;
        let _ = child.kill();
        let _ = child.wait();
    })
    .await;
    let took = started.elapsed();
    let failure = match waited {
        Err(e) if e.is_panic() => e
            .into_panic()
            .downcast::<String>()
            .map(|m| *m)
            .unwrap_or_default(),
        other => panic!("the daemon listened on a taken port: {other:?}"),
    };
    assert!(
        failure.contains("exited") && failure.contains("admin.listen: cannot listen on"),
        "{failure}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn the_parser_refuses_what_prometheus_refuses() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{b=\"q\\\"\"} 1\n";
    assert!(parse_exposition(ok).is_ok());
    for bad in [
        "a_total 1\n",                          // no TYPE
        "# TYPE a counter\na_total{b=\"1} 1\n", // unterminated
        "# TYPE a gauge\na{1b=\"x\"} 1\n",      // bad label name
        "# TYPE a gauge\na 1\na 2\n",           // duplicate
        "# TYPE a gauge\na one\n",              // bad value
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_after_a_pass_and_a_send() {
    let pw_dir = tempfile::tempdir().expect("dir");
    let pw = pw_dir.path().join("webhook_password");
    std::fs::write(&pw, "hook-secret\n").expect("password");
    let webhooks = format!(
        "\n[webhooks]\nlisten = \"127.0.0.1:0\"\npath = \"/hooks\"\nusername = \"thumbtack\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    let env = Env::new(
        SandboxOptions::default(),
        true,
        // Head scans every second, so that passes keep coming.
        &admin_overrides("127.0.0.1:0", &webhooks)
            .replace("[poll]\n", "[poll]\nschedule = \"* * * * * *\"\n"),
    )
    .await;
    let (mut daemon, at) = Daemon::start(&env, &["webhook receiver listening"]).await;
    let (base, hooks) = (daemon.base.clone(), at[0]);
    let b = env.business_ids()[0].clone();

    // Every business's first (full) pass, the leads gauge, the token refreshes.
    let leads_in_mirror = |b: &str| {
        count(
            &env.sql(),
            &format!("SELECT count(*) FROM negotiations WHERE business_id = '{b}'"),
        ) as f64
    };
    let s = wait_metrics(&mut daemon, "a first full pass of every business", |s| {
        env.business_ids().iter().all(|id| {
            value(
                s,
                "leadsync_sync_passes_total",
                &[("business_id", id), ("kind", "full"), ("outcome", "ok")],
            ) >= 1.0
        })
    })
    .await;
    assert!(value(&s, "leadsync_token_refreshes_total", &[("outcome", "ok")]) >= 3.0);
    // The token endpoint is Thumbtack too (SPEC §10: HTTP requests to
    // Thumbtack by endpoint and status): its statuses were missing.
    assert!(
        value(
            &s,
            "leadsync_http_requests_total",
            &[("endpoint", "POST oauth2/token"), ("status", "200")]
        ) >= 3.0,
        "token requests counted by endpoint and status"
    );
    assert!(
        value(
            &s,
            "leadsync_http_requests_total",
            &[
                ("endpoint", "GET businesses/{id}/negotiations"),
                ("status", "200")
            ]
        ) >= 18.0,
        "60 leads per business, page size 10"
    );
    assert!(
        value(
            &s,
            "leadsync_sync_pass_duration_seconds_count",
            &[("kind", "full")]
        ) >= 3.0
    );
    assert_eq!(value(&s, "leadsync_build_info", &[]), 1.0);
    let heads = value(
        &s,
        "leadsync_sync_passes_total",
        &[("business_id", &b), ("kind", "head"), ("outcome", "ok")],
    );

    // A pass that brings new leads moves the pass counter and the leads gauge.
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 5,
        })
        .expect("add leads");
    let s = wait_metrics(
        &mut daemon,
        "a head pass with the 5 new leads counted",
        |s| {
            value(
                s,
                "leadsync_sync_passes_total",
                &[("business_id", &b), ("kind", "head"), ("outcome", "ok")],
            ) > heads
                && value(s, "leadsync_leads", &[("business_id", &b)]) == 65.0
        },
    )
    .await;
    assert_eq!(leads_in_mirror(&b), 65.0);
    assert_eq!(value(&s, "leadsync_businesses_needing_reauth", &[]), 0.0);

    // Each schedule's backlog (issue 17: status and metrics show the lag).
    let every_second = [("kind", "head"), ("schedule", "* * * * * *")];
    let s = wait_metrics(&mut daemon, "the head schedule's backlog", |s| {
        value(s, "leadsync_schedule_businesses", &every_second) == 3.0
    })
    .await;
    assert!(value(&s, "leadsync_schedule_waiting_passes", &every_second) >= 0.0);
    assert!(
        s.iter().any(|x| x.name == "leadsync_schedule_lag_seconds"
            && x.labels.get("schedule").map(String::as_str) == Some("* * * * * *")),
        "the lag series exists even at 0"
    );

    // A send moves the send counter, the POST counter and the outbox gauges.
    let sent_before = value(
        &s,
        "leadsync_sends_total",
        &[("kind", "transition"), ("outcome", "sent")],
    );
    let posts_before = value(
        &s,
        "leadsync_http_requests_total",
        &[
            ("endpoint", "POST negotiations/{id}/job-status"),
            ("status", "200"),
        ],
    );
    let lead = env.sandbox.lead_ids(&b)[10].clone();
    env.sql()
        .execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [&lead],
        )
        .expect("insert");
    let s = wait_metrics(
        &mut daemon,
        "the send counted and the row shown sent",
        |s| {
            value(
                s,
                "leadsync_sends_total",
                &[("kind", "transition"), ("outcome", "sent")],
            ) == sent_before + 1.0
                && value(
                    s,
                    "leadsync_outbox_rows",
                    &[("table", "outbox"), ("state", "sent")],
                ) == 1.0
        },
    )
    .await;
    assert_eq!(
        value(
            &s,
            "leadsync_http_requests_total",
            &[
                ("endpoint", "POST negotiations/{id}/job-status"),
                ("status", "200")
            ]
        ),
        posts_before + 1.0
    );
    assert_eq!(
        value(
            &s,
            "leadsync_outbox_rows",
            &[("table", "outbox"), ("state", "pending")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "leadsync_outbox_oldest_pending_age_seconds",
            &[("table", "outbox")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "leadsync_send_duration_seconds_count",
            &[("kind", "transition")]
        ),
        sent_before + 1.0
    );

    // A reply is counted as a message (not as a transition), with the POST
    // to its own endpoint and the message outbox's gauges.
    let transitions_sent = value(
        &s,
        "leadsync_sends_total",
        &[("kind", "transition"), ("outcome", "sent")],
    );
    env.sql()
        .execute(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'On my way!')",
            [&lead],
        )
        .expect("insert reply");
    let s = wait_metrics(&mut daemon, "the reply counted and shown sent", |s| {
        value(
            s,
            "leadsync_sends_total",
            &[("kind", "message"), ("outcome", "sent")],
        ) == 1.0
            && value(
                s,
                "leadsync_outbox_rows",
                &[("table", "message_outbox"), ("state", "sent")],
            ) == 1.0
    })
    .await;
    assert_eq!(
        value(
            &s,
            "leadsync_sends_total",
            &[("kind", "transition"), ("outcome", "sent")],
        ),
        transitions_sent
    );
    assert_eq!(
        value(
            &s,
            "leadsync_send_duration_seconds_count",
            &[("kind", "message")]
        ),
        1.0
    );
    assert!(
        value(
            &s,
            "leadsync_http_requests_total",
            &[("endpoint", "POST negotiations/{id}/messages")]
        ) >= 1.0
    );

    // A 429 pauses every request and is counted, with its status.
    env.sandbox.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 1,
        ..Faults::default()
    });
    wait_metrics(&mut daemon, "a 429 pause counted", |s| {
        value(s, "leadsync_rate_limit_pauses_total", &[]) >= 1.0
            && value(s, "leadsync_http_requests_total", &[("status", "429")]) >= 1.0
            && value(s, "leadsync_sync_passes_total", &[("outcome", "error")]) >= 1.0
    })
    .await;
    env.sandbox.set_faults(Faults::default());

    // A webhook delivery, and a refused one, are counted by type and outcome.
    let delivery = r#"{"event":{"eventType":"ReviewCreatedV4","webhookID":"w1","triggeredAt":"2026-11-28T06:00:00Z"},"data":{}}"#;
    let hook = format!("http://{hooks}/hooks");
    let ok = http()
        .post(&hook)
        .basic_auth("thumbtack", Some("hook-secret"))
        .header("content-type", "application/json")
        .body(delivery)
        .send()
        .await
        .expect("deliver");
    assert_eq!(ok.status().as_u16(), 200);
    let refused = http()
        .post(&hook)
        .body(delivery)
        .send()
        .await
        .expect("deliver");
    assert_eq!(refused.status().as_u16(), 401);
    // Bodies over max_body_bytes (1 MiB by default) declared by Content-Length:
    // with the credentials 413, counted as too_large; without them 401 (the
    // size of what the receiver accepts is nobody else's business).
    let oversized = |authorization: Option<String>| {
        let addr = hooks.to_string();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let body = "x".repeat(2 << 20);
            let mut sock = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let mut head = format!(
                "POST /hooks HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            if let Some(a) = authorization {
                head.push_str(&format!("authorization: {a}\r\n"));
            }
            head.push_str("\r\n");
            sock.write_all(head.as_bytes()).await.expect("head");
            let _ = sock.write_all(body.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = sock.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("thumbtack:hook-secret")
    );
    let answer = oversized(Some(basic)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let answer = oversized(None).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let s = wait_metrics(&mut daemon, "the deliveries counted", |s| {
        value(
            s,
            "leadsync_webhook_deliveries_total",
            &[("event_type", "ReviewCreatedV4"), ("outcome", "ignored")],
        ) == 1.0
    })
    .await;
    assert!(
        value(
            &s,
            "leadsync_webhook_deliveries_total",
            &[("outcome", "unauthorized")]
        ) >= 2.0
    );
    assert!(
        value(
            &s,
            "leadsync_webhook_deliveries_total",
            &[("outcome", "too_large")]
        ) >= 1.0,
        "a body refused by its Content-Length is counted"
    );

    // Nothing secret is in the scrape.
    let (_, _, body) = get(&format!("{base}/metrics")).await.expect("scrape");
    for secret in env.sandbox.issued_secrets() {
        assert!(!body.contains(&secret), "a token appears in /metrics");
    }
    // OpenMetrics for a scraper that asks for it.
    let om = http()
        .get(format!("{base}/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .expect("scrape");
    assert!(
        om.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("application/openmetrics-text")
    );
    assert!(om.text().await.unwrap_or_default().ends_with("# EOF\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_the_drainer_is_stuck() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &admin_overrides("127.0.0.1:0", "stale_after_secs = 2\n"),
    )
    .await;
    let (mut daemon, _) = Daemon::start(&env, &[]).await;
    let base = daemon.base.clone();
    let status = |path: &'static str| {
        let url = format!("{base}{path}");
        async move { get(&url).await.map(|(s, _, body)| (s, body)) }
    };
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while status("/healthz").await.map(|r| r.0) != Some(200) {
        daemon.assert_running("/healthz answering 200");
        assert!(
            std::time::Instant::now() < end,
            "healthz never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("/readyz").await.map(|r| r.0), Some(200));

    // Another program holds the write lock while a row falls due: the
    // drainer's claim waits for it (busy timeout), so the drainer loop stops
    // beating. (With nothing due a claim takes no write lock at all.)
    let holder = env.sql();
    let lead = env.first_leads(1)[0].clone();
    holder
        .execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, next_attempt_at)
             VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z',
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 seconds'))",
            [&lead],
        )
        .expect("insert a row due in 2 s");
    holder
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    // Under heavy load the scheduler's one-second heartbeat may lag too, and
    // a first 503 may name only it: wait for the one that names the drainer
    // (the loop that must be named), keeping the last 503 seen for the message.
    let mut unhealthy = None;
    let mut last_503 = None;
    // Generous for a loaded machine: the loop ends as soon as it is named.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < end {
        daemon.assert_running("/healthz naming the drainer");
        if let Some((503, body)) = status("/healthz").await {
            if body.contains("drainer loop has not beaten") {
                unhealthy = Some(body);
                break;
            }
            last_503 = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.execute_batch("ROLLBACK").expect("release the lock");
    assert!(
        unhealthy.is_some(),
        "healthz never named the stuck drainer (last 503: {last_503:?})"
    );

    let end = std::time::Instant::now() + Duration::from_secs(20);
    while status("/healthz").await.map(|r| r.0) != Some(200) {
        daemon.assert_running("/healthz recovering");
        assert!(std::time::Instant::now() < end, "healthz did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("/nope").await.map(|r| r.0), Some(404));
}

/// The mirror's file removed or moved away under the running daemon (a
/// cleanup, a restore gone wrong): the daemon goes on writing to a file
/// nobody else can open, lost when it stops, while the partner's programs
/// write a new one it never reads. `/healthz` said 200 all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_the_database_file_is_gone() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &admin_overrides("127.0.0.1:0", ""),
    )
    .await;
    let (mut daemon, _) = Daemon::start(&env, &[]).await;
    let url = format!("{}/healthz", daemon.base);
    let mut wait_for = async |what: &str, ok: &dyn Fn(u16, &str) -> bool| -> String {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            daemon.assert_running(what);
            if let Some((s, _, body)) = get(&url).await {
                if ok(s, &body) {
                    return body;
                }
                last = Some((s, body));
            }
            assert!(
                std::time::Instant::now() < end,
                "{what}: never (last: {last:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for("healthz answering 200", &|s, _| s == 200).await;
    let db = env.database();
    let moved = db.with_extension("moved");
    std::fs::rename(&db, &moved).unwrap();
    let body = wait_for("healthz naming the missing database", &|s, b| {
        s == 503 && b.contains("database file")
    })
    .await;
    assert!(
        body.contains(&db.display().to_string()) && body.contains("removed or replaced"),
        "{body}"
    );
    std::fs::rename(&moved, &db).unwrap();
    wait_for("healthz recovering", &|s, _| s == 200).await;
}

/// Sets the soft `RLIMIT_FSIZE` of the process `pid` (a child of this one).
fn set_file_size_limit(pid: u32, limit: u64) {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) on our own child, with valid pointers.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            std::ptr::null(),
            &mut now,
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    now.rlim_cur = limit.min(now.rlim_max);
    // SAFETY: as above.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &now,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The daemon's writes to the mirror fail (a full disk; here its file size
/// limit is lowered to 0 under it, with SIGXFSZ ignored as a full disk sends
/// no signal): it cannot take a sync request, record a pass or a send, nor
/// store a webhook delivery, and logged a warning twice a second, while
/// `/healthz` answered `ok`. It says why until a write succeeds again.
/// `leadsync run` with SIGXFSZ ignored (a full disk sends no signal: its
/// writes just fail), once its admin listener answers.
async fn daemon_whose_file_size_limit_can_be_lowered(env: &Env) -> Daemon {
    use std::os::unix::process::CommandExt;
    let log = env.dir.path().join("daemon.log");
    let mut cmd = env.cli();
    // Through a pipe, copied to the log by this process: the daemon's file
    // size limit would stop its own writes to a log file as well.
    cmd.arg("run").stderr(std::process::Stdio::piped());
    // SAFETY: signal(2) only, between fork and exec; an ignored signal
    // stays ignored across exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = common::spawn(&mut cmd).unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut file = std::fs::File::create(&log).unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut buf = [0; 4096];
        loop {
            match std::io::Read::read(&mut stderr, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = file.write_all(&buf[..n]);
                }
            }
        }
    });
    let mut daemon = Daemon {
        child,
        log: log.clone(),
        base: String::new(),
    };
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let at = loop {
        daemon.assert_running("the admin listener");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(at) = common::listen_address(&text, "admin listener") {
            break at;
        }
        assert!(std::time::Instant::now() < end, "no admin listener: {text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    daemon.base = format!("http://{at}");
    daemon
}

/// Waits until `url` answers as `ok` says, and returns the body.
async fn wait_for_answer(
    daemon: &mut Daemon,
    url: &str,
    what: &str,
    ok: &dyn Fn(u16, &str) -> bool,
) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        daemon.assert_running(what);
        if let Some((s, _, body)) = get(url).await {
            if ok(s, &body) {
                return body;
            }
            last = Some((s, body));
        }
        assert!(
            std::time::Instant::now() < end,
            "{what}: never (last: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `body` names why the writes fail as SQLite says it (no fixed
/// text that any body holds).
fn names_the_storage_error(body: &str) -> bool {
    [
        "(database or disk is full)",
        "(disk I/O error)",
        "(attempt to write a readonly database)",
    ]
    .iter()
    .any(|why| body.contains(&format!("writes to the database fail {why}")))
}

/// Lowers the daemon's file size limit to 0 and asks it for a sync, which
/// it cannot record: its pid and the `/healthz` body (at `url`) once that
/// answers 503 naming the failed writes.
async fn make_the_daemons_writes_fail(env: &Env, daemon: &mut Daemon, url: &str) -> (u32, String) {
    let pid = daemon_pid(env);
    set_file_size_limit(pid, 0);
    env.sql()
        .execute("INSERT INTO sync_requests (kind) VALUES ('head')", [])
        .unwrap();
    let body = wait_for_answer(daemon, url, "healthz naming the failed writes", &|s, b| {
        s == 503 && b.contains("writes to the database fail")
    })
    .await;
    (pid, body)
}

/// The daemon's writes to the mirror fail (a full disk; here its file size
/// limit is lowered to 0 under it, with SIGXFSZ ignored as a full disk sends
/// no signal): it cannot take a sync request, record a pass or a send, nor
/// store a webhook delivery, and logged a warning twice a second, while
/// `/healthz` answered `ok`. It says why until a write succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_the_daemons_writes_fail() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &admin_overrides("127.0.0.1:0", QUIET),
    )
    .await;
    let mut daemon = daemon_whose_file_size_limit_can_be_lowered(&env).await;
    env.wait_for_initial_passes(3);
    let url = format!("{}/healthz", daemon.base);
    let readyz = format!("{}/readyz", daemon.base);
    wait_for_answer(&mut daemon, &url, "healthz answering 200", &|s, _| s == 200).await;
    let (pid, body) = make_the_daemons_writes_fail(&env, &mut daemon, &url).await;
    assert!(names_the_storage_error(&body), "{body}");
    let ready = get(&readyz).await;
    assert!(
        matches!(&ready, Some((503, _, b)) if b.contains("writes to the database fail")),
        "{ready:?}"
    );
    set_file_size_limit(pid, u64::MAX);
    wait_for_answer(&mut daemon, &url, "healthz recovering", &|s, _| s == 200).await;
    common::wait_until("the request runs", Duration::from_secs(30), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE outcome = 'ok'",
        ) == 1
    })
    .await;
}

/// The same with no business enabled (a daemon that only stores webhook
/// deliveries, or waits for businesses to be enabled): nothing it writes
/// changed a row once the failed request was withdrawn (its lag table is
/// empty, so rewriting it deletes nothing), so nothing cleared the failure
/// after the disk had room again, and `/readyz` at 503 withheld the very
/// deliveries whose writes would have cleared it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_recovers_with_no_business_enabled_once_writes_work_again() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &admin_overrides("127.0.0.1:0", QUIET),
    )
    .await;
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    assert!(fixture.contains("[[businesses]]\n"), "{fixture}");
    std::fs::write(
        &env.fixture,
        fixture.replace("[[businesses]]\n", "[[businesses]]\nenabled = false\n"),
    )
    .unwrap();
    let mut daemon = daemon_whose_file_size_limit_can_be_lowered(&env).await;
    let url = format!("{}/healthz", daemon.base);
    let readyz = format!("{}/readyz", daemon.base);
    wait_for_answer(&mut daemon, &url, "healthz answering 200", &|s, _| s == 200).await;
    let (pid, body) = make_the_daemons_writes_fail(&env, &mut daemon, &url).await;
    assert!(names_the_storage_error(&body), "{body}");
    // The lag table is rewritten every second while writes fail: each
    // failure was logged, 3,600 warnings an hour onto what is likely the
    // same full disk. Once at first, then at most once a minute.
    wait_for_answer(&mut daemon, &url, "writes failing for 4 s", &|s, b| {
        s == 503 && failing_for(b).is_some_and(|secs| secs >= 4.0)
    })
    .await;
    let lag_warnings = || {
        std::fs::read_to_string(&daemon.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("cannot record the schedules' lag"))
            .count()
    };
    assert_eq!(
        lag_warnings(),
        1,
        "{}",
        std::fs::read_to_string(&daemon.log).unwrap()
    );
    env.sql().execute("DELETE FROM sync_requests", []).unwrap();
    set_file_size_limit(pid, u64::MAX);
    wait_for_answer(&mut daemon, &url, "healthz recovering", &|s, _| s == 200).await;
    wait_for_answer(&mut daemon, &readyz, "readyz recovering", &|s, _| s == 200).await;
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let again = log
        .lines()
        .find(|l| l.contains("the schedules' lag is recorded again"))
        .unwrap_or_else(|| panic!("{log}"));
    // About one try a second: with no schedule the timer spun every 5 ms,
    // and rewrote the table 200 times a second while writes failed.
    let field = |name: &str| -> i64 {
        again
            .split_once(&format!("{name}="))
            .and_then(|(_, v)| v.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {again}"))
    };
    let (secs, attempts) = (field("failed_for_secs"), field("attempts"));
    assert!(attempts <= secs + 3, "{again}");
}

/// How long `/healthz` says writes have failed, if it says so.
fn failing_for(body: &str) -> Option<f64> {
    let (_, rest) = body.split_once("writes to the database fail (")?;
    let (_, rest) = rest.split_once(") for ")?;
    rest.split_once(" s")?.0.parse().ok()
}

/// `[admin]` for the tests of failing writes: a failure is cleared once
/// writes have worked for `stale_after_secs`, at most 30 s; 3 s here.
const QUIET: &str = "stale_after_secs = 3\n";

/// The pid the mirror's lock file names (the daemon's).
fn daemon_pid(env: &Env) -> u32 {
    leadsync::store::ProcessLock::holder(&env.database()).expect("the daemon's pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_admin_address_needs_allow_remote() {
    let env = Env::small().await;
    env.set_overrides(&format!("{FAST}\n[admin]\nlisten = \"0.0.0.0:9187\"\n"));
    let out = env.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("admin.listen") && text(&out).contains("allow_remote"),
        "{}",
        text(&out)
    );
    env.set_overrides(&format!(
        "{FAST}\n[admin]\nlisten = \"0.0.0.0:9187\"\nallow_remote = true\n"
    ));
    let out = env.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    env.set_overrides(&format!("{FAST}\n[admin]\nlisten = \"localhost\"\n"));
    let out = env.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_stops_the_daemon_with_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &admin_overrides(&format!("127.0.0.1:{port}"), ""),
    )
    .await;
    let out = env.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("admin.listen: cannot listen on"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_stopping() {
    let env = Env::new(
        SandboxOptions {
            leads_per_business: 5,
            faults: Faults {
                latency_ms: 3000,
                ..Faults::default()
            },
            ..SandboxOptions::default()
        },
        false,
        &admin_overrides("127.0.0.1:0", ""),
    )
    .await;
    let (mut daemon, _) = Daemon::start(&env, &[]).await;
    let base = daemon.base.clone();
    wait_metrics(&mut daemon, "the first passes", |s| {
        value(s, "leadsync_sync_passes_total", &[("outcome", "ok")]) >= 3.0
    })
    .await;
    assert_eq!(get(&format!("{base}/readyz")).await.map(|r| r.0), Some(200));
    // A send in flight holds the shutdown open for a while.
    let lead = env.first_leads(1)[0].clone();
    env.sql()
        .execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [&lead],
        )
        .expect("insert");
    // Its request has reached the sandbox (a stop no longer sends a request
    // that was not out yet).
    common::wait_until("the row is in flight", Duration::from_secs(60), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM outbox WHERE state = 'sending'",
        ) == 1
            && env.sandbox.stats().by_route.get("job-status").copied() == Some(1)
    })
    .await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    while std::time::Instant::now() < end {
        match get(&format!("{base}/readyz")).await {
            Some((503, _, body)) => {
                seen = Some(body);
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => break,
        }
    }
    let body = seen.expect("/readyz answered 503 during the shutdown");
    assert!(body.contains("stopping"), "{body}");
    let status = daemon.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}
