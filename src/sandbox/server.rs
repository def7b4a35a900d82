//! The sandbox's HTTP side: routes of SPEC §5, the token endpoint, faults,
//! and `/_sandbox/*` control routes for a sandbox run as its own process.

use super::data;
use super::{Delivery, Faults, Mutation, Reply, State};
use crate::thumbtack::model::JOB_STATUSES;
use anyhow::{Result, anyhow};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

type Shared = Arc<Mutex<State>>;

/// The scopes every token the sandbox issues carries.
const SCOPES: &str =
    "supply::negotiations.read supply::negotiations.write supply::businesses.list offline_access";

/// Returned by a handler to drop the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("sandbox fault: connection reset")]
struct Reset;

pub(super) async fn serve(listener: TcpListener, state: Shared, stop: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { handle(state, req).await.map(CutBody::apply) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A response body that announces its whole length, sends half of it, then
/// fails: the server closes the connection mid-body, after the status and
/// headers went out. Put on a response as an extension to cut it. Fields:
/// the part still to send, the length announced, whether it was not ready
/// once already.
#[derive(Clone)]
struct CutBody(Option<Bytes>, u64, bool);

impl CutBody {
    fn apply(
        r: Response<Full<Bytes>>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, BodyError>> {
        let cut = r.extensions().get::<CutBody>().is_some();
        r.map(|body| {
            if !cut {
                return body.map_err(|never| match never {}).boxed();
            }
            let len = hyper::body::Body::size_hint(&body).exact().unwrap_or(0);
            let full = bytes_of(body);
            let half = full.slice(..full.len() / 2);
            CutBody(Some(half), len.max(1), false).boxed()
        })
    }
}

/// The bytes of a `Full` body, already in memory.
fn bytes_of(body: Full<Bytes>) -> Bytes {
    use std::task::{Context, Poll};
    let mut body = std::pin::pin!(body);
    let waker = std::task::Waker::noop();
    match hyper::body::Body::poll_frame(body.as_mut(), &mut Context::from_waker(waker)) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

impl hyper::body::Body for CutBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        if let Some(part) = self.0.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(part))));
        }
        // Once not ready: the server flushes the head and the first part
        // before the failure closes the connection.
        if !self.2 {
            self.2 = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Some(Err("sandbox fault: body cut".into())))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.1)
    }
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

fn trace_id(state: &Shared) -> String {
    let mut s = lock(state);
    format!("{:016x}{:016x}", s.rng.u64(..), s.rng.u64(..))
}

/// A ProblemDetails response with a traceID, as Thumbtack sends.
fn problem(state: &Shared, status: StatusCode, title: &str, detail: &str) -> Response<Full<Bytes>> {
    problem_with_errors(state, status, title, detail, None)
}

/// [`problem`] with the field errors (`errors`) a validation failure carries.
fn problem_with_errors(
    state: &Shared,
    status: StatusCode,
    title: &str,
    detail: &str,
    errors: Option<Value>,
) -> Response<Full<Bytes>> {
    let mut body = json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "traceID": trace_id(state),
    });
    if let Some(errors) = errors {
        body["errors"] = errors;
    }
    let mut r = json_response(status, &body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

async fn handle(state: Shared, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Reset> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(Reset),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };

    check_headers(&state, &method, &segments, &headers);
    match (&method, segments.as_slice()) {
        (&Method::POST, ["oauth2", "token"]) => {
            let (response, hold, lose) = token_endpoint(&state, header("authorization"), &body);
            // The token is already rotated: a client that gives up now loses it.
            if hold.ms > 0 {
                tokio::time::sleep(Duration::from_millis(hold.ms)).await;
            }
            if let Some(gate) = hold.gate {
                gate.cancelled().await;
            }
            if lose {
                return Err(Reset);
            }
            Ok(response)
        }
        (_, ["_sandbox", rest @ ..]) => Ok(control(&state, &method, rest, &body)),
        (_, ["api", "v4", rest @ ..]) => {
            let route = match (&method, rest) {
                (&Method::GET, ["businesses", b, "negotiations"]) => format!("list {b}"),
                (&Method::GET, ["negotiations", _]) => "get".to_string(),
                (&Method::POST, ["negotiations", _, "job-status"]) => "job-status".to_string(),
                (m, ["businesses", _, "webhooks", ..]) => format!("webhooks {m}"),
                (&Method::GET, ["negotiations", _, "messages"]) => "messages".to_string(),
                (&Method::POST, ["negotiations", _, "messages"]) => "reply".to_string(),
                _ => "unknown".to_string(),
            };
            let faults = {
                let mut s = lock(&state);
                s.count(route);
                s.faults.clone()
            };
            if faults.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
            }
            if method == Method::GET
                && matches!(rest, ["negotiations", _, "messages"])
                && let Some(r) = messages_get_fault(&state, &faults).await
            {
                return Ok(r);
            }
            let host = header("host").unwrap_or_else(|| "127.0.0.1".into());
            if let Some(r) = inject_fault(&state, &faults, &method, &host, &path).await? {
                return Ok(r);
            }
            if lock(&state).token_faults.missing_scope {
                return Ok(problem(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "required scope(s) [supply::negotiations.write] not found",
                ));
            }
            let Some(granted) = authenticate(&state, header("authorization")) else {
                return Ok(problem(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "invalid token. failure reason(s): [token is not active]",
                ));
            };
            // A grant covers several businesses: act as the one the request is about.
            let about = match rest {
                ["businesses", b, "negotiations"] => Some((*b).to_string()),
                ["negotiations", n, ..] => {
                    let s = lock(&state);
                    s.find_lead(n).map(|(bi, _)| s.businesses[bi].id.clone())
                }
                _ => None,
            };
            let business = match about {
                Some(b) if granted.contains(&b) => b,
                _ => granted.first().cloned().unwrap_or_default(),
            };
            let mut response = match (&method, rest) {
                (&Method::GET, ["businesses"]) => businesses_of(&state, &granted, &query),
                (&Method::GET, ["businesses", b, "negotiations"]) => {
                    let page = list(&state, &business, b, &query, &host);
                    if faults.list_hold_ms > 0 {
                        lock(&state).stats.lists_held += 1;
                        tokio::time::sleep(Duration::from_millis(faults.list_hold_ms)).await;
                    }
                    page
                }
                (&Method::GET, ["negotiations", n]) => get_one(&state, &business, n),
                (&Method::POST, ["negotiations", n, "job-status"]) => {
                    job_status(&state, &business, n, &body, header("user-agent"))
                }
                (&Method::GET, ["businesses", b, "webhooks"]) if *b == business => {
                    let page = super::webhooks::list_page(&lock(&state), b, &query, &host);
                    match page {
                        Ok(v) => json_response(StatusCode::OK, &v),
                        Err(e) => problem(&state, StatusCode::BAD_REQUEST, "Bad Request", &e),
                    }
                }
                (m, ["businesses", b, "webhooks", rest @ ..]) if *b == business => {
                    webhooks_api(&state, m, b, rest, &body)
                }
                (_, ["businesses", b, "webhooks", ..]) => problem(
                    &state,
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("this token does not grant access to business {b}"),
                ),
                (&Method::GET, ["negotiations", n, "messages"]) => {
                    list_messages(&state, &business, n, &query)
                }
                (&Method::POST, ["negotiations", n, "messages"]) => {
                    reply(&state, &business, n, &body, header("user-agent"))
                }
                _ => problem(
                    &state,
                    StatusCode::NOT_FOUND,
                    "Not Found",
                    &format!("no route for {method} {path}"),
                ),
            };
            // The delivery is recorded: its answer may still be lost.
            if method == Method::POST
                && matches!(rest, ["negotiations", _, "job-status" | "messages"])
                && response.status().is_success()
                && faults.lose_after_accept > 0.0
            {
                let mut s = lock(&state);
                if s.rng.f64() < faults.lose_after_accept {
                    s.stats.faults_injected += 1;
                    return Err(Reset);
                }
            }
            // Successes carry a trace id too (errors have theirs in the body).
            if response.status().is_success()
                && let Ok(v) = HeaderValue::from_str(&trace_id(&state))
            {
                response.headers_mut().insert("x-trace-id", v);
            }
            // Accepted, and the status goes out: the body is cut short
            // (see [`CutBody`]).
            if method == Method::POST
                && matches!(rest, ["negotiations", _, "job-status" | "messages"])
                && response.status().is_success()
                && faults.cut_body_after_accept > 0.0
            {
                let mut s = lock(&state);
                if s.rng.f64() < faults.cut_body_after_accept {
                    s.stats.faults_injected += 1;
                    response.extensions_mut().insert(CutBody(None, 0, false));
                }
            }
            Ok(response)
        }
        _ => Ok(problem(
            &state,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("no route for {method} {path}"),
        )),
    }
}

/// Records the headers SPEC §5 names that a client request lacked
/// ([`super::Stats::missing_headers`]) and the `user-agent` it sent.
fn check_headers(state: &Shared, method: &Method, segments: &[&str], headers: &HeaderMap) {
    let route = match (method, segments) {
        (&Method::POST, ["oauth2", "token"]) => "token".to_string(),
        (_, ["api", "v4", "businesses", b, "negotiations"]) => format!("list {b}"),
        (m, ["api", "v4", rest @ ..]) => format!("{m} {}", rest.first().unwrap_or(&"")),
        _ => return,
    };
    let value = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
    };
    let mut missing = Vec::new();
    if !value(hyper::header::ACCEPT).contains("application/json") {
        missing.push("accept");
    }
    let agent = value(hyper::header::USER_AGENT).trim().to_string();
    if agent.is_empty() {
        missing.push("user-agent");
    }
    if route != "token" && !value(hyper::header::AUTHORIZATION).starts_with("Bearer ") {
        missing.push("authorization");
    }
    let mut s = lock(state);
    if !agent.is_empty() {
        s.stats.user_agents.insert(agent);
    }
    for h in missing {
        *s.stats
            .missing_headers
            .entry(format!("{route}: {h}"))
            .or_default() += 1;
    }
}

/// The answer [`Faults::messages_get`] gives a `GET` of a lead's messages
/// instead of serving it, if any.
async fn messages_get_fault(state: &Shared, f: &Faults) -> Option<Response<Full<Bytes>>> {
    use super::MessagesGetFault as M;
    let r = match f.messages_get {
        M::Served => return None,
        M::Error500 => problem(
            state,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            "sandbox fault",
        ),
        M::MissingScope401 => problem(
            state,
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "required scope(s) [supply::messages.read] not found",
        ),
        M::Html200 => respond(
            StatusCode::OK,
            "text/html",
            "<html><body>Please wait while we check your browser</body></html>",
        ),
        M::Hang => {
            tokio::time::sleep(Duration::from_millis(f.timeout_ms.max(1))).await;
            respond(
                StatusCode::GATEWAY_TIMEOUT,
                "text/plain",
                "upstream timed out",
            )
        }
    };
    lock(state).stats.faults_injected += 1;
    Some(r)
}

/// Rolls the dice for the configured faults; `Some` is the faulted answer.
async fn inject_fault(
    state: &Shared,
    f: &Faults,
    method: &Method,
    host: &str,
    path: &str,
) -> Result<Option<Response<Full<Bytes>>>, Reset> {
    let roll = |s: &mut State, p: f64| p > 0.0 && s.rng.f64() < p;
    if f.oversized_body_bytes > 0 {
        lock(state).stats.faults_injected += 1;
        let body = vec![b' '; usize::try_from(f.oversized_body_bytes).unwrap_or(usize::MAX)];
        return Ok(Some(respond(StatusCode::OK, "application/json", body)));
    }
    enum Fault {
        Reset,
        Timeout,
        ServerError(u16, bool),
        TooMany(bool),
        Waf,
        Malformed,
        Redirect,
        Html404,
    }
    let fault = {
        let mut s = lock(state);
        let scripted = s.faults.script.pop_front();
        let fault = if let Some(scripted) = scripted {
            use crate::sandbox::ScriptedFault as S;
            match scripted {
                S::Served => None,
                S::Reset => Some(Fault::Reset),
                S::Timeout => Some(Fault::Timeout),
                S::Html503 => Some(Fault::ServerError(503, true)),
                S::Problem500 => Some(Fault::ServerError(500, false)),
                S::Rate429 => Some(Fault::TooMany(false)),
                S::Rate429Date => Some(Fault::TooMany(true)),
                S::Waf202 => Some(Fault::Waf),
                S::Malformed => Some(Fault::Malformed),
                S::Redirect => Some(Fault::Redirect),
                S::Html404 => Some(Fault::Html404),
            }
        } else if roll(&mut s, f.reset) {
            Some(Fault::Reset)
        } else if roll(&mut s, f.timeout) {
            Some(Fault::Timeout)
        } else if roll(&mut s, f.error_5xx) {
            let code = [500, 502, 503][s.rng.usize(0..3)];
            Some(Fault::ServerError(code, s.rng.bool()))
        } else if roll(&mut s, f.rate_429) {
            Some(Fault::TooMany(s.rng.bool()))
        } else if roll(&mut s, f.waf_202) {
            Some(Fault::Waf)
        } else if roll(&mut s, f.malformed) {
            Some(Fault::Malformed)
        } else if roll(&mut s, f.redirect) {
            Some(Fault::Redirect)
        } else if roll(&mut s, f.html_404) {
            Some(Fault::Html404)
        } else {
            None
        };
        if fault.is_some() {
            s.stats.faults_injected += 1;
        }
        fault
    };
    Ok(match fault {
        None => None,
        Some(Fault::Reset) => return Err(Reset),
        Some(Fault::Timeout) => {
            tokio::time::sleep(Duration::from_millis(f.timeout_ms.max(1))).await;
            Some(respond(
                StatusCode::GATEWAY_TIMEOUT,
                "text/plain",
                "upstream timed out",
            ))
        }
        Some(Fault::ServerError(code, html)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some(if html {
                respond(
                    status,
                    "text/html",
                    format!(
                        "<html><head><title>{code}</title></head><body><h1>{code} {}</h1><hr>nginx</body></html>",
                        status.canonical_reason().unwrap_or("")
                    ),
                )
            } else {
                problem(
                    state,
                    status,
                    status.canonical_reason().unwrap_or("Error"),
                    "sandbox fault",
                )
            })
        }
        Some(Fault::TooMany(as_date)) => {
            let mut r = problem(
                state,
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                "rate limited",
            );
            let value = if as_date {
                // An HTTP date has whole seconds: round up so the wait is never shorter.
                let at =
                    chrono::Utc::now() + chrono::Duration::seconds(f.retry_after_secs as i64 + 1);
                at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
            } else {
                f.retry_after_secs.to_string()
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert("retry-after", v);
            }
            Some(r)
        }
        Some(Fault::Waf) => Some(respond(
            StatusCode::ACCEPTED,
            "text/html",
            "<html><body><script>/* challenge */</script></body></html>",
        )),
        Some(Fault::Redirect) => {
            let mut r = respond(
                StatusCode::MOVED_PERMANENTLY,
                "text/html",
                "<html><body>Moved</body></html>",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("http://{host}/moved{path}")) {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            Some(r)
        }
        Some(Fault::Html404) => Some(respond(
            StatusCode::NOT_FOUND,
            "text/html",
            "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n<body><h1>Not Found</h1><hr>nginx</body></html>\n",
        )),
        Some(Fault::Malformed) => Some(if method == Method::GET {
            respond(
                StatusCode::OK,
                "application/json",
                r#"{"data":[{"negotiationID":"1","#,
            )
        } else {
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                "{not json",
            )
        }),
    })
}

/// The businesses a bearer token grants, if it is valid now.
fn authenticate(state: &Shared, authorization: Option<String>) -> Option<Vec<String>> {
    let token = authorization?.strip_prefix("Bearer ")?.trim().to_string();
    let s = lock(state);
    if let Some(b) = s.static_tokens.get(&token) {
        return Some(vec![b.clone()]);
    }
    match s.access_tokens.get(&token) {
        Some((b, expires)) if Instant::now() < *expires => Some(b.clone()),
        _ => None,
    }
}

/// `GET /api/v4/businesses`: the businesses the token covers, a page of
/// them from `?offset=` (`limit` at most the page size: 20, or the
/// `business_page_size` fault), `pagination: {limit}` only, as Thumbtack
/// answers.
fn businesses_of(state: &Shared, granted: &[String], query: &str) -> Response<Full<Bytes>> {
    let mut s = lock(state);
    let params: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    let size = match s.faults.business_page_size {
        0 => 20,
        n => n,
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .map_or(size, |l| l.min(size));
    let offset = params
        .get("offset")
        .and_then(|o| o.parse::<usize>().ok())
        .unwrap_or(0);
    if let (n @ 1.., Some(secs)) = (
        s.faults.business_fail_first,
        s.faults.business_fail_retry_after,
    ) {
        s.faults.business_fail_first = n - 1;
        let mut r = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"title": "Too Many Requests", "status": 429}),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        return r;
    }
    if s.faults.business_fail_first > 0 || (offset > 0 && s.faults.business_offset_503) {
        s.faults.business_fail_first = s.faults.business_fail_first.saturating_sub(1);
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"title": "Service Unavailable", "status": 503}),
        );
    }
    let offset = if s.faults.offset_as_page {
        offset.saturating_mul(limit)
    } else {
        offset
    };
    let data: Vec<Value> = granted
        .iter()
        .filter_map(|id| s.business(id))
        .skip(offset)
        .take(limit)
        .map(|b| json!({"businessID": b.id, "name": b.name, "imageURL": null}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"data": data, "pagination": {"limit": limit}}),
    )
}

/// The client credentials of a Basic header: each part form-urlencoded
/// before base64 (RFC 6749 §2.3.1).
fn basic_credentials(authorization: Option<&str>) -> Option<(String, String)> {
    let b = authorization?.strip_prefix("Basic ")?;
    let pair = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .ok()?;
    let pair = String::from_utf8(pair).ok()?;
    let (id, secret) = pair.split_once(':')?;
    let decode = |v: &str| -> Option<String> {
        let m: HashMap<String, String> = serde_urlencoded::from_str(&format!("v={v}")).ok()?;
        m.get("v").cloned().or(Some(String::new()))
    };
    Some((decode(id)?, decode(secret)?))
}

/// Page tokens are opaque to clients: an offset, scrambled, tied to the business.
fn page_token(business: &str, offset: usize) -> String {
    format!("{:x}.{:x}", offset as u64 ^ 0x5a5a_a5a5, tag(business))
}

fn tag(business: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(business.as_bytes()) & 0xffff
}

fn offset_of(business: &str, token: &str) -> Option<usize> {
    let (o, t) = token.split_once('.')?;
    (u64::from_str_radix(t, 16).ok()? == tag(business))
        .then(|| {
            u64::from_str_radix(o, 16)
                .ok()
                .map(|o| (o ^ 0x5a5a_a5a5) as usize)
        })
        .flatten()
}

fn list(
    state: &Shared,
    token_business: &str,
    business: &str,
    query: &str,
    host: &str,
) -> Response<Full<Bytes>> {
    if token_business != business {
        return problem(
            state,
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("this token does not grant access to business {business}"),
        );
    }
    let params: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    let s = lock(state);
    let Some(b) = s.business(business) else {
        drop(s);
        return problem(
            state,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("business {business} not found"),
        );
    };
    let max = s.options.max_page_size.max(1);
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => 20.min(max),
        Some(Ok(l)) if l >= 1 => l.min(max),
        Some(_) => {
            drop(s);
            return problem(
                state,
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "limit must be a positive integer",
            );
        }
    };
    let offset = match (params.get("pageToken"), params.get("offset")) {
        (None, None) => 0,
        (None, Some(_)) if s.faults.offset_503 => {
            drop(s);
            return respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/html",
                "<html><body>503 Service Unavailable</body></html>".to_string(),
            );
        }
        (None, Some(_)) if s.faults.reject_offset => {
            drop(s);
            return problem(
                state,
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "unknown query parameter: offset",
            );
        }
        (None, Some(o))
            if s.faults.reject_unaligned_offset
                && o.parse::<usize>().is_ok_and(|o| o % limit != 0) =>
        {
            drop(s);
            return problem(
                state,
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "offset must be a multiple of limit",
            );
        }
        (None, Some(o)) => match o.parse::<usize>() {
            Ok(_) if s.faults.ignore_offset => 0,
            Ok(o) if s.faults.offset_as_page => o.saturating_mul(limit),
            Ok(o) => o,
            Err(_) => {
                drop(s);
                return problem(
                    state,
                    StatusCode::BAD_REQUEST,
                    "Bad Request",
                    "offset must be a non-negative integer",
                );
            }
        },
        (Some(t), _) => match offset_of(business, t) {
            Some(o) => o,
            None => {
                drop(s);
                return problem(
                    state,
                    StatusCode::BAD_REQUEST,
                    "Bad Request",
                    "invalid pageToken",
                );
            }
        },
    };
    let end = (offset + limit).min(b.leads.len());
    let items: Vec<&str> = b
        .leads
        .get(offset.min(end)..end)
        .unwrap_or(&[])
        .iter()
        .map(|l| l.json.as_str())
        .collect();
    let more = end < b.leads.len();
    if s.options.pagination == super::Pagination::Bare {
        return respond(
            StatusCode::OK,
            "application/json",
            format!("[{}]", items.join(",")),
        );
    }
    // The host `next` names: this one, unless a fault names another.
    let next_host = s
        .faults
        .next_host
        .clone()
        .unwrap_or_else(|| host.to_string());
    let mut body = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 256);
    body.push_str("{\"data\":[");
    body.push_str(&items.join(","));
    body.push_str("],\"pagination\":{");
    // Each marker after the first is written with its leading comma.
    let mark = body.len();
    if !s.faults.no_limit_echo {
        body.push_str(&format!("\"limit\":{limit}"));
    }
    match s.options.pagination {
        super::Pagination::Token => {
            if more {
                body.push_str(&format!(
                    ",\"nextPageToken\":\"{}\"",
                    page_token(business, end)
                ));
            }
        }
        super::Pagination::Next => {
            body.push_str(&format!(",\"offset\":{offset}"));
            if more {
                // As Thumbtack's other v4 lists: this host, a path without `/api`.
                let next = format!(
                    "http://{next_host}/v4/businesses/{business}/negotiations?limit={limit}&offset={end}"
                );
                body.push_str(&format!(",\"next\":{}", json_string(&next)));
            }
        }
        super::Pagination::NextToken => {
            if more {
                let next = format!(
                    "http://{next_host}/v4/businesses/{business}/negotiations?limit={limit}&pageToken={}",
                    page_token(business, end)
                );
                body.push_str(&format!(",\"next\":{}", json_string(&next)));
            }
        }
        super::Pagination::Bare => {}
        super::Pagination::Offset => body.push_str(&format!(",\"offset\":{offset}")),
        super::Pagination::None => {}
    }
    if body[mark..].starts_with(',') {
        body.remove(mark);
    }
    body.push_str("}}");
    respond(StatusCode::OK, "application/json", body)
}

/// `s` as a JSON string (a `next_host` set through `/_sandbox/faults` may
/// hold any characters).
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn get_one(state: &Shared, token_business: &str, negotiation_id: &str) -> Response<Full<Bytes>> {
    let found = {
        let s = lock(state);
        s.find_lead(negotiation_id).map(|(bi, li)| {
            (
                s.businesses[bi].id.clone(),
                s.businesses[bi].leads[li].json.clone(),
            )
        })
    };
    match found {
        Some((b, json)) if b == token_business => respond(StatusCode::OK, "application/json", json),
        Some(_) => problem(
            state,
            StatusCode::FORBIDDEN,
            "Forbidden",
            "this token does not grant access to this negotiation",
        ),
        None => problem(
            state,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("negotiation {negotiation_id} not found"),
        ),
    }
}

fn job_status(
    state: &Shared,
    token_business: &str,
    negotiation_id: &str,
    body: &[u8],
    user_agent: Option<String>,
) -> Response<Full<Bytes>> {
    let bad = |detail: &str| problem(state, StatusCode::BAD_REQUEST, "Bad Request", detail);
    let owner = {
        let s = lock(state);
        s.find_lead(negotiation_id)
            .map(|(bi, _)| s.businesses[bi].id.clone())
    };
    match owner {
        None => {
            return problem(
                state,
                StatusCode::NOT_FOUND,
                "Not Found",
                &format!("negotiation {negotiation_id} not found"),
            );
        }
        Some(b) if b != token_business => {
            return problem(
                state,
                StatusCode::FORBIDDEN,
                "Forbidden",
                "this token does not grant access to this negotiation",
            );
        }
        Some(_) => {}
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return bad("the body must be a JSON object");
    };
    let Some(status) = body.get("status").and_then(Value::as_str) else {
        return bad("status is required");
    };
    if !JOB_STATUSES.contains(&status) {
        return bad(&format!(
            "status must be one of {}",
            JOB_STATUSES.join(", ")
        ));
    }
    let Some(at) = body.get("partnerStatusChangedAt").and_then(Value::as_str) else {
        return bad("partnerStatusChangedAt is required");
    };
    if chrono::DateTime::parse_from_rfc3339(at).is_err() {
        return bad("partnerStatusChangedAt must be an RFC 3339 timestamp");
    }
    let amount = match body.get("invoiceAmountInCents") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(a) if a >= 0 && matches!(status, "job_complete" | "invoice_paid") => Some(a),
            Some(a) if a >= 0 => {
                return bad("invoiceAmountInCents applies only to job_complete and invoice_paid");
            }
            _ => return bad("invoiceAmountInCents must be a non-negative integer"),
        },
    };
    let mut s = lock(state);
    if s.refuse.contains(negotiation_id) {
        drop(s);
        return problem_with_errors(
            state,
            StatusCode::BAD_REQUEST,
            "Invalid transition",
            &format!("negotiation {negotiation_id} does not accept the transition to {status}"),
            Some(
                json!({"status": [format!("{status} is not allowed in the negotiation's state")]}),
            ),
        );
    }
    let seq = s.deliveries.len() as u64 + 1;
    s.deliveries.push(Delivery {
        seq,
        negotiation_id: negotiation_id.to_string(),
        business_id: token_business.to_string(),
        status: status.to_string(),
        partner_status_changed_at: at.to_string(),
        invoice_amount_in_cents: amount,
        received_at: crate::time::now(),
        user_agent,
    });
    drop(s);
    json_response(
        StatusCode::OK,
        &json!({"negotiationID": negotiation_id, "status": status}),
    )
}

/// The refusal when the lead does not exist or the token's business does
/// not own it; `None` when it may be used.
fn not_owned(
    state: &Shared,
    token_business: &str,
    negotiation_id: &str,
) -> Option<Response<Full<Bytes>>> {
    let owner = {
        let s = lock(state);
        s.find_lead(negotiation_id)
            .map(|(bi, _)| s.businesses[bi].id.clone())
    };
    match owner {
        None => Some(problem(
            state,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("negotiation {negotiation_id} not found"),
        )),
        Some(b) if b != token_business => Some(problem(
            state,
            StatusCode::FORBIDDEN,
            "Forbidden",
            "this token does not grant access to this negotiation",
        )),
        Some(_) => None,
    }
}

/// `GET /negotiations/{id}/messages`: `limit` 1–20 (default 10), `sentBefore`
/// and `sentAfter` (exclusive), newest first, `{"data", "pagination": {"limit"}}`.
fn list_messages(
    state: &Shared,
    token_business: &str,
    negotiation_id: &str,
    query: &str,
) -> Response<Full<Bytes>> {
    if let Some(r) = not_owned(state, token_business, negotiation_id) {
        return r;
    }
    let bad = |detail: &str| problem(state, StatusCode::BAD_REQUEST, "Bad Request", detail);
    let params: HashMap<String, String> = match serde_urlencoded::from_str(query) {
        Ok(p) => p,
        Err(_) => return bad("the query string cannot be read"),
    };
    let (ignore_limit, page_size, outage) = {
        let f = &lock(state).faults;
        (f.ignore_message_limit, f.message_page_size, f.messages_503)
    };
    if outage {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/html",
            "<html><body>503 Service Unavailable</body></html>".to_string(),
        );
    }
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        _ if page_size > 0 => page_size,
        _ if ignore_limit => 10,
        None => 10,
        Some(Ok(l)) if (1..=20).contains(&l) => l,
        Some(_) => return bad("limit must be an integer from 1 to 20"),
    };
    let mut bounds = [None, None];
    for (i, key) in ["sentBefore", "sentAfter"].iter().enumerate() {
        if let Some(t) = params.get(*key) {
            match chrono::DateTime::parse_from_rfc3339(t) {
                Ok(t) => bounds[i] = Some(t.with_timezone(&chrono::Utc)),
                Err(_) => return bad(&format!("{key} must be an RFC 3339 timestamp")),
            }
        }
    }
    let [mut before, after] = bounds;
    if lock(state).faults.ignore_sent_before {
        before = None;
    }
    if lock(state).refuse.contains(negotiation_id) {
        return problem(
            state,
            StatusCode::FORBIDDEN,
            "Forbidden",
            "message history is available for active leads only",
        );
    }
    let items: Vec<String> = {
        let mut s = lock(state);
        let Some(conversation) = s.conversation(negotiation_id) else {
            drop(s);
            return problem(
                state,
                StatusCode::NOT_FOUND,
                "Not Found",
                &format!("negotiation {negotiation_id} not found"),
            );
        };
        conversation
            .iter()
            .rev()
            .filter(|m| before.is_none_or(|b| m.sent_at < b))
            .filter(|m| after.is_none_or(|a| m.sent_at > a))
            .take(limit)
            .map(|m| m.json.clone())
            .collect()
    };
    let pagination = match ignore_limit || page_size > 0 {
        true => String::new(),
        false => format!(",\"pagination\":{{\"limit\":{limit}}}"),
    };
    respond(
        StatusCode::OK,
        "application/json",
        format!("{{\"data\":[{}]{pagination}}}", items.join(",")),
    )
}

/// `POST /negotiations/{id}/messages` with `{"text"}`: recorded, appended to
/// the conversation as from the business, answered with the message.
fn reply(
    state: &Shared,
    token_business: &str,
    negotiation_id: &str,
    body: &[u8],
    user_agent: Option<String>,
) -> Response<Full<Bytes>> {
    if let Some(r) = not_owned(state, token_business, negotiation_id) {
        return r;
    }
    let bad = |detail: &str| problem(state, StatusCode::BAD_REQUEST, "Bad Request", detail);
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return bad("the body must be a JSON object");
    };
    let text = match body.get("text").and_then(Value::as_str) {
        Some(t) if !t.trim().is_empty() => t,
        _ => return bad("text is required"),
    };
    if text.chars().count() > 5000 {
        return bad("text must be at most 5000 characters");
    }
    let mut s = lock(state);
    if s.refuse.contains(negotiation_id) {
        drop(s);
        return problem(
            state,
            StatusCode::BAD_REQUEST,
            "Invalid message",
            &format!("negotiation {negotiation_id} does not accept messages"),
        );
    }
    let Some(m) = s.append_message(negotiation_id, "Business", text) else {
        drop(s);
        return problem(
            state,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("negotiation {negotiation_id} not found"),
        );
    };
    let seq = s.replies.len() as u64 + 1;
    s.replies.push(Reply {
        seq,
        negotiation_id: negotiation_id.to_string(),
        business_id: token_business.to_string(),
        message_id: m.id.clone(),
        text: text.to_string(),
        received_at: crate::time::now(),
        user_agent,
    });
    drop(s);
    respond(StatusCode::CREATED, "application/json", m.json)
}

/// How long a token answer is held back after the token was rotated.
#[derive(Default)]
struct Hold {
    ms: u64,
    /// Until it is cancelled ([`super::Sandbox::hold_refresh_answers`],
    /// [`super::Sandbox::hold_code_answers`]).
    gate: Option<tokio_util::sync::CancellationToken>,
}

/// The token endpoint: the answer, how long to hold it, and whether to
/// drop the connection instead (after the token was rotated).
fn token_endpoint(
    state: &Shared,
    authorization: Option<String>,
    body: &[u8],
) -> (Response<Full<Bytes>>, Hold, bool) {
    let now_answer = |r| (r, Hold::default(), false);
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let mut s = lock(state);
    let client_ok = basic_credentials(authorization.as_deref())
        .is_some_and(|(id, secret)| id == s.options.client_id && secret == s.options.client_secret);
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    s.count(format!("token {grant}"));
    let faults = s.token_faults.clone();
    if !s.token_faults.before_rotate.is_empty() {
        let status = s.token_faults.before_rotate.remove(0);
        s.stats.faults_injected += 1;
        if status == 0 {
            return (
                respond(StatusCode::OK, "text/plain", ""),
                Hold::default(),
                true,
            );
        }
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut r = if code.is_server_error() {
            respond(
                code,
                "text/html",
                format!("<html><body><h1>{status} gateway</h1></body></html>"),
            )
        } else if code.is_redirection() || code == StatusCode::NOT_FOUND {
            // A moved or mistyped `oauth.token_url`: a proxy's page, no
            // OAuth error in it.
            respond(
                code,
                "text/html",
                format!("<html><body><h1>{status}</h1><hr>nginx</body></html>"),
            )
        } else {
            respond(code, "text/plain", "")
        };
        if code.is_redirection() {
            r.headers_mut().insert(
                hyper::header::LOCATION,
                HeaderValue::from_static("https://elsewhere.invalid/oauth2/token"),
            );
        }
        if status == 429 {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        return now_answer(r);
    }
    if !client_ok || faults.invalid_client {
        return now_answer(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        ));
    }
    if let Some(error) = &faults.client_error {
        return now_answer(oauth_error(
            StatusCode::BAD_REQUEST,
            error,
            "the sandbox refuses this client (token_faults.client_error)",
        ));
    }
    if faults.proxy_oauth_failed
        || form.get("audience").map(String::as_str) != Some("urn:partner-api")
    {
        return now_answer(oauth_error(
            StatusCode::BAD_GATEWAY,
            "proxy_oauth_failed",
            "audience must be urn:partner-api",
        ));
    }
    if s.token_faults.oversized_refusal > 0 {
        s.token_faults.oversized_refusal -= 1;
        let body = format!(
            "{}{}",
            json!({"error": "invalid_grant", "error_description": "refused (padded)"}),
            " ".repeat(2 << 20)
        );
        return now_answer(respond(StatusCode::BAD_REQUEST, "application/json", body));
    }
    let businesses = match grant.as_str() {
        "refresh_token" => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            let grace = Duration::from_secs(faults.grace_secs);
            let (businesses, used) = match s.refresh_tokens.get(&presented) {
                None => {
                    return now_answer(oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "unknown refresh token",
                    ));
                }
                Some(e) => (e.businesses.clone(), e.used.clone()),
            };
            if let Some((at, answer, rotated_to)) = used {
                if s.token_faults.throttle_reused > 0 {
                    s.token_faults.throttle_reused -= 1;
                    return now_answer(oauth_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "slow_down",
                        "too many requests",
                    ));
                }
                // The same request again, within the grace period, while its
                // successor is unused: the same answer (its response was lost).
                let successor_unused = s
                    .refresh_tokens
                    .get(&rotated_to)
                    .is_some_and(|e| e.used.is_none());
                if at.elapsed() <= grace && successor_unused {
                    s.stats.grace_replays += 1;
                    return now_answer(json_response(StatusCode::OK, &answer));
                }
                s.stats.reused_refresh_tokens += 1;
                let description = if faults.echo_token_in_errors {
                    format!("refresh token {presented} has already been used")
                } else {
                    "refresh token has already been used".to_string()
                };
                return now_answer(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    &description,
                ));
            }
            businesses
        }
        "authorization_code" => {
            if form.get("redirect_uri").is_none_or(|u| u.is_empty()) {
                return now_answer(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "redirect_uri is required",
                ));
            }
            let code = form.get("code").cloned().unwrap_or_default();
            match s.auth_codes.remove(&code) {
                Some(b) => b,
                None => {
                    return now_answer(oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "unknown or used authorization code",
                    ));
                }
            }
        }
        other => {
            return now_answer(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("grant_type {other:?} is not supported"),
            ));
        }
    };
    let ttl = s.options.access_token_ttl_secs;
    // JWT-shaped (unsigned): `leadsync probe` reads the scopes from it.
    let sub = businesses.first().cloned().unwrap_or_default();
    let claims = json!({"sub": sub, "aud": "urn:partner-api", "scope": SCOPES});
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let access = format!(
        "{}.{}.{}",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string()),
        s.token("sbx_at_")
    );
    let keep = grant == "refresh_token" && s.token_faults.keep_refresh_token > 0;
    if keep {
        s.token_faults.keep_refresh_token -= 1;
    }
    let refresh = s.token("sbx_rt_");
    s.access_tokens.insert(
        access.clone(),
        (
            businesses.clone(),
            Instant::now() + Duration::from_secs(ttl),
        ),
    );
    s.refresh_tokens.insert(
        refresh.clone(),
        super::RefreshEntry {
            businesses,
            used: None,
        },
    );
    let mut answer = json!({
        "access_token": access,
        "token_type": "bearer",
        "expires_in": faults.expires_in.clone().unwrap_or_else(|| json!(ttl)),
        "refresh_token": refresh,
        "scope": SCOPES,
    });
    if keep {
        // No rotation: the presented refresh token stays the valid one.
        if let Some(o) = answer.as_object_mut() {
            o.remove("refresh_token");
        }
        s.refresh_tokens.remove(&refresh);
        return now_answer(json_response(StatusCode::OK, &answer));
    }
    let mut hold = Hold::default();
    let mut lose = false;
    if grant == "authorization_code" {
        hold = Hold {
            ms: 0,
            gate: s.code_gate.clone(),
        };
    }
    if grant == "refresh_token" {
        let presented = form.get("refresh_token").cloned().unwrap_or_default();
        if let Some(e) = s.refresh_tokens.get_mut(&presented) {
            e.used = Some((Instant::now(), answer.clone(), refresh));
        }
        s.stats.rotations += 1;
        hold = Hold {
            ms: faults.hold_after_rotate_ms,
            gate: s.refresh_gate.clone(),
        };
        if s.token_faults.padded_access_token_after_rotate > 0 {
            s.token_faults.padded_access_token_after_rotate -= 1;
            let mut padded = answer.clone();
            let access = answer["access_token"].as_str().unwrap_or_default();
            padded["access_token"] = json!(format!("{access}\n"));
            return (json_response(StatusCode::OK, &padded), hold, false);
        }
        if s.token_faults.no_access_token_after_rotate > 0 {
            s.token_faults.no_access_token_after_rotate -= 1;
            let mut broken = answer.clone();
            broken["access_token"] = json!("");
            return (json_response(StatusCode::OK, &broken), hold, false);
        }
        if s.token_faults.error_5xx_after_rotate > 0 {
            s.token_faults.error_5xx_after_rotate -= 1;
            return (
                respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/html",
                    "<html><body>502 upstream error</body></html>".to_string(),
                ),
                hold,
                false,
            );
        }
        if s.token_faults.lose_after_rotate > 0 {
            s.token_faults.lose_after_rotate -= 1;
            lose = true;
        } else if s.token_faults.oversized_after_rotate > 0 {
            s.token_faults.oversized_after_rotate -= 1;
            let body = format!("{answer}{}", " ".repeat(2 << 20));
            return (
                respond(StatusCode::OK, "application/json", body),
                hold,
                false,
            );
        } else if s.token_faults.truncate_after_rotate > 0 {
            s.token_faults.truncate_after_rotate -= 1;
            let body = answer.to_string();
            let cut = body.len() * 2 / 3;
            return (
                respond(StatusCode::OK, "application/json", body[..cut].to_string()),
                hold,
                false,
            );
        }
    }
    (json_response(StatusCode::OK, &answer), hold, lose)
}

/// `/_sandbox/*`: inspection and knobs for a sandbox in its own process.
fn control(state: &Shared, method: &Method, rest: &[&str], body: &[u8]) -> Response<Full<Bytes>> {
    let ok = |v: Value| json_response(StatusCode::OK, &v);
    let bad = |m: String| json_response(StatusCode::BAD_REQUEST, &json!({"error": m}));
    let mut s = lock(state);
    match (method, rest) {
        (&Method::GET, ["deliveries"]) => ok(json!(s.deliveries)),
        (&Method::GET, ["webhook-deliveries"]) => ok(json!(s.webhook_log)),
        (&Method::GET, ["webhooks"]) => ok(json!(
            s.webhooks
                .iter()
                .map(super::webhooks::Subscription::to_json)
                .collect::<Vec<_>>()
        )),
        (&Method::GET, ["replies"]) => ok(json!(s.replies)),
        (&Method::GET, ["stats"]) => ok(json!(s.stats)),
        (&Method::GET, ["businesses"]) => ok(json!(
            s.businesses
                .iter()
                .map(|b| json!({"id": b.id, "name": b.name, "leads": b.leads.len()}))
                .collect::<Vec<_>>()
        )),
        (&Method::GET, ["faults"]) => ok(json!(s.faults)),
        (&Method::POST, ["faults"]) => match serde_json::from_slice::<Faults>(body) {
            Ok(f) => {
                s.faults = f;
                ok(json!(s.faults))
            }
            Err(e) => bad(format!("bad faults: {e}")),
        },
        (&Method::POST, ["mutate"]) => match serde_json::from_slice::<Mutation>(body) {
            Ok(m) => match mutate(&mut s, m) {
                Ok(ids) => ok(json!({"ids": ids})),
                Err(e) => bad(e.to_string()),
            },
            Err(e) => bad(format!("bad mutation: {e}")),
        },
        (&Method::POST, ["refuse", n]) => {
            s.refuse.insert((*n).to_string());
            ok(json!({"refused": n}))
        }
        (&Method::POST, ["authorize", b]) => {
            let code = s.token("sbx_code_");
            s.auth_codes.insert(code.clone(), vec![(*b).to_string()]);
            ok(json!({"code": code}))
        }
        (&Method::POST, ["token-faults"]) => {
            match serde_json::from_slice::<super::TokenFaults>(body) {
                Ok(f) => {
                    s.token_faults = f;
                    ok(json!(s.token_faults))
                }
                Err(e) => bad(format!("bad token faults: {e}")),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "unknown control route"}),
        ),
    }
}

/// Applies a lead mutation to the sandbox's data.
pub(super) fn mutate(s: &mut State, m: Mutation) -> Result<Vec<String>> {
    match m {
        Mutation::AddLeads { business_id, count } => {
            let bi = s
                .businesses
                .iter()
                .position(|b| b.id == business_id)
                .ok_or_else(|| anyhow!("business {business_id} not found"))?;
            let mut ids = Vec::new();
            for _ in 0..count {
                s.sequence += 1;
                let lead = data::new_lead(
                    &mut s.rng,
                    &mut s.taken_ids,
                    &s.businesses[bi],
                    chrono::Utc::now(),
                    s.sequence,
                    s.options.shape,
                );
                ids.push(lead.id.clone());
                s.businesses[bi].leads.insert(0, lead);
            }
            let items: Vec<(Option<String>, Option<String>, String)> = s.businesses[bi].leads
                [..ids.len()]
                .iter()
                .rev()
                .map(|l| (Some(l.id.clone()), None, l.json.clone()))
                .collect();
            super::webhooks::enqueue(s, &business_id, "NegotiationCreatedV4", &items);
            Ok(ids)
        }
        Mutation::SetStatus {
            negotiation_id,
            status,
        } => {
            edit(s, &negotiation_id, |v| {
                v["status"] = Value::String(status.clone())
            })?;
            Ok(vec![negotiation_id])
        }
        Mutation::Patch {
            negotiation_id,
            patch,
        } => {
            edit(s, &negotiation_id, |v| merge_patch(v, &patch))?;
            Ok(vec![negotiation_id])
        }
        Mutation::DeepChange { negotiation_id } => {
            let n = s.rng.u32(..);
            edit(s, &negotiation_id, |v| {
                let zip = Value::String(format!("{:05}", n % 100_000));
                // Wherever the lead's shape keeps its zip code.
                if v["request"]["location"].is_object() {
                    v["request"]["location"]["zipCode"] = zip;
                } else {
                    v["customer"]["location"]["zipCode"] = zip;
                }
                v["sandboxExtension"]["nested"]["revision"] = json!(n);
            })?;
            Ok(vec![negotiation_id])
        }
        Mutation::Remove { negotiation_id } => {
            let (bi, li) = s
                .find_lead(&negotiation_id)
                .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))?;
            let lead = s.businesses[bi].leads.remove(li);
            s.removed.insert(negotiation_id.clone(), (bi, li, lead));
            Ok(vec![negotiation_id])
        }
        Mutation::AddMessage {
            negotiation_id,
            text,
            from,
        } => {
            let (bi, _) = s
                .find_lead(&negotiation_id)
                .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))?;
            let from = from.unwrap_or_else(|| "Customer".into());
            if from != "Customer" && from != "Business" {
                return Err(anyhow!("from must be Customer or Business, not {from:?}"));
            }
            let _ = bi;
            // One conversation: the message is listed by GET .../messages
            // and delivered to the webhooks (by append_message).
            let m = s
                .append_message(&negotiation_id, &from, &text)
                .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))?;
            let message_id = m.id;
            Ok(vec![message_id])
        }
        Mutation::Restore { negotiation_id } => {
            let (bi, li, lead) = s
                .removed
                .remove(&negotiation_id)
                .ok_or_else(|| anyhow!("negotiation {negotiation_id} was not removed"))?;
            let leads = &mut s.businesses[bi].leads;
            leads.insert(li.min(leads.len()), lead);
            Ok(vec![negotiation_id])
        }
        Mutation::AddMessagesAt {
            negotiation_id,
            sent_at,
        } => sent_at
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let at = chrono::DateTime::parse_from_rfc3339(t)
                    .map_err(|e| anyhow!("sent_at {t:?}: {e}"))?
                    .with_timezone(&chrono::Utc);
                let text = format!("Customer message {} at {t}", k + 1);
                s.append_message_at(&negotiation_id, "Customer", &text, Some(at))
                    .map(|m| m.id)
                    .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))
            })
            .collect(),
        Mutation::AddStrayMessage {
            negotiation_id,
            names,
            sent_at,
        } => {
            let sent_at = match sent_at {
                Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
                    .map_err(|e| anyhow!("sent_at {t:?}: {e}"))?
                    .with_timezone(&chrono::Utc),
                None => chrono::Utc::now(),
            };
            s.append_stray_message(&negotiation_id, &names, sent_at)
                .map(|m| vec![m.id])
                .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))
        }
        Mutation::AddMessages {
            negotiation_id,
            count,
        } => (0..count)
            .map(|k| {
                let text = format!("Customer follow-up {} 💬", k + 1);
                s.append_message(&negotiation_id, "Customer", &text)
                    .map(|m| m.id)
                    .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))
            })
            .collect(),
    }
}

/// RFC 7386 JSON merge patch: objects merge member by member, `null`
/// removes a member, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in members {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn edit(s: &mut State, negotiation_id: &str, f: impl FnOnce(&mut Value)) -> Result<()> {
    let (bi, li) = s
        .find_lead(negotiation_id)
        .ok_or_else(|| anyhow!("negotiation {negotiation_id} not found"))?;
    let lead = &mut s.businesses[bi].leads[li];
    let mut v: Value = serde_json::from_str(&lead.json)?;
    f(&mut v);
    lead.json = data::render(&v);
    Ok(())
}

/// `/api/v4/businesses/{id}/webhooks[/{webhookID}]`: create, get, delete
/// (the list: [`super::webhooks::list_page`]).
fn webhooks_api(
    state: &Shared,
    method: &Method,
    business: &str,
    rest: &[&str],
    body: &[u8],
) -> Response<Full<Bytes>> {
    use super::webhooks::{HookAuth, Subscription};
    let bad = |detail: &str| problem(state, StatusCode::BAD_REQUEST, "Bad Request", detail);
    let not_found = |id: &str| {
        problem(
            state,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("webhook {id} not found"),
        )
    };
    match (method, rest) {
        (&Method::POST, []) => {
            let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(body) else {
                return bad("the body must be a JSON object");
            };
            let Some(url) = b.get("webhookURL").and_then(Value::as_str) else {
                return bad("webhookURL is required");
            };
            let loopback = reqwest::Url::parse(url).ok().is_some_and(|u| {
                u.scheme() == "https"
                    || (u.scheme() == "http"
                        && u.host_str().is_some_and(crate::config::is_loopback_host))
            });
            if !loopback {
                return bad("webhookURL must be an https URL");
            }
            let event_types: Vec<String> = match b.get("eventTypes").and_then(Value::as_array) {
                Some(a) if !a.is_empty() && a.iter().all(Value::is_string) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => return bad("eventTypes must be a non-empty array of strings"),
            };
            let auth = match b.get("auth") {
                None | Some(Value::Null) => None,
                Some(a) => match serde_json::from_value::<HookAuth>(a.clone()) {
                    Ok(a) => Some(a),
                    Err(_) => {
                        return bad("auth must be {username, password} or {header, value}");
                    }
                },
            };
            let enabled = b.get("enabled").and_then(Value::as_bool).unwrap_or(true);
            let mut s = lock(state);
            let webhook_id = format!("{:x}", s.rng.u64(..));
            let sub = Subscription {
                webhook_id,
                business_id: business.to_string(),
                url: url.to_string(),
                event_types,
                enabled,
                auth,
            };
            let out = sub.to_json();
            s.webhooks.push(sub);
            json_response(StatusCode::OK, &out)
        }
        (&Method::GET, [id]) => {
            let s = lock(state);
            match s
                .webhooks
                .iter()
                .find(|w| w.business_id == business && w.webhook_id == *id)
            {
                Some(w) => json_response(StatusCode::OK, &w.to_json()),
                None => {
                    drop(s);
                    not_found(id)
                }
            }
        }
        (&Method::DELETE, [id]) => {
            let mut s = lock(state);
            let before = s.webhooks.len();
            s.webhooks
                .retain(|w| !(w.business_id == business && w.webhook_id == *id));
            let removed = s.webhooks.len() < before;
            drop(s);
            if removed {
                respond(StatusCode::NO_CONTENT, "application/json", "")
            } else {
                not_found(id)
            }
        }
        _ => problem(
            state,
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            "unsupported method on webhooks",
        ),
    }
}
