//! Requests to Thumbtack: timeouts, user agent, the shared rate budget,
//! bearer tokens from [`Auth`], one refresh on 401, and retried reads.

use super::auth::Auth;
use super::model::{
    JobStatusBody, MessageBody, MessagePage, Page, Unchanged, parse_message_page, parse_page,
    parse_page_with, sent_message_id,
};
use super::paging::Cursor;
use super::problem::{
    ApiError, Disposition, describe_unreadable, is_success, parse_retry_after, trace_id_of,
};
use super::webhook::{RegisterBody, Subscription, next_page_query, parse_subscription_page};
use crate::config::Config;
use crate::secret::Secret;
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// The most time a read spends waiting between its retries.
const READ_RETRY_BUDGET: Duration = Duration::from_secs(120);

/// The largest API response body leadsync reads: 64 MiB, 64 KB a lead on a
/// page of the most leads `poll.page_size` allows (1,000). A body declared
/// larger is refused unread; one that keeps coming without a length is cut
/// there. Either fails the request as a read to retry, instead of holding
/// whatever a broken proxy or a hostile server sends until the timeout.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Why a response body was not read whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Over the cap: "declared" (by `Content-Length`, nothing read) or
    /// "found" (while reading it).
    TooLarge(&'static str),
    Read(reqwest::Error),
}

/// Reads a response body of at most `max` bytes: a larger declared length
/// is refused before a byte is read, and a body without one is cut as soon
/// as it passes `max` (the connection is dropped, not drained).
pub(crate) async fn read_body(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<bytes::Bytes, BodyError> {
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge("declared"));
    }
    // Most bodies arrive as one chunk: kept as it is, without a copy.
    let Some(first) = resp.chunk().await.map_err(BodyError::Read)? else {
        return Ok(bytes::Bytes::new());
    };
    if first.len() > max {
        return Err(BodyError::TooLarge("found"));
    }
    let Some(second) = resp.chunk().await.map_err(BodyError::Read)? else {
        return Ok(first);
    };
    let expected = declared.map_or(0, |n| n as usize);
    let mut body = bytes::BytesMut::with_capacity(expected.max(first.len() + second.len()));
    body.extend_from_slice(&first);
    let mut next = Some(second);
    while let Some(chunk) = next {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge("found"));
        }
        body.extend_from_slice(&chunk);
        next = resp.chunk().await.map_err(BodyError::Read)?;
    }
    Ok(body.freeze())
}

/// How the client talks to the API.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Requests go to `{base_url}/api/v4/...`.
    pub base_url: String,
    pub timeout: Duration,
    pub user_agent: String,
    pub max_requests_per_second: f64,
    /// Caps `Retry-After` (and every backoff).
    pub backoff_max: Duration,
    /// Retries of a failed read (GET) before the pass gives up.
    pub read_retries: usize,
    /// First delay between read retries (exponential with jitter after).
    pub read_retry_initial: Duration,
    /// The largest response body read ([`MAX_BODY_BYTES`]); a larger one
    /// is a failed request.
    pub max_body_bytes: usize,
}

impl ClientSettings {
    /// The settings a configuration asks for.
    pub fn from_config(c: &Config) -> ClientSettings {
        ClientSettings {
            base_url: c.file.api.base_url.trim_end_matches('/').to_string(),
            timeout: Duration::from_secs(c.file.api.timeout_secs),
            user_agent: c.file.api.user_agent.clone(),
            max_requests_per_second: c.file.api.max_requests_per_second,
            backoff_max: Duration::from_secs_f64(c.file.outbox.backoff_max_secs),
            read_retries: c.file.api.read_retries,
            read_retry_initial: Duration::from_millis(c.file.api.read_retry_initial_ms),
            max_body_bytes: MAX_BODY_BYTES,
        }
    }
}

/// Builds the HTTP client every request of the process shares (rustls, no OpenSSL).
pub fn http_client(timeout: Duration, user_agent: &str) -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default crypto provider; ring is ours.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(user_agent)
        .default_headers(headers)
        .pool_idle_timeout(Duration::from_secs(60))
        // Never followed (SPEC §5): a POST turned into a GET could look like
        // success, and a moved API is a configuration to fix, not to guess.
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The client-wide request budget (`api.max_requests_per_second`), shared by
/// the poller and the drainer, and the pause a 429 imposes on all of them.
#[derive(Debug)]
pub struct RateBudget {
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    /// Between two requests; a reload may change it ([`RateBudget::set_rate`]).
    interval: Duration,
    next: Instant,
    paused_until: Instant,
}

fn interval_of(per_second: f64) -> Duration {
    Duration::from_secs_f64(1.0 / per_second.max(1e-6))
}

impl RateBudget {
    /// A budget of `per_second` requests per second.
    pub fn new(per_second: f64) -> RateBudget {
        let now = Instant::now();
        RateBudget {
            slots: Mutex::new(Slots {
                interval: interval_of(per_second),
                next: now,
                paused_until: now,
            }),
        }
    }

    /// Applies a new `api.max_requests_per_second` (a reload) to every
    /// request from now on; a 429's pause and the next turn already given
    /// are kept.
    pub fn set_rate(&self, per_second: f64) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.interval = interval_of(per_second);
    }

    /// Waits for this request's turn. A request whose turn has come goes at
    /// once: a timer, even one already due, fires on the runtime's next
    /// millisecond tick, which held every request of a sequential scan for
    /// up to a millisecond (half of an unchanged re-sync's wall time).
    pub async fn acquire(&self) {
        let (at, now) = {
            let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let at = now.max(s.next).max(s.paused_until);
            s.next = at + s.interval;
            (at, now)
        };
        if at > now {
            tokio::time::sleep_until(at.into()).await;
        }
    }

    /// Holds every request back for `d` (after a 429).
    pub fn pause(&self, d: Duration) {
        crate::metrics::rate_limit_pause(d);
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.paused_until = s.paused_until.max(Instant::now() + d);
    }

    /// How long requests are still held back by a 429, if at all.
    pub fn paused_for(&self) -> Option<Duration> {
        let s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.paused_until.checked_duration_since(Instant::now())
    }
}

/// One HTTP exchange (or a failure to get a token), for the record.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub http_status: Option<u16>,
    pub trace_id: Option<String>,
    /// `None` on success.
    pub error: Option<String>,
}

/// A successful response (2xx other than 202).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub trace_id: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
    /// When the request that got this answer was handed to the connection
    /// (leadsync's form): after its token and its turn in the rate budget,
    /// so the server made the answer no earlier than this.
    pub sent_at: String,
}

/// The outcome of a job-status post: every exchange it took, and the result.
#[derive(Debug)]
pub struct Delivery {
    pub exchanges: Vec<Exchange>,
    pub result: Result<(), ApiError>,
}

/// The Thumbtack API client.
pub struct Client {
    http: reqwest::Client,
    settings: ClientSettings,
    budget: Arc<RateBudget>,
    auth: Arc<Auth>,
}

impl Client {
    /// A client with its own rate budget.
    pub fn new(settings: ClientSettings, auth: Arc<Auth>) -> anyhow::Result<Client> {
        let budget = Arc::new(RateBudget::new(settings.max_requests_per_second));
        Client::with_budget(settings, auth, budget)
    }

    /// A client sharing an existing budget (after a configuration reload).
    pub fn with_budget(
        settings: ClientSettings,
        auth: Arc<Auth>,
        budget: Arc<RateBudget>,
    ) -> anyhow::Result<Client> {
        Ok(Client {
            http: http_client(settings.timeout, &settings.user_agent)?,
            settings,
            budget,
            auth,
        })
    }

    /// The rate budget (shared by everything this client sends).
    pub fn budget(&self) -> &Arc<RateBudget> {
        &self.budget
    }

    /// The token provider.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The settings in use.
    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v4/{path}", self.settings.base_url)
    }

    /// One request with the business's current token.
    async fn exchange(
        &self,
        business_id: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&[u8]>,
    ) -> (Exchange, Option<Secret>, Result<Response, ApiError>) {
        let started_at = Utc::now();
        let start = Instant::now();
        let record = |status: Option<u16>, r: &Result<Response, ApiError>| Exchange {
            started_at,
            duration: start.elapsed(),
            http_status: status,
            trace_id: match r {
                Ok(resp) => resp.trace_id.clone(),
                Err(e) => e.trace_id.clone(),
            },
            error: r.as_ref().err().map(|e| e.message.clone()),
        };
        let token = match self.auth.token(business_id).await {
            Ok(t) => t,
            Err(e) => {
                let r = Err(e);
                return (record(None, &r), None, r);
            }
        };
        // Stopping: a request not sent yet is not sent (its work goes at
        // the next start), nor does it wait for its turn in the budget.
        let stopping = self.auth.stopping();
        let not_sent = || {
            let r = Err(super::auth::stopping_error(
                "leadsync is stopping; it goes at the next start",
            ));
            (record(None, &r), None, r)
        };
        if stopping.is_cancelled() {
            return not_sent();
        }
        tokio::select! {
            biased;
            _ = stopping.cancelled() => return not_sent(),
            _ = self.budget.acquire() => {}
        }
        let metric_method = method.clone();
        let mut req = self.http.request(method, url).bearer_auth(token.expose());
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        let sent_at = crate::time::now();
        let result = match req.send().await {
            Err(e) => {
                crate::metrics::http_request(metric_method.as_str(), url, None);
                Err(ApiError::transport(&e))
            }
            Ok(resp) => {
                let status = resp.status();
                crate::metrics::http_request(metric_method.as_str(), url, Some(status.as_u16()));
                let header = |name: reqwest::header::HeaderName| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let retry_after = header(reqwest::header::RETRY_AFTER)
                    .and_then(|v| parse_retry_after(&v, Utc::now(), self.settings.backoff_max));
                let is_html =
                    header(reqwest::header::CONTENT_TYPE).is_some_and(|v| v.contains("text/html"));
                let location = header(reqwest::header::LOCATION);
                let headers = resp.headers().clone();
                // A refusal is told by its status and headers: one whose
                // body is over the cap keeps its meaning (a 401 refreshes,
                // a 429 pauses), its body taken as empty.
                let mut not_read = None;
                let read = match read_body(resp, self.settings.max_body_bytes).await {
                    Err(BodyError::TooLarge(what))
                        if !is_success(status.as_u16()) && !status.is_redirection() =>
                    {
                        not_read = Some(what);
                        Ok(bytes::Bytes::new())
                    }
                    read => read,
                };
                match read {
                    // A POST Thumbtack accepted: the status says it acted,
                    // and its body (a message id at most) is not needed,
                    // whether it is over the cap or was cut (a reset, a
                    // timeout after the head). Sending it again would
                    // duplicate a reply, once per attempt.
                    Err(unread)
                        if metric_method == reqwest::Method::POST
                            && is_success(status.as_u16())
                            && !is_html =>
                    {
                        let why = match &unread {
                            BodyError::TooLarge(what) => format!(
                                "with a body {what} larger than the {} bytes leadsync reads",
                                self.settings.max_body_bytes
                            ),
                            BodyError::Read(e) => format!("but its body could not be read ({e})"),
                        };
                        warn!(
                            status = status.as_u16(),
                            "a POST was accepted {why}: taken as sent, its body not read"
                        );
                        Ok(Response {
                            status: status.as_u16(),
                            trace_id: trace_id_of(&headers, &[]),
                            headers,
                            body: bytes::Bytes::new(),
                            sent_at: sent_at.clone(),
                        })
                    }
                    Err(BodyError::TooLarge(what)) => Err(ApiError::retry(
                        Some(status.as_u16()),
                        format!(
                            "HTTP {status} with a body {what} larger than the {} bytes leadsync reads: not read",
                            self.settings.max_body_bytes
                        ),
                    )),
                    Err(BodyError::Read(e)) => Err(ApiError::retry(
                        Some(status.as_u16()),
                        format!("HTTP {status}: the body could not be read: {e}"),
                    )),
                    Ok(_) if status.is_redirection() => Err(ApiError::redirected(
                        status.as_u16(),
                        status.canonical_reason().unwrap_or(""),
                        location.as_deref(),
                    )),
                    Ok(body) if is_success(status.as_u16()) && is_html => Err(ApiError::retry(
                        Some(status.as_u16()),
                        format!(
                            "HTTP {status} with {}: not an API response",
                            describe_unreadable(&without_token(body, token.expose()))
                        ),
                    )),
                    Ok(body) if is_success(status.as_u16()) => Ok(Response {
                        status: status.as_u16(),
                        trace_id: trace_id_of(&headers, &body),
                        headers,
                        body,
                        sent_at: sent_at.clone(),
                    }),
                    Ok(body) => {
                        let mut e = ApiError::from_response(
                            status.as_u16(),
                            status.canonical_reason().unwrap_or(""),
                            retry_after,
                            &without_token(body, token.expose()),
                        );
                        if let Some(what) = not_read {
                            e.message = format!(
                                "{} (its body, {what} larger than the {} bytes leadsync reads, not read)",
                                e.message, self.settings.max_body_bytes
                            );
                        }
                        if status.as_u16() == 429 {
                            self.budget
                                .pause(retry_after.unwrap_or(Duration::from_secs(1)));
                        }
                        Err(e)
                    }
                }
            }
        };
        let status = match &result {
            Ok(r) => Some(r.status),
            Err(e) => e.http_status,
        };
        let ex = record(status, &result);
        (ex, Some(token), result)
    }

    /// One request; on 401 the token is refreshed once and the request sent again.
    async fn exchange_with_refresh(
        &self,
        business_id: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&[u8]>,
        log: &mut Vec<Exchange>,
    ) -> Result<Response, ApiError> {
        let (ex, token, first) = self.exchange(business_id, method.clone(), url, body).await;
        log.push(ex);
        match first {
            Err(mut e) if e.disposition == Disposition::Refresh => {
                let refresh = match &token {
                    Some(token) => self.auth.invalidate(business_id, token).await,
                    None => true,
                };
                if !refresh {
                    // The token is fresh: refreshing again would only burn a rotation.
                    e.disposition = Disposition::Retry;
                    e.message = format!("401 with a fresh token: missing scope? ({})", e.message);
                    if let Some(last) = log.last_mut() {
                        last.error = Some(e.message.clone());
                    }
                    return Err(e);
                }
                let (ex, _, second) = self.exchange(business_id, method, url, body).await;
                log.push(ex);
                second.map_err(|mut e| {
                    if e.disposition == Disposition::Refresh {
                        // A fresh token refused again: a missing scope, or Thumbtack's side.
                        e.disposition = Disposition::Retry;
                        e.message = format!(
                            "{} (again after a token refresh: is a scope such as supply::negotiations.write missing?)",
                            e.message
                        );
                        if let Some(last) = log.last_mut() {
                            last.error = Some(e.message.clone());
                        }
                    }
                    e
                })
            }
            other => other,
        }
    }

    /// A GET, retried with backoff (honouring `Retry-After`) while the error is retryable.
    async fn get_retried<T>(
        &self,
        business_id: &str,
        url: &str,
        parse: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<T, ApiError> {
        Ok(self.get_retried_asked(business_id, url, parse).await?.0)
    }

    /// [`Client::get_retried`], with when the attempt that succeeded was
    /// started (the database's format): the answer was made no earlier.
    async fn get_retried_asked<T>(
        &self,
        business_id: &str,
        url: &str,
        parse: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<(T, String), ApiError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.settings.read_retry_initial)
            .with_max_delay(self.settings.backoff_max)
            .with_max_times(self.settings.read_retries)
            .with_total_delay(Some(READ_RETRY_BUDGET))
            .with_jitter();
        let attempt = || async {
            let mut log = Vec::new();
            // The page's time is when its request went out, after any wait
            // for a token or the rate budget (a 429 pause): the page was
            // made no earlier.
            let response = self
                .exchange_with_refresh(business_id, reqwest::Method::GET, url, None, &mut log)
                .await?;
            let sent_at = response.sent_at.clone();
            parse(&response.body)
                .map(|t| (t, sent_at))
                .map_err(|m| ApiError::retry(Some(200), format!("unreadable response: {m}")))
        };
        attempt
            .retry(backoff)
            .when(ApiError::is_retryable)
            .adjust(|e, planned| planned.map(|d| e.retry_after.unwrap_or(d)))
            .notify(|e, d| warn!(business_id, error = %e, retry_in = ?d, "read failed; retrying"))
            .await
    }

    /// The list path of a business's negotiations with a page's query.
    pub fn list_url(&self, business_id: &str, cursor: &Cursor) -> Result<String, ApiError> {
        let mut url = reqwest::Url::parse(&self.url(&format!(
            "businesses/{}/negotiations",
            path_segment(business_id)
        )))
        .map_err(|e| ApiError::retry(None, format!("bad URL: {e}")))?;
        if !cursor.query.is_empty() {
            url.query_pairs_mut().extend_pairs(cursor.query.iter());
        }
        Ok(url.into())
    }

    /// The base URL requests go to (`api.base_url`).
    pub fn base_url(&self) -> &str {
        &self.settings.base_url
    }

    /// One page of a business's negotiations (retried while retryable),
    /// with `read_at` = when the request of the attempt that got it went out.
    pub async fn list_page(&self, business_id: &str, cursor: &Cursor) -> Result<Page, ApiError> {
        let url = self.list_url(business_id, cursor)?;
        let (mut page, asked) = self
            .get_retried_asked(business_id, &url, parse_page)
            .await?;
        page.read_at = Some(asked);
        Ok(page)
    }

    /// [`Client::list_page`], asking `unchanged(id, payload hash)` before
    /// reading each lead (see `model::parse_page_with`).
    pub async fn list_page_with(
        &self,
        business_id: &str,
        cursor: &Cursor,
        unchanged: Option<&Unchanged<'_>>,
    ) -> Result<Page, ApiError> {
        let url = self.list_url(business_id, cursor)?;
        let (mut page, asked) = self
            .get_retried_asked(business_id, &url, |body| parse_page_with(body, unchanged))
            .await?;
        page.read_at = Some(asked);
        Ok(page)
    }

    /// One GET, once (one token refresh on 401, no other retry), with the
    /// whole response: what `leadsync probe` shows.
    pub async fn get_once(&self, business_id: &str, url: &str) -> Result<Response, ApiError> {
        let mut log = Vec::new();
        self.exchange_with_refresh(business_id, reqwest::Method::GET, url, None, &mut log)
            .await
    }

    /// The URL of one negotiation.
    pub fn negotiation_url(&self, negotiation_id: &str) -> String {
        self.url(&format!("negotiations/{}", path_segment(negotiation_id)))
    }

    /// One negotiation, as the raw JSON object.
    pub async fn get_negotiation(
        &self,
        business_id: &str,
        negotiation_id: &str,
    ) -> Result<String, ApiError> {
        let url = self.negotiation_url(negotiation_id);
        self.get_retried(business_id, &url, |b| {
            let v: &serde_json::value::RawValue =
                serde_json::from_slice(b).map_err(|e| format!("not JSON: {e}"))?;
            Ok(v.get().to_string())
        })
        .await
    }

    /// Posts one job status, once (with one token refresh on 401). Retries
    /// are the drainer's, from the row's persisted attempt count.
    pub async fn post_job_status(
        &self,
        business_id: &str,
        negotiation_id: &str,
        body: &JobStatusBody,
    ) -> Delivery {
        let url = self.url(&format!(
            "negotiations/{}/job-status",
            path_segment(negotiation_id)
        ));
        let mut exchanges = Vec::new();
        let result = match serde_json::to_vec(body) {
            Ok(json) => self
                .exchange_with_refresh(
                    business_id,
                    reqwest::Method::POST,
                    &url,
                    Some(&json),
                    &mut exchanges,
                )
                .await
                .map(|_| ()),
            Err(e) => Err(ApiError {
                disposition: Disposition::Dead,
                http_status: None,
                trace_id: None,
                retry_after: None,
                from_api: false,
                message: format!("cannot encode the request: {e}"),
            }),
        };
        Delivery { exchanges, result }
    }

    /// One page of a lead's conversation, newest first: `limit` (1–20)
    /// messages sent before `sent_before` (as the API gave it), or the newest.
    pub async fn list_messages(
        &self,
        business_id: &str,
        negotiation_id: &str,
        limit: u32,
        sent_before: Option<&str>,
    ) -> Result<MessagePage, ApiError> {
        let url = self.messages_url(negotiation_id, limit, sent_before)?;
        self.get_retried(business_id, &url, parse_message_page)
            .await
    }

    fn messages_url(
        &self,
        negotiation_id: &str,
        limit: u32,
        sent_before: Option<&str>,
    ) -> Result<String, ApiError> {
        let mut url = reqwest::Url::parse(&self.url(&format!(
            "negotiations/{}/messages",
            path_segment(negotiation_id)
        )))
        .map_err(|e| ApiError::retry(None, format!("bad URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("limit", &limit.to_string());
        if let Some(t) = sent_before {
            url.query_pairs_mut().append_pair("sentBefore", t);
        }
        Ok(url.into())
    }

    /// The newest page of a lead's conversation, asked once and only once:
    /// no retry, and a 401 neither refreshes nor forgets the token (a token
    /// without `supply::messages.read` may still post replies, and a grant
    /// must not rotate for a read it can do without). Bounded by
    /// `api.timeout_secs` whole (the wait for a token or the rate budget
    /// included), and given up as soon as leadsync is stopping. For a check
    /// whose every failure its caller can do without. With the answer's
    /// trace id, for the record.
    pub async fn newest_messages_once(
        &self,
        business_id: &str,
        negotiation_id: &str,
        limit: u32,
    ) -> Result<(MessagePage, Option<String>), ApiError> {
        let url = self.messages_url(negotiation_id, limit, None)?;
        let stopping = self.auth.stopping();
        let asked = tokio::select! {
            biased;
            _ = stopping.cancelled() => {
                return Err(super::auth::stopping_error("leadsync is stopping"));
            }
            asked = tokio::time::timeout(
                self.settings.timeout,
                self.exchange(business_id, reqwest::Method::GET, &url, None),
            ) => asked,
        };
        let (_, _, response) = asked.map_err(|_| {
            ApiError::retry(
                None,
                format!(
                    "no answer within api.timeout_secs ({} s)",
                    self.settings.timeout.as_secs_f64()
                ),
            )
        })?;
        let response = response?;
        parse_message_page(&response.body)
            .map(|page| (page, response.trace_id))
            .map_err(|m| ApiError::retry(Some(200), format!("unreadable response: {m}")))
    }

    /// Posts one reply, once (with one token refresh on 401); on success,
    /// the message id the response carries, if any. Retries are the drainer's.
    pub async fn post_message(
        &self,
        business_id: &str,
        negotiation_id: &str,
        body: &MessageBody,
    ) -> (Delivery, Option<String>) {
        let url = self.url(&format!(
            "negotiations/{}/messages",
            path_segment(negotiation_id)
        ));
        let (delivery, response) = self.post_once(business_id, &url, body).await;
        (delivery, response.as_deref().and_then(sent_message_id))
    }

    /// One POST of a JSON body (with one token refresh on 401): every
    /// exchange, the result, and the response body on success.
    async fn post_once(
        &self,
        business_id: &str,
        url: &str,
        body: &impl serde::Serialize,
    ) -> (Delivery, Option<bytes::Bytes>) {
        let mut exchanges = Vec::new();
        let (result, response) = match serde_json::to_vec(body) {
            Ok(json) => match self
                .exchange_with_refresh(
                    business_id,
                    reqwest::Method::POST,
                    url,
                    Some(&json),
                    &mut exchanges,
                )
                .await
            {
                Ok(r) => (Ok(()), Some(r.body)),
                Err(e) => (Err(e), None),
            },
            Err(e) => (
                Err(ApiError {
                    disposition: Disposition::Dead,
                    http_status: None,
                    trace_id: None,
                    retry_after: None,
                    from_api: false,
                    message: format!("cannot encode the request: {e}"),
                }),
                None,
            ),
        };
        (Delivery { exchanges, result }, response)
    }
}

/// Pages of one business's webhooks read at most (a business has a few).
pub const MAX_WEBHOOK_PAGES: usize = 100;

impl Client {
    /// The business's webhook subscriptions (`GET /businesses/{id}/webhooks`),
    /// every page of them (`pagination.next` or `nextPageToken`), at most
    /// [`MAX_WEBHOOK_PAGES`]: a page asked twice, or one listing only
    /// webhooks already read (a server ignoring the cursor), is an error,
    /// never an endless loop or a part taken for the whole. A `next` by
    /// offset is not followed past an empty page (some lists name a next
    /// page on every page), but is past a page shorter than the
    /// `pagination.limit` it echoed: a server filtering after paging, or
    /// echoing its maximum while serving fewer, lists more after it, and a
    /// webhook of ours missed there would be registered again on every run.
    pub async fn list_webhooks(&self, business_id: &str) -> Result<Vec<Subscription>, ApiError> {
        let list = self.url(&format!(
            "businesses/{}/webhooks",
            path_segment(business_id)
        ));
        let broken = |message: String| ApiError {
            disposition: Disposition::Dead,
            http_status: Some(200),
            trace_id: None,
            retry_after: None,
            from_api: false,
            message,
        };
        let mut url = list.clone();
        let mut asked = HashSet::from([String::new()]);
        let mut seen = HashSet::new();
        let mut all = Vec::new();
        for _ in 0..MAX_WEBHOOK_PAGES {
            let page = self
                .get_retried(business_id, &url, parse_subscription_page)
                .await?;
            let next = next_page_query(&self.settings.base_url, &page).map_err(broken)?;
            let listed = page.webhooks.len();
            let before = all.len();
            // A webhook listed again (one created or deleted meanwhile
            // shifts the pages) is kept once.
            all.extend(
                page.webhooks
                    .into_iter()
                    .filter(|w| seen.insert(w.webhook_id.clone())),
            );
            let Some(query) = next else {
                return Ok(all);
            };
            let by_offset = serde_urlencoded::from_str::<Vec<(String, String)>>(&query)
                .is_ok_and(|q| q.iter().any(|(k, _)| k == "offset"));
            if listed == 0 && by_offset {
                // Nothing more at the next offset, whatever `next` says.
                return Ok(all);
            }
            if listed > 0 && all.len() == before {
                return Err(broken(format!(
                    "a page of the webhooks listing lists only webhooks of earlier pages and \
                     names a next one (?{query}): its pagination does not advance"
                )));
            }
            if !asked.insert(query.clone()) {
                return Err(broken(format!(
                    "the webhooks listing names a page it already answered (?{query}): \
                     its pagination does not advance"
                )));
            }
            url = format!("{list}?{query}");
        }
        Err(broken(format!(
            "the webhooks listing still names a next page after {MAX_WEBHOOK_PAGES} pages: \
             not read further (its pagination may not advance)"
        )))
    }

    /// Registers a webhook (`POST /businesses/{id}/webhooks`), once.
    pub async fn create_webhook(
        &self,
        business_id: &str,
        body: &RegisterBody,
    ) -> Result<Subscription, ApiError> {
        let url = self.url(&format!(
            "businesses/{}/webhooks",
            path_segment(business_id)
        ));
        let json = serde_json::to_vec(body).map_err(|e| ApiError {
            disposition: Disposition::Dead,
            http_status: None,
            trace_id: None,
            retry_after: None,
            from_api: false,
            message: format!("cannot encode the request: {e}"),
        })?;
        let mut log = Vec::new();
        let answer = self
            .exchange_with_refresh(
                business_id,
                reqwest::Method::POST,
                &url,
                Some(&json),
                &mut log,
            )
            .await?;
        serde_json::from_slice(&answer.body).map_err(|e| {
            ApiError::retry(
                Some(200),
                format!("the webhook was created but the answer is unreadable: {e}"),
            )
        })
    }

    /// Deletes a webhook (`DELETE /businesses/{id}/webhooks/{webhookID}`), once.
    pub async fn delete_webhook(
        &self,
        business_id: &str,
        webhook_id: &str,
    ) -> Result<(), ApiError> {
        let url = self.url(&format!(
            "businesses/{}/webhooks/{}",
            path_segment(business_id),
            path_segment(webhook_id)
        ));
        let mut log = Vec::new();
        self.exchange_with_refresh(business_id, reqwest::Method::DELETE, &url, None, &mut log)
            .await
            .map(|_| ())
    }
}

/// An error answer's body with the access token it was sent masked: a
/// gateway or a debug page may echo the request, and the text kept from the
/// answer goes to the mirror's error columns (outbox.last_error,
/// sync_runs.error, businesses.last_error) and the logs. Masked before any
/// excerpt is cut, so no prefix of the token survives either.
fn without_token(body: bytes::Bytes, token: &str) -> bytes::Bytes {
    // One linear search (the body may be up to max_body_bytes).
    if token.is_empty() || memchr::memmem::find(&body, token.as_bytes()).is_none() {
        return body;
    }
    bytes::Bytes::from(String::from_utf8_lossy(&body).replace(token, crate::secret::MASK))
}

/// Percent-encodes an id for a URL path segment.
fn path_segment(s: &str) -> String {
    let mut u = reqwest::Url::parse("http://x/").expect("static URL");
    u.path_segments_mut().expect("base URL").push(s);
    u.path().trim_start_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_spaces_requests_and_a_pause_holds_them() {
        let b = RateBudget::new(50.0);
        let t = Instant::now();
        for _ in 0..6 {
            b.acquire().await;
        }
        // 6 requests at 50/s: the 6th goes 100 ms after the first.
        assert!(
            t.elapsed() >= Duration::from_millis(95),
            "{:?}",
            t.elapsed()
        );
        b.pause(Duration::from_millis(200));
        let t = Instant::now();
        b.acquire().await;
        assert!(t.elapsed() >= Duration::from_millis(190));
    }

    #[tokio::test]
    async fn a_request_whose_turn_has_come_does_not_wait_for_a_timer() {
        let b = RateBudget::new(1e9);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..3 {
            let mut turn = std::pin::pin!(b.acquire());
            assert!(
                turn.as_mut().poll(&mut cx).is_ready(),
                "a free slot waited for the timer's next tick"
            );
        }
    }

    #[test]
    fn ids_are_escaped_in_paths() {
        assert_eq!(path_segment("519153480500518912"), "519153480500518912");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
