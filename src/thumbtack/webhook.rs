//! Webhook deliveries on the wire (SPEC §8, THUMBTACK.md "Webhooks"): the
//! envelope `{"event": {eventType, webhookID, triggeredAt, ...}, "data": {...}}`,
//! the two event types leadsync applies, and the subscription objects of
//! `/businesses/{id}/webhooks`. Every assumption about their shape is here.

use super::model::{column_text, members, parse_lead, parse_message};
use crate::lead::LeadRow;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A new lead.
pub const NEGOTIATION_CREATED: &str = "NegotiationCreatedV4";
/// A new message on a lead.
pub const MESSAGE_CREATED: &str = "MessageCreatedV4";
/// What `webhooks register` subscribes to by default.
pub const DEFAULT_EVENTS: [&str; 2] = [NEGOTIATION_CREATED, MESSAGE_CREATED];

/// A delivery whose envelope is readable.
#[derive(Debug)]
pub struct Delivery {
    pub event_type: String,
    pub webhook_id: Option<String>,
    pub triggered_at: Option<String>,
    pub content: Content,
}

/// What a delivery carries, as far as leadsync acts on it.
#[derive(Debug)]
pub enum Content {
    /// `NegotiationCreatedV4` with a usable negotiation.
    Negotiation {
        lead: LeadRow,
        /// `data.business.businessID`, else `data.businessID`.
        business_id: Option<String>,
    },
    /// `MessageCreatedV4` with a usable message.
    Message(Message),
    /// An event type leadsync does not apply.
    Other,
    /// A known event type whose `data` cannot be used: the reason.
    Unusable {
        reason: String,
        negotiation_id: Option<String>,
        message_id: Option<String>,
    },
}

/// A message (`MessageV4`), ready for the mirror.
#[derive(Debug, Clone)]
pub struct Message {
    pub message_id: String,
    pub negotiation_id: String,
    /// `data.business.businessID`, else `data.businessID`, when the message names one.
    pub business_id: Option<String>,
    /// `sentAt` in UTC when it parses, else as sent.
    pub sent_at: Option<String>,
    /// `from`: `Customer` or `Business`.
    pub sender: Option<String>,
    pub text: Option<String>,
    /// The message object exactly as received.
    pub payload: String,
}

/// The envelope's members.
struct Envelope<'a> {
    event: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    fn read(raw: &'a str) -> Result<Envelope<'a>, serde_json::Error> {
        let [event, data] = members(raw, ["event", "data"])?;
        Ok(Envelope { event, data })
    }
}

/// `event`'s members.
struct Event<'a> {
    event_type: Option<&'a RawValue>,
    webhook_id: Option<&'a RawValue>,
    triggered_at: Option<&'a RawValue>,
}

impl<'a> Event<'a> {
    fn read(raw: &'a str) -> Result<Event<'a>, serde_json::Error> {
        let [event_type, webhook_id, triggered_at] =
            members(raw, ["eventType", "webhookID", "triggeredAt"])?;
        Ok(Event {
            event_type,
            webhook_id,
            triggered_at,
        })
    }
}

/// The ids `data` names (a lead's columns are read by [`parse_lead`], a
/// message's by [`parse_message`]: a poll reads the same object by the same
/// functions).
#[derive(Default)]
struct Ids<'a> {
    negotiation_id: Option<&'a RawValue>,
    message_id: Option<&'a RawValue>,
    business_id: Option<&'a RawValue>,
    business: Option<&'a RawValue>,
}

impl<'a> Ids<'a> {
    fn read(raw: &'a str) -> Result<Ids<'a>, serde_json::Error> {
        let [negotiation_id, message_id, business_id, business] = members(
            raw,
            ["negotiationID", "messageID", "businessID", "business"],
        )?;
        Ok(Ids {
            negotiation_id,
            message_id,
            business_id,
            business,
        })
    }
}

/// A JSON string, else `None`.
fn string(raw: Option<&RawValue>) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(raw?.get()).ok()? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

/// Why an id field cannot be used, or the id: read by the poller's rule
/// ([`super::model::id_text`]: a string that is not blank, or a number
/// sent as plain digits, exactly as sent), so that a lead or message
/// delivered gets the id it gets polled, and a number written otherwise
/// (`1e3`, `1.0`, a float's rounding of a long id) names no lead.
fn id_field(raw: Option<&RawValue>, name: &str) -> Result<String, String> {
    let Some(r) = raw else {
        return Err(format!("data has no {name}"));
    };
    if let Some(id) = super::model::id_text(Some(r)) {
        return Ok(id);
    }
    let shown = r.get().trim().chars().take(40).collect::<String>();
    Err(match r.get().trim().as_bytes().first() {
        Some(b'"') => match string(Some(r)) {
            Some(_) => format!("data.{name} is empty"),
            // A string whose escapes decode to no text (a lone surrogate).
            None => format!("data.{name} is not readable text: {shown}"),
        },
        Some(b'-' | b'0'..=b'9') => format!(
            "data.{name} is {shown}, a number not plain digits (an id sent as a \
             number must be a whole number written as digits)"
        ),
        _ => format!("data.{name} is {shown}, not a string or a number"),
    })
}

/// `data.business.businessID`, else `data.businessID` (as [`id_field`] reads
/// an id).
fn business_of(ids: &Ids) -> Option<String> {
    ids.business
        .filter(|b| is_object(b))
        .and_then(|b| members(b.get(), ["businessID"]).ok())
        .and_then(|[business_id]| super::model::id_text(business_id))
        .or_else(|| super::model::id_text(ids.business_id))
}

/// Reads a delivery. `Err` is the reason for a 400: not JSON, not an
/// object, or no `event.eventType` string. Everything past the envelope is
/// judged per event type into [`Content`], never an error.
pub fn parse_delivery(body: &[u8]) -> Result<Delivery, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_string())?;
    let value: &RawValue =
        serde_json::from_str(text).map_err(|e| format!("the body is not JSON: {e}"))?;
    if !is_object(value) {
        return Err("the body is not a JSON object".into());
    }
    let env = Envelope::read(value.get())
        .map_err(|e| format!("the body is not a delivery envelope: {e}"))?;
    let event = env
        .event
        .filter(|e| is_object(e))
        .ok_or_else(|| "the body has no `event` object".to_string())?;
    let event = Event::read(event.get()).map_err(|e| format!("`event` is not readable: {e}"))?;
    let event_type = string(event.event_type)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| "`event.eventType` is missing or not a string".to_string())?;
    let content = match event_type.as_str() {
        NEGOTIATION_CREATED => negotiation(env.data),
        MESSAGE_CREATED => message(env.data),
        _ => Content::Other,
    };
    Ok(Delivery {
        event_type,
        // A string, or a number's digits as sent (never through a float).
        webhook_id: column_text(event.webhook_id),
        triggered_at: column_text(event.triggered_at),
        content,
    })
}

fn unusable(reason: String) -> Content {
    Content::Unusable {
        reason,
        negotiation_id: None,
        message_id: None,
    }
}

fn data_ids(data: Option<&RawValue>) -> Result<(&RawValue, Ids<'_>), String> {
    let data = data.ok_or_else(|| "the delivery has no `data`".to_string())?;
    if !is_object(data) {
        return Err("`data` is not a JSON object".into());
    }
    let ids = Ids::read(data.get()).map_err(|e| format!("`data` is not readable: {e}"))?;
    Ok((data, ids))
}

fn negotiation(data: Option<&RawValue>) -> Content {
    let (data, ids) = match data_ids(data) {
        Ok(d) => d,
        Err(reason) => return unusable(reason),
    };
    if let Err(reason) = id_field(ids.negotiation_id, "negotiationID") {
        return unusable(reason);
    }
    let business_id = business_of(&ids);
    match parse_lead(data) {
        Some(lead) => Content::Negotiation { lead, business_id },
        None => unusable("`data` is not a negotiation".into()),
    }
}

fn message(data: Option<&RawValue>) -> Content {
    let (data, ids) = match data_ids(data) {
        Ok(d) => d,
        Err(reason) => return unusable(reason),
    };
    let message_id = id_field(ids.message_id, "messageID");
    let negotiation_id = id_field(ids.negotiation_id, "negotiationID");
    let (message_id, negotiation_id) = match (message_id, negotiation_id) {
        (Ok(m), Ok(n)) => (m, n),
        (m, n) => {
            let reason = [m.as_ref().err(), n.as_ref().err()]
                .into_iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join("; ");
            return Content::Unusable {
                reason,
                negotiation_id: n.ok(),
                message_id: m.ok(),
            };
        }
    };
    // `sentAt`, `from` and `text` as a poll reads them ([`parse_message`]):
    // the same message is the same row whichever path brings it first.
    let Some(read) = parse_message(data) else {
        return Content::Unusable {
            reason: "`data` is not a readable message".into(),
            negotiation_id: Some(negotiation_id),
            message_id: Some(message_id),
        };
    };
    let (sent_at, sender, text) = (read.sent_at, read.sender, read.text);
    Content::Message(Message {
        business_id: business_of(&ids),
        sent_at,
        sender,
        text,
        message_id,
        negotiation_id,
        payload: data.get().to_string(),
    })
}

/// A webhook subscription as `GET /businesses/{id}/webhooks` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subscription {
    #[serde(rename = "webhookID", deserialize_with = "id_text")]
    pub webhook_id: String,
    #[serde(rename = "webhookURL", default, deserialize_with = "text_or_null")]
    pub webhook_url: String,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(rename = "eventTypes", default, deserialize_with = "texts_or_null")]
    pub event_types: Vec<String>,
    #[serde(rename = "authType", default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
}

/// `webhookID`: a string, or a number's digits exactly as sent (never
/// through a float, which would make a number past u64
/// `1.2345678901234568e22`).
fn id_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    match raw.get().trim().as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(raw.get()).map_err(serde::de::Error::custom),
        Some(b'-' | b'0'..=b'9') => Ok(raw.get().trim().to_string()),
        _ => Err(serde::de::Error::custom(format!(
            "webhookID is {}, not a string",
            raw.get().chars().take(40).collect::<String>()
        ))),
    }
}

/// A string, `""` for `null` (every field but the id is optional).
fn text_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A list of strings, empty for `null`; `null` entries are left out.
fn texts_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<Option<String>>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect())
}

/// One page of a business's webhooks, and what it says of the next.
#[derive(Debug, Default)]
pub struct SubscriptionPage {
    pub webhooks: Vec<Subscription>,
    /// `pagination.next`: a URL of the next page.
    pub next: Option<String>,
    /// `pagination.nextPageToken`, sent back as `pageToken`.
    pub next_page_token: Option<String>,
}

/// Reads one page of subscriptions: `{"data": [...], "pagination": {...}}`
/// or a bare array (one page).
pub fn parse_subscription_page(body: &[u8]) -> Result<SubscriptionPage, String> {
    #[derive(Deserialize, Default)]
    struct Markers {
        #[serde(default)]
        next: Option<String>,
        #[serde(rename = "nextPageToken", default)]
        next_page_token: Option<String>,
    }
    #[derive(Deserialize)]
    struct Envelope {
        data: Vec<Subscription>,
        #[serde(default)]
        pagination: Option<Markers>,
    }
    // Not an untagged enum: that buffers each value first, a number past
    // u64 as a float, where a webhook id keeps its digits ([`id_text`]).
    enum List {
        Envelope(Envelope),
        Bare(Vec<Subscription>),
    }
    let bare = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    let list = if bare {
        serde_json::from_slice(body).map(List::Bare)
    } else {
        serde_json::from_slice(body).map(List::Envelope)
    };
    match list {
        Ok(List::Envelope(Envelope { data, pagination })) => {
            let m = pagination.unwrap_or_default();
            Ok(SubscriptionPage {
                webhooks: data,
                next: m.next.filter(|n| !n.is_empty()),
                next_page_token: m.next_page_token.filter(|t| !t.is_empty()),
            })
        }
        Ok(List::Bare(data)) => Ok(SubscriptionPage {
            webhooks: data,
            ..Default::default()
        }),
        Err(e) => Err(format!("not a list of webhooks: {e}")),
    }
}

/// The query of the page after `page`, to apply to our own list path
/// (`None`: the last page). A `next` URL gives only its query (the
/// documented one has no `/api` in its path), and only from `base_url`'s
/// host or Thumbtack's: another host means the answer is not what we think.
pub fn next_page_query(base_url: &str, page: &SubscriptionPage) -> Result<Option<String>, String> {
    if let Some(next) = &page.next {
        let base = reqwest::Url::parse(base_url)
            .map_err(|e| format!("api.base_url {base_url:?} is not a URL: {e}"))?;
        use super::paging::{NextRefused, resolve_next};
        let url = resolve_next(&base, next).map_err(|refused| match refused {
            NextRefused::NotUrl(e) => {
                format!("pagination.next {next:?} of the webhooks is not a URL: {e}")
            }
            NextRefused::OtherHost(host) => format!(
                "pagination.next of the webhooks names another host ({host}); it is never \
                 followed: check api.base_url ({base_url})"
            ),
        })?;
        return match url.query().filter(|q| !q.is_empty()) {
            Some(q) => Ok(Some(q.to_string())),
            None => Err(format!(
                "pagination.next {next:?} of the webhooks names no page (no query)"
            )),
        };
    }
    Ok(page
        .next_page_token
        .as_ref()
        .map(|t| serde_urlencoded::to_string([("pageToken", t.as_str())]).unwrap_or_default()))
}

/// How Thumbtack authenticates to the receiver, as registered.
#[derive(Clone, Serialize)]
#[serde(untagged)]
pub enum RegisterAuth {
    Basic { username: String, password: String },
    Header { header: String, value: String },
}

impl std::fmt::Debug for RegisterAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterAuth::Basic { username, .. } => write!(
                f,
                "Basic {{ username: {username:?}, password: {} }}",
                crate::secret::MASK
            ),
            RegisterAuth::Header { header, .. } => write!(
                f,
                "Header {{ header: {header:?}, value: {} }}",
                crate::secret::MASK
            ),
        }
    }
}

/// The body of `POST /businesses/{id}/webhooks`.
#[derive(Debug, Clone, Serialize)]
pub struct RegisterBody {
    #[serde(rename = "webhookURL")]
    pub webhook_url: String,
    #[serde(rename = "eventTypes")]
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub auth: RegisterAuth,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page after a page of webhooks: `pagination.next`'s query (its
    /// path is not ours), only from `base_url`'s host or Thumbtack's, or
    /// `nextPageToken` sent back as `pageToken`; none on the last page.
    #[test]
    fn the_next_page_of_webhooks_is_its_query_on_our_path_and_only_from_a_known_host() {
        let base = "https://api.thumbtack.com";
        let page = |body: &str| parse_subscription_page(body.as_bytes()).unwrap();
        let last = page(r#"{"data":[],"pagination":{"limit":10}}"#);
        assert_eq!(next_page_query(base, &last), Ok(None));
        let bare = page(r#"[{"webhookID":"w1"}]"#);
        assert_eq!(next_page_query(base, &bare), Ok(None));
        let next = page(
            r#"{"data":[],"pagination":{"next":"https://api.thumbtack.com/v4/businesses/1/webhooks?limit=10&offset=10"}}"#,
        );
        assert_eq!(
            next_page_query(base, &next),
            Ok(Some("limit=10&offset=10".into()))
        );
        let token = page(r#"{"data":[],"pagination":{"nextPageToken":"a b&c"}}"#);
        assert_eq!(
            next_page_query(base, &token),
            Ok(Some("pageToken=a+b%26c".into()))
        );
        let elsewhere =
            page(r#"{"data":[],"pagination":{"next":"https://evil.example/v4/x?offset=10"}}"#);
        let e = next_page_query(base, &elsewhere).unwrap_err();
        assert!(e.contains("another host (evil.example)"), "{e}");
        let no_query = page(r#"{"data":[],"pagination":{"next":"/v4/x"}}"#);
        assert!(next_page_query(base, &no_query).is_err());
    }

    /// A webhook listed with `null` for a field (`"eventTypes": null`, as a
    /// server marshals an empty list) made the whole list unreadable:
    /// `webhooks list` and `register` failed for the business.
    #[test]
    fn a_webhook_listed_with_null_fields_is_read() {
        let list = parse_subscription_page(
            br#"{"data":[{"webhookID":"w1","webhookURL":null,"enabled":null,"eventTypes":null,"authType":null},
                {"webhookID":"w2","webhookURL":"https://x/h","enabled":true,"eventTypes":["MessageCreatedV4",null]}]}"#,
        )
        .unwrap()
        .webhooks;
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].webhook_url, "");
        assert!(list[0].event_types.is_empty());
        assert_eq!(list[1].event_types, vec!["MessageCreatedV4".to_string()]);
    }

    #[test]
    fn registered_credentials_never_print() {
        let a = RegisterAuth::Basic {
            username: "t".into(),
            password: "pw-123456".into(),
        };
        assert!(!format!("{a:?}").contains("pw-123456"));
        assert!(serde_json::to_string(&a).unwrap().contains("pw-123456"));
    }

    #[test]
    fn envelopes_that_are_refused() {
        for (body, why) in [
            (&b"{\"event\":"[..], "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"{\"data\":{}}", "no `event`"),
            (b"{\"event\":{\"webhookID\":\"1\"}}", "eventType"),
            (b"{\"event\":{\"eventType\":7}}", "eventType"),
            (b"\xff\xfe", "UTF-8"),
        ] {
            let e = parse_delivery(body).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_lead_keeps_every_byte_and_finds_its_business() {
        let body = br#"{"event":{"eventType":"NegotiationCreatedV4","webhookID":"w1","triggeredAt":"2026-01-01T00:00:00Z"},
            "data":{"negotiationID":"519153480500518912","business":{"businessID":"468046965846925323"},"x":9007199254740993}}"#;
        let d = parse_delivery(body).unwrap();
        assert_eq!(d.webhook_id.as_deref(), Some("w1"));
        let Content::Negotiation { lead, business_id } = d.content else {
            panic!("not a negotiation: {:?}", d.content)
        };
        assert_eq!(business_id.as_deref(), Some("468046965846925323"));
        assert!(lead.payload.contains("9007199254740993"));
        assert!(lead.payload.starts_with("{\"negotiationID\""));
    }

    #[test]
    fn a_lead_that_repeats_a_key_is_stored_as_received() {
        let data = r#"{"negotiationID":"5","status":"Open","status":"Canceled"}"#;
        let body = format!(
            r#"{{"event":{{"eventType":"NegotiationCreatedV4","triggeredAt":"2026-01-01T00:00:00Z"}},"data":{data}}}"#
        );
        let d = parse_delivery(body.as_bytes()).unwrap();
        let Content::Negotiation { lead, .. } = d.content else {
            panic!("not a negotiation: {:?}", d.content)
        };
        assert_eq!(lead.status.as_deref(), Some("Canceled"));
        assert_eq!(lead.payload, data);
    }

    #[test]
    fn unusable_negotiations_and_messages_say_why() {
        for (data, why) in [
            ("", "no `data`"),
            (r#","data":[1]"#, "not a JSON object"),
            (r#","data":{"x":1}"#, "no negotiationID"),
            (
                r#","data":{"negotiationID":{"id":"519153480500518912"}}"#,
                "not a string or a number",
            ),
            (r#","data":{"negotiationID":" "}"#, "is empty"),
            // Review (hooks): a number that is not plain digits was taken
            // as its text, a fake lead beside the real one.
            (
                r#","data":{"negotiationID":5.191534805005189e17}"#,
                "not plain digits",
            ),
            (r#","data":{"negotiationID":1e3}"#, "not plain digits"),
            (r#","data":{"negotiationID":-0}"#, "not plain digits"),
            (r#","data":{"negotiationID":1.0}"#, "not plain digits"),
            (r#","data":{"negotiationID":1e400}"#, "not plain digits"),
            // Review (hooks): a string that is no text (a lone surrogate
            // escape) was reported as "empty".
            (
                r#","data":{"negotiationID":"1\ud800"}"#,
                "not readable text",
            ),
        ] {
            let body = format!(r#"{{"event":{{"eventType":"NegotiationCreatedV4"}}{data}}}"#);
            match parse_delivery(body.as_bytes()).unwrap().content {
                Content::Unusable { reason, .. } => assert!(reason.contains(why), "{reason}"),
                other => panic!("{data}: {other:?}"),
            }
        }
        let body = r#"{"event":{"eventType":"MessageCreatedV4"},"data":{"negotiationID":"5"}}"#;
        match parse_delivery(body.as_bytes()).unwrap().content {
            Content::Unusable {
                reason,
                negotiation_id,
                ..
            } => {
                assert!(reason.contains("messageID"), "{reason}");
                assert_eq!(negotiation_id.as_deref(), Some("5"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Review (hooks): a webhook id sent as a number past u64 went through
    /// a float (`1.2345678901234568e22`); it is now its digits as sent.
    #[test]
    fn a_subscription_id_sent_as_a_long_number_keeps_its_digits() {
        for body in [
            r#"{"data":[{"webhookID":12345678901234567890123,"webhookURL":"https://x/h"}]}"#,
            r#"[{"webhookID":12345678901234567890123,"webhookURL":"https://x/h"}]"#,
        ] {
            let page = parse_subscription_page(body.as_bytes()).unwrap();
            assert_eq!(page.webhooks[0].webhook_id, "12345678901234567890123");
        }
        let one: Subscription =
            serde_json::from_str(r#"{"webhookID":12345678901234567890123}"#).unwrap();
        assert_eq!(one.webhook_id, "12345678901234567890123");
        assert!(serde_json::from_str::<Subscription>(r#"{"webhookID":null}"#).is_err());
    }
}
