//! Message polling (`[messages] sync = true`): after a pass of a business,
//! the conversation of each lead it found new or changed is read back page
//! by page (`sentBefore`) until a message already in the mirror, or the end.
//! One lead failing is recorded in `message_polls` and polled again after
//! the next pass, then less and less often while Thumbtack keeps refusing it (at once
//! when it changes); it never holds back its mirror row or the other leads.

use crate::config::Config;
use crate::store::Store;
use crate::store::messages::{self, MessageSource, PollRecord};
use crate::thumbtack::{ApiError, Client, Disposition};
use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The largest `limit` the messages list takes (THUMBTACK.md, "Messages").
pub const PAGE_SIZE: u32 = 20;

/// A lead whose poll failed twice in a row or more waits this long before
/// it is polled again after a pass, doubled at each failure up to
/// [`RETRY_MAX`]; after a first failure it is polled after the next pass.
/// A lead no longer active is refused for good ("history is for active
/// leads"): polled after every pass, each such lead cost requests (with the
/// read retries, seconds of backoff inside the pass) for ever.
pub const RETRY_FIRST: chrono::Duration = chrono::Duration::minutes(5);

/// The longest wait of a lead whose poll keeps failing.
pub const RETRY_MAX: chrono::Duration = chrono::Duration::days(1);

/// How much longer than [`RETRY_MAX`] a wait may be and still be one this
/// clock set: a wait ending later was set by a clock that ran ahead.
pub const WAIT_SLACK: chrono::Duration = chrono::Duration::minutes(1);

/// The moment a wait is read against, and the horizon past which it was
/// set by a clock that ran ahead and is taken as over (now plus
/// [`RETRY_MAX`] plus [`WAIT_SLACK`]), both formatted for the database: the
/// poller and `leadsync status` read waits alike.
pub fn wait_window(now: DateTime<Utc>) -> (String, String) {
    (
        crate::time::fmt(now),
        crate::time::fmt(now + RETRY_MAX + WAIT_SLACK),
    )
}

/// When a lead whose poll just failed for the `failures`-th time in a row
/// is polled again after a pass (`None`: after the next pass).
pub fn next_poll_after(failures: i64, polled: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if failures < 2 {
        return None;
    }
    let doublings = (failures - 2).min(20) as i32;
    let wait = (RETRY_FIRST * 2i32.pow(doublings as u32)).min(RETRY_MAX);
    Some(polled + wait)
}

/// How far before a lead's mark a page must reach for a poll to stop
/// there. A message can become visible after a later one was listed (sent
/// while a poll read the conversation, stamped by a server whose clock is a
/// little behind): dated just before the mark, it fell on the page after
/// the one that reached the mark, and no later poll, stopping even sooner,
/// ever read it. Reading on this far costs a page more at most (unless
/// more than a page of messages were sent within it), and only when the
/// messages around the mark straddle a page's end.
pub const LATE_SLACK: chrono::Duration = chrono::Duration::minutes(10);

/// A conversation longer than this many pages is not read further in one
/// poll: paging that does not end is a loop, not a conversation.
const MAX_PAGES: i64 = 500;

/// The poller's settings, from `[messages]`.
#[derive(Debug, Clone, Copy)]
pub struct MessageSettings {
    pub sync: bool,
    /// Leads polled after one pass at most; the rest wait for the next pass.
    pub max_leads_per_pass: usize,
}

impl MessageSettings {
    /// The settings a configuration asks for.
    pub fn from_config(c: &Config) -> MessageSettings {
        MessageSettings {
            sync: c.file.messages.sync,
            max_leads_per_pass: c.file.messages.max_leads_per_pass,
        }
    }
}

/// What one poll after a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    pub leads: usize,
    pub new_messages: i64,
    /// Leads whose conversation could not be read, with the reason.
    pub failed: Vec<(String, String)>,
}

impl PollReport {
    /// One line for people.
    pub fn summary(&self, business_id: &str) -> String {
        let mut s = format!(
            "{business_id}: messages — {} leads polled, {} new messages",
            self.leads, self.new_messages
        );
        if !self.failed.is_empty() {
            s.push_str(&format!(
                ", {} failed (retried after a later pass; see message_polls): {}",
                self.failed.len(),
                self.failed
                    .iter()
                    .take(3)
                    .map(|(n, e)| format!("{n}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        s
    }
}

/// Polls the conversations of the leads `business_id`'s passes found new or
/// changed since the last poll (and those whose last poll failed).
#[tracing::instrument(skip_all, fields(business_id = %business_id))]
pub async fn poll_after_pass(
    store: &Store,
    client: &Arc<Client>,
    business_id: &str,
    settings: MessageSettings,
    stop: &CancellationToken,
) -> anyhow::Result<PollReport> {
    let (id, limit, now) = (
        business_id.to_string(),
        settings.max_leads_per_pass,
        chrono::Utc::now(),
    );
    // A wait ending after the horizon was set by a clock that ran ahead:
    // due now.
    let (now, horizon) = wait_window(now);
    let (leads, cursor) = store
        .call(move |c| messages::leads_to_poll(c, &id, limit, &now, &horizon))
        .await?;
    let mut report = PollReport::default();
    for negotiation_id in leads {
        if stop.is_cancelled() {
            // The cursor stays: these leads are polled after the next pass.
            return Ok(report);
        }
        // The mark never lies after the moment this poll starts: a message
        // dated in the future (a server clock ahead, a bogus date) would
        // otherwise be "reached" on the first page of every later poll,
        // which then stops there and never reads the messages beyond it.
        // (A mark left in the future by an earlier version is brought back.)
        let started = chrono::Utc::now();
        let earlier = {
            let n = negotiation_id.clone();
            store.call(move |c| messages::poll_state(c, &n)).await?
        };
        let known = earlier
            .complete_through
            .as_deref()
            .and_then(crate::time::parse)
            .map(|t| t.min(started));
        let poll = poll_lead(store, client, business_id, &negotiation_id, known, stop).await;
        if poll.kind == Failure::Interrupted {
            // Cut short by the shutdown: says nothing of the lead. Not
            // recorded, and the cursor stays: polled after the next pass.
            info!(negotiation_id, "message poll interrupted by the shutdown");
            return Ok(report);
        }
        let (pages, new, error, kind) = (poll.pages, poll.new, poll.error, poll.kind);
        // Only a poll that read back to the mark (or the end) extends it.
        let complete_through = match &error {
            None => known.max(poll.newest.map(|t| t.min(started))),
            Some(_) => known,
        }
        .map(crate::time::fmt);
        report.leads += 1;
        report.new_messages += new;
        if let Some(e) = &error {
            warn!(negotiation_id, error = %e, "cannot read the lead's messages");
            report.failed.push((negotiation_id.clone(), e.clone()));
        }
        // Only a refusal counts toward the backoff: a failure on the way (an
        // outage, 429s, the mirror busy) says nothing of the lead, which is
        // polled after the next pass, its count kept.
        let failures = match (&error, kind) {
            (None, _) => 0,
            (Some(_), Failure::Refused) => earlier.failures.saturating_add(1),
            (Some(_), _) => earlier.failures,
        };
        let polled = chrono::Utc::now();
        let next_poll_at = match kind {
            Failure::Refused => next_poll_after(failures, polled).map(crate::time::fmt),
            _ => None,
        };
        let (b, now) = (business_id.to_string(), crate::time::fmt(polled));
        store
            .call(move |c| {
                messages::record_poll(
                    c,
                    &PollRecord {
                        negotiation_id: &negotiation_id,
                        business_id: &b,
                        polled_at: &now,
                        error: error.as_deref(),
                        pages,
                        new_messages: new,
                        complete_through: complete_through.as_deref(),
                        failures,
                        next_poll_at: next_poll_at.as_deref(),
                    },
                )
            })
            .await?;
    }
    if let Some(cursor) = cursor {
        let b = business_id.to_string();
        store
            .call(move |c| messages::advance_cursor(c, &b, cursor))
            .await?;
    }
    if report.leads > 0 {
        info!(
            leads = report.leads,
            new_messages = report.new_messages,
            failed = report.failed.len(),
            "messages polled"
        );
    }
    Ok(report)
}

/// How one lead's poll went.
struct LeadPoll {
    pages: i64,
    new: i64,
    /// The newest `sentAt` seen (UTC).
    newest: Option<DateTime<Utc>>,
    error: Option<String>,
    /// What kind of failure `error` is.
    kind: Failure,
}

/// What a failed poll says of the lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Thumbtack refused the lead's conversation (a ProblemDetails 403, or
    /// a 4xx the API calls final: "history is for active leads"), or it
    /// cannot be paged back: polled less and less often.
    Refused,
    /// A failure on the way (5xx, 429, the network, a proxy's page, the
    /// business's token, the mirror busy or full): polled after the next
    /// pass, uncounted.
    Transient,
    /// Cut short by the shutdown: not recorded at all.
    Interrupted,
}

impl Failure {
    fn of(e: &ApiError) -> Failure {
        match e.disposition {
            Disposition::Stopping => Failure::Interrupted,
            Disposition::Dead => Failure::Refused,
            Disposition::Retry if e.http_status == Some(403) && e.from_api => Failure::Refused,
            _ => Failure::Transient,
        }
    }
}

/// Reads one lead's conversation back from the newest message until it
/// reaches [`LATE_SLACK`] before `complete_through` (the newest message of
/// the last complete poll: everything before it is in the mirror, but for
/// a message that became visible late), or the end. When it cannot page
/// back that far (the server lists the same page again), a page that
/// reached `complete_through` itself ends it as if it had stopped there.
/// A message the mirror has from a webhook is not such a mark: a webhook
/// brings one message, not the history before it.
async fn poll_lead(
    store: &Store,
    client: &Arc<Client>,
    business_id: &str,
    negotiation_id: &str,
    complete_through: Option<DateTime<Utc>>,
    stop: &CancellationToken,
) -> LeadPoll {
    let mut poll = LeadPoll {
        pages: 0,
        new: 0,
        newest: None,
        error: None,
        kind: Failure::Refused,
    };
    // The oldest `sentAt` of the last page read. The next page asks for the
    // messages sent before that instant plus one millisecond, so that it
    // lists again the messages sent at that very instant: `sentBefore` is
    // exclusive, and those of them that did not fit on the last page would
    // otherwise never be listed (and the mark would move past them).
    let mut oldest_read: Option<DateTime<Utc>> = None;
    // The next page's `sentBefore` (exclusive).
    let mut before: Option<DateTime<Utc>> = None;
    // A millisecond that more messages share than a page holds: they cannot
    // all be listed by paging back, so the poll ends in this error (its mark
    // stays), but only after reading on past that millisecond: the history
    // before it is not lost with the messages that did not fit.
    let mut crowded: Option<String> = None;
    // Set once a page reaches the mark itself (without the slack), to the
    // poll's outcome had it stopped there, as it did before the slack: if
    // the poll cannot read on to the slack (a server that does not page
    // back), it ends as it used to, not in an error every later poll would
    // repeat. Nothing is lost to it: a server that lists no older page
    // shows no late message however far a poll asks.
    let mut at_mark: Option<Option<String>> = None;
    loop {
        if poll.pages >= MAX_PAGES {
            poll.error = at_mark.unwrap_or_else(|| {
                Some(format!(
                    "stopped after {MAX_PAGES} pages: the conversation does not end"
                ))
            });
            return poll;
        }
        if stop.is_cancelled() {
            poll.error = Some("interrupted by shutdown".into());
            poll.kind = Failure::Interrupted;
            return poll;
        }
        let mut page = match client
            .list_messages(
                business_id,
                negotiation_id,
                PAGE_SIZE,
                before.map(crate::time::fmt).as_deref(),
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                poll.kind = Failure::of(&e);
                poll.error = Some(e.message);
                return poll;
            }
        };
        poll.pages += 1;
        let listed = page.messages.len() + page.skipped as usize;
        // The end: a page shorter than the limit (the server's, when it
        // answered a lower one than asked for). A server that says nothing
        // of its page size may serve fewer than asked whatever `limit` says
        // (its default 10, or 5): then only an empty page is surely the end
        // (two requests more on a lead's first full read; the later polls
        // stop at the mark).
        let page_size = page.limit.map(|l| l.min(PAGE_SIZE) as usize);
        let end = match page_size {
            Some(size) => listed < size,
            None => listed == 0,
        };
        if page.skipped > 0 {
            warn!(
                negotiation_id,
                skipped = page.skipped,
                "messages without a usable messageID or negotiationID were not stored"
            );
        }
        // A message that names another negotiation is not this lead's: it
        // is not stored (under a business it may not belong to) and is no
        // mark of how far this conversation was read.
        let stray: Vec<String> = page
            .messages
            .iter()
            .filter(|m| {
                m.negotiation_id
                    .as_deref()
                    .is_some_and(|n| n != negotiation_id)
            })
            .map(|m| m.message_id.clone())
            .collect();
        if !stray.is_empty() {
            warn!(
                negotiation_id,
                ?stray,
                "messages listed in this lead's conversation name another negotiation; not stored"
            );
            page.messages.retain(|m| {
                m.negotiation_id
                    .as_deref()
                    .is_none_or(|n| n == negotiation_id)
            });
        }
        let times: Vec<DateTime<Utc>> = page
            .messages
            .iter()
            .filter_map(|m| crate::time::parse(m.sent_at_raw.as_ref()?))
            .collect();
        let oldest = times.iter().min().copied();
        if let Some(t) = times.iter().max() {
            poll.newest = poll.newest.max(Some(*t));
        }
        let reached_known =
            complete_through.is_some_and(|known| times.iter().any(|t| *t <= known - LATE_SLACK));
        if at_mark.is_none()
            && complete_through.is_some_and(|known| times.iter().any(|t| *t <= known))
        {
            at_mark = Some(crowded.clone());
        }
        let (n, b, now) = (
            negotiation_id.to_string(),
            business_id.to_string(),
            crate::time::now(),
        );
        match store
            .call(move |c| {
                messages::insert_messages(
                    c,
                    &n,
                    Some(&b),
                    &page.messages,
                    MessageSource::Poll,
                    &now,
                )
            })
            .await
        {
            Ok(written) => poll.new += written.inserted,
            Err(e) => {
                poll.error = Some(format!("cannot store messages: {e:#}"));
                poll.kind = Failure::Transient;
                return poll;
            }
        }
        if reached_known || end {
            poll.error = crowded;
            return poll;
        }
        // The next page ends with the oldest instant of this one, included.
        match oldest {
            None => {
                poll.error = at_mark.unwrap_or_else(|| {
                    Some(
                        "a full page of messages without a readable sentAt: cannot page back"
                            .into(),
                    )
                });
                return poll;
            }
            Some(t) if oldest_read.is_some_and(|o| t >= o) => {
                // Every message listed lies in the millisecond of the last
                // page's oldest (before its end and not before that
                // instant): go on before that millisecond.
                let millisecond = oldest_read.unwrap_or(t).trunc_subsecs(3);
                if before == Some(millisecond) {
                    // Asked for the messages before that millisecond and
                    // listed it again: the server does not page back.
                    poll.error = at_mark.unwrap_or_else(|| {
                        Some(format!(
                            "paging back by sentBefore does not advance: asked for the messages sent before {}, \
                             the server listed messages sent at or after it",
                            crate::time::fmt(millisecond)
                        ))
                    });
                    return poll;
                }
                // Of a page size the server did not say, a page of one
                // instant is no proof of crowding: the messages before it
                // are asked for, and an empty page ends the read.
                if page_size.is_some() {
                    crowded.get_or_insert_with(|| {
                    format!(
                        "paging back by sentBefore does not advance: a full page of messages was sent at {} \
                         (within one millisecond); those that did not fit are not listed",
                        crate::time::fmt(millisecond)
                    )
                    });
                }
                before = Some(millisecond);
            }
            Some(t) => {
                oldest_read = Some(t);
                // The instant plus one millisecond, as `fmt` writes it (to
                // the millisecond): every message sent at `t` is before it.
                before = Some(t.trunc_subsecs(3) + chrono::Duration::milliseconds(1));
            }
        }
    }
}
