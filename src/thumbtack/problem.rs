//! Errors from Thumbtack: ProblemDetails bodies, `Retry-After`, and the one
//! classification of SPEC §4's table (sent / retry / refresh / reauth / dead).

use serde_json::Value;
use std::time::Duration;

/// What to do after a response or a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try again later, with backoff (202, 403, 408, 429, 5xx, network, unreadable body).
    Retry,
    /// 401: refresh the business's token once and try again.
    Refresh,
    /// The business's token was refused and cannot be refreshed: a person must re-authorize.
    Reauth,
    /// Any other 4xx: the request itself is wrong; sending it again will not help.
    Dead,
    /// Not sent: the process is stopping (no request, no token refresh). The
    /// work waits for the next start, uncounted; no business is at fault.
    Stopping,
}

/// SPEC §4's table, for a status that is not a success.
pub fn classify_status(status: u16) -> Disposition {
    match status {
        401 => Disposition::Refresh,
        202 | 403 | 408 | 429 => Disposition::Retry,
        400..=499 => Disposition::Dead,
        // 5xx, and anything unexpected (1xx, a 3xx that was not followed).
        _ => Disposition::Retry,
    }
}

/// True for the statuses that mean the request was done: 2xx except 202,
/// which is Thumbtack's WAF challenge, not a success.
pub fn is_success(status: u16) -> bool {
    (200..300).contains(&status) && status != 202
}

/// A ProblemDetails body (`type`, `title`, `status`, `detail`, `traceID`,
/// `errors`), read leniently: any field may be missing or of another type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Problem {
    pub kind: Option<String>,
    pub title: Option<String>,
    pub status: Option<u16>,
    pub detail: Option<String>,
    pub trace_id: Option<String>,
    pub errors: Option<Value>,
}

impl Problem {
    /// Parses a body; `None` when it is not a JSON object.
    pub fn parse(body: &[u8]) -> Option<Problem> {
        let Value::Object(map) = serde_json::from_slice::<Value>(body).ok()? else {
            return None;
        };
        let text = |k: &str| match map.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Some(Problem {
            kind: text("type"),
            title: text("title").or_else(|| text("error")),
            status: map.get("status").and_then(|v| match v {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }),
            detail: text("detail")
                .or_else(|| text("error_description"))
                .or_else(|| text("message")),
            trace_id: text("traceID")
                .or_else(|| text("traceId"))
                .or_else(|| text("trace_id")),
            errors: map.get("errors").cloned().filter(|v| !v.is_null()),
        })
    }

    /// True when the object has a ProblemDetails field: the API's own answer,
    /// not some JSON a proxy or another service sent.
    pub fn is_problem_details(&self) -> bool {
        self.kind.is_some()
            || self.status.is_some()
            || self.trace_id.is_some()
            || self.errors.is_some()
            || (self.title.is_some() && self.detail.is_some())
    }

    /// `title: detail` and the field errors, for people.
    pub fn summary(&self) -> String {
        let mut s = match (&self.title, &self.detail) {
            (Some(t), Some(d)) if t != d => format!("{t}: {d}"),
            (Some(t), _) => t.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => String::new(),
        };
        if let Some(errors) = &self.errors {
            let e = errors.to_string();
            let e: String = e.chars().take(300).collect();
            s = if s.is_empty() {
                e
            } else {
                format!("{s} ({e})")
            };
        }
        s
    }
}

/// A failed call to Thumbtack, classified.
///
/// Its `Display` is [`Self::message`] as one line, cleaned
/// ([`crate::terminal::blank`]): whatever prints it (an error's chain
/// printed by `main`, a command's output) shows no line or escape the
/// server made. Log lines log `.message` as sent: the formatter escapes
/// every field ([`crate::logging`]). Where the text is stored, `.message`
/// is used: stored text stays as sent.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", crate::terminal::blank(.message))]
pub struct ApiError {
    pub disposition: Disposition,
    /// `None` when no HTTP response arrived.
    pub http_status: Option<u16>,
    pub trace_id: Option<String>,
    /// From `Retry-After`, already capped.
    pub retry_after: Option<Duration>,
    /// The body was a ProblemDetails object: Thumbtack's own answer, not a
    /// proxy's page or a failure on the way.
    pub from_api: bool,
    /// For people: what happened, with the problem's title/detail and traceID.
    /// The server's words as it sent them (the mirror's `last_error` and
    /// `sync_runs.error` keep them): whatever prints it to a terminal
    /// cleans it there ([`crate::terminal::blank`], as `Display` does); a
    /// log line shows it escaped ([`crate::logging`]).
    pub message: String,
}

impl ApiError {
    /// An error response, classified by its status.
    pub fn from_response(
        status: u16,
        reason: &str,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> ApiError {
        let problem = Problem::parse(body).filter(Problem::is_problem_details);
        let trace_id = problem.as_ref().and_then(|p| p.trace_id.clone());
        let mut message = format!("HTTP {status} {reason}").trim_end().to_string();
        let mut disposition = classify_status(status);
        if disposition == Disposition::Dead && problem.is_none() {
            // Not the API's answer (a proxy's page, a wrong base_url): a
            // refusal only counts when Thumbtack itself gave it.
            disposition = Disposition::Retry;
            return ApiError {
                disposition,
                http_status: Some(status),
                trace_id: None,
                retry_after,
                from_api: false,
                message: format!(
                    "{message}, not from the API (the body is not a ProblemDetails object; \
                     its first line: {}): retried; check api.base_url",
                    first_line(body)
                ),
            };
        }
        if status == 202 {
            message.push_str(" (a WAF challenge, not a success)");
        }
        match problem
            .as_ref()
            .map(Problem::summary)
            .filter(|s| !s.is_empty())
        {
            Some(summary) => message = format!("{message}: {summary}"),
            None if !body.is_empty() => {
                message = format!("{message}: {}", describe_unreadable(body));
            }
            None => {}
        }
        if let Some(t) = &trace_id {
            message = format!("{message} (traceID {t})");
        }
        ApiError {
            disposition,
            http_status: Some(status),
            trace_id,
            retry_after,
            from_api: problem.is_some(),
            message,
        }
    }

    /// A 3xx: redirects are never followed (a POST turned into a GET could
    /// look like success); retried, with where it pointed.
    pub fn redirected(status: u16, reason: &str, location: Option<&str>) -> ApiError {
        let to: String = location
            .unwrap_or("(no Location header)")
            .chars()
            .take(300)
            .collect();
        ApiError::retry(
            Some(status),
            format!(
                "{}: redirected to {to}: check api.base_url (redirects are never followed)",
                format!("HTTP {status} {reason}").trim_end()
            ),
        )
    }

    /// A transport failure (connect, reset, timeout): always retried.
    pub fn transport(e: &reqwest::Error) -> ApiError {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "could not connect"
        } else {
            "connection failed"
        };
        ApiError::retry(None, format!("{what}: {}", error_chain(e)))
    }

    /// A retryable failure with a message.
    pub fn retry(http_status: Option<u16>, message: impl Into<String>) -> ApiError {
        ApiError {
            disposition: Disposition::Retry,
            http_status,
            trace_id: None,
            retry_after: None,
            from_api: false,
            message: message.into(),
        }
    }

    /// The business's token was refused for good.
    pub fn reauth(message: impl Into<String>) -> ApiError {
        ApiError {
            disposition: Disposition::Reauth,
            http_status: None,
            trace_id: None,
            retry_after: None,
            from_api: false,
            message: message.into(),
        }
    }

    /// True when trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.disposition == Disposition::Retry
    }
}

/// A reqwest error with its sources, which carry the useful part.
fn error_chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let t = inner.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        source = inner.source();
    }
    s
}

/// A short description of a body that is not JSON (an HTML error page, say).
pub fn describe_unreadable(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let squeezed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let kind = if squeezed.starts_with('<') {
        "an HTML page"
    } else {
        "a body that is not JSON"
    };
    let excerpt: String = squeezed.chars().take(120).collect();
    format!("{kind} ({} bytes: {excerpt})", body.len())
}

/// The first non-blank line of a body, shortened: what a non-API answer said.
pub fn first_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        None => "(empty body)".to_string(),
        Some(line) => {
            let mut s: String = line.chars().take(200).collect();
            if line.chars().count() > 200 {
                s.push('…');
            }
            s
        }
    }
}

/// Response headers that may carry Thumbtack's trace id on any response
/// (the ProblemDetails body carries it on errors). An assumption: Thumbtack
/// documents the body field only.
/// (No `x-request-id`: a proxy's id would pass for Thumbtack's.)
const TRACE_HEADERS: [&str; 3] = ["x-trace-id", "x-traceid", "traceid"];

/// The trace id of a successful response: a trace header, or a top-level
/// `traceID` of a small JSON body (never a whole listing re-read for it).
pub fn trace_id_of(headers: &reqwest::header::HeaderMap, body: &[u8]) -> Option<String> {
    let from_header = TRACE_HEADERS.iter().find_map(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    });
    from_header.or_else(|| {
        if body.len() > 16 * 1024 {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Traced {
            #[serde(rename = "traceID", default)]
            trace_id: Option<String>,
        }
        serde_json::from_slice::<Traced>(body)
            .ok()
            .and_then(|t| t.trace_id)
            .filter(|t| !t.is_empty())
    })
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §5.6.7:
/// IMF-fixdate, the obsolete RFC 850 form and asctime); capped at `cap`. A
/// date in the past is zero (the caller keeps its own backoff as a floor).
pub fn parse_retry_after(
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
    cap: Duration,
) -> Option<Duration> {
    let v = value.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = v.parse::<f64>() {
        if !(secs.is_finite() && secs >= 0.0) {
            return None;
        }
        Duration::from_secs_f64(secs.min(cap.as_secs_f64()))
    } else {
        (parse_http_date(v, now)? - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(d.min(cap))
}

/// An HTTP date in any of its three forms, as UTC.
fn parse_http_date(
    v: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{Datelike, NaiveDate, NaiveDateTime, TimeZone};
    let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
    // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT (and RFC 2822 variants).
    if let Ok(t) = chrono::DateTime::parse_from_rfc2822(&v) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    // asctime: Sun Nov  6 08:49:37 1994
    if let Ok(t) = NaiveDateTime::parse_from_str(&v, "%a %b %e %H:%M:%S %Y") {
        return Some(chrono::Utc.from_utc_datetime(&t));
    }
    // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT; a two-digit year more than 50
    // years ahead is the most recent past year with those digits.
    let rest = v.split_once(", ")?.1.strip_suffix(" GMT")?;
    let (date, time) = rest.split_once(' ')?;
    let mut parts = date.split('-');
    let (day, month, yy) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || yy.len() != 2 {
        return None;
    }
    let yy: i32 = yy.parse().ok()?;
    let mut year = now.year() - now.year().rem_euclid(100) + yy;
    if year > now.year() + 50 {
        year -= 100;
    }
    let date = NaiveDate::parse_from_str(&format!("{day} {month} {year}"), "%d %b %Y").ok()?;
    let time = chrono::NaiveTime::parse_from_str(time, "%H:%M:%S").ok()?;
    Some(chrono::Utc.from_utc_datetime(&date.and_time(time)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_spec_section_4() {
        assert!(is_success(200) && is_success(204) && !is_success(202));
        for s in [202, 403, 408, 429, 500, 502, 503] {
            assert_eq!(classify_status(s), Disposition::Retry, "{s}");
        }
        assert_eq!(classify_status(401), Disposition::Refresh);
        for s in [400, 404, 409, 422, 451] {
            assert_eq!(classify_status(s), Disposition::Dead, "{s}");
        }
    }

    #[test]
    fn retry_after_both_forms_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let cap = Duration::from_secs(3600);
        assert_eq!(
            parse_retry_after("7", now, cap),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now, cap),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("99999", now, cap), Some(cap));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now, cap),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now, cap), None);
    }

    #[test]
    fn retry_after_all_three_http_date_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("1994-11-06T08:48:37Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let cap = Duration::from_secs(3600);
        let minute = Some(Duration::from_secs(60));
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_retry_after(form, now, cap), minute, "{form}");
        }
        // A two-digit year is never taken for one more than 50 years ahead.
        let now = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("Thursday, 01-Jan-30 00:01:00 GMT", now, cap),
            minute
        );
        assert_eq!(
            parse_retry_after("Friday, 01-Jan-99 00:00:00 GMT", now, cap),
            Some(Duration::ZERO),
            "1999, in the past"
        );
    }

    #[test]
    fn problem_details_and_html_bodies() {
        let e = ApiError::from_response(
            400,
            "Bad Request",
            None,
            br#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"status is invalid","traceID":"abc123"}"#,
        );
        assert_eq!(e.disposition, Disposition::Dead);
        assert_eq!(e.trace_id.as_deref(), Some("abc123"));
        assert!(e.message.contains("status is invalid") && e.message.contains("abc123"));
        let e =
            ApiError::from_response(502, "Bad Gateway", None, b"<html><body>nginx</body></html>");
        assert_eq!(e.disposition, Disposition::Retry);
        assert!(e.message.contains("HTML"));
    }

    /// Thumbtack's (or a proxy's) words become the error's message, which
    /// the mirror keeps (`last_error`, `sync_runs.error`) as data the user
    /// cannot get back: a title, detail, field error, trace id, first line
    /// of a page, reason phrase or redirect target keeps every character,
    /// the ones that drive a terminal too; they are cleaned where printed.
    #[test]
    fn server_text_in_a_message_is_kept_as_sent() {
        let hostile = "a\u{1b}[2J\u{9b}31m\u{202e}\u{200b}\u{7}b";
        let problem = serde_json::json!({
            "title": format!("Bad {hostile}"),
            "detail": format!("detail\n\t{hostile}"),
            "traceID": format!("t{hostile}"),
            "errors": {"f": format!("e{hostile}")},
        })
        .to_string();
        let e = ApiError::from_response(400, "Bad Request", None, problem.as_bytes());
        for part in [
            format!("Bad {hostile}"),
            format!("detail\n\t{hostile}"),
            format!("t{hostile}"),
        ] {
            assert!(e.message.contains(&part), "{part:?} in {:?}", e.message);
        }
        let errors = [
            ApiError::from_response(
                404,
                "Not Found",
                None,
                format!("<p>{hostile}</p>").as_bytes(),
            ),
            ApiError::from_response(500, "Oops", None, format!("<p>{hostile}</p>").as_bytes()),
            ApiError::from_response(500, "Oops", None, format!("plain {hostile}").as_bytes()),
            ApiError::from_response(503, &format!("Reason {hostile}"), None, b""),
            ApiError::redirected(302, "Found", Some(&format!("https://x/{hostile}"))),
        ];
        for e in errors {
            assert!(e.message.contains(hostile), "{:?}", e.message);
        }
    }

    /// Formatted (a log field, an error chain `main` prints line by line),
    /// an error is one clean line: the server's line break would start a
    /// line that reads as leadsync's own. `.message` keeps the text as sent.
    #[test]
    fn an_error_displays_as_one_clean_line_its_message_as_sent() {
        let detail = "x\nleadsync: ok\u{1b}]0;owned\u{7}";
        let body = serde_json::json!({"title": "Unavailable", "status": 503, "detail": detail})
            .to_string();
        let e = ApiError::from_response(503, "Service Unavailable", None, body.as_bytes());
        assert!(e.message.contains(detail), "{:?}", e.message);
        let chain = format!("{:#}", anyhow::Error::new(e.clone()).context("sync"));
        assert!(!chain.contains(['\n', '\u{1b}', '\u{7}']), "{chain:?}");
        assert!(chain.contains("x leadsync: ok"), "{chain:?}");
        assert_eq!(e.to_string(), crate::terminal::blank(&e.message));
    }
}
