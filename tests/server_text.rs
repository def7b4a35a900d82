//! Text the server chose is stored as it was sent (the mirror is data the
//! user cannot get back) and cleaned only where it is shown: `sync` and
//! `drain` print no character that drives a terminal.

mod common;

use common::{Env, FAST, text};
use leadsync::sandbox::{Pagination, SandboxOptions};
use std::io::{Read, Write};
use std::time::Duration;

/// A server that answers every request with `status`, `content_type` and
/// `body`, one request a connection.
fn answering(status: &str, content_type: &str, body: &[u8]) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (status, content_type, body) =
        (status.to_string(), content_type.to_string(), body.to_vec());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            // The request's head (the bodies these requests carry are small).
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    addr
}

/// A 400 problem detail (RFC 9457) with this `detail`.
fn problem_400(detail: &str) -> String {
    serde_json::json!({
        "type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail,
    })
    .to_string()
}

/// A server answering every request with the 400 `problem`.
fn answering_problem_400(problem: &str) -> std::net::SocketAddr {
    answering(
        "400 Bad Request",
        "application/problem+json",
        problem.as_bytes(),
    )
}

fn point_at(env: &Env, addr: std::net::SocketAddr) {
    env.set_overrides(&FAST.replacen(
        "[api]\n",
        &format!("[api]\nbase_url = \"http://{addr}\"\n"),
        1,
    ));
}

/// What a hostile server puts after a line break of its text, to forge a
/// line of leadsync's own.
const FORGED: &str = "leadsync: ok";

/// No character that drives a terminal, and no line the server made: a
/// line break of its text would start a line that reads as leadsync's.
/// `sync_runs.error` of the last pass that failed, as stored.
fn last_sync_error(env: &Env) -> String {
    env.sql()
        .query_row(
            "SELECT error FROM sync_runs WHERE outcome = 'error' ORDER BY started_at DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

fn assert_no_terminal_control(what: &str, out: &str) {
    assert!(
        !out.contains(['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}']),
        "{what} printed a terminal-driving character: {out:?}"
    );
    assert!(
        !out.lines().any(|l| l.trim_start().starts_with(FORGED)
            || l.trim_start().starts_with("line\ttwo")
            || l.trim_start().starts_with("line two")),
        "{what} printed a line the server made: {out:?}"
    );
}

/// A ProblemDetails `detail` of several lines, with a tab and an escape
/// sequence, is kept byte for byte in `sync_runs.error` and the outbox
/// row's `last_error`; `sync` and `drain` print it cleaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_problem_detail_is_stored_as_sent_and_printed_clean() {
    let env = Env::new(Default::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let b = env.business_ids()[0].clone();
    let lead = env.sandbox.lead_ids(&b)[0].clone();

    let detail = "line one\nline\ttwo \u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m\u{202e}end";
    let problem = problem_400(detail);
    point_at(&env, answering_problem_400(&problem));

    let sync = env.run(&["sync", "--business", &b]);
    assert_eq!(sync.status.code(), Some(1), "{}", text(&sync));
    assert_no_terminal_control("sync", &text(&sync));
    assert!(
        String::from_utf8_lossy(&sync.stdout).contains("line one line two"),
        "{}",
        text(&sync)
    );
    let stored = last_sync_error(&env);
    assert!(stored.contains(detail), "sync_runs.error: {stored:?}");

    let id = env.run_ok(&[
        "enqueue",
        "--negotiation",
        &lead,
        "--status",
        "appt_scheduled",
        "--at",
        "2024-06-14T09:30:00Z",
    ]);
    let id: i64 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
    let drain = env.run(&["drain"]);
    assert_eq!(drain.status.code(), Some(1), "{}", text(&drain));
    assert_no_terminal_control("drain", &text(&drain));
    let (state, last_error): (String, String) = env
        .sql()
        .query_row(
            "SELECT state, last_error FROM outbox WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(state, "dead");
    assert!(last_error.contains(detail), "last_error: {last_error:?}");
}

/// A 200 HTML page (a proxy's login page, say) is no API answer: `sync`
/// names it with an excerpt of the page, which reached its summary line as
/// the server wrote it (an OSC title change, BEL, a one-character CSI).
/// The summary shows the excerpt blanked; `sync_runs.error` keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_page_in_a_sync_summary_is_printed_clean() {
    let env = Env::new(Default::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let b = env.business_ids()[0].clone();
    let page = "<p>\u{1b}]0;x\u{7}\u{9b}2J</p>";
    point_at(&env, answering("200 OK", "text/html", page.as_bytes()));
    let sync = env.run(&["sync", "--business", &b]);
    assert_eq!(sync.status.code(), Some(1), "{}", text(&sync));
    let stdout = String::from_utf8_lossy(&sync.stdout).to_string();
    assert!(stdout.contains("HTML page"), "{stdout}");
    assert_no_terminal_control("sync", &text(&sync));
    let stored = last_sync_error(&env);
    assert!(stored.contains(page), "sync_runs.error: {stored:?}");
}

/// Kills the daemon if a test fails before stopping it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With the daemon running, `sync` prints the daemon's answer: one line
/// per business, as a local pass prints it. A detail of several lines
/// split the business's line (the daemon stored the summary unblanked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_answers_a_sync_request_one_line_per_business() {
    let never =
        "\n[poll]\npage_size = 10\nschedule = \"0 0 0 1 1 *\"\nfull_schedule = \"0 0 0 1 1 *\"\n";
    let env = Env::new(
        Default::default(),
        false,
        &FAST.replace("[poll]\npage_size = 10\n", never),
    )
    .await;
    let b = env.business_ids()[0].clone();
    let detail = "line one\nline\ttwo \u{1b}[2J\u{9b}31m end";
    let problem =
        serde_json::json!({"title": "Bad Request", "status": 400, "detail": detail}).to_string();
    let addr = answering(
        "400 Bad Request",
        "application/problem+json",
        problem.as_bytes(),
    );
    env.set_overrides(&FAST.replace("[poll]\npage_size = 10\n", never).replacen(
        "[api]\n",
        &format!("[api]\nbase_url = \"http://{addr}\"\n"),
        1,
    ));
    let _daemon = Running(env.spawn_daemon());
    common::wait_until_blocking("the daemon's first pass", Duration::from_secs(30), || {
        env.daemon_log().contains("leadsync started")
            && common::count(
                &env.sql(),
                "SELECT count(*) FROM sync_runs WHERE outcome = 'error'",
            ) > 0
    });
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sync_requests row"),
        "{}",
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_no_terminal_control("sync", &out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(&format!("{b}: FAILED")), "{out}");
    assert!(lines[0].contains("line one line two"), "{out}");
    assert_eq!(lines[1], "1 of 1 businesses failed", "{out}");
}

/// A 503 ProblemDetails is retried: each retry's warning names the error.
/// The error's text went out as the server wrote it in that warning (a
/// tracing field is not escaped), a line break starting a forged line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_read_warns_without_the_servers_line_breaks_or_escapes() {
    let env = Env::new(Default::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let b = env.business_ids()[0].clone();
    let detail = format!("x\n{FORGED}\u{1b}]0;owned\u{7}");
    let problem = serde_json::json!({
        "type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": detail,
    })
    .to_string();
    let addr = answering(
        "503 Service Unavailable",
        "application/problem+json",
        problem.as_bytes(),
    );
    env.set_overrides(
        &FAST
            .replace("read_retries = 0", "read_retries = 2")
            .replacen(
                "[api]\n",
                &format!("[api]\nbase_url = \"http://{addr}\"\n"),
                1,
            ),
    );
    let sync = env.run(&["sync", "--business", &b]);
    assert_eq!(sync.status.code(), Some(1), "{}", text(&sync));
    let stderr = String::from_utf8_lossy(&sync.stderr).to_string();
    assert!(stderr.contains("retrying"), "{stderr}");
    assert_no_terminal_control("sync", &text(&sync));
    let stored = last_sync_error(&env);
    assert!(stored.contains(&detail), "sync_runs.error: {stored:?}");
}

/// A proxy to `to` that answers `400` with `problem` to a request whose
/// line contains `refuse`, one request a connection.
fn refusing(to: std::net::SocketAddr, refuse: &str, problem: &str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (refuse, problem) = (refuse.to_string(), problem.to_string());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request).to_string();
            let Some((line, rest)) = head.split_once("\r\n") else {
                continue;
            };
            if line.contains(&refuse) {
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{problem}",
                        problem.len()
                    )
                    .as_bytes(),
                );
                continue;
            }
            let Ok(mut upstream) = std::net::TcpStream::connect(to) else {
                continue;
            };
            let _ = upstream.write_all(format!("{line}\r\nconnection: close\r\n{rest}").as_bytes());
            let mut answer = Vec::new();
            let _ = upstream.read_to_end(&mut answer);
            let _ = conn.write_all(&answer);
        }
    });
    addr
}

/// A full offset page's proof (its last lead asked back) refused with a
/// detail of several lines: the pass reads on and finishes with a note
/// quoting the refusal, which its warning printed as the server wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_offset_proof_is_noted_without_the_servers_line_breaks_or_escapes() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 30,
            pagination: Pagination::Offset,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let detail = format!("no\n{FORGED}\u{1b}]0;owned\u{7}\u{9b}2J");
    let problem = problem_400(&detail);
    point_at(&env, refusing(env.sandbox.addr(), "offset=9", &problem));
    let sync = env.run(&["sync", "--full"]);
    assert_eq!(sync.status.code(), Some(0), "{}", text(&sync));
    let out = text(&sync);
    assert!(out.contains("was refused"), "{out}");
    assert!(out.contains("pass finished with a note"), "{out}");
    assert_no_terminal_control("sync", &out);
    let stored: String = env
        .sql()
        .query_row(
            "SELECT error FROM sync_runs WHERE outcome = 'ok' ORDER BY started_at DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(stored.contains(&detail), "sync_runs.error: {stored:?}");
}

/// `auth exchange` stores the grant, then lists its businesses: a refusal
/// of that list, a detail of several lines, was printed as the server
/// wrote it in the exchange's warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_business_list_warns_without_the_servers_line_breaks_or_escapes() {
    let env = common::oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let detail = format!("no\n{FORGED}\u{1b}]0;owned\u{7}\u{9b}2J");
    let problem = problem_400(&detail);
    point_at(&env, answering_problem_400(&problem));
    let file = env.dir.path().join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = env.run(&[
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("cannot list the grant's businesses"), "{out}");
    assert!(out.contains("leadsync: ok"), "{out}");
    assert_no_terminal_control("auth exchange", &out);
}

/// A server that answers a `GET` with `list` and a `POST` with `201` and
/// `created`, one request a connection.
fn webhooks_server(list: String, created: String) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let (status, body) = if request.starts_with(b"POST") {
                ("201 Created", &created)
            } else {
                ("200 OK", &list)
            };
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    addr
}

/// The webhook id Thumbtack chose, printed by `webhooks register` in its
/// `registered` and `already registered` lines, went out as the server
/// wrote it: a line break in it forged a line, an escape drove the terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_id_is_printed_clean() {
    let env = Env::new(Default::default(), false, FAST).await;
    let password = common::write(env.dir.path(), "webhook_password", "correct horse");
    let hostile = format!("w1\n{FORGED}\u{1b}]0;owned\u{7}\u{9b}2J");
    let public_url = "https://partner.example/thumbtack";
    let register = |addr: std::net::SocketAddr| {
        env.set_overrides(&format!(
            "{}\n[webhooks]\nlisten = \"127.0.0.1:0\"\npath = \"/thumbtack\"\n\
             public_url = \"{public_url}\"\nusername = \"thumbtack\"\npassword_file = \"{}\"\n",
            FAST.replacen(
                "[api]\n",
                &format!("[api]\nbase_url = \"http://{addr}\"\n"),
                1
            ),
            password.display()
        ));
        env.run(&["webhooks", "register"])
    };
    let created = serde_json::json!({"webhookID": hostile}).to_string();
    let o = register(webhooks_server(r#"{"data":[]}"#.into(), created));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("registered "), "{out}");
    assert_no_terminal_control("webhooks register", &out);
    // Already there: the id in the `already registered` line.
    let listed = serde_json::json!({"data": [{
        "webhookID": hostile, "webhookURL": public_url, "enabled": true,
        "eventTypes": leadsync::thumbtack::webhook::DEFAULT_EVENTS, "authType": "basic",
    }]})
    .to_string();
    let o = register(webhooks_server(listed, "{}".into()));
    let out = text(&o);
    assert!(out.contains("already registered "), "{out}");
    assert_no_terminal_control("webhooks register", &out);
}
