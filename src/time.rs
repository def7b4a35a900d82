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

/// The instant `s` (any RFC 3339 zone) in UTC `Z` form, keeping its fraction
/// exactly as precise as it was given (no fraction stays no fraction).
pub fn to_utc_z(s: &str) -> Option<String> {
    let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
    Some(t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
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
}
