//! One sync pass of one business: list its negotiations page by page into
//! the mirror. A head scan stops once pages stop bringing news; a full scan
//! reads everything and maintains `missing_since`.

use crate::store::Store;
use crate::store::mirror::{self, Missing, PageContext, RunEnd, RunStats};
use crate::thumbtack::model::Page;
use crate::thumbtack::paging::{Cursor, End, Listing, Step, Style};
use crate::thumbtack::{ApiError, Client, Disposition};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A pass that reads this many pages is stopped: a listing that long is a
/// pagination loop, not data.
const MAX_PAGES: i64 = 1_000_000;

/// Which pass (a full scan covers everything a head scan does: `Full > Head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScanKind {
    /// The newest pages, until `stop_after_unchanged_pages` bring nothing new.
    Head,
    /// Every page; leads no longer listed are marked missing.
    Full,
}

impl ScanKind {
    /// The kind named `head` or `full`.
    pub fn parse(name: &str) -> Option<ScanKind> {
        match name {
            "head" => Some(ScanKind::Head),
            "full" => Some(ScanKind::Full),
            _ => None,
        }
    }

    /// The name stored in `sync_runs.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScanKind::Head => "head",
            ScanKind::Full => "full",
        }
    }
}

/// How much a pass reads.
#[derive(Debug, Clone, Copy)]
pub struct PassSettings {
    pub page_size: u32,
    pub stop_after_unchanged_pages: u32,
    /// A full scan may mark more than half of the leads missing at once
    /// (`sync --full --accept-missing`); otherwise it refuses to.
    pub accept_missing: bool,
}

/// How a pass ended.
#[derive(Debug, Clone)]
pub enum PassOutcome {
    /// Succeeded (`RunStats::end_unknown` says when nothing could be marked missing).
    Ok(RunStats),
    /// Failed after `RunStats` were written (whole pages only).
    Failed(RunStats, String),
    /// Not run: the business needs re-authorization.
    Skipped(String),
}

/// How the error of a pass that died of a panic begins (in its report and
/// in `sync_runs.error`).
pub const PANICKED: &str = "the pass panicked";

/// A finished pass.
#[derive(Debug, Clone)]
pub struct PassReport {
    pub business_id: String,
    pub kind: ScanKind,
    pub outcome: PassOutcome,
    pub elapsed: Duration,
    /// Why the listing's end was unknown, when it was (`RunStats::end_unknown`).
    pub note: Option<String>,
}

impl PassReport {
    /// True when the pass died of a panic (the daemon's workers catch it).
    pub fn panicked(&self) -> bool {
        matches!(&self.outcome, PassOutcome::Failed(_, why) if why.starts_with(PANICKED))
    }

    /// True when the pass ran and succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, PassOutcome::Ok(_))
    }

    /// `ok`, `error` or `skipped`, as in `sync_runs.outcome`.
    pub fn outcome_name(&self) -> &'static str {
        match self.outcome {
            PassOutcome::Ok(_) => "ok",
            PassOutcome::Failed(..) => "error",
            PassOutcome::Skipped(_) => "skipped",
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        match &self.outcome {
            PassOutcome::Ok(s) => format!(
                "{}: ok — {} scan, {} pages, {} leads seen: {} new, {} changed, {} unchanged, {} newly missing ({secs:.1}s){}",
                self.business_id,
                self.kind.as_str(),
                s.pages,
                s.seen,
                s.inserted,
                s.updated,
                s.unchanged,
                s.missing,
                match &self.note {
                    Some(note) if s.end_unknown => format!("; note: {note}"),
                    _ => String::new(),
                }
            ),
            PassOutcome::Failed(s, e) => format!(
                "{}: FAILED — {} scan after {} pages ({} new, {} changed): {e}",
                self.business_id,
                self.kind.as_str(),
                s.pages,
                s.inserted,
                s.updated
            ),
            PassOutcome::Skipped(r) => format!("{}: SKIPPED — {r}", self.business_id),
        }
    }
}

/// What an unknown end means for a pass of this kind.
fn unknown_end_note(kind: ScanKind, why: &str) -> String {
    match kind {
        ScanKind::Full => {
            format!("the listing's end is unknown ({why}): no lead was marked missing")
        }
        ScanKind::Head => format!("the listing's end is unknown ({why})"),
    }
}

/// Why a full scan whose listing held `unnamed` entries without a readable
/// `negotiationID` marked no lead missing.
fn unnamed_note(unnamed: i64) -> String {
    // Counted as read: an entry a confirmation asked back is read twice.
    let entries = match unnamed {
        1 => "1 list entry".to_string(),
        n => format!("{n} list entries"),
    };
    format!(
        "{entries} read without a readable negotiationID: any unlisted lead may be one of them, \
         so no lead was marked missing"
    )
}

async fn fetch(client: Arc<Client>, business_id: String, cursor: Cursor) -> Result<Page, ApiError> {
    // `read_at`: when the request that got the page was sent (the page
    // reflects some moment between that and its answer arriving, and a
    // webhook event before the answer arrived may be newer than it:
    // PageContext::read_at).
    client.list_page(&business_id, &cursor).await
}

/// Runs one pass. Errors are recorded in `sync_runs` and `businesses` and
/// returned in the report; they never affect other businesses.
#[tracing::instrument(skip_all, fields(business_id = %business_id, kind = kind.as_str()))]
pub async fn sync_business(
    store: &Store,
    client: &Arc<Client>,
    business_id: &str,
    kind: ScanKind,
    settings: PassSettings,
    stop: &CancellationToken,
) -> PassReport {
    let started = Instant::now();
    let report = |outcome, note| {
        let r = PassReport {
            business_id: business_id.to_string(),
            kind,
            outcome,
            elapsed: started.elapsed(),
            note,
        };
        crate::metrics::sync_pass(business_id, kind.as_str(), r.outcome_name(), r.elapsed);
        r
    };

    // A business waiting for re-authorization is not called; the check also
    // notices a new token file (or `auth exchange`) and resumes it.
    if client.auth().reauth_reason(business_id).is_some()
        && let Err(e) = client.auth().token(business_id).await
        && e.disposition == Disposition::Reauth
    {
        let (id, k, reason, now) = (
            business_id.to_string(),
            kind.as_str(),
            e.message.clone(),
            crate::time::now(),
        );
        if let Err(err) = store
            .call(move |c| mirror::record_skipped_run(c, &id, k, &reason, &now))
            .await
        {
            warn!(error = %format!("{err:#}"), "cannot record the skipped pass");
        }
        info!(reason = %e.message, "pass skipped: the business needs re-authorization");
        return report(PassOutcome::Skipped(e.message), None);
    }

    let run_id = {
        let (id, k, now) = (business_id.to_string(), kind.as_str(), crate::time::now());
        match store
            .call(move |c| mirror::start_run(c, &id, k, &now))
            .await
        {
            Ok(id) => id,
            Err(e) => {
                return report(
                    PassOutcome::Failed(
                        RunStats::default(),
                        format!("cannot record the pass: {e:#}"),
                    ),
                    None,
                );
            }
        }
    };
    let mut stats = RunStats::default();
    let mut seen = mirror::Fingerprints::default();
    let mut style = None;
    let mut why = None;
    // List entries of a full scan that name no lead (Page::unnamed: no
    // readable negotiationID, or a blank or odd one): each is a lead listed
    // that cannot be told apart.
    let mut unnamed = 0i64;
    let result = read_pages(
        store,
        client,
        business_id,
        kind,
        settings,
        run_id,
        (&mut stats, &mut unnamed),
        &mut seen,
        (&mut style, &mut why),
        stop,
    )
    .await;
    // What the listing confirmed (mirror::Covered): a head scan, the leads
    // of the pages it wrote (failed or not); a full scan, every lead when
    // it succeeds with a known end (the unlisted ones are marked missing).
    let covered: Vec<u64> = match kind {
        ScanKind::Head => seen.iter().copied().collect(),
        ScanKind::Full => Vec::new(),
    };
    // Leads only the second reading of a full scan listed (confirm_unseen).
    let mut listed_again = false;
    // Why a full scan that read its listing to a known end marks nothing.
    let mut unproven = None;
    // A request the stop kept from being sent (or its token refresh) ends
    // the pass like a stop between pages does.
    let result = match result {
        Err(e) if stop.is_cancelled() && !e.starts_with("interrupted by shutdown") => {
            Err(format!("interrupted by shutdown: {e}"))
        }
        r => r,
    };
    let result = match result {
        Ok(End::Unknown) => {
            stats.end_unknown = true;
            Ok(())
        }
        // Entries the scan listed but cannot name: any lead it did not
        // list may be one of them, so none is proven gone. The pass
        // succeeds, marks nothing and says why (like an unknown end).
        Ok(_) if kind == ScanKind::Full && unnamed > 0 => {
            stats.end_unknown = true;
            unproven = Some(unnamed_note(unnamed));
            Ok(())
        }
        Ok(_) if kind == ScanKind::Full => 'full: {
            match confirm_unseen(
                store,
                client,
                business_id,
                settings,
                run_id,
                &mut seen,
                stop,
            )
            .await
            {
                // Every present lead known before the pass was listed: none
                // to mark, and the index is not read a second time. (A lead
                // that turns present meanwhile, a webhook's copy of a
                // missing one, is left present: the next full scan decides.)
                Ok(Confirmed { unseen: 0, .. }) => break 'full Ok(()),
                // The second reading listed entries it cannot name: any
                // lead still unlisted may be one of them.
                Ok(Confirmed { unnamed, .. }) if unnamed > 0 => {
                    stats.end_unknown = true;
                    unproven = Some(unnamed_note(unnamed));
                    break 'full Ok(());
                }
                Ok(Confirmed { found_again, .. }) => listed_again = found_again,
                Err(e) => break 'full Err(e),
            }
            let (id, now, accept) = (
                business_id.to_string(),
                crate::time::now(),
                settings.accept_missing,
            );
            match store
                .call(move |c| mirror::mark_missing(c, &id, run_id, &seen, accept, &now))
                .await
            {
                Ok(Missing::Marked(n)) => {
                    stats.missing = n;
                    Ok(())
                }
                Ok(Missing::Refused { would, present }) => Err(format!(
                    "listing looks truncated: {would} of {present} leads would go missing; none was marked — \
                     if they really are gone, run `leadsync sync --business {business_id} --full --accept-missing`"
                )),
                Err(e) => Err(format!("cannot mark missing leads: {e:#}")),
            }
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    let error = result.as_ref().err().cloned();
    let note = unproven.or_else(|| {
        stats.end_unknown.then(|| {
            unknown_end_note(
                kind,
                why.as_deref()
                    .unwrap_or("a full page with no pagination marker"),
            )
        })
    });
    let every = kind == ScanKind::Full && error.is_none() && !stats.end_unknown && !listed_again;
    {
        let (id, k, now, s, err, note, pagination) = (
            business_id.to_string(),
            kind.as_str(),
            crate::time::now(),
            stats,
            error.clone(),
            note.clone(),
            style.map(Style::as_str),
        );
        if let Err(e) = store
            .call(move |c| {
                let end = RunEnd {
                    kind: k,
                    stats: &s,
                    error: err.as_deref(),
                    note: note.as_deref(),
                    pagination,
                    covered: match every {
                        true => mirror::Covered::Every,
                        false => mirror::Covered::These(&covered),
                    },
                    now: &now,
                };
                mirror::finish_run(c, run_id, &id, &end)
            })
            .await
        {
            warn!(error = %format!("{e:#}"), "cannot record the end of the pass");
        }
    }
    match error {
        None => {
            info!(
                pages = stats.pages,
                seen = stats.seen,
                new = stats.inserted,
                changed = stats.updated,
                missing = stats.missing,
                pagination = style.map(Style::as_str).unwrap_or("none"),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "pass finished"
            );
            if let Some(note) = &note {
                warn!(note = %note, "pass finished with a note");
            }
            report(PassOutcome::Ok(stats), note)
        }
        Some(e) => {
            warn!(pages = stats.pages, error = %e, "pass failed");
            report(PassOutcome::Failed(stats, e), None)
        }
    }
}

/// What [`confirm_unseen`] found.
struct Confirmed {
    /// Present leads the scan had not listed (before the second reading).
    unseen: i64,
    /// The second reading listed some of them.
    found_again: bool,
    /// Entries of the second reading that name no lead: any lead it did not
    /// list either may be one of them, so none is proven gone.
    unnamed: i64,
}

/// Before a full scan marks leads missing: a listing read by position
/// (offset paging, and cursors that hide an offset) that lost a lead while
/// the scan was between two pages shifted the later leads one place, and
/// the lead at the page boundary was never listed to the scan though it
/// exists. When some present leads went unlisted, the listing is read once
/// more (nothing written) and a lead listed by either reading is not
/// missing; one that is really gone is absent from both. Returns how many
/// present leads the scan had not listed (before the second reading), and
/// whether the second reading listed any of them: those were not compared
/// with the mirror (nothing of the second reading is written), so the pass
/// cannot say it confirmed every lead (mirror::Covered); and how many of
/// its entries name no lead ([`Confirmed`]).
async fn confirm_unseen(
    store: &Store,
    client: &Arc<Client>,
    business_id: &str,
    settings: PassSettings,
    run_id: i64,
    seen: &mut mirror::Fingerprints,
    stop: &CancellationToken,
) -> Result<Confirmed, String> {
    let unseen = {
        let (id, now, snapshot) = (business_id.to_string(), crate::time::now(), seen.clone());
        store
            .call(move |c| mirror::count_unseen(c, &id, run_id, &snapshot, &now))
            .await
            .map_err(|e| format!("cannot count unlisted leads: {e:#}"))?
    };
    if unseen == 0 {
        return Ok(Confirmed {
            unseen,
            found_again: false,
            unnamed: 0,
        });
    }
    let mut found_again = false;
    let mut unnamed = 0i64;
    let mut listing = Listing::new(client.base_url(), settings.page_size)?;
    let mut cursor = listing.first();
    let mut confirm = false;
    let mut pages = 0i64;
    loop {
        if stop.is_cancelled() {
            return Err("interrupted by shutdown".into());
        }
        let page = match client.list_page(business_id, &cursor).await {
            Ok(page) => page,
            Err(e) if confirm && refused(&e) && !stop.is_cancelled() => {
                listing.confirm_failed(&e.message);
                return Err(format!(
                    "re-reading the listing to confirm unlisted leads: its end is unknown ({})",
                    listing.unknown_why()
                ));
            }
            // Read on unproven: its end will be unknown (below), as a
            // refused confirmation's is.
            Err(e) if listing.proving() && refused(&e) && !stop.is_cancelled() => {
                cursor = proof_refused(&mut listing, &e);
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "re-reading the listing to confirm {unseen} unlisted leads: {}",
                    e.message
                ));
            }
        };
        pages += 1;
        let ids = page.leads.iter().map(|l| &l.negotiation_id);
        for id in ids.chain(&page.unread_ids) {
            found_again |= seen.insert(mirror::id_fingerprint(id));
        }
        unnamed += page.unnamed;
        match listing.advance(&page)? {
            Step::Next(next) => (cursor, confirm) = (next, false),
            Step::Confirm(next) => (cursor, confirm) = (next, true),
            Step::End(End::Known) => break,
            Step::End(End::Unknown) => {
                return Err(format!(
                    "re-reading the listing to confirm unlisted leads: its end is unknown ({})",
                    listing.unknown_why()
                ));
            }
        }
        if pages >= MAX_PAGES {
            return Err(format!(
                "stopped after {MAX_PAGES} pages: the listing does not end"
            ));
        }
    }
    info!(
        unseen,
        pages, "unlisted leads confirmed by a second reading of the listing"
    );
    Ok(Confirmed {
        unseen,
        found_again,
        unnamed,
    })
}

/// Pages a full scan may have fetched and not yet written. The pages waiting
/// when the writer thread is free go into one transaction (up to this many):
/// fewer commits, and each index page dirtied by several pages is written to
/// the WAL once. A crash still leaves whole pages only.
pub const PAGES_AHEAD: usize = 8;

/// A batch takes no more pages once it holds this many leads (pages of up
/// to 1,000 leads would otherwise make one job of 8,000).
const BATCH_LEADS: usize = 1_000;

/// How long a full scan's batch waits for more pages before it is
/// written (when no webhook delivery came within [`URGENT_WINDOW`]): the
/// mirror shows a page at most this much later, and a scan whose pages come
/// every few ms writes them in transactions of several pages.
const BATCH_WAIT: Duration = Duration::from_millis(50);

/// While webhook deliveries came within this window, a full scan writes one
/// page per transaction: a delivery overtakes queued jobs but waits for the
/// transaction in progress (measured: p99 of a delivery during a 100k full
/// sync 70 ms with batches of 8 pages, 42-44 ms with one page).
const URGENT_WINDOW: Duration = Duration::from_secs(60);

#[allow(clippy::too_many_arguments)]
async fn read_pages(
    store: &Store,
    client: &Arc<Client>,
    business_id: &str,
    kind: ScanKind,
    settings: PassSettings,
    run_id: i64,
    (stats, unnamed): (&mut RunStats, &mut i64),
    seen: &mut mirror::Fingerprints,
    (style, why): (&mut Option<Style>, &mut Option<String>),
    stop: &CancellationToken,
) -> Result<End, String> {
    if kind == ScanKind::Full {
        return read_all_pages(
            store,
            client,
            business_id,
            settings,
            run_id,
            (stats, unnamed),
            seen,
            (style, why),
            stop,
        )
        .await;
    }
    let mut listing = Listing::new(client.base_url(), settings.page_size)?;
    let mut unchanged_pages = 0u32;
    let mut page = fetch(client.clone(), business_id.to_string(), listing.first())
        .await
        .map_err(|e| e.message)?;
    loop {
        let step = listing.advance(&page);
        *style = Some(listing.style());
        let step = step?;
        if step == Step::End(End::Unknown) {
            *why = Some(listing.unknown_why());
            if listing.repeated() {
                // The same leads as a page already written.
                return Ok(End::Unknown);
            }
        }
        drop_asked_back(&listing, &mut page);
        warn_skipped(&page);
        let mut ctx = page_context(business_id, run_id);
        ctx.read_at = page.read_at.take();
        let skipped = page.skipped;
        let leads = std::mem::take(&mut page.leads);
        // Only the first MAX_COVERED_IDS are recorded (the newest leads):
        // the rest are not collected.
        let room = mirror::MAX_COVERED_IDS.saturating_sub(seen.len());
        let listed: Vec<u64> = leads
            .iter()
            .take(room)
            .map(|l| mirror::id_fingerprint(&l.negotiation_id))
            .collect();
        let page_stats = store
            .call(move |c| mirror::write_page(c, &ctx, &leads))
            .await
            .map_err(|e| format!("cannot write page {}: {e:#}", stats.pages + 1))?;
        // The leads of a page written are as it listed them (or kept as a
        // newer delivery left them): recorded when the pass ends
        // (mirror::Covered).
        seen.extend(listed);
        stats.add_page(page_stats, skipped);
        crate::metrics::sync_page(business_id, &page_stats);
        if page_stats.inserted + page_stats.updated == 0 {
            unchanged_pages += 1;
        } else {
            unchanged_pages = 0;
        }
        let (next, confirm) = match step {
            Step::End(end) => return Ok(end),
            Step::Next(cursor) => (cursor, false),
            // A short page that did not echo its limit: a head scan marks
            // nothing missing, so it asks past the page only while pages
            // bring news (a capped page of new leads may hide more).
            Step::Confirm(_) if page_stats.inserted + page_stats.updated == 0 => {
                return Ok(End::Known);
            }
            Step::Confirm(cursor) => (cursor, true),
        };
        if unchanged_pages >= settings.stop_after_unchanged_pages {
            // A head scan never marks anything missing: its end is its own.
            return Ok(End::Known);
        }
        if stats.pages >= MAX_PAGES {
            return Err(format!(
                "stopped after {MAX_PAGES} pages: the listing does not end"
            ));
        }
        if stop.is_cancelled() {
            return Err("interrupted by shutdown".into());
        }
        let mut next = next;
        page = loop {
            match fetch(client.clone(), business_id.to_string(), next).await {
                Ok(page) => break page,
                Err(e) if confirm && refused(&e) && !stop.is_cancelled() => {
                    let end = listing.confirm_failed(&e.message);
                    *why = Some(listing.unknown_why());
                    return Ok(end);
                }
                Err(e) if listing.proving() && refused(&e) && !stop.is_cancelled() => {
                    next = proof_refused(&mut listing, &e);
                }
                Err(e) => return Err(e.message),
            }
        };
    }
}

/// Drops from `page` the lead it starts with when that lead was asked back
/// from the page before ([`Listing::asked_back`]): that page listed it, and
/// it is written and counted once.
fn drop_asked_back(listing: &Listing, page: &mut crate::thumbtack::model::Page) {
    let Some(lead) = listing.asked_back() else {
        return;
    };
    if page.leads.first().is_some_and(|l| l.negotiation_id == lead) {
        page.leads.remove(0);
    } else if page.unchanged.first().is_some_and(|id| id == lead) {
        page.unchanged.remove(0);
    }
}

/// The request proving the first full page of an offset listing
/// ([`Listing::proving`]) was refused, as a confirmation can be (a final
/// 4xx, [`refused`]): the listing is read on at the next offset unproven,
/// its end unknown; any other failure fails the pass, as on any page.
fn proof_refused(listing: &mut Listing, e: &ApiError) -> Cursor {
    let cursor = listing.proof_refused(&e.message);
    warn!(
        error = %e.message,
        next = %cursor.to_query_string(),
        "the proof that the server pages by lead offset was refused; reading on unproven (the end will be unknown)"
    );
    cursor
}

/// A [`Step::Confirm`] request the API itself refused (a final 4xx, as a
/// strict server answers `offset` it does not know): the listing cannot be
/// confirmed, its end is unknown. Any other failure (429 or 5xx beyond
/// retries, the network, a refused token) fails the pass as any page's
/// failure does: it says nothing of the listing.
fn refused(e: &ApiError) -> bool {
    e.disposition == Disposition::Dead
}

/// At most this many unread ids are named in a page's warning (a page of
/// unreadable leads, seen on every pass, would otherwise log them all).
const UNREAD_IDS_LOGGED: usize = 10;

fn warn_skipped(page: &Page) {
    if page.skipped > 0 {
        warn!(
            skipped = page.skipped,
            unread = %unread_note(&page.unread_ids),
            "list entries that are no lead with a negotiationID were not stored (those named in `unread` count as listed)"
        );
    }
}

/// The first [`UNREAD_IDS_LOGGED`] ids, then how many more there are.
fn unread_note(ids: &[String]) -> String {
    let shown = &ids[..ids.len().min(UNREAD_IDS_LOGGED)];
    let mut note = format!("{shown:?}");
    if ids.len() > shown.len() {
        note.push_str(&format!(" and {} more", ids.len() - shown.len()));
    }
    note
}

fn page_context(business_id: &str, run_id: i64) -> PageContext {
    let now_t = chrono::Utc::now();
    PageContext {
        business_id: business_id.to_string(),
        run_id: Some(run_id),
        source: mirror::Source::Poll,
        now: crate::time::fmt(now_t),
        stale_before: crate::time::fmt(now_t - mirror::LAST_SEEN_GRANULARITY),
        insert_first: false,
        read_at: None,
    }
}

/// The pages of one write transaction: `first`, then the pages that arrive
/// within `wait`, up to `most` pages and [`BATCH_LEADS`] entries. Pages
/// arriving a little slower than they are written (a few ms of latency)
/// would each be a transaction of their own, and every transaction writes
/// the index pages it touched to the WAL again.
async fn gather(
    rx: &mut tokio::sync::mpsc::Receiver<Page>,
    first: Page,
    most: usize,
    wait: Duration,
) -> Vec<Page> {
    let until = tokio::time::Instant::now() + wait;
    let mut leads = first.entries();
    let mut batch = vec![first];
    while batch.len() < most && leads < BATCH_LEADS as u64 {
        let next = match rx.try_recv() {
            Ok(p) => Some(p),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                tokio::time::timeout_at(until, rx.recv())
                    .await
                    .ok()
                    .flatten()
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
        };
        let Some(p) = next else { break };
        leads += p.entries();
        batch.push(p);
    }
    batch
}

/// What a full scan's fetcher and writer decide of a listed lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// As mirrored when the scan started (and not written since): nothing to write.
    Unchanged,
    /// Mirrored, but not as listed: written (and from now on always written).
    Changed,
    /// Not among the business's leads when the scan started: inserted.
    Unknown,
    /// The known leads are not read (yet, or the read failed): looked up.
    NotRead,
}

/// The business's leads as mirrored when a full scan started (read once,
/// while its first page is fetched), and those handed to the writer since.
/// A listed lead exactly as it was (same payload hash, not missing,
/// `last_seen_at` not due) is counted unchanged without a query on the
/// writer thread, and without reading it past its id once the read is done;
/// a page of leads none of which was known is inserted without looking each
/// up first. A lead another writer changed meanwhile (a webhook's
/// redelivery) is left as that writer made it.
#[derive(Default)]
struct ScanKnown {
    leads: std::sync::OnceLock<mirror::KnownLeads>,
    /// Leads that take the writer's ordinary path for the rest of the scan:
    /// found changed (by the fetcher or the writer, whichever checks it
    /// first; the leads of pages fetched before the known leads were read
    /// are checked once they are, [`ScanKnown::ready`]), or listed while
    /// the known leads could not be read. A later listing of one is compared
    /// with what its write left, not with the start (the listing may name a
    /// lead twice).
    looked_up: std::sync::Mutex<mirror::Fingerprints>,
    /// The known leads could not be read (every lead is looked up).
    read_failed: std::sync::atomic::AtomicBool,
    /// Signalled once the read is done (or failed): see [`ScanKnown::resolved`].
    read_done: tokio::sync::Notify,
}

impl ScanKnown {
    /// The known leads are read, or cannot be.
    fn resolved(&self) -> bool {
        self.leads.get().is_some() || self.read_failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until [`ScanKnown::resolved`]. The fetcher asks for its second
    /// page only then: a page read before the known leads are is read in
    /// full, where most of a re-sync's leads need reading only to their id
    /// (at 0 ms latency the fetcher otherwise read up to [`PAGES_AHEAD`]
    /// pages in full while a business's 5,000 known leads were read; the
    /// writer writes nothing before the read is done either way).
    async fn wait_resolved(&self) {
        while !self.resolved() {
            // A permit is stored if the signal comes first (one waiter).
            self.read_done.notified().await;
        }
    }

    /// The known leads are read, and there are some (a first sync has none:
    /// its leads are not worth a first look at their ids).
    fn any_known(&self) -> bool {
        self.leads.get().is_some_and(|l| !l.is_empty())
    }

    /// The known leads are read and there are none, or they cannot be
    /// read: no lead of this scan will be counted unchanged by the fetcher.
    fn never_checked(&self) -> bool {
        self.read_failed.load(std::sync::atomic::Ordering::Acquire)
            || self.leads.get().is_some_and(|l| l.is_empty())
    }

    /// Whether the fetcher asks the check for its next page. First, the
    /// leads of the pages it read since (`pending`, see
    /// [`ScanKnown::read_unchecked`]) are checked as the writer will: the writer
    /// may not have handled those pages yet, and a lead listed there not as
    /// it was at the start must join `looked_up` before a later listing of
    /// it is checked (that listing is written: the last listing wins).
    fn ready(&self, pending: &mut Vec<(u64, i64)>, stale_before: &str) -> bool {
        if self.never_checked() {
            *pending = Vec::new();
            return false;
        }
        if !self.any_known() {
            return false;
        }
        for (id, hash) in pending.drain(..) {
            self.check(id, hash, stale_before);
        }
        true
    }

    /// After the fetcher read a page, without the check or with it (whose
    /// answers left `looked_up` alone, [`ScanKnown::fetcher_check`]): its
    /// leads are kept for [`ScanKnown::ready`] (a few pages at most: the
    /// writer takes no page before the known leads are read), unless no
    /// lead of this scan will be checked.
    fn read_unchecked(&self, pending: &mut Vec<(u64, i64)>, page: &Page) {
        if !self.never_checked() {
            pending.extend(
                page.leads
                    .iter()
                    .map(|l| (mirror::id_fingerprint(&l.negotiation_id), l.hash)),
            );
        }
    }

    /// The check the fetcher asks while it reads one page (a
    /// `parse_page_with` check, for every response to one request). It
    /// leaves `looked_up` alone: a response may be read in part and found
    /// unreadable (the checked reader asks about a lead before serde_json
    /// sees it), then fetched again, and a lead asked about with the hash
    /// of bytes never read must not take the writer's path for the rest of
    /// the scan. The leads the page did read join it through
    /// [`ScanKnown::read_unchecked`] and [`ScanKnown::ready`], before the
    /// next page is asked about. A lead found changed is remembered for the
    /// rest of this request, so a page listing it again finds it changed
    /// (as `looked_up` would): if that was a response found unreadable,
    /// the lead is only read, and the writer's check still finds it
    /// unchanged.
    fn fetcher_check<'a>(
        &'a self,
        stale_before: &'a str,
    ) -> impl Fn(&str, i64) -> bool + Sync + 'a {
        let changed_here = std::sync::Mutex::new(mirror::Fingerprints::default());
        move |id: &str, hash: i64| {
            let id = mirror::id_fingerprint(id);
            let mut changed_here = changed_here
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if changed_here.contains(&id) {
                return false;
            }
            match self.verdict(id, hash, stale_before, false) {
                Verdict::Unchanged => true,
                Verdict::Changed | Verdict::NotRead => {
                    changed_here.insert(id);
                    false
                }
                Verdict::Unknown => false,
            }
        }
    }

    fn check(&self, id: u64, hash: i64, stale_before: &str) -> Verdict {
        self.verdict(id, hash, stale_before, true)
    }

    /// [`ScanKnown::check`]; a lead found changed (or listed while the
    /// known leads are not read) joins `looked_up` when `remember`.
    fn verdict(&self, id: u64, hash: i64, stale_before: &str, remember: bool) -> Verdict {
        let mut looked_up = self
            .looked_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if looked_up.contains(&id) {
            return Verdict::Changed;
        }
        let Some(leads) = self.leads.get() else {
            if remember {
                looked_up.insert(id);
            }
            return Verdict::NotRead;
        };
        match leads.get(&id) {
            None => Verdict::Unknown,
            Some(known) if known.unchanged(hash, stale_before) => Verdict::Unchanged,
            Some(_) => {
                if remember {
                    looked_up.insert(id);
                }
                Verdict::Changed
            }
        }
    }
}

/// A full scan: fetching runs ahead of writing by up to [`PAGES_AHEAD`]
/// pages, and the writer takes every page waiting into one transaction.
/// Every page fetched before a failure (or a shutdown) is still written.
#[allow(clippy::too_many_arguments)]
async fn read_all_pages(
    store: &Store,
    client: &Arc<Client>,
    business_id: &str,
    settings: PassSettings,
    run_id: i64,
    (stats, unnamed): (&mut RunStats, &mut i64),
    seen: &mut mirror::Fingerprints,
    (style, why): (&mut Option<Style>, &mut Option<String>),
    stop: &CancellationToken,
) -> Result<End, String> {
    let mut listing = Listing::new(client.base_url(), settings.page_size)?;
    // The business's known leads (ScanKnown), read from a connection of
    // their own while the first page is fetched.
    let known = {
        let id = business_id.to_string();
        store.read(move |c| mirror::known_leads(c, &id))
    };
    let shared = ScanKnown::default();
    let shared = &shared;
    let (pages_tx, mut pages_rx) = tokio::sync::mpsc::channel::<Page>(PAGES_AHEAD);
    let fetching = async move {
        let mut cursor = listing.first();
        // The request is a Step::Confirm: if it is refused, the end is unknown.
        let mut confirm = false;
        let mut fetched = 0i64;
        // Leads read before the check could be asked (ScanKnown::ready).
        let mut pending = Vec::new();
        loop {
            if fetched > 0 && !shared.resolved() {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return Err("interrupted by shutdown".to_string()),
                    () = shared.wait_resolved() => {}
                }
            }
            // Once the known leads are read, a lead listed as it was is not
            // read past its id (no columns, no copy of its payload).
            let stale_before = page_context(business_id, run_id).stale_before;
            let unchanged = shared.fetcher_check(&stale_before);
            // A stop does not wait for the page in flight (none of it is
            // written; pages already fetched are). Dropping the request cuts
            // no token refresh: refreshes run detached and are awaited by
            // shutdown.
            let checked = shared.ready(&mut pending, &stale_before);
            let page = tokio::select! {
                biased;
                () = stop.cancelled() => return Err("interrupted by shutdown".to_string()),
                page = client.list_page_with(business_id, &cursor, checked.then_some(&unchanged)) => {
                    match page {
                        Ok(page) => page,
                        Err(e) if confirm && refused(&e) && !stop.is_cancelled() => {
                            let end = listing.confirm_failed(&e.message);
                            *why = Some(listing.unknown_why());
                            return Ok(Some(end));
                        }
                        Err(e) if listing.proving() && refused(&e) && !stop.is_cancelled() => {
                            cursor = proof_refused(&mut listing, &e);
                            continue;
                        }
                        Err(e) => return Err(e.message),
                    }
                }
            };
            // Its leads found changed join `looked_up` (ScanKnown::ready,
            // before the next page is asked about).
            shared.read_unchecked(&mut pending, &page);
            let step = listing.advance(&page);
            *style = Some(listing.style());
            let step = step?;
            if step == Step::End(End::Unknown) {
                *why = Some(listing.unknown_why());
                if listing.repeated() {
                    // The same leads as a page already sent to the writer.
                    return Ok(Some(End::Unknown));
                }
            }
            fetched += 1;
            let mut page = page;
            drop_asked_back(&listing, &mut page);
            if pages_tx.send(page).await.is_err() {
                // The writer failed; its error is the pass's.
                return Ok(None);
            }
            (cursor, confirm) = match step {
                Step::End(end) => return Ok(Some(end)),
                Step::Next(cursor) => (cursor, false),
                Step::Confirm(cursor) => (cursor, true),
            };
            if fetched >= MAX_PAGES {
                return Err(format!(
                    "stopped after {MAX_PAGES} pages: the listing does not end"
                ));
            }
            if stop.is_cancelled() {
                return Err("interrupted by shutdown".to_string());
            }
        }
    };
    // `move`: when the writer fails, the channel closes and the fetcher stops.
    let writing = async move {
        match known.await {
            Ok(known) => {
                let _ = shared.leads.set(known);
            }
            Err(e) => {
                shared
                    .read_failed
                    .store(true, std::sync::atomic::Ordering::Release);
                tracing::debug!(error = %format!("{e:#}"), "cannot read the known leads; every lead is looked up");
            }
        }
        shared.read_done.notify_one();
        while let Some(first) = pages_rx.recv().await {
            let most = if store.urgent_within(URGENT_WINDOW) {
                1
            } else {
                PAGES_AHEAD
            };
            let batch = gather(&mut pages_rx, first, most, BATCH_WAIT).await;
            let mut jobs = Vec::with_capacity(batch.len());
            let mut skipped = Vec::with_capacity(batch.len());
            let mut unchanged = Vec::with_capacity(batch.len());
            for mut page in batch {
                warn_skipped(&page);
                skipped.push(page.skipped);
                let mut ctx = page_context(business_id, run_id);
                ctx.read_at = page.read_at.take();
                seen.extend(page.unchanged.iter().map(|id| mirror::id_fingerprint(id)));
                // Listed though unreadable: never marked missing for that.
                seen.extend(page.unread_ids.iter().map(|id| mirror::id_fingerprint(id)));
                // Listed, naming no lead: no unlisted lead is proven gone.
                *unnamed += page.unnamed;
                let mut leads = std::mem::take(&mut page.leads);
                let listed = leads.len() + page.unchanged.len();
                let mut all_unknown = true;
                leads.retain(|l| {
                    let id = mirror::id_fingerprint(&l.negotiation_id);
                    seen.insert(id);
                    match shared.check(id, l.hash, &ctx.stale_before) {
                        Verdict::Unchanged => false,
                        Verdict::Unknown => true,
                        Verdict::Changed | Verdict::NotRead => {
                            all_unknown = false;
                            true
                        }
                    }
                });
                unchanged.push((listed - leads.len()) as i64);
                ctx.insert_first = all_unknown;
                jobs.push((ctx, leads));
            }
            let written = if jobs.iter().all(|(_, leads)| leads.is_empty()) {
                vec![mirror::PageStats::default(); jobs.len()]
            } else {
                // All or none: a failure names every page the transaction held.
                let (first, last) = (stats.pages + 1, stats.pages + jobs.len() as i64);
                store
                    .call(move |c| mirror::write_pages(c, &jobs))
                    .await
                    .map_err(|e| match first == last {
                        true => format!("cannot write page {first}: {e:#}"),
                        false => format!("cannot write pages {first}–{last}: {e:#}"),
                    })?
            };
            for ((mut page_stats, skipped), unchanged) in
                written.into_iter().zip(skipped).zip(unchanged)
            {
                page_stats.unchanged += unchanged;
                stats.add_page(page_stats, skipped);
                crate::metrics::sync_page(business_id, &page_stats);
            }
        }
        Ok::<(), String>(())
    };
    tokio::pin!(fetching, writing);
    let mut fetched = None;
    let written = loop {
        tokio::select! {
            f = &mut fetching, if fetched.is_none() => fetched = Some(f),
            w = &mut writing => break w,
        }
    };
    // A failed write ends the pass at once: a fetch in flight is dropped.
    written?;
    fetched
        .ok_or_else(|| "the page fetcher stopped".to_string())??
        .ok_or_else(|| "the page writer stopped".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(leads: usize) -> Page {
        Page {
            unchanged: vec!["x".to_string(); leads],
            ..Page::default()
        }
    }

    #[test]
    fn a_pages_warning_names_ten_unread_ids_and_counts_the_rest() {
        let ids = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(unread_note(&ids(2)), r#"["0", "1"]"#);
        assert_eq!(unread_note(&ids(10)), format!("{:?}", ids(10)));
        assert_eq!(
            unread_note(&ids(5000)),
            format!("{:?} and 4990 more", ids(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pages_arriving_a_few_ms_apart_are_written_together() {
        // One page every 3 ms (a little slower than the writer): before,
        // each was a transaction of its own.
        let (tx, mut rx) = tokio::sync::mpsc::channel(PAGES_AHEAD);
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(3)).await;
                if tx.send(page(100)).await.is_err() {
                    return;
                }
            }
        });
        let first = rx.recv().await.unwrap();
        let batch = gather(&mut rx, first, PAGES_AHEAD, BATCH_WAIT).await;
        assert_eq!(batch.len(), PAGES_AHEAD);
        // Bounded: by entries, and by the wait when pages stop coming.
        let first = rx.recv().await.unwrap();
        let batch = gather(&mut rx, first, PAGES_AHEAD, BATCH_WAIT).await;
        assert_eq!(batch.len(), PAGES_AHEAD);
        let first = rx.recv().await.unwrap();
        let started = tokio::time::Instant::now();
        let batch = gather(&mut rx, first, PAGES_AHEAD, BATCH_WAIT).await;
        assert_eq!(batch.len(), 4, "the last pages, then the sender is gone");
        assert!(started.elapsed() < BATCH_WAIT);
        let (tx, mut rx) = tokio::sync::mpsc::channel(PAGES_AHEAD);
        tx.send(page(600)).await.unwrap();
        tx.send(page(600)).await.unwrap();
        tx.send(page(600)).await.unwrap();
        let first = rx.recv().await.unwrap();
        let batch = gather(&mut rx, first, PAGES_AHEAD, BATCH_WAIT).await;
        assert_eq!(batch.len(), 2, "stops once it holds {BATCH_LEADS} leads");
        let first = rx.recv().await.unwrap();
        let started = tokio::time::Instant::now();
        let batch = gather(&mut rx, first, PAGES_AHEAD, BATCH_WAIT).await;
        assert_eq!(batch.len(), 1);
        assert_eq!(started.elapsed(), BATCH_WAIT, "waited for more, then wrote");
        drop(tx);
    }

    /// A mirror in `dir` holding business `b`'s leads `(id, payload)`, seen
    /// now; and their payload hashes.
    fn mirror_of(
        dir: &tempfile::TempDir,
        leads: &[(&str, &str)],
    ) -> (rusqlite::Connection, Vec<i64>) {
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let now = crate::time::fmt(chrono::Utc::now());
        let mut hashes = Vec::new();
        for (id, payload) in leads {
            let hash = xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64;
            conn.execute(
                "INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                     first_seen_at, last_seen_at, changed_at) VALUES (?1, 'b', ?2, ?3, ?4, ?4, ?4)",
                rusqlite::params![id, payload, hash, now],
            )
            .unwrap();
            hashes.push(hash);
        }
        (conn, hashes)
    }

    #[test]
    fn an_unreadable_page_leaves_no_lead_found_changed() {
        // The fetcher's check is asked while a page is read; a response
        // that turns out unreadable (a corrupted lead, which the checked
        // reader delimits and asks about before serde_json sees it) is
        // fetched again. What was asked about it must not make the lead,
        // listed again as it was, be written (over a webhook's newer copy,
        // as an upsert of a listed copy would).
        let dir = tempfile::tempdir().unwrap();
        let was = r#"{"negotiationID":"x","v":1}"#;
        let (conn, hashes) = mirror_of(&dir, &[("x", was)]);
        let hash = hashes[0];
        let shared = ScanKnown::default();
        let _ = shared.leads.set(mirror::known_leads(&conn, "b").unwrap());
        let mut pending = Vec::new();
        let stale_before = page_context("b", 1).stale_before;
        assert!(shared.ready(&mut pending, &stale_before));
        let x = mirror::id_fingerprint("x");
        {
            // One page fetch: an unreadable response, then the same page
            // readable (the client's retry asks the same check).
            let unchanged = shared.fetcher_check(&stale_before);
            let corrupted = r#"{"data":[{"negotiationID":"x","v":tru}]}"#;
            assert!(
                crate::thumbtack::model::parse_page_with(corrupted.as_bytes(), Some(&unchanged))
                    .is_err()
            );
            let page = crate::thumbtack::model::parse_page_with(
                format!(r#"{{"data":[{was}]}}"#).as_bytes(),
                Some(&unchanged),
            )
            .unwrap();
            shared.read_unchecked(&mut pending, &page);
            assert!(shared.ready(&mut pending, &stale_before));
            // What the writer decides of each lead the page read.
            for l in &page.leads {
                assert_eq!(
                    shared.check(
                        mirror::id_fingerprint(&l.negotiation_id),
                        l.hash,
                        &stale_before
                    ),
                    Verdict::Unchanged
                );
            }
        }
        // A later page listing it as it was: not written either.
        assert_eq!(shared.check(x, hash, &stale_before), Verdict::Unchanged);
        let unchanged = shared.fetcher_check(&stale_before);
        let page = crate::thumbtack::model::parse_page_with(
            format!(r#"{{"data":[{was}]}}"#).as_bytes(),
            Some(&unchanged),
        )
        .unwrap();
        assert_eq!(page.unchanged, ["x"]);
        // Listed changed, then as it was: on one page, or on the next page,
        // the later listing is read (and written: the last listing wins).
        let changed = r#"{"negotiationID":"x","v":2}"#;
        let page = crate::thumbtack::model::parse_page_with(
            format!(r#"{{"data":[{changed},{was}]}}"#).as_bytes(),
            Some(&unchanged),
        )
        .unwrap();
        assert_eq!(page.leads.len(), 2);
        let fresh = ScanKnown::default();
        let _ = fresh.leads.set(mirror::known_leads(&conn, "b").unwrap());
        let page = crate::thumbtack::model::parse_page_with(
            format!(r#"{{"data":[{changed}]}}"#).as_bytes(),
            Some(&fresh.fetcher_check(&stale_before)),
        )
        .unwrap();
        fresh.read_unchecked(&mut pending, &page);
        assert!(fresh.ready(&mut pending, &stale_before));
        let page = crate::thumbtack::model::parse_page_with(
            format!(r#"{{"data":[{was}]}}"#).as_bytes(),
            Some(&fresh.fetcher_check(&stale_before)),
        )
        .unwrap();
        assert_eq!(page.leads.len(), 1);
        assert_ne!(fresh.check(x, hash, &stale_before), Verdict::Unchanged);
    }

    /// The fetcher's wait for the known leads ends when they are read or
    /// cannot be, whether the writer signals before or after it waits.
    #[tokio::test]
    async fn the_fetcher_waits_for_the_known_leads_until_they_are_read_or_cannot_be() {
        let within = |s: &'static ScanKnown| {
            tokio::time::timeout(Duration::from_secs(30), s.wait_resolved())
        };
        // Signalled first: the read failed.
        let failed: &'static ScanKnown = Box::leak(Box::default());
        assert!(!failed.resolved());
        failed
            .read_failed
            .store(true, std::sync::atomic::Ordering::Release);
        failed.read_done.notify_one();
        within(failed).await.expect("a failed read ends the wait");
        // Signalled while the fetcher waits: the read is done.
        let read: &'static ScanKnown = Box::leak(Box::default());
        let waiting = tokio::spawn(within(read));
        tokio::task::yield_now().await;
        let _ = read.leads.set(mirror::KnownLeads::default());
        read.read_done.notify_one();
        waiting.await.unwrap().expect("a done read ends the wait");
        assert!(read.resolved());
    }

    #[test]
    fn a_lead_listed_before_the_known_leads_were_read_is_never_counted_unchanged_later() {
        // Page 1, fetched while the known leads were read, lists the lead
        // changed; page 3 lists it as it was when the scan started (a
        // listing shift). The writer may not have written page 1 yet when
        // the fetcher checks page 3: that listing must still be written,
        // as every later listing is (the last listing wins).
        let dir = tempfile::tempdir().unwrap();
        let was = r#"{"negotiationID":"x","v":1}"#;
        let was_y = r#"{"negotiationID":"y"}"#;
        let (conn, hashes) = mirror_of(&dir, &[("x", was), ("y", was_y)]);
        let (hash, hash_y) = (hashes[0], hashes[1]);
        let shared = ScanKnown::default();
        let mut pending = Vec::new();
        let stale_before = page_context("b", 1).stale_before;
        assert!(
            !shared.ready(&mut pending, &stale_before),
            "nothing read yet"
        );
        let page1 = crate::thumbtack::model::parse_page(
            format!(r#"{{"data":[{{"negotiationID":"x","v":2}},{was_y}]}}"#).as_bytes(),
        )
        .unwrap();
        shared.read_unchecked(&mut pending, &page1);
        let _ = shared.leads.set(mirror::known_leads(&conn, "b").unwrap());
        assert!(shared.ready(&mut pending, &stale_before));
        let x = mirror::id_fingerprint("x");
        assert_ne!(shared.check(x, hash, &stale_before), Verdict::Unchanged);
        // A lead listed there as it was is still unchanged (the writer
        // needs no lookup for it).
        let y = mirror::id_fingerprint("y");
        assert_eq!(shared.check(y, hash_y, &stale_before), Verdict::Unchanged);
        // A first sync (no known leads) keeps nothing of its pages.
        let first = ScanKnown::default();
        let _ = first.leads.set(Default::default());
        let mut pending = Vec::new();
        first.read_unchecked(&mut pending, &page1);
        assert!(!first.ready(&mut pending, &stale_before));
        assert!(pending.is_empty());
        assert_eq!(first.check(x, hash, &stale_before), Verdict::Unknown);
    }
}
