//! Timestamps as the database stores them: RFC 3339 UTC text with milliseconds,
//! so that text order is time order.

use chrono::{DateTime, SecondsFormat, Utc};

/// Formats an instant the way every leadsync column stores it.
pub fn fmt(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, formatted for the database.
pub fn now() -> String {
    fmt(Utc::now())
}

/// How far after this clock's reading a stamp of leadsync's own (a row's
/// `last_seen_at`, `changed_at`, `first_seen_at`, a pass's `listed_at`…)
/// must lie to be taken for one a wall clock running ahead wrote, since
/// corrected: such a stamp tells nothing of when the lead was observed, and
/// is not trusted as an observation. Anything nearer is an ordinary stamp:
/// a delivery's `now` is its receipt, and a listing or another delivery
/// may well write after it (milliseconds, or the time a delivery waits on
/// the store), so "after now" alone proves no clock ahead.
pub const FAR_AHEAD: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The latest stamp not [`FAR_AHEAD`]: the clock's reading now plus the
/// margin, formatted for the database.
pub fn far_ahead() -> String {
    fmt(Utc::now() + FAR_AHEAD)
}

/// Parses an RFC 3339 time with a zone into UTC.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A time the mirror copies from Thumbtack (a lead's `createTime`, a
/// message's `sentAt`), in the mirror's form: UTC, milliseconds at least, so
/// that text order is time order among them and against leadsync's own
/// times, to the millisecond; a finer fraction is kept, so within one
/// millisecond `.500400Z` sorts before `.500Z` ('Z' is after the digits).
/// `None` when `s` is not RFC 3339 or its UTC year leaves 0000–9999 (the
/// caller keeps it as sent).
pub fn sortable_utc(s: &str) -> Option<String> {
    use chrono::{Datelike, Timelike};
    let u = parse(s)?;
    if !(0..=9999).contains(&u.year()) {
        return None;
    }
    let precision = if u.nanosecond() % 1_000_000 == 0 {
        SecondsFormat::Millis
    } else {
        SecondsFormat::AutoSi
    };
    Some(u.to_rfc3339_opts(precision, true))
}

/// The instant `s` (any RFC 3339 zone) in UTC `Z` form, its fraction cut
/// at the nanosecond (no fraction stays no fraction): trailing zeros
/// dropped, then padded to a multiple of 3 digits (`.5` → `.500`, as
/// chrono writes milli-, micro- and nanoseconds). More than 9 digits are
/// refused by Java's `Instant` (a 400 would mark the row dead) and dropped
/// by Go; the queue orders by every digit, this is only what is sent. The
/// whole seconds come from chrono, the fraction from the text: offsets are
/// whole minutes, so the given fraction is the UTC one.
/// `None` when `s` is not RFC 3339, or when its UTC year leaves 0000–9999
/// (`0000-01-01T00:30:00+01:00` is year −1 in UTC): RFC 3339 has no other
/// years, so no such form could be sent ([`utc_z_problem`] says why).
pub fn to_utc_z(s: &str) -> Option<String> {
    use chrono::Datelike;
    let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
    if !(0..=9999).contains(&t.year()) {
        return None;
    }
    // RFC 3339 (as chrono reads it) puts the seconds in bytes 17-18.
    let digits = match s.as_bytes().get(19) {
        Some(b'.') => {
            let all = s[20..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or("");
            all[..all.len().min(9)].trim_end_matches('0')
        }
        _ => "",
    };
    let mut fraction = String::new();
    if !digits.is_empty() {
        fraction.push('.');
        fraction.push_str(digits);
        while !(fraction.len() - 1).is_multiple_of(3) {
            fraction.push('0');
        }
    }
    Some(format!("{}{fraction}Z", t.format("%Y-%m-%dT%H:%M:%S")))
}

/// Why [`to_utc_z`] has no answer for `s`, in words for a row's
/// `last_error`; `None` when it has one.
pub fn utc_z_problem(s: &str) -> Option<String> {
    if to_utc_z(s).is_some() {
        return None;
    }
    Some(match parse(s) {
        Some(t) => format!(
            "partner_status_changed_at {s:?} is {} in UTC, outside the years 0000-9999 that an RFC 3339 time can have",
            t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        ),
        None => format!("partner_status_changed_at {s:?} is not an RFC 3339 time"),
    })
}

/// A short human age such as `42s`, `5m`, `3h`, `2d`.
pub fn age(since: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - since).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_z_keeps_the_instant_and_the_fraction() {
        assert_eq!(
            to_utc_z("2024-06-14T11:30:00+02:00").unwrap(),
            "2024-06-14T09:30:00Z"
        );
        assert_eq!(
            to_utc_z("2024-06-14T09:30:00.123456Z").unwrap(),
            "2024-06-14T09:30:00.123456Z"
        );
        assert_eq!(
            to_utc_z("2024-06-14T04:30:00.5-05:00").unwrap(),
            "2024-06-14T09:30:00.500Z"
        );
        assert!(to_utc_z("2024-06-14").is_none());
    }

    /// A fraction goes out to the nanosecond at most, cut (not rounded):
    /// Java's `Instant` refuses more than 9 digits (a 400 marks the row
    /// dead), Go drops them. The queue still orders by every digit.
    #[test]
    fn utc_z_sends_the_fraction_to_the_nanosecond() {
        for (given, utc) in [
            ("2024-06-14T09:30:00.0000000001Z", "2024-06-14T09:30:00Z"),
            ("2024-06-14T09:30:00.0000000004Z", "2024-06-14T09:30:00Z"),
            (
                "2024-06-14T09:30:00.1234567899Z",
                "2024-06-14T09:30:00.123456789Z",
            ),
            (
                "2024-06-14T11:30:00.0000000004+02:00",
                "2024-06-14T09:30:00Z",
            ),
            (
                "2024-06-14T04:00:59.1234567890123-05:30",
                "2024-06-14T09:30:59.123456789Z",
            ),
            (
                "2024-06-14T04:00:59.0001-05:30",
                "2024-06-14T09:30:59.000100Z",
            ),
            ("2024-06-14T09:30:00.000000000000Z", "2024-06-14T09:30:00Z"),
            ("2024-06-14T09:30:00.120Z", "2024-06-14T09:30:00.120Z"),
        ] {
            assert_eq!(to_utc_z(given).as_deref(), Some(utc), "{given}");
        }
    }

    #[test]
    fn utc_z_stays_inside_the_years_0000_to_9999() {
        for (given, utc) in [
            ("0000-01-01T00:30:00Z", "0000-01-01T00:30:00Z"),
            ("0000-01-01T01:30:00+01:00", "0000-01-01T00:30:00Z"),
            ("9999-12-31T22:30:00-01:00", "9999-12-31T23:30:00Z"),
        ] {
            assert_eq!(to_utc_z(given).as_deref(), Some(utc), "{given}");
            assert_eq!(utc_z_problem(given), None);
        }
        for (given, shown) in [
            ("0000-01-01T00:30:00+01:00", "-0001-12-31T23:30:00Z"),
            ("0000-01-01T00:00:00.001+00:01", "-0001-12-31T23:59:00.001Z"),
            ("9999-12-31T23:30:00-01:00", "+10000-01-01T00:30:00Z"),
        ] {
            assert_eq!(to_utc_z(given), None, "{given}");
            let why = utc_z_problem(given).unwrap();
            assert!(
                why.contains(shown) && why.contains("outside the years 0000-9999"),
                "{why}"
            );
        }
        assert!(
            utc_z_problem("tomorrow")
                .unwrap()
                .contains("not an RFC 3339 time")
        );
    }
}

/// A work loop's heartbeat (the scheduler's, the drainer's), read by
/// `/healthz` and the systemd watchdog to tell a stuck loop. Staleness is
/// measured on the monotonic clock: a wall clock stepped back (NTP) would
/// otherwise hide a stuck loop for the step's length, and one stepped
/// forward would flag a healthy one. Nothing of it is shown as a time of
/// day, only as an idle duration.
#[derive(Debug)]
pub struct Heartbeat {
    origin: tokio::time::Instant,
    /// Milliseconds after `origin` of the last beat.
    last_ms: std::sync::atomic::AtomicU64,
    count: std::sync::atomic::AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that beat just now (a loop starting is not yet stuck).
    pub fn new() -> Heartbeat {
        Heartbeat {
            origin: tokio::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        use std::sync::atomic::Ordering;
        self.last_ms.fetch_max(self.elapsed_ms(), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// How long since the last beat (or since creation).
    pub fn idle(&self) -> std::time::Duration {
        use std::sync::atomic::Ordering;
        let last = self.last_ms.load(Ordering::Relaxed);
        std::time::Duration::from_millis(self.elapsed_ms().saturating_sub(last))
    }

    /// How many times the loop beat.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}
