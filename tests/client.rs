//! The Thumbtack client against the sandbox: pagination, each response
//! class of SPEC §4, Retry-After, the rate budget, payload fidelity, and the
//! sandbox's token rotation.

mod common;

use common::{Env, FAST};
use leadsync::sandbox::{Faults, SandboxOptions};
use leadsync::thumbtack::model::JobStatusBody;
use leadsync::thumbtack::paging::{Cursor, End, Listing, Step};
use leadsync::thumbtack::{Client, ClientSettings, Disposition};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn client(env: &Env) -> Arc<Client> {
    let config = env.config();
    let auth = Arc::new(leadsync::app::open_auth(&config, None, HashMap::new()).unwrap());
    Arc::new(Client::new(ClientSettings::from_config(&config), auth).unwrap())
}

/// A client reading bodies of at most `max_body_bytes`, talking to the
/// server at `addr` instead of the sandbox when given.
fn capped_client(env: &Env, addr: Option<std::net::SocketAddr>, max_body_bytes: usize) -> Client {
    let config = env.config();
    let auth = Arc::new(leadsync::app::open_auth(&config, None, HashMap::new()).unwrap());
    let mut settings = ClientSettings::from_config(&config);
    if let Some(addr) = addr {
        settings.base_url = format!("http://{addr}");
    }
    settings.max_body_bytes = max_body_bytes;
    Client::new(settings, auth).unwrap()
}

async fn all_pages(c: &Client, business: &str, limit: u32) -> (Vec<String>, Vec<String>) {
    let (mut ids, mut payloads) = (Vec::new(), Vec::new());
    let mut listing = Listing::new(c.base_url(), limit).expect("base URL");
    let mut cursor = listing.first();
    loop {
        let page = c.list_page(business, &cursor).await.expect("page");
        let step = listing.advance(&page).expect("pagination");
        for l in page.leads {
            ids.push(l.negotiation_id);
            payloads.push(l.payload);
        }
        match step {
            Step::Next(next) | Step::Confirm(next) => cursor = next,
            Step::End(end) => {
                assert_eq!(end, End::Known);
                return (ids, payloads);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_reads_every_lead_exactly_as_served() {
    let env = Env::small().await;
    let c = client(&env);
    let b = env.business_ids()[0].clone();
    let (ids, payloads) = all_pages(&c, &b, 7).await;
    assert_eq!(
        ids,
        env.sandbox.lead_ids(&b),
        "every lead, newest first, once"
    );
    assert_eq!(env.sandbox.list_requests(&b), 9, "60 leads by 7 is 9 pages");
    for (id, payload) in ids.iter().zip(&payloads) {
        assert_eq!(
            Some(payload.clone()),
            env.sandbox.lead_json(id),
            "byte for byte"
        );
    }
    assert!(
        payloads
            .iter()
            .any(|p| p.contains("\"bigNumber\":9007199254740993"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_above_the_maximum_is_clamped_and_followed() {
    let env = Env::new(
        SandboxOptions {
            max_page_size: 25,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let c = client(&env);
    let b = env.business_ids()[1].clone();
    let first = c.list_page(&b, &Cursor::first(500)).await.unwrap();
    assert_eq!(first.leads.len(), 25);
    let (ids, _) = all_pages(&c, &b, 500).await;
    assert_eq!(ids.len(), 60);
}

async fn fault_error(env: &Env, c: &Client, faults: Faults) -> leadsync::thumbtack::ApiError {
    env.sandbox.set_faults(faults);
    let b = env.business_ids()[0].clone();
    let e = c
        .list_page(&b, &Cursor::first(10))
        .await
        .expect_err("the fault fails the read");
    env.sandbox.set_faults(Faults::default());
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transient_failure_is_classified_retry() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST.replace("timeout_secs = 5", "timeout_secs = 1"),
    )
    .await;
    let c = client(&env);

    let e = fault_error(
        &env,
        &c,
        Faults {
            error_5xx: 1.0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(e.disposition, Disposition::Retry);
    assert!(matches!(e.http_status, Some(500 | 502 | 503)), "{e:?}");

    let asked = Instant::now();
    let e = fault_error(
        &env,
        &c,
        Faults {
            rate_429: 1.0,
            retry_after_secs: 2,
            ..Default::default()
        },
    )
    .await;
    let took = asked.elapsed();
    assert_eq!(e.disposition, Disposition::Retry);
    assert_eq!(e.http_status, Some(429));
    let ra = e.retry_after.expect("Retry-After parsed");
    // As an HTTP date, 2 to 3 s after the sandbox wrote it, counted from
    // when the client read it: what a loaded machine spent in between
    // (at most `took`) is gone from it.
    assert!(
        ra + took >= Duration::from_secs(2) && ra <= Duration::from_secs(4),
        "{ra:?} ({took:?} for the request)"
    );
    assert!(
        c.budget().paused_for().is_some(),
        "a 429 pauses every request of the process"
    );

    let e = fault_error(
        &env,
        &c,
        Faults {
            waf_202: 1.0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (e.disposition, e.http_status),
        (Disposition::Retry, Some(202))
    );
    assert!(e.message.contains("WAF"), "{}", e.message);

    let e = fault_error(
        &env,
        &c,
        Faults {
            timeout: 1.0,
            timeout_ms: 3000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((e.disposition, e.http_status), (Disposition::Retry, None));
    assert!(e.message.contains("timed out"), "{}", e.message);

    let e = fault_error(
        &env,
        &c,
        Faults {
            reset: 1.0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((e.disposition, e.http_status), (Disposition::Retry, None));

    let e = fault_error(
        &env,
        &c,
        Faults {
            malformed: 1.0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(e.disposition, Disposition::Retry);
    assert!(e.message.contains("unreadable"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_sends_both_retry_after_forms_and_both_parse() {
    let env = Env::small().await;
    env.sandbox.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 2,
        ..Default::default()
    });
    let b = env.business_ids()[0].clone();
    let token = env.sandbox.static_token(&b).unwrap();
    let http = common::http_client();
    let (mut seconds, mut dates) = (0, 0);
    for _ in 0..20 {
        let (sent, sent_at) = (chrono::Utc::now(), Instant::now());
        let r = http
            .get(format!(
                "{}/api/v4/businesses/{b}/negotiations",
                env.sandbox.base_url()
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        let value = r.headers()["retry-after"].to_str().unwrap().to_string();
        if value.parse::<u64>().is_ok() {
            seconds += 1;
        } else {
            dates += 1;
        }
        // Counted from before the request and from after the answer: the
        // sandbox wrote it in between, however long a loaded machine took.
        let parse = |now| {
            leadsync::thumbtack::problem::parse_retry_after(&value, now, Duration::from_secs(60))
                .unwrap_or_else(|| panic!("{value:?} does not parse"))
        };
        let (from_sent, from_now) = (parse(sent), parse(chrono::Utc::now()));
        assert!(
            from_sent >= Duration::from_secs(1) && from_now <= Duration::from_secs(4),
            "{value:?} -> {from_sent:?} from the request, {from_now:?} now ({:?} apart)",
            sent_at.elapsed()
        );
    }
    assert!(
        seconds > 0 && dates > 0,
        "{seconds} in seconds, {dates} as dates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_retried_with_backoff_until_they_succeed() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST.replace("read_retries = 0", "read_retries = 8"),
    )
    .await;
    let c = client(&env);
    env.sandbox.set_faults(Faults {
        error_5xx: 0.5,
        reset: 0.1,
        ..Default::default()
    });
    let b = env.business_ids()[2].clone();
    let (ids, _) = all_pages(&c, &b, 10).await;
    assert_eq!(ids.len(), 60);
    assert!(
        env.sandbox.stats().faults_injected > 0,
        "the faults did strike"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_forbidden_businesses_and_missing_leads() {
    let env = Env::small().await;
    let ids = env.business_ids();
    // 401 with a static token that stays refused: the business needs re-authorization.
    std::fs::write(
        env.dir.path().join("fixture/tokens").join(&ids[0]),
        "not-a-valid-token\n",
    )
    .unwrap();
    // 403: a token of another business.
    let other = env.sandbox.static_token(&ids[2]).unwrap();
    std::fs::write(env.dir.path().join("fixture/tokens").join(&ids[1]), other).unwrap();
    let c = client(&env);

    let e = c.list_page(&ids[0], &Cursor::first(10)).await.unwrap_err();
    assert_eq!(e.disposition, Disposition::Reauth, "{e:?}");
    assert!(c.auth().blocked().contains(&ids[0]));

    let e = c.list_page(&ids[1], &Cursor::first(10)).await.unwrap_err();
    assert_eq!(
        (e.disposition, e.http_status),
        (Disposition::Retry, Some(403))
    );
    assert!(e.message.contains("does not grant"), "{}", e.message);

    let e = c
        .get_negotiation(&ids[2], "100000000000000000")
        .await
        .unwrap_err();
    assert_eq!(
        (e.disposition, e.http_status),
        (Disposition::Dead, Some(404))
    );
    assert!(
        e.trace_id.as_deref().is_some_and(|t| !t.is_empty()),
        "{e:?}"
    );
    assert!(e.message.contains("traceID"), "{}", e.message);

    let lead = env.sandbox.lead_ids(&ids[2])[0].clone();
    let raw = c.get_negotiation(&ids[2], &lead).await.unwrap();
    assert_eq!(Some(raw), env.sandbox.lead_json(&lead));

    env.sandbox.refuse(&lead);
    let body = JobStatusBody {
        status: "job_complete".into(),
        partner_status_changed_at: "2024-06-14T09:30:00Z".into(),
        invoice_amount_in_cents: Some(125000),
    };
    let d = c.post_job_status(&ids[2], &lead, &body).await;
    let e = d.result.unwrap_err();
    assert_eq!(
        (e.disposition, e.http_status),
        (Disposition::Dead, Some(400))
    );
    assert!(e.trace_id.is_some());
    assert_eq!(d.exchanges.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_access_token_is_refreshed_once_for_concurrent_callers() {
    let env = Env::new(
        SandboxOptions {
            access_token_ttl_secs: 3,
            ..Default::default()
        },
        true,
        FAST,
    )
    .await;
    let c = client(&env);
    let b = env.business_ids()[0].clone();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (c, b) = (c.clone(), b.clone());
            tokio::spawn(async move { c.list_page(&b, &Cursor::first(5)).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("every concurrent read succeeds");
    }
    let refreshes = env
        .sandbox
        .stats()
        .by_route
        .get("token refresh_token")
        .copied();
    assert_eq!(
        refreshes,
        Some(1),
        "one refresh for twelve concurrent callers"
    );
    // After expiry, the next call refreshes (with the rotated token, never the used one).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    c.list_page(&b, &Cursor::first(5))
        .await
        .expect("read after expiry");
    let stats = env.sandbox.stats();
    assert_eq!(stats.by_route.get("token refresh_token").copied(), Some(2));
    assert_eq!(stats.reused_refresh_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_budget_is_shared_by_every_caller() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST.replace(
            "max_requests_per_second = 1000",
            "max_requests_per_second = 20",
        ),
    )
    .await;
    let c = client(&env);
    let ids = env.business_ids();
    let start = Instant::now();
    let calls: Vec<_> = (0..11)
        .map(|i| {
            let (c, b) = (c.clone(), ids[i % 3].clone());
            tokio::spawn(async move { c.list_page(&b, &Cursor::first(5)).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // 11 requests at 20/s: the last may start no sooner than 500 ms after the first.
    assert!(
        start.elapsed() >= Duration::from_millis(490),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_refuses_a_reused_refresh_token() {
    let env = Env::small().await;
    let b = env.business_ids()[0].clone();
    let rt = env.sandbox.mint_refresh_token(&b);
    let (id, secret) = env.sandbox.client_credentials();
    let http = common::http_client();
    let post = |token: String| {
        http.post(env.sandbox.token_url())
            .basic_auth(&id, Some(&secret))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", token.as_str()),
                ("audience", "urn:partner-api"),
            ])
            .send()
    };
    let first: serde_json::Value = post(rt.clone()).await.unwrap().json().await.unwrap();
    assert!(first["access_token"].is_string() && first["refresh_token"].is_string());
    assert_ne!(
        first["refresh_token"].as_str(),
        Some(rt.as_str()),
        "rotated"
    );
    let second = post(rt).await.unwrap();
    assert_eq!(second.status(), 400);
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_status_is_posted_with_the_original_instant_and_user_agent() {
    let env = Env::small().await;
    let c = client(&env);
    let b = env.business_ids()[0].clone();
    let lead = env.sandbox.lead_ids(&b)[3].clone();
    let body = JobStatusBody {
        status: "invoice_paid".into(),
        partner_status_changed_at: "2024-06-14T09:30:00.250Z".into(),
        invoice_amount_in_cents: Some(0),
    };
    let d = c.post_job_status(&b, &lead, &body).await;
    assert!(d.result.is_ok(), "{:?}", d.result);
    let got = env.sandbox.deliveries();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].negotiation_id, lead);
    assert_eq!(got[0].partner_status_changed_at, "2024-06-14T09:30:00.250Z");
    assert_eq!(got[0].invoice_amount_in_cents, Some(0));
    assert_eq!(
        got[0].user_agent.as_deref(),
        Some(concat!("leadsync/", env!("CARGO_PKG_VERSION")))
    );
}

/// A server (or a proxy before it) answering with a body far larger than
/// any page: it is refused from its `Content-Length`, before a byte of it is
/// held, as a failed read the pass retries later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_larger_than_the_cap_is_refused_unread() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    let c = capped_client(&env, None, 64 << 10);
    let e = fault_error(
        &env,
        &c,
        Faults {
            oversized_body_bytes: (64 << 10) + 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (e.disposition, e.http_status),
        (Disposition::Retry, Some(200)),
        "{e:?}"
    );
    assert!(
        e.message.contains("larger than the 65536 bytes"),
        "{}",
        e.message
    );
    // The same body within the cap is read (and found not JSON).
    let e = fault_error(
        &env,
        &c,
        Faults {
            oversized_body_bytes: 64 << 10,
            ..Default::default()
        },
    )
    .await;
    assert!(!e.message.contains("larger than"), "{}", e.message);
}

/// A body without a length that never ends (a broken proxy, a hostile
/// server): reading stops at the cap with a clear error, instead of holding
/// whatever arrives until the request's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_is_cut_at_the_cap_not_held_until_the_timeout() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 8192];
        let _ = socket.read(&mut request).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 4096, " ".repeat(4096));
        let mut sent = 0u64;
        // Until the client hangs up (or far past any cap).
        while sent < (1 << 30) {
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 4096;
        }
        sent
    });
    let c = capped_client(&env, Some(addr), 1 << 20);
    let b = env.business_ids()[0].clone();
    let asked = Instant::now();
    let e = c
        .list_page(&b, &Cursor::first(10))
        .await
        .expect_err("an endless body is no page");
    assert_eq!(e.disposition, Disposition::Retry, "{e:?}");
    assert!(
        e.message.contains("larger than the 1048576 bytes"),
        "{}",
        e.message
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "cut at the cap, not at the 5 s timeout: {:?}",
        asked.elapsed()
    );
    let sent = served.await.unwrap();
    assert!(sent < 1 << 30, "the client hung up after {sent} bytes");
}

/// A reply (or a transition) that Thumbtack accepted — a 2xx — with a body
/// over the cap: the status says the server acted, and the body of a POST
/// is not needed (a message id at most). Taking it as a failed read made
/// the drainer send the reply again: a customer seeing it twice without
/// any crash, which the README admits only after a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_accepted_with_a_body_over_the_cap_is_sent_not_retried() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut posts = 0;
        // Two requests at most: the reply, and a resend if there is one.
        while posts < 2 {
            let Ok(Ok((mut socket, _))) =
                tokio::time::timeout(Duration::from_secs(3), listener.accept()).await
            else {
                break;
            };
            let mut request = vec![0u8; 8192];
            let _ = socket.read(&mut request).await;
            posts += 1;
            let body = " ".repeat(4096);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        }
        posts
    });
    let c = capped_client(&env, Some(addr), 1024);
    let b = env.business_ids()[0].clone();
    let body = leadsync::thumbtack::model::MessageBody {
        text: "On my way".into(),
    };
    let (d, message_id) = c.post_message(&b, "519153480500518912", &body).await;
    assert!(d.result.is_ok(), "{:?}", d.result);
    assert_eq!(message_id, None);
    assert_eq!(d.exchanges.last().and_then(|x| x.http_status), Some(200));
    // A list page is still refused: its body is what was asked for.
    let e = c
        .list_page(&b, &Cursor::first(10))
        .await
        .expect_err("a page over the cap is not read");
    assert_eq!(e.disposition, Disposition::Retry, "{e:?}");
    assert_eq!(served.await.unwrap(), 2, "one POST, one GET");
}

/// A refusal whose body is over the cap is still classified by its status
/// and headers: a 429's `Retry-After` is honoured (and the budget paused),
/// not taken for an unreadable 200-like failure retried at the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_with_a_body_over_the_cap_keeps_its_status_meaning() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0u8; 8192];
            let _ = socket.read(&mut request).await;
            let body = " ".repeat(4096);
            let head = format!(
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        }
    });
    let c = capped_client(&env, Some(addr), 1024);
    let b = env.business_ids()[0].clone();
    let body = leadsync::thumbtack::model::MessageBody {
        text: "On my way".into(),
    };
    let (d, _) = c.post_message(&b, "519153480500518912", &body).await;
    let e = d.result.expect_err("a 429");
    assert_eq!(e.disposition, Disposition::Retry, "{e:?}");
    assert_eq!(e.http_status, Some(429), "{e:?}");
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)), "{e:?}");
    assert!(
        c.budget().paused_for().is_some(),
        "the 429 pauses the budget"
    );
}

/// What a transition's POST makes of answers the sandbox does not give: a
/// 200 that is an HTML page (a proxy's or a captive portal's, not the
/// API's) is not taken as sent; a 204 without a body is sent; a 307 (which
/// would resend the POST elsewhere) is neither followed nor taken as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_answered_by_an_html_200_a_204_or_a_307() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answers = [
        "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: 39\r\nconnection: close\r\n\r\n<html><body>Please log in</body></html>",
        "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:9/elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ];
    let served = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut requests = 0;
        while let Ok(Ok((mut socket, _))) =
            tokio::time::timeout(Duration::from_secs(3), listener.accept()).await
        {
            let mut request = vec![0u8; 8192];
            let _ = socket.read(&mut request).await;
            let answer = answers.get(requests).copied().unwrap_or(answers[2]);
            requests += 1;
            let _ = socket.write_all(answer.as_bytes()).await;
        }
        requests
    });
    let c = capped_client(&env, Some(addr), 1 << 20);
    let b = env.business_ids()[0].clone();
    let body = JobStatusBody {
        status: "appt_scheduled".into(),
        partner_status_changed_at: "2024-06-14T09:30:00Z".into(),
        invoice_amount_in_cents: None,
    };
    let html = c.post_job_status(&b, "519153480500518912", &body).await;
    let e = html
        .result
        .expect_err("an HTML 200 is not the API's answer");
    assert_eq!(e.disposition, Disposition::Retry, "{e:?}");
    assert!(e.message.contains("not an API response"), "{e:?}");
    let empty = c.post_job_status(&b, "519153480500518912", &body).await;
    assert!(empty.result.is_ok(), "a 204 is sent: {:?}", empty.result);
    let moved = c.post_job_status(&b, "519153480500518912", &body).await;
    let e = moved.result.expect_err("a redirect is not a success");
    assert_eq!(e.disposition, Disposition::Retry, "{e:?}");
    assert!(
        e.message
            .contains("redirected to http://127.0.0.1:9/elsewhere"),
        "{e:?}"
    );
    assert_eq!(
        served.await.unwrap(),
        3,
        "one request each: nothing followed"
    );
}

/// An answer that quotes the bearer token it was sent (a gateway echoing the
/// request, a debug page): the text kept from it (the error message, which
/// goes to outbox.last_error, sync_runs.error, businesses.last_error and the
/// logs) shows the mask, never the token nor a prefix of it cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_echoing_the_bearer_token_is_kept_masked() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Each answer quotes the token ({T}); the HTML one so that the excerpt
    // kept (120 characters) ends inside it.
    let answers: Vec<(&str, &str, String)> = vec![
        (
            "400 Bad Request",
            "application/problem+json",
            r#"{"type":"about:blank","title":"Bad Request {T}","status":400,"detail":"token {T} is not valid here"}"#.to_string(),
        ),
        (
            "502 Bad Gateway",
            "text/html",
            format!("<html><body>{}{{T}}</body></html>", "x".repeat(100)),
        ),
        ("404 Not Found", "text/plain", "no route for Bearer {T}\n".to_string()),
        ("200 OK", "text/html", "<html>hello {T}</html>".to_string()),
    ];
    let served = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tokens = Vec::new();
        for (status, kind, body) in answers {
            let Ok(Ok((mut socket, _))) =
                tokio::time::timeout(Duration::from_secs(30), listener.accept()).await
            else {
                break;
            };
            let mut request = Vec::new();
            let mut buf = vec![0u8; 8192];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request).to_string();
            let token = request
                .lines()
                .find_map(|l| {
                    l.strip_prefix("authorization: Bearer ")
                        .or(l.strip_prefix("Authorization: Bearer "))
                })
                .unwrap_or("")
                .trim()
                .to_string();
            let body = body.replace("{T}", &token);
            tokens.push(token);
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
        tokens
    });
    let c = capped_client(&env, Some(addr), 1 << 20);
    let b = env.business_ids()[0].clone();
    let body = JobStatusBody {
        status: "appt_scheduled".into(),
        partner_status_changed_at: "2024-06-14T09:30:00Z".into(),
        invoice_amount_in_cents: None,
    };
    let mut messages = Vec::new();
    for _ in 0..4 {
        let sent = c.post_job_status(&b, "519153480500518912", &body).await;
        let e = sent.result.expect_err("every answer is an error");
        let logged: Vec<String> = sent
            .exchanges
            .iter()
            .filter_map(|x| x.error.clone())
            .collect();
        messages.push((e.message, logged));
    }
    let tokens = served.await.unwrap();
    assert_eq!(tokens.len(), 4);
    let token = &tokens[0];
    assert!(token.len() >= 16, "the static token was sent: {token:?}");
    for (message, logged) in &messages {
        for text in std::iter::once(message).chain(logged) {
            assert!(
                !text.contains(&token[..8]),
                "token (or its start) kept: {text}"
            );
        }
    }
    assert!(messages[0].0.contains("********"), "{}", messages[0].0);
    assert!(messages[2].0.contains("********"), "{}", messages[2].0);
}

/// A page's `read_at` is when its request went out, after its wait for the
/// rate budget (or a token, or a 429 pause), not when it was asked for: the
/// server made the page no earlier, and a webhook delivery is compared with
/// it (review of schema 21: stamped before the wait, a page that waited 30 s
/// behind a 429 pause looked 30 s older than it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pages_read_at_is_taken_after_its_wait_for_the_rate_budget() {
    let env = Env::small().await;
    let config = env.config();
    let auth = Arc::new(leadsync::app::open_auth(&config, None, HashMap::new()).unwrap());
    let mut settings = ClientSettings::from_config(&config);
    settings.max_requests_per_second = 2.0;
    let c = Client::new(settings, auth).unwrap();
    let b = env.business_ids()[0].clone();
    let cursor = Listing::new(c.base_url(), 10).expect("base URL").first();
    let mut waited = false;
    for _ in 0..4 {
        let asked = leadsync::time::now();
        let page = c.list_page(&b, &cursor).await.expect("page");
        let read_at = page.read_at.expect("read_at");
        assert!(read_at >= asked, "{read_at} before {asked}");
        let gap = leadsync::time::parse(&read_at).unwrap() - leadsync::time::parse(&asked).unwrap();
        // At 2 requests a second, a request after the first waits ~0.5 s.
        waited |= gap >= chrono::TimeDelta::milliseconds(300);
    }
    assert!(
        waited,
        "no page's read_at came after its wait for the budget"
    );
}
