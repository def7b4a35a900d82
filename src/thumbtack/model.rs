//! Wire types (SPEC §5), tolerant of unknown fields: a lead is kept as the
//! JSON object exactly as received, plus a few fields read from it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A negotiation from a listing, ready for the mirror.
#[derive(Debug, Clone)]
pub struct Lead {
    pub negotiation_id: String,
    /// The JSON object exactly as received (every field, unknown ones included).
    pub payload: String,
    /// xxh3-64 of `payload`, to skip unchanged leads without reading them back.
    pub hash: i64,
    pub status: Option<String>,
    /// `createTime` or `createdAt`, in UTC when it parses.
    pub created_at: Option<String>,
    pub category: Option<String>,
    pub customer_name: Option<String>,
    pub city: Option<String>,
    pub zip: Option<String>,
}

/// One page of `GET /businesses/{id}/negotiations`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub leads: Vec<Lead>,
    /// Entries that are not objects with a `negotiationID` (logged, counted, not stored).
    pub skipped: i64,
    /// The next page's token, when `pagination.nextPageToken` is a non-empty string.
    pub next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    data: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    pagination: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Pagination<'a> {
    #[serde(rename = "nextPageToken", borrow, default)]
    next_page_token: Option<&'a RawValue>,
}

/// The fields leadsync reads from a lead; each is parsed on its own so a
/// field of an unexpected type is ignored, never fatal.
#[derive(Deserialize)]
struct LeadFields<'a> {
    #[serde(rename = "negotiationID", borrow, default)]
    negotiation_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(rename = "createTime", borrow, default)]
    create_time: Option<&'a RawValue>,
    #[serde(rename = "createdAt", borrow, default)]
    created_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    category: Option<&'a RawValue>,
    #[serde(borrow, default)]
    customer: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Customer<'a> {
    #[serde(rename = "displayName", borrow, default)]
    display_name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    location: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Location<'a> {
    #[serde(borrow, default)]
    city: Option<&'a RawValue>,
    #[serde(rename = "zipCode", borrow, default)]
    zip_code: Option<&'a RawValue>,
}

/// A JSON string or number as text; anything else is `None`.
fn text(raw: Option<&RawValue>) -> Option<String> {
    let raw = raw?;
    match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads one list entry; `None` when it is not an object with a `negotiationID`.
pub fn parse_lead(raw: &RawValue) -> Option<Lead> {
    let payload = raw.get();
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let f: LeadFields = serde_json::from_str(payload).ok()?;
    let negotiation_id = text(f.negotiation_id).filter(|s| !s.is_empty())?;
    let created_at = text(f.create_time)
        .or_else(|| text(f.created_at))
        .map(|t| crate::time::to_utc_z(&t).unwrap_or(t));
    let category = f
        .category
        .and_then(|c| serde_json::from_str::<Named>(c.get()).ok())
        .and_then(|n| match n.name {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        });
    let customer = f
        .customer
        .and_then(|c| serde_json::from_str::<Customer>(c.get()).ok());
    let location = customer
        .as_ref()
        .and_then(|c| c.location)
        .and_then(|l| serde_json::from_str::<Location>(l.get()).ok());
    Some(Lead {
        hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
        status: text(f.status),
        created_at,
        category,
        customer_name: customer.and_then(|c| text(c.display_name)),
        city: location.as_ref().and_then(|l| text(l.city)),
        zip: location.and_then(|l| text(l.zip_code)),
        negotiation_id,
        payload: payload.to_string(),
    })
}

/// Parses a listing page: `{"data": [...], "pagination": {"nextPageToken": ...}}`
/// (a bare array is read as a single last page).
pub fn parse_page(body: &[u8]) -> Result<Page, String> {
    let text_body = std::str::from_utf8(body).map_err(|_| "the page is not UTF-8".to_string())?;
    let (entries, next_page_token) = if text_body.trim_start().starts_with('[') {
        let entries: Vec<&RawValue> = serde_json::from_str(text_body)
            .map_err(|e| format!("the page is not valid JSON: {e}"))?;
        (entries, None)
    } else {
        let env: Envelope = serde_json::from_str(text_body)
            .map_err(|e| format!("the page is not a JSON object with a data array: {e}"))?;
        let data = env
            .data
            .ok_or_else(|| "the page has no `data` array".to_string())?;
        let next = env
            .pagination
            .and_then(|p| serde_json::from_str::<Pagination>(p.get()).ok())
            .and_then(|p| p.next_page_token)
            .and_then(
                |t| match serde_json::from_str::<serde_json::Value>(t.get()).ok()? {
                    serde_json::Value::String(s) if !s.is_empty() => Some(s),
                    _ => None,
                },
            );
        (data, next)
    };
    let mut page = Page {
        leads: Vec::with_capacity(entries.len()),
        skipped: 0,
        next_page_token,
    };
    for raw in entries {
        match parse_lead(raw) {
            Some(lead) => page.leads.push(lead),
            None => page.skipped += 1,
        }
    }
    Ok(page)
}

/// The job statuses `POST /negotiations/{id}/job-status` accepts (the Leads page).
pub const JOB_STATUSES: [&str; 6] = [
    "not_scheduled",
    "appt_scheduled",
    "job_complete",
    "invoice_paid",
    "customer_cancel",
    "pro_cancel",
];

/// The body of `POST /negotiations/{id}/job-status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatusBody {
    pub status: String,
    #[serde(rename = "partnerStatusChangedAt")]
    pub partner_status_changed_at: String,
    #[serde(
        rename = "invoiceAmountInCents",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub invoice_amount_in_cents: Option<i64>,
}

/// A successful token response.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    /// Seconds, as a number or a numeric string.
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
}

fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64))
        }
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok().map(|f| f.max(0.0) as u64),
        _ => None,
    })
}

/// An OAuth error body.
#[derive(Debug, Deserialize, Default)]
pub struct OAuthError {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_keeps_every_byte_of_each_lead() {
        let body = r#"{"data":[{"negotiationID":"519153480500518912","status":"active","x":{"big":9007199254740993},
            "customer":{"displayName":"Zoë","location":{"city":"San José","zipCode":"95110"}},"createdAt":"2024-06-13T19:18:01+02:00"},
            {"no_id":true}, 7],"pagination":{"limit":2,"nextPageToken":"abc"}}"#;
        let page = parse_page(body.as_bytes()).unwrap();
        assert_eq!(page.leads.len(), 1);
        assert_eq!(page.skipped, 2);
        assert_eq!(page.next_page_token.as_deref(), Some("abc"));
        let lead = &page.leads[0];
        assert!(lead.payload.contains("9007199254740993"));
        assert!(lead.payload.contains(r#""city":"San José""#));
        assert_eq!(lead.created_at.as_deref(), Some("2024-06-13T17:18:01Z"));
        assert_eq!(lead.customer_name.as_deref(), Some("Zoë"));
        assert_eq!(lead.zip.as_deref(), Some("95110"));
    }

    #[test]
    fn token_lifetimes_as_numbers_or_strings() {
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":"3600"}"#).unwrap();
        assert_eq!(t.expires_in, Some(3600));
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":5}"#).unwrap();
        assert_eq!(t.expires_in, Some(5));
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(t.expires_in, None);
    }

    #[test]
    fn last_page_and_odd_types() {
        let page = parse_page(br#"{"data":[{"negotiationID":123,"status":{"x":1},"category":"plain"}],"pagination":{"nextPageToken":""}}"#).unwrap();
        assert_eq!(page.next_page_token, None);
        assert_eq!(page.leads[0].negotiation_id, "123");
        assert_eq!(page.leads[0].status, None);
        assert!(parse_page(b"<html>").is_err());
        assert!(parse_page(br#"{"items":[]}"#).is_err());
    }
}
