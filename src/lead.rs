//! A lead as the mirror stores it: plain data. The wire module
//! (`thumbtack::model`) builds it from whichever shape Thumbtack sent; the
//! store (`store::mirror`) writes it. Neither knows the other, so every shape
//! decision lives in `src/thumbtack/` and every SQL statement in `src/store/`.

/// One negotiation, ready for the mirror (a polled lead or a webhook's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeadRow {
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
    pub customer_phone: Option<String>,
    /// The price exactly as sent (`"$25.00"`): text, never a float.
    pub lead_price: Option<String>,
    pub charge_state: Option<String>,
}

impl LeadRow {
    /// The convenience columns by name, with their values (for `probe`).
    pub fn columns(&self) -> [(&'static str, Option<&str>); 9] {
        [
            ("status", self.status.as_deref()),
            ("created_at", self.created_at.as_deref()),
            ("category", self.category.as_deref()),
            ("customer_name", self.customer_name.as_deref()),
            ("city", self.city.as_deref()),
            ("zip", self.zip.as_deref()),
            ("customer_phone", self.customer_phone.as_deref()),
            ("lead_price", self.lead_price.as_deref()),
            ("charge_state", self.charge_state.as_deref()),
        ]
    }
}
