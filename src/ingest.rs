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
            event_time: event_time(row.triggered_at.as_deref(), &row.received_at),
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

/// When a delivery's event happened, as the mirror compares it with a
/// lead's `changed_at` (UTC, the database's format). `None` when the
/// delivery does not say, or says a time after it was received: an event
/// cannot have happened after its delivery arrived, so such a time (a clock
/// ahead of ours, a bogus value) proves nothing about which copy is newer,
/// and believed it would let every redelivery overwrite the poller's newer
/// copy. With `None` a lead already mirrored is kept; a new one is inserted.
/// Compared to the millisecond, as both are stored (`received_at` is).
fn event_time(triggered_at: Option<&str>, received_at: &str) -> Option<String> {
    use chrono::SubsecRound;
    let event = crate::time::parse(triggered_at?)?.trunc_subsecs(3);
    let received = crate::time::parse(received_at)?;
    (event <= received).then(|| crate::time::fmt(event))
}

#[cfg(test)]
mod tests {
    use super::event_time;

    #[test]
    fn an_event_time_is_believed_up_to_the_millisecond_it_was_received() {
        let received = "2026-11-28T04:00:00.123Z";
        for (triggered, believed) in [
            ("2026-11-28T04:00:00.123999999Z", true),
            ("2026-11-28T05:00:00.123+01:00", true),
            ("2026-11-28T04:00:00.124Z", false),
            ("2026-11-28T04:00:01Z", false),
            ("2026-11-28T18:00:00+14:00", true),
            ("2026-11-28T18:00:01+14:00", false),
            ("not a time", false),
        ] {
            assert_eq!(
                event_time(Some(triggered), received).is_some(),
                believed,
                "{triggered}"
            );
        }
        assert_eq!(
            event_time(Some("2026-11-28T04:00:00.1239Z"), received).as_deref(),
            Some("2026-11-28T04:00:00.123Z")
        );
        assert_eq!(event_time(None, received), None);
    }
}
