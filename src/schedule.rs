//! Scheduling many businesses (SPEC §11): businesses that share a cron
//! expression are one schedule (no timer per business); every due pass goes
//! into one fair queue — oldest due first, one entry per business, never two
//! passes of one business at once — that `daemon.sync_concurrency` workers
//! drain under the rate budget. Also the arithmetic behind `config check`'s
//! budget warning.

use crate::config::{Business, Config};
use crate::sync::ScanKind;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// One schedule: a scan kind and its cron expression (six fields).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduleKey {
    pub kind: ScanKind,
    pub expr: String,
}

impl std::fmt::Display for ScheduleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} `{}`", self.kind.as_str(), self.expr)
    }
}

/// The parsed cron expression, with the settings `config::normalize_cron` checks.
/// Day of month and weekday, both restricted (neither exactly `*` or `?`),
/// fire on a day matching either, not only on one matching both; `+` before
/// the weekday asks for both (`config::cron_day_warning` says so).
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(false)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression `{expr}`: {e}"))
}

/// The shortest gap between consecutive occurrences over the next 64: the
/// period the schedule's passes must fit in.
pub fn period(cron: &croner::Cron, from: DateTime<Utc>) -> Option<Duration> {
    let mut prev = cron.find_next_occurrence(&from, false).ok()?;
    let mut shortest: Option<Duration> = None;
    for _ in 0..64 {
        let Ok(next) = cron.find_next_occurrence(&prev, false) else {
            break;
        };
        let gap = (next - prev).to_std().ok()?;
        shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
        prev = next;
    }
    shortest
}

/// The two schedules of a business (its own, or the `[poll]` ones).
fn keys_of(b: &Business) -> [ScheduleKey; 2] {
    [
        ScheduleKey {
            kind: ScanKind::Head,
            expr: b.schedule.clone(),
        },
        ScheduleKey {
            kind: ScanKind::Full,
            expr: b.full_schedule.clone(),
        },
    ]
}

/// One schedule's businesses and its next occurrence.
#[derive(Debug, Clone)]
pub struct Group {
    pub cron: croner::Cron,
    pub businesses: BTreeSet<String>,
    pub next: Option<DateTime<Utc>>,
}

/// Every distinct schedule of the enabled businesses. A reload changes only
/// the entries of businesses whose schedules changed.
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub groups: BTreeMap<ScheduleKey, Group>,
    /// The latest `now` [`Schedules::take_due`] was given: a later `now`
    /// before it means the wall clock went back.
    seen: Option<DateTime<Utc>>,
}

impl Schedules {
    /// The schedules of `config`'s enabled businesses, next occurrences after `now`.
    pub fn from_config(config: &Config, now: DateTime<Utc>) -> Result<Schedules, String> {
        let mut s = Schedules::default();
        for b in config.businesses.iter().filter(|b| b.enabled) {
            s.add(b, now)?;
        }
        Ok(s)
    }

    /// Adds an (enabled) business to its two schedules.
    pub fn add(&mut self, b: &Business, now: DateTime<Utc>) -> Result<(), String> {
        self.seen = self.seen.max(Some(now));
        for key in keys_of(b) {
            let group = match self.groups.entry(key) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let cron = parse_cron(&v.key().expr)?;
                    let next = cron.find_next_occurrence(&now, false).ok();
                    v.insert(Group {
                        cron,
                        businesses: BTreeSet::new(),
                        next,
                    })
                }
            };
            group.businesses.insert(b.id.clone());
        }
        Ok(())
    }

    /// Removes a business from its two schedules; a schedule left empty goes.
    pub fn remove(&mut self, b: &Business) {
        for key in keys_of(b) {
            if let Some(g) = self.groups.get_mut(&key) {
                g.businesses.remove(&b.id);
                if g.businesses.is_empty() {
                    self.groups.remove(&key);
                }
            }
        }
    }

    /// The earliest next occurrence of any schedule.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.groups.values().filter_map(|g| g.next).min()
    }

    /// Schedules whose occurrence has come by `now`: their key and the
    /// occurrence (the time their passes are due). Each advances to its next
    /// occurrence after `now` (missed occurrences collapse into one). When
    /// the wall clock went back since the last call (it was ahead, then
    /// corrected), each next occurrence is counted again from `now`: one
    /// counted from the clock ahead would hold the schedule back until
    /// that time (a year, for a clock a year ahead).
    pub fn take_due(&mut self, now: DateTime<Utc>) -> Vec<(ScheduleKey, DateTime<Utc>)> {
        if self.seen.is_some_and(|seen| now < seen) {
            for g in self.groups.values_mut() {
                let fresh = g.cron.find_next_occurrence(&now, false).ok();
                if fresh.is_some() && (g.next.is_none() || fresh < g.next) {
                    g.next = fresh;
                }
            }
        }
        self.seen = Some(now);
        let mut due = Vec::new();
        for (key, g) in self.groups.iter_mut() {
            if let Some(at) = g.next.filter(|at| *at <= now) {
                due.push((key.clone(), at));
                g.next = g.cron.find_next_occurrence(&now, false).ok();
            }
        }
        due
    }
}

/// Applies the difference between two configurations to `schedules`,
/// touching only businesses whose schedules or enabled state changed.
pub fn apply_diff(
    schedules: &mut Schedules,
    old: &Config,
    new: &Config,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let sched = |b: &Business| (b.enabled, b.schedule.clone(), b.full_schedule.clone());
    for o in old.businesses.iter().filter(|b| b.enabled) {
        if new.business(&o.id).is_none_or(|n| sched(n) != sched(o)) {
            schedules.remove(o);
        }
    }
    for n in new.businesses.iter().filter(|b| b.enabled) {
        if old.business(&n.id).is_none_or(|o| sched(n) != sched(o)) {
            schedules.add(n, now)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The fair queue.

/// Why a pass is wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A schedule's occurrence.
    Schedule(ScheduleKey),
    /// The first pass at start or when a reload adds the business.
    Initial,
    /// A `sync_requests` row, by the daemon's ticket for it (not the row's
    /// id, which a program may delete and give to another request).
    Request(i64),
}

/// A pass taken from the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub business_id: String,
    pub kind: ScanKind,
    /// When it became due (milliseconds since the epoch).
    pub due_ms: i64,
    /// The `sync_requests` tickets this pass answers.
    pub requests: Vec<i64>,
    /// The schedule it came from, if it did.
    pub schedule: Option<ScheduleKey>,
}

/// What [`SyncQueue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// A new entry at its place by due time.
    Queued,
    /// The business already waited: the entry keeps its (earlier) place and
    /// takes the larger kind and the request.
    Merged,
    /// A pass of the business is running: this one runs right after it.
    AfterRunning,
    /// A scheduled tick found a pass running that covers it: skipped (SPEC §4).
    Skipped,
}

/// Oldest due first; one entry per business; a running business is never
/// handed out again until it finishes.
#[derive(Debug, Default)]
pub struct SyncQueue {
    /// (due, arrival) → business: the order passes are handed out in.
    order: BTreeSet<(i64, u64, String)>,
    waiting: HashMap<String, (u64, Job)>,
    /// Running businesses: the kind running, and a pass to queue after it.
    running: HashMap<String, (ScanKind, Option<Job>)>,
    arrivals: u64,
}

fn merge(into: &mut Job, kind: ScanKind, request: Option<i64>) {
    into.kind = into.kind.max(kind);
    into.requests.extend(request);
}

impl SyncQueue {
    /// Wants a pass of `business_id`, due at `due_ms`.
    pub fn push(
        &mut self,
        business_id: &str,
        kind: ScanKind,
        due_ms: i64,
        origin: Origin,
    ) -> Pushed {
        let request = match origin {
            Origin::Request(id) => Some(id),
            _ => None,
        };
        if let Some((running, after)) = self.running.get_mut(business_id) {
            if let Some(after) = after {
                merge(after, kind, request);
                return Pushed::AfterRunning;
            }
            // A tick the running pass already covers is skipped; a request,
            // or a full scan while a head scan runs, waits for it.
            if matches!(origin, Origin::Schedule(_) | Origin::Initial) && *running >= kind {
                return Pushed::Skipped;
            }
            *after = Some(Job {
                business_id: business_id.to_string(),
                kind,
                due_ms,
                requests: request.into_iter().collect(),
                schedule: match origin {
                    Origin::Schedule(k) => Some(k),
                    _ => None,
                },
            });
            return Pushed::AfterRunning;
        }
        if let Some((_, job)) = self.waiting.get_mut(business_id) {
            merge(job, kind, request);
            return Pushed::Merged;
        }
        let job = Job {
            business_id: business_id.to_string(),
            kind,
            due_ms,
            requests: request.into_iter().collect(),
            schedule: match origin {
                Origin::Schedule(k) => Some(k),
                _ => None,
            },
        };
        self.insert(job);
        Pushed::Queued
    }

    fn insert(&mut self, job: Job) {
        self.arrivals += 1;
        self.order
            .insert((job.due_ms, self.arrivals, job.business_id.clone()));
        self.waiting
            .insert(job.business_id.clone(), (self.arrivals, job));
    }

    /// The oldest due pass; its business counts as running until [`finish`](Self::finish).
    pub fn pop(&mut self) -> Option<Job> {
        let (_, _, business_id) = self.order.pop_first()?;
        let (_, job) = self.waiting.remove(&business_id)?;
        self.running.insert(business_id, (job.kind, None));
        Some(job)
    }

    /// A pass ended: a pass wanted meanwhile (a request, a full scan) is
    /// queued at its own due time.
    pub fn finish(&mut self, business_id: &str) {
        if let Some((_, Some(after))) = self.running.remove(business_id) {
            self.insert(after);
        }
    }

    /// Forgets a business (a reload removed or disabled it): its waiting
    /// pass and the one waiting for its running pass. Returns the requests
    /// they carried, which will not be answered by a pass.
    pub fn remove(&mut self, business_id: &str) -> Vec<i64> {
        let mut requests = Vec::new();
        if let Some((arrival, job)) = self.waiting.remove(business_id) {
            self.order
                .remove(&(job.due_ms, arrival, business_id.to_string()));
            requests.extend(job.requests);
        }
        if let Some((_, after)) = self.running.get_mut(business_id)
            && let Some(job) = after.take()
        {
            requests.extend(job.requests);
        }
        requests
    }

    /// After a reload changed schedules: a waiting pass tagged with a
    /// schedule its business is no longer in counts, in the lag, under the
    /// business's schedule of the same kind now (none when it has none).
    /// Else a backlog queued before `[poll] schedule` changed was shown
    /// under no schedule at all: `status` said nothing waits while
    /// thousands of passes did.
    pub fn retag(&mut self, schedules: &Schedules) {
        // A business has one schedule of each kind: one map, built in one
        // pass over the schedules, then one look-up per waiting pass
        // (linear, as a reload must be: SPEC §11).
        let mut now_in: HashMap<(&str, ScanKind), &ScheduleKey> = HashMap::new();
        for (key, g) in &schedules.groups {
            for b in &g.businesses {
                now_in.entry((b.as_str(), key.kind)).or_insert(key);
            }
        }
        let current = |business_id: &str, key: &ScheduleKey| -> Option<ScheduleKey> {
            if schedules
                .groups
                .get(key)
                .is_some_and(|g| g.businesses.contains(business_id))
            {
                return Some(key.clone());
            }
            now_in.get(&(business_id, key.kind)).map(|k| (*k).clone())
        };
        let jobs = self.waiting.values_mut().map(|(_, job)| job).chain(
            self.running
                .values_mut()
                .filter_map(|(_, after)| after.as_mut()),
        );
        for job in jobs {
            if let Some(key) = &job.schedule {
                job.schedule = current(&job.business_id, key);
            }
        }
    }

    /// Passes waiting (not running).
    pub fn waiting(&self) -> usize {
        self.order.len()
    }

    /// Passes running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// True when a pass of the business is running.
    pub fn is_running(&self, business_id: &str) -> bool {
        self.running.contains_key(business_id)
    }

    /// Per schedule: how many of its passes wait and since when the oldest
    /// has been due (the schedule's lag is now minus that).
    pub fn lag(&self) -> BTreeMap<ScheduleKey, (usize, i64)> {
        let mut out: BTreeMap<ScheduleKey, (usize, i64)> = BTreeMap::new();
        for (_, job) in self.waiting.values() {
            if let Some(key) = &job.schedule {
                let e = out.entry(key.clone()).or_insert((0, job.due_ms));
                e.0 += 1;
                e.1 = e.1.min(job.due_ms);
            }
        }
        out
    }

    /// The oldest due time of any waiting pass.
    pub fn oldest_due_ms(&self) -> Option<i64> {
        self.order.first().map(|(due, _, _)| *due)
    }
}

// ---------------------------------------------------------------------------
// The budget arithmetic (`config check`).

/// One schedule's share of the request budget.
#[derive(Debug, Clone)]
pub struct BudgetLine {
    pub key: ScheduleKey,
    pub businesses: usize,
    /// Listing requests one pass needs at least.
    pub pages_per_pass: u32,
    pub period: Duration,
    /// `businesses × pages_per_pass ÷ period`.
    pub requests_per_second: f64,
}

/// Whether the schedules fit in `api.max_requests_per_second`.
#[derive(Debug, Clone)]
pub struct Budget {
    pub lines: Vec<BudgetLine>,
    pub needed: f64,
    pub allowed: f64,
}

impl Budget {
    /// The arithmetic for `config`'s enabled businesses. A head pass reads at
    /// least `stop_after_unchanged_pages` pages, a full pass at least one (its
    /// real count depends on how many leads a business has).
    pub fn of(config: &Config, now: DateTime<Utc>) -> Budget {
        let mut counts: BTreeMap<ScheduleKey, usize> = BTreeMap::new();
        for b in config.businesses.iter().filter(|b| b.enabled) {
            for key in keys_of(b) {
                *counts.entry(key).or_default() += 1;
            }
        }
        let head_pages = config.file.poll.stop_after_unchanged_pages.max(1);
        let mut lines = Vec::new();
        for (key, businesses) in counts {
            let Some(period) = parse_cron(&key.expr)
                .ok()
                .and_then(|c| period(&c, now))
                .filter(|p| !p.is_zero())
            else {
                continue;
            };
            let pages_per_pass = match key.kind {
                ScanKind::Head => head_pages,
                ScanKind::Full => 1,
            };
            let requests_per_second =
                businesses as f64 * f64::from(pages_per_pass) / period.as_secs_f64();
            lines.push(BudgetLine {
                key,
                businesses,
                pages_per_pass,
                period,
                requests_per_second,
            });
        }
        let needed = lines.iter().map(|l| l.requests_per_second).sum();
        Budget {
            lines,
            needed,
            allowed: config.file.api.max_requests_per_second,
        }
    }

    /// True when the schedules need more than the budget allows.
    pub fn exceeded(&self) -> bool {
        self.needed > self.allowed
    }

    /// `# `-prefixed lines for `config check`: the arithmetic, then a warning
    /// when the schedules cannot keep up.
    pub fn render(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.lines {
            out.push(format!(
                "# budget: {} scans `{}`: {} businesses × {}{} page{} ÷ {} s = {:.2} requests/s",
                l.key.kind.as_str(),
                l.key.expr,
                l.businesses,
                if l.key.kind == ScanKind::Full {
                    "≥ "
                } else {
                    ""
                },
                l.pages_per_pass,
                if l.pages_per_pass == 1 { "" } else { "s" },
                l.period.as_secs(),
                l.requests_per_second
            ));
        }
        if self.lines.is_empty() {
            return out;
        }
        out.push(format!(
            "# budget: together ≥ {:.2} requests/s of api.max_requests_per_second = {} ({:.0}%), before outbox sends",
            self.needed,
            self.allowed,
            100.0 * self.needed / self.allowed
        ));
        if self.exceeded() {
            for l in &self.lines {
                let work = l.businesses as f64 * f64::from(l.pages_per_pass) / self.allowed;
                if work > l.period.as_secs_f64() {
                    out.push(format!(
                        "# warning: one occurrence of {} scans `{}` needs ≥ {:.0} s of requests at {} requests/s, \
                         but it comes every {} s: its businesses will fall further behind each time",
                        l.key.kind.as_str(),
                        l.key.expr,
                        work,
                        self.allowed,
                        l.period.as_secs()
                    ));
                }
            }
            out.push(format!(
                "# warning: the schedules need ≥ {:.2} requests/s but api.max_requests_per_second = {}: \
                 passes will lag behind their schedules (`leadsync status` shows by how much). Raise the budget \
                 if Thumbtack allows it, or give some businesses a slower `schedule`.",
                self.needed, self.allowed
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wall clock a year ahead when a schedule's next occurrence was
    /// counted (at start, or at an occurrence), then corrected while the
    /// daemon runs: the schedule fires at its next occurrence from the
    /// corrected clock, not a year later.
    #[test]
    fn a_schedule_counted_from_a_clock_far_ahead_comes_back_when_it_is_corrected() {
        let cron = |e: &str| parse_cron(&crate::config::normalize_cron(e).unwrap()).unwrap();
        let ahead: DateTime<Utc> = "2027-06-01T10:02:00Z".parse().unwrap();
        let now: DateTime<Utc> = "2026-06-01T10:02:00Z".parse().unwrap();
        let key = ScheduleKey {
            kind: ScanKind::Head,
            expr: "*/5 * * * *".into(),
        };
        let mut s = Schedules::default();
        let c = cron(&key.expr);
        let next = c.find_next_occurrence(&ahead, false).ok();
        s.groups.insert(
            key.clone(),
            Group {
                cron: c,
                businesses: ["1".to_string()].into(),
                next,
            },
        );
        // The timer's ticks under the clock ahead, then corrected.
        assert!(s.take_due(ahead).is_empty());
        assert!(s.take_due(now).is_empty());
        let five: DateTime<Utc> = "2026-06-01T10:05:00Z".parse().unwrap();
        assert_eq!(s.next_due(), Some(five));
        assert_eq!(s.take_due(five), [(key, five)]);
        // A clock that only went forward changes nothing.
        assert_eq!(s.next_due(), Some("2026-06-01T10:10:00Z".parse().unwrap()));
        assert!(
            s.take_due("2026-06-01T10:09:59Z".parse().unwrap())
                .is_empty()
        );
    }

    fn next_fires(expr: &str, from: &str, n: usize) -> Vec<String> {
        let cron = parse_cron(&crate::config::normalize_cron(expr).unwrap()).unwrap();
        let mut at: DateTime<Utc> = from.parse().unwrap();
        (0..n)
            .map(|_| {
                at = cron.find_next_occurrence(&at, false).unwrap();
                at.format("%Y-%m-%d %a").to_string()
            })
            .collect()
    }

    /// Day of month and weekday combine as in standard cron: a day matching
    /// either fires (`0 0 1 * MON` is the 1st and every Monday), not only a
    /// 1st that is a Monday. A `*` in one of them leaves the other alone.
    #[test]
    fn day_of_month_and_weekday_fire_on_either() {
        assert_eq!(
            next_fires("0 0 1 * MON", "2026-01-01T00:00:00Z", 4),
            [
                "2026-01-05 Mon",
                "2026-01-12 Mon",
                "2026-01-19 Mon",
                "2026-01-26 Mon"
            ]
        );
        assert_eq!(
            next_fires("0 0 1 * MON", "2026-01-26T12:00:00Z", 2),
            ["2026-02-01 Sun", "2026-02-02 Mon"]
        );
        assert_eq!(
            next_fires("0 0 1 * *", "2026-01-26T12:00:00Z", 2),
            ["2026-02-01 Sun", "2026-03-01 Sun"]
        );
        assert_eq!(
            next_fires("0 0 * * MON", "2026-01-26T12:00:00Z", 2),
            ["2026-02-02 Mon", "2026-02-09 Mon"]
        );
        assert!(crate::config::normalize_cron("0 0 0 30 2 *").is_err());
        // The AND form `config check` points to: `+` before the weekday.
        assert_eq!(
            next_fires("0 0 1-7 * +MON", "2026-01-01T00:00:00Z", 2),
            ["2026-01-05 Mon", "2026-02-02 Mon"]
        );
        assert_eq!(
            next_fires("0 0 * * MON#1", "2026-01-06T00:00:00Z", 1),
            ["2026-02-02 Mon"]
        );
    }

    fn key(kind: ScanKind) -> ScheduleKey {
        ScheduleKey {
            kind,
            expr: "0 */5 * * * *".into(),
        }
    }

    fn tick(q: &mut SyncQueue, id: &str, due: i64) -> Pushed {
        q.push(
            id,
            ScanKind::Head,
            due,
            Origin::Schedule(key(ScanKind::Head)),
        )
    }

    #[test]
    fn oldest_due_first_and_one_entry_per_business() {
        let mut q = SyncQueue::default();
        assert_eq!(tick(&mut q, "b", 200), Pushed::Queued);
        assert_eq!(tick(&mut q, "a", 100), Pushed::Queued);
        assert_eq!(tick(&mut q, "c", 200), Pushed::Queued);
        // The next tick of a business still waiting adds no second entry.
        assert_eq!(tick(&mut q, "a", 400), Pushed::Merged);
        assert_eq!(q.waiting(), 3);
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|j| j.business_id)).collect();
        assert_eq!(order, ["a", "b", "c"], "by due time, then by arrival");
    }

    #[test]
    fn a_running_business_is_never_handed_out_twice() {
        let mut q = SyncQueue::default();
        tick(&mut q, "slow", 0);
        let job = q.pop().unwrap();
        assert_eq!(job.business_id, "slow");
        // Its next head tick is skipped while it runs; a full-scan tick and
        // a request wait for it, as one pass.
        assert_eq!(tick(&mut q, "slow", 300), Pushed::Skipped);
        assert_eq!(
            q.push("slow", ScanKind::Full, 310, Origin::Request(7)),
            Pushed::AfterRunning
        );
        assert_eq!(
            q.push("slow", ScanKind::Head, 320, Origin::Request(8)),
            Pushed::AfterRunning
        );
        assert_eq!(q.pop(), None, "nothing else is due");
        q.finish("slow");
        let next = q.pop().unwrap();
        assert_eq!(
            (next.kind, next.due_ms, next.requests),
            (ScanKind::Full, 310, vec![7, 8])
        );
        assert!(q.is_running("slow"));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_slow_business_does_not_starve_the_others() {
        // One worker slot held by "slow" for ten ticks; two other slots
        // keep every other business moving, and "slow" is due again only
        // once per tick (its skipped ticks do not pile up).
        let mut q = SyncQueue::default();
        let others: Vec<String> = (0..20).map(|i| format!("b{i:02}")).collect();
        let mut passes: HashMap<String, usize> = HashMap::new();
        tick(&mut q, "slow", 0);
        for o in &others {
            tick(&mut q, o, 0);
        }
        let slow = q.pop().unwrap();
        assert_eq!(slow.business_id, "slow");
        for t in 1..=10 {
            // Two slots work through everything due before the next tick.
            while let Some(j) = q.pop() {
                *passes.entry(j.business_id.clone()).or_default() += 1;
                q.finish(&j.business_id);
            }
            assert_eq!(tick(&mut q, "slow", t * 300), Pushed::Skipped);
            for o in &others {
                assert_eq!(tick(&mut q, o, t * 300), Pushed::Queued);
            }
        }
        assert!(
            others.iter().all(|o| passes.get(o) == Some(&10)),
            "{passes:?}"
        );
        q.finish("slow");
        tick(&mut q, "slow", 3300);
        // Oldest due first: the others due at 3000 go before slow's 3300.
        let next: Vec<String> = std::iter::from_fn(|| q.pop().map(|j| j.business_id)).collect();
        assert_eq!(next.last().map(String::as_str), Some("slow"));
        assert_eq!(next.len(), 21);
    }

    #[test]
    fn a_request_jumps_no_queue() {
        let mut q = SyncQueue::default();
        tick(&mut q, "a", 100);
        tick(&mut q, "b", 100);
        // A request for c, due when it was made, goes behind what was due before.
        assert_eq!(
            q.push("c", ScanKind::Full, 150, Origin::Request(1)),
            Pushed::Queued
        );
        // A request for b, already waiting, rides along at b's place.
        assert_eq!(
            q.push("b", ScanKind::Full, 160, Origin::Request(2)),
            Pushed::Merged
        );
        tick(&mut q, "d", 120);
        let order: Vec<(String, ScanKind, Vec<i64>)> =
            std::iter::from_fn(|| q.pop().map(|j| (j.business_id, j.kind, j.requests))).collect();
        assert_eq!(
            order,
            vec![
                ("a".into(), ScanKind::Head, vec![]),
                ("b".into(), ScanKind::Full, vec![2]),
                ("d".into(), ScanKind::Head, vec![]),
                ("c".into(), ScanKind::Full, vec![1]),
            ]
        );
    }

    #[test]
    fn removing_a_business_returns_its_requests_and_lag_is_per_schedule() {
        let mut q = SyncQueue::default();
        tick(&mut q, "a", 100);
        tick(&mut q, "b", 50);
        q.push("a", ScanKind::Head, 120, Origin::Request(3));
        q.push("z", ScanKind::Head, 10, Origin::Initial);
        let lag = q.lag();
        assert_eq!(lag.get(&key(ScanKind::Head)), Some(&(2, 50)));
        assert_eq!(lag.len(), 1, "initial passes belong to no schedule");
        assert_eq!(q.remove("a"), vec![3]);
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.oldest_due_ms(), Some(10));
    }

    /// `[poll] schedule` changed by a reload while passes wait: they count
    /// in the lag of the schedule their businesses are in now.
    #[test]
    fn a_backlog_follows_its_businesses_to_their_new_schedule() {
        let mut q = SyncQueue::default();
        tick(&mut q, "a", 100);
        tick(&mut q, "b", 50);
        let running = q.pop().unwrap();
        assert_eq!(running.business_id, "b");
        q.push(
            "b",
            ScanKind::Full,
            60,
            Origin::Schedule(key(ScanKind::Full)),
        );
        let moved = ScheduleKey {
            kind: ScanKind::Head,
            expr: "*/10 * * * * *".into(),
        };
        let mut s = Schedules::default();
        for (k, ids) in [
            (moved.clone(), vec!["a", "b"]),
            (key(ScanKind::Full), vec!["a", "b"]),
        ] {
            s.groups.insert(
                k.clone(),
                Group {
                    cron: parse_cron(&k.expr).unwrap(),
                    businesses: ids.into_iter().map(String::from).collect(),
                    next: None,
                },
            );
        }
        q.retag(&s);
        let lag = q.lag();
        assert_eq!(lag.get(&moved), Some(&(1, 100)), "{lag:?}");
        assert_eq!(lag.get(&key(ScanKind::Head)), None, "{lag:?}");
        // The full scan waiting for b's running pass keeps its schedule.
        q.finish("b");
        assert_eq!(q.lag().get(&key(ScanKind::Full)), Some(&(1, 60)));
        // A business left with no schedule of that kind: counted nowhere.
        let mut q = SyncQueue::default();
        tick(&mut q, "z", 10);
        q.retag(&s);
        assert!(q.lag().is_empty());
    }

    /// A reload moving 5,000 businesses, each on a schedule of its own,
    /// while each has a pass waiting: every pass follows its business, in
    /// one pass over the schedules (not a search of every schedule for
    /// each waiting pass: 25 million set lookups, under the queue's lock).
    #[test]
    fn retag_of_thousands_of_own_schedules_follows_each_business() {
        const N: usize = 5_000;
        let old = |i: usize| ScheduleKey {
            kind: ScanKind::Head,
            expr: format!("{} {} {} * * *", i % 60, (i / 60) % 60, i / 3600),
        };
        let new = |i: usize| ScheduleKey {
            kind: ScanKind::Head,
            expr: format!("{} {} {} * * 1", i % 60, (i / 60) % 60, i / 3600),
        };
        let mut q = SyncQueue::default();
        let mut s = Schedules::default();
        for i in 0..N {
            let id = format!("b{i}");
            q.push(&id, ScanKind::Head, i as i64, Origin::Schedule(old(i)));
            let k = new(i);
            s.groups.insert(
                k.clone(),
                Group {
                    cron: parse_cron(&k.expr).unwrap(),
                    businesses: [id].into_iter().collect(),
                    next: None,
                },
            );
        }
        let started = std::time::Instant::now();
        q.retag(&s);
        let took = started.elapsed();
        eprintln!("retag of {N} passes over {N} schedules: {took:?}");
        // About 6 s in a debug build when it searched every schedule for
        // each pass; a few milliseconds as one map.
        assert!(took < Duration::from_secs(2), "retag took {took:?}");
        let lag = q.lag();
        assert_eq!(lag.len(), N);
        for i in [0, 1, N / 2, N - 1] {
            assert_eq!(lag.get(&new(i)), Some(&(1, i as i64)), "business b{i}");
        }
    }

    #[test]
    fn period_of_common_schedules() {
        let now = Utc::now();
        let p = |e: &str| period(&parse_cron(e).unwrap(), now).unwrap().as_secs();
        assert_eq!(p("0 */5 * * * *"), 300);
        assert_eq!(p("0 17 3 * * *"), 86_400);
        assert_eq!(p("*/10 * * * * *"), 10);
    }
}
