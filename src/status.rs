//! `leadsync status`: what the database says about each business and the outbox.

use crate::config::Config;
use crate::store::{messages, outbox};
// Text from the mirror (ids, names, a server's error text, alerts: what
// another program or an older configuration wrote) is shown one cell or
// line at a time as `shown` (terminal::blank); `--json` is
// terminal::pretty_json.
use crate::terminal::blank as shown;
use anyhow::Result;
use chrono::Utc;
use rusqlite::Connection;
use serde::Serialize;
use std::collections::HashMap;

/// The whole report (`status --json` prints it as is).
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub database: String,
    pub generated_at: String,
    /// OAuth conditions a person must see once, not per business (the
    /// client refused, a token file refused, a rotated token not stored).
    pub auth_alerts: Vec<AuthAlert>,
    /// Conditions of the running daemon's process a person must act on (a
    /// failed sync of the database to disk: webhook deliveries refused
    /// until a restart). Cleared when the daemon next starts.
    pub daemon_alerts: Vec<AuthAlert>,
    pub businesses: Vec<BusinessStatus>,
    /// The running daemon's schedules and how far behind each is (empty
    /// when no daemon has written them).
    pub schedules: Vec<ScheduleStatus>,
    pub outbox: OutboxStatus,
    /// The mirrored conversations and `message_outbox`.
    pub messages: MessagesStatus,
}

/// Messages: the mirror's and the replies to send.
#[derive(Debug, Serialize)]
pub struct MessagesStatus {
    #[serde(flatten)]
    pub mirrored: messages::MessageCounts,
    /// `message_outbox` rows by state.
    pub outbox: outbox::Counts,
    pub oldest_pending_age_secs: Option<i64>,
}

/// One schedule of the running daemon (SPEC §11).
#[derive(Debug, Serialize)]
pub struct ScheduleStatus {
    #[serde(flatten)]
    pub lag: crate::store::requests::ScheduleLag,
    /// How long the oldest waiting pass has been due; 0 when none waits.
    pub lag_secs: i64,
    /// The daemon has not refreshed these figures for over two minutes.
    pub stale: bool,
}

/// One OAuth condition.
#[derive(Debug, Serialize)]
pub struct AuthAlert {
    pub message: String,
    pub since: String,
}

/// One business.
#[derive(Debug, Serialize)]
pub struct BusinessStatus {
    pub business_id: String,
    pub name: Option<String>,
    /// In the current configuration.
    pub configured: bool,
    pub enabled: bool,
    pub leads: i64,
    /// Leads the last full scan no longer listed.
    pub missing: i64,
    pub last_sync_started_at: Option<String>,
    pub last_sync_finished_at: Option<String>,
    pub last_sync_kind: Option<String>,
    /// `ok` or `error`; `null` when never synced.
    pub last_sync_outcome: Option<String>,
    pub last_sync_age_secs: Option<i64>,
    pub last_error: Option<String>,
    pub last_full_sync_at: Option<String>,
    pub needs_reauth: bool,
    pub needs_reauth_reason: Option<String>,
}

/// The outbox.
#[derive(Debug, Serialize)]
pub struct OutboxStatus {
    #[serde(flatten)]
    pub counts: outbox::Counts,
    pub oldest_pending_age_secs: Option<i64>,
    /// The most recent dead rows (up to 10).
    pub recent_dead: Vec<DeadRow>,
}

/// A dead row, for the operator.
#[derive(Debug, Serialize)]
pub struct DeadRow {
    pub id: i64,
    pub negotiation_id: String,
    pub status: String,
    /// A number as leadsync writes it; anything else the partner's
    /// program wrote, as text (as `outbox list` shows a column).
    pub last_http_status: Option<serde_json::Value>,
    pub last_trace_id: Option<String>,
    pub last_error: Option<String>,
}

fn age_secs(t: &Option<String>) -> Option<i64> {
    t.as_deref()
        .and_then(crate::time::parse)
        .map(|t| (Utc::now() - t).num_seconds().max(0))
}

/// Reads the report. Configured businesses the database has not seen yet
/// are listed as never synced.
pub fn report(conn: &Connection, config: &Config) -> Result<StatusReport> {
    // After an upgrade the older daemon runs on the mirror until the
    // service restarts, and `status` reads its schema without migrating it
    // (README, "Upgrading: who migrates"): a table that schema does not have
    // yet is shown empty instead of failing the whole report.
    let older = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?
        < crate::store::schema_version();
    let mut leads: HashMap<String, (i64, i64)> = HashMap::new();
    {
        let mut stmt = conn.prepare(
            "SELECT business_id, count(*), count(missing_since) FROM negotiations GROUP BY business_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))?;
        for row in rows {
            let (b, n, m) = row?;
            leads.insert(b, (n, m));
        }
    }
    let mut businesses = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT business_id, name, configured, enabled, last_sync_started_at, last_sync_finished_at,
                    last_sync_kind, last_sync_outcome, last_error, last_full_sync_at, needs_reauth,
                    needs_reauth_reason
               FROM businesses ORDER BY configured DESC, business_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(BusinessStatus {
                business_id: r.get(0)?,
                name: r.get(1)?,
                configured: r.get::<_, i64>(2)? == 1,
                enabled: r.get::<_, i64>(3)? == 1,
                last_sync_started_at: r.get(4)?,
                last_sync_finished_at: r.get(5)?,
                last_sync_kind: r.get(6)?,
                last_sync_outcome: r.get(7)?,
                last_error: r.get(8)?,
                last_full_sync_at: r.get(9)?,
                needs_reauth: r.get::<_, i64>(10)? == 1,
                needs_reauth_reason: r.get(11)?,
                leads: 0,
                missing: 0,
                last_sync_age_secs: None,
            })
        })?;
        for row in rows {
            businesses.push(row?);
        }
    }
    // The database's view of "configured" is as of the last run; the
    // configuration read now is the truth.
    for b in &mut businesses {
        let now_configured = config.business(&b.business_id);
        b.configured = now_configured.is_some();
        if let Some(c) = now_configured {
            b.enabled = c.enabled;
            b.name = c.name.clone().or(b.name.take());
        }
    }
    let known: std::collections::HashSet<String> =
        businesses.iter().map(|b| b.business_id.clone()).collect();
    for c in &config.businesses {
        if !known.contains(&c.id) {
            businesses.push(BusinessStatus {
                business_id: c.id.clone(),
                name: c.name.clone(),
                configured: true,
                enabled: c.enabled,
                leads: 0,
                missing: 0,
                last_sync_started_at: None,
                last_sync_finished_at: None,
                last_sync_kind: None,
                last_sync_outcome: None,
                last_sync_age_secs: None,
                last_error: None,
                last_full_sync_at: None,
                needs_reauth: false,
                needs_reauth_reason: None,
            });
        }
    }
    for b in &mut businesses {
        let (n, m) = leads.get(&b.business_id).copied().unwrap_or((0, 0));
        b.leads = n;
        b.missing = m;
        b.last_sync_age_secs = age_secs(&b.last_sync_finished_at);
    }
    let counts = outbox::counts(conn)?;
    let oldest_pending_age_secs = age_secs(&counts.oldest_pending_created_at);
    let mut recent_dead = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT id, negotiation_id, status, last_http_status, last_trace_id, last_error
               FROM outbox WHERE state = 'dead' ORDER BY id DESC LIMIT 10",
        )?;
        // Leniently, as `outbox list`: the partner's program may have
        // written a row itself (a BLOB error, a text HTTP status); one such
        // row must not fail the whole report.
        let rows = stmt.query_map([], |r| {
            Ok(DeadRow {
                id: r.get(0)?,
                negotiation_id: outbox::shown(r, 1)?.unwrap_or_default(),
                status: outbox::shown(r, 2)?.unwrap_or_default(),
                last_http_status: match r.get_ref(3)? {
                    rusqlite::types::ValueRef::Integer(n) => Some(n.into()),
                    _ => outbox::shown(r, 3)?.map(Into::into),
                },
                last_trace_id: outbox::shown(r, 4)?,
                last_error: outbox::shown(r, 5)?,
            })
        })?;
        for row in rows {
            recent_dead.push(row?);
        }
    }
    let message_outbox = unless_missing(older, outbox::counts_of(conn, outbox::Kind::Message))?;
    let messages = MessagesStatus {
        mirrored: {
            // As the poller reads a wait (crate::messages::poll_after_pass).
            let (now, horizon) = crate::messages::wait_window(chrono::Utc::now());
            unless_missing(older, messages::counts(conn, &now, &horizon))?
        },
        oldest_pending_age_secs: age_secs(&message_outbox.oldest_pending_created_at),
        outbox: message_outbox,
    };
    let schedules = unless_missing(older, crate::store::requests::read_lag(conn))?
        .into_iter()
        .map(|lag| {
            let lag_secs = age_secs(&lag.oldest_due_at).unwrap_or(0);
            let stale = age_secs(&Some(lag.updated_at.clone())).is_none_or(|a| a > 120);
            ScheduleStatus {
                lag,
                lag_secs,
                stale,
            }
        })
        .collect();
    let auth_alerts = unless_missing(older, crate::store::mirror::auth_alerts(conn))?
        .into_iter()
        .map(|(message, since)| AuthAlert { message, since })
        .collect();
    let daemon_alerts = unless_missing(older, crate::store::mirror::daemon_alerts(conn))?
        .into_iter()
        .map(|(message, since)| AuthAlert { message, since })
        .collect();
    Ok(StatusReport {
        daemon_alerts,
        messages,
        database: config.database().display().to_string(),
        generated_at: crate::time::now(),
        auth_alerts,
        businesses,
        schedules,
        outbox: OutboxStatus {
            counts,
            oldest_pending_age_secs,
            recent_dead,
        },
    })
}

/// `r`, or nothing when it failed on a table an `older` schema does not
/// have yet (see [`report`]).
fn unless_missing<T: Default>(older: bool, r: Result<T>) -> Result<T> {
    match r {
        Err(e)
            if older
                && e.chain().any(|c| {
                    c.downcast_ref::<rusqlite::Error>()
                        .is_some_and(|e| e.to_string().starts_with("no such table"))
                }) =>
        {
            Ok(T::default())
        }
        r => r,
    }
}

fn ago(secs: Option<i64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) => {
            let now = Utc::now();
            format!(
                "{} ago",
                crate::time::age(now - chrono::Duration::seconds(s), now)
            )
        }
    }
}

/// The report as a table for people.
pub fn render_text(r: &StatusReport) -> String {
    let mut out = format!("database: {}\n", shown(&r.database));
    if !r.daemon_alerts.is_empty() {
        out.push_str("\ndaemon:\n");
        for a in &r.daemon_alerts {
            out.push_str(&format!(
                "  ! {} (since {})\n",
                shown(&a.message),
                shown(&a.since)
            ));
        }
    }
    if !r.auth_alerts.is_empty() {
        out.push_str("\nOAuth:\n");
        for a in &r.auth_alerts {
            out.push_str(&format!(
                "  ! {} (since {})\n",
                shown(&a.message),
                shown(&a.since)
            ));
        }
    }
    out.push_str("\nbusinesses:\n");
    let client_refused = r
        .auth_alerts
        .iter()
        .any(|a| a.message.starts_with("OAuth client refused"));
    if r.businesses.is_empty() {
        out.push_str("  (none configured)\n");
    }
    out.push_str(&format!(
        "  {:<20} {:<24} {:>7}  {:<12} {:<7} {}\n",
        "BUSINESS", "NAME", "LEADS", "LAST SYNC", "RESULT", "NOTES"
    ));
    for b in &r.businesses {
        let mut notes = Vec::new();
        if b.needs_reauth {
            notes.push(format!(
                "NEEDS RE-AUTHORIZATION: {}",
                shown(
                    b.needs_reauth_reason
                        .as_deref()
                        .unwrap_or("the token was refused")
                )
            ));
        }
        if !b.configured {
            notes.push("not in the configuration".into());
        } else if !b.enabled {
            notes.push("disabled".into());
        }
        if b.missing > 0 {
            notes.push(format!("{} missing", b.missing));
        }
        if b.last_sync_outcome.as_deref() == Some("error")
            && let Some(e) = &b.last_error
            && !b.needs_reauth
            && !(client_refused && e.contains("OAuth client refused"))
        {
            notes.push(format!("error: {}", shown(e)));
        }
        let name: String = shown(b.name.as_deref().unwrap_or_default())
            .chars()
            .take(24)
            .collect();
        out.push_str(&format!(
            "  {:<20} {:<24} {:>7}  {:<12} {:<7} {}\n",
            shown(&b.business_id),
            name,
            b.leads,
            ago(b.last_sync_age_secs),
            shown(b.last_sync_outcome.as_deref().unwrap_or("-")),
            notes.join("; ")
        ));
    }
    if !r.schedules.is_empty() {
        out.push_str("\nschedules (the running daemon's queue):\n");
        for s in &r.schedules {
            let lag = if s.lag.waiting > 0 {
                format!(
                    "{} waiting, lag {}",
                    s.lag.waiting,
                    crate::time::age(
                        Utc::now() - chrono::Duration::seconds(s.lag_secs),
                        Utc::now()
                    )
                )
            } else {
                "none waiting, no lag".into()
            };
            out.push_str(&format!(
                "  {:<4} `{}`: {} businesses, {lag}{}\n",
                shown(&s.lag.kind),
                shown(&s.lag.schedule),
                s.lag.businesses,
                if s.stale {
                    " (not refreshed for over 2 minutes: is the daemon running?)"
                } else {
                    ""
                }
            ));
        }
    }
    let c = &r.outbox.counts;
    out.push_str(&format!(
        "\noutbox: {} pending, {} sending, {} sent, {} dead, {} canceled\n",
        c.pending, c.sending, c.sent, c.dead, c.canceled
    ));
    if let Some(age) = r.outbox.oldest_pending_age_secs {
        out.push_str(&format!("  oldest pending: {}\n", ago(Some(age))));
    }
    if !r.outbox.recent_dead.is_empty() {
        out.push_str("  dead rows (newest first; `leadsync outbox retry ID` sends one again):\n");
        for d in &r.outbox.recent_dead {
            out.push_str(&format!(
                "    #{} negotiation {} {}: {}\n",
                d.id,
                shown(&d.negotiation_id),
                shown(&d.status),
                shown(d.last_error.as_deref().unwrap_or("(no error recorded)"))
            ));
        }
    }
    let m = &r.messages;
    out.push_str(&format!(
        "\nmessages: {} mirrored ({} from customers, {} from the business){}\n",
        m.mirrored.total,
        m.mirrored.from_customers,
        m.mirrored.from_business,
        if m.mirrored.failed_polls > 0 {
            format!(
                "; {} leads whose conversation could not be read ({}see message_polls)",
                m.mirrored.failed_polls,
                match &m.mirrored.waiting_until {
                    Some(until) if m.mirrored.waiting_polls > 0 => format!(
                        "{} refused, waiting until {} at the latest unless they change; ",
                        m.mirrored.waiting_polls,
                        shown(until)
                    ),
                    _ => String::new(),
                }
            )
        } else {
            String::new()
        }
    ));
    let c = &m.outbox;
    out.push_str(&format!(
        "message_outbox: {} pending, {} sending, {} sent, {} dead, {} canceled\n",
        c.pending, c.sending, c.sent, c.dead, c.canceled
    ));
    if let Some(age) = m.oldest_pending_age_secs {
        out.push_str(&format!("  oldest pending reply: {}\n", ago(Some(age))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::every_version::{populated, versions};

    /// After a package upgrade the older daemon runs on the mirror until
    /// the service restarts, and `status` (which never migrates) reads its
    /// older schema: it shows what that schema has, never fails on what it
    /// lacks (README, "Upgrading: who migrates").
    #[test]
    fn status_reads_every_older_schema() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("leadsync.toml");
        std::fs::write(dir.path().join("t"), "token").unwrap();
        let mut failed = Vec::new();
        for version in versions() {
            let db = dir.path().join(format!("m{version}.db"));
            drop(populated(&db, version));
            std::fs::write(
                &conf,
                format!(
                    "database = {:?}\n[[businesses]]\nid = \"468046965846925323\"\naccess_token_file = \"t\"\n",
                    db.display().to_string()
                ),
            )
            .unwrap();
            let config = crate::config::ConfigSource {
                files: vec![conf.clone()],
                ..Default::default()
            }
            .load()
            .unwrap();
            let (conn, found) = crate::store::open_read_only(&db).unwrap();
            assert_eq!(found, version);
            match report(&conn, &config) {
                Ok(r) => {
                    assert_eq!(r.businesses.len(), 1, "schema {version}");
                    assert_eq!(r.businesses[0].leads, 1, "schema {version}");
                    assert_eq!(r.outbox.counts.dead, 1, "schema {version}");
                    assert_eq!(r.outbox.recent_dead.len(), 1, "schema {version}");
                    if version >= 4 {
                        assert_eq!(r.messages.mirrored.total, 1, "schema {version}");
                    }
                    if version >= 7 {
                        assert_eq!(r.messages.outbox.sent, 1, "schema {version}");
                        assert_eq!(r.messages.outbox.pending, 1, "schema {version}");
                    }
                }
                Err(e) => failed.push(format!("schema {version}: {e:#}")),
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }
}
