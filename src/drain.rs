//! The outbox drainer: claims due rows (one per negotiation, in order),
//! posts them, and records every attempt and outcome in the table. One
//! drainer sends both outboxes — job-status transitions (`outbox`) and
//! replies (`message_outbox`): the same claiming, order per negotiation,
//! backoff, classification, attempts log and crash recovery; only what is
//! posted differs ([`outbox::Kind`], [`outbox::Content`]). Retry
//! state lives in the rows, so a restart neither forgets a backoff nor
//! resends in a burst.

use crate::config::Config;
use crate::store::Store;
use crate::store::outbox::{self, Attempt, ClaimFilter, Claimed, Content, Finish, Kind, Recorded};
use crate::thumbtack::model::{JobStatusBody, Message, MessageBody};
use crate::thumbtack::{Client, Disposition};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How often blocked businesses are checked for a new grant.
const REAUTH_RECHECK: Duration = Duration::from_secs(30);

/// Token refreshes a re-authorization recheck runs at once.
const RECHECK_CONCURRENCY: usize = 4;

/// `leadsync drain`: claims that fail in a row, with nothing in flight,
/// before the pass gives up.
const CLAIM_FAILURES_BEFORE_GIVING_UP: u32 = 5;

/// How far Thumbtack's clock and this one may differ, for the dates of a
/// conversation's messages: a message that is a reply posted by an earlier
/// attempt is dated within this of that attempt (README, Messages).
pub const REPLY_CHECK_SLACK: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// The message of a conversation's page that is reply `text` of
/// `negotiation_id`, posted by an earlier attempt whose answer was lost: from
/// the business, with exactly that text, dated within one of the attempts
/// whose outcome is unknown — no earlier than [`REPLY_CHECK_SLACK`] before
/// it started, no later than that slack and twice `api_timeout` after it
/// ended (one request timeout for Thumbtack's own lag behind a gateway that
/// answered, one for a check before the POST of an attempt cut by a kill,
/// dated by its claim) — and with an id no other sent reply of the
/// negotiation was given. A message dated between two such attempts (the
/// row waiting for its retry, nothing of it in flight) or after the last
/// is not taken for it: the pro may have typed the same text in
/// Thumbtack's app then. `None` when the check says another reply of the
/// same text may be there too.
pub fn found_in_conversation<'a>(
    page: &'a [Message],
    negotiation_id: &str,
    text: &str,
    check: &outbox::ReplyCheck,
    api_timeout: Duration,
) -> Option<&'a Message> {
    if check.twin {
        return None;
    }
    let lag = chrono::TimeDelta::from_std(api_timeout * 2).ok()? + REPLY_CHECK_SLACK;
    let windows: Vec<_> = check
        .windows
        .iter()
        .filter_map(|(start, end)| {
            Some((
                crate::time::parse(start)? - REPLY_CHECK_SLACK,
                crate::time::parse(end)? + lag,
            ))
        })
        .collect();
    page.iter().find(|m| {
        m.sender.as_deref() == Some("Business")
            && m.text.as_deref() == Some(text)
            && m.negotiation_id
                .as_deref()
                .is_none_or(|n| n == negotiation_id)
            && !check.taken.contains(&m.message_id)
            && m.sent_at_raw
                .as_deref()
                .and_then(crate::time::parse)
                .is_some_and(|t| windows.iter().any(|&(from, to)| from <= t && t <= to))
    })
}

/// Why a business's rows wait (SPEC §4): they are put aside without
/// counting attempts and never go dead for it; `last_error` says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// `enabled = false`.
    Disabled,
    /// Its grant was refused: a person must re-authorize it (the reason given).
    NeedsReauth(String),
    /// The application's OAuth client was refused (no business is marked).
    OAuthClientRefused(String),
}

impl WaitReason {
    /// The row's `last_error` while it waits.
    pub fn describe(&self, business_id: &str) -> String {
        match self {
            WaitReason::Disabled => {
                format!("waiting: business {business_id} is disabled (enabled = false)")
            }
            WaitReason::NeedsReauth(why) if why.contains(business_id) => format!("waiting: {why}"),
            WaitReason::NeedsReauth(why) => {
                format!("waiting: business {business_id} needs re-authorization: {why}")
            }
            WaitReason::OAuthClientRefused(why) => format!(
                "waiting: the OAuth client was refused ({why}); business {business_id} sends again once it is accepted"
            ),
        }
    }
}

/// More businesses whose rows wait, from outside the drainer (the auth
/// side: an OAuth client refused). Called at every claim.
pub type WaitHook = Arc<dyn Fn() -> Vec<(String, WaitReason)> + Send + Sync>;

/// The part of `daemon.shutdown_timeout_secs` kept after the in-flight
/// sends, for recording the answers already in, the token store's last
/// write and the closing records.
pub const SHUTDOWN_RESERVE: Duration = Duration::from_secs(2);

/// The last part of `daemon.shutdown_timeout_secs`, for the closing records:
/// until then (from the send bound, `SHUTDOWN_RESERVE` before the end) the
/// drainer still records the outcomes of requests already answered.
pub const CLOSING_RESERVE: Duration = Duration::from_millis(500);

/// The drainer's settings, from `[outbox]`.
#[derive(Debug, Clone)]
pub struct DrainSettings {
    pub poll_interval: Duration,
    pub concurrency: usize,
    pub max_attempts: i64,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Businesses whose rows are sent.
    pub configured: Arc<HashSet<String>>,
    /// Configured but `enabled = false`: their rows wait.
    pub disabled: Vec<String>,
    /// The business of rows that cannot tell theirs, when only one is configured.
    pub default_business: Option<String>,
    /// How long in-flight sends may finish after a stop.
    pub shutdown_grace: Duration,
    /// How often businesses needing re-authorization are tried again.
    pub reauth_recheck: Duration,
}

impl DrainSettings {
    /// The settings a configuration asks for.
    pub fn from_config(c: &Config) -> DrainSettings {
        let o = &c.file.outbox;
        DrainSettings {
            poll_interval: Duration::from_millis(o.poll_interval_ms),
            concurrency: o.concurrency,
            max_attempts: i64::from(o.max_attempts),
            backoff_initial: Duration::from_secs_f64(o.backoff_initial_secs),
            backoff_max: Duration::from_secs_f64(o.backoff_max_secs),
            configured: Arc::new(c.businesses.iter().map(|b| b.id.clone()).collect()),
            disabled: c
                .businesses
                .iter()
                .filter(|b| !b.enabled)
                .map(|b| b.id.clone())
                .collect(),
            default_business: match c.businesses.as_slice() {
                [only] => Some(only.id.clone()),
                _ => None,
            },
            shutdown_grace: Duration::from_secs(c.file.daemon.shutdown_timeout_secs)
                .saturating_sub(SHUTDOWN_RESERVE),
            reauth_recheck: REAUTH_RECHECK,
        }
    }
}

/// The delay before attempt `attempt + 1`: exponential from the initial
/// delay with jitter (between 1× and 2× the step), computed from the
/// persisted attempt count, and capped with jitter kept at the cap (between
/// 90% and 100% of it), so that rows failed by one outage do not all come
/// back in the same second.
pub fn backoff_delay(attempt: i64, initial: Duration, max: Duration) -> Duration {
    let step = attempt.clamp(1, 64) - 1;
    let base = initial.as_secs_f64() * 2f64.powi(step as i32);
    let jittered = base * (1.0 + fastrand::f64());
    let cap = max.as_secs_f64();
    let secs = if jittered.is_finite() && jittered < cap {
        jittered
    } else {
        cap * (1.0 - 0.1 * fastrand::f64())
    };
    Duration::try_from_secs_f64(secs).unwrap_or(max).min(max)
}

/// SPEC §4's retry delay: the larger of the backoff and `Retry-After`, both
/// capped by `max`. A `Retry-After: 0` (or a date in the past) never makes
/// a row retry sooner than its backoff.
pub fn retry_delay(
    attempt: i64,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let backoff = backoff_delay(attempt, initial, max);
    retry_after.map_or(backoff, |r| backoff.max(r.min(max)))
}

/// What became of one claimed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowResult {
    Sent,
    Retry,
    Dead,
    /// Held back until its business is re-authorized.
    Held,
    /// Given up at the stop's send bound without an answer: the row stays
    /// `sending` and is sent again at the next start.
    CutShort,
}

/// Totals of a `drain` pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainSummary {
    pub sent: u64,
    pub retried: u64,
    pub dead: u64,
    pub held: u64,
}

impl DrainSummary {
    fn add(&mut self, r: RowResult) {
        match r {
            RowResult::Sent => self.sent += 1,
            RowResult::Retry | RowResult::CutShort => self.retried += 1,
            RowResult::Dead => self.dead += 1,
            RowResult::Held => self.held += 1,
        }
    }

    /// True when every attempted row was sent.
    pub fn all_sent(&self) -> bool {
        self.retried == 0 && self.dead == 0 && self.held == 0
    }
}

/// The drainer.
pub struct Drainer {
    store: Store,
    /// Settings and client; a configuration reload swaps them.
    current: std::sync::RwLock<(Arc<DrainSettings>, Arc<Client>)>,
    /// The filter whose waits the table was last brought in line with.
    applied: std::sync::Mutex<Option<ClaimFilter>>,
    /// More wait reasons, set by the auth side (see [`WaitHook`]).
    wait_hook: std::sync::RwLock<Option<WaitHook>>,
    /// Which table the next claim looks at first: alternating, so that a
    /// full queue of one kind never starves the other.
    replies_first: std::sync::atomic::AtomicBool,
    /// Rows claimed and not yet recorded: being sent, or answered with the
    /// outcome not in the table yet (being recorded, or refused by the
    /// database). An entry leaves only once its row's outcome is recorded,
    /// so what is left after a stop is exactly the rows it leaves `sending`,
    /// and the log names them.
    sending: std::sync::Mutex<SendingRows>,
    /// When in-flight sends are given up after a stop, if the daemon set it
    /// ([`Drainer::stop_sends_by`]); else `shutdown_grace` after the stop is seen.
    sends_deadline: std::sync::Mutex<Option<Instant>>,
    /// Cancelled at the stop's send bound: requests still without an answer
    /// are given up (answers already in are still recorded).
    give_up_sends: CancellationToken,
    /// Once stopping: until when answers already in are still recorded.
    records_by: std::sync::Mutex<Option<Instant>>,
    /// Outcomes the database refused to record (disk full, an I/O error)
    /// after the request had its answer: kept here and recorded before each
    /// claim until it takes them. Their rows stay `sending` meanwhile, which
    /// holds back the rest of their negotiation and keeps them from being
    /// claimed, so none is sent twice while the daemon runs.
    unrecorded: std::sync::Mutex<Vec<Unrecorded>>,
    /// The wall clock [`Drainer::run`] watches ([`Drainer::set_wall_clock`]).
    wall: std::sync::RwLock<WallClock>,
}

/// An outcome waiting to be recorded (see [`Drainer::unrecorded`]).
struct Unrecorded {
    row: Arc<Claimed>,
    finish: Finish,
    attempts: Vec<Attempt>,
    /// When the request ended: the outcome keeps that time.
    at: String,
    result: RowResult,
    tries: u32,
}

/// A round of [`Drainer::record_unrecorded`]: whatever it did not record
/// goes back to the list when it ends, however it ends.
struct Round<'a> {
    drainer: &'a Drainer,
    waiting: std::collections::VecDeque<Unrecorded>,
    left: Vec<Unrecorded>,
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        if let Ok(mut u) = self.drainer.unrecorded.lock() {
            u.extend(self.left.drain(..));
            u.extend(self.waiting.drain(..));
        }
    }
}

/// A wall clock: `Utc::now`, or a test's.
pub type WallClock = Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>;

/// (table, id, claim_id) → (negotiation id, the outcome once the request
/// ended and only its recording is left). The claim_id tells a claim from a
/// later one of the same row (put back to `pending` by hand while sent,
/// with its attempts reset or not).
type SendingRows =
    std::collections::BTreeMap<(&'static str, i64, i64), (String, Option<RowResult>)>;

impl Drainer {
    /// A drainer over a store and a client.
    pub fn new(store: Store, client: Arc<Client>, settings: DrainSettings) -> Drainer {
        Drainer {
            store,
            current: std::sync::RwLock::new((Arc::new(settings), client)),
            applied: std::sync::Mutex::new(None),
            wait_hook: std::sync::RwLock::new(None),
            replies_first: std::sync::atomic::AtomicBool::new(false),
            sending: std::sync::Mutex::default(),
            sends_deadline: std::sync::Mutex::new(None),
            give_up_sends: CancellationToken::new(),
            records_by: std::sync::Mutex::new(None),
            unrecorded: std::sync::Mutex::new(Vec::new()),
            wall: std::sync::RwLock::new(Arc::new(chrono::Utc::now)),
        }
    }

    /// Sets the wall clock the daemon's loop ([`Drainer::run`]) watches
    /// for a step back, and counts rebased waits from: `Utc::now` unless
    /// set (a test steps it back without touching the system's).
    pub fn set_wall_clock(&self, clock: WallClock) {
        if let Ok(mut w) = self.wall.write() {
            *w = clock;
        }
    }

    fn wall_now(&self) -> chrono::DateTime<chrono::Utc> {
        match self.wall.read() {
            Ok(w) => w(),
            Err(_) => chrono::Utc::now(),
        }
    }

    /// How many outcomes wait to be recorded.
    pub fn unrecorded(&self) -> usize {
        self.unrecorded.lock().map(|u| u.len()).unwrap_or(0)
    }

    /// Tries once to record each outcome the database refused before;
    /// returns how many are still waiting. Cancel-safe: a round dropped
    /// midway (the stop's bound) puts the outcomes it had not recorded back.
    async fn record_unrecorded(&self) -> usize {
        let waiting = match self.unrecorded.lock() {
            Ok(mut u) if !u.is_empty() => std::mem::take(&mut *u),
            _ => return 0,
        };
        let mut round = Round {
            drainer: self,
            waiting: waiting.into(),
            left: Vec::new(),
        };
        while let Some(u) = round.waiting.front_mut() {
            let (row, f, a, at) = (
                u.row.clone(),
                u.finish.clone(),
                u.attempts.clone(),
                u.at.clone(),
            );
            // The outcome stays in `round` until the answer: dropped here,
            // it goes back to the list.
            let recorded = self
                .store
                .call(move |c| outbox::finish(c, &row, &f, &a, &at, None))
                .await;
            let Some(mut u) = round.waiting.pop_front() else {
                break;
            };
            u.tries += 1;
            match recorded {
                Ok((how, _)) => {
                    self.recorded((u.row.kind.table(), u.row.id, u.row.claim_id));
                    info!(
                        outbox_id = u.row.id,
                        negotiation_id = %u.row.negotiation_id,
                        result = ?u.result,
                        tries = u.tries,
                        recorded = ?how,
                        "{} row {}: the outcome the database refused before is recorded",
                        u.row.kind.table(),
                        u.row.id
                    );
                }
                Err(e) => {
                    if u.tries % 60 == 0 {
                        error!(outbox_id = u.row.id, tries = u.tries, error = %format!("{e:#}"),
                            "{} row {}: the database still refuses its outcome; it stays `sending`",
                            u.row.kind.table(), u.row.id);
                    }
                    round.left.push(u);
                }
            }
        }
        let n = round.left.len();
        drop(round);
        n.max(self.unrecorded())
    }

    /// After a stop: the outcomes still unrecorded are tried again until
    /// `until` (a round still waiting on the database then is given up:
    /// its rows stay `sending` and [`Drainer::name_left_sending`] names them).
    async fn record_unrecorded_before(&self, until: tokio::time::Instant) {
        // No round starts once the bound is past: a dropped round's job
        // still runs on the database thread, so one started for nothing
        // would write after the rows were named left `sending`.
        if tokio::time::Instant::now() >= until {
            return;
        }
        let _ = tokio::time::timeout_at(until, async {
            while tokio::time::Instant::now() < until && self.record_unrecorded().await > 0 {
                tokio::time::sleep_until(
                    until.min(tokio::time::Instant::now() + Duration::from_millis(250)),
                )
                .await;
            }
        })
        .await;
    }

    /// The row's outcome is in the table (or the row is gone): it leaves
    /// [`Drainer::sending`]. The commit is synced to disk soon after (not
    /// waited for): a power cut rolling back a `sent` would send the row
    /// again at the next start (README, "Clean stops").
    fn recorded(&self, key: (&'static str, i64, i64)) {
        if let Ok(mut m) = self.sending.lock() {
            m.remove(&key);
        }
        self.store.sync_soon();
    }

    /// At the end of a stop (or of `leadsync drain`): names every row left
    /// `sending` — each on a line of its own, then one line per table with
    /// the ids, those Thumbtack took (2xx) but whose outcome was not
    /// recorded apart. They are sent again at the next start. `when` says
    /// what ended. Returns how many there are.
    fn name_left_sending(&self, when: &str) -> usize {
        let rows: SendingRows = self.sending.lock().map(|m| m.clone()).unwrap_or_default();
        let mut by_table: std::collections::BTreeMap<&str, (Vec<i64>, Vec<i64>)> =
            Default::default();
        for ((table, id, _), (negotiation_id, ended)) in &rows {
            let what = match ended {
                None => "was being sent (no answer yet)".to_string(),
                Some(r) => format!(
                    "had its answer ({}) but its outcome was not recorded",
                    format!("{r:?}").to_lowercase()
                ),
            };
            warn!(
                outbox_id = id,
                %negotiation_id,
                "{table} row {id} {what} {when}: it stays `sending`, is sent again at the next \
                 start, and may reach Thumbtack twice"
            );
            let (all, sent) = by_table.entry(table).or_default();
            all.push(*id);
            if *ended == Some(RowResult::Sent) {
                sent.push(*id);
            }
        }
        let ids = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        for (table, (all, sent)) in &by_table {
            warn!(
                table,
                ids = %ids(all),
                sent_not_recorded = %ids(sent),
                "{table}: {} row(s) left `sending` {when} (ids {}), sent again at the next \
                 start; of them, sent but not recorded (Thumbtack answered 2xx: these reach it \
                 twice): {}",
                all.len(),
                ids(all),
                if sent.is_empty() { "none".to_string() } else { ids(sent) }
            );
        }
        rows.len()
    }

    /// Sets until when a stop records the answers already in (the daemon
    /// sets it from its own deadline, before it stops waiting); without it,
    /// the send bound + `SHUTDOWN_RESERVE` - `CLOSING_RESERVE`.
    pub fn stop_records_by(&self, deadline: Instant) {
        if let Ok(mut r) = self.records_by.lock() {
            *r = Some(deadline);
        }
    }

    /// Sets when in-flight sends are given up after the stop (the daemon
    /// sets it from the signal's time, so that a claim in progress then
    /// cannot push it later).
    pub fn stop_sends_by(&self, deadline: Instant) {
        if let Ok(mut d) = self.sends_deadline.lock() {
            *d = Some(deadline);
        }
    }

    /// Takes new settings and a new client (after a configuration reload).
    pub fn update(&self, settings: DrainSettings, client: Arc<Client>) {
        if let Ok(mut c) = self.current.write() {
            *c = (Arc::new(settings), client);
        }
    }

    fn settings(&self) -> Arc<DrainSettings> {
        self.current
            .read()
            .map(|c| c.0.clone())
            .unwrap_or_else(|p| p.into_inner().0.clone())
    }

    fn client(&self) -> Arc<Client> {
        self.current
            .read()
            .map(|c| c.1.clone())
            .unwrap_or_else(|p| p.into_inner().1.clone())
    }

    /// Adds wait reasons from outside (the auth side's "OAuth client refused").
    pub fn set_wait_hook(&self, hook: WaitHook) {
        if let Ok(mut h) = self.wait_hook.write() {
            *h = Some(hook);
        }
    }

    /// Every configured business whose rows must wait now, and why. A new
    /// reason is one more line here (or one more entry from the hook).
    pub fn wait_reasons(&self) -> HashMap<String, WaitReason> {
        let (settings, client) = (self.settings(), self.client());
        let mut reasons = HashMap::new();
        for b in &settings.disabled {
            reasons.insert(b.clone(), WaitReason::Disabled);
        }
        let client_refused = client.auth().client_refused();
        for b in client.auth().blocked() {
            // Blocked without a reason of its own: its OAuth client is refused.
            let why = match (client.auth().reauth_reason(&b), &client_refused) {
                (Some(why), _) => WaitReason::NeedsReauth(why),
                (None, Some(why)) => WaitReason::OAuthClientRefused(why.clone()),
                (None, None) => WaitReason::NeedsReauth(String::new()),
            };
            reasons.entry(b).or_insert(why);
        }
        let hook = self.wait_hook.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            for (b, why) in hook() {
                reasons.entry(b).or_insert(why);
            }
        }
        reasons.retain(|b, _| settings.configured.contains(b));
        reasons
    }

    fn filter(&self) -> ClaimFilter {
        let settings = self.settings();
        ClaimFilter {
            waiting: self
                .wait_reasons()
                .into_iter()
                .map(|(b, why)| {
                    let text = why.describe(&b);
                    (b, text)
                })
                .collect(),
            configured: settings.configured.clone(),
            default_business: settings.default_business.clone(),
        }
    }

    /// Claims up to `limit` rows due by `due_by` (now, when `None`), first
    /// bringing the rows put aside in line when the businesses' state changed.
    async fn claim(&self, limit: usize, due_by: Option<String>) -> anyhow::Result<Vec<Claimed>> {
        let filter = self.filter();
        let changed = self
            .applied
            .lock()
            .map(|a| a.as_ref() != Some(&filter))
            .unwrap_or(true);
        let due_by = due_by.unwrap_or_else(crate::time::now);
        let for_claim = filter.clone();
        let order = if self.replies_first.fetch_xor(true, Ordering::Relaxed) {
            [Kind::Message, Kind::Transition]
        } else {
            [Kind::Transition, Kind::Message]
        };
        let claimed = self
            .store
            .call(move |c| {
                if changed {
                    outbox::sync_waits(c, &for_claim)?;
                }
                // Each kind is claimed in its own transaction: rows of the
                // first are `sending` once it commits, so a failure of the
                // second must not drop them (they would wait for a restart).
                // The other kind is still tried; the error is the claim's
                // only when nothing was claimed.
                let mut claimed = Vec::new();
                let mut failed = None;
                for kind in order {
                    let free = limit.saturating_sub(claimed.len());
                    match outbox::claim(c, kind, &due_by, free, &for_claim) {
                        Ok(rows) => claimed.extend(rows),
                        Err(e) => {
                            let e = e.context(format!("cannot claim {} rows", kind.table()));
                            failed.get_or_insert(e);
                        }
                    }
                }
                match failed {
                    Some(e) if claimed.is_empty() => Err(e),
                    Some(e) => {
                        error!(error = %format!("{e:#}"), claimed = claimed.len(),
                            "cannot claim rows of one outbox; the rows claimed from the other are sent");
                        Ok(claimed)
                    }
                    None => Ok(claimed),
                }
            })
            .await?;
        if changed && let Ok(mut a) = self.applied.lock() {
            *a = Some(filter);
        }
        Ok(claimed)
    }

    /// Sends a claimed row and records the outcome; while rows end final
    /// (sent or dead) and the next row of the same negotiation may go, sends
    /// that one too. Returns what became of each row.
    pub async fn process_chain(
        &self,
        first: Claimed,
        due_by: Option<String>,
        stop: CancellationToken,
    ) -> Vec<RowResult> {
        let mut results = Vec::new();
        let mut row = Some(first);
        while let Some(current) = row.take() {
            let (result, next) = self.process(current, due_by.as_deref(), &stop).await;
            results.push(result);
            row = next;
        }
        results
    }

    /// Sends one claimed row, records the outcome, and claims the next row
    /// of its negotiation when this one ended final and we are not stopping.
    #[tracing::instrument(skip_all, fields(kind = row.kind.as_str(), outbox_id = row.id, negotiation_id = %row.negotiation_id, attempt = row.attempt))]
    async fn process(
        &self,
        row: Claimed,
        due_by: Option<&str>,
        stop: &CancellationToken,
    ) -> (RowResult, Option<Claimed>) {
        let key = (row.kind.table(), row.id, row.claim_id);
        if let Ok(mut m) = self.sending.lock() {
            m.insert(key, (row.negotiation_id.clone(), None));
        }
        // At the stop's send bound a request still without an answer is
        // given up (its row stays `sending`, named at the end); an answer
        // already in is recorded whatever the bound.
        let answered = tokio::select! {
            biased;
            a = self.attempt(&row) => Some(a),
            _ = self.give_up_sends.cancelled() => None,
        };
        let Some((finish, attempts, result)) = answered else {
            return (RowResult::CutShort, None);
        };
        if let Ok(mut m) = self.sending.lock()
            && let Some(entry) = m.get_mut(&key)
        {
            entry.1 = Some(result);
        }
        let now = crate::time::now();
        // Not while a 429 pauses the budget: the next row would wait for
        // its turn `sending` (it is claimed once the pause is over).
        let follow = matches!(result, RowResult::Sent | RowResult::Dead)
            && !stop.is_cancelled()
            && self.client().budget().paused_for().is_none();
        let id = row.id;
        let row = Arc::new(row);
        // The outcome must land: a locked database is waited out, not dropped.
        let mut tries = 0;
        loop {
            let (f, a, n, sent) = (finish.clone(), attempts.clone(), now.clone(), row.clone());
            let next = follow.then(|| {
                (
                    due_by.map_or_else(crate::time::now, str::to_string),
                    self.filter(),
                )
            });
            let recorded = self
                .store
                .call(move |c| {
                    let next = next
                        .as_ref()
                        .map(|(due_by, filter)| outbox::NextOf { due_by, filter });
                    outbox::finish(c, &sent, &f, &a, &n, next)
                })
                .await;
            if recorded.is_ok() {
                self.recorded(key);
            }
            match recorded {
                Ok((Recorded::Yes, next)) => return (result, next),
                Ok((Recorded::RowDeleted, _)) => {
                    warn!(
                        outbox_id = id,
                        ?result,
                        "the row was deleted while it was being sent; its outcome is not recorded"
                    );
                    return (result, None);
                }
                Ok((Recorded::RowChanged(state), _)) => {
                    warn!(
                        outbox_id = id,
                        ?result,
                        state,
                        "the row was changed while it was being sent (it is now {state}); \
                         the attempt is recorded, the row keeps what was done to it"
                    );
                    return (result, None);
                }
                // Only a locked database is worth waiting out. While running,
                // keep trying (a row left `sending` would wait for the next
                // start); once stopping, until the stop's recording bound (or
                // a few times, without one); then it is kept with the
                // outcomes to record, which the stop tries until that bound.
                Err(e) if crate::store::is_busy_error(&e) && self.keep_waiting(stop, tries) => {
                    if tries % 30 == 0 {
                        warn!(error = %format!("{e:#}"), "cannot record the outcome yet; retrying every second");
                    }
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // Anything else (disk full, an I/O error): keep the outcome
                // and record it before the next claims. The row stays
                // `sending` meanwhile, so nothing sends it again and nothing
                // later of its negotiation overtakes it.
                Err(e) => {
                    error!(outbox_id = id, error = %format!("{e:#}"),
                        "cannot record the outcome; it is kept and recorded as soon as the \
                         database takes it (the row stays `sending` until then)");
                    if let Ok(mut u) = self.unrecorded.lock() {
                        u.push(Unrecorded {
                            row,
                            finish,
                            attempts,
                            at: now,
                            result,
                            tries: 0,
                        });
                    }
                    return (result, None);
                }
            }
        }
    }

    /// Whether a recording refused for a locked database is tried again in
    /// place (see [`Drainer::process`]).
    fn keep_waiting(&self, stop: &CancellationToken, tries: u32) -> bool {
        if !stop.is_cancelled() {
            return true;
        }
        match self.records_by.lock().ok().and_then(|d| *d) {
            Some(by) => Instant::now() + Duration::from_secs(1) < by,
            None => tries < 5,
        }
    }

    async fn attempt(&self, row: &Claimed) -> (Finish, Vec<Attempt>, RowResult) {
        let started_at = crate::time::now();
        let settings = self.settings();
        let max_attempts = settings.max_attempts;
        let retry_or_dead = |delay: Duration| {
            if row.attempt >= max_attempts {
                (Finish::Dead, RowResult::Dead)
            } else {
                // Configuration bounds the delay to 7 days; never to zero.
                let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::days(7));
                // A time the table takes (schema 8 refuses a year beyond 9999).
                let now = chrono::Utc::now();
                let at = now
                    .checked_add_signed(delay)
                    .filter(|at| *at < now + chrono::Duration::days(8))
                    .unwrap_or(now + chrono::Duration::days(7));
                (
                    Finish::Retry {
                        next_attempt_at: crate::time::fmt(at),
                    },
                    RowResult::Retry,
                )
            }
        };
        let backoff = backoff_delay(row.attempt, settings.backoff_initial, settings.backoff_max);
        let waiting = |why: String| {
            let (finish, result) = retry_or_dead(backoff);
            let why = if result == RowResult::Dead {
                format!("gave up after {} attempts: {why}", row.attempt)
            } else {
                why
            };
            warn!(error = %why, "row cannot be sent yet");
            let outcome = if result == RowResult::Dead {
                "dead"
            } else {
                "waiting"
            };
            crate::metrics::send(row.kind.as_str(), outcome, None);
            let a = Attempt {
                attempt: row.attempt,
                started_at: started_at.clone(),
                http_status: None,
                outcome: "waiting",
                error: Some(why),
                trace_id: None,
                duration_ms: 0,
            };
            (finish, vec![a], result)
        };

        let business_id = match &row.business_id {
            Some(b) if settings.configured.contains(b) => b.clone(),
            // Removed by a reload since the claim: it waits, as the claim would have it.
            Some(b) => {
                let why = format!("waiting: business {b} is not in the configuration");
                warn!(error = %why, "row cannot be sent yet");
                let a = Attempt {
                    attempt: row.attempt,
                    started_at,
                    http_status: None,
                    outcome: "waiting",
                    error: Some(why),
                    trace_id: None,
                    duration_ms: 0,
                };
                return (Finish::Hold, vec![a], RowResult::Held);
            }
            None => {
                return waiting(format!(
                    "no business for negotiation {}: the row has no business_id and the lead is not in the mirror yet; \
                     it is tried again after later syncs",
                    row.negotiation_id
                ));
            }
        };
        let client = self.client();
        // Whatever the attempt's number: `outbox retry` and a partner's
        // program put it back to 0, the attempts log stays.
        if let Content::Message { text } = &row.content
            && let Some((message_id, trace_id)) = self
                .reply_already_sent(&client, &business_id, row, text)
                .await
        {
            let note = format!(
                "already in the conversation as message {message_id}: an earlier attempt reached \
                 Thumbtack though its answer was lost; not posted again"
            );
            info!(business_id, message_id, "{note}");
            crate::metrics::send(row.kind.as_str(), "sent", None);
            let a = Attempt {
                attempt: row.attempt,
                started_at,
                http_status: None,
                outcome: "sent",
                error: Some(note),
                // The GET's: the evidence it was taken for sent.
                trace_id,
                duration_ms: 0,
            };
            return (
                Finish::Sent {
                    message_id: Some(message_id),
                },
                vec![a],
                RowResult::Sent,
            );
        }
        let (delivery, message_id) = match &row.content {
            Content::Transition {
                status,
                partner_status_changed_at,
                invoice_amount_in_cents,
            } => {
                // The claim fails such a row alone; kept for a row read otherwise.
                let Some(at) = crate::time::to_utc_z(partner_status_changed_at) else {
                    let a = Attempt {
                        attempt: row.attempt,
                        started_at,
                        http_status: None,
                        outcome: "dead",
                        error: crate::time::utc_z_problem(partner_status_changed_at),
                        trace_id: None,
                        duration_ms: 0,
                    };
                    crate::metrics::send(row.kind.as_str(), "dead", None);
                    return (Finish::Dead, vec![a], RowResult::Dead);
                };
                let body = JobStatusBody {
                    status: status.clone(),
                    partner_status_changed_at: at,
                    invoice_amount_in_cents: *invoice_amount_in_cents,
                };
                let delivery = client
                    .post_job_status(&business_id, &row.negotiation_id, &body)
                    .await;
                (delivery, None)
            }
            Content::Message { text } => {
                let body = MessageBody { text: text.clone() };
                client
                    .post_message(&business_id, &row.negotiation_id, &body)
                    .await
            }
        };
        let (finish, result) = match &delivery.result {
            Ok(()) => (Finish::Sent { message_id }, RowResult::Sent),
            Err(e) => match e.disposition {
                Disposition::Dead => (Finish::Dead, RowResult::Dead),
                // Nothing sent: back to pending uncounted, like a row
                // waiting for re-authorization (recorded as `stopped`).
                Disposition::Reauth | Disposition::Stopping => (Finish::Hold, RowResult::Held),
                Disposition::Retry | Disposition::Refresh => retry_or_dead(retry_delay(
                    row.attempt,
                    settings.backoff_initial,
                    settings.backoff_max,
                    e.retry_after,
                )),
            },
        };
        let last = delivery.exchanges.len().saturating_sub(1);
        // Dead because the attempts ran out, not because Thumbtack refused it.
        let gave_up = result == RowResult::Dead
            && matches!(&delivery.result, Err(e) if e.disposition != Disposition::Dead);
        let outcome = match result {
            RowResult::Sent => "sent",
            // (Never here: a send given up returns before its outcome.)
            RowResult::Retry | RowResult::CutShort => "retry",
            RowResult::Dead => "dead",
            RowResult::Held if matches!(&delivery.result, Err(e) if e.disposition == Disposition::Stopping) => {
                "stopped"
            }
            RowResult::Held => "reauth",
        };
        let attempts = delivery
            .exchanges
            .iter()
            .enumerate()
            .map(|(i, x)| Attempt {
                attempt: row.attempt,
                started_at: crate::time::fmt(x.started_at),
                http_status: x.http_status,
                outcome: if i == last { outcome } else { "refresh" },
                error: match &x.error {
                    Some(e) if i == last && gave_up => {
                        Some(format!("gave up after {} attempts: {e}", row.attempt))
                    }
                    e => e.clone(),
                },
                trace_id: x.trace_id.clone(),
                duration_ms: x.duration.as_millis() as i64,
            })
            .collect();
        let took = delivery.exchanges.iter().map(|x| x.duration).sum();
        crate::metrics::send(row.kind.as_str(), outcome, Some(took));
        match (&delivery.result, result) {
            (Ok(()), _) if row.late => info!(
                business_id,
                "sent late: a later row of this negotiation was already sent (late = 1)"
            ),
            (Ok(()), _) => info!(business_id, "sent"),
            (Err(e), RowResult::Dead) => {
                error!(business_id, error = %e.message, "dead: not sent")
            }
            (Err(e), _) => {
                warn!(business_id, error = %e.message, ?result, "not sent yet")
            }
        }
        (finish, attempts, result)
    }

    /// The id of reply `row` in its lead's conversation (with the trace id
    /// of the GET that found it, for the record), when an earlier attempt
    /// may have reached Thumbtack and the newest page of the conversation
    /// shows it there ([`found_in_conversation`]). `None`
    /// (post it) when no attempt may have, when the page cannot be read
    /// (the reply is posted as before: at least once), or when the page
    /// cannot tell it from another reply of the same text.
    async fn reply_already_sent(
        &self,
        client: &Arc<Client>,
        business_id: &str,
        row: &Claimed,
        text: &str,
    ) -> Option<(String, Option<String>)> {
        let (id, negotiation_id, t) = (row.id, row.negotiation_id.clone(), text.to_string());
        let check = match self
            .store
            .call(move |c| outbox::reply_check(c, id, &negotiation_id, &t, REPLY_CHECK_SLACK))
            .await
        {
            Ok(Some(check)) => check,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot read the reply's earlier attempts; posting it");
                return None;
            }
        };
        if check.twin {
            info!(
                "an earlier attempt may have reached Thumbtack, but another reply of the same text \
                 was sent around then: the conversation cannot tell them apart; posting it"
            );
            return None;
        }
        // One GET, never retried nor refreshing a token on 401, given up
        // when stopping: any failure posts the reply as before (which, once
        // stopping, is not sent and goes back to pending as `stopped`).
        match client
            .newest_messages_once(business_id, &row.negotiation_id, crate::messages::PAGE_SIZE)
            .await
        {
            Ok((page, trace_id)) => found_in_conversation(
                &page.messages,
                &row.negotiation_id,
                text,
                &check,
                client.settings().timeout,
            )
            .map(|m| (m.message_id.clone(), trace_id)),
            Err(e) => {
                warn!(error = %e.message, "an earlier attempt may have reached Thumbtack, but the conversation \
                    cannot be read to check; posting it (the customer may see it twice)");
                None
            }
        }
    }

    /// `leadsync drain`: attempts every row due when it starts, once,
    /// respecting each negotiation's order (a row sent lets the next one of
    /// its negotiation go). A row that fails is due again only after the
    /// start, so it is not attempted twice.
    pub async fn drain_once(
        self: &Arc<Self>,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainSummary> {
        let mut summary = DrainSummary::default();
        let started = crate::time::now();
        let mut inflight: JoinSet<Vec<RowResult>> = JoinSet::new();
        let mut failures = 0;
        loop {
            // After a 429 nobody sends: rows are not held `sending` while
            // the budget is paused (as in the daemon); they are claimed
            // once it is over. With nothing left to attempt, the pass ends.
            let paused = self.client().budget().paused_for();
            if let Some(p) = paused
                && inflight.is_empty()
                && !stop.is_cancelled()
            {
                let due_by = started.clone();
                let due = self
                    .store
                    .call(move |c| {
                        Ok(outbox::any_claimable(c, Kind::Transition, &due_by)?
                            || outbox::any_claimable(c, Kind::Message, &due_by)?)
                    })
                    .await
                    .unwrap_or(true);
                if !due {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(p) => {}
                }
                continue;
            }
            if !stop.is_cancelled() && paused.is_none() {
                let free = self.settings().concurrency.saturating_sub(inflight.len());
                // A failed claim never drops the sends in flight: they finish
                // and record their outcome; the claim is tried again.
                match self.claim(free, Some(started.clone())).await {
                    Ok(claimed) => {
                        failures = 0;
                        for row in claimed {
                            let (me, due_by, stop) =
                                (self.clone(), Some(started.clone()), stop.clone());
                            inflight
                                .spawn(async move { me.process_chain(row, due_by, stop).await });
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        error!(error = %format!("{e:#}"), in_flight = inflight.len(),
                            "cannot claim outbox rows; sends in flight go on and claiming is tried again");
                        if inflight.is_empty() {
                            if failures >= CLAIM_FAILURES_BEFORE_GIVING_UP {
                                return Err(e.context(format!(
                                    "cannot claim outbox rows ({failures} tries); {} sent, {} retried, {} dead before that",
                                    summary.sent, summary.retried, summary.dead
                                )));
                            }
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                            continue;
                        }
                    }
                }
            }
            match inflight.join_next().await {
                Some(Ok(results)) => results.into_iter().for_each(|r| summary.add(r)),
                Some(Err(e)) => error!(error = %e, "a send task failed"),
                None => break,
            }
        }
        let until = tokio::time::Instant::now() + self.settings().shutdown_grace;
        self.record_unrecorded_before(until).await;
        self.name_left_sending("when `leadsync drain` ended");
        let unrecorded = self.unrecorded();
        if unrecorded > 0 {
            anyhow::bail!(
                "{unrecorded} row(s) had their answer but the database refused to record the \
                 outcome (see the log); they stay `sending` and are sent again by the next \
                 `drain` or start. {} sent, {} retried, {} dead",
                summary.sent,
                summary.retried,
                summary.dead
            );
        }
        Ok(summary)
    }

    /// The daemon's loop: looks for due rows every `poll_interval` (and as
    /// soon as a send finishes) until `stop`, then lets in-flight sends
    /// finish within the shutdown grace.
    pub async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        heartbeat: Arc<crate::time::Heartbeat>,
    ) {
        let mut inflight: JoinSet<Vec<RowResult>> = JoinSet::new();
        let mut last_recheck = Instant::now();
        let mut recheck: Option<tokio::task::JoinHandle<()>> = None;
        let mut recorder: Option<tokio::task::JoinHandle<()>> = None;
        let mut clock = ClockWatch::new(self.wall_now());
        let mut rebase: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let (settings, client) = (self.settings(), self.client());
            // Wake at least every second so the watchdog sees the loop alive.
            let tick = settings.poll_interval.min(Duration::from_secs(1));
            heartbeat.beat();
            if stop.is_cancelled() {
                break;
            }
            // The wall clock stepped back (it was ahead): retries it
            // scheduled are rebased (outbox::rebase_future_waits), off the
            // loop, one round at a time (a step back seen during a round
            // is rebased after it).
            let wall = self.wall_now();
            if clock.rebase_due(wall, rebase.as_ref().is_none_or(|r| r.is_finished())) {
                let store = self.store.clone();
                rebase = Some(tokio::spawn(async move {
                    let now = crate::time::fmt(wall);
                    match store
                        .call(move |c| outbox::rebase_future_waits(c, &now))
                        .await
                    {
                        Ok(rows) if !rows.is_empty() => warn!(rows = ?rows,
                            "the wall clock went back: outbox rows it had scheduled far in the future are due after their wait counted from now"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %format!("{e:#}"),
                            "the wall clock went back; cannot rebase the retries it scheduled (done at the next start)"),
                    }
                }));
            }
            // Off the claim path: a hanging token endpoint must stall
            // neither claiming nor the heartbeat. One round at a time.
            if last_recheck.elapsed() >= settings.reauth_recheck
                && recheck.as_ref().is_none_or(|r| r.is_finished())
            {
                last_recheck = Instant::now();
                let blocked = client.auth().blocked();
                if !blocked.is_empty() {
                    recheck = Some(tokio::spawn(recheck_tokens(client.clone(), blocked)));
                }
            }
            // Outcomes the database refused before are tried again, off the
            // loop (each may wait out a locked database: the heartbeat must
            // not), one round at a time. Their rows hold back their
            // negotiations until then.
            if self.unrecorded() > 0 && recorder.as_ref().is_none_or(|r| r.is_finished()) {
                let me = self.clone();
                recorder = Some(tokio::spawn(async move {
                    me.record_unrecorded().await;
                }));
            }
            let free = settings.concurrency.saturating_sub(inflight.len());
            // After a 429 nobody sends: do not hold rows in `sending` meanwhile.
            let paused = client.budget().paused_for();
            if free > 0 && paused.is_none() {
                match self.claim(free, None).await {
                    Ok(claimed) => {
                        for row in claimed {
                            let (me, stop) = (self.clone(), stop.clone());
                            inflight.spawn(async move { me.process_chain(row, None, stop).await });
                        }
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "cannot claim outbox rows; trying again")
                    }
                }
            }
            let wait = paused.map_or(tick, |p| p.min(tick));
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Two bounds inside daemon.shutdown_timeout_secs: requests still
        // without an answer at the send bound are given up (nothing can
        // tell whether Thumbtack took them); answers already in are still
        // recorded until the recording bound, which leaves the closing
        // records their reserve. Only then is anything left unrecorded, and
        // every such row is named.
        let sends_by: Instant = self
            .sends_deadline
            .lock()
            .ok()
            .and_then(|d| *d)
            .unwrap_or_else(|| Instant::now() + self.settings().shutdown_grace);
        // The daemon may have set the recording bound itself (from its own
        // deadline, so that it falls before the daemon stops waiting even
        // with a bound shorter than SHUTDOWN_RESERVE); else it follows the
        // send bound.
        let records_by_std = match self.records_by.lock() {
            Ok(mut r) => {
                *r.get_or_insert(sends_by + SHUTDOWN_RESERVE.saturating_sub(CLOSING_RESERVE))
            }
            Err(_) => sends_by + SHUTDOWN_RESERVE.saturating_sub(CLOSING_RESERVE),
        }
        .max(sends_by);
        let (sends_by, records_by): (tokio::time::Instant, tokio::time::Instant) =
            (sends_by.into(), records_by_std.into());
        if !inflight.is_empty() {
            info!(
                in_flight = inflight.len(),
                "waiting for in-flight sends to finish"
            );
            let finished = tokio::time::timeout_at(sends_by, async {
                while inflight.join_next().await.is_some() {}
            })
            .await;
            if finished.is_err() {
                self.give_up_sends.cancel();
                let answered = self
                    .sending
                    .lock()
                    .map(|m| m.values().filter(|(_, r)| r.is_some()).count())
                    .unwrap_or(0);
                info!(
                    in_flight = inflight.len(),
                    answered,
                    "the send bound of the stop is reached: requests still without an answer are \
                     given up; the outcomes of those answered are still recorded (until {} ms \
                     before the end of daemon.shutdown_timeout_secs)",
                    CLOSING_RESERVE.as_millis()
                );
                let recorded = tokio::time::timeout_at(records_by, async {
                    while inflight.join_next().await.is_some() {}
                })
                .await;
                if recorded.is_err() {
                    warn!(
                        in_flight = inflight.len(),
                        "outcomes still not recorded at the shutdown bound; their rows stay \
                         `sending` and are sent again at the next start"
                    );
                    inflight.abort_all();
                }
            }
        }
        // A round in progress ends first (it holds the outcomes it tries);
        // one still waiting at the bound is dropped, its outcomes put back.
        if let Some(mut r) = recorder
            && tokio::time::timeout_at(records_by, &mut r).await.is_err()
        {
            r.abort();
            let _ = r.await;
        }
        self.record_unrecorded_before(records_by).await;
        self.name_left_sending(
            "when the shutdown bound (daemon.shutdown_timeout_secs) was reached",
        );
        // The recheck's refreshes run detached: the daemon waits for them
        // (Auth::settle); a recheck not yet sent is refused once stopping.
        if let Some(r) = recheck
            && !r.is_finished()
            && tokio::time::timeout_at(records_by, r).await.is_err()
        {
            info!("the re-authorization recheck did not end before the shutdown bound");
        }
    }
}

/// Notices the wall clock stepping back: between two looks, less wall
/// time passed than monotonic time, by more than [`ClockWatch::SLACK`].
struct ClockWatch {
    mono: Instant,
    wall: chrono::DateTime<chrono::Utc>,
    /// A step back seen and not rebased yet (a rebase was still running).
    pending: bool,
}

impl ClockWatch {
    /// More than an NTP slew or a slow look can account for.
    const SLACK: Duration = Duration::from_secs(2);

    fn new(wall: chrono::DateTime<chrono::Utc>) -> ClockWatch {
        ClockWatch {
            mono: Instant::now(),
            wall,
            pending: false,
        }
    }

    /// Whether a rebase is to start now: the wall clock (now `wall`) went
    /// back since the last look, or had gone back while a rebase ran, and
    /// none runs now (`idle`).
    fn rebase_due(&mut self, wall: chrono::DateTime<chrono::Utc>, idle: bool) -> bool {
        let mono = Instant::now();
        let back = Self::went_back(
            wall.signed_duration_since(self.wall),
            mono.duration_since(self.mono),
        );
        (self.mono, self.wall) = (mono, wall);
        self.pending |= back;
        if self.pending && idle {
            self.pending = false;
            return true;
        }
        false
    }

    /// Whether `wall` time passing while `mono` did means a step back.
    fn went_back(wall: chrono::Duration, mono: Duration) -> bool {
        let slack = chrono::Duration::from_std(Self::SLACK).unwrap_or_default();
        chrono::Duration::from_std(mono)
            .ok()
            .and_then(|m| m.checked_sub(&slack))
            .is_some_and(|bound| wall < bound)
    }
}

/// Tries the tokens of businesses waiting for re-authorization (a new
/// token file is picked up this way), a few at a time.
async fn recheck_tokens(client: Arc<Client>, businesses: Vec<String>) {
    let mut running = JoinSet::new();
    for business_id in businesses {
        while running.len() >= RECHECK_CONCURRENCY {
            running.join_next().await;
        }
        let client = client.clone();
        running.spawn(async move {
            let _ = client.auth().token(&business_id).await;
        });
    }
    while running.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: &str, from: &str, text: &str, sent_at: &str) -> Message {
        Message {
            message_id: id.into(),
            negotiation_id: Some("5".into()),
            sent_at: Some(sent_at.into()),
            sender: Some(from.into()),
            text: Some(text.into()),
            sent_at_raw: Some(sent_at.into()),
            payload: "{}".into(),
        }
    }

    #[test]
    fn a_reply_is_found_in_its_conversation_only_when_nothing_else_can_be_it() {
        let check = outbox::ReplyCheck {
            windows: vec![(
                "2026-01-01T10:00:00.000Z".into(),
                "2026-01-01T10:00:05.000Z".into(),
            )],
            taken: HashSet::from(["taken".to_string()]),
            twin: false,
        };
        let found = |page: &[Message], check: &outbox::ReplyCheck| {
            found_in_conversation(page, "5", "On my way", check, Duration::from_secs(30))
                .map(|m| m.message_id.clone())
        };
        let it = listed("it", "Business", "On my way", "2026-01-01T09:58:00+00:00");
        assert_eq!(
            found(std::slice::from_ref(&it), &check).as_deref(),
            Some("it")
        );
        // Up to the slack and two timeouts after the last attempt ended.
        let late = listed("late", "Business", "On my way", "2026-01-01T10:06:05Z");
        assert_eq!(found(&[late], &check).as_deref(), Some("late"));
        // The customer's words, another text, a message older than the
        // clocks' slack, one another reply was given, another lead's.
        let mut other_lead = it.clone();
        other_lead.negotiation_id = Some("6".into());
        for m in [
            listed("c", "Customer", "On my way", "2026-01-01T10:00:01Z"),
            listed("t", "Business", "On my way!", "2026-01-01T10:00:01Z"),
            listed("old", "Business", "On my way", "2026-01-01T09:54:59Z"),
            listed("taken", "Business", "On my way", "2026-01-01T10:00:01Z"),
            listed("undated", "Business", "On my way", "soon"),
            // Typed in the app hours after the attempt, which never reached
            // the API (a 502 from the gateway): not the reply.
            listed("later", "Business", "On my way", "2026-01-01T13:00:00Z"),
            listed("after", "Business", "On my way", "2026-01-01T10:06:05.001Z"),
            other_lead,
        ] {
            assert_eq!(found(std::slice::from_ref(&m), &check), None, "{m:?}");
        }
        // Another reply of the same text sent around then: cannot tell.
        let twin = outbox::ReplyCheck {
            twin: true,
            ..check.clone()
        };
        assert_eq!(found(std::slice::from_ref(&it), &twin), None);
        // Attempts hours apart (a 502 at 10:00, another at 13:20 after the
        // backoff): the same text typed in the app at 11:00, while the row
        // waited for its retry, is not the reply; one within either attempt is.
        let apart = outbox::ReplyCheck {
            windows: vec![
                check.windows[0].clone(),
                (
                    "2026-01-01T13:20:00.000Z".into(),
                    "2026-01-01T13:20:01.000Z".into(),
                ),
            ],
            ..check.clone()
        };
        let typed = listed("typed", "Business", "On my way", "2026-01-01T11:00:00Z");
        assert_eq!(found(&[typed], &apart), None);
        let second = listed("second", "Business", "On my way", "2026-01-01T13:20:30Z");
        assert_eq!(found(&[second], &apart).as_deref(), Some("second"));
        assert_eq!(found(&[it], &apart).as_deref(), Some("it"));
    }

    #[test]
    fn a_step_back_seen_while_a_rebase_runs_is_rebased_once_it_is_done() {
        let t = chrono::Utc::now();
        let mut watch = ClockWatch::new(t + chrono::Duration::days(365));
        // Back a year while a rebase still runs: not now, and not lost.
        assert!(!watch.rebase_due(t, false));
        assert!(!watch.rebase_due(t, false));
        assert!(watch.rebase_due(t, true));
        // Done: nothing more until the clock steps back again.
        assert!(!watch.rebase_due(t, true));
        assert!(watch.rebase_due(t - chrono::Duration::hours(1), true));
    }

    #[test]
    fn a_wall_clock_step_back_is_told_from_a_slow_look() {
        let s = |n: i64| chrono::Duration::seconds(n);
        let d = Duration::from_secs;
        // A second of each: no step.
        assert!(!ClockWatch::went_back(s(1), d(1)));
        // A slow look (the loop held up 10 s), the wall clock with it.
        assert!(!ClockWatch::went_back(s(10), d(10)));
        // Within the slack (a slew, rounding).
        assert!(!ClockWatch::went_back(s(-1), d(0)));
        // Forward steps are not this.
        assert!(!ClockWatch::went_back(s(86_400), d(1)));
        // Back by a year, or by 5 s.
        assert!(ClockWatch::went_back(s(-365 * 86_400), d(1)));
        assert!(ClockWatch::went_back(s(-4), d(1)));
    }

    #[test]
    fn backoff_grows_from_the_attempt_count_and_is_capped() {
        let (i, m) = (Duration::from_secs(2), Duration::from_secs(60));
        for attempt in 1..=3 {
            let d = backoff_delay(attempt, i, m);
            let base = i * 2u32.pow(attempt as u32 - 1);
            assert!(d >= base && d <= base * 2, "attempt {attempt}: {d:?}");
        }
        for _ in 0..50 {
            let d = backoff_delay(30, i, m);
            assert!(d <= m && d >= m.mul_f64(0.9), "{d:?}");
        }
        let spread: HashSet<Duration> = (0..20).map(|_| backoff_delay(30, i, m)).collect();
        assert!(spread.len() > 1, "jitter is kept at the cap");
        let week = Duration::from_secs(7 * 86400);
        assert!(backoff_delay(i64::MAX, i, week) >= week.mul_f64(0.9));
    }
}
