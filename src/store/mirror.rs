//! The mirror: negotiations, their changes, businesses and sync runs.

use crate::config::Business;
use crate::lead::LeadRow;
use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;
use serde_json::value::RawValue;

/// An unchanged lead's `last_seen_at` is rewritten only when older than this,
/// so that re-listing unchanged leads writes nothing (README: "last_seen_at").
pub const LAST_SEEN_GRANULARITY: chrono::Duration = chrono::Duration::hours(1);

/// What a page write (or one webhook lead) is part of.
#[derive(Debug, Clone)]
pub struct PageContext {
    pub business_id: String,
    /// The sync pass (`sync_runs.id`); `None` for a lead that came another way.
    pub run_id: Option<i64>,
    /// Recorded in `negotiation_changes.source`.
    pub source: Source,
    /// The observation time written to the rows.
    pub now: String,
    /// `last_seen_at` values older than this are refreshed.
    pub stale_before: String,
    /// The caller believes every lead of the page is new to the mirror (a
    /// full scan whose business's known leads have none of them): each is
    /// inserted at once, and one whose id is mirrored after all takes the
    /// ordinary path. Saves a lookup per lead of a first sync.
    pub insert_first: bool,
    /// When the listing page was asked for (the database's format): the
    /// server made it no earlier. A lead whose mirrored copy came from a
    /// webhook event triggered after that keeps it: the page's copy may be
    /// older (the answer can arrive well after the page was made, and a
    /// full scan writes pages some time after reading them); the next
    /// listing, asked for after the event, is written as usual. Recorded
    /// with a listed copy (`negotiations.listing_read_at`, schema 21): a
    /// delivery of an event after it is newer than the copy, however late
    /// the copy was written (`changed_at`). `None`: a listed copy is always
    /// written, and a delivery is compared with its write.
    pub read_at: Option<String>,
}

/// Where a lead came from, as `negotiation_changes.source` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A listing page of a sync pass.
    Poll,
    /// A `NegotiationCreatedV4` webhook delivery.
    Webhook,
}

impl Source {
    /// The value stored in `negotiation_changes.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Poll => "poll",
            Source::Webhook => "webhook",
        }
    }
}

/// Counts of one page write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
}

/// The lead's columns in the order the INSERT and UPDATE statements bind them;
/// `stamps`: `webhook_triggered_at` and `listing_read_at` ([`Origin::stamps`]).
fn lead_columns<'a>(
    lead: &'a LeadRow,
    ctx: &'a PageContext,
    stamps: &'a [Option<&'a str>; 2],
) -> [&'a dyn rusqlite::ToSql; 16] {
    [
        &lead.negotiation_id,
        &ctx.business_id,
        &lead.status,
        &lead.created_at,
        &lead.payload,
        &lead.hash,
        &lead.category,
        &lead.customer_name,
        &lead.city,
        &lead.zip,
        &lead.customer_phone,
        &lead.lead_price,
        &lead.charge_state,
        &ctx.now,
        &stamps[0],
        &stamps[1],
    ]
}

/// What a `negotiation_changes` row records beyond the lead and the pass.
struct Change<'a> {
    kind: &'static str,
    old_status: Option<&'a str>,
    /// `new_status` is `old_status`, not the lead's: a `reappeared` row
    /// followed by the `changed` row of the same observation, which
    /// records the transition (once).
    status_kept: bool,
    changed_fields: Option<String>,
    old_payload: Option<&'a str>,
}

/// One `negotiation_changes` row: run once per new or changed lead, so it
/// must stay cheap (no temporary table; schema 10).
const INSERT_CHANGE: &str =
    "INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind,
         old_status, new_status, changed_fields, old_payload, sync_run_id, source)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// A new lead's business given to its messages stored before it was
/// mirrored (a customer's message delivered by webhook names no business):
/// run for each new lead of a page only when [`MESSAGES_WITHOUT_BUSINESS`]
/// found such messages (one probe of `messages_without_business`).
const MESSAGES_OF_NEW_LEAD: &str = "UPDATE messages SET business_id = ?1
     WHERE negotiation_id = ?2 AND business_id IS NULL";

/// Whether any message lacks a business: once per page (or per lead
/// inserted outside a page's batch), from the partial index
/// `messages_without_business`, empty nearly always. With a million
/// messages mirrored, the UPDATE run for every new lead cost 4.5–6.4 µs a
/// lead (0.45–0.65 s a full sync of 100,000 new leads) even with nothing
/// to update.
const MESSAGES_WITHOUT_BUSINESS: &str =
    "SELECT EXISTS (SELECT 1 FROM messages WHERE business_id IS NULL)";

fn record_change(
    tx: &Connection,
    lead: &LeadRow,
    ctx: &PageContext,
    c: Change<'_>,
) -> rusqlite::Result<usize> {
    let mut stmt = tx.prepare_cached(INSERT_CHANGE)?;
    change_row(&mut stmt, lead, ctx, c)
}

/// [`record_change`] through a statement the caller holds.
fn change_row(
    stmt: &mut rusqlite::Statement<'_>,
    lead: &LeadRow,
    ctx: &PageContext,
    c: Change<'_>,
) -> rusqlite::Result<usize> {
    let new_status = match c.status_kept {
        true => c.old_status,
        false => lead.status.as_deref(),
    };
    stmt.execute(params![
        lead.negotiation_id,
        ctx.business_id,
        ctx.now,
        c.kind,
        c.old_status,
        new_status,
        c.changed_fields,
        c.old_payload,
        ctx.run_id,
        ctx.source.as_str(),
    ])
}

/// A 64-bit fingerprint of a lead id: what a full scan remembers of each
/// lead it listed (8 bytes a lead, never the listing itself).
pub fn id_fingerprint(negotiation_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(negotiation_id.as_bytes())
}

/// A set of [`id_fingerprint`]s (a full scan's listed leads).
pub type Fingerprints = std::collections::HashSet<u64, FingerprintHasher>;

/// The leads a full scan knows ([`known_leads`]), by [`id_fingerprint`].
pub type KnownLeads = std::collections::HashMap<u64, Known, FingerprintHasher>;

/// Hashes for sets and maps keyed by an [`id_fingerprint`], already a
/// 64-bit hash of the id: one multiply by a key drawn per process, folded
/// (SipHash, the standard one, was ~4% of a re-sync's instructions for
/// its four lookups and inserts a lead).
#[derive(Clone, Copy, Debug)]
pub struct FingerprintHasher {
    key: u64,
}

impl Default for FingerprintHasher {
    fn default() -> Self {
        use std::hash::BuildHasher;
        // The standard hasher's random keys, drawn once per process.
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let key = *KEY.get_or_init(|| {
            std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1
        });
        FingerprintHasher { key }
    }
}

impl std::hash::BuildHasher for FingerprintHasher {
    type Hasher = FingerprintHash;
    fn build_hasher(&self) -> FingerprintHash {
        FingerprintHash(self.key)
    }
}

/// The [`FingerprintHasher`]'s state.
#[derive(Clone, Copy, Debug)]
pub struct FingerprintHash(u64);

impl FingerprintHash {
    fn mix(&mut self, x: u64) {
        let product = u128::from(x ^ self.0) * u128::from(0x9e37_79b9_7f4a_7c15_u64);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl std::hash::Hasher for FingerprintHash {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word) ^ chunk.len() as u64);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What a full scan knows of one of its business's leads before it starts
/// ([`known_leads`]): enough to tell, without a query, that a listed lead is
/// exactly as mirrored and [`upsert_lead`] would write nothing for it.
/// 16 bytes: a business may have hundreds of thousands of leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    hash: i64,
    /// `last_seen_at` as [`instant_key`] orders it; -1 (before every
    /// instant) when the text is not in leadsync's own form, or lies
    /// [`crate::time::FAR_AHEAD`] after the moment the known leads were read
    /// (a clock ahead wrote it): such a lead is never unchanged. (A missing lead is not known at all.)
    last_seen: i64,
}

impl Known {
    /// Whether a listed lead with this payload hash needs nothing written in
    /// a page whose `stale_before` is given: same payload, not missing, and
    /// `last_seen_at` not due for its hourly refresh (compared as SQLite
    /// compares text, so exactly what [`upsert_lead`] decides).
    pub fn unchanged(&self, hash: i64, stale_before: &str) -> bool {
        self.hash == hash
            && instant_key(stale_before.as_bytes()).is_some_and(|stale| self.last_seen >= stale)
    }
}

/// An instant in leadsync's own form (`2026-01-01T12:00:00.000Z`, 24 bytes)
/// as the number its 17 digits spell: two such texts compare as their
/// numbers do. `None` for any other text.
fn instant_key(t: &[u8]) -> Option<i64> {
    const FORM: &[u8; 24] = b"0000-00-00T00:00:00.000Z";
    if t.len() != FORM.len() {
        return None;
    }
    let mut key = 0i64;
    for (&c, &f) in t.iter().zip(FORM) {
        if f == b'0' {
            if !c.is_ascii_digit() {
                return None;
            }
            key = key * 10 + i64::from(c - b'0');
        } else if c != f {
            return None;
        }
    }
    Some(key)
}

/// How many leads [`KNOWN_LEADS`] reads.
const KNOWN_COUNT: &str = "SELECT count(*) FROM negotiations
  WHERE business_id = ?1 AND missing_since IS NULL";

/// A business's present leads, as a full scan knows them before it starts.
const KNOWN_LEADS: &str = "SELECT negotiation_id, payload_hash, last_seen_at
   FROM negotiations
  WHERE business_id = ?1 AND missing_since IS NULL";

/// A business's present leads first seen before ?2 (the pass's start,
/// [`unlisted`]) or after ?3 (the mark's transaction's time plus
/// [`crate::time::FAR_AHEAD`]): after a full scan, those it did not list are
/// missing. A lead first seen after the scan started (a webhook delivery
/// meanwhile, even one written after the mark's time was taken) could not
/// be in its listing. One first seen further ahead than the margin was
/// stamped under a wall clock ahead, since corrected: it
/// was not first seen during the scan, and left out it would be spared by
/// every full scan until the clock caught up (a gone lead present for as
/// long as the clock was ahead).
const UNLISTED: &str = "SELECT negotiation_id FROM negotiations
  WHERE business_id = ?1 AND missing_since IS NULL
    AND (first_seen_at < ?2 OR first_seen_at > ?3)";

/// Whether lead ?1, unlisted by a full scan that started at ?2, was
/// observed otherwise since then: its row written meanwhile (`changed_at`:
/// a delivery, a move from another business), or a delivered event of it
/// after ?3, the start less [`LISTING_MARGIN`] (as [`listing_lags`])
/// (`webhook_triggered_at`, recorded also for a copy identical to the
/// mirrored one; for a row a delivery without a believable event time
/// wrote, neither it nor `listing_read_at` is set: its write). Its absence
/// from the listing proves nothing then: the page where it would have been
/// may have been read before the event, or within the margin after it,
/// when a listing may still lag it. `changed_at` is leadsync's wall clock:
/// only a write by ?4 counts (one stamped later was made
/// under a clock ahead, since corrected: it tells nothing of when the lead
/// was seen, and would spare the lead from every full scan until the clock
/// catches up); "later" is [`crate::time::FAR_AHEAD`] after the mark's
/// transaction began: a delivery written after the mark's time was taken,
/// before its transaction, is an observation like any other. Read for the
/// unlisted leads only (the columns are not in
/// the index [`UNLISTED`] reads).
const OBSERVED_SINCE: &str = "SELECT changed_at BETWEEN ?2 AND ?4 OR webhook_triggered_at > ?3
       OR (webhook_triggered_at IS NULL AND listing_read_at IS NULL
           AND changed_at > ?3 AND changed_at <= ?4)
   FROM negotiations WHERE negotiation_id = ?1";

/// A business's mirrored leads by id fingerprint ([`id_fingerprint`]), read
/// once before a full scan (from a connection of its own: see
/// `Store::read`). A row whose columns are not what leadsync writes (a
/// non-integer hash, say) is left out: its lead takes the ordinary path.
/// The map is sized from a count first: grown by doubling, it held both
/// tables for a moment (96 bytes a lead at peak, against 25-57 now).
pub fn known_leads(conn: &Connection, business_id: &str) -> Result<KnownLeads> {
    use rusqlite::types::ValueRef;
    // The present leads only, from the index alone (schema 11): a missing
    // lead is not known, and a listing of it takes the ordinary path (it
    // reappears).
    let count: i64 = conn.query_row(KNOWN_COUNT, [business_id], |r| r.get(0))?;
    let mut stmt = conn.prepare(KNOWN_LEADS)?;
    let mut rows = stmt.query([business_id])?;
    let mut known = KnownLeads::with_capacity_and_hasher(
        usize::try_from(count).unwrap_or(0),
        FingerprintHasher::default(),
    );
    // A last_seen_at far ahead of now was written under a wall clock ahead,
    // since corrected: such a lead is not unchanged (upsert_lead rewrites it).
    let ahead = instant_key(crate::time::far_ahead().as_bytes()).unwrap_or(i64::MAX);
    while let Some(r) = rows.next()? {
        let (ValueRef::Text(id), ValueRef::Integer(hash)) = (r.get_ref(0)?, r.get_ref(1)?) else {
            continue;
        };
        let Ok(id) = std::str::from_utf8(id) else {
            continue;
        };
        let last_seen = match r.get_ref(2)? {
            ValueRef::Text(t) => instant_key(t).filter(|k| *k <= ahead).unwrap_or(-1),
            _ => -1,
        };
        known.insert(id_fingerprint(id), Known { hash, last_seen });
    }
    Ok(known)
}

/// What [`upsert_lead`] did with a lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// First seen: inserted, with a `new` change row.
    Inserted,
    /// Its payload (or business) changed: updated, with a `changed` change row.
    Changed,
    /// It was missing and is listed again, unchanged (a `reappeared` row).
    Reappeared,
    /// Same payload: nothing written (but `last_seen_at`, at most hourly).
    Unchanged,
    /// A copy older than the mirrored one (see [`upsert_lead`]):
    /// nothing was written. `identical` says whether the payload equals the
    /// mirrored one.
    Kept { identical: bool },
}

/// Where the copy of a lead given to [`upsert_lead`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// A listing page: the poller's copy, written when it differs (unless
    /// the mirrored copy came from an event after the page was read:
    /// [`PageContext::read_at`]).
    Listed,
    /// A webhook delivery whose event happened at `triggered_at` (UTC, the
    /// database's format; `None` when the delivery has no believable time).
    Delivered { triggered_at: Option<&'a str> },
}

impl<'a> Origin<'a> {
    /// What `negotiations.webhook_triggered_at` records of a copy written:
    /// a listing's copy has no event time.
    fn triggered_at(self) -> Option<&'a str> {
        match self {
            Origin::Listed => None,
            Origin::Delivered { triggered_at } => triggered_at,
        }
    }

    /// What a copy written records of when it was observed:
    /// `webhook_triggered_at` ([`Origin::triggered_at`]) and
    /// `listing_read_at`, when a listing's page was asked for
    /// ([`PageContext::read_at`]; a delivered copy has none).
    fn stamps<'c>(self, ctx: &'c PageContext) -> [Option<&'c str>; 2]
    where
        'a: 'c,
    {
        let read_at = match self {
            Origin::Listed => ctx.read_at.as_deref(),
            Origin::Delivered { .. } => None,
        };
        [self.triggered_at(), read_at]
    }
}

/// Passes of a business whose listing confirmed leads, since an instant
/// (?2: an event's time plus [`LISTING_MARGIN`]) and not far ahead (?4:
/// now plus [`crate::time::FAR_AHEAD`]; one listed later was stamped under
/// a wall clock ahead, since corrected, and tells nothing of when it was
/// made), that started after a
/// lead's row was last written (?3): newest first, through
/// `sync_runs_listed` (schema 18).
const LISTED_SINCE: &str = "SELECT listed_ids FROM sync_runs
  WHERE business_id = ?1 AND listed_at >= ?2 AND listed_at <= ?4 AND started_at > ?3
  ORDER BY listed_at DESC";

/// How long after a delivered event a listing must have started to keep
/// the delivery out ([`listed_since`]). A listing asked for just after the
/// event may still show the state before it: Thumbtack's clock
/// (`triggeredAt`) and the host's differ by some milliseconds, and a
/// listing may lag a change by as much. A prompt delivery (seconds late) is
/// then newer than what such a listing showed, and must be applied; only a
/// delivery held up by more than this past a listing is kept out.
pub const LISTING_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Whether a listing page asked for at `read_at` may not show yet the
/// event of a delivered copy triggered at `copy_event`: it was asked for
/// before the event plus [`LISTING_MARGIN`] (the margin a delivery is given
/// over a listing, [`listed_since`], given the other way round). Such a
/// page does not overwrite the delivered copy; a change it shows that is
/// really newer (made within the margin after the event) lands with the
/// next listing of the lead asked for after the margin, as the mirrored
/// copy still differs from it. Times that cannot be read are compared as
/// text, without the margin.
fn listing_lags(copy_event: &[u8], read_at: &[u8]) -> bool {
    let copy_event = std::str::from_utf8(copy_event).unwrap_or_default();
    let read_at = std::str::from_utf8(read_at).unwrap_or_default();
    match (crate::time::parse(copy_event), crate::time::parse(read_at)) {
        (Some(event), Some(read)) => event
            .checked_add_signed(LISTING_MARGIN)
            .is_none_or(|bound| read < bound),
        _ => copy_event > read_at,
    }
}

/// Whether a listing of `business_id` asked for at or after `event` plus
/// [`LISTING_MARGIN`] showed the lead as mirrored (or, a complete one, found it gone): a pass that
/// started after the lead's row was last written (`changed_at`; so the row
/// was the business's, as it is, all through the pass) and listed every
/// lead of the business, or this one. Such a listing wrote nothing when the
/// lead was as mirrored, so neither `changed_at` nor `webhook_triggered_at`
/// says it happened; the pass's row does ([`RunEnd::covered`]).
fn listed_since(
    tx: &Connection,
    business_id: &str,
    negotiation_id: &str,
    changed_at: &str,
    event: &str,
) -> Result<bool> {
    // Inside the delivery's transaction: a listing written after its
    // receipt (its `now`) is no clock ahead, and is newer.
    let ahead = crate::time::far_ahead();
    // `listed_at` is in leadsync's form (crate::time::fmt): so is the bound.
    // An event time that cannot be moved by the margin (unreadable, at the
    // end of time) is not kept out by a listing.
    let Some(since) = crate::time::parse(event)
        .and_then(|t| t.checked_add_signed(LISTING_MARGIN))
        .map(crate::time::fmt)
    else {
        return Ok(false);
    };
    let wanted = id_fingerprint(negotiation_id).to_le_bytes();
    let mut stmt = tx.prepare_cached(LISTED_SINCE)?;
    let mut rows = stmt.query(params![business_id, since, changed_at, ahead])?;
    while let Some(r) = rows.next()? {
        let covers = match r.get_ref(0)? {
            rusqlite::types::ValueRef::Null => true,
            rusqlite::types::ValueRef::Blob(ids) => ids.chunks_exact(8).any(|id| id == wanted),
            // Not what leadsync writes: confirms nothing.
            _ => false,
        };
        if covers {
            return Ok(true);
        }
    }
    // Passes pruned by the retention (schema 19): one of them may have
    // covered the lead, so a delivery older than the newest of them, of a
    // row written before it, is kept out as if it had. Only a delivery held
    // up for longer than the retention can be kept out wrongly, until the
    // next listing of the lead; a stale copy is never applied.
    Ok(tx
        .prepare_cached(PRUNED_SINCE)?
        .exists(params![business_id, since, changed_at, ahead])?)
}

/// Whether passes of a business whose listing started at or after ?2, and
/// after a lead's row was last written (?3), were pruned ([`listed_since`]);
/// not when the newest of them is far ahead (?4, as [`LISTED_SINCE`]).
const PRUNED_SINCE: &str = "SELECT 1 FROM sync_runs_pruned
  WHERE business_id = ?1 AND listed_through >= ?2 AND listed_through > ?3
    AND listed_through <= ?4";

/// Which of its business's leads a pass's listing showed as they are now
/// mirrored (written, or left alone because identical), recorded in its
/// `sync_runs` row (`listed_at`, `listed_ids`; schema 18) so that a webhook
/// delivery of an older event is not applied over them.
#[derive(Debug, Clone, Copy)]
pub enum Covered<'a> {
    /// None that can be named: a full scan that failed or whose listing's
    /// end is unknown, a pass that read nothing.
    Nothing,
    /// Every lead of the business: a successful full scan with a known end
    /// (a lead it did not list was marked missing).
    Every,
    /// These leads ([`id_fingerprint`]s): the pages a head scan wrote.
    These(&'a [u64]),
}

/// At most this many leads of a partial listing are recorded (8 bytes
/// each): a head scan that reads further (a first sync by head scans, a
/// business with many changes) confirms these, and the rest wait for the
/// next listing, as before schema 18.
pub const MAX_COVERED_IDS: usize = 4096;

/// Writes one lead, inside the caller's transaction: inserted when new,
/// updated with a change row when its payload changed, left alone when not.
/// The one path every lead takes into the mirror, polled or by webhook. A
/// listed copy is left out when the mirrored copy came from a webhook event
/// triggered after the page was read ([`PageContext::read_at`]), or less
/// than [`LISTING_MARGIN`] before ([`listing_lags`]). A
/// delivered copy of a known lead is left out when the mirrored copy is as
/// new or newer — it came from an event triggered at or after this one
/// (`webhook_triggered_at`), or, written by a listing, came from a page
/// asked for after this event (`listing_read_at`; when unknown, written
/// after it: `changed_at`), or a listing asked for at or after the event
/// plus [`LISTING_MARGIN`]
/// showed it as mirrored (or, complete, found it gone) without writing
/// anything, or such a listing may have been pruned ([`listed_since`]) —
/// or when a full scan found the lead missing after the event, or when
/// the delivery has no believable event time: an older snapshot never
/// rolls a lead back nor brings it back.
pub fn upsert_lead(
    tx: &Connection,
    ctx: &PageContext,
    lead: &LeadRow,
    origin: Origin<'_>,
) -> Result<Upserted> {
    // The latest stamp not far ahead, read from the clock (inside the
    // transaction) at most once, and only when a stamp needs it.
    let ahead = std::cell::OnceCell::new();
    let far_ahead = |v: &[u8]| v > ahead.get_or_init(crate::time::far_ahead).as_bytes();
    let existing = tx
        .prepare_cached(
            "SELECT payload_hash, last_seen_at, missing_since, business_id, status, changed_at,
                    webhook_triggered_at, listing_read_at
               FROM negotiations WHERE negotiation_id = ?1",
        )?
        .query_row([&lead.negotiation_id], |r| {
            // The unchanged path (most leads of most passes) compares the
            // stored columns in place and allocates nothing; the old status
            // is copied out only for a lead that may get a change row. A
            // value of a type leadsync never writes (the partner's edit)
            // fails nothing: a hash that is no integer differs, a stamp
            // that is no text is stale, and the listing writes the lead
            // over it. A business is compared by its bytes (a blob of the
            // same bytes is the same business, written back as text).
            use rusqlite::types::ValueRef;
            let hash = match r.get_ref(0)? {
                ValueRef::Integer(h) => Some(h),
                _ => None,
            };
            let hash_differs = hash != Some(lead.hash);
            // A last_seen_at far ahead of now was written under a wall
            // clock ahead, since corrected: rewritten too, not left "seen"
            // in the future until the clock catches up. (The clock is read
            // only for a stamp after the context's `now`, itself a reading
            // of it: none on the unchanged path.)
            let stale = match r.get_ref(1)? {
                ValueRef::Text(last_seen) => {
                    last_seen < ctx.stale_before.as_bytes()
                        || (last_seen > ctx.now.as_bytes() && far_ahead(last_seen))
                }
                _ => true,
            };
            let missing = !matches!(r.get_ref(2)?, ValueRef::Null);
            let (same_business, business_blob) = match r.get_ref(3)? {
                ValueRef::Text(b) => (b == ctx.business_id.as_bytes(), false),
                ValueRef::Blob(b) => (b == ctx.business_id.as_bytes(), true),
                _ => (false, false),
            };
            let old_status = if missing || hash_differs || !same_business {
                value_text(r.get_ref(4)?)
            } else {
                None
            };
            let text = |i| match r.get_ref(i) {
                Ok(rusqlite::types::ValueRef::Text(v)) => Some(v),
                _ => None,
            };
            // leadsync's own stamp of an observation (a listing's asking or
            // write, a scan's start), unless it lies far ahead of now: a
            // wall clock ahead, since corrected, wrote it, and it tells
            // nothing of when the lead was observed (a delivery kept out by
            // it would be kept out until the clock caught up). One merely
            // after the delivery's receipt (`ctx.now`) is a listing written
            // while the delivery waited: newer, and it counts.
            let ours = |i| text(i).filter(|v: &&[u8]| !far_ahead(v));
            // A delivery that is newer than the mirrored copy by their
            // times may still be older than a listing that showed the copy
            // (or found the lead gone) and wrote nothing: checked below.
            let mut ask_listings = false;
            let keep = match origin {
                // A copy delivered for an event after the page was read, or
                // less than LISTING_MARGIN before: such a listing may lag
                // the event (listing_lags). And a copy another business's
                // listing wrote from a page asked for after this one: the
                // lead moved, and this page (of a pass running beside
                // that one) shows it before the move. Passes of one
                // business never overlap, so its own pages are written in
                // the order they were asked for.
                Origin::Listed => ctx.read_at.as_deref().is_some_and(|read_at| {
                    text(6).is_some_and(|copy_event| listing_lags(copy_event, read_at.as_bytes()))
                        || (!same_business
                            && ours(7).is_some_and(|copy_read| copy_read > read_at.as_bytes()))
                }),
                Origin::Delivered { triggered_at: None } => true,
                Origin::Delivered {
                    triggered_at: Some(t),
                } => {
                    let t = t.as_bytes();
                    let newer_copy = match text(6) {
                        // Another delivery's copy: its event against this one
                        // (the same event time keeps the copy: no flapping).
                        Some(copy_event) => copy_event >= t,
                        // The poller's copy: its page asked for a margin
                        // after this event (`listing_read_at`; the page was
                        // made no earlier), else written then (`changed_at`).
                        // The write can come long after the asking: a page
                        // asked for before the event shows the lead as it
                        // was before it, however late it was written. And a
                        // listing may lag the event ([`LISTING_MARGIN`]):
                        // one asked for within the margin after it does not
                        // keep the delivery out, as it does not overwrite a
                        // delivered copy ([`listing_lags`]) — which of the
                        // two is written first does not decide the mirror.
                        None => match (ours(7), ours(5)) {
                            (Some(read_at), Some(changed_at)) => {
                                !listing_lags(t, read_at.min(changed_at))
                            }
                            (read_at, changed_at) => {
                                read_at.or(changed_at).is_some_and(|c| !listing_lags(t, c))
                            }
                        },
                    };
                    // A lead a full scan found gone after the event stays
                    // gone: the scan is the newer observation — when its
                    // listing began (`missing_since`) a margin or more
                    // after the event, as for a listing that showed the
                    // lead ([`listed_since`]); a page read during the scan
                    // or just after the event may predate or lag it.
                    let gone_after = ours(2).is_some_and(|missing| !listing_lags(t, missing));
                    ask_listings = !(newer_copy || gone_after);
                    newer_copy || gone_after
                }
            };
            // The business read leniently, as it was compared above.
            let business = match r.get_ref(3) {
                Ok(ValueRef::Text(v) | ValueRef::Blob(v)) => Some(v),
                _ => None,
            };
            let listings = match (ask_listings, business, text(5)) {
                (true, Some(business), Some(changed_at)) => Some((
                    String::from_utf8_lossy(business).into_owned(),
                    String::from_utf8_lossy(changed_at).into_owned(),
                )),
                _ => None,
            };
            Ok((
                hash,
                stale,
                missing,
                same_business,
                same_business && business_blob,
                old_status,
                keep,
                listings,
            ))
        })
        .optional()?;
    let Some((
        hash,
        stale,
        missing,
        same_business,
        business_retyped,
        old_status,
        mut keep,
        listings,
    )) = existing
    else {
        // Not mirrored, as just looked up in this transaction: inserted.
        if !NewLeads::prepare(tx)?.insert(ctx, lead, origin)? {
            anyhow::bail!("lead {} appeared while it was written", lead.negotiation_id);
        }
        return Ok(Upserted::Inserted);
    };
    if let (
        Some((business_id, changed_at)),
        Origin::Delivered {
            triggered_at: Some(t),
        },
    ) = (listings, origin)
    {
        keep = listed_since(tx, &business_id, &lead.negotiation_id, &changed_at, t)?;
    }
    let mut changed_fields = None;
    // The hash the stored payload should have, when the stored one is not
    // it (the partner's edit: a text, a real, another integer). Left so,
    // the lead would pay the payload's read and comparison on every pass.
    let mut repaired_hash = None;
    if hash != Some(lead.hash) || !same_business {
        let old: String = tx
            .prepare_cached("SELECT payload FROM negotiations WHERE negotiation_id = ?1")?
            .query_row([&lead.negotiation_id], |r| Ok(value_text(r.get_ref(0)?)))?
            .unwrap_or_default();
        let old_hash = xxhash_rust::xxh3::xxh3_64(old.as_bytes()) as i64;
        repaired_hash = Some(old_hash).filter(|h| hash != Some(*h));
        let fields = lead_fields_differing(&old, &lead.payload, &lead.negotiation_id);
        if !fields.is_empty() || !same_business {
            changed_fields = Some((old, fields));
        }
    }
    // A row not written over below keeps its values, each written back in
    // its own type (the hash of its payload, its business as text): no
    // change row, as nothing Thumbtack sent changed.
    if (changed_fields.is_none() || keep) && (business_retyped || repaired_hash.is_some()) {
        tx.prepare_cached(
            "UPDATE negotiations SET business_id = coalesce(?2, business_id),
                 payload_hash = coalesce(?3, payload_hash)
              WHERE negotiation_id = ?1",
        )?
        .execute(params![
            lead.negotiation_id,
            business_retyped.then_some(ctx.business_id.as_str()),
            repaired_hash
        ])?;
    }
    if keep {
        return Ok(Upserted::Kept {
            identical: changed_fields.is_none(),
        });
    }
    if missing {
        tx.prepare_cached(
            "UPDATE negotiations SET missing_since = NULL, last_seen_at = ?2 WHERE negotiation_id = ?1",
        )?
        .execute(params![lead.negotiation_id, ctx.now])?;
        // Changed as well: the `changed` row below records the transition,
        // and this one the reappearance as the lead was (as a `missing`
        // row does), so a status change is in the feed once.
        let c = Change {
            kind: "reappeared",
            old_status: old_status.as_deref(),
            status_kept: changed_fields.is_some(),
            changed_fields: None,
            old_payload: None,
        };
        record_change(tx, lead, ctx, c)?;
    }
    // A delivered copy identical to the mirrored one changes no column, but
    // its event is the newest observation of the lead: a page made before it
    // must not overwrite the copy it confirmed.
    if changed_fields.is_none()
        && let Origin::Delivered {
            triggered_at: Some(t),
        } = origin
    {
        tx.prepare_cached(
            "UPDATE negotiations SET webhook_triggered_at = ?2, listing_read_at = NULL
              WHERE negotiation_id = ?1",
        )?
        .execute(params![lead.negotiation_id, t])?;
    }
    Ok(match changed_fields {
        Some((old, fields)) => {
            tx.prepare_cached(
                "UPDATE negotiations SET business_id = ?2, status = ?3, created_at = ?4, payload = ?5,
                     payload_hash = ?6, category = ?7, customer_name = ?8, city = ?9, zip = ?10,
                     customer_phone = ?11, lead_price = ?12, charge_state = ?13,
                     last_seen_at = ?14, changed_at = ?14, missing_since = NULL,
                     webhook_triggered_at = ?15, listing_read_at = ?16
                 WHERE negotiation_id = ?1",
            )?
            .execute(&lead_columns(lead, ctx, &origin.stamps(ctx))[..])?;
            let c = Change {
                kind: "changed",
                old_status: old_status.as_deref(),
                status_kept: false,
                changed_fields: Some(serde_json::to_string(&fields)?),
                old_payload: Some(&old),
            };
            record_change(tx, lead, ctx, c)?;
            Upserted::Changed
        }
        None if missing => Upserted::Reappeared,
        None => {
            if stale {
                tx.prepare_cached(
                    "UPDATE negotiations SET last_seen_at = ?2 WHERE negotiation_id = ?1",
                )?
                .execute(params![lead.negotiation_id, ctx.now])?;
            }
            Upserted::Unchanged
        }
    })
}

/// A stored value as text, whatever its type (the partner's program may
/// have written a number where leadsync writes text): `None` for NULL.
fn value_text(v: rusqlite::types::ValueRef<'_>) -> Option<String> {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
    }
}

const INSERT_LEAD: &str =
    "INSERT INTO negotiations (negotiation_id, business_id, status, created_at, payload,
         payload_hash, category, customer_name, city, zip, customer_phone, lead_price,
         charge_state, first_seen_at, last_seen_at, changed_at, missing_since,
         webhook_triggered_at, listing_read_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, ?14, NULL, ?15, ?16)
     ON CONFLICT (negotiation_id) DO NOTHING";

/// The statements a new lead takes, taken from the statement cache once
/// for all the leads of a page: looking a statement up by its SQL text
/// (hashing it) and handing it back (clearing its bindings) twice a lead
/// was ~3% of a first full sync's CPU (README, "Performance"). A lead
/// inserted alone ([`upsert_lead`]) takes three lookups: its two
/// statements and [`MESSAGES_WITHOUT_BUSINESS`] (a fourth, the UPDATE of
/// its messages, only while some message lacks a business).
struct NewLeads<'c> {
    lead: rusqlite::CachedStatement<'c>,
    change: rusqlite::CachedStatement<'c>,
    /// Only when some message lacks a business (asked once, at `prepare`,
    /// inside the transaction that writes the leads).
    messages: Option<rusqlite::CachedStatement<'c>>,
}

impl<'c> NewLeads<'c> {
    fn prepare(tx: &'c Connection) -> rusqlite::Result<NewLeads<'c>> {
        let orphans: bool = tx
            .prepare_cached(MESSAGES_WITHOUT_BUSINESS)?
            .query_row([], |r| r.get(0))?;
        Ok(NewLeads {
            lead: tx.prepare_cached(INSERT_LEAD)?,
            change: tx.prepare_cached(INSERT_CHANGE)?,
            messages: match orphans {
                true => Some(tx.prepare_cached(MESSAGES_OF_NEW_LEAD)?),
                false => None,
            },
        })
    }

    /// Inserts a lead the caller believes new, with its `new` change row;
    /// false, and nothing written, when its id is mirrored already.
    fn insert(&mut self, ctx: &PageContext, lead: &LeadRow, origin: Origin) -> Result<bool> {
        let inserted = self
            .lead
            .execute(&lead_columns(lead, ctx, &origin.stamps(ctx))[..])?;
        if inserted == 0 {
            return Ok(false);
        }
        let c = Change {
            kind: "new",
            old_status: None,
            status_kept: false,
            changed_fields: None,
            old_payload: None,
        };
        change_row(&mut self.change, lead, ctx, c)?;
        if let Some(messages) = &mut self.messages {
            messages.execute(params![ctx.business_id, lead.negotiation_id])?;
        }
        Ok(true)
    }
}

/// Writes one listing page in one transaction: new leads inserted, changed
/// ones updated with a change row, unchanged ones left alone.
pub fn write_page(
    conn: &mut Connection,
    ctx: &PageContext,
    leads: &[LeadRow],
) -> Result<PageStats> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stats = upsert_page(&tx, ctx, leads)?;
    tx.commit()?;
    Ok(stats)
}

/// Every lead of one page, inside the caller's transaction.
fn upsert_page(tx: &Connection, ctx: &PageContext, leads: &[LeadRow]) -> Result<PageStats> {
    let mut stats = PageStats::default();
    // A trigger of the partner's on `negotiations` would see (BEFORE
    // INSERT) an insert that then does nothing: it gets the ordinary path.
    // A trigger keeps its table's name as written (any case).
    let insert_first = ctx.insert_first
        && tx
            .prepare_cached(
                "SELECT 1 FROM sqlite_master WHERE type = 'trigger'
                   AND tbl_name = 'negotiations' COLLATE NOCASE",
            )?
            .query_row([], |_| Ok(()))
            .optional()?
            .is_none();
    let mut new_leads = match insert_first {
        true => Some(NewLeads::prepare(tx)?),
        false => None,
    };
    for lead in leads {
        if let Some(new_leads) = &mut new_leads
            && new_leads.insert(ctx, lead, Origin::Listed)?
        {
            stats.inserted += 1;
            continue;
        }
        match upsert_lead(tx, ctx, lead, Origin::Listed)? {
            Upserted::Inserted => stats.inserted += 1,
            Upserted::Changed | Upserted::Reappeared => stats.updated += 1,
            Upserted::Unchanged | Upserted::Kept { .. } => stats.unchanged += 1,
        }
    }
    Ok(stats)
}

/// Writes several listing pages in one transaction (what [`write_page`]
/// does for each, in order): all of them or none, so a crash still leaves
/// whole pages only. Returns each page's counts.
pub fn write_pages(
    conn: &mut Connection,
    pages: &[(PageContext, Vec<LeadRow>)],
) -> Result<Vec<PageStats>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let all = pages
        .iter()
        .map(|(ctx, leads)| upsert_page(&tx, ctx, leads))
        .collect::<Result<Vec<_>>>()?;
    tx.commit()?;
    Ok(all)
}

/// An object's members by decoded key, each value as its text, sorted by
/// key and, within a key that is repeated (JSON allows it), in the order
/// sent. Every value of a repeated key is kept: SQLite's `json_extract`
/// reads its first, the columns its last (README, "The lead"), so two
/// copies that differ in any of them read differently, and one that keeps
/// only the last value (`serde_json::Value`, a map) would take a copy that
/// drops the first for the same lead and leave the mirror showing it.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(member) = map.next_entry::<String, &'a RawValue>()? {
                    members.push(member);
                }
                // Stable: a repeated key's values stay in the order sent.
                members.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(Members(members))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a> Members<'a> {
    fn parse(text: &'a str) -> Option<Members<'a>> {
        serde_json::from_str(text).ok()
    }

    /// The members of each key (its values in the order sent), by key.
    fn by_key(&self) -> std::collections::BTreeMap<&str, &[(String, &'a RawValue)]> {
        self.0
            .chunk_by(|a, b| a.0 == b.0)
            .map(|members| (members[0].0.as_str(), members))
            .collect()
    }
}

/// Whether two keys' values are the same, one by one ([`same_json`]).
fn same_values(p: &[(String, &RawValue)], q: &[(String, &RawValue)], depth: usize) -> bool {
    p.len() == q.len()
        && p.iter()
            .zip(q)
            .all(|((_, v), (_, w))| same_json(v, w, depth))
}

/// How deep [`same_json`] compares containers member by member; below
/// that, values whose texts differ are taken as different. Each level
/// re-reads its subtree, so an unbounded depth would cost time quadratic
/// in it and, past a few thousand levels, overflow the writer thread's
/// stack (a 6 KB payload could crash the daemon). No real lead nests
/// anywhere near this.
const SAME_JSON_DEPTH: usize = 64;

/// Whether two JSON texts are the same value ([`differing_fields`]): key
/// order and spacing aside, strings by what they decode to, and numbers
/// as `serde_json::Value` compares them when that is exact, else by their
/// text. `Value` (without `arbitrary_precision`, which leadsync does not
/// turn on) keeps a number beyond `u64`/`i64` as an `f64`, where
/// `…890123` and `…890124`, or two long decimals, are equal: a real change
/// would be taken for a non-change. Containers nested deeper than
/// [`SAME_JSON_DEPTH`] are compared by text.
fn same_json(a: &RawValue, b: &RawValue, depth: usize) -> bool {
    let (x, y) = (a.get().trim(), b.get().trim());
    if x == y {
        return true;
    }
    if depth >= SAME_JSON_DEPTH {
        return false;
    }
    match (x.as_bytes().first(), y.as_bytes().first()) {
        (Some(b'{'), Some(b'{')) => {
            match (Members::parse(x), Members::parse(y)) {
                // Sorted by key, a repeated key's values in the order sent.
                (Some(p), Some(q)) => {
                    p.0.len() == q.0.len()
                        && p.0
                            .iter()
                            .zip(&q.0)
                            .all(|((k, v), (l, w))| k == l && same_json(v, w, depth + 1))
                }
                _ => false,
            }
        }
        (Some(b'['), Some(b'[')) => {
            match (
                serde_json::from_str::<Vec<&RawValue>>(x),
                serde_json::from_str::<Vec<&RawValue>>(y),
            ) {
                (Ok(p), Ok(q)) => {
                    p.len() == q.len() && p.iter().zip(&q).all(|(v, w)| same_json(v, w, depth + 1))
                }
                _ => false,
            }
        }
        (Some(b'"'), Some(b'"')) => {
            let s = |t| serde_json::from_str::<String>(t).ok();
            s(x).is_some_and(|s1| s(y) == Some(s1))
        }
        (Some(b'-' | b'0'..=b'9'), Some(b'-' | b'0'..=b'9')) => same_number(x, y),
        // Literals (and a mix of types) that differ in text differ.
        _ => false,
    }
}

/// Whether two JSON number texts that differ as text are the same number.
/// A decimal of at most 15 significant digits is exact as an f64 (DBL_DIG)
/// when it lands in the normal range: two such are equal when their values
/// are. Zero counts only when written as zero (`0`, `-0.0`, `0e5`), not
/// when an exponent rounds it there (`1e-400`); a subnormal, an underflow
/// or an overflow is compared by text, as is anything longer.
fn same_number(x: &str, y: &str) -> bool {
    // The value, when the text pins it down exactly as an f64.
    let exact = |t: &str| -> Option<f64> {
        let mantissa = t.split(['e', 'E']).next().unwrap_or(t);
        let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
        let significant = digits.trim_start_matches('0').trim_end_matches('0');
        if significant.len() > 15 {
            return None;
        }
        let n = serde_json::from_str::<Value>(t).ok()?.as_f64()?;
        (n.is_normal() || (n == 0.0 && significant.is_empty())).then_some(n)
    };
    exact(x).is_some_and(|n| exact(y) == Some(n))
}

/// Top-level keys whose values differ between two JSON objects (an empty list
/// when they are equal as JSON, e.g. only key order or spacing differs;
/// [`same_json`]).
pub fn differing_fields(old: &str, new: &str) -> Vec<String> {
    fields_differing(old, new, None)
}

/// [`differing_fields`] of two copies of the lead mirrored under `id`,
/// where a top-level value that is that id, written once as a JSON string
/// and once as a JSON number of the same digits (`"519153480500518912"`,
/// `519153480500518912`), is the same: both are read as the same lead's
/// id, so the copy that changes only that is no change (no `changed` row;
/// the payload stays as first stored, as for a change of key order).
pub fn lead_fields_differing(old: &str, new: &str, id: &str) -> Vec<String> {
    fields_differing(old, new, Some(id))
}

fn fields_differing(old: &str, new: &str, id: Option<&str>) -> Vec<String> {
    // The value is `id` as a string on one side and as a number on the other.
    let same_id = |v: &RawValue, w: &RawValue| {
        let Some(id) = id.filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())) else {
            return false;
        };
        let (x, y) = (v.get().trim(), w.get().trim());
        let string_id = |t: &str| {
            t.starts_with('"') && serde_json::from_str::<String>(t).is_ok_and(|s| s == id)
        };
        (x == id && string_id(y)) || (y == id && string_id(x))
    };
    let same = |p: &[(String, &RawValue)], q: &[(String, &RawValue)]| {
        same_values(p, q, 0)
            || (p.len() == q.len()
                && p.iter()
                    .zip(q)
                    .all(|((_, v), (_, w))| same_json(v, w, 0) || same_id(v, w)))
    };
    match (Members::parse(old), Members::parse(new)) {
        (Some(a), Some(b)) => {
            let (a, b) = (a.by_key(), b.by_key());
            let mut keys: Vec<String> = a
                .iter()
                .filter(|(k, v)| !b.get(*k).is_some_and(|w| same(v, w)))
                .map(|(k, _)| k.to_string())
                .chain(
                    b.keys()
                        .filter(|k| !a.contains_key(*k))
                        .map(|k| k.to_string()),
                )
                .collect();
            keys.sort();
            keys
        }
        _ if old == new => Vec::new(),
        _ => vec!["*".into()],
    }
}

/// The error of a pass whose end could not be recorded ([`start_run`]).
const UNRECORDED_END: &str =
    "the pass's end could not be recorded (closed when the next pass of the business started)";

/// Registers a sync pass; returns its `sync_runs` id.
pub fn start_run(conn: &Connection, business_id: &str, kind: &str, now: &str) -> Result<i64> {
    // A pass of the business still `running` is one whose end could not be
    // recorded (the mirror busy or failing when it finished): passes of one
    // business never overlap (the queue; across processes, the database
    // lock). Closed now, it does not read `running` until the next start.
    // Only the business's latest pass can be one (each start closes the one
    // before; the start of the process closes all): one index probe.
    conn.execute(
        "UPDATE sync_runs SET outcome = 'error', finished_at = ?2,
             error = coalesce(error || '; ', '') || ?3
          WHERE id = (SELECT max(id) FROM sync_runs WHERE business_id = ?1)
            AND outcome = 'running'",
        params![business_id, now, UNRECORDED_END],
    )?;
    conn.execute(
        "INSERT INTO sync_runs (business_id, kind, started_at) VALUES (?1, ?2, ?3)",
        params![business_id, kind, now],
    )?;
    let id = conn.last_insert_rowid();
    conn.execute(
        "UPDATE businesses SET last_sync_started_at = ?2 WHERE business_id = ?1",
        params![business_id, now],
    )?;
    Ok(id)
}

/// The totals of a sync pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunStats {
    pub pages: i64,
    pub seen: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub missing: i64,
    pub skipped: i64,
    /// The last page was full and carried no marker: the listing may go on,
    /// so nothing was marked missing.
    pub end_unknown: bool,
}

impl RunStats {
    /// Adds one page's counts.
    pub fn add_page(&mut self, p: PageStats, skipped: i64) {
        self.pages += 1;
        self.seen += p.inserted + p.updated + p.unchanged;
        self.inserted += p.inserted;
        self.updated += p.updated;
        self.unchanged += p.unchanged;
        self.skipped += skipped;
    }
}

/// How a sync pass ended, for its `sync_runs` row.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd<'a> {
    pub kind: &'a str,
    pub stats: &'a RunStats,
    /// The pass failed with this error (`outcome` = `error`).
    pub error: Option<&'a str>,
    /// The pass succeeded with this remark (`outcome` = `ok`, kept in `error`),
    /// e.g. a listing whose end was unknown.
    pub note: Option<&'a str>,
    /// The pagination style seen (`next`, `token`, `offset`, `single`).
    pub pagination: Option<&'a str>,
    /// The leads the pass's listing confirmed (`listed_at`, `listed_ids`).
    pub covered: Covered<'a>,
    pub now: &'a str,
}

/// Closes a sync pass: its `sync_runs` row and the business's summary.
pub fn finish_run(
    conn: &mut Connection,
    run_id: i64,
    business_id: &str,
    end: &RunEnd<'_>,
) -> Result<()> {
    let tx = conn.transaction()?;
    let outcome = if end.error.is_some() { "error" } else { "ok" };
    let stats = end.stats;
    let (confirms, ids): (bool, Option<Vec<u8>>) = match end.covered {
        Covered::Nothing => (false, None),
        Covered::Every => (true, None),
        Covered::These([]) => (false, None),
        Covered::These(ids) => (
            true,
            Some(
                ids.iter()
                    .take(MAX_COVERED_IDS)
                    .flat_map(|id| id.to_le_bytes())
                    .collect(),
            ),
        ),
    };
    // `listed_at` is the pass's start: every page was asked for after it.
    tx.execute(
        "UPDATE sync_runs SET finished_at = ?2, outcome = ?3, pages = ?4, seen = ?5, inserted = ?6,
             updated = ?7, unchanged = ?8, missing = ?9, skipped = ?10, error = ?11, pagination = ?12,
             listed_at = CASE WHEN ?13 THEN started_at END, listed_ids = ?14
         WHERE id = ?1",
        params![
            run_id,
            end.now,
            outcome,
            stats.pages,
            stats.seen,
            stats.inserted,
            stats.updated,
            stats.unchanged,
            stats.missing,
            stats.skipped,
            end.error.or(end.note),
            end.pagination,
            confirms,
            ids
        ],
    )?;
    tx.execute(
        "UPDATE businesses SET last_sync_finished_at = ?2, last_sync_outcome = ?3, last_error = ?4,
             last_sync_kind = ?5,
             last_full_sync_at = CASE WHEN ?5 = 'full' AND ?3 = 'ok' THEN ?2 ELSE last_full_sync_at END
         WHERE business_id = ?1",
        params![business_id, end.now, outcome, end.error, end.kind],
    )?;
    tx.commit()?;
    Ok(())
}

/// Records a pass that did not run (the business needs re-authorization).
pub fn record_skipped_run(
    conn: &mut Connection,
    business_id: &str,
    kind: &str,
    reason: &str,
    now: &str,
) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO sync_runs (business_id, kind, started_at, finished_at, outcome, error)
         VALUES (?1, ?2, ?3, ?3, 'skipped', ?4)",
        params![business_id, kind, now, reason],
    )?;
    tx.execute(
        "UPDATE businesses SET last_sync_started_at = ?2, last_sync_finished_at = ?2,
             last_sync_outcome = 'error', last_error = ?3, last_sync_kind = ?4
         WHERE business_id = ?1",
        params![business_id, now, reason, kind],
    )?;
    tx.commit()?;
    Ok(())
}

/// A full scan may not newly mark more than this many leads missing, when
/// they are also more than half of the business's present leads, without
/// `--accept-missing` (SPEC §5, "Mass-missing guard").
pub const MASS_MISSING_MIN: i64 = 20;

/// What [`mark_missing`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// This many leads were newly marked missing.
    Marked(i64),
    /// Nothing was marked: `would` of the `present` leads would have gone
    /// missing at once, which looks like a truncated listing.
    Refused { would: i64, present: i64 },
}

/// After a successful full scan: marks the business's leads whose id
/// fingerprint the scan did not see as missing (with a change row each,
/// observed `now`), unless that would be a mass disappearance and
/// `accept_mass` is false. Leads observed otherwise since the scan started,
/// or within [`LISTING_MARGIN`] before, are left present ([`unlisted`]),
/// but count towards that guard: every lead the listing lacked does.
/// `missing_since` is the scan's start, when its listing began: the page
/// that would have listed a lead was asked for no earlier (as a pass's
/// `listed_at`), so a delivery of a later event is not older than the
/// listing that found the lead gone ([`upsert_lead`]).
pub fn mark_missing(
    conn: &mut Connection,
    business_id: &str,
    run_id: i64,
    seen: &Fingerprints,
    accept_mass: bool,
    now: &str,
) -> Result<Missing> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (present, would, missing, listed_from) = unlisted(&tx, business_id, run_id, seen, now)?;
    if !accept_mass && would > MASS_MISSING_MIN && would * 2 > present {
        return Ok(Missing::Refused { would, present });
    }
    {
        let mut status_of =
            tx.prepare_cached("SELECT status FROM negotiations WHERE negotiation_id = ?1")?;
        let mut mark = tx.prepare_cached(
            "UPDATE negotiations SET missing_since = ?2 WHERE negotiation_id = ?1",
        )?;
        let mut change = tx.prepare_cached(
            "INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind,
                 old_status, new_status, sync_run_id)
             VALUES (?1, ?2, ?3, 'missing', ?4, ?4, ?5)",
        )?;
        for id in &missing {
            let status = status_of.query_row([id], |r| Ok(value_text(r.get_ref(0)?)))?;
            mark.execute(params![id, listed_from])?;
            change.execute(params![id, business_id, now, status, run_id])?;
        }
    }
    tx.commit()?;
    Ok(Missing::Marked(missing.len() as i64))
}

/// How many of the business's present leads (known before the pass started)
/// a full scan did not list: what [`mark_missing`] would mark. Read only.
pub fn count_unseen(
    conn: &Connection,
    business_id: &str,
    run_id: i64,
    seen: &Fingerprints,
    now: &str,
) -> Result<i64> {
    Ok(unlisted(conn, business_id, run_id, seen, now)?.2.len() as i64)
}

/// How many present leads the business had before the pass started
/// ([`UNLISTED`], from the index alone), how many of them `seen` does not
/// have (all of them: what the mass-missing guard weighs, a truncated
/// listing being no less truncated for the leads seen otherwise), the ids
/// of those not observed otherwise since then, or delivered within
/// [`LISTING_MARGIN`] before ([`OBSERVED_SINCE`]), and the pass's start
/// (`sync_runs.started_at`; `now` when the run has no row).
fn unlisted(
    conn: &Connection,
    business_id: &str,
    run_id: i64,
    seen: &Fingerprints,
    now: &str,
) -> Result<(i64, i64, Vec<rusqlite::types::Value>, String)> {
    let started: String = conn
        .prepare_cached("SELECT started_at FROM sync_runs WHERE id = ?1")?
        .query_row([run_id], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten()
        .unwrap_or_else(|| now.to_string());
    // In leadsync's form, as the columns compared with it; a start that
    // cannot be read is compared as it is, without the margin.
    let since = crate::time::parse(&started)
        .and_then(|t| t.checked_sub_signed(LISTING_MARGIN))
        .map_or_else(|| started.clone(), crate::time::fmt);
    let mut stmt = conn.prepare_cached(UNLISTED)?;
    let mut observed = conn.prepare_cached(OBSERVED_SINCE)?;
    // The mark's time, or the clock's now (inside the mark's transaction),
    // before the scan's start: the clock went back during the scan, and a
    // lead stamped after the start may have been first seen (or observed)
    // during it: only those first seen before the start count, as ever.
    let clock = crate::time::now();
    let after = if now >= started.as_str() && clock >= started {
        crate::time::far_ahead()
    } else {
        "~".to_string()
    };
    let mut rows = stmt.query(params![business_id, started, after])?;
    let (mut present, mut unseen, mut ids) = (0, 0, Vec::new());
    while let Some(r) = rows.next()? {
        present += 1;
        // An id the partner's program rewrote as a blob (or a number) is
        // compared by its text, and that very row (its own value) is the
        // one marked: read as text only, it failed every full scan.
        let raw = r.get_ref(0)?;
        let listed = match raw {
            rusqlite::types::ValueRef::Text(t) if std::str::from_utf8(t).is_ok() => {
                seen.contains(&id_fingerprint(raw.as_str()?))
            }
            other => value_text(other).is_some_and(|t| seen.contains(&id_fingerprint(&t))),
        };
        if listed {
            continue;
        }
        unseen += 1;
        let id = match raw {
            rusqlite::types::ValueRef::Null => rusqlite::types::Value::Null,
            rusqlite::types::ValueRef::Integer(i) => rusqlite::types::Value::Integer(i),
            rusqlite::types::ValueRef::Real(f) => rusqlite::types::Value::Real(f),
            rusqlite::types::ValueRef::Text(t) => {
                rusqlite::types::Value::Text(String::from_utf8_lossy(t).into_owned())
            }
            rusqlite::types::ValueRef::Blob(b) => rusqlite::types::Value::Blob(b.to_vec()),
        };
        if !observed
            .query_row(params![id, started, since, after], |r| {
                r.get::<_, Option<bool>>(0)
            })?
            .unwrap_or(false)
        {
            ids.push(id);
        }
    }
    Ok((present, unseen, ids, started))
}

/// Makes the `businesses` table match the configuration (rows are never
/// deleted: a business removed from the configuration keeps its history).
/// Only rows that differ are written, so a reload that adds one business to
/// ten thousand writes one row.
pub fn upsert_businesses(conn: &mut Connection, businesses: &[Business]) -> Result<usize> {
    // IMMEDIATE: it reads before it writes, and a transaction that already
    // read gets "database is locked" at once, without the busy timeout,
    // when another connection holds the write lock (a reload changing a
    // business failed at once while another program wrote to the mirror).
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut written = 0;
    {
        let mut current: std::collections::HashMap<String, (Option<String>, bool, bool)> =
            std::collections::HashMap::new();
        let mut stmt =
            tx.prepare("SELECT business_id, name, enabled, configured FROM businesses")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)? == 1,
                    r.get::<_, i64>(3)? == 1,
                ),
            ))
        })?;
        for row in rows {
            let (id, state) = row?;
            current.insert(id, state);
        }
        let mut upsert = tx.prepare(
            "INSERT INTO businesses (business_id, name, enabled, configured) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT (business_id) DO UPDATE SET name = excluded.name,
                 enabled = excluded.enabled, configured = 1",
        )?;
        for b in businesses {
            match current.remove(&b.id) {
                Some((name, enabled, true)) if name == b.name && enabled == b.enabled => {}
                _ => {
                    upsert.execute(params![b.id, b.name, b.enabled])?;
                    written += 1;
                }
            }
        }
        let mut unconfigure =
            tx.prepare("UPDATE businesses SET configured = 0 WHERE business_id = ?1")?;
        for (id, (_, _, configured)) in current {
            if configured {
                unconfigure.execute([id])?;
                written += 1;
            }
        }
    }
    tx.commit()?;
    Ok(written)
}

/// Sets or clears a business's `needs_reauth` flag.
pub fn set_needs_reauth(
    conn: &Connection,
    business_id: &str,
    reason: Option<&str>,
    now: &str,
) -> Result<()> {
    match reason {
        Some(reason) => conn.execute(
            "INSERT INTO businesses (business_id, needs_reauth, needs_reauth_since, needs_reauth_reason)
             VALUES (?1, 1, ?2, ?3)
             ON CONFLICT (business_id) DO UPDATE SET needs_reauth = 1,
                 needs_reauth_since = COALESCE(needs_reauth_since, excluded.needs_reauth_since),
                 needs_reauth_reason = excluded.needs_reauth_reason",
            params![business_id, now, reason],
        )?,
        None => conn.execute(
            "UPDATE businesses SET needs_reauth = 0, needs_reauth_since = NULL, needs_reauth_reason = NULL
             WHERE business_id = ?1 AND needs_reauth = 1",
            params![business_id],
        )?,
    };
    Ok(())
}

/// Sets (keeping its first `since`) or clears an auth alert.
pub fn set_auth_alert(
    conn: &Connection,
    key: &str,
    message: Option<&str>,
    now: &str,
) -> Result<()> {
    match message {
        Some(m) => conn.execute(
            "INSERT INTO auth_alerts (alert_key, message, since) VALUES (?1, ?2, ?3)
             ON CONFLICT (alert_key) DO UPDATE SET message = excluded.message",
            params![key, m, now],
        )?,
        None => conn.execute("DELETE FROM auth_alerts WHERE alert_key = ?1", [key])?,
    };
    Ok(())
}

/// Every auth alert (message, since), oldest first; the running daemon's
/// own alerts ([`set_daemon_alert`]) are not among them.
pub fn auth_alerts(conn: &Connection) -> Result<Vec<(String, String)>> {
    alerts(conn, false)
}

/// The alerts (message, since), oldest first: the daemon's own
/// (`daemon:` keys) or every other one.
fn alerts(conn: &Connection, daemon: bool) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT message, since FROM auth_alerts WHERE (alert_key LIKE 'daemon:%') = ?1
          ORDER BY since, alert_key",
    )?;
    let rows = stmt
        .query_map([daemon], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Sets (keeping its first `since`) or clears one of the running daemon's
/// alerts: a condition of the process (not of OAuth) that `status` must
/// show, such as a failed sync of the database to disk. They share the
/// `auth_alerts` table, under keys `daemon:<key>`.
pub fn set_daemon_alert(
    conn: &Connection,
    key: &str,
    message: Option<&str>,
    now: &str,
) -> Result<()> {
    set_auth_alert(conn, &format!("daemon:{key}"), message, now)
}

/// Clears every daemon alert: a daemon starting has none of the last one's
/// conditions (they belong to its process).
pub fn clear_daemon_alerts(conn: &Connection) -> Result<usize> {
    Ok(conn.execute(
        "DELETE FROM auth_alerts WHERE alert_key LIKE 'daemon:%'",
        [],
    )?)
}

/// The daemon's alerts (message, since), oldest first.
pub fn daemon_alerts(conn: &Connection) -> Result<Vec<(String, String)>> {
    alerts(conn, true)
}

/// Closes the `running` passes of one business (its pass died of a panic
/// while the process goes on); returns how many.
pub fn interrupt_running_of(
    conn: &Connection,
    business_id: &str,
    now: &str,
    why: &str,
) -> Result<usize> {
    let n = conn.execute(
        "UPDATE sync_runs SET outcome = 'error', finished_at = ?1, error = ?2
          WHERE outcome = 'running' AND business_id = ?3",
        params![now, why, business_id],
    )?;
    conn.execute(
        "UPDATE businesses SET last_sync_outcome = 'error', last_error = ?2, last_sync_finished_at = ?1
          WHERE business_id = ?3 AND last_sync_started_at IS NOT NULL
            AND (last_sync_finished_at IS NULL OR last_sync_finished_at < last_sync_started_at)",
        params![now, why, business_id],
    )?;
    Ok(n)
}

/// Closes passes left `running` by a process that stopped; returns how many.
pub fn interrupt_running(conn: &Connection, now: &str, why: &str) -> Result<usize> {
    let n = conn.execute(
        "UPDATE sync_runs SET outcome = 'error', finished_at = ?1, error = ?2 WHERE outcome = 'running'",
        params![now, why],
    )?;
    conn.execute(
        "UPDATE businesses SET last_sync_outcome = 'error', last_error = ?2, last_sync_finished_at = ?1
          WHERE last_sync_started_at IS NOT NULL
            AND (last_sync_finished_at IS NULL OR last_sync_finished_at < last_sync_started_at)",
        params![now, why],
    )?;
    Ok(n)
}

/// Which business a lead belongs to, when the mirror has it.
pub fn business_of(conn: &Connection, negotiation_id: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT business_id FROM negotiations WHERE negotiation_id = ?1",
            [negotiation_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Businesses flagged `needs_reauth`, with the reason (business id → reason).
pub fn needs_reauth_map(conn: &Connection) -> Result<std::collections::HashMap<String, String>> {
    let mut stmt = conn.prepare(
        "SELECT business_id, COALESCE(needs_reauth_reason, 'needs re-authorization')
           FROM businesses WHERE needs_reauth = 1",
    )?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Businesses that never had a successful full scan.
pub fn never_fully_synced(conn: &Connection) -> Result<std::collections::HashSet<String>> {
    let mut stmt =
        conn.prepare("SELECT business_id FROM businesses WHERE last_full_sync_at IS NULL")?;
    let rows = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opcodes SQLite compiles a statement to.
    fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
        explained(conn, &format!("EXPLAIN {sql}"), 1)
    }

    /// One text column of an `EXPLAIN` or `EXPLAIN QUERY PLAN`, row by row.
    fn explained(conn: &Connection, explain: &str, column: usize) -> Vec<String> {
        let mut stmt = conn.prepare(explain).unwrap();
        // Unbound parameters are NULL: EXPLAIN only compiles.
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            out.push(r.get::<_, String>(column).unwrap());
        }
        out
    }

    #[test]
    fn a_change_row_is_written_without_building_a_temporary_table() {
        // `kind IN (four constants)` in the CHECK and `IN (three)` in the
        // news index's predicate each filled an ephemeral table per row
        // (~15% of a first full sync's CPU) before schema 10.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ops = opcodes(&conn, INSERT_CHANGE);
        assert!(
            !ops.iter().any(|op| op == "OpenEphemeral"),
            "INSERT INTO negotiation_changes builds a temporary table: {ops:?}"
        );
        // The CHECK still refuses an unknown kind.
        let bad = conn.execute(
            "INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind)
             VALUES ('1', 'b', 't', 'gone')",
            [],
        );
        assert!(bad.is_err(), "an unknown kind was accepted");
    }

    #[test]
    fn what_a_full_scan_reads_of_its_business_comes_from_one_index_alone() {
        // Through negotiations_by_business each of these read every lead's
        // table row: ~40% of an unchanged re-sync's CPU before schema 11.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let plans = |conn: &Connection| {
            for sql in [KNOWN_COUNT, KNOWN_LEADS, UNLISTED] {
                let plan = explained(conn, &format!("EXPLAIN QUERY PLAN {sql}"), 3);
                assert!(
                    plan.iter()
                        .any(|p| p.contains("COVERING INDEX negotiations_present_by_business")),
                    "{sql}: {plan:?}"
                );
            }
        };
        plans(&conn);
        // Chosen by the planner (no INDEXED BY, which fails the query when
        // the index is gone), also once a user ran ANALYZE: one business
        // of many leads, a few of them missing.
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
             INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                 first_seen_at, last_seen_at, changed_at, missing_since)
             SELECT i, 'b' || (i % 3), '{}', i, 't', 't', 't', CASE WHEN i % 10 = 0 THEN 't' END
               FROM n;
             ANALYZE;",
        )
        .unwrap();
        plans(&conn);
    }

    #[test]
    fn a_full_scan_still_reads_its_business_when_the_index_was_dropped() {
        // A user's maintenance (or a partner's tool) may drop or rename an
        // index: the pass is slower, never failing for good.
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(
            "INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                 first_seen_at, last_seen_at, changed_at, missing_since) VALUES
             ('1', 'b', '{}', 7, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z',
              '2026-01-01T00:00:00.000Z', NULL),
             ('2', 'b', '{}', 7, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z',
              '2026-01-01T00:00:00.000Z', NULL);
             DROP INDEX negotiations_present_by_business;",
        )
        .unwrap();
        assert_eq!(known_leads(&conn, "b").unwrap().len(), 2);
        let now = "2026-01-02T00:00:00.000Z";
        let seen: Fingerprints = [id_fingerprint("1")].into_iter().collect();
        assert_eq!(count_unseen(&conn, "b", 0, &seen, now).unwrap(), 1);
        mark_missing(&mut conn, "b", 0, &seen, true, now).unwrap();
        let missing: i64 = conn
            .query_row(
                "SELECT count(*) FROM negotiations WHERE missing_since IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(missing, 1);
    }

    #[test]
    fn fingerprint_sets_tell_apart_keys_that_differ_in_any_bits() {
        // Keys equal in their low bits, then in their high bits: each a
        // set's own member, none another's.
        let keys: Vec<u64> = (1..5000u64)
            .flat_map(|i| [i << 40, i, i * 0x1_0001])
            .collect();
        let mut set = Fingerprints::default();
        for &k in &keys {
            assert!(set.insert(k), "{k} inserted once");
        }
        assert_eq!(set.len(), keys.len());
        assert!(keys.iter().all(|k| set.contains(k)));
        assert!(!set.contains(&(5000 << 40)) && !set.contains(&0));
        // Byte strings hash by content and length.
        let hash = |b: &[u8]| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = FingerprintHasher::default().build_hasher();
            h.write(b);
            h.finish()
        };
        assert_ne!(hash(b"ab"), hash(b"ab\0"));
        assert_eq!(hash(b"negotiation"), hash(b"negotiation"));
    }

    #[test]
    fn known_leads_say_unchanged_only_what_upsert_lead_would_leave_alone() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(
            "INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                 first_seen_at, last_seen_at, changed_at, missing_since) VALUES
             ('fresh', 'b', '{}', 7, 't', '2026-01-01T12:00:00.000Z', 't', NULL),
             ('stale', 'b', '{}', 7, 't', '2026-01-01T10:59:59.999Z', 't', NULL),
             ('missing', 'b', '{}', 7, 't', '2026-01-01T12:00:00.000Z', 't', '2026-01-01T11:00:00.000Z'),
             ('odd time', 'b', '{}', 7, 't', '2026-01-01 12:00:00', 't', NULL),
             ('blob hash', 'b', '{}', x'07', 't', '2026-01-01T12:00:00.000Z', 't', NULL),
             ('other business', 'c', '{}', 7, 't', '2026-01-01T12:00:00.000Z', 't', NULL),
             ('future', 'b', '{}', 7, 't', '9000-01-01T00:00:00.000Z', 't', NULL);",
        )
        .unwrap();
        let known = known_leads(&conn, "b").unwrap();
        let stale_before = "2026-01-01T11:00:00.000Z";
        let unchanged = |id: &str, hash: i64| {
            known
                .get(&id_fingerprint(id))
                .is_some_and(|k| k.unchanged(hash, stale_before))
        };
        assert!(unchanged("fresh", 7));
        assert!(!unchanged("fresh", 8), "another payload");
        assert!(!unchanged("stale", 7), "last_seen_at is due");
        assert!(!unchanged("missing", 7), "it reappears");
        assert!(!unchanged("odd time", 7), "a form leadsync does not write");
        // Seen "in the future": written under a clock ahead, since
        // corrected; rewritten (it used to stay until the clock caught up).
        assert!(!unchanged("future", 7), "last_seen_at is after now");
        assert!(!known.contains_key(&id_fingerprint("blob hash")));
        assert!(!known.contains_key(&id_fingerprint("other business")));
        // A missing lead is not known: its listing takes the ordinary path.
        assert!(!known.contains_key(&id_fingerprint("missing")));
        assert_eq!(known.len(), 4);
    }

    #[test]
    fn instant_keys_order_like_the_texts_and_refuse_other_forms() {
        let texts = [
            "0999-12-31T23:59:59.999Z",
            "2026-01-01T10:59:59.999Z",
            "2026-01-01T11:00:00.000Z",
            "2026-01-01T11:00:00.001Z",
            "2026-12-01T00:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
        ];
        for a in texts {
            for b in texts {
                let (ka, kb) = (instant_key(a.as_bytes()), instant_key(b.as_bytes()));
                assert_eq!(ka.cmp(&kb), a.cmp(b), "{a} / {b}");
            }
        }
        for odd in [
            "2026-01-01 11:00:00.000Z",
            "2026-01-01T11:00:00.000+",
            "2026-01-01T11:00:00Z",
            "+10000-01-01T00:00:00.000Z",
            "2026-01-01T1a:00:00.000Z",
        ] {
            assert_eq!(instant_key(odd.as_bytes()), None, "{odd}");
        }
    }

    /// A poll's page of business 12, read and written at the new year.
    fn poll_of_business_12() -> PageContext {
        PageContext {
            business_id: "12".into(),
            run_id: None,
            source: Source::Poll,
            now: "2026-01-01T00:00:00.000Z".into(),
            stale_before: "2025-12-31T23:00:00.000Z".into(),
            insert_first: false,
            read_at: Some("2026-01-01T00:00:00.000Z".into()),
        }
    }

    /// The partner's program edited mirrored rows with values of types
    /// leadsync never writes (SQLite keeps a text in an INTEGER column, and
    /// a blob anywhere; a number in a TEXT column becomes text): a hash as
    /// text, a stamp, a business id or a status as a blob. Reading such a
    /// row failed the page's write, so
    /// every pass of the business failed at that page (and every delivery
    /// of the lead), for good. The listing now writes the lead as it
    /// would any changed one, and nothing fails.
    #[test]
    fn a_row_the_partner_edited_with_values_of_other_types_does_not_fail_the_page() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ctx = poll_of_business_12();
        let lead = |id: &str, status: &str| {
            let payload = format!(r#"{{"negotiationID":"{id}","status":"{status}"}}"#);
            LeadRow {
                negotiation_id: id.into(),
                hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
                payload,
                status: Some(status.into()),
                ..LeadRow::default()
            }
        };
        let ids = ["hash", "seen", "business", "status"];
        let page: Vec<LeadRow> = ids.iter().map(|id| lead(id, "Open")).collect();
        write_page(&mut conn, &ctx, &page).unwrap();
        conn.execute_batch(
            "UPDATE negotiations SET payload_hash = 'edited' WHERE negotiation_id = 'hash';
             UPDATE negotiations SET last_seen_at = X'30' WHERE negotiation_id = 'seen';
             UPDATE negotiations SET business_id = X'3132' WHERE negotiation_id = 'business';
             UPDATE negotiations SET status = X'31' WHERE negotiation_id = 'status';",
        )
        .unwrap();
        // Listed as they were, then changed: neither write fails.
        write_page(&mut conn, &ctx, &page).unwrap();
        let changed: Vec<LeadRow> = ids.iter().map(|id| lead(id, "Hired")).collect();
        let stats = write_page(&mut conn, &ctx, &changed).unwrap();
        assert_eq!(stats.updated, 4, "{stats:?}");
        for id in ids {
            let (business, status, hash_type, seen_type): (String, String, String, String) = conn
                .query_row(
                    "SELECT business_id, status, typeof(payload_hash), typeof(last_seen_at)
                       FROM negotiations WHERE negotiation_id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .unwrap();
            assert_eq!(
                (
                    business.as_str(),
                    status.as_str(),
                    hash_type.as_str(),
                    seen_type.as_str()
                ),
                ("12", "Hired", "integer", "text"),
                "{id}"
            );
        }
        // The change rows name what the row held, read as text.
        let kinds: i64 = conn
            .query_row(
                "SELECT count(*) FROM negotiations
                  WHERE typeof(business_id) = 'text' AND typeof(status) = 'text'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kinds, 4);
        let old: Option<String> = conn
            .query_row(
                "SELECT old_status FROM negotiation_changes
                  WHERE negotiation_id = 'status' AND new_status = 'Hired'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old.as_deref(), Some("1"));
    }

    /// A row the partner's program rewrote with the same values in other
    /// types: the business id `12` as the blob X'3132', the payload hash as
    /// a text (or an integer that is not the payload's hash). A listing of
    /// the lead as it was wrote a `changed` row for the blob business (the
    /// same business, read as another one; `changed_fields` []), and never
    /// rewrote the hash, so every pass paid a read of the payload and a
    /// JSON comparison for the lead, for good. Now the business is compared
    /// by its bytes and both are written back in their own types, with no
    /// change row.
    #[test]
    fn a_listing_rewrites_values_of_other_types_without_a_change_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ctx = poll_of_business_12();
        let lead = |id: &str| {
            let payload = format!(r#"{{"negotiationID":"{id}","status":"Open"}}"#);
            LeadRow {
                negotiation_id: id.into(),
                hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
                payload,
                status: Some("Open".into()),
                ..LeadRow::default()
            }
        };
        let ids = ["business", "text-hash", "real-hash", "wrong-hash", "all"];
        let page: Vec<LeadRow> = ids.iter().map(|id| lead(id)).collect();
        write_page(&mut conn, &ctx, &page).unwrap();
        conn.execute_batch(
            "UPDATE negotiations SET business_id = X'3132'
              WHERE negotiation_id IN ('business', 'all');
             UPDATE negotiations SET payload_hash = 'edited'
              WHERE negotiation_id IN ('text-hash', 'all');
             UPDATE negotiations SET payload_hash = 1.5 WHERE negotiation_id = 'real-hash';
             UPDATE negotiations SET payload_hash = 7 WHERE negotiation_id = 'wrong-hash';",
        )
        .unwrap();
        let stats = write_page(&mut conn, &ctx, &page).unwrap();
        assert_eq!((stats.updated, stats.unchanged), (0, 5), "{stats:?}");
        let changes: i64 = conn
            .query_row(
                "SELECT count(*) FROM negotiation_changes WHERE kind <> 'new'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(changes, 0, "a listing alone creates no change row");
        for l in &page {
            let (business, hash): (rusqlite::types::Value, rusqlite::types::Value) = conn
                .query_row(
                    "SELECT business_id, payload_hash FROM negotiations WHERE negotiation_id = ?1",
                    [&l.negotiation_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(
                (business, hash),
                (
                    rusqlite::types::Value::Text("12".into()),
                    rusqlite::types::Value::Integer(l.hash)
                ),
                "{}",
                l.negotiation_id
            );
        }
        // Written back once: the full scan's known leads hold them again
        // (a lead known unchanged takes no query at all).
        let known = known_leads(&conn, "12").unwrap();
        for l in &page {
            assert!(
                known
                    .get(&id_fingerprint(&l.negotiation_id))
                    .is_some_and(|k| k.unchanged(l.hash, &ctx.stale_before)),
                "{}",
                l.negotiation_id
            );
        }
    }

    /// A webhook delivery older than a listing that confirmed the mirrored
    /// copy is kept out ([`listed_since`]), also when the partner's program
    /// rewrote the row's business id as a blob: that business was read as
    /// no business, the listings were not asked, and the older copy was
    /// written over the newer one.
    #[test]
    fn a_delivery_older_than_a_listing_is_kept_out_when_the_business_is_a_blob() {
        let mut m = Ordering::open_listed();
        m.pass("b", "head", T3, &[lead_row("1", "Open")], None);
        m.conn
            .execute(
                "UPDATE negotiations SET business_id = X'62' WHERE negotiation_id = '1'",
                [],
            )
            .unwrap();
        let done = m.deliver("b", &lead_row("1", "Canceled"), T1);
        assert_eq!(done, Upserted::Kept { identical: false });
        assert_eq!(m.status("1"), "Open");
        assert_eq!(changes_of(&m, "1"), 0);
    }

    /// The hash written back over a partner's retyped one is the hash of the
    /// payload the row keeps, not of the copy kept out: a row whose
    /// `payload_hash` is not its payload's would be compared wrongly for
    /// good (an unchanged listing taken for a change, or the reverse).
    #[test]
    fn a_kept_out_delivery_over_a_retyped_hash_writes_back_the_kept_payloads_hash() {
        let mut m = Ordering::open_listed();
        m.pass("b", "head", T3, &[lead_row("1", "Open")], None);
        m.conn
            .execute(
                "UPDATE negotiations SET payload_hash = 'partner' WHERE negotiation_id = '1'",
                [],
            )
            .unwrap();
        let done = m.deliver("b", &lead_row("1", "Canceled"), T1);
        assert_eq!(done, Upserted::Kept { identical: false });
        let (payload, hash, kind): (String, i64, String) = m
            .conn
            .query_row(
                "SELECT payload, payload_hash, typeof(payload_hash) FROM negotiations
                  WHERE negotiation_id = '1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(kind, "integer");
        assert_eq!(hash, xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64);
        assert_eq!(m.status("1"), "Open");
        assert_eq!(changes_of(&m, "1"), 0);
    }

    /// A pass whose end could not be recorded (the mirror locked by the
    /// partner's program past the busy timeout when it finished) left its
    /// `sync_runs` row `running` for as long as the daemon ran: a query for
    /// running passes showed it, and it was never pruned. The business's
    /// next pass closes it (passes of one business never overlap, in one
    /// process or across them: the database lock).
    #[test]
    fn a_pass_whose_end_was_not_recorded_is_closed_by_the_next_pass_of_its_business() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let lost = start_run(&conn, "b", "full", "2026-01-01T00:00:00.000Z").unwrap();
        let other = start_run(&conn, "c", "head", "2026-01-01T00:00:00.000Z").unwrap();
        let next = start_run(&conn, "b", "head", "2026-01-01T00:05:00.000Z").unwrap();
        let row = |id: i64| -> (String, Option<String>, Option<String>) {
            conn.query_row(
                "SELECT outcome, finished_at, error FROM sync_runs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
        };
        let (outcome, finished, error) = row(lost);
        assert_eq!(
            (outcome.as_str(), finished.as_deref()),
            ("error", Some("2026-01-01T00:05:00.000Z"))
        );
        assert!(error.unwrap().contains("could not be recorded"));
        assert_eq!(row(other).0, "running", "another business's pass");
        assert_eq!(row(next).0, "running");
    }

    #[test]
    fn a_page_written_insert_first_falls_back_for_leads_mirrored_after_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ctx = |business: &str, insert_first| PageContext {
            business_id: business.into(),
            run_id: None,
            source: Source::Poll,
            now: "2026-01-01T00:00:00.000Z".into(),
            stale_before: "2025-12-31T23:00:00.000Z".into(),
            insert_first,
            read_at: None,
        };
        let lead = |id: &str, payload: &str| LeadRow {
            negotiation_id: id.into(),
            payload: payload.into(),
            hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
            status: Some("Open".into()),
            ..LeadRow::default()
        };
        // Mirrored meanwhile (a webhook, another business's listing).
        write_page(&mut conn, &ctx("b", false), &[lead("same", r#"{"a":1}"#)]).unwrap();
        write_page(&mut conn, &ctx("b", false), &[lead("edited", r#"{"a":1}"#)]).unwrap();
        write_page(&mut conn, &ctx("c", false), &[lead("moved", r#"{"a":1}"#)]).unwrap();
        let page = [
            lead("new", r#"{"a":1}"#),
            lead("same", r#"{"a":1}"#),
            lead("edited", r#"{"a":2}"#),
            lead("moved", r#"{"a":1}"#),
        ];
        assert_eq!(
            write_page(&mut conn, &ctx("b", true), &page).unwrap(),
            PageStats {
                inserted: 1,
                updated: 2,
                unchanged: 1
            }
        );
        let rows: Vec<(String, String, String)> = conn
            .prepare(
                "SELECT negotiation_id, business_id, payload FROM negotiations ORDER BY negotiation_id",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let row = |id: &str, b: &str, p: &str| (id.to_string(), b.to_string(), p.to_string());
        assert_eq!(
            rows,
            [
                row("edited", "b", r#"{"a":2}"#),
                row("moved", "b", r#"{"a":1}"#),
                row("new", "b", r#"{"a":1}"#),
                row("same", "b", r#"{"a":1}"#),
            ]
        );
        let changes: Vec<(String, String)> = conn
            .prepare("SELECT negotiation_id, kind FROM negotiation_changes ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let change = |id: &str, k: &str| (id.to_string(), k.to_string());
        assert_eq!(
            changes,
            [
                change("same", "new"),
                change("edited", "new"),
                change("moved", "new"),
                change("new", "new"),
                change("edited", "changed"),
                change("moved", "changed"),
            ]
        );
    }

    /// How many inserts a partner's BEFORE INSERT trigger (on `table`, as
    /// they wrote it) saw when a lead mirrored after a scan read its known
    /// leads arrives in a page believed new.
    fn inserts_a_partners_trigger_saw(table: &str) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE partner_feed (negotiation_id TEXT);
             CREATE TRIGGER partner_feed_new BEFORE INSERT ON {table}
             BEGIN INSERT INTO partner_feed VALUES (NEW.negotiation_id); END;"
        ))
        .unwrap();
        let ctx = |insert_first| PageContext {
            business_id: "b".into(),
            run_id: None,
            source: Source::Poll,
            now: "2026-01-01T00:00:00.000Z".into(),
            stale_before: "2025-12-31T23:00:00.000Z".into(),
            insert_first,
            read_at: None,
        };
        let lead = |payload: &str| LeadRow {
            negotiation_id: "1".into(),
            payload: payload.into(),
            hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
            ..LeadRow::default()
        };
        write_page(&mut conn, &ctx(false), &[lead(r#"{"a":1}"#)]).unwrap();
        // Mirrored after the scan read its known leads: believed new.
        write_page(&mut conn, &ctx(true), &[lead(r#"{"a":2}"#)]).unwrap();
        conn.query_row("SELECT count(*) FROM partner_feed", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_partners_trigger_on_negotiations_never_sees_an_insert_that_did_nothing() {
        assert_eq!(
            inserts_a_partners_trigger_saw("negotiations"),
            1,
            "one lead was inserted, once"
        );
    }

    #[test]
    fn a_partners_trigger_named_in_another_case_still_turns_insert_first_off() {
        // SQLite names tables case-insensitively and keeps a trigger's
        // table name as it was written.
        assert_eq!(
            inserts_a_partners_trigger_saw("main.\"Negotiations\""),
            1,
            "one lead was inserted, once"
        );
    }

    #[test]
    fn pages_written_together_count_like_pages_written_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ctx = PageContext {
            business_id: "b1".into(),
            run_id: None,
            source: Source::Poll,
            now: "2026-01-01T00:00:00Z".into(),
            stale_before: "2025-12-31T23:00:00Z".into(),
            insert_first: false,
            read_at: None,
        };
        let lead = |id: &str, payload: &str| LeadRow {
            negotiation_id: id.into(),
            payload: payload.into(),
            hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
            ..LeadRow::default()
        };
        let first = vec![lead("1", r#"{"a":1}"#), lead("2", r#"{"a":2}"#)];
        assert_eq!(
            write_page(&mut conn, &ctx, &first).unwrap(),
            PageStats {
                inserted: 2,
                updated: 0,
                unchanged: 0
            }
        );
        // A lead listed on two pages of one transaction: the second page sees the first's write.
        let pages = vec![
            (
                ctx.clone(),
                vec![lead("1", r#"{"a":1}"#), lead("3", r#"{"a":3}"#)],
            ),
            (
                ctx.clone(),
                vec![lead("3", r#"{"a":4}"#), lead("2", r#"{"a":2}"#)],
            ),
        ];
        assert_eq!(
            write_pages(&mut conn, &pages).unwrap(),
            vec![
                PageStats {
                    inserted: 1,
                    updated: 0,
                    unchanged: 1
                },
                PageStats {
                    inserted: 0,
                    updated: 1,
                    unchanged: 1
                },
            ]
        );
        let kinds: Vec<String> = conn
            .prepare("SELECT kind FROM negotiation_changes ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kinds, ["new", "new", "new", "changed"]);
    }

    /// When a test pass's page was asked for and written.
    struct Page<'a> {
        read_at: Option<&'a str>,
        written: &'a str,
        insert_first: bool,
    }

    /// A mirror of business `b` (and `c`) for the ordering tests below.
    struct Ordering {
        conn: Connection,
        _dir: tempfile::TempDir,
    }

    fn lead_row(id: &str, status: &str) -> LeadRow {
        let payload = format!(r#"{{"negotiationID":"{id}","status":"{status}"}}"#);
        LeadRow {
            negotiation_id: id.into(),
            hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
            payload,
            status: Some(status.into()),
            ..LeadRow::default()
        }
    }

    impl Ordering {
        /// A mirror where a complete listing of business `b` at [`T0`]
        /// showed lead 1 Open.
        fn open_listed() -> Ordering {
            let mut m = Ordering::new();
            m.pass(
                "b",
                "full",
                T0,
                &[lead_row("1", "Open")],
                Some(Covered::Every),
            );
            m
        }

        fn new() -> Ordering {
            let dir = tempfile::tempdir().unwrap();
            let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
            Ordering { conn, _dir: dir }
        }

        /// A pass of `business` started at `at` listing `leads`, covering
        /// what `covered` says (`None`: the leads it listed).
        fn pass(
            &mut self,
            business: &str,
            kind: &str,
            at: &str,
            leads: &[LeadRow],
            covered: Option<Covered<'_>>,
        ) {
            let page = Page {
                read_at: Some(at),
                written: at,
                insert_first: false,
            };
            self.pass_paged(business, kind, at, &page, leads, covered);
        }

        /// [`Ordering::pass`] whose page is asked for, written and
        /// inserted as `page` says.
        fn pass_paged(
            &mut self,
            business: &str,
            kind: &str,
            at: &str,
            page: &Page<'_>,
            leads: &[LeadRow],
            covered: Option<Covered<'_>>,
        ) {
            let run = start_run(&self.conn, business, kind, at).unwrap();
            let ctx = PageContext {
                business_id: business.into(),
                run_id: Some(run),
                source: Source::Poll,
                now: page.written.into(),
                stale_before: "2000-01-01T00:00:00.000Z".into(),
                insert_first: page.insert_first,
                read_at: page.read_at.map(Into::into),
            };
            write_page(&mut self.conn, &ctx, leads).unwrap();
            let ids: Vec<u64> = leads
                .iter()
                .map(|l| id_fingerprint(&l.negotiation_id))
                .collect();
            let end = RunEnd {
                kind,
                stats: &RunStats::default(),
                error: None,
                note: None,
                pagination: None,
                covered: covered.unwrap_or(Covered::These(&ids)),
                now: page.written,
            };
            finish_run(&mut self.conn, run, business, &end).unwrap();
        }

        /// A delivery of `lead` for `business`, triggered at `t`.
        fn deliver(&mut self, business: &str, lead: &LeadRow, t: &str) -> Upserted {
            self.deliver_at(business, lead, t, "2026-01-01T23:00:00.000Z")
        }

        /// [`Ordering::deliver`], written at `now`.
        fn deliver_at(&mut self, business: &str, lead: &LeadRow, t: &str, now: &str) -> Upserted {
            let ctx = PageContext {
                business_id: business.into(),
                run_id: None,
                source: Source::Webhook,
                now: now.into(),
                stale_before: String::new(),
                insert_first: false,
                read_at: None,
            };
            let tx = self.conn.transaction().unwrap();
            let done = upsert_lead(
                &tx,
                &ctx,
                lead,
                Origin::Delivered {
                    triggered_at: Some(t),
                },
            )
            .unwrap();
            tx.commit().unwrap();
            done
        }

        fn column(&self, id: &str, column: &str) -> Option<String> {
            self.conn
                .query_row(
                    &format!("SELECT {column} FROM negotiations WHERE negotiation_id = ?1"),
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        }

        fn status(&self, id: &str) -> String {
            self.conn
                .query_row(
                    "SELECT status FROM negotiations WHERE negotiation_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        }
    }

    const T0: &str = "2026-01-01T10:00:00.000Z";
    const T1: &str = "2026-01-01T11:00:00.000Z";
    const T3: &str = "2026-01-01T13:00:00.000Z";
    const T5: &str = "2026-01-01T15:00:00.000Z";

    fn changes_of(m: &Ordering, id: &str) -> i64 {
        m.conn
            .query_row(
                "SELECT count(*) FROM negotiation_changes WHERE negotiation_id = ?1 AND kind = 'changed'",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// A lead moved from business `a` to `b` on Thumbtack. `b`'s pass, its
    /// page asked for after the move, wrote it as `b`'s; `a`'s full scan
    /// had asked for its page before the move and wrote it later (a full
    /// scan writes its pages some time after reading them, and passes of
    /// different businesses run side by side). That older copy used to
    /// move the lead back to `a`, with a change row, until `b`'s next
    /// listing of it (an old lead: its next full scan) — meanwhile `a`'s
    /// next full scan marked it missing. A page of another business is
    /// written over the mirrored copy only when asked for after that
    /// copy's page was.
    #[test]
    fn a_page_of_another_business_asked_for_before_a_move_does_not_move_the_lead_back() {
        let mut m = Ordering::new();
        m.pass(
            "a",
            "full",
            T0,
            &[lead_row("1", "Open")],
            Some(Covered::Every),
        );
        m.pass("b", "head", T3, &[lead_row("1", "Open")], None);
        assert_eq!(m.column("1", "business_id").as_deref(), Some("b"));
        assert_eq!(changes_of(&m, "1"), 1);
        let older = Page {
            read_at: Some(T1),
            written: T5,
            insert_first: false,
        };
        m.pass_paged(
            "a",
            "full",
            T1,
            &older,
            &[lead_row("1", "Canceled")],
            Some(Covered::Nothing),
        );
        assert_eq!(m.column("1", "business_id").as_deref(), Some("b"));
        assert_eq!(m.status("1"), "Open");
        assert_eq!(changes_of(&m, "1"), 1, "no change row for the older copy");
        // A page of `a` asked for after `b`'s: the lead really moved back.
        let newer = Page {
            read_at: Some("2026-01-01T13:00:00.001Z"),
            written: T5,
            insert_first: false,
        };
        m.pass_paged("a", "head", T3, &newer, &[lead_row("1", "Canceled")], None);
        assert_eq!(m.column("1", "business_id").as_deref(), Some("a"));
        assert_eq!(m.status("1"), "Canceled");
        assert_eq!(changes_of(&m, "1"), 2);
    }

    #[test]
    fn a_listing_read_within_the_margin_after_a_delivery_does_not_roll_it_back() {
        // Open mirrored; a Canceled delivery triggered at t1 is applied; a
        // head scan read 1 s (then 59 s) after t1 still lists Open, as a
        // listing may lag a change: the delivered copy stays, no change row.
        let mut m = Ordering::open_listed();
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T1),
            Upserted::Changed
        );
        for at in ["2026-01-01T11:00:01.000Z", "2026-01-01T11:00:59.999Z"] {
            m.pass("b", "head", at, &[lead_row("1", "Open")], None);
            assert_eq!(m.status("1"), "Canceled", "{at}");
        }
        assert_eq!(changes_of(&m, "1"), 1);
        // A listing read a margin or more after the event is the newer
        // observation: a change listed meanwhile (the lead reopened) lands.
        m.pass(
            "b",
            "head",
            "2026-01-01T11:01:00.000Z",
            &[lead_row("1", "Open")],
            None,
        );
        assert_eq!(m.status("1"), "Open");
        assert_eq!(changes_of(&m, "1"), 2);
    }

    #[test]
    fn a_listing_read_within_the_margin_after_an_event_does_not_keep_its_delivery_out() {
        // The other order of the test above: the head scan read 1 s (then
        // 59 s) after t1 is written first, listing the lead changed
        // (Hired); t1's delivery (Canceled) arrives after it. A listing may
        // lag the event: the delivery is applied, as it would have stayed
        // had it come first — the order of the two writes does not decide.
        for at in ["2026-01-01T11:00:01.000Z", "2026-01-01T11:00:59.999Z"] {
            let mut m = Ordering::open_listed();
            m.pass("b", "head", at, &[lead_row("1", "Hired")], None);
            assert_eq!(m.status("1"), "Hired", "{at}");
            assert_eq!(
                m.deliver("b", &lead_row("1", "Canceled"), T1),
                Upserted::Changed,
                "{at}"
            );
            assert_eq!(m.status("1"), "Canceled", "{at}");
        }
        // A page asked for a margin or more after the event is the newer
        // observation: the delivery is kept out.
        let mut m = Ordering::open_listed();
        m.pass(
            "b",
            "head",
            "2026-01-01T11:01:00.000Z",
            &[lead_row("1", "Hired")],
            None,
        );
        assert!(matches!(
            m.deliver("b", &lead_row("1", "Canceled"), T1),
            Upserted::Kept { .. }
        ));
        assert_eq!(m.status("1"), "Hired");
    }

    #[test]
    fn a_delivery_older_than_a_listing_that_wrote_nothing_is_kept_out() {
        // Listed Open at t0; Canceled at t1 (delivery held up), Open again;
        // a pass at t3 lists Open (nothing written); t1's delivery arrives.
        for (kind, covered) in [("head", None), ("full", Some(Covered::Every))] {
            let mut m = Ordering::open_listed();
            m.pass("b", kind, T3, &[lead_row("1", "Open")], covered);
            let done = m.deliver("b", &lead_row("1", "Canceled"), T1);
            assert_eq!(done, Upserted::Kept { identical: false }, "{kind}");
            assert_eq!(m.status("1"), "Open", "{kind}");
            // An event after that pass is newer.
            assert_eq!(
                m.deliver("b", &lead_row("1", "Canceled"), T5),
                Upserted::Changed
            );
        }
    }

    #[test]
    fn a_held_up_delivery_stays_out_after_the_listing_that_covered_it_is_pruned() {
        // As above: listed Open at t0, Canceled at t1 (held up), a head scan
        // at t3 lists Open and writes nothing. Later passes (t4, t5) list
        // other leads; the retention then prunes every pass before t4,
        // t3's with them. t1's delivery arrives: still kept out.
        let t4 = "2026-01-01T14:00:00.000Z";
        let mut m = Ordering::open_listed();
        m.pass("b", "head", T3, &[lead_row("1", "Open")], None);
        m.pass("b", "head", t4, &[lead_row("2", "Open")], None);
        m.pass(
            "b",
            "full",
            T5,
            &[lead_row("2", "Open")],
            Some(Covered::Nothing),
        );
        let pruned = crate::store::retention::prune_all(&mut m.conn, t4, 500).unwrap();
        assert_eq!(pruned.sync_runs, 2, "t0's full scan and t3's head scan");
        let done = m.deliver("b", &lead_row("1", "Canceled"), T1);
        assert_eq!(done, Upserted::Kept { identical: false });
        assert_eq!(m.status("1"), "Open");
        // An event after the pruned listings is applied as before.
        let t6 = "2026-01-01T16:00:00.000Z";
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), t6),
            Upserted::Changed
        );
        assert_eq!(m.status("1"), "Canceled");
    }

    #[test]
    fn a_listing_just_after_the_event_does_not_keep_out_a_prompt_delivery() {
        // Canceled at t1 (delivery prompt); a head scan started 1 s later
        // still lists Open (the host's clock ahead of Thumbtack's, or the
        // listing lagging the change): it must not keep the delivery out.
        // One started 2 minutes after the event does.
        for (started, kept) in [
            ("2026-01-01T11:00:01.000Z", false),
            ("2026-01-01T11:00:59.999Z", false),
            ("2026-01-01T11:01:00.000Z", true),
            ("2026-01-01T11:02:00.000Z", true),
        ] {
            let mut m = Ordering::open_listed();
            m.pass("b", "head", started, &[lead_row("1", "Open")], None);
            let done = m.deliver("b", &lead_row("1", "Canceled"), T1);
            let (want, status) = match kept {
                true => (Upserted::Kept { identical: false }, "Open"),
                false => (Upserted::Changed, "Canceled"),
            };
            assert_eq!(done, want, "a pass started at {started}");
            assert_eq!(m.status("1"), status, "a pass started at {started}");
        }
    }

    #[test]
    fn a_listing_confirms_only_what_it_listed_as_the_row_is() {
        let t4 = "2026-01-01T14:00:00.000Z";
        // A head scan that listed another lead.
        let mut m = Ordering::new();
        m.pass(
            "b",
            "full",
            T0,
            &[lead_row("1", "Open"), lead_row("2", "Open")],
            Some(Covered::Every),
        );
        m.pass("b", "head", T3, &[lead_row("2", "Open")], None);
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T1),
            Upserted::Changed
        );
        // A full scan that confirmed nothing (failed, or its end unknown).
        let mut m = Ordering::open_listed();
        m.pass(
            "b",
            "full",
            T3,
            &[lead_row("1", "Open")],
            Some(Covered::Nothing),
        );
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T1),
            Upserted::Changed
        );
        // Another business's complete listing says nothing of this lead;
        // a lead moved in after a pass started was not listed by it as it is.
        let mut m = Ordering::open_listed();
        m.pass(
            "c",
            "full",
            T3,
            &[lead_row("2", "Open")],
            Some(Covered::Every),
        );
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T1),
            Upserted::Changed
        );
        let mut m = Ordering::new();
        m.pass("c", "full", T0, &[], Some(Covered::Every));
        m.pass(
            "b",
            "full",
            T0,
            &[lead_row("1", "Open")],
            Some(Covered::Every),
        );
        // Listed by c's head scan at t3: moved there, so written
        // (changed_at t3); that pass started at the instant of the write,
        // not after it, so it confirms nothing beyond what it wrote.
        m.pass("c", "head", T3, &[lead_row("1", "Open")], None);
        assert_eq!(
            m.conn
                .query_row("SELECT business_id FROM negotiations", [], |r| r
                    .get::<_, String>(0))
                .unwrap(),
            "c"
        );
        // Its own write (changed_at t3) is newer than t1.
        assert_eq!(
            m.deliver("c", &lead_row("1", "Canceled"), T1),
            Upserted::Kept { identical: false }
        );
        // b's listing at t4 does not list it any more, and says nothing of it.
        m.pass("b", "full", t4, &[], Some(Covered::Every));
        assert_eq!(
            m.deliver("c", &lead_row("1", "Canceled"), "2026-01-01T13:30:00.000Z"),
            Upserted::Changed
        );
    }

    #[test]
    fn a_complete_listing_after_the_event_that_found_the_lead_gone_keeps_it_gone() {
        let mut m = Ordering::open_listed();
        let run = start_run(&m.conn, "b", "full", "2026-01-01T10:30:00.000Z").unwrap();
        let marked = mark_missing(
            &mut m.conn,
            "b",
            run,
            &Default::default(),
            true,
            "2026-01-01T10:40:00.000Z",
        )
        .unwrap();
        assert_eq!(marked, Missing::Marked(1));
        // Still gone at t3; an event of t1 (after it was first found gone)
        // is older than that.
        m.pass("b", "full", T3, &[], Some(Covered::Every));
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T1),
            Upserted::Kept { identical: false }
        );
        let missing: Option<String> = m
            .conn
            .query_row("SELECT missing_since FROM negotiations", [], |r| r.get(0))
            .unwrap();
        assert!(missing.is_some());
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T5),
            Upserted::Changed
        );
    }

    /// Whether lead `id` is marked missing.
    fn is_missing(m: &Ordering, id: &str) -> bool {
        m.column(id, "missing_since").is_some()
    }

    #[test]
    fn a_lead_delivered_during_a_full_scan_is_not_marked_missing_by_it() {
        // Lead 1 listed at t0. A full scan starts at 11:00; while it runs,
        // the lead is delivered (changed, or as mirrored): it exists after
        // the scan started, and a listing that changed order meanwhile (or
        // read its page before the event) did not list it. Not missing.
        for status in ["Canceled", "Open"] {
            let mut m = Ordering::open_listed();
            let run = start_run(&m.conn, "b", "full", T1).unwrap();
            m.deliver_at(
                "b",
                &lead_row("1", status),
                "2026-01-01T11:05:00.000Z",
                "2026-01-01T11:05:01.000Z",
            );
            let marked = mark_missing(
                &mut m.conn,
                "b",
                run,
                &Default::default(),
                true,
                "2026-01-01T11:30:00.000Z",
            )
            .unwrap();
            assert_eq!(marked, Missing::Marked(0), "{status}");
            assert!(!is_missing(&m, "1"), "{status}");
        }
    }

    #[test]
    fn a_lead_written_under_a_clock_far_ahead_is_not_spared_by_later_full_scans() {
        // Lead 1 delivered (an event at 10:30) while the wall clock ran a
        // centuries ahead: its row says changed in 2999. The clock corrected, a
        // full scan from 11:00 to 11:30 does not list it: a write "after
        // the scan started" that is after the mark, too, was not seen
        // during the scan. Marked.
        let mut m = Ordering::open_listed();
        m.deliver_at(
            "b",
            &lead_row("1", "Canceled"),
            "2026-01-01T10:30:00.000Z",
            "2999-01-01T10:30:01.000Z",
        );
        let run = start_run(&m.conn, "b", "full", T1).unwrap();
        let marked = mark_missing(
            &mut m.conn,
            "b",
            run,
            &Default::default(),
            true,
            "2026-01-01T11:30:00.000Z",
        )
        .unwrap();
        assert_eq!(marked, Missing::Marked(1));
        assert!(is_missing(&m, "1"));
    }

    #[test]
    fn a_delivery_is_not_kept_out_by_a_listing_stamped_under_a_clock_far_ahead() {
        // Lead 2 listed Open while the wall clock ran centuries ahead (its
        // row, and the pass that listed it, say 2999). The clock corrected,
        // a delivery of its cancellation (an event at 12:00, Thumbtack's
        // clock) is newer than any listing really made: applied. It was
        // kept out as older than that "2999" listing until the clock
        // caught up (or a listing of the lead wrote it).
        let mut m = Ordering::open_listed();
        for (ahead, covered) in [
            ("2999-01-01T10:00:00.000Z", None),
            ("2999-01-01T11:00:00.000Z", Some(Covered::Every)),
        ] {
            m.pass("b", "full", ahead, &[lead_row("2", "Open")], covered);
        }
        let done = m.deliver_at(
            "b",
            &lead_row("2", "Canceled"),
            "2026-01-01T12:00:00.000Z",
            "2026-01-01T12:00:01.000Z",
        );
        assert_eq!(done, Upserted::Changed);
        assert_eq!(m.status("2"), "Canceled");
    }

    #[test]
    fn a_last_seen_at_written_under_a_clock_far_ahead_is_rewritten_by_the_next_listing() {
        // Lead 2 listed while the wall clock ran centuries ahead; the clock
        // corrected, a listing of it unchanged rewrites its `last_seen_at`
        // (it stayed in 2999, "seen" later than any real listing, until
        // the clock caught up).
        let mut m = Ordering::open_listed();
        let ahead = "2999-01-01T10:00:00.000Z";
        m.pass("b", "head", ahead, &[lead_row("2", "Open")], None);
        assert_eq!(m.column("2", "last_seen_at").as_deref(), Some(ahead));
        m.pass("b", "head", T1, &[lead_row("2", "Open")], None);
        assert_eq!(m.column("2", "last_seen_at").as_deref(), Some(T1));
        assert_eq!(changes_of(&m, "2"), 0, "no change row: only seen again");
    }

    #[test]
    fn a_lead_first_seen_under_a_clock_far_ahead_is_not_spared_by_later_full_scans() {
        // Lead 2 first listed (inserted) by a pass while the wall clock ran
        // centuries ahead: its `first_seen_at` says 2999. The clock corrected,
        // a full scan from 11:00 to 11:30 does not list it: it was not
        // first seen during the scan (that would be before the mark), so
        // its absence counts. It used to be left out of every full scan
        // until the clock caught up (a gone lead present for centuries).
        let mut m = Ordering::open_listed();
        m.pass(
            "b",
            "head",
            "2999-01-01T10:00:00.000Z",
            &[lead_row("2", "Open")],
            None,
        );
        assert_eq!(
            m.column("2", "first_seen_at").as_deref(),
            Some("2999-01-01T10:00:00.000Z")
        );
        let run = start_run(&m.conn, "b", "full", T1).unwrap();
        let seen = [id_fingerprint("1")].into_iter().collect();
        let marked = mark_missing(
            &mut m.conn,
            "b",
            run,
            &seen,
            true,
            "2026-01-01T11:30:00.000Z",
        )
        .unwrap();
        assert_eq!(marked, Missing::Marked(1));
        assert!(is_missing(&m, "2"));
        assert!(!is_missing(&m, "1"));
        // The clock stepped back during a scan (its mark before its start):
        // lead 3, first seen after the start, may have been first seen
        // during the scan: not marked, as before.
        let run = start_run(&m.conn, "b", "full", T3).unwrap();
        m.pass(
            "b",
            "head",
            "2026-01-01T13:10:00.000Z",
            &[lead_row("3", "Open")],
            None,
        );
        let marked = mark_missing(
            &mut m.conn,
            "b",
            run,
            &seen,
            true,
            "2026-01-01T12:50:00.000Z",
        )
        .unwrap();
        assert_eq!(marked, Missing::Marked(0));
        assert!(!is_missing(&m, "3"));
    }

    /// A delivery of `lead` with no believable event time, received at `now`.
    fn deliver_untimed(m: &mut Ordering, lead: &LeadRow, now: &str) {
        let ctx = PageContext {
            business_id: "b".into(),
            run_id: None,
            source: Source::Webhook,
            now: now.into(),
            stale_before: String::new(),
            insert_first: false,
            read_at: None,
        };
        let tx = m.conn.transaction().unwrap();
        upsert_lead(&tx, &ctx, lead, Origin::Delivered { triggered_at: None }).unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn a_lead_delivered_between_the_marks_time_and_its_transaction_is_not_marked() {
        // A full scan from 11:00 lists lead 1 only; the mark's time is taken
        // at 11:30:00.000, and before its (queued) transaction runs, a
        // webhook delivery with no believable event time (received
        // 11:30:00.200) writes a new lead 9, and one of an event at 10:30
        // writes lead 2 (first seen before the scan): both written after
        // the scan started. A stamp only ms after the mark's time is no
        // clock ahead: neither is marked (lead 9 was, as "first seen after
        // the mark"; lead 2 too, its write "after the mark" not counting
        // as observed).
        let mut m = Ordering::open_listed();
        m.pass("b", "head", T0, &[lead_row("2", "Open")], None);
        let run = start_run(&m.conn, "b", "full", T1).unwrap();
        deliver_untimed(&mut m, &lead_row("9", "Picked"), "2026-01-01T11:30:00.200Z");
        m.deliver_at(
            "b",
            &lead_row("2", "Picked"),
            "2026-01-01T10:30:00.000Z",
            "2026-01-01T11:30:00.200Z",
        );
        assert_eq!(m.status("2"), "Picked");
        let seen = [id_fingerprint("1")].into_iter().collect();
        let marked = mark_missing(
            &mut m.conn,
            "b",
            run,
            &seen,
            true,
            "2026-01-01T11:30:00.000Z",
        )
        .unwrap();
        assert_eq!(marked, Missing::Marked(0));
        assert!(!is_missing(&m, "9"));
        assert!(!is_missing(&m, "2"));
    }

    #[test]
    fn a_retried_delivery_received_just_before_a_newer_listing_is_kept_out() {
        // Event at 12:00 (lead 2 Open); lead 2 Picked since. A retry of the
        // delivery is received at 12:10:00.000 and waits on the store while
        // a head pass asked at 12:10:00.500 lists lead 2 as Picked; then the
        // delivery's transaction runs (its `now` is its receipt). The
        // listing, ten minutes after the event, is newer: it stays (it was
        // ignored as "after now", and the retry rolled the lead back).
        let mut m = Ordering::open_listed();
        m.pass("b", "head", T1, &[lead_row("2", "Open")], None);
        m.pass(
            "b",
            "head",
            "2026-01-01T12:10:00.500Z",
            &[lead_row("2", "Picked")],
            None,
        );
        let done = m.deliver_at(
            "b",
            &lead_row("2", "Open"),
            "2026-01-01T12:00:00.000Z",
            "2026-01-01T12:10:00.000Z",
        );
        assert_eq!(m.status("2"), "Picked", "{done:?}");
        // Shown unchanged (listed_at, not the row's stamps) by a later
        // listing: still kept out.
        m.pass(
            "b",
            "head",
            "2026-01-01T12:20:00.500Z",
            &[lead_row("2", "Picked")],
            None,
        );
        m.deliver_at(
            "b",
            &lead_row("2", "Open"),
            "2026-01-01T12:15:00.000Z",
            "2026-01-01T12:20:00.000Z",
        );
        assert_eq!(m.status("2"), "Picked");
    }

    /// A partner's program that rewrote a lead's id as a blob
    /// (`CAST(negotiation_id AS BLOB)`) made every full scan of its business
    /// fail ("cannot count unlisted leads"): the id was read as text only.
    /// A blob id is read by its bytes: listed, it is left alone; unlisted,
    /// that very row is marked missing.
    #[test]
    fn a_lead_id_the_partner_rewrote_as_a_blob_fails_no_full_scan() {
        let mut m = Ordering::new();
        let leads: Vec<LeadRow> = (1..=3).map(|i| lead_row(&i.to_string(), "Open")).collect();
        m.pass("b", "full", T0, &leads, Some(Covered::Every));
        m.conn
            .execute(
                "UPDATE negotiations SET negotiation_id = CAST(negotiation_id AS BLOB)
                  WHERE negotiation_id IN ('2', '3')",
                [],
            )
            .unwrap();
        let run = start_run(&m.conn, "b", "full", T1).unwrap();
        let seen: Fingerprints = ["1", "2"].iter().map(|i| id_fingerprint(i)).collect();
        let end = "2026-01-01T11:30:00.000Z";
        let marked = mark_missing(&mut m.conn, "b", run, &seen, true, end).unwrap();
        assert_eq!(marked, Missing::Marked(1));
        let missing: Vec<(String, bool)> = m
            .conn
            .prepare(
                "SELECT CAST(negotiation_id AS TEXT), missing_since IS NOT NULL
                   FROM negotiations ORDER BY 1",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            missing,
            [("1".into(), false), ("2".into(), false), ("3".into(), true)]
        );
    }

    #[test]
    fn leads_seen_during_a_truncated_full_scan_still_count_towards_the_mass_missing_guard() {
        // 50 leads; a full scan lists 20 of them; 6 of the 30 unlisted are
        // delivered while it runs. 30 of 50 unlisted is a truncated
        // listing: refused, as it is without the deliveries (24 of 50
        // would slip under the guard).
        let mut m = Ordering::new();
        let leads: Vec<LeadRow> = (1..=50).map(|i| lead_row(&i.to_string(), "Open")).collect();
        m.pass("b", "full", T0, &leads, Some(Covered::Every));
        let run = start_run(&m.conn, "b", "full", T1).unwrap();
        for i in 21..=26 {
            m.deliver_at(
                "b",
                &lead_row(&i.to_string(), "Canceled"),
                "2026-01-01T11:05:00.000Z",
                "2026-01-01T11:05:01.000Z",
            );
        }
        let seen: Fingerprints = (1..=20).map(|i| id_fingerprint(&i.to_string())).collect();
        let end = "2026-01-01T11:30:00.000Z";
        let marked = mark_missing(&mut m.conn, "b", run, &seen, false, end).unwrap();
        assert_eq!(
            marked,
            Missing::Refused {
                would: 30,
                present: 50
            }
        );
        assert!(!is_missing(&m, "30"));
        // Accepted: only the leads not seen otherwise are marked.
        let marked = mark_missing(&mut m.conn, "b", run, &seen, true, end).unwrap();
        assert_eq!(marked, Missing::Marked(24));
        assert!(!is_missing(&m, "21"));
        assert!(is_missing(&m, "27"));
    }

    #[test]
    fn a_lead_delivered_within_the_margin_before_a_full_scan_is_not_marked_missing_by_it() {
        // A listing may lag an event by LISTING_MARGIN: a full scan started
        // 30 s after a lead's delivered event (a new lead 2, a change of
        // lead 1) may not list it yet. One whose event was a minute or more
        // before the scan started is marked (lead 3).
        let mut m = Ordering::open_listed();
        m.deliver_at(
            "b",
            &lead_row("1", "Canceled"),
            "2026-01-01T10:59:30.000Z",
            "2026-01-01T10:59:31.000Z",
        );
        m.deliver_at(
            "b",
            &lead_row("2", "Open"),
            "2026-01-01T10:59:30.000Z",
            "2026-01-01T10:59:31.000Z",
        );
        m.deliver_at(
            "b",
            &lead_row("3", "Open"),
            "2026-01-01T10:58:59.000Z",
            "2026-01-01T10:58:59.500Z",
        );
        let run = start_run(&m.conn, "b", "full", T1).unwrap();
        let seen = Default::default();
        let end = "2026-01-01T11:30:00.000Z";
        assert_eq!(count_unseen(&m.conn, "b", run, &seen, end).unwrap(), 1);
        let marked = mark_missing(&mut m.conn, "b", run, &seen, true, end).unwrap();
        assert_eq!(marked, Missing::Marked(1));
        assert!(!is_missing(&m, "1"));
        assert!(!is_missing(&m, "2"));
        assert!(is_missing(&m, "3"));
    }

    #[test]
    fn a_delivery_of_an_event_during_the_full_scan_that_found_the_lead_gone_is_applied() {
        // A full scan from 11:00 to 11:30 did not list lead 1: its page was
        // read at some moment of the scan, unknown. A delivery of an event
        // at 11:10 (or within the margin before 11:00) may be newer than
        // that page: applied, as a delivery during a listing that showed
        // the lead is (README, "Ordering"). One of an event a minute or more
        // before the scan started is older than all of its listing.
        for (event, applied) in [
            ("2026-01-01T11:10:00.000Z", true),
            ("2026-01-01T10:59:30.000Z", true),
            ("2026-01-01T10:58:59.000Z", false),
        ] {
            let mut m = Ordering::open_listed();
            let run = start_run(&m.conn, "b", "full", T1).unwrap();
            let marked = mark_missing(
                &mut m.conn,
                "b",
                run,
                &Default::default(),
                true,
                "2026-01-01T11:30:00.000Z",
            )
            .unwrap();
            assert_eq!(marked, Missing::Marked(1));
            // Stamped with the start of the listing that did not show it.
            assert_eq!(m.column("1", "missing_since").as_deref(), Some(T1));
            let done = m.deliver("b", &lead_row("1", "Canceled"), event);
            if applied {
                assert_eq!(done, Upserted::Changed, "{event}");
                assert!(!is_missing(&m, "1"), "{event}");
            } else {
                assert_eq!(done, Upserted::Kept { identical: false }, "{event}");
                assert!(is_missing(&m, "1"), "{event}");
            }
        }
    }

    #[test]
    fn a_page_asked_for_before_an_event_is_older_than_its_delivery_however_late_written() {
        // A page asked for at t1 (the server made it no earlier) and
        // written at t5 (a slow page, a batched write, a loaded machine):
        // its copy is as old as t1 at most, so a delivery of t3 is newer,
        // whether the page inserted the lead (one by one or batched) or
        // changed it. The copy's `changed_at` stays the write's time.
        let t2 = "2026-01-01T12:00:00.000Z";
        let late = |insert_first| Page {
            read_at: Some(T1),
            written: T5,
            insert_first,
        };
        for insert_first in [false, true] {
            let mut m = Ordering::new();
            m.pass_paged(
                "b",
                "full",
                T1,
                &late(insert_first),
                &[lead_row("1", "Open")],
                Some(Covered::Every),
            );
            assert_eq!(m.column("1", "changed_at").as_deref(), Some(T5));
            assert_eq!(
                m.deliver("b", &lead_row("1", "Canceled"), T3),
                Upserted::Changed,
                "inserted, insert_first {insert_first}"
            );
            assert_eq!(m.status("1"), "Canceled");
        }
        let mut m = Ordering::open_listed();
        m.pass_paged(
            "b",
            "head",
            T1,
            &late(false),
            &[lead_row("1", "Pending")],
            None,
        );
        assert_eq!(m.status("1"), "Pending");
        assert_eq!(m.column("1", "changed_at").as_deref(), Some(T5));
        assert_eq!(
            m.deliver("b", &lead_row("1", "Canceled"), T3),
            Upserted::Changed,
            "changed"
        );
        assert_eq!(m.status("1"), "Canceled");
        // A page asked for after the event is newer than its delivery,
        // written late or not; so is one whose asking time is unknown,
        // by its write (as before).
        for read_at in [Some(t2), None] {
            let mut m = Ordering::new();
            let page = Page {
                read_at,
                written: T5,
                insert_first: false,
            };
            m.pass_paged(
                "b",
                "full",
                t2,
                &page,
                &[lead_row("1", "Open")],
                Some(Covered::Every),
            );
            assert_eq!(
                m.deliver("b", &lead_row("1", "Canceled"), T1),
                Upserted::Kept { identical: false },
                "read at {read_at:?}"
            );
            assert_eq!(m.status("1"), "Open");
        }
    }

    #[test]
    fn whether_a_message_lacks_a_business_is_read_from_its_partial_index() {
        // Asked once a page; a scan of `messages` (a million rows) would
        // cost more than the UPDATEs per new lead it saves.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let plan = explained(
            &conn,
            &format!("EXPLAIN QUERY PLAN {MESSAGES_WITHOUT_BUSINESS}"),
            3,
        );
        assert!(
            plan.iter()
                .any(|p| p.contains("INDEX messages_without_business")),
            "{plan:?}"
        );
    }

    #[test]
    fn the_listings_since_an_event_are_read_from_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let plan = explained(&conn, &format!("EXPLAIN QUERY PLAN {LISTED_SINCE}"), 3);
        assert!(
            plan.iter().any(|p| p.contains("INDEX sync_runs_listed")),
            "{plan:?}"
        );
    }

    /// Review (hooks): a lead delivered with its id as a number then listed
    /// with it as a string got a `changed` row naming the id, which a
    /// listing alone never writes. Only the lead's own id is so compared.
    #[test]
    fn the_leads_own_id_as_a_number_or_a_string_is_no_change() {
        let id = "519153480500518912";
        let number = r#"{"negotiationID":519153480500518912,"n":7,"s":"7"}"#;
        let string = r#"{"negotiationID":"519153480500518912","n":7,"s":"7"}"#;
        assert!(lead_fields_differing(number, string, id).is_empty());
        assert!(lead_fields_differing(string, number, id).is_empty());
        assert_eq!(differing_fields(number, string), ["negotiationID"]);
        assert_eq!(
            lead_fields_differing(number, string, "519153480500518913"),
            ["negotiationID"]
        );
        assert_eq!(
            lead_fields_differing(r#"{"n":7,"x":1}"#, r#"{"n":"7","x":1}"#, "7"),
            Vec::<String>::new()
        );
        assert_eq!(
            lead_fields_differing(r#"{"n":7,"x":1}"#, r#"{"n":"7","x":2}"#, "8"),
            ["n", "x"]
        );
    }

    #[test]
    fn key_order_and_spacing_are_not_changes() {
        assert!(
            differing_fields(r#"{"a":1,"b":{"c":2}}"#, r#"{ "b": {"c":2}, "a": 1 }"#).is_empty()
        );
        assert_eq!(
            differing_fields(r#"{"a":1,"b":2}"#, r#"{"a":1,"b":3,"d":0}"#),
            vec!["b".to_string(), "d".to_string()]
        );
        assert_eq!(
            differing_fields(r#"{"n":9007199254740993}"#, r#"{"n":9007199254740992}"#),
            vec!["n".to_string()]
        );
    }

    #[test]
    fn a_repeated_key_is_compared_with_every_one_of_its_values() {
        // SQLite's json_extract reads a repeated key's first value, the
        // columns its last: a copy that drops or reorders a repeated key's
        // values reads otherwise, and is a change.
        for (old, new, fields) in [
            (
                r#"{"negotiationID":"1","status":"Open","status":"Canceled"}"#,
                r#"{"negotiationID":"1","status":"Canceled"}"#,
                vec!["status"],
            ),
            (
                r#"{"negotiationID":"1","status":"Canceled"}"#,
                r#"{"negotiationID":"1","status":"Open","status":"Canceled"}"#,
                vec!["status"],
            ),
            (r#"{"s":1,"s":3}"#, r#"{"s":3,"s":1}"#, vec!["s"]),
            (
                r#"{"a":1,"customer":{"displayName":"A","displayName":"B"}}"#,
                r#"{"a":1,"customer":{"displayName":"B"}}"#,
                vec!["customer"],
            ),
        ] {
            assert_eq!(differing_fields(old, new), fields, "{old} -> {new}");
        }
        // Past the 20 or so members a sort does by insertion (stable
        // whatever the sort), the repeated key's values keep their order
        // only if the sort of the members is stable.
        let filler: String = (0..64).map(|i| format!(r#""k{i:02}":{i},"#)).collect();
        let one_two = format!(r#"{{"s":1,{filler}"s":2}}"#);
        let two_one = format!(r#"{{"s":2,{filler}"s":1}}"#);
        assert_eq!(differing_fields(&one_two, &two_one), vec!["s"]);
        assert!(differing_fields(&one_two, &one_two.replace(r#""k00":0,"#, "")).len() == 1);
        // Forty values of one key, interleaved with other keys or after
        // them: the same values in the same order, so the same lead.
        let interleaved: Vec<String> = (0..40).map(|i| format!(r#""s":{i},"k{i:02}":0"#)).collect();
        let keys_first: Vec<String> = (0..40)
            .map(|i| format!(r#""k{i:02}":0"#))
            .chain((0..40).map(|i| format!(r#""s":{i}"#)))
            .collect();
        let (interleaved, keys_first) = (
            format!("{{{}}}", interleaved.join(",")),
            format!("{{{}}}", keys_first.join(",")),
        );
        assert!(differing_fields(&interleaved, &keys_first).is_empty());
        // Other keys may move around a repeated one: still the same.
        assert!(differing_fields(r#"{"s":1,"a":2,"s":3}"#, r#"{"a":2,"s":1, "s":3}"#).is_empty());
        assert!(
            differing_fields(
                r#"{"c":{"n":"A","x":0,"n":"B"}}"#,
                r#"{"c":{"x":0,"n":"A","n":"B"}}"#
            )
            .is_empty()
        );
    }

    #[test]
    fn a_lead_that_reappears_changed_records_its_status_change_once() {
        // Open, marked missing, then listed again Hired: one observation,
        // one transition Open -> Hired in the change feed (a consumer
        // counting `old_status <> new_status` used to see it twice: on the
        // `reappeared` row and on the `changed` row).
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ctx = PageContext {
            business_id: "b".into(),
            run_id: None,
            source: Source::Poll,
            now: "2026-01-01T00:00:00.000Z".into(),
            stale_before: "2025-12-31T23:00:00.000Z".into(),
            insert_first: false,
            read_at: None,
        };
        let lead = |status: &str| {
            let payload = format!(r#"{{"negotiationID":"1","status":"{status}"}}"#);
            LeadRow {
                negotiation_id: "1".into(),
                hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
                payload,
                status: Some(status.into()),
                ..LeadRow::default()
            }
        };
        write_page(&mut conn, &ctx, &[lead("Open")]).unwrap();
        conn.execute(
            "UPDATE negotiations SET missing_since = '2025-12-31T00:00:00.000Z'",
            [],
        )
        .unwrap();
        let stats = write_page(&mut conn, &ctx, &[lead("Hired")]).unwrap();
        assert_eq!(stats.updated, 1, "{stats:?}");
        let rows: Vec<(String, String, String)> = conn
            .prepare(
                "SELECT kind, old_status, new_status FROM negotiation_changes
                  WHERE kind <> 'new' ORDER BY id",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let row = |k: &str, o: &str, n: &str| (k.to_string(), o.to_string(), n.to_string());
        assert_eq!(
            rows,
            [
                row("reappeared", "Open", "Open"),
                row("changed", "Open", "Hired")
            ]
        );
    }

    #[test]
    fn a_copy_without_a_repeated_key_replaces_one_with_it() {
        // Mirrored with `status` twice (json_extract: Open; the column:
        // Canceled), then listed with it once: the mirror must hold what
        // Thumbtack sends now, or json_extract keeps saying Open.
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let ctx = PageContext {
            business_id: "b".into(),
            run_id: None,
            source: Source::Poll,
            now: "2026-01-01T00:00:00.000Z".into(),
            stale_before: "2025-12-31T23:00:00.000Z".into(),
            insert_first: false,
            read_at: None,
        };
        let lead = |payload: &str| LeadRow {
            negotiation_id: "1".into(),
            hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
            payload: payload.into(),
            status: Some("Canceled".into()),
            ..LeadRow::default()
        };
        let twice = lead(r#"{"negotiationID":"1","status":"Open","status":"Canceled"}"#);
        let once = lead(r#"{"negotiationID":"1","status":"Canceled"}"#);
        let stats = write_page(&mut conn, &ctx, &[twice]).unwrap();
        assert_eq!(stats.inserted, 1);
        let stats = write_page(&mut conn, &ctx, std::slice::from_ref(&once)).unwrap();
        assert_eq!(stats.updated, 1, "{stats:?}");
        let (payload, extracted): (String, String) = conn
            .query_row(
                "SELECT payload, json_extract(payload, '$.status') FROM negotiations",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (payload.as_str(), extracted.as_str()),
            (once.payload.as_str(), "Canceled")
        );
        let fields: String = conn
            .query_row(
                "SELECT changed_fields FROM negotiation_changes WHERE kind = 'changed'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(fields, r#"["status"]"#);
    }

    #[test]
    fn numbers_beyond_f64_precision_that_differ_are_changes() {
        for (old, new) in [
            (
                r#"{"n":1234567890123456789012345678901234567890123,"a":1}"#,
                r#"{"a":1,"n":1234567890123456789012345678901234567890124}"#,
            ),
            (
                r#"{"n":{"p":0.12345678901234567890}}"#,
                r#"{"n":{"p":0.12345678901234567891}}"#,
            ),
            (
                r#"{"n":[-12345678901234567890123]}"#,
                r#"{"n":[-12345678901234567890124]}"#,
            ),
        ] {
            assert_eq!(differing_fields(old, new), vec!["n".to_string()], "{new}");
        }
        // Still equal: the same numbers, spacing and key order aside.
        assert!(
            differing_fields(
                r#"{"n":1234567890123456789012345678901234567890123,"d":{"x":0.12345678901234567890,"y":"é"}}"#,
                r#"{ "d" : { "y":"é", "x" : 0.12345678901234567890 }, "n" : 1234567890123456789012345678901234567890123 }"#,
            )
            .is_empty()
        );
    }

    #[test]
    fn deeply_nested_values_that_differ_are_changes_without_exhausting_the_stack() {
        // 100,000 levels, far past any recursion a 2 MiB thread (the
        // `leadsync-db` writer's) can take, compared on such a thread.
        let deep = |n: char| {
            let depth = 100_000;
            format!(
                r#"{{"negotiationID":"1","x":{}{n}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        let (old, new) = (deep('1'), deep('2'));
        let fields = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || differing_fields(&old, &new))
            .unwrap()
            .join()
            .expect("the comparison overflowed its stack");
        assert_eq!(fields, vec!["x".to_string()]);
        // Nesting within the limit is still compared as JSON.
        let nested =
            |inner: &str| format!(r#"{{"x":{}{inner}{}}}"#, "[".repeat(60), "]".repeat(60));
        assert!(
            differing_fields(&nested(r#"{"a":1,"b":2}"#), &nested(r#"{ "b":2,"a":1 }"#)).is_empty()
        );
    }

    #[test]
    fn numbers_that_round_to_the_same_f64_outside_its_normal_range_are_changes() {
        for (old, new) in [
            (r#"{"n":1e-400}"#, r#"{"n":2e-400}"#),
            (r#"{"n":4e-324}"#, r#"{"n":5e-324}"#),
            (r#"{"n":1e-320}"#, r#"{"n":1.0000000000001e-320}"#),
            (r#"{"n":0}"#, r#"{"n":1e-400}"#),
            (r#"{"n":-0.0}"#, r#"{"n":-1e-999}"#),
        ] {
            assert_eq!(
                differing_fields(old, new),
                vec!["n".to_string()],
                "{old} {new}"
            );
        }
        // Still equal: the same normal value (or zero) written two ways.
        for (old, new) in [
            (r#"{"n":1.5}"#, r#"{"n":15e-1}"#),
            (r#"{"n":1e-300}"#, r#"{"n":0.1e-299}"#),
            (r#"{"n":0}"#, r#"{"n":0.0}"#),
            (r#"{"n":0}"#, r#"{"n":0e10}"#),
        ] {
            assert!(differing_fields(old, new).is_empty(), "{old} {new}");
        }
    }
}
