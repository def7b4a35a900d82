//! Text the server chose is stored as it was sent (the mirror is data the
//! user cannot get back) and cleaned only where it is shown: `sync` and
//! `drain` print no character that drives a terminal.

mod common;

use common::{Env, FAST, text};
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

fn point_at(env: &Env, addr: std::net::SocketAddr) {
    env.set_overrides(&FAST.replacen(
        "[api]\n",
        &format!("[api]\nbase_url = \"http://{addr}\"\n"),
        1,
    ));
}

fn assert_no_terminal_control(what: &str, out: &str) {
    assert!(
        !out.contains(['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}']),
        "{what} printed a terminal-driving character: {out:?}"
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
    let problem = serde_json::json!({
        "type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail,
    })
    .to_string();
    point_at(
        &env,
        answering(
            "400 Bad Request",
            "application/problem+json",
            problem.as_bytes(),
        ),
    );

    let sync = env.run(&["sync", "--business", &b]);
    assert_eq!(sync.status.code(), Some(1), "{}", text(&sync));
    assert_no_terminal_control("sync", &text(&sync));
    assert!(
        String::from_utf8_lossy(&sync.stdout).contains("line one line two"),
        "{}",
        text(&sync)
    );
    let stored: String = env
        .sql()
        .query_row(
            "SELECT error FROM sync_runs WHERE outcome = 'error' ORDER BY started_at DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
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
    let stored: String = env
        .sql()
        .query_row(
            "SELECT error FROM sync_runs WHERE outcome = 'error' ORDER BY started_at DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
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
