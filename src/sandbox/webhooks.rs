//! The sandbox's webhooks: subscriptions (`/api/v4/businesses/{id}/webhooks`)
//! and deliveries of `NegotiationCreatedV4` / `MessageCreatedV4` to every
//! enabled subscription of the lead's business, with its credentials,
//! retried with backoff until acknowledged (2xx) or out of attempts. Every
//! attempt is logged for `/_sandbox/webhook-deliveries`.

use super::State;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Attempts per delivery before the sandbox gives up on it.
pub const MAX_ATTEMPTS: u32 = 8;

/// How Thumbtack authenticates to a subscriber.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum HookAuth {
    Basic { username: String, password: String },
    Header { header: String, value: String },
}

/// A registered webhook.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub webhook_id: String,
    pub business_id: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub auth: Option<HookAuth>,
}

impl Subscription {
    /// The subscription as the API shows it (never the credentials).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "webhookID": self.webhook_id,
            "webhookURL": self.url,
            "enabled": self.enabled,
            "authType": match &self.auth {
                None => "None",
                Some(HookAuth::Basic { .. }) => "Basic",
                Some(HookAuth::Header { .. }) => "Header",
            },
            "businessID": self.business_id,
            "eventTypes": self.event_types,
        })
    }
}

/// One delivery as `/_sandbox/webhook-deliveries` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryLog {
    /// Order of creation, from 1.
    pub seq: u64,
    pub webhook_id: String,
    pub business_id: String,
    pub event_type: String,
    pub url: String,
    pub negotiation_id: Option<String>,
    pub message_id: Option<String>,
    /// 2 for the second copy sent by the `webhook_twice` knob.
    pub copy: u8,
    pub attempts: u32,
    /// `pending`, `delivered` or `failed` (out of attempts).
    pub state: String,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: String,
    /// When the acknowledged attempt was sent.
    pub sent_at: Option<String>,
    pub delivered_at: Option<String>,
    /// From sending the acknowledged attempt to its 2xx, in milliseconds.
    pub latency_ms: Option<f64>,
}

/// A delivery on its way.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub log_index: usize,
    pub url: String,
    pub auth: Option<HookAuth>,
    pub body: String,
}

/// One page of `GET /businesses/{id}/webhooks`: every subscription of
/// `business_id`, or with the `webhook_page_size` fault that many from
/// `?offset=`, `pagination.next` naming the rest as Thumbtack's other v4
/// lists do (`host`, a path without `/api`). `Err`: a query to refuse (400).
pub(crate) fn list_page(
    s: &State,
    business_id: &str,
    query: &str,
    host: &str,
) -> Result<serde_json::Value, String> {
    let params: std::collections::HashMap<String, String> =
        serde_urlencoded::from_str(query).map_err(|_| "the query string cannot be read")?;
    if s.faults.webhook_endless_token {
        let n = params
            .get("pageToken")
            .and_then(|t| t.trim_start_matches('t').parse::<u64>().ok())
            .unwrap_or(0);
        return Ok(serde_json::json!({
            "data": [], "pagination": { "nextPageToken": format!("t{}", n + 1) }
        }));
    }
    let offset = match params.get("offset") {
        Some(_) if s.faults.webhook_reject_offset => {
            return Err("offset is not a known parameter".into());
        }
        Some(o) => o
            .parse::<usize>()
            .map_err(|_| format!("offset {o:?} is not a number"))?,
        None => 0,
    };
    let all: Vec<&Subscription> = s
        .webhooks
        .iter()
        .filter(|w| w.business_id == business_id)
        .collect();
    let size = s.faults.webhook_page_size;
    if size == 0 {
        let data: Vec<_> = all.iter().map(|w| w.to_json()).collect();
        return Ok(serde_json::json!({ "data": data }));
    }
    let from = if s.faults.webhook_ignore_offset {
        0
    } else {
        offset
    };
    let end = from.saturating_add(size).min(all.len());
    let data: Vec<_> = all
        .get(from..end)
        .unwrap_or_default()
        .iter()
        .filter(|w| w.enabled || !s.faults.webhook_hide_disabled)
        .map(|w| w.to_json())
        .collect();
    let mut pagination = serde_json::json!({ "limit": size, "offset": offset });
    let next = if s.faults.webhook_next_same && params.contains_key("offset") {
        Some(offset)
    } else if end < all.len() || s.faults.webhook_always_next {
        Some(offset.saturating_add(size))
    } else {
        None
    };
    if let Some(next) = next {
        pagination["next"] = serde_json::Value::String(format!(
            "http://{host}/v4/businesses/{business_id}/webhooks?limit={size}&offset={next}"
        ));
    }
    Ok(serde_json::json!({ "data": data, "pagination": pagination }))
}

/// Builds the envelope Thumbtack sends.
pub fn envelope(event_type: &str, webhook_id: &str, data_json: &str) -> String {
    let description = match event_type {
        "NegotiationCreatedV4" => "A new negotiation was created",
        "MessageCreatedV4" => "A new message was created",
        _ => "",
    };
    format!(
        "{{\"event\":{{\"eventType\":\"{event_type}\",\"description\":\"{description}\",\"webhookID\":\"{webhook_id}\",\"triggeredAt\":\"{}\"}},\"data\":{data_json}}}",
        crate::time::now()
    )
}

/// Queues `event_type` with `data_json` for every enabled subscription of
/// `business_id` that wants it; the `webhook_twice` / `webhook_out_of_order`
/// knobs apply to the batch. Call with the state locked.
pub(crate) fn enqueue(
    s: &mut State,
    business_id: &str,
    event_type: &str,
    items: &[(Option<String>, Option<String>, String)],
) {
    let subs: Vec<Subscription> = s
        .webhooks
        .iter()
        .filter(|w| {
            w.business_id == business_id
                && w.enabled
                && w.event_types.iter().any(|e| e == event_type)
        })
        .cloned()
        .collect();
    let mut jobs = Vec::new();
    for sub in &subs {
        for (negotiation_id, message_id, data) in items {
            let copies = if s.faults.webhook_twice { 2 } else { 1 };
            let body = envelope(event_type, &sub.webhook_id, data);
            for copy in 1..=copies {
                let seq = s.webhook_log.len() as u64 + 1;
                s.webhook_log.push(DeliveryLog {
                    seq,
                    webhook_id: sub.webhook_id.clone(),
                    business_id: business_id.to_string(),
                    event_type: event_type.to_string(),
                    url: sub.url.clone(),
                    negotiation_id: negotiation_id.clone(),
                    message_id: message_id.clone(),
                    copy,
                    attempts: 0,
                    state: "pending".into(),
                    last_status: None,
                    last_error: None,
                    created_at: crate::time::now(),
                    sent_at: None,
                    delivered_at: None,
                    latency_ms: None,
                });
                jobs.push(Job {
                    log_index: s.webhook_log.len() - 1,
                    url: sub.url.clone(),
                    auth: sub.auth.clone(),
                    body: body.clone(),
                });
            }
        }
    }
    if s.faults.webhook_out_of_order {
        jobs.reverse();
    }
    if let Some(tx) = &s.webhook_tx {
        for job in jobs {
            let _ = tx.send(job);
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends queued deliveries (up to `concurrency` at once) until `stop`.
pub(crate) async fn run(
    state: Shared,
    mut rx: mpsc::UnboundedReceiver<Job>,
    concurrency: usize,
    stop: CancellationToken,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(concurrency)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "sandbox: cannot build the webhook client");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Job>();
    loop {
        let job = tokio::select! {
            _ = stop.cancelled() => return,
            j = rx.recv() => match j { Some(j) => j, None => return },
            Some(j) = retry_rx.recv() => j,
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (http, state, retry_tx, stop) =
            (http.clone(), state.clone(), retry_tx.clone(), stop.clone());
        tokio::spawn(async move {
            let attempt = send(&http, &state, &job).await;
            drop(permit);
            if let Some(delay) = attempt {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(delay) => { let _ = retry_tx.send(job); }
                }
            }
        });
    }
}

/// One attempt; `Some(delay)` when it should be retried after `delay`.
async fn send(http: &reqwest::Client, state: &Shared, job: &Job) -> Option<Duration> {
    let mut req = http
        .post(&job.url)
        .header("content-type", "application/json")
        .header("user-agent", "Thumbtack-Webhooks (leadsync sandbox)")
        .body(job.body.clone());
    match &job.auth {
        Some(HookAuth::Basic { username, password }) => {
            req = req.basic_auth(username, Some(password));
        }
        Some(HookAuth::Header { header, value }) => req = req.header(header, value),
        None => {}
    }
    let sent_at = crate::time::now();
    let started = Instant::now();
    let result = req.send().await;
    let latency = started.elapsed();
    let (status, error) = match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            // Read the body so that the connection is reused.
            let _ = resp.bytes().await;
            (Some(status), None)
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let mut s = lock(state);
    let entry = s.webhook_log.get_mut(job.log_index)?;
    entry.attempts += 1;
    entry.last_status = status;
    entry.last_error = error;
    if status.is_some_and(|c| (200..300).contains(&c)) {
        entry.state = "delivered".into();
        entry.sent_at = Some(sent_at);
        entry.delivered_at = Some(crate::time::now());
        entry.latency_ms = Some(latency.as_secs_f64() * 1000.0);
        return None;
    }
    if entry.attempts >= MAX_ATTEMPTS {
        entry.state = "failed".into();
        return None;
    }
    // 100 ms, 200 ms, ... capped at 5 s.
    Some(Duration::from_millis(100 << entry.attempts.min(6)).min(Duration::from_secs(5)))
}
