//! `leadsync probe --business ID [--json]` (SPEC §10): a read-only look at
//! what the API really answers for one business — one list page and one
//! GET — so that a partner sees, against staging, which of the variants of
//! SPEC §5 their account gets before the mirror depends on it. Nothing is
//! written to the mirror.

use crate::config::{Config, TokenSource};
use crate::lead::LeadRow;
use crate::store::ProcessLock;
use crate::store::mirror::differing_fields;
use crate::thumbtack::client::Response;
use crate::thumbtack::model::{parse_lead_body, parse_page};
use crate::thumbtack::paging::{End, Listing, Step};
use crate::thumbtack::{ApiError, Auth, Client, ClientSettings};
use anyhow::{Context, Result, bail};
use base64::Engine;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

/// What the probe saw.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub business_id: String,
    pub base_url: String,
    pub list: Call,
    pub pagination: Option<PaginationSeen>,
    /// The first listed lead, as the mirror would store it.
    pub lead: Option<LeadSeen>,
    pub get: Option<Call>,
    pub comparison: Option<Comparison>,
    pub token: TokenSeen,
    /// True when both requests succeeded.
    pub ok: bool,
}

/// One request and its answer.
#[derive(Debug, Serialize)]
pub struct Call {
    /// Path and query (never a secret).
    pub request: String,
    pub http_status: Option<u16>,
    pub trace_id: Option<String>,
    pub duration_ms: u64,
    /// `RateLimit-*`, `X-RateLimit-*`, `Retry-After`, as sent.
    pub rate_limit_headers: BTreeMap<String, String>,
    pub error: Option<String>,
}

/// The listing's pagination, as the first page showed it.
#[derive(Debug, Serialize)]
pub struct PaginationSeen {
    /// `next`, `token`, `offset` or `single`.
    pub style: String,
    /// The `pagination` object exactly as sent (null when absent).
    pub fields: serde_json::Value,
    pub bare_array: bool,
    pub entries: u64,
    pub skipped: i64,
    /// The next page's query, applied to our own list path.
    pub next_query: Option<String>,
    /// `known` or `unknown` when this page is the last.
    pub end: Option<End>,
    /// A short page that echoed no `pagination.limit` (it may have been
    /// capped): the query a sync asks next to learn whether it was the last.
    pub confirm_query: Option<String>,
    /// Why the pass would fail on this page (a `next` on another host...).
    pub error: Option<String>,
}

/// One lead and the convenience columns it fills.
#[derive(Debug, Serialize)]
pub struct LeadSeen {
    pub negotiation_id: String,
    pub top_level_keys: Vec<String>,
    pub filled: BTreeMap<String, String>,
    pub empty: Vec<String>,
}

/// The listed entry against the GET body.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub same: bool,
    /// Top-level keys whose values differ.
    pub differing_fields: Vec<String>,
    /// Columns the GET body would fill that the listed entry leaves empty.
    pub filled_only_by_get: Vec<String>,
}

/// The token used.
#[derive(Debug, Serialize)]
pub struct TokenSeen {
    /// `oauth` (refresh-token grant) or `static`.
    pub kind: String,
    /// From the access token when it is a JWT with a `scope`/`scp` claim.
    pub scopes: Option<Vec<String>>,
    pub note: Option<String>,
}

fn rate_limit_headers(r: &Response) -> BTreeMap<String, String> {
    r.headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.contains("ratelimit") || n.contains("rate-limit") || n == "retry-after"
        })
        .filter_map(|(name, v)| Some((name.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

fn request_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match u.query() {
            Some(q) => format!("GET {}?{q}", u.path()),
            None => format!("GET {}", u.path()),
        },
        Err(_) => format!("GET {url}"),
    }
}

fn call(url: &str, started: Instant, r: &Result<Response, ApiError>) -> Call {
    let duration_ms = started.elapsed().as_millis() as u64;
    match r {
        Ok(resp) => Call {
            request: request_of(url),
            http_status: Some(resp.status),
            trace_id: resp.trace_id.clone(),
            duration_ms,
            rate_limit_headers: rate_limit_headers(resp),
            error: None,
        },
        Err(e) => Call {
            request: request_of(url),
            http_status: e.http_status,
            trace_id: e.trace_id.clone(),
            duration_ms,
            rate_limit_headers: BTreeMap::new(),
            error: Some(e.message.clone()),
        },
    }
}

fn lead_seen(lead: &LeadRow) -> LeadSeen {
    let top_level_keys =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&lead.payload)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
    let mut filled = BTreeMap::new();
    let mut empty = Vec::new();
    for (name, value) in lead.columns() {
        match value {
            Some(v) => {
                filled.insert(name.to_string(), v.to_string());
            }
            None => empty.push(name.to_string()),
        }
    }
    LeadSeen {
        negotiation_id: lead.negotiation_id.clone(),
        top_level_keys,
        filled,
        empty,
    }
}

/// The scopes of an access token that is a JWT (read, never verified:
/// only shown). `None` for an opaque token.
fn jwt_scopes(token: &str) -> Option<Vec<String>> {
    let mut parts = token.split('.');
    let (_, claims, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match v.get("scope").or_else(|| v.get("scp"))? {
        serde_json::Value::String(s) => Some(s.split_whitespace().map(str::to_string).collect()),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    }
}

/// Looks, and reports. The exit code is 0 when both requests succeeded.
pub async fn run(config: Config, business_id: &str, json: bool) -> Result<u8> {
    let Some(business) = config.business(business_id).cloned() else {
        bail!("business {business_id} is not in the configuration");
    };
    // A refresh-token grant is single-use: a probe refreshing it while the
    // daemon does the same could get the grant refused for both. So, like
    // `sync`, it runs only while no other leadsync process sends requests.
    let _lock = match business.token {
        TokenSource::Refresh(_) => Some(ProcessLock::acquire(config.database()).context(
            "probe refreshes the business's OAuth token, which the running daemon also uses",
        )?),
        TokenSource::Static(_) => None,
    };
    // No mirror: the probe writes nothing to it (a refresh still rotates
    // the grant in the token store, as any request would).
    let auth = Arc::new(crate::app::open_auth(&config, None, HashMap::new())?);
    let client = Client::new(ClientSettings::from_config(&config), auth.clone())?;
    // Ctrl-C or SIGTERM must not kill the process while a refresh is in
    // flight: Thumbtack may have rotated the grant already, and its new
    // refresh token would be lost with the process. At the signal nothing
    // further is sent and no refresh starts (a GET in flight is dropped:
    // it changes nothing); a refresh already sent runs in the auth's own
    // tasks, which `settle` waits for (within `bound`) and whose rotated
    // token it stores.
    let stop = crate::cli::stop_on_signal()?;
    let bound = crate::cli::settle_bound(&config);
    let report = tokio::select! {
        // The signal first: once it has come, the probe is not polled again.
        biased;
        _ = stop.cancelled() => None,
        report = probe(&client, &auth, &business.id, &business.token, &config, &stop) => Some(report),
    };
    if report.is_none() || stop.is_cancelled() {
        interrupted(&auth, bound);
    }
    // A refresh it started is stored before the process exits.
    auth.settle(bound).await;
    let Some(report) = report.filter(|_| !stop.is_cancelled()) else {
        bail!(
            "probe of business {} interrupted: nothing more was asked, and a token refresh in \
             flight was let finish so that its rotated refresh token could be stored",
            business.id
        );
    };
    let report = report?;
    if json {
        println!("{}", crate::terminal::pretty_json(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// At Ctrl-C or SIGTERM: no request is sent and no refresh starts from
/// now on; one already sent may finish and store its token until `bound`
/// (less the second its write is given). A further Ctrl-C does not cut
/// that short (it is what the wait is for): it says how long it may still
/// take.
fn interrupted(auth: &Auth, bound: std::time::Duration) {
    let until = Instant::now() + bound;
    auth.begin_shutdown(until - std::time::Duration::from_secs(1).min(bound));
    let again = || {
        use tokio::signal::unix::{SignalKind, signal};
        Some((
            signal(SignalKind::interrupt()).ok()?,
            signal(SignalKind::terminate()).ok()?,
        ))
    };
    if let Some((mut int, mut term)) = again() {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                // Never a panic over a closed stderr: the wait it would end
                // is what keeps the rotated token.
                let _ = writeln!(
                    std::io::stderr(),
                    "probe: still waiting, at most {} s more, for a token refresh Thumbtack may \
                     already have answered with a new refresh token: stopping now could lose it \
                     (SIGKILL would)",
                    until.saturating_duration_since(Instant::now()).as_secs() + 1
                );
            }
        });
    }
    // Said once the listeners above are in place (a test waits for it).
    // Written, not `eprintln!`: a stderr gone away (a closed pipe, a dead
    // terminal) must not panic here, between the signal and `settle`, where
    // the unwinding would drop a refresh Thumbtack may have answered.
    let _ = writeln!(
        std::io::stderr(),
        "probe: interrupted; nothing more is asked, a token refresh in flight is let finish \
         (at most {} s) so that its rotated refresh token is stored",
        bound.as_secs()
    );
}

async fn probe(
    client: &Client,
    auth: &Auth,
    business_id: &str,
    source: &TokenSource,
    config: &Config,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<ProbeReport> {
    let mut listing =
        Listing::new(client.base_url(), config.file.poll.page_size).map_err(anyhow::Error::msg)?;
    let list_url = client
        .list_url(business_id, &listing.first())
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let started = Instant::now();
    let listed = client.get_once(business_id, &list_url).await;
    let list = call(&list_url, started, &listed);
    let mut report = ProbeReport {
        business_id: business_id.to_string(),
        base_url: client.base_url().to_string(),
        list,
        pagination: None,
        lead: None,
        get: None,
        comparison: None,
        token: token_seen(auth, business_id, source).await,
        ok: false,
    };
    let Ok(listed) = listed else {
        return Ok(report);
    };
    if stop.is_cancelled() {
        return Ok(report);
    }
    let page = match parse_page(&listed.body) {
        Ok(p) => p,
        Err(e) => {
            report.list.error = Some(format!("unreadable page: {e}"));
            return Ok(report);
        }
    };
    let step = listing.advance(&page);
    let style = listing.style().as_str().to_string();
    report.pagination = Some(PaginationSeen {
        style,
        fields: page
            .markers
            .raw
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or(serde_json::Value::Null),
        bare_array: page.markers.bare_array,
        entries: page.entries(),
        skipped: page.skipped,
        next_query: match &step {
            Ok(Step::Next(c)) => Some(c.to_query_string()),
            _ => None,
        },
        end: match &step {
            Ok(Step::End(e)) => Some(*e),
            _ => None,
        },
        confirm_query: match &step {
            Ok(Step::Confirm(c)) => Some(c.to_query_string()),
            _ => None,
        },
        error: step.as_ref().err().cloned(),
    });
    let Some(lead) = page.leads.first() else {
        // An empty listing is an answer too; there is nothing to GET.
        report.ok = report
            .pagination
            .as_ref()
            .is_some_and(|p| p.error.is_none());
        return Ok(report);
    };
    report.lead = Some(lead_seen(lead));
    let get_url = client.negotiation_url(&lead.negotiation_id);
    let started = Instant::now();
    let got = client.get_once(business_id, &get_url).await;
    report.get = Some(call(&get_url, started, &got));
    if let Ok(got) = got {
        let body = String::from_utf8_lossy(&got.body);
        let fields = differing_fields(&lead.payload, &body);
        let by_get = parse_lead_body(&body);
        let filled_only_by_get = by_get
            .map(|g| {
                g.columns()
                    .iter()
                    .zip(lead.columns().iter())
                    .filter(|((_, from_get), (_, listed))| from_get.is_some() && listed.is_none())
                    .map(|((name, _), _)| name.to_string())
                    .collect()
            })
            .unwrap_or_default();
        report.comparison = Some(Comparison {
            same: fields.is_empty(),
            differing_fields: fields,
            filled_only_by_get,
        });
        report.ok = report
            .pagination
            .as_ref()
            .is_some_and(|p| p.error.is_none());
    }
    Ok(report)
}

async fn token_seen(auth: &Auth, business_id: &str, source: &TokenSource) -> TokenSeen {
    let kind = match source {
        TokenSource::Refresh(_) => "oauth",
        TokenSource::Static(_) => "static",
    };
    let (scopes, note) = match auth.token(business_id).await {
        Ok(t) => match jwt_scopes(t.expose()) {
            Some(s) => (Some(s), None),
            None => (
                None,
                Some("the access token is opaque: its scopes cannot be read from it".to_string()),
            ),
        },
        Err(e) => (None, Some(format!("no token: {}", e.message))),
    };
    TokenSeen {
        kind: kind.to_string(),
        scopes,
        note,
    }
}

/// Text the server chose, for a terminal: every character that could
/// rewrite the screen, forge a line of the report or hide text
/// ([`crate::terminal::is_unsafe`]) is shown as its `\u{..}` escape.
fn shown(s: &str) -> String {
    crate::terminal::safe(s, crate::terminal::Unsafe::Escape)
}

/// [`shown`] of each, joined.
fn shown_all(items: &[String], sep: &str) -> String {
    items.iter().map(|s| shown(s)).collect::<Vec<_>>().join(sep)
}

fn call_lines(out: &mut String, title: &str, c: &Call) {
    let _ = writeln!(out, "{title}: {}", shown(&c.request));
    let status = c
        .http_status
        .map(|s| format!("HTTP {s}"))
        .unwrap_or_else(|| "no HTTP answer".into());
    let _ = writeln!(
        out,
        "  {status}, traceID {}, {} ms",
        c.trace_id.as_deref().map_or("(none)".into(), shown),
        c.duration_ms
    );
    if let Some(e) = &c.error {
        let _ = writeln!(out, "  error: {}", shown(e));
    }
    if c.rate_limit_headers.is_empty() {
        let _ = writeln!(out, "  rate-limit headers: none");
    } else {
        let h: Vec<String> = c
            .rate_limit_headers
            .iter()
            .map(|(k, v)| format!("{}: {}", shown(k), shown(v)))
            .collect();
        let _ = writeln!(out, "  rate-limit headers: {}", h.join("; "));
    }
}

/// The report for people.
pub fn render_text(r: &ProbeReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "probe of business {} at {} (read-only)",
        shown(&r.business_id),
        shown(&r.base_url)
    );
    call_lines(&mut out, "list", &r.list);
    if let Some(p) = &r.pagination {
        let _ = writeln!(
            out,
            "  pagination style: {}; fields: {}{}",
            p.style,
            shown(&p.fields.to_string()),
            if p.bare_array {
                " (a bare array, no envelope)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  {} entries on the page ({} without a negotiationID)",
            p.entries, p.skipped
        );
        match (&p.next_query, p.end, &p.error) {
            (_, _, None) if p.confirm_query.is_some() => {
                let _ = writeln!(
                    out,
                    "  end of the listing: NOT CONFIRMED (a short page that does not echo its size limit \
                     may have been capped): syncs ask ?{} too (the page's last lead back, when it lists two or more), \
                     and know the end only if that lists nothing past the page",
                    shown(p.confirm_query.as_deref().unwrap_or_default())
                );
            }
            (_, _, Some(e)) => {
                let _ = writeln!(out, "  the listing cannot be followed: {}", shown(e));
            }
            (Some(q), _, _) => {
                let _ = writeln!(
                    out,
                    "  next page: ?{} (applied to our own list path)",
                    shown(q)
                );
            }
            (None, Some(End::Known), _) => {
                let _ = writeln!(out, "  end of the listing: known (this is the last page)");
            }
            (None, Some(End::Unknown), _) => {
                let _ = writeln!(
                    out,
                    "  end of the listing: UNKNOWN (a full page with no marker): full scans will mark nothing missing"
                );
            }
            (None, None, None) => {}
        }
    }
    if let Some(l) = &r.lead {
        let _ = writeln!(out, "lead {}", shown(&l.negotiation_id));
        let _ = writeln!(
            out,
            "  top-level keys: {}",
            shown_all(&l.top_level_keys, ", ")
        );
        let filled: Vec<String> = l
            .filled
            .iter()
            .map(|(k, v)| format!("{k} = {v:?}"))
            .collect();
        let _ = writeln!(
            out,
            "  columns filled: {}",
            if filled.is_empty() {
                "none".into()
            } else {
                filled.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "  columns empty: {}",
            if l.empty.is_empty() {
                "none".into()
            } else {
                l.empty.join(", ")
            }
        );
    } else if r.list.error.is_none() {
        let _ = writeln!(
            out,
            "lead: the page lists none, so nothing was fetched by GET"
        );
    }
    if let Some(g) = &r.get {
        call_lines(&mut out, "get", g);
    }
    if let Some(c) = &r.comparison {
        if c.same {
            let _ = writeln!(out, "  the listed entry and the GET body are the same");
        } else {
            let _ = writeln!(
                out,
                "  the listed entry and the GET body DIFFER in {}: the list carries summaries \
                 (the mirror stores what the list sends)",
                shown_all(&c.differing_fields, ", ")
            );
        }
        if !c.filled_only_by_get.is_empty() {
            let _ = writeln!(
                out,
                "  only the GET body fills: {}",
                c.filled_only_by_get.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "token: {}; scopes: {}",
        r.token.kind,
        match &r.token.scopes {
            Some(s) if !s.is_empty() => shown_all(s, " "),
            Some(_) => "(none)".into(),
            None => r.token.note.as_deref().map_or("unknown".into(), shown),
        }
    );
    let _ = writeln!(out, "{}", if r.ok { "probe: ok" } else { "probe: FAILED" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the server sends (a traceID, an error body's excerpt, a lead's
    /// keys and id, a JWT's scopes) reached the terminal as it came: an
    /// escape sequence could rewrite the screen (hide the FAILED line, or
    /// fake a `probe: ok`), and a newline forge a line of its own.
    /// Review adm: the `pagination` object was printed as serde_json
    /// writes it, which leaves C1 controls (U+009B is a one-character CSI)
    /// and bidirectional overrides raw; the bidi marks (U+200E, U+200F,
    /// U+061C) and the Unicode line and paragraph separators passed too.
    #[test]
    fn text_from_the_server_cannot_drive_the_terminal_or_forge_lines() {
        let text = render_text(&hostile_report());
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(!text.chars().any(is_bidi_or_separator), "{text:?}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("probe:")).count(),
            1,
            "{text}"
        );
        assert!(text.ends_with("probe: FAILED\n"), "{text}");
    }

    /// Review xb: the zero-width characters, the word joiner, the byte
    /// order mark, the soft hyphen and tag characters passed too (`cli`'s
    /// blanking had them): both use [`crate::terminal`] now.
    fn is_bidi_or_separator(c: char) -> bool {
        matches!(
            c,
            '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2060}'..='\u{2064}'
                | '\u{feff}'
                | '\u{ad}'
                | '\u{e0001}'
                | '\u{e0020}'..='\u{e007f}'
                | '\u{61c}'
                | '\u{2028}'
                | '\u{2029}'
        )
    }

    /// `--json` escaped C0 controls (as JSON must) but left C1 controls
    /// and bidi characters raw: `leadsync probe --json` read on a terminal
    /// could be driven by the server. They are `\u` escapes now, and the
    /// JSON still reads back as the same values.
    #[test]
    fn json_escapes_c1_controls_and_bidi_characters_and_reads_back_the_same() {
        let report = hostile_report();
        let json = crate::terminal::pretty_json(&report).unwrap();
        assert!(
            !json.chars().any(|c| c.is_control() && c != '\n'),
            "{json:?}"
        );
        assert!(!json.chars().any(is_bidi_or_separator), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, serde_json::to_value(&report).unwrap());
    }

    fn hostile_report() -> ProbeReport {
        const ESC: &str = "\u{1b}[2J\u{9b}1A\u{202e}\u{200e}\u{200f}\u{61c}\u{2028}\u{2029}\
                           \u{200b}\u{200d}\u{2060}\u{2064}\u{feff}\u{ad}\u{e0001}\u{e0041}";
        let call = |what: &str| Call {
            request: format!("GET /api/v4/negotiations/{what}"),
            http_status: Some(500),
            trace_id: Some(format!("t{ESC}\nprobe: ok")),
            duration_ms: 1,
            rate_limit_headers: BTreeMap::new(),
            error: Some(format!("an HTML page (9 bytes: <b>{ESC}</b>)\rprobe: ok")),
        };
        ProbeReport {
            business_id: "1".into(),
            base_url: "http://127.0.0.1:9".into(),
            list: call("x"),
            pagination: Some(PaginationSeen {
                style: "next".into(),
                fields: serde_json::json!({ format!("next{ESC}"): format!("p{ESC}\nprobe: ok") }),
                bare_array: false,
                entries: 1,
                skipped: 0,
                next_query: None,
                end: None,
                confirm_query: None,
                error: Some(format!("a next link on another host {ESC}")),
            }),
            lead: Some(LeadSeen {
                negotiation_id: format!("7{ESC}"),
                top_level_keys: vec![format!("key{ESC}\nprobe: ok")],
                filled: BTreeMap::from([("title".to_string(), format!("t{ESC}\nprobe: ok"))]),
                empty: vec![],
            }),
            get: Some(call("7")),
            comparison: Some(Comparison {
                same: false,
                differing_fields: vec![format!("k{ESC}")],
                filled_only_by_get: vec![],
            }),
            token: TokenSeen {
                kind: "oauth".into(),
                scopes: Some(vec![format!("s{ESC}")]),
                note: None,
            },
            ok: false,
        }
    }

    #[test]
    fn scopes_are_read_from_a_jwt_and_opaque_tokens_say_so() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"scope":"supply::negotiations.read offline_access"}"#);
        let token = format!("eyJhbGciOiJub25lIn0.{claims}.sig");
        assert_eq!(
            jwt_scopes(&token),
            Some(vec![
                "supply::negotiations.read".to_string(),
                "offline_access".to_string()
            ])
        );
        assert_eq!(jwt_scopes("sbx_static_1_2a"), None);
    }
}
