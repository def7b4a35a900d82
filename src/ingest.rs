//! One lead or message into the mirror. Polled leads go through
//! [`crate::store::mirror::write_page`], webhook deliveries through
//! [`delivery_effect`] and [`crate::store::messages::record_delivery`]; both
//! end in the same [`crate::store::mirror::upsert_lead`], so a lead is hashed,
//! compared, stored and recorded in `negotiation_changes` the same way
//! whichever way it came.

use crate::store::messages::{Effect, EventRow, MessageRow};
use crate::thumbtack::webhook::{Content, Delivery};

/// What a parsed delivery asks of the mirror, and its `webhook_events` row.
pub fn delivery_effect(delivery: Delivery, body: &str, received_at: String) -> (EventRow, Effect) {
    let mut row = EventRow {
        received_at,
        event_type: delivery.event_type,
        webhook_id: delivery.webhook_id,
        triggered_at: delivery.triggered_at,
        business_id: None,
        negotiation_id: None,
        message_id: None,
        payload: body.to_string(),
    };
    let effect = match delivery.content {
        Content::Negotiation { lead, business_id } => Effect::Lead {
            lead,
            business_id,
            event_time: row
                .triggered_at
                .as_deref()
                .and_then(crate::time::parse)
                .map(crate::time::fmt),
        },
        Content::Message(m) => Effect::Message(MessageRow {
            message_id: m.message_id,
            negotiation_id: m.negotiation_id,
            business_id: m.business_id,
            sent_at: m.sent_at,
            sender: m.sender,
            text: m.text,
            payload: m.payload,
            source: "webhook",
        }),
        Content::Other => Effect::Ignore(None),
        Content::Unusable {
            reason,
            negotiation_id,
            message_id,
        } => {
            row.negotiation_id = negotiation_id;
            row.message_id = message_id;
            Effect::Ignore(Some(reason))
        }
    };
    (row, effect)
}
