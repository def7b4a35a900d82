//! Messages and webhook deliveries: `messages`, `webhook_events`, and the one
//! transaction that stores a delivery together with its effect.

use super::mirror::{self, PageContext, Source, Upserted};
use crate::lead::LeadRow;
use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// A message row (SPEC §9), source-agnostic.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub message_id: String,
    pub negotiation_id: String,
    pub business_id: Option<String>,
    pub sent_at: Option<String>,
    pub sender: Option<String>,
    pub text: Option<String>,
    /// The message object exactly as received.
    pub payload: String,
    /// `webhook` or `poll`.
    pub source: &'static str,
}

/// The `webhook_events` columns known before the delivery is applied.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub received_at: String,
    pub event_type: String,
    pub webhook_id: Option<String>,
    pub triggered_at: Option<String>,
    pub business_id: Option<String>,
    pub negotiation_id: Option<String>,
    pub message_id: Option<String>,
    /// The request body exactly as received.
    pub payload: String,
}

/// What a delivery asks of the mirror.
#[derive(Debug, Clone)]
pub enum Effect {
    /// A new lead of `business_id` (when the delivery names one).
    Lead {
        lead: LeadRow,
        business_id: Option<String>,
        /// When the event happened (UTC, the database's format); `None` when
        /// the delivery does not say: then a lead already mirrored is kept.
        event_time: Option<String>,
    },
    /// A message.
    Message(MessageRow),
    /// Nothing: kept as `ignored`, with the reason when there is one.
    Ignore(Option<String>),
}

/// `webhook_events.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Ignored,
    UnknownBusiness,
}

impl Outcome {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::UnknownBusiness => "unknown_business",
        }
    }
}

/// A stored delivery: its `webhook_events` id, outcome and note.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub event_id: i64,
    pub outcome: Outcome,
    pub error: Option<String>,
}

fn is_configured(conn: &Connection, business_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM businesses WHERE business_id = ?1 AND configured = 1")?
        .query_row([business_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Stores a delivery and applies its effect in one transaction: either both
/// are committed or neither is (the receiver answers 2xx only after this).
pub fn record_delivery(
    conn: &mut Connection,
    event: &EventRow,
    effect: &Effect,
) -> Result<Recorded> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut row = event.clone();
    let (outcome, error) = match effect {
        Effect::Ignore(reason) => (Outcome::Ignored, reason.clone()),
        Effect::Lead {
            lead,
            business_id,
            event_time,
        } => {
            row.negotiation_id = Some(lead.negotiation_id.clone());
            row.business_id = business_id.clone();
            match business_id {
                None => (
                    Outcome::UnknownBusiness,
                    Some("the negotiation names no businessID".to_string()),
                ),
                Some(b) if !is_configured(&tx, b)? => (
                    Outcome::UnknownBusiness,
                    Some(format!("business {b} is not configured")),
                ),
                Some(b) => {
                    let ctx = PageContext {
                        business_id: b.clone(),
                        run_id: None,
                        source: Source::Webhook,
                        now: event.received_at.clone(),
                        stale_before: String::new(),
                    };
                    let keep_after = event_time.as_deref().unwrap_or("");
                    match mirror::upsert_lead(&tx, &ctx, lead, Some(keep_after))? {
                        Upserted::Inserted | Upserted::Changed | Upserted::Reappeared => {
                            (Outcome::Applied, None)
                        }
                        Upserted::Unchanged | Upserted::Kept { identical: true } => {
                            (Outcome::Duplicate, None)
                        }
                        Upserted::Kept { identical: false } => (
                            Outcome::Duplicate,
                            Some(
                                "the mirror has a newer copy of this lead (changed after the event's \
                                 triggeredAt); kept"
                                    .to_string(),
                            ),
                        ),
                    }
                }
            }
        }
        Effect::Message(m) => {
            row.negotiation_id = Some(m.negotiation_id.clone());
            row.message_id = Some(m.message_id.clone());
            let business = match &m.business_id {
                Some(b) => Some(b.clone()),
                None => mirror::business_of(&tx, &m.negotiation_id)?,
            };
            row.business_id = business.clone();
            match &business {
                Some(b) if !is_configured(&tx, b)? => (
                    Outcome::UnknownBusiness,
                    Some(format!("business {b} is not configured")),
                ),
                _ => {
                    let mut m = m.clone();
                    m.business_id = business;
                    if insert_message(&tx, &m, &event.received_at)? {
                        (Outcome::Applied, None)
                    } else {
                        (Outcome::Duplicate, None)
                    }
                }
            }
        }
    };
    tx.prepare_cached(
        "INSERT INTO webhook_events (received_at, event_type, webhook_id, triggered_at, business_id,
             negotiation_id, message_id, payload, outcome, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        row.received_at,
        row.event_type,
        row.webhook_id,
        row.triggered_at,
        row.business_id,
        row.negotiation_id,
        row.message_id,
        row.payload,
        outcome.as_str(),
        error,
    ])?;
    let event_id = tx.last_insert_rowid();
    tx.commit()?;
    Ok(Recorded {
        event_id,
        outcome,
        error,
    })
}

/// Inserts a message unless its `message_id` is known; true when inserted.
pub fn insert_message(conn: &Connection, m: &MessageRow, now: &str) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "INSERT INTO messages (message_id, negotiation_id, business_id, sent_at, sender, text,
                 payload, source, first_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (message_id) DO NOTHING",
        )?
        .execute(params![
            m.message_id,
            m.negotiation_id,
            m.business_id,
            m.sent_at,
            m.sender,
            m.text,
            m.payload,
            m.source,
            now
        ])?;
    Ok(n > 0)
}
