//! Deterministic generated businesses and leads: the same seed gives the
//! same data, with realistic variety (unicode, nested objects, both creation
//! field names, unknown fields, 64-bit integers).

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{Value, json};

/// A generated business.
#[derive(Debug, Clone)]
pub struct SbBusiness {
    pub id: String,
    pub name: String,
    /// Newest first, as the listing returns them.
    pub leads: Vec<SbLead>,
}

/// A generated lead, kept as the exact JSON the API serves.
#[derive(Debug, Clone)]
pub struct SbLead {
    pub id: String,
    pub json: String,
}

const BUSINESS_NAMES: &[&str] = &[
    "Robert's Remodeling",
    "Ökologische Gärten GmbH",
    "Señora Limpieza",
    "Bright Spark Électricité",
    "Pipe Dreams Plumbing",
    "北京装修",
    "Hammer & Nail Co.",
    "Zoë's Painting",
];
/// First and last names (the schema shape sends them apart; the Leads
/// page's shape sends `displayName`). An empty last name happens.
const CUSTOMERS: &[(&str, &str)] = &[
    ("Olivia", "Y."),
    ("Zoë", "Ø."),
    ("José", "Álvarez"),
    ("李雷", ""),
    ("Σοφία", "Κ."),
    ("Noa 🌵", "B."),
    ("Łukasz", "W."),
    ("Siobhán", "O'Neill"),
    ("Nguyễn", "Ngọc Anh"),
    ("Ahmed", "Ü."),
];

/// Which published shape the sandbox's leads follow (SPEC §5, §6).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// The Leads page's example: `createTime`, `category`,
    /// `customer.displayName`, `customer.location`.
    Docs,
    /// The API schema `NegotiationV4`, as real deliveries carry it:
    /// `createdAt`, `request{category, location}`, `customer.firstName`/
    /// `lastName`/`phone`, `leadPrice`, `chargeState`.
    Schema,
    /// Both, alternating lead by lead.
    #[default]
    Mixed,
}

impl Shape {
    /// True when the lead with this sequence number takes the schema shape.
    fn schema_for(self, sequence: u64) -> bool {
        match self {
            Shape::Docs => false,
            Shape::Schema => true,
            Shape::Mixed => sequence % 2 == 1,
        }
    }
}
const PLACES: &[(&str, &str, &str)] = &[
    ("San Francisco", "CA", "94117"),
    ("San José", "CA", "95110"),
    ("Austin", "TX", "78701"),
    ("Brooklyn", "NY", "11201"),
    ("Coeur d'Alene", "ID", "83814"),
    ("Española", "NM", "87532"),
];
const CATEGORIES: &[&str] = &[
    "Kitchen Remodel",
    "House Cleaning",
    "Plumbing",
    "Électricien",
    "Landscaping",
    "Roof Repair",
    "Local Moving (under 50 miles)",
    "Interior Painting",
];
/// Statuses as seen in the wild: free text, mixed case.
pub const LEAD_STATUSES: &[&str] = &["active", "Open", "Canceled", "Picked", "active", "Open"];
const ANSWERS: &[&str] = &[
    "Full kitchen renovation",
    "Two bedrooms, one bath — \"deep clean\" please",
    "Leaking faucet\nand a running toilet",
    "Within 2 weeks",
    "Budget: $5,000–$10,000",
];

/// The instant the oldest generated data is relative to (stable across runs).
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

/// An 18-digit id unique within `taken`.
fn fresh_id(
    rng: &mut fastrand::Rng,
    prefix: u64,
    taken: &mut std::collections::HashSet<String>,
) -> String {
    loop {
        let id =
            (prefix * 100_000_000_000_000_000 + rng.u64(0..100_000_000_000_000_000)).to_string();
        if taken.insert(id.clone()) {
            return id;
        }
    }
}

/// The businesses and their leads for a seed.
pub fn generate(
    seed: u64,
    businesses: usize,
    leads_per_business: usize,
    shape: Shape,
) -> (Vec<SbBusiness>, std::collections::HashSet<String>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(businesses);
    let mut sequence: u64 = 0;
    for b in 0..businesses {
        let id = fresh_id(&mut rng, 4, &mut taken);
        let name = BUSINESS_NAMES[b % BUSINESS_NAMES.len()].to_string();
        let mut leads = Vec::with_capacity(leads_per_business);
        for i in 0..leads_per_business {
            // Newest first: lead 0 is the most recent.
            let created = epoch() - Duration::minutes(37 * i as i64 + b as i64);
            let lead_id = fresh_id(&mut rng, 5, &mut taken);
            leads.push(SbLead {
                json: render(&lead_value(
                    &mut rng, &lead_id, &id, &name, created, sequence, shape,
                )),
                id: lead_id,
            });
            sequence += 1;
        }
        out.push(SbBusiness { id, name, leads });
    }
    (out, taken)
}

/// A new lead (for the "add leads" mutation).
pub fn new_lead(
    rng: &mut fastrand::Rng,
    taken: &mut std::collections::HashSet<String>,
    business: &SbBusiness,
    created: DateTime<Utc>,
    sequence: u64,
    shape: Shape,
) -> SbLead {
    let id = fresh_id(rng, 5, taken);
    SbLead {
        json: render(&lead_value(
            rng,
            &id,
            &business.id,
            &business.name,
            created,
            sequence,
            shape,
        )),
        id,
    }
}

fn lead_value(
    rng: &mut fastrand::Rng,
    id: &str,
    business_id: &str,
    business_name: &str,
    created: DateTime<Utc>,
    sequence: u64,
    shape: Shape,
) -> Value {
    let (city, state, zip) = PLACES[rng.usize(0..PLACES.len())];
    let details: Vec<Value> = (0..rng.usize(1..4))
        .map(|i| {
            let question = ["Project scope", "When do you need this?", "Anything else?"][i];
            json!({
                "question": question,
                "answer": ANSWERS[rng.usize(0..ANSWERS.len())],
            })
        })
        .collect();
    let (first, last) = CUSTOMERS[rng.usize(0..CUSTOMERS.len())];
    let category = json!({
        "categoryID": (201_565_295_100_608_806u64 + rng.u64(0..1000)).to_string(),
        "name": CATEGORIES[rng.usize(0..CATEGORIES.len())],
    });
    let customer_id = (519_153_480_034_934_784u64 + rng.u64(0..1_000_000)).to_string();
    let description = format!(
        "Request #{sequence}: {}",
        ANSWERS[rng.usize(0..ANSWERS.len())]
    );
    // Unknown to leadsync: must survive byte for byte, 64-bit integers included.
    let extension = json!({
        "bigNumber": 9_007_199_254_740_993u64 + sequence,
        "nested": {"deep": [1, {"k": "v"}, null], "flag": true, "ratio": 0.125},
    });
    let mut v = if shape.schema_for(sequence) {
        // Real deliveries: `createdAt`, sometimes with an offset other than Z.
        let created_text = match chrono::FixedOffset::west_opt(5 * 3600) {
            Some(offset) if sequence % 4 == 1 => created
                .with_timezone(&offset)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            _ => created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let cents = rng.u32(500..6000);
        let status = ["Open", "Canceled", "Picked", "Open"][rng.usize(0..4)];
        let charge_state = ["Created", "Pending", "Charged", "Refunded"][rng.usize(0..4)];
        let title = format!("{} request", category["name"].as_str().unwrap_or("A"));
        json!({
            "negotiationID": id,
            "createdAt": created_text,
            "status": status,
            "request": {
                "requestID": (319_153_480_034_934_784u64 + sequence).to_string(),
                "category": category,
                "title": title,
                "description": description,
                "schedule": {"type": if rng.bool() { "flexible" } else { "specific" }, "dates": []},
                "location": {"address1": format!("{} Main St", rng.u32(1..999)), "address2": null, "city": city, "state": state, "zipCode": zip},
                "details": details,
            },
            "customer": {
                "customerID": customer_id,
                "firstName": first,
                "lastName": last,
                "phone": format!("+1 (555) {:03}-{:04}", rng.u32(100..999), rng.u32(0..10_000)),
            },
            "business": {"businessID": business_id, "name": business_name},
            "leadPrice": format!("${}.{:02}", cents / 100, cents % 100),
            "leadPriceBreakdown": {"subtotal": format!("${}.{:02}", cents / 100, cents % 100), "salesTax": "$0.00"},
            "chargeState": charge_state,
            "sandboxExtension": extension,
        })
    } else {
        let display = if last.is_empty() {
            first.to_string()
        } else {
            format!("{first} {last}")
        };
        json!({
            "negotiationID": id,
            "status": LEAD_STATUSES[rng.usize(0..LEAD_STATUSES.len())],
            "category": category,
            "customer": {
                "customerID": customer_id,
                "displayName": display,
                "location": {"city": city, "state": state, "zipCode": zip},
            },
            "business": {"businessID": business_id, "name": business_name},
            "details": details,
            "createTime": created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "sandboxExtension": extension,
        })
    };
    if rng.u8(0..3) == 0 {
        v["estimate"] = json!({"total": format!("${}.00", rng.u32(100..5000)), "unit": "fixed"});
    }
    v
}

/// Serialises a lead the way the sandbox serves it.
pub fn render(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

/// One message of a lead's conversation, kept as the exact JSON the API serves.
#[derive(Debug, Clone)]
pub struct SbMessage {
    pub id: String,
    pub sent_at: DateTime<Utc>,
    /// `Customer` or `Business`.
    pub from: String,
    pub text: String,
    pub json: String,
}

/// How many messages a lead's seeded conversation has: `long` for the
/// designated long conversation, else 0–3 by the lead id.
pub fn seeded_message_count(seed: u64, negotiation_id: &str, long: bool) -> usize {
    if long {
        return LONG_CONVERSATION;
    }
    (xxhash_rust::xxh3::xxh3_64_with_seed(negotiation_id.as_bytes(), seed) % 4) as usize
}

/// The length of the one long conversation each business has (its newest
/// lead at generation): more than two pages of the largest `limit` (20).
pub const LONG_CONVERSATION: usize = 45;

const CUSTOMER_LINES: &[&str] = &[
    "Hi! Are you available next week?",
    "Can you give me a rough estimate?",
    "Thanks — that works for me 👍",
    "Could you come on Saturday morning instead?",
    "Here's the address: 12 Rue de l'Église, apt \"B\"",
];
const BUSINESS_LINES: &[&str] = &[
    "Hello! Yes, we have openings on Tuesday and Thursday.",
    "Roughly $350–$500 depending on materials.",
    "Great, see you then.",
    "Saturday at 9:00 works. Naïve question: is there parking?",
];

/// A lead's seeded conversation, oldest first: deterministic from the seed
/// and the lead, one message every 13 minutes after the lead was created.
pub fn seeded_messages(
    seed: u64,
    business_id: &str,
    business_name: &str,
    lead_json: &str,
    negotiation_id: &str,
    count: usize,
) -> Vec<SbMessage> {
    let lead: Value = serde_json::from_str(lead_json).unwrap_or(Value::Null);
    let created = ["createTime", "createdAt"]
        .iter()
        .find_map(|k| lead[*k].as_str())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(epoch);
    let mut rng = fastrand::Rng::with_seed(xxhash_rust::xxh3::xxh3_64_with_seed(
        negotiation_id.as_bytes(),
        seed ^ 0x6d65_7373,
    ));
    (0..count)
        .map(|k| {
            let from = if k % 3 == 2 { "Business" } else { "Customer" };
            let lines = if from == "Business" {
                BUSINESS_LINES
            } else {
                CUSTOMER_LINES
            };
            let text = format!("{} (#{})", lines[rng.usize(0..lines.len())], k + 1);
            // 6 then 18 digits: never a lead's or a business's id.
            let id = (600_000_000_000_000_000u64 + rng.u64(0..100_000_000_000_000_000)).to_string();
            message(
                &id,
                negotiation_id,
                business_id,
                business_name,
                &lead,
                from,
                &text,
                created + Duration::minutes(13 * (k as i64 + 1)),
            )
        })
        .collect()
}

/// A `MessageV4` as the API serves it.
#[allow(clippy::too_many_arguments)]
pub fn message(
    id: &str,
    negotiation_id: &str,
    business_id: &str,
    business_name: &str,
    lead: &Value,
    from: &str,
    text: &str,
    sent_at: DateTime<Utc>,
) -> SbMessage {
    let mut v = json!({
        "messageID": id,
        "negotiationID": negotiation_id,
        "from": from,
        "text": text,
        "attachments": [],
        "sentAt": sent_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    });
    if from == "Business" {
        v["business"] = json!({"businessID": business_id, "displayName": business_name});
    } else {
        let customer = &lead["customer"];
        v["customer"] = json!({
            "customerID": customer["customerID"],
            "displayName": customer["displayName"].as_str().unwrap_or("Customer"),
        });
    }
    SbMessage {
        id: id.to_string(),
        sent_at,
        from: from.to_string(),
        text: text.to_string(),
        json: render(&v),
    }
}
