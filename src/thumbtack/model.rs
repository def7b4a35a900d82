//! Wire types (SPEC §5), tolerant of unknown fields: a lead is kept as the
//! JSON object exactly as received, plus the convenience columns read from
//! either published shape.

use crate::lead::LeadRow;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// One page of `GET /businesses/{id}/negotiations`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub leads: Vec<LeadRow>,
    /// The ids of the leads the caller's check found unchanged
    /// ([`parse_page_with`]): listed, but not read past their id.
    pub unchanged: Vec<String>,
    /// Entries that are not objects with a `negotiationID` (logged, counted, not stored).
    pub skipped: i64,
    /// The ids of skipped entries that still name one: an object whose
    /// last top-level `negotiationID` (the one a read lead's id comes from)
    /// is readable though the lead is not (e.g. a key that is no text:
    /// `{"negotiationID":"1","\ud800":0}`, or an id no reader takes, `" "`,
    /// `1e3`, read as its text). Such a lead is listed: a full scan never
    /// marks it missing.
    pub unread_ids: Vec<String>,
    /// Skipped entries that name no lead a reader takes: no readable
    /// `negotiationID`, or one that is blank or a number not written as
    /// plain digits (whose text is in [`Page::unread_ids`] all the same).
    /// Any lead a full scan did not list may be one of them, so such a
    /// scan marks no lead missing.
    pub unnamed: i64,
    /// What the page said about the listing (see `paging.rs` for what it means).
    pub markers: Markers,
    /// xxh3 of the ids of every lead listed (read or unchanged), in listing
    /// order, each followed by a NUL; `None` when the page lists none. What
    /// tells a page from an earlier one (`paging.rs`).
    pub ids_digest: Option<u64>,
    /// The id of the first entry of `data`, when that entry is a listed
    /// lead (read or unchanged), and of the last listed lead: what tells
    /// whether a confirmation asked one lead back starts where the page
    /// before ended (`paging.rs`).
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// Where [`Page::last_id`] is, counted from the end of `data` (1: the
    /// last entry; 2: one entry with no readable id follows it); 0 when no
    /// lead is listed.
    pub last_id_back: u64,
    /// When the request that got the page was sent (leadsync's clock, the
    /// database's format; the server made the page no earlier): set by
    /// `Client::list_page`, `None` from the parsers.
    pub read_at: Option<String>,
}

impl Page {
    /// Every entry of `data`, stored, unchanged or skipped: what "a full page" counts.
    pub fn entries(&self) -> u64 {
        (self.leads.len() + self.unchanged.len()) as u64 + self.skipped as u64
    }
}

/// The pagination markers of one page, as sent (SPEC §5 "List").
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Markers {
    /// The body was a bare JSON array (no envelope, no markers).
    pub bare_array: bool,
    /// `pagination.limit`, when a non-negative integer.
    pub limit: Option<u64>,
    /// `pagination.offset`, when a non-negative integer.
    pub offset: Option<u64>,
    /// `pagination.next`, when a non-empty string.
    pub next: Option<String>,
    /// `pagination.nextPageToken`, when a non-empty string.
    pub next_page_token: Option<String>,
    /// `pagination.next` is present, even as null or "".
    pub next_key: bool,
    /// `pagination.nextPageToken` is present, even as null or "".
    pub token_key: bool,
    /// The `pagination` object exactly as sent (for `probe`).
    pub raw: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    data: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    pagination: Option<&'a RawValue>,
}

/// The fields leadsync reads from a lead, in both published shapes (the
/// Leads page's example and the `NegotiationV4` schema); each is parsed on
/// its own, so a field of an unexpected type is ignored, never fatal. The
/// nested objects are read in the same pass as the lead (no second scan of
/// their text).
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
    category: Option<Nested<Named<'a>>>,
    #[serde(borrow, default)]
    customer: Option<Nested<Customer<'a>>>,
    #[serde(borrow, default)]
    request: Option<Nested<Request<'a>>>,
    #[serde(rename = "leadPrice", borrow, default)]
    lead_price: Option<&'a RawValue>,
    #[serde(rename = "chargeState", borrow, default)]
    charge_state: Option<&'a RawValue>,
}

/// A nested object of the lead, read in place: `Some` when the value is an
/// object without a repeated known key, `None` for anything else (which is
/// skipped, never an error), as a separate parse of that value would say.
struct Nested<T> {
    value: Option<T>,
    /// Where the object's text ends ([`Tail`]); `None` for anything but an
    /// object whose last member's end is known.
    end: Tail,
}

impl<T> Nested<T> {
    fn get(n: &Option<Nested<T>>) -> Option<&T> {
        n.as_ref().and_then(|n| n.value.as_ref())
    }

    /// Not an object (or nothing known of its end).
    fn none() -> Self {
        Nested {
            value: None,
            end: None,
        }
    }
}

/// Where a value read in place ends in the page's text, for the one-scan
/// page reader ([`fast`]): the end address of the last raw value read
/// within it, followed by this many closing braces (each after optional
/// whitespace). `None` when unknown (an empty object, a nested place that
/// held no object).
type Tail = Option<(usize, u32)>;

/// A value read in place whose end is known ([`Tail`]).
trait Ends {
    fn end(&self) -> Tail;
}

impl Ends for &RawValue {
    fn end(&self) -> Tail {
        Some((self.get().as_ptr() as usize + self.get().len(), 0))
    }
}

impl<T> Ends for Nested<T> {
    fn end(&self) -> Tail {
        self.end
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Declares a nested object's struct (every field optional) and how
/// [`Nested`] reads it: known keys into their fields, the rest skipped, a
/// repeated known key makes the whole object unreadable (`None`), as a
/// derived `Deserialize` would refuse it.
macro_rules! nested_object {
    ($name:ident { $($field:ident: $ty:ty = $key:literal),* $(,)? }) => {
        #[derive(Default)]
        struct $name<'a> {
            $($field: Option<$ty>,)*
        }

        impl<'de: 'a, 'a> Deserialize<'de> for Nested<$name<'a>> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V<'a>(std::marker::PhantomData<&'a ()>);
                impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
                    type Value = Nested<$name<'a>>;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("any JSON value")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Self::Value, A::Error> {
                        let mut out = $name::default();
                        let mut repeated = false;
                        // The end of the last member's value (skipped
                        // values are read as raw values for their end: the
                        // same scan as skipping them).
                        let mut last: Tail = None;
                        while let Some(key) = map.next_key::<Key<'de>>()? {
                            match key.0.as_ref() {
                                $($key => {
                                    if out.$field.is_some() {
                                        repeated = true;
                                        last = map.next_value::<&'de RawValue>()?.end();
                                    } else {
                                        let v: $ty = map.next_value()?;
                                        last = v.end();
                                        out.$field = Some(v);
                                    }
                                })*
                                _ => {
                                    last = map.next_value::<&'de RawValue>()?.end();
                                }
                            }
                        }
                        Ok(Nested {
                            value: (!repeated).then_some(out),
                            end: last.map(|(at, closing)| (at, closing + 1)),
                        })
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<Self::Value, A::Error> {
                        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                        Ok(Nested::none())
                    }
                    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                    fn visit_unit<E>(self) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                    fn visit_none<E>(self) -> Result<Self::Value, E> {
                        Ok(Nested::none())
                    }
                }
                d.deserialize_any(V(std::marker::PhantomData))
            }
        }
    };
}

nested_object!(Named { name: &'a RawValue = "name" });
nested_object!(Request {
    category: Nested<Named<'a>> = "category",
    location: Nested<Location<'a>> = "location",
});
nested_object!(Customer {
    display_name: &'a RawValue = "displayName",
    first_name: &'a RawValue = "firstName",
    last_name: &'a RawValue = "lastName",
    phone: &'a RawValue = "phone",
    location: Nested<Location<'a>> = "location",
});
nested_object!(Location {
    city: &'a RawValue = "city",
    zip_code: &'a RawValue = "zipCode",
});

/// A JSON string, or a number as the text it was sent as; anything else
/// (and an empty string) is `None`.
fn text(raw: Option<&RawValue>) -> Option<String> {
    text_ref(raw).map(Cow::into_owned)
}

/// [`text`] for a reader of the same wire elsewhere (a webhook delivery's
/// message): a field read by one rule whichever way it came.
pub(crate) fn column_text(raw: Option<&RawValue>) -> Option<String> {
    text(raw)
}

/// A lead's (or a delivered message's) id as every reader takes it: a
/// string that is not blank, or a number sent as plain digits (its digits
/// exactly as sent, never through a float: `519153480500518912` keeps every
/// one). A number written otherwise (`1e3`, `1.0`, `-0`, `1e400`,
/// `5.191534805005189e17`, a float's rounding of a long id) names no lead:
/// its text is no id Thumbtack gives as a string, and taking it would
/// mirror a lead beside the real one. `None` for anything else.
pub(crate) fn id_text(raw: Option<&RawValue>) -> Option<String> {
    id_of(raw?.get()).map(Cow::into_owned)
}

/// [`id_text`] of a value's raw text.
fn id_of(raw: &str) -> Option<Cow<'_, str>> {
    let t = text_of(raw)?;
    let usable = if raw.trim_start().starts_with('"') {
        !t.trim().is_empty()
    } else {
        t.bytes().all(|b| b.is_ascii_digit())
    };
    usable.then_some(t)
}

/// The members of the JSON object `raw` named in `keys` (in that order),
/// the other members skipped. A repeated key's **last** value counts, as
/// in JavaScript's `JSON.parse` and as the poller reads a lead's top level
/// ([`parse_lead`]): a derived `Deserialize` refused such an object
/// ("duplicate field"), so a delivery or a polled message the poller would
/// read as a lead was answered 400, set aside or skipped. Keys are compared
/// decoded (`"te\u0078t"` is `text`). `Err` when `raw` is not one JSON
/// object. The one reader of an object's members by name: a delivery's
/// envelope, `event` and `data`, a message ([`parse_message`]), a sent
/// message's response ([`sent_message_id`]).
pub(crate) fn members<'a, const N: usize>(
    raw: &'a str,
    keys: [&str; N],
) -> Result<[Option<&'a RawValue>; N], serde_json::Error> {
    use serde::de::{Deserializer as _, MapAccess, Visitor};
    struct Members<'k, const N: usize>(&'k [&'k str; N]);
    impl<'de, const N: usize> Visitor<'de> for Members<'_, N> {
        type Value = [Option<&'de RawValue>; N];
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None; N];
            while let Some(key) = map.next_key::<Key<'de>>()? {
                match self.0.iter().position(|k| *k == key.0) {
                    Some(i) => found[i] = Some(map.next_value::<&'de RawValue>()?),
                    None => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    let found = (&mut de).deserialize_map(Members(&keys))?;
    de.end()?;
    Ok(found)
}

/// [`text`], borrowed from the JSON text when it needs no decoding (a
/// string without escapes, a number): a column read from a page costs one
/// allocation, its own, and a text only looked at (a name's parts, a time
/// to convert) none.
fn text_ref(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    text_of(raw?.get())
}

/// [`text_ref`] of a value's raw text.
fn text_of(raw: &str) -> Option<Cow<'_, str>> {
    let raw = raw.trim();
    match raw.as_bytes().first()? {
        // A valid JSON string without escapes is its text between the quotes.
        b'"' if !raw.contains('\\') => {
            Some(Cow::Borrowed(&raw[1..raw.len() - 1])).filter(|s| !s.is_empty())
        }
        b'"' => serde_json::from_str::<String>(raw)
            .ok()
            .filter(|s| !s.is_empty())
            .map(Cow::Owned),
        b'-' | b'0'..=b'9' => Some(Cow::Borrowed(raw)),
        _ => None,
    }
}

/// A lead's time in the mirror's form ([`crate::time::sortable_utc`]);
/// what is not an RFC 3339 time in the years 0000–9999 stays as sent.
fn lead_time(t: &str) -> String {
    crate::time::sortable_utc(t).unwrap_or_else(|| t.to_string())
}

/// A customer's name from its first and last names: each trimmed, the
/// non-empty ones joined by a space (one allocation, the result's).
fn full_name(first: Option<&RawValue>, last: Option<&RawValue>) -> Option<String> {
    let (first, last) = (text_ref(first), text_ref(last));
    let parts = [first.as_deref(), last.as_deref()];
    let mut parts = parts
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let mut name = String::from(parts.next()?);
    for p in parts {
        name.reserve_exact(p.len() + 1);
        name.push(' ');
        name.push_str(p);
    }
    Some(name)
}

/// A nested object of the lead, when the field is one.
fn object<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    let raw = raw?;
    if !raw.get().trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// Reads one lead (a list entry or a GET body); `None` when it is not an
/// object with a `negotiationID`. A key repeated at the lead's top level
/// (JSON allows it) does not make it unreadable: its last value counts, as
/// in JavaScript's `JSON.parse` (read by the fallback, so the common path
/// pays nothing); a nested object that repeats a key read from it gives
/// none of its columns, as before. Each convenience column takes the first
/// present of its fields (SPEC §5): category `request.category.name`, then
/// `category.name`; customer name `customer.displayName`, then
/// `firstName + " " + lastName`; city and zip `request.location`, then
/// `customer.location`.
pub fn parse_lead(raw: &RawValue) -> Option<LeadRow> {
    let payload = raw.get();
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let Ok(f) = serde_json::from_str::<LeadFields>(payload) else {
        return separate::parse_lead(raw).or_else(|| separate::parse_lead_last_wins(raw));
    };
    lead_row(&f, payload)
}

/// The row of a lead read in one pass, `payload` being its exact text.
fn lead_row(f: &LeadFields, payload: &str) -> Option<LeadRow> {
    let negotiation_id = id_text(f.negotiation_id)?;
    let created_at = text_ref(f.create_time)
        .or_else(|| text_ref(f.created_at))
        .map(|t| lead_time(&t));
    let request = Nested::get(&f.request);
    let customer = Nested::get(&f.customer);
    let request_location = request.and_then(|r| Nested::get(&r.location));
    let customer_location = customer.and_then(|c| Nested::get(&c.location));
    let name_of = |named: &Option<Nested<Named>>| Nested::get(named).and_then(|n| text(n.name));
    let category = request
        .and_then(|r| name_of(&r.category))
        .or_else(|| name_of(&f.category));
    let customer_name = customer
        .as_ref()
        .and_then(|c| text(c.display_name).or_else(|| full_name(c.first_name, c.last_name)));
    let located = |pick: for<'l> fn(&Location<'l>) -> Option<&'l RawValue>| {
        request_location
            .as_ref()
            .and_then(|l| text(pick(l)))
            .or_else(|| customer_location.as_ref().and_then(|l| text(pick(l))))
    };
    Some(LeadRow {
        hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
        status: text(f.status),
        created_at,
        category,
        customer_name,
        city: located(|l| l.city),
        zip: located(|l| l.zip_code),
        customer_phone: customer.as_ref().and_then(|c| text(c.phone)),
        lead_price: text(f.lead_price),
        charge_state: text(f.charge_state),
        negotiation_id,
        payload: payload.to_string(),
    })
}

/// Reads a lead from a whole body (`GET /negotiations/{id}`, a webhook's `data`).
pub fn parse_lead_body(body: &str) -> Option<LeadRow> {
    let raw: &RawValue = serde_json::from_str(body).ok()?;
    parse_lead(raw)
}

/// A non-negative integer, sent as a number or a numeric string.
fn count_of(raw: Option<&RawValue>) -> Option<u64> {
    text(raw).and_then(|t| t.trim().parse::<u64>().ok())
}

fn markers_of(pagination: Option<&RawValue>) -> Markers {
    let Some(raw) = pagination else {
        return Markers::default();
    };
    let mut m = Markers {
        raw: Some(raw.get().to_string()),
        ..Markers::default()
    };
    // A map, not a struct: a key sent as null still counts as sent.
    let Some(p) = object::<std::collections::BTreeMap<String, &RawValue>>(Some(raw)) else {
        return m;
    };
    let field = |k: &str| p.get(k).copied();
    m.next_key = field("next").is_some();
    m.token_key = field("nextPageToken").is_some();
    m.next = text(field("next"));
    m.next_page_token = text(field("nextPageToken"));
    m.offset = count_of(field("offset"));
    m.limit = count_of(field("limit"));
    m
}

/// Parses a listing page: `{"data": [...], "pagination": {...}}` (a bare
/// array is read as a page without markers).
pub fn parse_page(body: &[u8]) -> Result<Page, String> {
    parse_page_with(body, None)
}

/// A listing entry's first top-level `negotiationID` (read as [`text`]
/// reads it) and the xxh3 of its bytes (the payload hash [`parse_lead`]
/// computes); the object is not read past that key. `None` when the entry
/// is not an object or has no readable id there.
///
/// Only a key to look the lead up by: a lead is skipped when the row
/// mirrored under this id has this very payload hash, i.e. these bytes were
/// stored under this id, which [`parse_lead`] read from them. An object
/// that repeats the key, or that `parse_lead` would read otherwise, finds
/// no such row and is read in full.
fn id_and_hash(payload: &str) -> Option<(String, i64)> {
    struct FirstId<'a>(&'a mut Option<String>);
    impl<'de> serde::de::Visitor<'de> for FirstId<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a lead object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<Key<'de>>()? {
                if key.0 == "negotiationID" {
                    let value: &'de RawValue = map.next_value()?;
                    *self.0 = id_text(Some(value));
                    // The rest of the object is not read (serde_json then
                    // reports the unread rest, which is ignored).
                    return Ok(());
                }
                map.next_value::<serde::de::IgnoredAny>()?;
            }
            Ok(())
        }
    }
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let mut id = None;
    let mut de = serde_json::Deserializer::from_str(payload);
    let _ = serde::Deserializer::deserialize_map(&mut de, FirstId(&mut id));
    Some((id?, xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64))
}

/// The id an entry [`parse_lead`] could not read still names: its last
/// top-level `negotiationID` (the value a read lead's id is taken from; a
/// last one that is `null` or no text names none). Read as [`text`] reads
/// it, not as [`id_text`]: an entry whose id is blank or a number not
/// written as plain digits is skipped, yet names the lead an earlier
/// version mirrored under that text, which a full scan must then not mark
/// missing for it. Keys are compared as
/// bytes, so a key that is no text (a lone surrogate escape, which makes
/// the lead unreadable) does not stop the scan.
///
/// With the text: whether a reader takes it as an id ([`id_text`]); an
/// entry whose id it does not take names no lead ([`Page::unnamed`]).
fn unread_id(payload: &str) -> Option<(String, bool)> {
    struct IsId(bool);
    impl<'de> Deserialize<'de> for IsId {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = IsId;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<IsId, E> {
                    Ok(IsId(v == b"negotiationID"))
                }
                fn visit_str<E>(self, v: &str) -> Result<IsId, E> {
                    Ok(IsId(v == "negotiationID"))
                }
            }
            d.deserialize_bytes(V)
        }
    }
    struct LastId<'a, 'de>(&'a mut Option<&'de RawValue>);
    impl<'de> serde::de::Visitor<'de> for LastId<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a lead object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(IsId(is_id)) = map.next_key()? {
                if is_id {
                    *self.0 = map.next_value::<Option<&'de RawValue>>()?;
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let mut id = None;
    let mut de = serde_json::Deserializer::from_str(payload);
    serde::Deserializer::deserialize_map(&mut de, LastId(&mut id)).ok()?;
    let id = id?;
    Some((text(Some(id))?, id_of(id.get()).is_some()))
}

/// Counts an entry no reader could read into `page` (`payload`: its text):
/// skipped, its id's text named when it has one, and counted as naming no
/// lead unless that id is one a reader takes.
fn skip_entry(page: &mut Page, payload: &str) {
    page.skipped += 1;
    match unread_id(payload) {
        Some((id, usable)) => {
            page.unread_ids.push(id);
            if !usable {
                page.unnamed += 1;
            }
        }
        None => page.unnamed += 1,
    }
}

/// A caller's check of a listed lead by its id and payload hash: true when
/// the lead needs no reading (see [`parse_page_with`]). It may be asked
/// about a lead more than once (a page the quick reader gives up on is read
/// again the other way), and must give the same answer each time. It may
/// also be asked about the leads of a page then found unreadable, with the
/// hash of bytes that are no JSON (the quick reader asks before serde_json
/// reads a lead): what it keeps of such an ask must not change what gets
/// written once the page is fetched again (sync's `fetcher_check`).
pub type Unchanged<'a> = dyn Fn(&str, i64) -> bool + Sync + 'a;

/// [`parse_page`], where `unchanged(id, payload hash)`, when given, is
/// asked first for each lead: a lead it answers true for is listed in
/// [`Page::unchanged`] and not read further (no columns, no copy of its
/// payload). The check sees exactly the bytes [`parse_lead`] would hash.
pub fn parse_page_with(body: &[u8], unchanged: Option<&Unchanged>) -> Result<Page, String> {
    // The checked reader checks UTF-8 piece by piece (and needs no check
    // of a lead found unchanged: see `checked`).
    if let Some(unchanged) = unchanged
        && let Some(page) = checked::read(body, unchanged)
    {
        return Ok(page);
    }
    let text_body = std::str::from_utf8(body).map_err(|_| "the page is not UTF-8".to_string())?;
    if unchanged.is_none()
        && let Some(read) = fast::read(text_body)
    {
        return Ok(page_of(read));
    }
    parse_page_scanning_each(text_body, unchanged)
}

/// [`parse_page_with`] with each lead scanned twice: the page's text to
/// delimit it, then its own text to read it (when it is not found unchanged).
fn parse_page_scanning_each(
    text_body: &str,
    unchanged: Option<&Unchanged>,
) -> Result<Page, String> {
    let (entries, markers) = if text_body.trim_start().starts_with('[') {
        let entries: Vec<&RawValue> = serde_json::from_str(text_body)
            .map_err(|e| format!("the page is not valid JSON: {e}"))?;
        (entries, page_markers(true, None))
    } else {
        let env: Envelope = serde_json::from_str(text_body)
            .map_err(|e| format!("the page is not a JSON object with a data array: {e}"))?;
        let data = env
            .data
            .ok_or_else(|| "the page has no `data` array".to_string())?;
        (data, page_markers(false, env.pagination))
    };
    let mut page = Page {
        leads: Vec::with_capacity(entries.len()),
        markers,
        ..Page::default()
    };
    let mut ids = IdsDigest::default();
    for raw in entries {
        let skip = unchanged
            .and_then(|unchanged| id_and_hash(raw.get()).filter(|(id, hash)| unchanged(id, *hash)));
        let id = match skip {
            Some((id, _)) => {
                page.unchanged.push(id);
                &page.unchanged[page.unchanged.len() - 1]
            }
            _ => match parse_lead(raw) {
                Some(lead) => {
                    page.leads.push(lead);
                    &page.leads[page.leads.len() - 1].negotiation_id
                }
                None => {
                    skip_entry(&mut page, raw.get());
                    ids.skip();
                    continue;
                }
            },
        };
        ids.add(id);
    }
    ids.finish(&mut page);
    Ok(page)
}

/// A page's markers: none for a bare array, else what `pagination` says.
fn page_markers(bare_array: bool, pagination: Option<&RawValue>) -> Markers {
    if bare_array {
        Markers {
            bare_array: true,
            ..Markers::default()
        }
    } else {
        markers_of(pagination)
    }
}

/// [`Page::ids_digest`], built by both page readers: xxh3 of every listed
/// id in listing order, each followed by a NUL; `None` when none is listed.
/// It also keeps the first entry's id and the last listed one ([`Page::first_id`]).
#[derive(Default)]
struct IdsDigest {
    hasher: xxhash_rust::xxh3::Xxh3,
    any: bool,
    /// An entry was seen (listed or skipped).
    started: bool,
    first: Option<String>,
    /// The last listed id (the buffer is reused); `after_last` counts the
    /// entries after it.
    last: String,
    after_last: u64,
}

impl IdsDigest {
    fn add(&mut self, id: &str) {
        self.hasher.update(id.as_bytes());
        self.hasher.update(b"\0");
        self.any = true;
        if !self.started {
            self.started = true;
            self.first = Some(id.to_owned());
        }
        self.last.clear();
        self.last.push_str(id);
        self.after_last = 0;
    }

    /// An entry that is not listed (skipped).
    fn skip(&mut self) {
        self.started = true;
        self.after_last += 1;
    }

    /// Sets the page's digest and edge ids.
    fn finish(self, page: &mut Page) {
        page.ids_digest = self.any.then(|| self.hasher.digest());
        page.first_id = self.first;
        page.last_id_back = if self.any { self.after_last + 1 } else { 0 };
        page.last_id = self.any.then_some(self.last);
    }
}

/// The page [`fast::read`] read: what [`parse_page_with`] makes of the same
/// body without a check.
fn page_of(read: fast::Read) -> Page {
    let mut page = Page {
        leads: Vec::with_capacity(read.entries.len()),
        markers: page_markers(read.bare_array, read.pagination),
        ..Page::default()
    };
    let mut ids = IdsDigest::default();
    for lead in read.entries {
        let Some(lead) = lead else {
            // The fast reader gives up on an entry naming an id it cannot
            // read (`fast`): one it skips names none.
            page.skipped += 1;
            page.unnamed += 1;
            ids.skip();
            continue;
        };
        ids.add(&lead.negotiation_id);
        page.leads.push(lead);
    }
    ids.finish(&mut page);
    page
}

/// The one-scan page reader used when no lead is checked (a first sync):
/// each entry of `data` is read once, its fields in place and its exact
/// text located from inside (the first key's position, the last value's
/// end), where the other reader scans each lead to delimit it and then again
/// to read it. It reads only what it can read exactly as that reader does:
/// on anything else (every error, a repeated top-level key, an object whose
/// start or end it cannot locate) it answers `None` and the page is read
/// the other way.
mod fast {
    use super::{Ends, Key, LeadFields, Tail, lead_row};
    use crate::lead::LeadRow;
    use serde::de::{
        DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use serde_json::value::RawValue;
    use std::borrow::Cow;
    use std::fmt;

    /// An entry of `data`: the lead's row ([`super::lead_row`] of its
    /// fields and exact text), or `None` (not an object, no id).
    type Entry = Option<LeadRow>;

    pub(super) struct Read<'a> {
        pub entries: Vec<Entry>,
        pub pagination: Option<&'a RawValue>,
        pub bare_array: bool,
    }

    /// The page read in one scan, or `None` (read it the other way).
    pub(super) fn read(body: &str) -> Option<Read<'_>> {
        let mut de = serde_json::Deserializer::from_str(body);
        let read = if body.trim_start().starts_with('[') {
            Read {
                entries: Entries(body).deserialize(&mut de).ok()?,
                pagination: None,
                bare_array: true,
            }
        } else {
            de.deserialize_map(Envelope(body)).ok()?
        };
        de.end().ok()?;
        Some(read)
    }

    fn whitespace(b: u8) -> bool {
        matches!(b, b' ' | b'\n' | b'\r' | b'\t')
    }

    /// The text of an object in `body`, from the address of its first key
    /// (the key's text, after its opening quote) to its end ([`Tail`]),
    /// when both are where JSON puts them.
    fn span(body: &str, first_key: usize, end: Tail) -> Option<&str> {
        let base = body.as_ptr() as usize;
        let bytes = body.as_bytes();
        let mut start = first_key.checked_sub(base)?.checked_sub(1)?;
        if *bytes.get(start)? != b'"' {
            return None;
        }
        loop {
            start = start.checked_sub(1)?;
            match bytes[start] {
                b'{' => break,
                b if whitespace(b) => {}
                _ => return None,
            }
        }
        let (at, closing) = end?;
        let mut end = at.checked_sub(base)?;
        for _ in 0..closing {
            while whitespace(*bytes.get(end)?) {
                end += 1;
            }
            if *bytes.get(end)? != b'}' {
                return None;
            }
            end += 1;
        }
        body.get(start..end)
    }

    struct Envelope<'a>(&'a str);

    impl<'de> Visitor<'de> for Envelope<'de> {
        type Value = Read<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a listing page")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read<'de>, A::Error> {
            let mut entries = None;
            let mut pagination = None;
            while let Some(key) = map.next_key::<Key<'de>>()? {
                match key.0.as_ref() {
                    "data" if entries.is_none() => {
                        entries = Some(map.next_value_seed(Entries(self.0))?);
                    }
                    "pagination" if pagination.is_none() => {
                        pagination = Some(map.next_value::<Option<&'de RawValue>>()?);
                    }
                    "data" | "pagination" => return Err(A::Error::custom("a repeated key")),
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Read {
                entries: entries.ok_or_else(|| A::Error::custom("no data"))?,
                pagination: pagination.flatten(),
                bare_array: false,
            })
        }
    }

    /// The entries of `data` (or of a bare array).
    struct Entries<'a>(&'a str);

    impl<'de> DeserializeSeed<'de> for Entries<'de> {
        type Value = Vec<Entry>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for Entries<'de> {
        type Value = Vec<Entry>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = seq.next_element_seed(One(self.0))? {
                out.push(entry);
            }
            Ok(out)
        }
    }

    /// One entry.
    struct One<'a>(&'a str);

    impl<'de> DeserializeSeed<'de> for One<'de> {
        type Value = Entry;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for One<'de> {
        type Value = Entry;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        /// What the derived `LeadFields` reads, each known value where
        /// `super::parse_lead` reads it (a leaf as its raw text: `null`
        /// reads as no value there too), every other value as raw text
        /// for its end; a repeated known key is an error there, and here.
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
            let mut f = LeadFields {
                negotiation_id: None,
                status: None,
                create_time: None,
                created_at: None,
                category: None,
                customer: None,
                request: None,
                lead_price: None,
                charge_state: None,
            };
            let mut first_key = None;
            let mut last: Tail = None;
            while let Some(key) = map.next_key::<Key<'de>>()? {
                if first_key.is_none() {
                    match key.0 {
                        Cow::Borrowed(k) => first_key = Some(k.as_ptr() as usize),
                        Cow::Owned(_) => return Err(A::Error::custom("an escaped first key")),
                    }
                }
                macro_rules! once {
                    ($field:ident) => {{
                        if f.$field.is_some() {
                            return Err(A::Error::custom("a repeated key"));
                        }
                        let v = map.next_value()?;
                        last = Ends::end(&v);
                        f.$field = Some(v);
                    }};
                }
                match key.0.as_ref() {
                    "negotiationID" => once!(negotiation_id),
                    "status" => once!(status),
                    "createTime" => once!(create_time),
                    "createdAt" => once!(created_at),
                    "category" => once!(category),
                    "customer" => once!(customer),
                    "request" => once!(request),
                    "leadPrice" => once!(lead_price),
                    "chargeState" => once!(charge_state),
                    _ => last = map.next_value::<&'de RawValue>()?.end(),
                }
            }
            let Some(first_key) = first_key else {
                // `{}`: no id, no lead.
                return Ok(None);
            };
            let end = last.map(|(at, closing)| (at, closing + 1));
            let text = span(self.0, first_key, end)
                .ok_or_else(|| A::Error::custom("a lead not located"))?;
            let row = lead_row(&f, text);
            // An id no reader takes (`" "`, `1e3`) still names a lead
            // (`Page::unread_ids`), which only the other reader records.
            if row.is_none() && super::text(f.negotiation_id).is_some() {
                return Err(A::Error::custom("an unusable id"));
            }
            Ok(row)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entry, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Entry, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Entry, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Entry, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Entry, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Entry, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Entry, E> {
            Ok(None)
        }
    }
}

/// The page reader used when leads are checked (a re-sync, where most
/// leads are listed as they were): a hand-written scan that delimits each
/// entry of `data` by its brackets and strings alone and finds its first
/// top-level `negotiationID` on the way, so a lead found unchanged costs one
/// quick pass over its bytes and its hash; where the other reader runs
/// serde_json over the whole page, then over each lead up to its id.
///
/// It answers the page the other reader answers, or `None` (read it that
/// way) on anything it does not take exactly: every byte of the page is
/// either read by its grammar here (the envelope, its keys, whitespace and
/// commas), checked by serde_json (each other value, each entry not found
/// unchanged, before it is read), or an entry found unchanged: bytes whose
/// payload hash is that of a lead stored under the same id, and so,
/// barring a 64-bit hash collision (which the check already trusts), a
/// stored lead's bytes, JSON that was read before. An escaped envelope key,
/// a repeated `data` or `pagination`, an error: `None`. (Nesting needs no
/// care: serde_json skips a raw value, as the other reader reads each entry
/// and each other value, without a depth limit.)
mod checked {
    use super::{IdsDigest, Page, Unchanged, id_and_hash, page_markers, parse_lead, skip_entry};
    use serde_json::value::RawValue;

    fn skip_ws(b: &[u8], mut i: usize) -> usize {
        while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            i += 1;
        }
        i
    }

    /// The index of the quote that closes the string whose text starts at
    /// `i` (just after its opening quote).
    fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
        loop {
            i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
            if b[i] == b'"' {
                return Some(i);
            }
            // An escape: its next byte is never the closing quote.
            i += 2;
        }
    }

    /// The key of a lead's id.
    const ID_KEY: &[u8] = b"negotiationID";

    /// Where an object's first top-level `negotiationID` value starts, as
    /// the scan found it.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum IdAt {
        /// No such key (at least none unescaped before any escaped key).
        Absent,
        /// Its value starts here.
        At(usize),
        /// An escaped top-level key came first: serde_json decides.
        Escaped,
    }

    /// The end of the value starting at `start` (past its last byte) and,
    /// for an object, where its first top-level `negotiationID` is. Only
    /// delimits: what it delimits is checked by serde_json or by its hash,
    /// never trusted as is. An object or array is read 64 bytes at a time
    /// ([`Scan`]): one pass finds a block's quotes, backslashes and
    /// structural bytes, where a search per string cost a call for each
    /// (~10-byte) string.
    fn value_end(b: &[u8], start: usize) -> Option<(usize, IdAt)> {
        match *b.get(start)? {
            b'"' => return Some((string_end(b, start + 1)? + 1, IdAt::Absent)),
            b'{' | b'[' => {}
            _ => {
                let mut i = start;
                while !matches!(
                    b.get(i),
                    None | Some(b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t')
                ) {
                    i += 1;
                }
                return Some((i, IdAt::Absent));
            }
        }
        let object = b[start] == b'{';
        let mut scan = Scan {
            object,
            depth: 0,
            key_next: object,
            id: IdAt::Absent,
            key_open: None,
            in_string: false,
            escaped: false,
        };
        let mut i = start;
        let end = loop {
            let Some(block) = b.get(i..i + 64) else {
                // The body's last bytes, fewer than a block.
                break scan.bytes(b, i, b.len())?;
            };
            let m = masks(block.try_into().ok()?);
            let end = match scan.strings(m) {
                Some(strings) => scan.block(b, i, m, strings)?,
                None => scan.bytes(b, i, i + 64)?,
            };
            if end.is_some() {
                break end;
            }
            i += 64;
        };
        Some((end?, if object { scan.id } else { IdAt::Absent }))
    }

    /// Where the quotes, backslashes and structural bytes (`{}[],`) of a
    /// 64-byte block are: bit k for its byte k.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Masks {
        quote: u64,
        backslash: u64,
        structural: u64,
    }

    /// [`Masks`] with SSE2 (every x86_64 target with std has it): 16 bytes
    /// a compare.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    fn masks(block: &[u8; 64]) -> Masks {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        };
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            structural: 0,
        };
        for (k, chunk) in block.chunks_exact(16).enumerate() {
            // SAFETY: SSE2 is enabled (the cfg above); `chunk` is 16
            // bytes in bounds and `loadu` needs no alignment.
            let (quote, backslash, structural) = unsafe {
                let v = _mm_loadu_si128(chunk.as_ptr().cast());
                // `[` and `{` are 0x5b and 0x7b, `]` and `}` 0x5d and 0x7d:
                // one compare each with the 0x20 bit set (no other byte
                // folds to them).
                let folded = _mm_or_si128(v, _mm_set1_epi8(0x20));
                let structural = _mm_or_si128(
                    _mm_or_si128(
                        _mm_cmpeq_epi8(folded, _mm_set1_epi8(b'{' as i8)),
                        _mm_cmpeq_epi8(folded, _mm_set1_epi8(b'}' as i8)),
                    ),
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(b',' as i8)),
                );
                (
                    _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8))),
                    _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8))),
                    _mm_movemask_epi8(structural),
                )
            };
            let bits = |mask: i32| u64::from(mask as u16) << (16 * k);
            m.quote |= bits(quote);
            m.backslash |= bits(backslash);
            m.structural |= bits(structural);
        }
        m
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    use masks_bytewise as masks;

    /// [`Masks`] a byte at a time (other targets; the SSE2 one is tested
    /// against it).
    #[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "sse2"))))]
    fn masks_bytewise(block: &[u8; 64]) -> Masks {
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            structural: 0,
        };
        for (k, &c) in block.iter().enumerate() {
            m.quote |= u64::from(c == b'"') << k;
            m.backslash |= u64::from(c == b'\\') << k;
            m.structural |= u64::from(matches!(c, b'{' | b'}' | b'[' | b']' | b',')) << k;
        }
        m
    }

    /// Bit k set when an odd number of bits 0..=k of `x` are: with `x` a
    /// block's unescaped quotes, the bytes inside strings, each opening
    /// quote included and each closing one not.
    fn prefix_xor(mut x: u64) -> u64 {
        for shift in [1, 2, 4, 8, 16, 32] {
            x ^= x << shift;
        }
        x
    }

    /// [`value_end`]'s reading of an object or array, carried from one
    /// block to the next: the grammar of the byte-at-a-time scan it
    /// replaced (strings skipped to their unescaped closing quote, depth
    /// counted by brackets outside strings, a top-level key being the
    /// first string after `{` or after a `,` at depth 1).
    struct Scan {
        object: bool,
        depth: usize,
        /// At depth 1 of an object: the next string is a key.
        key_next: bool,
        id: IdAt,
        /// The opening quote of the top-level key being read (only while
        /// `id` is `Absent`).
        key_open: Option<usize>,
        in_string: bool,
        /// Inside a string, just after a backslash: this byte is escaped.
        escaped: bool,
    }

    impl Scan {
        #[inline]
        fn open_quote(&mut self, at: usize) {
            if self.depth == 1 && self.key_next {
                self.key_next = false;
                if let IdAt::Absent = self.id {
                    self.key_open = Some(at);
                }
            }
        }

        /// `None`: a top-level `negotiationID` not followed by a colon.
        /// Out of line: inlined, it made the loop over a block's bytes of
        /// interest slower (~3% of a re-sync's instructions).
        #[inline(never)]
        fn close_quote(&mut self, b: &[u8], close: usize) -> Option<()> {
            if let Some(open) = self.key_open.take() {
                let key = &b[open + 1..close];
                if key.contains(&b'\\') {
                    self.id = IdAt::Escaped;
                } else if key == ID_KEY {
                    let colon = skip_ws(b, close + 1);
                    if b.get(colon) != Some(&b':') {
                        return None;
                    }
                    self.id = IdAt::At(skip_ws(b, colon + 1));
                }
            }
            Some(())
        }

        /// A bracket or comma outside strings: `Some(true)` when it closes
        /// the value.
        #[inline]
        fn structural(&mut self, c: u8) -> Option<bool> {
            match c {
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.checked_sub(1)?;
                    return Some(self.depth == 0);
                }
                _ => self.key_next = self.object && self.depth == 1,
            }
            Some(false)
        }

        /// Bytes `from..to`, one at a time: `Some(Some(end))` when the value
        /// ends, `Some(None)` when it goes on past them.
        fn bytes(&mut self, b: &[u8], from: usize, to: usize) -> Option<Option<usize>> {
            for (i, &c) in b.get(from..to)?.iter().enumerate() {
                let i = from + i;
                if self.in_string {
                    if self.escaped {
                        self.escaped = false;
                    } else if c == b'\\' {
                        self.escaped = true;
                    } else if c == b'"' {
                        self.in_string = false;
                        self.close_quote(b, i)?;
                    }
                } else {
                    match c {
                        b'"' => {
                            self.in_string = true;
                            self.open_quote(i);
                        }
                        // The guard counts the byte (once, whatever it answers).
                        b'{' | b'[' | b'}' | b']' | b',' if self.structural(c)? => {
                            return Some(Some(i + 1));
                        }
                        _ => {}
                    }
                }
            }
            Some(None)
        }

        /// A block's strings, from its [`Masks`] and the scan's state:
        /// its unescaped quotes and the bytes inside strings (bit k for
        /// byte k), and whether its last byte is a backslash that escapes
        /// the next block's first. `None` when a backslash that escapes a
        /// byte is outside every string (not JSON: the block is read byte
        /// by byte, [`Scan::bytes`], which ignores such a backslash).
        fn strings(&self, m: Masks) -> Option<(u64, u64, bool)> {
            // Each backslash not itself escaped escapes the byte after it
            // (the first byte, after a block ending in one).
            let (mut escaped, mut escapes) = (u64::from(self.escaped), 0u64);
            let mut backslashes = m.backslash & !escaped;
            while backslashes != 0 {
                let k = backslashes.trailing_zeros();
                escapes |= 1 << k;
                if k < 63 {
                    escaped |= 1 << (k + 1);
                }
                backslashes &= !(3 << k);
            }
            let quotes = m.quote & !escaped;
            let inside = prefix_xor(quotes) ^ if self.in_string { !0 } else { 0 };
            (escapes & !inside == 0).then_some((quotes, inside, escapes >> 63 == 1))
        }

        /// The 64 bytes at `base`, with their [`Scan::strings`]. Only its
        /// brackets and commas outside strings are visited, and, while a
        /// key may be the id's, the quotes of the top-level keys: the
        /// first opening quote after a `{` or `,` at depth 1 (one opening
        /// quote being the next after a byte outside strings) and the
        /// closing quote after it. The other quotes, which the byte scan
        /// steps over without effect, are never visited.
        fn block(
            &mut self,
            b: &[u8],
            base: usize,
            m: Masks,
            (quotes, inside, escape_out): (u64, u64, bool),
        ) -> Option<Option<usize>> {
            let mut events = m.structural & !inside;
            if matches!(self.id, IdAt::Absent) {
                // Opening quotes are inside strings, closing ones not.
                let (opening, closing) = (quotes & inside, quotes & !inside);
                // The bits of the bytes visited so far.
                let mut done = 0u64;
                while matches!(self.id, IdAt::Absent) {
                    let wanted = if self.key_open.is_some() {
                        closing & !done
                    } else if self.depth == 1 && self.key_next {
                        opening & !done
                    } else {
                        0
                    };
                    let (q, s) = (wanted.trailing_zeros(), events.trailing_zeros());
                    if q < s {
                        let at = base + q as usize;
                        if let Some(open) = self.key_open {
                            // A key opened in this block, with no backslash
                            // and not as long as `negotiationID`, is not the
                            // id's: what `close_quote` would find, without
                            // its call and its search for a backslash.
                            let plain = open >= base && at - open - 1 != ID_KEY.len() && {
                                let after_open = !(u64::MAX >> (63 - (open - base)));
                                m.backslash & after_open & ((1u64 << q) - 1) == 0
                            };
                            if plain {
                                self.key_open = None;
                            } else {
                                self.close_quote(b, at)?;
                            }
                        } else {
                            self.open_quote(at);
                        }
                        done = u64::MAX >> (63 - q);
                        continue;
                    }
                    if s == 64 {
                        break;
                    }
                    events &= events - 1;
                    done = u64::MAX >> (63 - s);
                    if self.structural(b[base + s as usize])? {
                        return Some(Some(base + s as usize + 1));
                    }
                }
            }
            while events != 0 {
                let k = events.trailing_zeros();
                events &= events - 1;
                if self.structural(b[base + k as usize])? {
                    return Some(Some(base + k as usize + 1));
                }
            }
            self.in_string = inside >> 63 == 1;
            self.escaped = escape_out;
            Some(None)
        }
    }

    /// The text of the id whose value starts at `at`, read as
    /// [`super::id_text`] reads it.
    fn id_text(b: &[u8], at: usize) -> Option<std::borrow::Cow<'_, str>> {
        let end = match *b.get(at)? {
            b'"' => string_end(b, at + 1)? + 1,
            b'-' | b'0'..=b'9' => value_end(b, at)?.0,
            _ => return None,
        };
        super::id_of(utf8(b.get(at..end)?)?)
    }

    fn utf8(b: &[u8]) -> Option<&str> {
        std::str::from_utf8(b).ok()
    }

    /// One value checked by serde_json (UTF-8 first), as the other reader
    /// reads it.
    fn checked_value(b: &[u8]) -> Option<&RawValue> {
        serde_json::from_str(utf8(b)?).ok()
    }

    /// The entries of the array starting at `i` (`[`), into `page`; the
    /// index past its `]`.
    fn entries(
        b: &[u8],
        mut i: usize,
        unchanged: &Unchanged,
        page: &mut Page,
        ids: &mut IdsDigest,
    ) -> Option<usize> {
        i = skip_ws(b, i + 1);
        if b.get(i) == Some(&b']') {
            return Some(i + 1);
        }
        loop {
            let (end, id_at) = value_end(b, i)?;
            let entry = b.get(i..end)?;
            let found = if b[i] == b'{' {
                let hash = xxhash_rust::xxh3::xxh3_64(entry) as i64;
                let id = match id_at {
                    IdAt::Absent => None,
                    IdAt::At(at) => id_text(b, at).map(std::borrow::Cow::into_owned),
                    IdAt::Escaped => id_and_hash(utf8(entry)?).map(|(id, _)| id),
                };
                id.filter(|id| unchanged(id, hash))
            } else {
                None
            };
            match found {
                Some(id) => {
                    ids.add(&id);
                    page.unchanged.push(id);
                }
                None => {
                    let raw = checked_value(entry)?;
                    match parse_lead(raw) {
                        Some(lead) => {
                            ids.add(&lead.negotiation_id);
                            page.leads.push(lead);
                        }
                        None => {
                            skip_entry(page, raw.get());
                            ids.skip();
                        }
                    }
                }
            }
            i = skip_ws(b, end);
            match b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                b']' => return Some(i + 1),
                _ => return None,
            }
        }
    }

    /// The page, or `None` (read it the other way). UTF-8 is checked piece
    /// by piece: the envelope's keys, its other values and every lead not
    /// found unchanged (by serde_json), an id before it is asked about.
    /// A lead found unchanged is not: its bytes hash to a stored lead's
    /// payload, which was UTF-8 when it was stored (the check already
    /// relies on that hash), and none of it is kept.
    pub(super) fn read(b: &[u8], unchanged: &Unchanged) -> Option<Page> {
        let mut page = Page::default();
        let mut ids = IdsDigest::default();
        let mut i = skip_ws(b, 0);
        let (bare_array, pagination) = match b.get(i)? {
            b'[' => {
                i = entries(b, i, unchanged, &mut page, &mut ids)?;
                (true, None)
            }
            b'{' => {
                let mut data = false;
                let mut pagination: Option<Option<&RawValue>> = None;
                i = skip_ws(b, i + 1);
                loop {
                    if b.get(i) != Some(&b'"') {
                        return None;
                    }
                    let close = string_end(b, i + 1)?;
                    let key = &b[i + 1..close];
                    if key.iter().any(|&c| c == b'\\' || c < 0x20) || utf8(key).is_none() {
                        return None;
                    }
                    i = skip_ws(b, close + 1);
                    if b.get(i) != Some(&b':') {
                        return None;
                    }
                    i = skip_ws(b, i + 1);
                    if key == b"data" {
                        if data || b.get(i) != Some(&b'[') {
                            return None;
                        }
                        data = true;
                        i = entries(b, i, unchanged, &mut page, &mut ids)?;
                    } else {
                        let (end, _) = value_end(b, i)?;
                        let value = checked_value(b.get(i..end)?)?;
                        if key == b"pagination" {
                            if pagination.is_some() {
                                return None;
                            }
                            pagination = Some((value.get() != "null").then_some(value));
                        }
                        i = end;
                    }
                    i = skip_ws(b, i);
                    match b.get(i)? {
                        b',' => i = skip_ws(b, i + 1),
                        b'}' => break,
                        _ => return None,
                    }
                }
                i += 1;
                if !data {
                    return None;
                }
                (false, pagination.flatten())
            }
            _ => return None,
        };
        if skip_ws(b, i) != b.len() {
            return None;
        }
        page.markers = page_markers(bare_array, pagination);
        ids.finish(&mut page);
        Some(page)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        // The byte-at-a-time scan the block scan replaced, kept as the
        // reference it must agree with on every input.
        fn string_end_before(b: &[u8], mut i: usize) -> Option<usize> {
            loop {
                i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
                if b[i] == b'"' {
                    return Some(i);
                }
                i += 2;
            }
        }

        fn value_end_before(b: &[u8], start: usize) -> Option<(usize, IdAt)> {
            match *b.get(start)? {
                b'"' => return Some((string_end_before(b, start + 1)? + 1, IdAt::Absent)),
                b'{' | b'[' => {}
                _ => {
                    let mut i = start;
                    while !matches!(
                        b.get(i),
                        None | Some(b',' | b']' | b'}' | b' ' | b'\n' | b'\r' | b'\t')
                    ) {
                        i += 1;
                    }
                    return Some((i, IdAt::Absent));
                }
            }
            let object = b[start] == b'{';
            let mut depth = 0usize;
            let mut key_next = object;
            let mut id = IdAt::Absent;
            let mut i = start;
            loop {
                match *b.get(i)? {
                    b'"' => {
                        let close = string_end_before(b, i + 1)?;
                        if depth == 1 && key_next {
                            key_next = false;
                            if let IdAt::Absent = id {
                                let key = &b[i + 1..close];
                                if memchr::memchr(b'\\', key).is_some() {
                                    id = IdAt::Escaped;
                                } else if key == b"negotiationID" {
                                    let colon = skip_ws(b, close + 1);
                                    if b.get(colon) != Some(&b':') {
                                        return None;
                                    }
                                    id = IdAt::At(skip_ws(b, colon + 1));
                                }
                            }
                        }
                        i = close + 1;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        i += 1;
                    }
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        i += 1;
                        if depth == 0 {
                            return Some((i, if object { id } else { IdAt::Absent }));
                        }
                    }
                    b',' => {
                        key_next = object && depth == 1;
                        i += 1;
                    }
                    _ => i += 1,
                }
            }
        }

        /// Both scans of `b` from `start` agree, and so do those of every
        /// prefix of `b` (truncated input).
        fn agree(b: &[u8], start: usize) {
            for len in start..=b.len() {
                let cut = &b[..len];
                assert_eq!(
                    value_end(cut, start),
                    value_end_before(cut, start),
                    "{:?} from {start}",
                    String::from_utf8_lossy(cut)
                );
            }
        }

        /// `text` alone, after other bytes, and followed by more than a
        /// block of bytes (so that it ends inside a block).
        fn agree_placed(text: &str) {
            let pad = "p".repeat(70);
            for (b, start) in [
                (text.to_string(), 0),
                (format!("[{text}"), 1),
                (format!("{}{text}", " ".repeat(17)), 17),
                (
                    format!(r#"{text},{{"negotiationID":"9","pad":"{pad}"}}]"#),
                    0,
                ),
            ] {
                agree(b.as_bytes(), start);
            }
        }

        const NAMED: &[&str] = &[
            r#"{"negotiationID":"1"}"#,
            r#"{"a":"x\"y","negotiationID":"1"}"#,
            r#"{"a":"x\\","negotiationID":"1"}"#,
            r#"{"a":"x\\\"}","negotiationID":"1"}"#,
            r#"{"a":"\u0022{[","negotiationID":"\u0031"}"#,
            r#"{"\u006eegotiationID":"0","negotiationID":"2"}"#,
            r#"{"negotiation\u0049D":"0"}"#,
            r#"{"a":{"negotiationID":"x","b":[1,{"c":"]}"}]},"negotiationID":-12.5e3}"#,
            r#"{"s":"{}[],:\"","negotiationID":"3","t":"}}}]]]"}"#,
            r#"{"negotiationID" "1"}"#,
            r#"{"negotiationID"   :   "1" , "negotiationID":"2"}"#,
            r#"[{"negotiationID":"1"},["negotiationID","x"],"]"]"#,
            r#"{"a":[],"b":{},"c":[[[{}]]],"negotiationID":null}"#,
            r#"{"é":"ü€😀","negotiationID":"é"}"#,
            r#"{"a":1 \"negotiationID":"1"}"#,
            r#"{"a":1 \\ "negotiationID":"1"}"#,
            r#"{"a":"x"}}"#,
            r#"{"a":"x\"#,
            "{\"a\"\t:\r\n[1 ,2]\n,\"negotiationID\":7}",
        ];

        #[test]
        fn the_block_scan_reads_named_values_as_the_byte_scan() {
            for text in NAMED {
                agree_placed(text);
            }
        }

        /// A string of every length from 0 to 140 bytes before the id, an
        /// escape at every offset (and so across every 16-, 32- and
        /// 64-byte boundary: 15/16/17, 31/32/33, 63/64/65 bytes in).
        #[test]
        fn the_block_scan_agrees_across_block_boundaries() {
            for n in 0..140 {
                let x = "x".repeat(n);
                agree_placed(&format!(r#"{{"k":"{x}","negotiationID":"7"}}"#));
                agree_placed(&format!(r#"{{"k":"{x}\"","negotiationID":"7"}}"#));
                agree_placed(&format!(r#"{{"k":"{x}\\","negotiationID":"7"}}"#));
                agree_placed(&format!(
                    r#"{{"k":"{x}\u005c","n":[{x:?}],"negotiationID":"7"}}"#
                ));
                agree_placed(&format!(r#"{{"k{x}":{{"a":"{x}"}},"negotiationID":"7"}}"#));
                agree_placed(&format!(r#"[{x:?},"{x}\\\"",{{"negotiationID":1}}]"#));
                agree_placed(&format!(r#"{{"k":[{x:?} \ "x"],"negotiationID":"7"}}"#));
            }
        }

        #[test]
        fn the_block_scan_agrees_on_random_bytes() {
            const PIECES: &[&str] = &[
                "\"",
                "\\",
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                " ",
                "a",
                "negotiationID",
                "\"negotiationID\":",
                "\\u0022",
                "é",
                "0",
                "\n",
                "xxxxxxxxxxxxxxx",
            ];
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = |n: usize| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % n as u64) as usize
            };
            for _ in 0..3000 {
                let mut text = String::from(["{", "["][next(2)]);
                for _ in 0..next(60) {
                    text.push_str(PIECES[next(PIECES.len())]);
                }
                agree(text.as_bytes(), 0);
            }
        }

        /// Long random objects and arrays (several blocks), of pieces that
        /// make keys, values, nested objects with keys named the same,
        /// escaped quotes and backslashes, so that the id (or an escaped
        /// key, or none) falls anywhere in a lead, in any block, after any
        /// number of top-level keys: both scans agree on the whole text
        /// and on prefixes cut at random.
        #[test]
        fn the_block_scan_agrees_on_long_random_leads() {
            const PIECES: &[&str] = &[
                "\"a\":1,",
                "\"k\":\"v\",",
                "\"negotiationID\":\"7\",",
                "\"negotiationID\" ,",
                "\"negotiationIE\":1,",
                "\"negotiation\\u0049D\":\"x\",",
                "\"negotiationID\":{\"negotiationID\":\"8\"},",
                "{\"negotiationID\":\"9\",",
                "\"s\":\"x\\\"y\\\\\",",
                "\"\\u0061\":0,",
                "\"t\":\"\\\"negotiationID\\\":\",",
                "\"n\":[1,{\"b\":[\"]\"]}],",
                "{",
                "}",
                "[",
                "]",
                ",",
                "\"",
                "\\",
                ":",
                " ",
                "\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\",",
                "\"k\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\",",
                "\"o\":{\"p\":{\"q\":[\"r\",\"s\"]},\"u\":\"v\"},",
            ];
            let mut state = 0x853c_49e6_748f_ea9bu64;
            let mut next = |n: usize| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % n as u64) as usize
            };
            for round in 0..2000 {
                let mut text = String::from(["{", "["][usize::from(round % 4 == 3)]);
                // Mostly well-formed keys and values, then any piece.
                let wild = next(3) == 0;
                for _ in 0..next(120) {
                    let piece = if wild { next(PIECES.len()) } else { next(10) };
                    let piece = if !wild && next(4) == 0 {
                        19 + next(3)
                    } else {
                        piece
                    };
                    text.push_str(PIECES[piece]);
                }
                text.push_str(["\"z\":0}", "}", "]", ""][next(4)]);
                let b = text.as_bytes();
                assert_eq!(value_end(b, 0), value_end_before(b, 0), "{text:?}");
                for _ in 0..4 {
                    let cut = &b[..next(b.len() + 1)];
                    assert_eq!(value_end(cut, 0), value_end_before(cut, 0), "{text:?}");
                }
            }
        }

        #[test]
        fn sse2_masks_are_the_bytewise_masks() {
            let mut state = 0x2545_f491_4f6c_dd1du64;
            for round in 0..2000 {
                let mut block = [0u8; 64];
                for c in &mut block {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Every byte value in the first rounds, then mostly
                    // the ones that matter and their neighbours.
                    *c = if round < 1000 {
                        state as u8
                    } else {
                        b"\"\\{}[],:;{|}[\\]\x7b\x5bz"[(state % 17) as usize]
                    };
                }
                assert_eq!(masks(&block), masks_bytewise(&block), "{block:?}");
            }
        }

        #[test]
        fn prefix_xor_marks_the_bytes_inside_strings() {
            assert_eq!(prefix_xor(0b1001_0110), 0b0111_0010);
            assert_eq!(prefix_xor(1 << 63), 1 << 63);
            assert_eq!(prefix_xor(1), !0);
        }
    }
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

/// A successful token response; its tokens print masked.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    pub access_token: crate::secret::Secret,
    /// Seconds, as a number or a numeric string.
    #[serde(default, deserialize_with = "lenient_seconds")]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<crate::secret::Secret>,
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

/// A message (`MessageV4`) from a conversation listing or a webhook, ready
/// for the mirror. Only `messageID` is required; every other field is read
/// when present and of the expected type.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub message_id: String,
    pub negotiation_id: Option<String>,
    /// `sentAt` in the mirror's form (UTC, milliseconds at least, as
    /// [`crate::time::sortable_utc`]) when it parses, else as sent: the same
    /// form a webhook delivery of the message is stored in.
    pub sent_at: Option<String>,
    /// `from`: `Customer` or `Business`.
    pub sender: Option<String>,
    pub text: Option<String>,
    /// `sentAt` exactly as sent (paging back reads its instant from it).
    pub sent_at_raw: Option<String>,
    /// The JSON object exactly as received.
    pub payload: String,
}

/// One page of `GET /negotiations/{id}/messages`, newest first.
#[derive(Debug, Clone, Default)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    /// Entries [`parse_message`] does not read: not objects with a
    /// `messageID`, or whose ids are no ids (counted, not stored).
    pub skipped: i64,
    /// `pagination.limit` as the server answered it (it may lower the one asked for).
    pub limit: Option<u32>,
}

#[derive(Deserialize, Default)]
struct LimitOnly {
    #[serde(default)]
    limit: Option<serde_json::Value>,
}

/// Reads one message; `None` when it is not an object with a `messageID`
/// that is an id ([`id_text`]: a non-blank string, or a number of plain
/// digits kept as sent), or when it names its `negotiationID` by anything
/// but such an id (`null` reads as absent: the lead polled). A webhook
/// delivering the same bytes reads its ids by the same rule, so a message
/// is stored by both paths or by neither.
pub fn parse_message(raw: &RawValue) -> Option<Message> {
    let payload = raw.get();
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let [message_id, negotiation_id, sent_at, from, text_field] = members(
        payload,
        ["messageID", "negotiationID", "sentAt", "from", "text"],
    )
    .ok()?;
    let message_id = id_text(message_id)?;
    let negotiation_id = match negotiation_id.filter(|n| n.get().trim() != "null") {
        Some(n) => Some(id_text(Some(n))?),
        None => None,
    };
    let sent_at_raw = text(sent_at);
    Some(Message {
        message_id,
        negotiation_id,
        sent_at: sent_at_raw
            .as_deref()
            .map(|t| crate::time::sortable_utc(t).unwrap_or_else(|| t.to_string())),
        sender: from.and_then(|r| string_lossy(r.get())),
        text: text_field.and_then(|r| string_lossy(r.get())),
        sent_at_raw,
        payload: payload.to_string(),
    })
}

/// A JSON string's text exactly, an empty one included (a message with
/// attachments only has the text `""`, not none); `None` for any other
/// value. An escape that is no Unicode character (a lone surrogate, as a
/// client that cut an emoji in two writes it) becomes U+FFFD instead of
/// costing the whole text; the payload keeps it as sent. A message's
/// `from` and `text` are read by this alone, whether a webhook or a poll
/// brings them, so that both store the same row.
pub fn string_lossy(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(inner.to_string());
    }
    if let Ok(s) = serde_json::from_str::<String>(raw) {
        return Some(s);
    }
    let mut out = String::with_capacity(inner.len());
    // UTF-16 units of consecutive `\u` escapes, decoded together so that
    // a pair is one character and a lone half is U+FFFD.
    let mut units: Vec<u16> = Vec::new();
    let flush = |units: &mut Vec<u16>, out: &mut String| {
        out.extend(
            char::decode_utf16(units.drain(..)).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)),
        );
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            flush(&mut units, &mut out);
            out.push(c);
            continue;
        }
        let unescaped = match chars.next()? {
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                if hex.len() != 4 {
                    return None;
                }
                units.push(u16::from_str_radix(&hex, 16).ok()?);
                continue;
            }
            '"' => '"',
            '\\' => '\\',
            '/' => '/',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            _ => return None,
        };
        flush(&mut units, &mut out);
        out.push(unescaped);
    }
    flush(&mut units, &mut out);
    Some(out)
}

/// Parses a conversation page: `{"data": [...], "pagination": {"limit": N}}`
/// (a bare array is read the same way).
pub fn parse_message_page(body: &[u8]) -> Result<MessagePage, String> {
    let body = std::str::from_utf8(body).map_err(|_| "the page is not UTF-8".to_string())?;
    let mut page = MessagePage::default();
    let entries: Vec<&RawValue> = if body.trim_start().starts_with('[') {
        serde_json::from_str(body).map_err(|e| format!("the page is not valid JSON: {e}"))?
    } else {
        let env: Envelope = serde_json::from_str(body)
            .map_err(|e| format!("the page is not a JSON object with a data array: {e}"))?;
        page.limit = env
            .pagination
            .and_then(|p| serde_json::from_str::<LimitOnly>(p.get()).ok())
            .and_then(|p| p.limit)
            .and_then(|l| l.as_u64())
            .and_then(|l| u32::try_from(l).ok())
            .filter(|l| *l > 0);
        env.data
            .ok_or_else(|| "the page has no `data` array".to_string())?
    };
    for raw in entries {
        match parse_message(raw) {
            Some(m) => page.messages.push(m),
            None => page.skipped += 1,
        }
    }
    Ok(page)
}

/// The body of `POST /negotiations/{id}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MessageBody {
    pub text: String,
}

/// The id of a sent message, from the response to its `POST`. The response
/// is not documented: `messageID` at the top or under `data` is read, and
/// anything else (an empty body included) means "no id".
///
/// Read as [`parse_message`] reads a message's id ([`id_text`]: a
/// non-blank string, or a number of plain digits exactly as sent, never
/// through a float), a repeated key's last value counting.
pub fn sent_message_id(body: &[u8]) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    let [id, data] = members(body, ["messageID", "data"]).ok()?;
    id_text(id).or_else(|| {
        let [id] = members(data?.get(), ["messageID"]).ok()?;
        id_text(id)
    })
}

/// The lead parser before issue 16: each nested object parsed on its own
/// from its raw text. Kept as the fallback of the one-pass parser, which
/// fails where this one does not on a number out of range (`1e400`) as the
/// value of a nested object's place, since that value is parsed there, not
/// skipped; such a lead is still stored with the columns it had.
mod separate {
    use super::{lead_time, object};
    use crate::lead::LeadRow;
    use serde::Deserialize;
    use serde_json::value::RawValue;

    #[derive(Deserialize, Default)]
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
        #[serde(borrow, default)]
        request: Option<&'a RawValue>,
        #[serde(rename = "leadPrice", borrow, default)]
        lead_price: Option<&'a RawValue>,
        #[serde(rename = "chargeState", borrow, default)]
        charge_state: Option<&'a RawValue>,
    }

    #[derive(Deserialize)]
    struct Named<'a> {
        #[serde(borrow, default)]
        name: Option<&'a RawValue>,
    }

    #[derive(Deserialize)]
    struct Request<'a> {
        #[serde(borrow, default)]
        category: Option<&'a RawValue>,
        #[serde(borrow, default)]
        location: Option<&'a RawValue>,
    }

    #[derive(Deserialize)]
    struct Customer<'a> {
        #[serde(rename = "displayName", borrow, default)]
        display_name: Option<&'a RawValue>,
        #[serde(rename = "firstName", borrow, default)]
        first_name: Option<&'a RawValue>,
        #[serde(rename = "lastName", borrow, default)]
        last_name: Option<&'a RawValue>,
        #[serde(borrow, default)]
        phone: Option<&'a RawValue>,
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

    /// A JSON string, or a number as the text it was sent as; anything else
    /// (and an empty string) is `None` (the parent's `text` without its
    /// shortcut for strings without escapes: the tests compare the two).
    fn text(raw: Option<&RawValue>) -> Option<String> {
        let raw = raw?.get().trim();
        match raw.as_bytes().first()? {
            b'"' => serde_json::from_str::<String>(raw)
                .ok()
                .filter(|s| !s.is_empty()),
            b'-' | b'0'..=b'9' => Some(raw.to_string()),
            _ => None,
        }
    }

    /// What [`super::parse_lead`] reads, each nested object on its own.
    pub(super) fn parse_lead(raw: &RawValue) -> Option<LeadRow> {
        let payload = raw.get();
        if !payload.trim_start().starts_with('{') {
            return None;
        }
        let f: LeadFields = serde_json::from_str(payload).ok()?;
        row(f, payload)
    }

    /// [`parse_lead`] of a lead that repeats a top-level key: the last
    /// value of each key counts (JavaScript's rule; serde_json's `Value`
    /// keeps the last too), the nested objects read as `parse_lead` reads
    /// them. `None` when the text is not an object or has no id.
    pub(super) fn parse_lead_last_wins(raw: &RawValue) -> Option<LeadRow> {
        let payload = raw.get();
        if !payload.trim_start().starts_with('{') {
            return None;
        }
        let [
            negotiation_id,
            status,
            create_time,
            created_at,
            category,
            customer,
            request,
            lead_price,
            charge_state,
        ] = super::members(
            payload,
            [
                "negotiationID",
                "status",
                "createTime",
                "createdAt",
                "category",
                "customer",
                "request",
                "leadPrice",
                "chargeState",
            ],
        )
        .ok()?
        // `null` reads as absent, as the derived field reads it.
        .map(|v| v.filter(|v| v.get().trim() != "null"));
        let f = LeadFields {
            negotiation_id,
            status,
            create_time,
            created_at,
            category,
            customer,
            request,
            lead_price,
            charge_state,
        };
        row(f, payload)
    }

    /// The row of a lead's fields, `payload` being its exact text.
    fn row(f: LeadFields, payload: &str) -> Option<LeadRow> {
        let negotiation_id = super::id_text(f.negotiation_id)?;
        let created_at = text(f.create_time)
            .or_else(|| text(f.created_at))
            .map(|t| lead_time(&t));
        let request: Option<Request> = object(f.request);
        let customer: Option<Customer> = object(f.customer);
        let request_location: Option<Location> = request.as_ref().and_then(|r| object(r.location));
        let customer_location: Option<Location> =
            customer.as_ref().and_then(|c| object(c.location));
        let name_of = |raw: Option<&RawValue>| object::<Named>(raw).and_then(|n| text(n.name));
        let category = request
            .as_ref()
            .and_then(|r| name_of(r.category))
            .or_else(|| name_of(f.category));
        let customer_name = customer.as_ref().and_then(|c| {
            text(c.display_name).or_else(|| {
                let parts: Vec<String> = [text(c.first_name), text(c.last_name)]
                    .into_iter()
                    .flatten()
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect();
                (!parts.is_empty()).then(|| parts.join(" "))
            })
        });
        let located = |pick: for<'l> fn(&Location<'l>) -> Option<&'l RawValue>| {
            request_location
                .as_ref()
                .and_then(|l| text(pick(l)))
                .or_else(|| customer_location.as_ref().and_then(|l| text(pick(l))))
        };
        Some(LeadRow {
            hash: xxhash_rust::xxh3::xxh3_64(payload.as_bytes()) as i64,
            status: text(f.status),
            created_at,
            category,
            customer_name,
            city: located(|l| l.city),
            zip: located(|l| l.zip_code),
            customer_phone: customer.as_ref().and_then(|c| text(c.phone)),
            lead_price: text(f.lead_price),
            charge_state: text(f.charge_state),
            negotiation_id,
            payload: payload.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What both parsers make of one body (`separate` is the parser of `main`
    /// before issue 16, unchanged).
    fn same_as_before(body: &str) {
        let Ok(raw) = serde_json::from_str::<&RawValue>(body) else {
            return;
        };
        let before = separate::parse_lead(raw).or_else(|| separate::parse_lead_last_wins(raw));
        assert_eq!(parse_lead(raw), before, "{body}");
    }

    const HOSTILE: &[&str] = &[
        r#"{"negotiationID":"1","request":1e400}"#,
        r#"{"negotiationID":"1","customer":-1e400,"status":"a"}"#,
        r#"{"negotiationID":"1","category":1e999}"#,
        r#"{"negotiationID":"1","request":{"location":1e400}}"#,
        r#"{"negotiationID":"1","request":{"category":1e400,"location":{"city":"X"}}}"#,
        r#"{"negotiationID":"1","customer":{"location":1e400,"displayName":"D"}}"#,
        r#"{"negotiationID":"1","request":{"location":[1e400]}}"#,
        r#"{"negotiationID":"1","request":{"x":1e400,"location":{"zipCode":1e400}}}"#,
        r#"{"negotiationID":"1","request":123456789012345678901234567890}"#,
        r#"{"negotiationID":"1","leadPrice":1e400,"status":1e400}"#,
        r#"{"negotiationID":"\u0000","status":"\u0000"}"#,
        r#"{"negotiationID":"\ud83d\ude00","status":"\u00e9\"\\"}"#,
        r#"{"negotiationID":"é€😀","status":"ÿ","customer":{"displayName":"Zoë 😀"}}"#,
        r#"{"negotiationID":"1","customer":{"displayName":"","firstName":" Zoë ","lastName":"\u00e9"}}"#,
        r#"{"negotiationID":"1","leadPrice":{"amount":25},"chargeState":null}"#,
        r#"{"negotiationID":1,"leadPrice":"$25.00"}"#,
        r#"{"negotiationID":-0.5e3,"leadPrice":2500}"#,
        r#"{"negotiationID":"1","request":null,"customer":null,"category":null}"#,
        r#"{"negotiationID":"1","request":{"category":null,"location":null}}"#,
        r#"{"negotiationID":"1","request":{"category":{"name":null}},"category":{"name":"F"}}"#,
        r#"{"negotiationID":"1","request":{"category":{"name":null,"name":"x"}},"category":{"name":"F"}}"#,
        r#"{"negotiationID":"1","request":{"location":null,"location":{"city":"c"}}}"#,
        r#"{"negotiationID":"1","request":{"location":{"city":"c"}},"request":{}}"#,
        r#"{"negotiationID":"1","category":{"name":"a"},"category":{"name":"b"}}"#,
        r#"{"negotiationID":"1","customer":{"phone":"1","phone":"2"},"status":"s"}"#,
        r#"{"negotiationID":"1","customer":{"location":{"city":"a","city":"b"},"phone":"5"}}"#,
        r#"{"negotiationID":"1","customer":{"na\u006de":{"x":1},"ph\u006fne":"7"}}"#,
        r#"{"negotiationID":"1","customer":{"phone":"7","ph\u006fne":"8"}}"#,
        r#"{"negotiationID":"1","request":{"location":{"city":"X"}},"customer":{"location":{"city":"Y","zipCode":"9"}}}"#,
        r#"{"negotiationID":"1","request":"string","customer":true,"category":[1,2]}"#,
        r#"{"negotiationID":"1","request":{"category":"plumbing"},"category":{"name":7}}"#,
        r#" {"negotiationID" : "1" , "request" : { "location" : { "city" : " X " } } } "#,
        r#"{"negotiationID":"1","request":{"location":{"city":"a\/b","zipCode":"0\t1"}}}"#,
        r#"{"negotiationID":"1","createTime":"2024-06-13T19:18:01+02:00","createdAt":"x"}"#,
        r#"{"negotiationID":"1","createdAt":"2024-06-13T19:18:01.123456789Z"}"#,
        r#"{"negotiationID":""}"#,
        r#"{"status":"no id"}"#,
        r#"[{"negotiationID":"1"}]"#,
        r#""text""#,
        // A name from its parts, borrowed or decoded, trimmed, joined.
        r#"{"negotiationID":"1","customer":{"firstName":"Ann"}}"#,
        r#"{"negotiationID":"1","customer":{"lastName":" B. "}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":"  ","lastName":" "}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":" Ann	","lastName":"
"}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":"A"nn","lastName":"B\"}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":12,"lastName":-3.5}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":"","lastName":"Ø."}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":"a b","lastName":"c  d"}}"#,
        r#"{"negotiationID":"1","customer":{"displayName":null,"firstName":"Ann","lastName":"B"}}"#,
        r#"{"negotiationID":"1","customer":{"firstName":{"x":1},"lastName":"B"}}"#,
        // Times from an escaped or numeric text.
        r#"{"negotiationID":"1","createdAt":"2024-06-13T19:18:01+02:00"}"#,
        r#"{"negotiationID":"1","createTime":"","createdAt":"2024-06-13T19:18:01Z"}"#,
        r#"{"negotiationID":"1","createTime":20240613,"createdAt":"2024-06-13T19:18:01Z"}"#,
        r#"{"negotiationID":"1","createdAt":" 2024-06-13T19:18:01Z"}"#,
    ];

    #[test]
    fn the_one_pass_parser_reads_what_the_old_parser_read() {
        for body in HOSTILE {
            same_as_before(body);
        }
        // Deep nesting inside and around each nested object.
        for depth in [1, 60, 100, 120, 125, 126, 127, 128, 130, 200] {
            let deep = |inner: &str| format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth));
            for place in [
                r#"{"negotiationID":"1","request":{"location":{"city":"c","x":@}}}"#,
                r#"{"negotiationID":"1","request":{"location":@}}"#,
                r#"{"negotiationID":"1","customer":{"location":{"zipCode":@}}}"#,
                r#"{"negotiationID":"1","request":@}"#,
                r#"{"negotiationID":"1","x":@}"#,
            ] {
                same_as_before(&place.replace('@', &deep("1")));
                same_as_before(&place.replace('@', &deep(r#"{"city":"c"}"#)));
            }
        }
    }

    /// Random leads from a small vocabulary of keys and values, nested at
    /// every known place, repeated and of every type.
    #[test]
    fn random_leads_read_the_same_as_before() {
        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15u64);
        let mut next = move |n: usize| rng.usize(0..n);
        const KEYS: &[&str] = &[
            "negotiationID",
            "status",
            "createTime",
            "createdAt",
            "category",
            "customer",
            "request",
            "leadPrice",
            "chargeState",
            "name",
            "location",
            "city",
            "zipCode",
            "displayName",
            "firstName",
            "lastName",
            "phone",
            "na\\u006de",
            "x",
        ];
        const LEAVES: &[&str] = &[
            "null",
            "true",
            "0",
            "-1.5e3",
            "1e400",
            "12345678901234567890123",
            "\"\"",
            "\" \"",
            "\"a\"",
            "\"Zoë 😀\"",
            "\"\\u00e9\\\"\\\\\"",
            "\"\\ud83d\\ude00\"",
            "\"\\u0000\"",
            "\"2024-06-13T19:18:01+02:00\"",
            "[]",
            "{}",
            "[1,{\"city\":\"q\"}]",
        ];
        fn value(next: &mut dyn FnMut(usize) -> usize, depth: u32) -> String {
            if depth > 4 || next(3) == 0 {
                return LEAVES[next(LEAVES.len())].to_string();
            }
            let n = next(5);
            let fields: Vec<String> = (0..n)
                .map(|_| format!("\"{}\":{}", KEYS[next(KEYS.len())], value(next, depth + 1)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        for i in 0..20_000 {
            let rest = value(&mut next, 0);
            let body = if rest == "{}" || !rest.starts_with('{') {
                format!("{{\"negotiationID\":\"{i}\"}}")
            } else {
                format!("{{\"negotiationID\":\"{i}\",{}", &rest[1..])
            };
            same_as_before(&body);
        }
    }

    /// Every page of the sandbox's generated data (both shapes, the data
    /// `examples/parse_pages.rs` times) reads as the parser before issue 16
    /// read each of its entries, with the same count and ids digest.
    #[test]
    fn generated_pages_read_as_the_old_parser_read_each_lead() {
        use crate::sandbox::data::{Shape, generate};
        for shape in [Shape::Schema, Shape::Docs, Shape::Mixed] {
            let (data, _) = generate(11, 3, 250, shape);
            for b in &data {
                for chunk in b.leads.chunks(100) {
                    let items: Vec<&str> = chunk.iter().map(|l| l.json.as_str()).collect();
                    let body = format!(
                        r#"{{"data":[{},7,{{"x":1}}],"pagination":{{"limit":100}}}}"#,
                        items.join(",")
                    );
                    let page = parse_page(body.as_bytes()).unwrap();
                    let old: Vec<LeadRow> = chunk
                        .iter()
                        .map(|l| {
                            let raw: &RawValue = serde_json::from_str(&l.json).unwrap();
                            separate::parse_lead(raw).unwrap()
                        })
                        .collect();
                    assert_eq!(page.leads, old, "{shape:?}");
                    assert_eq!(page.skipped, 2);
                    let mut ids = xxhash_rust::xxh3::Xxh3::new();
                    for l in &old {
                        ids.update(l.negotiation_id.as_bytes());
                        ids.update(b"\0");
                    }
                    assert_eq!(page.ids_digest, Some(ids.digest()));
                    assert!(
                        page.leads
                            .iter()
                            .all(|l| l.customer_name.is_some() && l.created_at.is_some())
                    );
                }
            }
        }
    }

    /// What a page reader answers of a page, all of it compared.
    #[allow(clippy::type_complexity)]
    fn key(
        p: &Page,
    ) -> (
        Vec<LeadRow>,
        Vec<String>,
        i64,
        Vec<String>,
        Markers,
        Option<u64>,
        (Option<String>, Option<String>, u64),
    ) {
        (
            p.leads.clone(),
            p.unchanged.clone(),
            p.skipped,
            p.unread_ids.clone(),
            p.markers.clone(),
            p.ids_digest,
            (p.first_id.clone(), p.last_id.clone(), p.last_id_back),
        )
    }

    /// Two readings of `body`: the same page, or the same error.
    fn assert_same_read(body: &str, old: &Result<Page, String>, now: &Result<Page, String>) {
        match (old, now) {
            (Ok(old), Ok(now)) => assert_eq!(key(old), key(now), "{body}"),
            (Err(old), Err(now)) => assert_eq!(old, now, "{body}"),
            _ => panic!("{body}: {:?} / {:?}", old.is_ok(), now.is_ok()),
        }
    }

    /// The leads of `body` (as `parse_page` reads them) that a check finds
    /// unchanged: about two in three, by their hash.
    fn stored_of(body: &str) -> std::collections::HashSet<(String, i64)> {
        parse_page(body.as_bytes())
            .map(|p| {
                p.leads
                    .iter()
                    .filter(|l| l.hash % 3 != 0)
                    .map(|l| (l.negotiation_id.clone(), l.hash))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// With a check that finds the `stored` leads unchanged: the checked
    /// reader's page, when it reads one, is the scanning reader's, and it
    /// asked about the same leads in the same order; `parse_page_with`'s
    /// always is. Whether the checked reader read it.
    fn same_checked_page(body: &str, stored: &std::collections::HashSet<(String, i64)>) -> bool {
        use std::sync::Mutex;
        let (asked_old, asked_now) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
        let check = |asked: &Mutex<Vec<String>>, id: &str, hash: i64| {
            asked.lock().unwrap().push(id.to_string());
            stored.contains(&(id.to_string(), hash))
        };
        let old = parse_page_scanning_each(body, Some(&|id: &str, h| check(&asked_old, id, h)));
        let now = parse_page_with(
            body.as_bytes(),
            Some(&|id: &str, h| check(&asked_now, id, h)),
        );
        let asked_checked = Mutex::new(Vec::new());
        let checked = checked::read(body.as_bytes(), &|id: &str, h| check(&asked_checked, id, h));
        assert_same_read(body, &old, &now);
        if let Some(checked) = &checked {
            assert_eq!(Some(key(checked)), old.as_ref().ok().map(key), "{body}");
            assert_eq!(
                *asked_checked.lock().unwrap(),
                *asked_old.lock().unwrap(),
                "{body}"
            );
        }
        checked.is_some()
    }

    /// The one-scan reader's page, when it reads one, is the page of the
    /// reader that scans each lead twice; `parse_page` always is; and so
    /// for the checked reader, with the page's own leads found unchanged
    /// ([`same_checked_page`]). Whether the one-scan reader read it, and
    /// whether the checked one did.
    fn same_page_as_scanning_each(body: &str) -> (bool, bool) {
        let old = parse_page_scanning_each(body, None);
        let now = parse_page(body.as_bytes());
        let fast = fast::read(body).map(page_of);
        assert_same_read(body, &old, &now);
        if let Some(fast) = &fast {
            assert_eq!(Some(key(fast)), old.as_ref().ok().map(key), "{body}");
        }
        let checked = same_checked_page(body, &stored_of(body));
        (fast.is_some(), checked)
    }

    /// Pages around one entry: in an envelope or a bare array, with other
    /// entries, whitespace and the pagination before or after `data`.
    fn pages_around(entry: &str) -> Vec<String> {
        vec![
            format!(r#"{{"data":[{entry}]}}"#),
            format!("[{entry}]"),
            format!(" [ {entry} , 7 ,\n{entry}\t] "),
            format!(
                "{{\"pagination\":{{\"limit\":2}},\"data\":[\n\t{entry}\r\n,{{}},{entry}],\"x\":[1]}}"
            ),
            format!(
                r#"{{"data":[[{entry}],{entry},"s",null],"pagination":{{"nextPageToken":"t"}}}}"#
            ),
            format!(r#"{{"data":[{entry}],"data":[]}}"#),
            format!(r#"{{"data":[{entry}] , "pagination":{{"next":null}}}} x"#),
        ]
    }

    #[test]
    fn the_one_scan_reader_reads_every_page_as_before() {
        let mut read_fast = 0;
        let mut pages = 0;
        for body in HOSTILE {
            for page in pages_around(body) {
                pages += 1;
                read_fast += usize::from(same_page_as_scanning_each(&page).0);
            }
        }
        // Pages that are no listing, or odd ones.
        for body in [
            "",
            "null",
            "{}",
            "[]",
            r#"{"data":null}"#,
            r#"{"data":{}}"#,
            r#"{"data":[],"pagination":[]}"#,
            r#"{"data":[],"pagination":{"limit":1},"pagination":{"limit":2}}"#,
            r#"{"data":[{"negotiationID":"1"}],}"#,
            r#"{"data":[{"negotiationID":"1"},]}"#,
            r#"{"data":[{"negotiationID":"1"}]"#,
            r#"{"data":[1e400,{"negotiationID":"1"}]}"#,
            r#"{"d\u0061ta":[{"negotiationID":"1"}]}"#,
            r#"{"data":[{"\u006eegotiationID":"1"},{"negotiationID":"2","\u0073tatus":"s"}]}"#,
            r#"{"data":[{"negotiationID":"1","request":{}},{"negotiationID":"2","x":{}}]}"#,
            r#"{"data":[{"negotiationID":"1","customer":{"location":{"city":"c"}}}]}"#,
            r#"{"data":[{"negotiationID":"1","customer":{"location":{"city":"c"} } } ]}"#,
            r#"{"data":[{"negotiationID":"1","customer":{"location":[]}}]}"#,
            r#"{"data":[{"negotiationID":"1","customer":null}]}"#,
            r#"{"data":[{"negotiationID":"1","request":{"location":{}}}]}"#,
            r#"{"data":[{"negotiationID":"1","request":{"category":{"name":"a","name":"b"}}}]}"#,
            "\u{a0}[{\"negotiationID\":\"1\"}]",
            "\u{feff}{\"data\":[]}",
        ] {
            pages += 1;
            read_fast += usize::from(same_page_as_scanning_each(body).0);
        }
        // Random leads, as in `random_leads_read_the_same_as_before`, with
        // whitespace around keys and values.
        let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1du64);
        let mut next = move |n: usize| rng.usize(0..n);
        const KEYS: &[&str] = &[
            "negotiationID",
            "status",
            "createdAt",
            "category",
            "customer",
            "request",
            "name",
            "location",
            "city",
            "zipCode",
            "firstName",
            "lastName",
            "na\\u006de",
            "x",
        ];
        const LEAVES: &[&str] = &[
            "null",
            "true",
            "0",
            "1e400",
            "\"\"",
            "\"a\"",
            "\"\\u00e9\"",
            "[]",
            "{}",
            "[1,{\"city\":\"q\"}]",
            "\"2024-06-13T19:18:01+02:00\"",
        ];
        fn value(next: &mut dyn FnMut(usize) -> usize, depth: u32) -> String {
            if depth > 3 || next(3) == 0 {
                return LEAVES[next(LEAVES.len())].to_string();
            }
            let fields: Vec<String> = (0..next(5))
                .map(|_| {
                    let ws = ["", " ", "\n "][next(3)];
                    let key = KEYS[next(KEYS.len())];
                    format!("{ws}\"{key}\"{ws}:{ws}{}{ws}", value(next, depth + 1))
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        for i in 0..3_000 {
            let rest = value(&mut next, 0);
            let entry = if rest == "{}" || !rest.starts_with('{') || next(4) == 0 {
                rest
            } else {
                format!("{{\"negotiationID\":\"{i}\",{}", &rest[1..])
            };
            let page = format!(r#"{{"data":[{entry},{{"negotiationID":{i}}}]}}"#);
            pages += 1;
            read_fast += usize::from(same_page_as_scanning_each(&page).0);
        }
        // Generated pages are read in one scan.
        use crate::sandbox::data::{Shape, generate};
        for shape in [Shape::Schema, Shape::Docs, Shape::Mixed] {
            let (data, _) = generate(5, 2, 120, shape);
            for b in &data {
                let items: Vec<&str> = b.leads.iter().map(|l| l.json.as_str()).collect();
                let body = format!(
                    r#"{{"data":[{}],"pagination":{{"limit":120}}}}"#,
                    items.join(",")
                );
                assert_eq!(same_page_as_scanning_each(&body), (true, true), "{shape:?}");
            }
        }
        // Most hostile and random pages are read in one scan too (the test
        // compares the two readers, not the fallback with itself).
        assert!(read_fast * 2 > pages, "{read_fast} of {pages}");
    }

    /// A differential fuzz of the two page readers (review of the one-scan
    /// reader): random pages built from leads whose last member is a nested
    /// object, an array, `null`, `{}` or a string holding braces, quotes,
    /// escapes and multibyte text, in every envelope, with JSON's four
    /// whitespace bytes (and non-JSON ones) around every token; each page as
    /// built and after random edits (a token inserted, a few characters
    /// dropped, a stretch repeated elsewhere), most of which make invalid
    /// JSON. Whenever the one-scan reader reads a page, its page must be the
    /// other reader's (every payload byte, hash, column, count, marker,
    /// digest); otherwise the page reads as before, error or not. Fixed seed.
    #[test]
    fn mutated_pages_read_the_same_by_both_readers() {
        let mut rng = fastrand::Rng::with_seed(0x5851_f42d_4c95_7f2du64);
        let mut next = move |n: usize| rng.usize(0..n);
        const WS: &[&str] = &["", "", " ", "\t", "\r\n", "\n\t ", "\r"];
        const KEYS: &[&str] = &[
            "negotiationID",
            "status",
            "createTime",
            "createdAt",
            "category",
            "customer",
            "request",
            "leadPrice",
            "chargeState",
            "name",
            "location",
            "city",
            "zipCode",
            "displayName",
            "firstName",
            "lastName",
            "phone",
            "\\u006eegotiationID",
            "na\\u006de",
            "",
            "é}",
            "x",
        ];
        const LEAVES: &[&str] = &[
            "null",
            "true",
            "false",
            "0",
            "-0.5e-3",
            "1e400",
            "123456789012345678901234567890",
            "\"\"",
            "\"}\"",
            "\"\\\"}\"",
            "\"{\\\"a\\\":1}\"",
            "\"\\\\\"",
            "\"é}\"",
            "\"😀\"",
            "\"\\u00e9}\"",
            "\"\\ud83d\\ude00\"",
            "\"\u{a0}\"",
            "\"2024-06-13T19:18:01+02:00\"",
            "[]",
            "{}",
            "[{}]",
            "[[[\"}\"]]]",
            "{\"a\":{}}",
            "{\"city\":\"}\"}",
            "[1,{\"city\":\"q\"}]",
        ];
        fn ws(next: &mut dyn FnMut(usize) -> usize) -> &'static str {
            WS[next(WS.len())]
        }
        fn value(next: &mut dyn FnMut(usize) -> usize, depth: u32) -> String {
            if depth > 3 || next(3) == 0 {
                return LEAVES[next(LEAVES.len())].to_string();
            }
            if next(6) == 0 {
                let items: Vec<String> = (0..next(3)).map(|_| value(next, depth + 1)).collect();
                return format!("[{}{}]", items.join(","), ws(next));
            }
            object(next, depth)
        }
        fn object(next: &mut dyn FnMut(usize) -> usize, depth: u32) -> String {
            let fields: Vec<String> = (0..next(5))
                .map(|_| {
                    let key = KEYS[next(KEYS.len())];
                    let (a, b, c, d) = (ws(next), ws(next), ws(next), ws(next));
                    format!("{a}\"{key}\"{b}:{c}{}{d}", value(next, depth + 1))
                })
                .collect();
            format!("{{{}{}}}", fields.join(","), ws(next))
        }
        fn lead(next: &mut dyn FnMut(usize) -> usize, i: usize) -> String {
            let rest = object(next, 0);
            match next(6) {
                0 => rest,
                1 => value(next, 0),
                _ if rest.trim_end().len() <= 2 => format!("{{\"negotiationID\":\"{i}\"}}"),
                _ => {
                    let id = ["\"{i}\"", "{i}", "\"é{i}\"", "\"\\u0031{i}\""][next(4)]
                        .replace("{i}", &i.to_string());
                    let w = ws(next);
                    format!("{{{w}\"negotiationID\"{w}:{w}{id},{}", &rest[1..])
                }
            }
        }
        const INSERTS: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\\",
            "\\\"",
            "\"}",
            "}}",
            " ",
            "\t",
            "\r\n",
            "\u{a0}",
            "\u{feff}",
            "é",
            "😀",
            "\\u006e",
            "null",
            "{}",
            "[]",
            "1e400",
            "-0",
            "/* c */",
            "//c\n",
            ",]",
            ",}",
            "\"negotiationID\":\"x\",",
            "\"data\":[],",
            "\"pagination\":{\"limit\":1},",
            "\"x\":{\"y\":\"}\"},",
        ];
        let mut pages = 0usize;
        let mut read_fast = 0usize;
        let mut base_fast = 0usize;
        let (mut base_checked, mut read_checked) = (0usize, 0usize);
        for i in 0..1_500 {
            let entries: Vec<String> = (0..1 + next(4))
                .map(|k| lead(&mut next, i * 8 + k))
                .collect();
            let sep = format!("{},{}", ws(&mut next), ws(&mut next));
            let data = format!("[{}{}{}]", ws(&mut next), entries.join(&sep), ws(&mut next));
            let body = match next(5) {
                0 => data,
                1 => format!("{{\"pagination\":{{\"limit\":2,\"next\":\"n\"}},\"data\":{data}}}"),
                2 => format!("{{\"x\":[{{}},\"}}\"],\"data\":{data},\"pagination\":null}}"),
                3 => format!(
                    "\r\n{{ \"data\" :\t{data} , \"pagination\":{{\"nextPageToken\":\"t\"}} }}\n"
                ),
                _ => format!("{{\"data\":{data}}}"),
            };
            pages += 1;
            let (fast, checked) = same_page_as_scanning_each(&body);
            read_fast += usize::from(fast);
            base_fast += usize::from(fast);
            base_checked += usize::from(checked);
            // The edited pages are checked against the leads of this one.
            let stored = stored_of(&body);
            let chars: Vec<char> = body.chars().collect();
            for _ in 0..6 {
                let mut m = chars.clone();
                for _ in 0..1 + next(2) {
                    let at = next(m.len() + 1);
                    match next(4) {
                        0 | 1 => {
                            let ins = INSERTS[next(INSERTS.len())];
                            m.splice(at..at, ins.chars());
                        }
                        2 => {
                            let to = (at + 1 + next(3)).min(m.len());
                            m.drain(at.min(to)..to);
                        }
                        _ => {
                            let to = (at + 1 + next(40)).min(m.len());
                            let piece: Vec<char> = m[at.min(to)..to].to_vec();
                            let there = next(m.len() + 1);
                            m.splice(there..there, piece);
                        }
                    }
                }
                let mutated: String = m.into_iter().collect();
                pages += 1;
                read_fast += usize::from(same_page_as_scanning_each(&mutated).0);
                read_checked += usize::from(same_checked_page(&mutated, &stored));
            }
        }
        // Nesting around serde_json's depth limit (128), the deepest object
        // last: one reader may refuse what the other reads, never differ.
        for depth in [100, 124, 125, 126, 127, 128, 200] {
            let open = "{\"a\":".repeat(depth);
            let close = "}".repeat(depth);
            for body in [
                format!("{{\"data\":[{{\"negotiationID\":\"1\",\"x\":{open}1{close}}}]}}"),
                format!("[{{\"negotiationID\":\"1\",\"request\":{open}1{close}}}]"),
                format!(
                    "[{{\"negotiationID\":\"1\",\"x\":{}1{}}}]",
                    "[".repeat(depth),
                    "]".repeat(depth)
                ),
            ] {
                pages += 1;
                read_fast += usize::from(same_page_as_scanning_each(&body).0);
            }
        }
        // Named attacks on locating a lead's text from inside it.
        for entry in [
            "{ \t\r\n }",
            "{\"negotiationID\":\"1\",\"x\":\"\\\"}\"}",
            "{\"negotiationID\":\"1\",\"x\":\"}}}\"\r\n}",
            "{\"negotiationID\":\"1\",\"customer\":{\"displayName\":\"é}\"}\t}",
            "{\"negotiationID\":\"1\",\"request\":{\"location\":{\"city\":\"😀\"} } }",
            "{\"negotiationID\":\"1\",\"request\":{\"location\":{}}}",
            "{\"negotiationID\":\"1\",\"request\":{\"location\":null}}",
            "{\"negotiationID\":\"1\",\"customer\":null}",
            "{\"negotiationID\":\"1\",\"x\":[{\"}\":\"{\"}]}",
            "{\"negotiationID\":\"1\",\"negotiationID\":\"2\"}",
            "{\"negotiationID\":null,\"negotiationID\":\"2\"}",
            "{\"\":0,\"negotiationID\":\"1\"}",
            "{\"é\":0,\"negotiationID\":\"1\",\"x\":\"\\u00e9\"}",
            "{\"negotiationID\":\"1\"\u{a0}}",
            "{\u{a0}\"negotiationID\":\"1\"}",
            "{\"negotiationID\":\"1\",\"x\":\"\\ud800\"}",
            "{\"negotiationID\":\"1\",\"x\":1 /* c */}",
        ] {
            for page in pages_around(entry) {
                pages += 1;
                read_fast += usize::from(same_page_as_scanning_each(&page).0);
            }
        }
        // The fuzz reaches the one-scan reader, not only the fallback.
        assert!(base_fast * 3 > 1_500, "{base_fast} of 1500 unedited pages");
        // And the checked reader, where it is asked about leads it knows.
        assert!(
            base_checked * 2 > 1_500,
            "{base_checked} of 1500 unedited pages"
        );
        assert!(
            read_checked * 10 > 9_000,
            "{read_checked} of 9000 edited pages"
        );
        assert!(read_fast * 10 > pages, "{read_fast} of {pages}");
    }

    #[test]
    fn a_lead_found_unchanged_is_listed_by_id_only_and_the_page_reads_the_same() {
        let body = r#"{"data":[{"negotiationID":"1","status":"Open"},
            {"negotiationID":"\u0032","status":"Open","customer":{"displayName":"Ann"}},
            {"no_id":true}, {"negotiationID":3,"status":"Done"}, {"negotiationID":"4"}],
            "pagination":{"limit":5}}"#;
        let whole = parse_page(body.as_bytes()).unwrap();
        let asked = std::sync::Mutex::new(Vec::new());
        let hash_of = |id: &str| {
            whole
                .leads
                .iter()
                .find(|l| l.negotiation_id == id)
                .map(|l| l.hash)
                .unwrap()
        };
        let page = parse_page_with(
            body.as_bytes(),
            Some(&|id: &str, hash: i64| {
                asked.lock().unwrap().push(id.to_string());
                // The hash it is given is the payload hash parse_lead computes.
                assert_eq!(hash, hash_of(id));
                id == "2" || id == "3"
            }),
        )
        .unwrap();
        assert_eq!(*asked.lock().unwrap(), ["1", "2", "3", "4"]);
        assert_eq!(page.unchanged, ["2", "3"]);
        let read: Vec<&str> = page
            .leads
            .iter()
            .map(|l| l.negotiation_id.as_str())
            .collect();
        assert_eq!(read, ["1", "4"]);
        assert_eq!(page.skipped, 1);
        // What the listing logic sees does not depend on what was skipped.
        assert_eq!(page.entries(), whole.entries());
        assert_eq!(page.ids_digest, whole.ids_digest);
        assert!(whole.ids_digest.is_some());
        let none = parse_page(br#"{"data":[{"no_id":1}]}"#).unwrap();
        assert_eq!((none.entries(), none.ids_digest), (1, None));
        // The first entry's id and the last listed one, whatever was skipped.
        assert_eq!(
            (page.first_id.as_deref(), page.last_id.as_deref()),
            (Some("1"), Some("4"))
        );
        assert_eq!(
            (whole.first_id, whole.last_id),
            (page.first_id, page.last_id)
        );
        let p = parse_page(br#"[{"no_id":1},{"negotiationID":"a"},{"no_id":2}]"#).unwrap();
        assert_eq!(
            (p.first_id, p.last_id.as_deref(), p.last_id_back),
            (None, Some("a"), 2)
        );
        assert_eq!((none.last_id, none.last_id_back), (None, 0));
        let p =
            parse_page(br#"[{"negotiationID":"a"},{"no_id":2},{"negotiationID":"b"}]"#).unwrap();
        assert_eq!(
            (p.first_id.as_deref(), p.last_id.as_deref(), p.last_id_back),
            (Some("a"), Some("b"), 1)
        );
    }

    /// The checked reader checks UTF-8 piece by piece instead of the whole
    /// body first: a byte that is not UTF-8 anywhere but in a lead found
    /// unchanged (whose bytes hash to a stored, valid payload) still fails
    /// the page as before, with the same error.
    #[test]
    fn a_page_not_utf8_outside_leads_found_unchanged_fails_as_before() {
        let valid = |x: &str| {
            format!(
                r#"{{"data":[{{"negotiationID":"1","x":"a"}},{{"negotiationID":"2","x":"{x}"}}],"pagination":{{"limit":2}}}}"#
            )
        };
        // Every lead of the valid page is stored as it is listed there.
        let stored: std::collections::HashSet<(String, i64)> = parse_page(valid("b").as_bytes())
            .unwrap()
            .leads
            .iter()
            .map(|l| (l.negotiation_id.clone(), l.hash))
            .collect();
        let check = |id: &str, hash: i64| stored.contains(&(id.to_string(), hash));
        let bad = b"\xff\xfe";
        let swap = |from: &str, to: &[u8]| {
            let page = valid("b").into_bytes();
            let at = page
                .windows(from.len())
                .position(|w| w == from.as_bytes())
                .unwrap();
            [&page[..at], to, &page[at + from.len()..]].concat()
        };
        let pages = [
            // in a changed lead's string, its key, its id
            swap(r#""x":"b""#, &[br#""x":"b"#, &bad[..], b"\""].concat()),
            swap(r#""x":"a""#, &[b"\"x", &bad[..], br#"":"a""#].concat()),
            swap(r#""1""#, &[b"\"1", &bad[..], b"\""].concat()),
            // an entry that is not an object
            swap(
                r#"{"negotiationID":"1","x":"a"}"#,
                &[b"\"", &bad[..], b"\""].concat(),
            ),
            // an envelope key, an envelope value, after the end
            swap(r#""pagination""#, &[b"\"pag", &bad[..], b"\""].concat()),
            swap(r#"{"limit":2}"#, &[b"\"", &bad[..], b"\""].concat()),
            [valid("b").as_bytes(), &bad[..]].concat(),
        ];
        for page in pages {
            let shown = String::from_utf8_lossy(&page).into_owned();
            assert_eq!(
                parse_page_with(&page, Some(&check)).map(|p| p.leads.len()),
                Err("the page is not UTF-8".to_string()),
                "{shown}"
            );
            assert_eq!(
                parse_page(&page).map(|p| p.leads.len()),
                Err("the page is not UTF-8".to_string()),
                "{shown}"
            );
        }
        // The valid page is read by the checked reader, both leads unchanged.
        let page = checked::read(valid("b").as_bytes(), &check).unwrap();
        assert_eq!(page.unchanged, ["1", "2"]);
        // A lead changed in a valid way is read in full.
        let page = parse_page_with(valid("c").as_bytes(), Some(&check)).unwrap();
        assert_eq!((page.unchanged.len(), page.leads.len()), (1, 1));
    }
    #[test]
    fn a_page_keeps_every_byte_of_each_lead() {
        let body = r#"{"data":[{"negotiationID":"519153480500518912","status":"active","x":{"big":9007199254740993},
            "customer":{"displayName":"Zoë","location":{"city":"San José","zipCode":"95110"}},"createdAt":"2024-06-13T19:18:01+02:00"},
            {"no_id":true}, 7],"pagination":{"limit":2,"nextPageToken":"abc"}}"#;
        let page = parse_page(body.as_bytes()).unwrap();
        assert_eq!(page.leads.len(), 1);
        assert_eq!(page.skipped, 2);
        assert_eq!(page.markers.next_page_token.as_deref(), Some("abc"));
        assert_eq!(page.markers.limit, Some(2));
        assert_eq!(page.entries(), 3);
        let lead = &page.leads[0];
        assert!(lead.payload.contains("9007199254740993"));
        assert!(lead.payload.contains(r#""city":"San José""#));
        assert_eq!(lead.created_at.as_deref(), Some("2024-06-13T17:18:01.000Z"));
        assert_eq!(lead.customer_name.as_deref(), Some("Zoë"));
        assert_eq!(lead.zip.as_deref(), Some("95110"));
    }

    #[test]
    fn the_schema_shape_fills_the_same_columns() {
        let lead = parse_lead_body(
            r#"{"negotiationID":"1","createdAt":"2026-01-01T04:30:00.250-05:00","status":"Open",
                "request":{"category":{"categoryID":"9","name":"Plumbing"},
                           "location":{"address1":"1 Main St","city":"Austin","state":"TX","zipCode":"78701"}},
                "customer":{"customerID":"5","firstName":"Zoë","lastName":"Ø.","phone":"+1 555 0100"},
                "leadPrice":"$25.00","chargeState":"Charged"}"#,
        )
        .unwrap();
        assert_eq!(lead.created_at.as_deref(), Some("2026-01-01T09:30:00.250Z"));
        assert_eq!(lead.category.as_deref(), Some("Plumbing"));
        assert_eq!(lead.customer_name.as_deref(), Some("Zoë Ø."));
        assert_eq!(lead.city.as_deref(), Some("Austin"));
        assert_eq!(lead.zip.as_deref(), Some("78701"));
        assert_eq!(lead.customer_phone.as_deref(), Some("+1 555 0100"));
        assert_eq!(lead.lead_price.as_deref(), Some("$25.00"));
        assert_eq!(lead.charge_state.as_deref(), Some("Charged"));
        // The first present field wins; a price sent as a number keeps its text.
        let lead = parse_lead_body(
            r#"{"negotiationID":"2","category":{"name":"Docs"},"request":{"category":{"name":"Schema"}},
                "customer":{"displayName":"","firstName":"Ann","location":{"city":"Reno","zipCode":89501}},
                "leadPrice":25.10}"#,
        )
        .unwrap();
        assert_eq!(lead.category.as_deref(), Some("Schema"));
        assert_eq!(lead.customer_name.as_deref(), Some("Ann"));
        assert_eq!(lead.city.as_deref(), Some("Reno"));
        assert_eq!(lead.zip.as_deref(), Some("89501"));
        assert_eq!(lead.lead_price.as_deref(), Some("25.10"));
        assert_eq!(lead.customer_phone, None);
    }

    #[test]
    fn nested_objects_read_in_place_keep_the_separate_parse_rules() {
        // A repeated key makes only that nested object unreadable; values
        // of other types are skipped; escaped keys and texts are decoded.
        let lead = parse_lead_body(
            r#"{"negotiationID":"3","request":{"category":{"name":"A","name":"B"},
                "location":{"city":"X","city":"Y","zipCode":"1"}},
                "customer":{"na\u006de":1,"displayN\u0061me":"Zo\u00eb \"Z\"","location":[1,{"city":"Q"}],
                "phone":null},"category":{"name":"Fallback"},"status":"a\nb"}"#,
        )
        .unwrap();
        assert_eq!(lead.category.as_deref(), Some("Fallback"));
        assert_eq!(lead.city, None);
        assert_eq!(lead.zip, None);
        assert_eq!(lead.customer_name.as_deref(), Some("Zoë \"Z\""));
        assert_eq!(lead.customer_phone, None);
        assert_eq!(lead.status.as_deref(), Some("a\nb"));
        let lead = parse_lead_body(
            r#"{"negotiationID":"4","request":"text","customer":7,"category":[{"name":"no"}]}"#,
        )
        .unwrap();
        assert_eq!((lead.category, lead.customer_name), (None, None));
    }

    /// JSON allows a repeated key; a lead that repeats one is a lead (SPEC
    /// §5): its last value counts for the columns (as in JavaScript), its
    /// payload is the text as received, and every page reader lists it.
    #[test]
    fn a_lead_that_repeats_a_top_level_key_is_read_its_last_value_counting() {
        let lead = r#"{"negotiationID":"5","status":"Open","customer":{"displayName":"A"},"status":"Canceled","leadPrice":"1","leadPrice":2.50}"#;
        let row = parse_lead_body(lead).expect("a lead repeating a key is still a lead");
        assert_eq!(row.negotiation_id, "5");
        assert_eq!(row.status.as_deref(), Some("Canceled"));
        assert_eq!(row.lead_price.as_deref(), Some("2.50"));
        assert_eq!(row.customer_name.as_deref(), Some("A"));
        assert_eq!(row.payload, lead);
        assert_eq!(row.hash, xxhash_rust::xxh3::xxh3_64(lead.as_bytes()) as i64);
        // The last id counts too.
        let twice = r#"{"negotiationID":"6","negotiationID":"7","status":"s"}"#;
        assert_eq!(parse_lead_body(twice).unwrap().negotiation_id, "7");
        let other = r#"{"negotiationID":"8","status":"Open"}"#;
        let body = format!(r#"{{"data":[{lead},{other}],"pagination":{{"limit":2}}}}"#);
        for page in [
            parse_page(body.as_bytes()).unwrap(),
            parse_page_with(body.as_bytes(), Some(&|_: &str, _| false)).unwrap(),
            parse_page_with(body.as_bytes(), Some(&|id: &str, _| id == "8")).unwrap(),
            parse_page_scanning_each(&body, None).unwrap(),
        ] {
            assert_eq!(page.skipped, 0);
            assert_eq!(page.leads[0], row);
            assert_eq!(page.entries(), 2);
        }
        same_page_as_scanning_each(&body);
        // An entry that names an id but cannot be read as a lead (here: a
        // key that is no text) is still listed under that id, in every
        // reader. Its id is its last, as for a lead that is read: one whose
        // last id is null names none.
        let unread = r#"{"negotiationID":null,"negotiationID":"9","\ud800":1}"#;
        let no_id = r#"{"negotiationID":"10","negotiationID":null}"#;
        let body = format!(r#"{{"data":[{other},{unread},{no_id},7]}}"#);
        for page in [
            parse_page(body.as_bytes()).unwrap(),
            parse_page_with(body.as_bytes(), Some(&|_: &str, _| false)).unwrap(),
            parse_page_with(body.as_bytes(), Some(&|id: &str, _| id == "8")).unwrap(),
        ] {
            assert_eq!(
                (page.skipped, page.unread_ids.clone()),
                (3, vec!["9".to_string()])
            );
        }
        same_page_as_scanning_each(&body);
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
        assert_eq!(page.markers.next_page_token, None);
        assert!(page.markers.token_key);
        assert_eq!(page.leads[0].negotiation_id, "123");
        assert_eq!(page.leads[0].status, None);
        assert!(parse_page(b"<html>").is_err());
        assert!(parse_page(br#"{"items":[]}"#).is_err());
    }

    #[test]
    fn message_times_are_stored_so_that_text_order_is_time_order() {
        // As sent by a server that trims trailing zeros (Go's RFC3339Nano):
        // a whole second sorted after a fraction of the same second.
        let sent = [
            "2026-11-28T04:00:00Z",
            "2026-11-28T04:00:00.5Z",
            "2026-11-28T05:00:00.25+01:00",
            "2026-11-28T04:00:01Z",
            "2026-11-28T04:00:00.999999Z",
        ];
        let mut stored: Vec<(String, chrono::DateTime<chrono::Utc>)> = sent
            .iter()
            .map(|t| {
                let body = format!(r#"{{"messageID":"m","sentAt":"{t}"}}"#);
                let raw: &RawValue = serde_json::from_str(&body).unwrap();
                let m = parse_message(raw).unwrap();
                assert_eq!(
                    m.sent_at_raw.as_deref(),
                    Some(*t),
                    "sent as is kept for paging"
                );
                (m.sent_at.unwrap(), crate::time::parse(t).unwrap())
            })
            .collect();
        stored.sort();
        let instants: Vec<_> = stored.iter().map(|(_, i)| *i).collect();
        let mut in_time_order = instants.clone();
        in_time_order.sort();
        assert_eq!(instants, in_time_order, "{stored:?}");
        assert_eq!(stored[0].0, "2026-11-28T04:00:00.000Z");
        assert_eq!(stored[1].0, "2026-11-28T04:00:00.250Z");
    }

    #[test]
    fn a_message_page_keeps_each_message_exactly() {
        let body = r#"{"data":[{"messageID":"600000000000000001","negotiationID":"519153480500518912","from":"Customer",
            "customer":{"customerID":"1","displayName":"Zoë"},"text":"Hi \u00e9 👍","attachments":[],"sentAt":"2024-06-13T19:18:01+02:00","x":9007199254740993},
            {"text":"no id"}, 3],"pagination":{"limit":20}}"#;
        let page = parse_message_page(body.as_bytes()).unwrap();
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.skipped, 2);
        assert_eq!(page.limit, Some(20));
        let m = &page.messages[0];
        assert_eq!(m.message_id, "600000000000000001");
        assert_eq!(m.sent_at.as_deref(), Some("2024-06-13T17:18:01.000Z"));
        assert_eq!(m.sent_at_raw.as_deref(), Some("2024-06-13T19:18:01+02:00"));
        assert_eq!(m.sender.as_deref(), Some("Customer"));
        assert_eq!(m.text.as_deref(), Some("Hi é 👍"));
        assert!(m.payload.contains("9007199254740993"));
        assert!(parse_message_page(b"<html>").is_err());
        assert_eq!(
            sent_message_id(br#"{"messageID":"7"}"#).as_deref(),
            Some("7")
        );
        assert_eq!(
            sent_message_id(br#"{"data":{"messageID":8}}"#).as_deref(),
            Some("8")
        );
        assert_eq!(sent_message_id(b""), None);
    }

    #[test]
    fn created_at_sorts_as_time_whatever_its_precision_or_offset() {
        let at = |v: &str| {
            parse_lead_body(&format!(r#"{{"negotiationID":"1","createdAt":{v}}}"#))
                .unwrap()
                .created_at
        };
        // Milliseconds always, as every other leadsync timestamp: a whole
        // second and a fraction of the same second sort in time order.
        let whole = at(r#""2024-06-14T09:30:00Z""#).unwrap();
        let half = at(r#""2024-06-14T11:30:00.5+02:00""#).unwrap();
        assert_eq!(whole, "2024-06-14T09:30:00.000Z");
        assert_eq!(half, "2024-06-14T09:30:00.500Z");
        assert!(whole < half);
        // Finer than a millisecond is kept.
        assert_eq!(
            at(r#""2024-06-14T09:30:00.123456Z""#).as_deref(),
            Some("2024-06-14T09:30:00.123456Z")
        );
        // The widest offsets RFC 3339 allows.
        assert_eq!(
            at(r#""2024-06-14T23:59:00+23:59""#).as_deref(),
            Some("2024-06-14T00:00:00.000Z")
        );
        assert_eq!(
            at(r#""2024-06-14T00:00:00-23:59""#).as_deref(),
            Some("2024-06-14T23:59:00.000Z")
        );
        // An instant that leaves four-digit years in UTC is kept as sent
        // (never "+10000-..." or "-0001-...", which sort wrongly).
        assert_eq!(
            at(r#""9999-12-31T23:59:00-23:59""#).as_deref(),
            Some("9999-12-31T23:59:00-23:59")
        );
        assert_eq!(
            at(r#""0000-01-01T00:00:00+01:00""#).as_deref(),
            Some("0000-01-01T00:00:00+01:00")
        );
        // What is no time at all stays as sent; null and "" are no value.
        assert_eq!(at("1718357400").as_deref(), Some("1718357400"));
        assert_eq!(at("null"), None);
        assert_eq!(at(r#""""#), None);
    }

    #[test]
    fn the_checked_reader_reads_named_attacks_as_the_scanning_one() {
        // Escapes, strings holding brackets or keys, ids of every type,
        // invalid tokens inside a lead, non-JSON whitespace, a BOM.
        let entries = [
            r#"{"negotiationID":"a\\","x":"]}"}"#,
            r#"{"x":"\\\\","negotiationID":"b"}"#,
            r#"{"x":"\"negotiationID\":\"z\"","negotiationID":"c"}"#,
            r#"{"n\u0065gotiationID":"d","negotiationID":"e"}"#,
            r#"{"negotiationID":"f","n\u0065gotiationID":"g"}"#,
            r#"{"other\"":1,"negotiationID":"h"}"#,
            r#"{"a":{"negotiationID":"in"},"negotiationID":"i"}"#,
            r#"{"a":["negotiationID","x"],"negotiationID":"j"}"#,
            r#"{"negotiationID":12.5e3}"#,
            r#"{"negotiationID":"k\u0041"}"#,
            r#"{"negotiationID":null,"negotiationID":"l"}"#,
            r#"{"negotiationID":{"x":1}}"#,
            r#"{"negotiationID":""}"#,
            r#"{"negotiationID" :	"m" }"#,
            r#"{"negotiationID":"n","negotiationID":"o"}"#,
            r#"{"negotiationID":"p",}"#,
            r#"{"negotiationID":"q"/*c*/}"#,
            r#"{"negotiationID":"r","x":tru}"#,
            r#"{"negotiationID":"s","x":[1}]}"#,
            r#"{"negotiationID":"t","x":"\q"}"#,
            "{\"negotiationID\":\"u\",\"x\":\"\u{1}\"}",
            "{\"negotiationID\":\"v\"\u{a0}}",
            r#"{"negotiationID":-}"#,
            r#"{"negotiationID":01}"#,
            r#"{"negotiationID":1.}"#,
            r#"{"negotiationID"}"#,
            r#"{"negotiationID":"w"#,
            r#"{"negotiationID":"x\"#,
            r#"{"":"","negotiationID":"y"}"#,
            r#"{"negotiationID":"é😀","x":"\ud83d"}"#,
            r#"{"negotiationID":"z","x":"\u12"}"#,
            r#"{"negotiationID":"A","x":[]]}"#,
            r#"{"negotiationID":"B"}}"#,
            r#"{"negotiationID":"C",,"x":1}"#,
            r#"{"negotiationID":"D" "x":1}"#,
            r#"{"negotiationID":"E":"x"}"#,
            r#"{"negotiationID"::"F"}"#,
            r#"{,"negotiationID":"G"}"#,
            r#"{"negotiationID":1 2}"#,
            r#"{"negotiationID":"H","x":1e}"#,
            r#"{"negotiationID":"I","x":NaN}"#,
            r#"{"negotiationID":"J","x":-Infinity}"#,
            r#"{"negotiationID":true}"#,
            r#"{"negotiationID":"K"]"#,
            r#"["negotiationID","L"]"#,
            "\u{feff}{\"negotiationID\":\"M\"}",
        ];
        // Each in envelopes: repeated or escaped keys, trailing commas,
        // truncation, garbage after, odd `pagination` values.
        let envelopes = [
            "{{\"data\":[{e}]}}",
            "[{e}]",
            "{{\"data\":[{e},{e}]}}",
            "{{\"data\":[{e}],\"pagination\":null}}",
            "{{\"pagination\":null,\"data\":[{e}],\"pagination\":{{}}}}",
            "{{\"data\":[{e}],\"pagin\\u0061tion\":{{\"next\":\"x\"}}}}",
            "{{\"d\\u0061ta\":[{e}]}}",
            "{{\"data\":[{e}],\"d\\u0061ta\":[]}}",
            "{{\"data\":[{e}],}}",
            "{{\"data\":[{e},]}}",
            "[{e},]",
            "{{\"data\":[{e}]}}\u{a0}",
            "\u{a0}{{\"data\":[{e}]}}",
            "{{\"data\":[{e}]\u{a0}}}",
            "{{\"data\":[{e}]}}\\",
            "{{\"data\":[{e}],\"x\":\"\\\\\"}}",
            "{{\"data\":[{e}],\"x\":\"a\\\"}}",
            "{{\"x\":{{\"data\":[]}},\"data\":[{e}]}}",
            "{{\"data\":[{e}],\"pagination\":[1,{{\"a\":\"]\"}}]}}",
            "{{\"data\":[{e}],\"pagination\":\"null\"}}",
            "{{\"data\":[{e}],\"pagination\":nul}}",
            "{{\"data\":[{e}],\"x\":1 2}}",
            "{{\"data\":[{e}] \"x\":1}}",
            "{{\"data\"[{e}]}}",
            "{{\"data\":[{e}]",
            "{{\"data\":[{e}",
            "{{\"data\":null,\"data\":[{e}]}}",
            "{{\"data\":[{e}],\"\u{1}\":1}}",
            "{{\"data\":[{e}],\"x\":{{}}}}}}",
            "{{\"data\":[1,{e}]}}",
            "{{\"data\":[{e} {e}]}}",
            "{{\"data\":[{e}],\"pagination\":{{\"next\":\"a\",\"next\":\"b\"}}}}",
            "{{\"data\":[{e}],\"pagination\":{{\"limit\":-1,\"offset\":\"7\"}}}}",
        ];
        // Every entry's lead, stored as parsed alone (only JSON is stored).
        let mut n = 0;
        let mut checked = 0;
        for e in entries {
            for env in envelopes {
                let body = env.replace("{{", "{").replace("}}", "}").replace("{e}", e);
                let mut stored = std::collections::HashSet::new();
                for x in entries {
                    if let Some(l) = parse_lead_body(x) {
                        stored.insert((l.negotiation_id.clone(), l.hash));
                    }
                }
                n += 1;
                checked += usize::from(same_checked_page(&body, &stored));
            }
        }
        assert!(checked * 10 > n, "{checked} of {n}");
    }

    /// Review (hooks): a lead id sent as a JSON number that is not plain
    /// digits (`1e3`, `-0`, `1.0`, `1e400`, a float's rounding of a long id)
    /// was read as its text: a lead mirrored under a name no string id
    /// has, beside the real one. Every reader now skips such an entry (an
    /// id sent as plain digits is read as before).
    #[test]
    fn a_lead_id_sent_as_a_number_counts_only_when_plain_digits() {
        // Review (hooks): a blank id was mirrored by the poller, ignored
        // by the receiver; now by neither.
        let odd = [
            "5.191534805005189e17",
            "1e3",
            "1E3",
            "-0",
            "1.0",
            "1e400",
            "-7",
            "\" \"",
            "\"\\t\"",
        ];
        for id in odd {
            let lead = format!(r#"{{"negotiationID":{id},"status":"Open"}}"#);
            assert_eq!(parse_lead_body(&lead), None, "{id}");
            let raw: &RawValue = serde_json::from_str(&lead).unwrap();
            assert_eq!(separate::parse_lead(raw), None, "{id}");
            let twice = format!(r#"{{"negotiationID":"1","status":"Open","negotiationID":{id}}}"#);
            assert_eq!(parse_lead_body(&twice), None, "{id}");
            let entries = [
                format!(r#"{{"negotiationID":{id},"status":"a"}}"#),
                format!(r#"{{"\u0061":1,"negotiationID":{id}}}"#),
                r#"{"negotiationID":519153480500518912,"status":"b"}"#.to_string(),
            ];
            let body = format!(r#"{{"data":[{}]}}"#, entries.join(","));
            let everything_else_unchanged = |i: &str, _| i != "519153480500518912";
            for page in [
                parse_page(body.as_bytes()).unwrap(),
                parse_page_with(body.as_bytes(), Some(&|_: &str, _| false)).unwrap(),
                parse_page_with(body.as_bytes(), Some(&everything_else_unchanged)).unwrap(),
            ] {
                let ids: Vec<_> = page
                    .leads
                    .iter()
                    .map(|l| l.negotiation_id.as_str())
                    .collect();
                assert_eq!(ids, ["519153480500518912"], "{id}");
                assert!(page.unchanged.is_empty(), "{id}: {:?}", page.unchanged);
                // Named still, as an earlier version mirrored them: never
                // marked missing for being skipped.
                let named = serde_json::from_str::<String>(id).unwrap_or_else(|_| id.to_string());
                assert_eq!(page.unread_ids, [named.clone(), named], "{id}");
                assert_eq!(page.skipped, 2, "{id}");
                // Yet no lead a reader takes: a full scan cannot name them.
                assert_eq!(page.unnamed, 2, "{id}");
            }
        }
    }

    /// Review (hooks): a sent message's id past u64 went through a float
    /// (`1.2345678901234568e22`), where the poller keeps its digits.
    #[test]
    fn a_sent_message_id_sent_as_a_long_number_keeps_its_digits() {
        for body in [
            r#"{"messageID":12345678901234567890123}"#,
            r#"{"data":{"messageID":12345678901234567890123}}"#,
            r#"{"messageID":"","data":{"messageID":12345678901234567890123}}"#,
        ] {
            assert_eq!(
                sent_message_id(body.as_bytes()).as_deref(),
                Some("12345678901234567890123"),
                "{body}"
            );
        }
        assert_eq!(
            sent_message_id(br#"{"messageID":"m1"}"#).as_deref(),
            Some("m1")
        );
        for none in [
            &b""[..],
            b"[]",
            br#"{"messageID":null}"#,
            br#"{"data":[1]}"#,
        ] {
            assert_eq!(sent_message_id(none), None);
        }
    }
}
