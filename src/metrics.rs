//! Prometheus metrics (SPEC §10), served by the admin listener's `/metrics`.
//!
//! Counters and histograms live in one process-wide registry and are
//! incremented where the event happens, through the one-line functions
//! below (`metrics::sync_pass(...)`, `metrics::send(...)`, ...). Gauges of
//! table contents (leads per business, outbox rows by state, ...) are read
//! from the mirror on a timer by the daemon and swapped in whole, so a
//! scrape only encodes memory: it never waits for the database.

use crate::store::gauges::TableGauges;
use crate::store::mirror::PageStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

/// The Prometheus text format (0.0.4), what `/metrics` answers by default.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// OpenMetrics text, for a scraper that asks for it in `Accept`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Webhook event types kept as label values; any other is counted as `other`
/// (the value comes from the sender, and labels must stay few). `-` is a
/// delivery refused before its type was read (401, 413, 400, 408).
const KNOWN_EVENT_TYPES: &[&str] = &[
    "-",
    "NegotiationCreatedV4",
    "MessageCreatedV4",
    "ReviewCreatedV4",
    "PresetJobCreatedV4",
    "PresetJobUpdatedV4",
    "PresetJobDeletedV4",
    "IncentiveUsedV4",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassLabels {
    business_id: String,
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BusinessLabels {
    business_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeadLabels {
    business_id: String,
    change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SendLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    event_type: String,
    outcome: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn pass_buckets() -> Histogram {
    // 50 ms .. about 3 minutes.
    Histogram::new(exponential_buckets(0.05, 2.5, 10))
}

fn send_buckets() -> Histogram {
    // 10 ms .. about 38 s (a send is bounded by api.timeout_secs).
    Histogram::new(exponential_buckets(0.01, 2.5, 10))
}

/// Every metric of the process.
struct Metrics {
    registry: Registry,
    sync_passes: Family<PassLabels, Counter>,
    sync_duration: Histograms<KindLabels>,
    sync_pages: Family<BusinessLabels, Counter>,
    sync_leads: Family<LeadLabels, Counter>,
    /// Process totals of pages and leads read, for `sync`'s progress line.
    pages_read: AtomicU64,
    leads_read: AtomicU64,
    sends: Family<SendLabels, Counter>,
    send_duration: Histograms<KindLabels>,
    http_requests: Family<HttpLabels, Counter>,
    rate_limit_pauses: Counter,
    rate_limit_pause_seconds: Counter<f64, AtomicU64>,
    token_refreshes: Family<OutcomeLabels, Counter>,
    webhook_deliveries: Family<WebhookLabels, Counter>,
    disk_sync_failed: Gauge,
    tables: Arc<Tables>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("leadsync");
        let m = Metrics {
            registry: Registry::default(),
            sync_passes: Family::default(),
            sync_duration: Family::new_with_constructor(pass_buckets),
            sync_pages: Family::default(),
            sync_leads: Family::default(),
            pages_read: AtomicU64::new(0),
            leads_read: AtomicU64::new(0),
            sends: Family::default(),
            send_duration: Family::new_with_constructor(send_buckets),
            http_requests: Family::default(),
            rate_limit_pauses: Counter::default(),
            rate_limit_pause_seconds: Counter::default(),
            token_refreshes: Family::default(),
            webhook_deliveries: Family::default(),
            disk_sync_failed: Gauge::default(),
            tables: Arc::new(Tables::default()),
        };
        registry.register(
            "sync_passes",
            "Sync passes by business, kind (head, full) and outcome (ok, error, skipped)",
            m.sync_passes.clone(),
        );
        registry.register(
            "sync_pass_duration_seconds",
            "Duration of sync passes by kind",
            m.sync_duration.clone(),
        );
        registry.register(
            "sync_pages",
            "Listing pages written by sync passes, by business",
            m.sync_pages.clone(),
        );
        registry.register(
            "sync_leads",
            "Leads read by sync passes, by business and change (new, changed, unchanged)",
            m.sync_leads.clone(),
        );
        registry.register(
            "sends",
            "Outbox send attempts by kind (transition, message) and outcome (sent, retry, dead, reauth, waiting)",
            m.sends.clone(),
        );
        registry.register(
            "send_duration_seconds",
            "Duration of outbox sends (HTTP exchanges, token refresh included) by kind",
            m.send_duration.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests to Thumbtack by endpoint (ids replaced by {id}) and status (error: no response)",
            m.http_requests.clone(),
        );
        registry.register(
            "rate_limit_pauses",
            "Pauses of all requests after a 429 answer",
            m.rate_limit_pauses.clone(),
        );
        registry.register(
            "rate_limit_pause_seconds",
            "Seconds of pause imposed by 429 answers",
            m.rate_limit_pause_seconds.clone(),
        );
        registry.register(
            "token_refreshes",
            "OAuth refresh-token grants by outcome (ok, invalid_grant, client_refused, lost, transient)",
            m.token_refreshes.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries received by event type and outcome",
            m.webhook_deliveries.clone(),
        );
        registry.register(
            "disk_sync_failed",
            "1 once a sync of the database to disk has failed: webhook deliveries are answered 503 until leadsync is restarted",
            m.disk_sync_failed.clone(),
        );
        registry.register_collector(Box::new(m.tables.clone()));
        registry.register_collector(Box::new(BuildInfo));
        Metrics { registry, ..m }
    }
}

/// Records a finished sync pass.
pub fn sync_pass(business_id: &str, kind: &str, outcome: &str, elapsed: Duration) {
    let m = &*METRICS;
    m.sync_passes
        .get_or_create(&PassLabels {
            business_id: business_id.to_string(),
            kind: kind.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
    if outcome != "skipped" {
        m.sync_duration
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Records one listing page written by a pass.
pub fn sync_page(business_id: &str, page: &PageStats) {
    let m = &*METRICS;
    m.sync_pages
        .get_or_create(&BusinessLabels {
            business_id: business_id.to_string(),
        })
        .inc();
    for (change, n) in [
        ("new", page.inserted),
        ("changed", page.updated),
        ("unchanged", page.unchanged),
    ] {
        m.sync_leads
            .get_or_create(&LeadLabels {
                business_id: business_id.to_string(),
                change,
            })
            .inc_by(n.max(0) as u64);
    }
    m.pages_read.fetch_add(1, Ordering::Relaxed);
    m.leads_read.fetch_add(
        (page.inserted + page.updated + page.unchanged).max(0) as u64,
        Ordering::Relaxed,
    );
}

/// Pages and leads read by sync passes in this process so far.
pub fn sync_totals() -> (u64, u64) {
    (
        METRICS.pages_read.load(Ordering::Relaxed),
        METRICS.leads_read.load(Ordering::Relaxed),
    )
}

/// Records one outbox row's attempt: `kind` is what was sent (`transition`,
/// `message`), `outcome` what became of the row; `elapsed` is `None` when
/// nothing was sent (the row waits).
pub fn send(kind: &str, outcome: &str, elapsed: Option<Duration>) {
    let m = &*METRICS;
    m.sends
        .get_or_create(&SendLabels {
            kind: kind.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
    if let Some(d) = elapsed {
        m.send_duration
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .observe(d.as_secs_f64());
    }
}

/// Records one HTTP request to Thumbtack; `status` is `None` when no answer came.
pub fn http_request(method: &str, url: &str, status: Option<u16>) {
    METRICS
        .http_requests
        .get_or_create(&HttpLabels {
            endpoint: format!("{method} {}", endpoint_of(url)),
            status: status.map_or_else(|| "error".to_string(), |s| s.to_string()),
        })
        .inc();
}

/// Records a pause of every request after a 429.
pub fn rate_limit_pause(d: Duration) {
    METRICS.rate_limit_pauses.inc();
    METRICS.rate_limit_pause_seconds.inc_by(d.as_secs_f64());
}

/// Records one refresh-token grant.
pub fn token_refresh(outcome: &str) {
    METRICS
        .token_refreshes
        .get_or_create(&OutcomeLabels {
            outcome: outcome.to_string(),
        })
        .inc();
}

/// Records one webhook delivery.
pub fn webhook_delivery(event_type: &str, outcome: &str) {
    let event_type = if KNOWN_EVENT_TYPES.contains(&event_type) {
        event_type
    } else {
        "other"
    };
    METRICS
        .webhook_deliveries
        .get_or_create(&WebhookLabels {
            event_type: event_type.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

/// Whether a sync of the database to disk has failed (see `/healthz`).
pub fn set_disk_sync_failed(failed: bool) {
    METRICS.disk_sync_failed.set(i64::from(failed));
}

/// Replaces the table gauges with a fresh reading of the mirror.
pub fn set_tables(gauges: TableGauges) {
    let mut current = METRICS
        .tables
        .snapshot
        .write()
        .unwrap_or_else(|p| p.into_inner());
    *current = Some(gauges);
}

/// Every metric, encoded in the Prometheus text format (or OpenMetrics).
pub fn encode(openmetrics: bool) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let result = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &METRICS.registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &METRICS.registry)
    };
    if let Err(e) = result {
        // Writing to a String cannot fail; a collector bug should not hide the rest.
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The path of a Thumbtack URL as a label: below `/api/v4/`, with every
/// segment that follows a collection name (`businesses`, `negotiations`,
/// `webhooks`) or looks like an id (digits, or anything but a short path
/// word) replaced by `{id}`, so that labels stay few and carry no data.
pub fn endpoint_of(url: &str) -> String {
    let path = match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => url,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path
        .strip_prefix("/api/v4/")
        .or_else(|| path.strip_prefix("/v4/"))
        .unwrap_or(path.trim_start_matches('/'));
    // The segment after a collection name is an id whatever it looks like:
    // lead and webhook ids come from the server, in no promised shape.
    let mut after_collection = false;
    path.split('/')
        .map(|s| {
            let id = after_collection || !is_path_word(s);
            after_collection = !id && ID_COLLECTIONS.contains(&s);
            if id { "{id}" } else { s }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Path words followed by an id in the API's routes.
const ID_COLLECTIONS: &[&str] = &["businesses", "negotiations", "webhooks"];

/// `negotiations`, `job-status`, `oauth2`: short words that name a route,
/// not an id (no more than two digits, nothing but letters, digits, `-`, `_`).
fn is_path_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().filter(u8::is_ascii_digit).count() <= 2
        && s.bytes().any(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The table gauges, swapped in whole by [`set_tables`].
#[derive(Debug, Default)]
struct Tables {
    snapshot: RwLock<Option<TableGauges>>,
}

impl Collector for Tables {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        let Some(t) = snapshot.as_ref() else {
            return Ok(());
        };
        gauge_family(
            &mut encoder,
            "leads",
            "Leads in the mirror by business (those marked missing included)",
            t.leads
                .iter()
                .map(|l| ([("business_id", l.business_id.as_str())], l.leads as f64)),
        )?;
        gauge_family(
            &mut encoder,
            "outbox_rows",
            "Rows of the outbox tables (outbox, message_outbox) by state",
            t.outbox_rows.iter().map(|r| {
                (
                    [("table", r.table.as_str()), ("state", r.state.as_str())],
                    r.rows as f64,
                )
            }),
        )?;
        gauge_family(
            &mut encoder,
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending row of each outbox table (0 when none is pending)",
            t.oldest_pending
                .iter()
                .map(|(table, age)| ([("table", table.as_str())], *age)),
        )?;
        gauge(
            &mut encoder,
            "businesses_needing_reauth",
            "Configured businesses waiting for re-authorization",
            t.needs_reauth.len() as f64,
        )?;
        gauge_family(
            &mut encoder,
            "business_needs_reauth",
            "1 while this business waits for re-authorization",
            t.needs_reauth
                .iter()
                .map(|b| ([("business_id", b.as_str())], 1.0)),
        )?;
        gauge_family(
            &mut encoder,
            "last_sync_timestamp_seconds",
            "When the last successful pass of each business finished (Unix time)",
            t.last_ok_sync
                .iter()
                .map(|(b, ts)| ([("business_id", b.as_str())], *ts)),
        )?;
        let by_schedule = |f: fn(&crate::store::gauges::ScheduleGauge) -> f64| {
            t.schedules.iter().map(move |g| {
                (
                    [("kind", g.kind.as_str()), ("schedule", g.schedule.as_str())],
                    f(g),
                )
            })
        };
        gauge_family(
            &mut encoder,
            "schedule_businesses",
            "Businesses on each schedule (one timer per distinct schedule)",
            by_schedule(|g| g.businesses as f64),
        )?;
        gauge_family(
            &mut encoder,
            "schedule_waiting_passes",
            "Passes of each schedule due and waiting for a worker",
            by_schedule(|g| g.waiting as f64),
        )?;
        gauge_family(
            &mut encoder,
            "schedule_lag_seconds",
            "How long the oldest waiting pass of each schedule has been due (0 when none waits)",
            by_schedule(|g| g.lag_seconds),
        )?;
        gauge(
            &mut encoder,
            "tables_refreshed_timestamp_seconds",
            "When these table gauges were read from the mirror (Unix time)",
            t.read_at,
        )?;
        gauge(
            &mut encoder,
            "tables_refresh_duration_seconds",
            "How long the last reading of these table gauges took",
            t.read_seconds,
        )?;
        Ok(())
    }
}

fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// `leadsync_build_info{version="..."} 1`.
#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge_family(
            &mut encoder,
            "build_info",
            "The running leadsync version",
            std::iter::once(([("version", env!("CARGO_PKG_VERSION"))], 1.0)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_hide_ids() {
        assert_eq!(
            endpoint_of("http://127.0.0.1:9/api/v4/businesses/123/negotiations?limit=10"),
            "businesses/{id}/negotiations"
        );
        assert_eq!(
            endpoint_of(
                "https://api.thumbtack.com/api/v4/negotiations/519153480500518912/job-status"
            ),
            "negotiations/{id}/job-status"
        );
        assert_eq!(endpoint_of("https://x/oauth2/token"), "oauth2/token");
        assert_eq!(
            endpoint_of("http://h/api/v4/negotiations/abc123def456/messages?sentBefore=x"),
            "negotiations/{id}/messages"
        );
        assert_eq!(
            endpoint_of("http://h/api/v4/negotiations/a%2Fb/x"),
            "negotiations/{id}/x"
        );
    }

    /// Lead ids come from the server (and webhook ids too): one made of
    /// letters (`lead-one`, a staging server's, or a UUID with few digits)
    /// looked like a route word and became a label of its own, one series
    /// per lead polled for messages, kept for the life of the process.
    #[test]
    fn ids_in_id_positions_are_hidden_whatever_their_shape() {
        assert_eq!(
            endpoint_of("http://h/api/v4/negotiations/lead-one/messages?limit=50"),
            "negotiations/{id}/messages"
        );
        assert_eq!(
            endpoint_of("http://h/api/v4/negotiations/abcdef/job-status"),
            "negotiations/{id}/job-status"
        );
        assert_eq!(
            endpoint_of("http://h/api/v4/businesses/acme/webhooks/hook-a"),
            "businesses/{id}/webhooks/{id}"
        );
        assert_eq!(endpoint_of("http://h/api/v4/businesses"), "businesses");
    }

    #[test]
    fn refused_deliveries_and_documented_types_are_not_other() {
        // The receiver counts a delivery refused before its type is read
        // (401, 413, 400, 408) as `-`: not as `other`, the unknown types.
        webhook_delivery("-", "unauthorized");
        // A documented type of its own (THUMBTACK.md), not `other`.
        webhook_delivery("IncentiveUsedV4", "ignored");
        let text = encode(false);
        assert!(
            text.contains(
                r#"leadsync_webhook_deliveries_total{event_type="IncentiveUsedV4",outcome="ignored"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"leadsync_webhook_deliveries_total{event_type="-",outcome="unauthorized"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn unknown_event_types_are_one_label() {
        webhook_delivery("SomethingNewV9", "ignored");
        webhook_delivery("Evil\"Label", "ignored");
        let text = encode(false);
        assert!(
            text.contains(
                r#"leadsync_webhook_deliveries_total{event_type="other",outcome="ignored"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("Evil"));
    }
}
