//! The built-in simulated Thumbtack API (SPEC §6): the one fake used by the
//! tests, the demo and the benchmarks. It serves SPEC §5 on loopback from
//! seeded data, with single-use rotating refresh tokens, short-lived access
//! tokens, a job-status endpoint that records every accepted delivery, and
//! knobs for latency, faults and lead mutations.

pub mod data;
mod server;
pub mod webhooks;

use anyhow::{Context, Result};
pub use data::Shape;
use data::{SbBusiness, SbLead, SbMessage};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a sandbox starts.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub listen: SocketAddr,
    pub seed: u64,
    pub businesses: usize,
    pub leads_per_business: usize,
    /// The largest `limit` a listing honours (larger ones are clamped).
    pub max_page_size: usize,
    /// Lifetime of issued access tokens.
    pub access_token_ttl_secs: u64,
    pub client_id: String,
    pub client_secret: String,
    /// How listings are paged (default `next`, the documented v4 style).
    pub pagination: Pagination,
    /// Which published shape leads follow (default `mixed`).
    pub shape: Shape,
    pub faults: Faults,
    /// Webhook deliveries sent at once.
    pub webhook_concurrency: usize,
}

/// How the sandbox pages a listing (SPEC §5, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pagination {
    /// `{"limit", "offset", "next": "http://HOST/v4/...?limit=N&offset=K"}`:
    /// the documented v4 style (note the path without `/api`).
    #[default]
    Next,
    /// `{"limit", "nextPageToken"}`, read back from `pageToken`.
    Token,
    /// `{"limit", "offset"}` and nothing else: pages run while they are full.
    Offset,
    /// `{"limit"}` only: a client cannot know where the listing ends.
    None,
    /// `{"limit", "next": "http://HOST/v4/...?limit=N&pageToken=T"}`: a
    /// `next` URL whose query carries an opaque token, not an offset.
    #[serde(rename = "next-token")]
    NextToken,
    /// The page's leads as a bare JSON array, no envelope, no markers
    /// (SPEC §5: one last page; a full one is an unknown end).
    Bare,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 42,
            businesses: 3,
            leads_per_business: 60,
            max_page_size: 100,
            access_token_ttl_secs: 3600,
            client_id: "sandbox-client".into(),
            client_secret: "sandbox-secret".into(),
            pagination: Pagination::default(),
            shape: Shape::default(),
            faults: Faults::default(),
            webhook_concurrency: 16,
        }
    }
}

/// Fault knobs for the API routes (listing, get, job status). Rates are
/// probabilities per request; faults strike before a request is processed,
/// so a faulted job status is never recorded as delivered — except
/// `lose_after_accept` and `cut_body_after_accept`, which strike after.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every API response.
    pub latency_ms: u64,
    /// 500/502/503, half of them HTML pages.
    pub error_5xx: f64,
    /// 429 with `Retry-After`, alternately in seconds and as an HTTP date.
    pub rate_429: f64,
    pub retry_after_secs: u64,
    /// 202: Thumbtack's WAF challenge.
    pub waf_202: f64,
    /// Hang for `timeout_ms` (beyond the client's timeout) before answering 504.
    pub timeout: f64,
    pub timeout_ms: u64,
    /// Close the connection without an answer.
    pub reset: f64,
    /// A broken body: truncated JSON with 200 on reads, garbage with 500 on writes.
    pub malformed: f64,
    /// Job status and replies: the POST is accepted (recorded as delivered),
    /// then the connection is closed without an answer: the response is lost.
    pub lose_after_accept: f64,
    /// Job status and replies: the POST is accepted (recorded as delivered)
    /// and its 2xx status and headers are sent, then the connection is
    /// closed before the body its `Content-Length` announced.
    pub cut_body_after_accept: f64,
    /// A 301 to another place (a moved or mistyped `api.base_url`).
    pub redirect: f64,
    /// A 404 HTML page, as a proxy in front of the API sends.
    pub html_404: f64,
    /// `GET /api/v4/businesses`: list at most this many businesses a page
    /// (from `?offset=`, `pagination: {limit}` as Thumbtack answers, no
    /// `next`); 0: Thumbtack's 20.
    pub business_page_size: usize,
    /// `GET /api/v4/businesses`: answer this many requests `503` (no
    /// `Retry-After`) before serving again (a passing outage).
    pub business_fail_first: u32,
    /// `GET /api/v4/businesses`: the `business_fail_first` answers are
    /// `429` with `Retry-After:` this many seconds instead of `503`.
    pub business_fail_retry_after: Option<u64>,
    /// `GET /api/v4/businesses`: answer `503` to every page asked with an
    /// `offset` past 0 (a later page failing).
    pub business_offset_503: bool,
    /// Webhooks: send every delivery twice.
    pub webhook_twice: bool,
    /// Webhooks: send each batch of deliveries in reverse order.
    pub webhook_out_of_order: bool,
    /// Webhooks: list at most this many subscriptions a page, the next page
    /// named in `pagination.next` as other v4 lists do (0: all on one page).
    pub webhook_page_size: usize,
    /// Webhooks (with `webhook_page_size`): name a `pagination.next` on
    /// every page, the last one and the empty one past it too (some v4
    /// lists always do).
    pub webhook_always_next: bool,
    /// Webhooks (with `webhook_page_size`): `pagination.next` of a page
    /// asked with `offset` names that page again (a server whose
    /// pagination does not advance).
    pub webhook_next_same: bool,
    /// Webhooks (with `webhook_page_size`): serve from the first webhook
    /// whatever `offset` asks, `next` still advancing (a server that does
    /// not know the parameter).
    pub webhook_ignore_offset: bool,
    /// Webhooks: answer every page empty with a new `nextPageToken` (a
    /// listing that never ends).
    pub webhook_endless_token: bool,
    /// Webhooks: answer `400` to a page asked with `offset` (a later page
    /// failing).
    pub webhook_reject_offset: bool,
    /// Webhooks (with `webhook_page_size`): leave disabled subscriptions
    /// out of a page after cutting it, `limit` and `next` unchanged (a
    /// server filtering after paging serves pages shorter than their limit
    /// before the last).
    pub webhook_hide_disabled: bool,
    /// Messages: list the newest messages whatever `sentBefore` asks (a
    /// server that does not know the parameter).
    pub ignore_sent_before: bool,
    /// Messages: list the default 10 whatever `limit` asks, and answer no
    /// `pagination` (a server that does not know the parameter and says
    /// nothing of its page size).
    pub ignore_message_limit: bool,
    /// Messages: answer every list of messages 503 with an HTML page (an
    /// outage of that route alone; the listing is served).
    pub messages_503: bool,
    /// Messages: how every `GET` of a lead's messages is answered (the
    /// listing and the replies' `POST` are served as ever).
    pub messages_get: MessagesGetFault,
    /// Messages: serve at most this many messages a page whatever `limit`
    /// asks, and answer no `pagination` (0: off).
    pub message_page_size: usize,
    /// Listing: `next` URLs (styles `next`, `next-token`) name this host
    /// (`host` or `host:port`) instead of the sandbox's own: a response that
    /// is not what the client thinks it is, never to be followed.
    pub next_host: Option<String>,
    /// Listing: serve from the start whatever `offset` asks (a server that
    /// does not know the parameter; `pageToken` is still honoured).
    pub ignore_offset: bool,
    /// Listing: answer `400` (ProblemDetails) to a request that carries
    /// `offset` (a strict server that does not know the parameter).
    pub reject_offset: bool,
    /// Listing: answer `503` (an HTML gateway page) to a request that
    /// carries `offset` (an outage that strikes past the first page).
    pub offset_503: bool,
    /// Listing (and the business list): read `offset` as a page number
    /// (`offset × limit` entries skipped), as a server paging by page might.
    pub offset_as_page: bool,
    /// Listing: answer `400` (ProblemDetails) to an `offset` that is not a
    /// multiple of the page's `limit` (a server paging by page that checks
    /// page boundaries): the lead asked back to prove a full page is refused.
    pub reject_unaligned_offset: bool,
    /// Listing: leave `limit` out of `pagination` (envelope styles), so a
    /// page clamped to `max_page_size` does not say it is.
    pub no_limit_echo: bool,
    /// Listing: hold each answer this long after it was made (the page
    /// reflects the moment it was made, not the moment it arrives).
    pub list_hold_ms: u64,
    /// When not 0: answer every API request 200 with a body of this many
    /// bytes (spaces, `Content-Length` set), larger than any page, as a
    /// broken proxy or a hostile server might.
    pub oversized_body_bytes: u64,
    /// The next API requests (any route), one each in order, answered with
    /// these faults whatever the rates say (`served`: answered as ever),
    /// each entry consumed by the request it strikes: a test that must see
    /// every kind strike, at a place of its choosing, instead of hoping the
    /// dice do. Not consumed while `oversized_body_bytes` is set (that
    /// answers first), nor by a `GET .../messages` while `messages_get` is
    /// not `served` (that answers it); the token endpoint and the control
    /// routes never consume it. With concurrent requests, which one takes
    /// which entry is the order they reach the sandbox: arbitrary. Its
    /// entries take their values from the other fields: `timeout` hangs
    /// for `timeout_ms` (1 ms when 0, the default: a 504 at once), `rate429`
    /// sends `Retry-After: retry_after_secs` (`0` by default: retry now).
    pub script: std::collections::VecDeque<ScriptedFault>,
}

/// One entry of [`Faults::script`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptedFault {
    /// No fault: the request is answered as ever.
    Served,
    /// The connection closed without an answer.
    Reset,
    /// Hang for `timeout_ms` (at least 1 ms), then 504.
    Timeout,
    /// A 503 HTML gateway page.
    Html503,
    /// A 500 ProblemDetails.
    Problem500,
    /// A 429 ProblemDetails with `Retry-After: retry_after_secs` (seconds,
    /// `0` unless set).
    Rate429,
    /// A 429 with `Retry-After` as an HTTP date `retry_after_secs` + 1
    /// seconds ahead (rounded up to whole seconds).
    Rate429Date,
    /// A 202 WAF challenge page.
    Waf202,
    /// A broken body (truncated JSON with 200 on reads, garbage with 500 on writes).
    Malformed,
    /// A 301 elsewhere.
    Redirect,
    /// A proxy's HTML 404.
    Html404,
}

/// How the sandbox answers a `GET` of a lead's messages ([`Faults::messages_get`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MessagesGetFault {
    /// As Thumbtack would.
    #[default]
    Served,
    /// 500 with a ProblemDetails body.
    Error500,
    /// 401 for a token without `supply::messages.read` (a token that may
    /// still post replies).
    MissingScope401,
    /// 200 with an HTML page, as a proxy in front of the API sends.
    Html200,
    /// Hang for `timeout_ms` (beyond the client's timeout), then 504.
    Hang,
}

/// Token-endpoint faults and behaviour (SPEC §6).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TokenFaults {
    /// Answer every token request `401 invalid_client`.
    pub invalid_client: bool,
    /// Answer every token request `502 proxy_oauth_failed` (a wrong audience).
    pub proxy_oauth_failed: bool,
    /// Answer every token request `400` with this OAuth `error` code
    /// (`unauthorized_client`, `invalid_request`, `invalid_scope`, or any
    /// other), before the grant is looked at (nothing rotated).
    pub client_error: Option<String>,
    /// Answer the next token requests, one each, with these HTTP statuses
    /// before anything is looked at (nothing rotated): a 5xx as an HTML
    /// gateway page, a 3xx (with a `Location` elsewhere) or `404` as a
    /// proxy's HTML page, `429` with `Retry-After: 1`, `408`, any other
    /// status as an empty body; `0` closes the connection unanswered (a
    /// network error).
    pub before_rotate: Vec<u16>,
    /// Hold a successful refresh's answer this long after the token was
    /// already rotated (a client that gives up meanwhile loses the new token).
    pub hold_after_rotate_ms: u64,
    /// Drop the connection instead of answering, after rotating, for this
    /// many successful refreshes (the answer is lost).
    pub lose_after_rotate: u32,
    /// Cut the answer's body short (a broken proxy), after rotating, for
    /// this many successful refreshes: the body still carries the new tokens.
    pub truncate_after_rotate: u32,
    /// Pad the answer with 2 MiB of whitespace (still valid JSON, the new
    /// tokens in it), after rotating, for this many successful refreshes:
    /// more than a client reads of a token response.
    pub oversized_after_rotate: u32,
    /// Answer this many token requests `400 invalid_grant` padded with
    /// 2 MiB of whitespace (still valid JSON), before the token is looked
    /// at (nothing rotated): an error answer larger than a client reads,
    /// as a proxy's page might be.
    pub oversized_refusal: u32,
    /// How long a used refresh token may be presented again and get the
    /// same answer (Thumbtack's grace period for retrying the same request),
    /// as long as the token it was rotated to is still unused. 0 (the
    /// default): any reuse is refused, the strictest server.
    pub grace_secs: u64,
    /// Answer every API request `401 required scope(s) [...] not found`
    /// (a grant without the needed scope), whatever the token.
    pub missing_scope: bool,
    /// Answer `500` instead of the tokens, after rotating, for this many
    /// successful refreshes (a gateway failing after the server processed it).
    pub error_5xx_after_rotate: u32,
    /// The `expires_in` of successful answers, verbatim (any JSON), instead
    /// of the access token's lifetime.
    pub expires_in: Option<serde_json::Value>,
    /// Answer this many successful refreshes without a `refresh_token` and
    /// without rotating: the presented token stays valid (RFC 6749 §6).
    pub keep_refresh_token: u32,
    /// Quote the presented refresh token in `invalid_grant` descriptions
    /// (servers that do must not get it into logs or the mirror).
    pub echo_token_in_errors: bool,
    /// Answer this many successful refreshes with the rotated refresh token
    /// but an empty `access_token` (a broken token service).
    pub no_access_token_after_rotate: u32,
    /// Answer this many successful refreshes with the access token followed
    /// by a newline (a token service that pads its values).
    pub padded_access_token_after_rotate: u32,
    /// Answer `429` to this many requests presenting a refresh token
    /// already used (a gateway rate-limiting the retry of a lost answer),
    /// before the grace period is looked at.
    pub throttle_reused: u32,
}

/// A job status the sandbox accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Delivery {
    /// Order of acceptance, from 1.
    pub seq: u64,
    pub negotiation_id: String,
    pub business_id: String,
    pub status: String,
    /// Exactly as received.
    pub partner_status_changed_at: String,
    pub invoice_amount_in_cents: Option<i64>,
    pub received_at: String,
    pub user_agent: Option<String>,
}

/// A reply (`POST /negotiations/{id}/messages`) the sandbox accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// Order of acceptance, from 1.
    pub seq: u64,
    pub negotiation_id: String,
    pub business_id: String,
    /// The id the response gave it.
    pub message_id: String,
    /// Exactly as received.
    pub text: String,
    pub received_at: String,
    pub user_agent: Option<String>,
}

/// Lead mutations, to make the mirror notice changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mutation {
    /// New leads at the head of a business's listing.
    AddLeads { business_id: String, count: usize },
    /// A lead's `status` changes.
    SetStatus {
        negotiation_id: String,
        status: String,
    },
    /// A nested field changes (only a full scan finds it on an old lead).
    DeepChange { negotiation_id: String },
    /// A JSON merge patch (RFC 7386: `null` removes a member) applied to a
    /// lead as served: any field, any shape, both shapes at once.
    Patch {
        negotiation_id: String,
        patch: serde_json::Value,
    },
    /// The lead disappears from listings (and `GET` answers 404).
    Remove { negotiation_id: String },
    /// A removed lead comes back where it was.
    Restore { negotiation_id: String },
    /// A message on a lead (from the customer unless `from` says `Business`).
    AddMessage {
        negotiation_id: String,
        text: String,
        #[serde(default)]
        from: Option<String>,
    },
    /// New customer messages at the end of a lead's conversation.
    AddMessages {
        negotiation_id: String,
        count: usize,
    },
    /// Customer messages sent at the given instants (RFC 3339), each placed
    /// in time order: several may share one `sentAt`, as messages sent
    /// within one second (or one millisecond) do.
    AddMessagesAt {
        negotiation_id: String,
        sent_at: Vec<String>,
    },
    /// A server bug: a customer message listed in `negotiation_id`'s
    /// conversation that names `names` as its negotiation, sent at `sent_at`
    /// (RFC 3339; now when absent). Not delivered to webhooks.
    AddStrayMessage {
        negotiation_id: String,
        names: String,
        #[serde(default)]
        sent_at: Option<String>,
    },
}

/// Request counts, per route and per business.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    /// e.g. `list 468046965846925323`, `job-status`, `token refresh_token`.
    pub by_route: BTreeMap<String, u64>,
    /// Refresh tokens presented a second time and refused (outside the grace period).
    pub reused_refresh_tokens: u64,
    /// Refresh tokens presented again within the grace period (same answer).
    pub grace_replays: u64,
    /// Successful refreshes (rotations).
    pub rotations: u64,
    pub faults_injected: u64,
    /// Listing answers made and held back by `list_hold_ms`.
    pub lists_held: u64,
    /// Requests that lacked a header SPEC §5 names, by route and header
    /// (e.g. `list 4680…: accept`): `accept: application/json` and a
    /// non-empty `user-agent` on every request, `authorization: Bearer` on
    /// API requests (the token endpoint's Basic is checked where it is read).
    pub missing_headers: BTreeMap<String, u64>,
    /// Every `user-agent` seen (API and token endpoint).
    pub user_agents: std::collections::BTreeSet<String>,
}

struct RefreshEntry {
    /// The businesses the grant covers (one pro's account).
    businesses: Vec<String>,
    /// When it was first used, and the answer it got (replayed within the grace period).
    used: Option<(Instant, serde_json::Value, String)>,
}

pub(crate) struct State {
    rng: fastrand::Rng,
    businesses: Vec<SbBusiness>,
    removed: HashMap<String, (usize, usize, SbLead)>,
    taken_ids: HashSet<String>,
    refresh_tokens: HashMap<String, RefreshEntry>,
    access_tokens: HashMap<String, (Vec<String>, Instant)>,
    static_tokens: HashMap<String, String>,
    auth_codes: HashMap<String, Vec<String>>,
    token_faults: TokenFaults,
    /// Set by [`Sandbox::hold_refresh_answers`]: successful refreshes
    /// answer once it is cancelled.
    refresh_gate: Option<CancellationToken>,
    /// Set by [`Sandbox::hold_code_answers`]: successful code exchanges
    /// answer once it is cancelled.
    code_gate: Option<CancellationToken>,
    deliveries: Vec<Delivery>,
    /// Each lead's conversation, oldest first, generated on first use so a
    /// large sandbox does not pay for conversations nobody reads.
    conversations: HashMap<String, Vec<SbMessage>>,
    /// The lead of each business whose conversation is long (three pages).
    long_conversations: HashSet<String>,
    replies: Vec<Reply>,
    refuse: HashSet<String>,
    faults: Faults,
    stats: Stats,
    sequence: u64,
    options: SandboxOptions,
    webhooks: Vec<webhooks::Subscription>,
    webhook_log: Vec<webhooks::DeliveryLog>,
    webhook_tx: Option<tokio::sync::mpsc::UnboundedSender<webhooks::Job>>,
}

impl State {
    fn token(&mut self, prefix: &str) -> String {
        format!("{prefix}{:016x}{:016x}", self.rng.u64(..), self.rng.u64(..))
    }

    fn business(&self, id: &str) -> Option<&SbBusiness> {
        self.businesses.iter().find(|b| b.id == id)
    }

    fn find_lead(&self, negotiation_id: &str) -> Option<(usize, usize)> {
        self.businesses.iter().enumerate().find_map(|(bi, b)| {
            b.leads
                .iter()
                .position(|l| l.id == negotiation_id)
                .map(|li| (bi, li))
        })
    }

    /// A lead's conversation (generated from the seed on first use);
    /// `None` when the lead is not listed.
    fn conversation(&mut self, negotiation_id: &str) -> Option<&mut Vec<SbMessage>> {
        if !self.conversations.contains_key(negotiation_id) {
            let (bi, li) = self.find_lead(negotiation_id)?;
            let b = &self.businesses[bi];
            let long = self.long_conversations.contains(negotiation_id);
            let count = data::seeded_message_count(self.options.seed, negotiation_id, long);
            let messages = data::seeded_messages(
                self.options.seed,
                &b.id,
                &b.name,
                &b.leads[li].json,
                negotiation_id,
                count,
            );
            self.conversations
                .insert(negotiation_id.to_string(), messages);
        } else {
            self.find_lead(negotiation_id)?;
        }
        self.conversations.get_mut(negotiation_id)
    }

    /// See [`Mutation::AddStrayMessage`].
    fn append_stray_message(
        &mut self,
        negotiation_id: &str,
        names: &str,
        sent_at: chrono::DateTime<chrono::Utc>,
    ) -> Option<SbMessage> {
        let (bi, li) = self.find_lead(negotiation_id)?;
        let (business_id, business_name) = (
            self.businesses[bi].id.clone(),
            self.businesses[bi].name.clone(),
        );
        let lead: serde_json::Value =
            serde_json::from_str(&self.businesses[bi].leads[li].json).unwrap_or_default();
        let id =
            (600_000_000_000_000_000u64 + self.rng.u64(0..100_000_000_000_000_000)).to_string();
        let m = data::message(
            &id,
            names,
            &business_id,
            &business_name,
            &lead,
            "Customer",
            "a stray message",
            sent_at,
        );
        // In time order, like every message (listing newest first relies
        // on it), after the messages sent at the same instant.
        let conversation = self.conversation(negotiation_id)?;
        let position = conversation.partition_point(|c| c.sent_at <= sent_at);
        conversation.insert(position, m.clone());
        Some(m)
    }

    /// Appends a message sent now (strictly after the conversation's last,
    /// so that paging by time never sees two at the same instant).
    fn append_message(
        &mut self,
        negotiation_id: &str,
        from: &str,
        text: &str,
    ) -> Option<SbMessage> {
        self.append_message_at(negotiation_id, from, text, None)
    }

    /// [`Self::append_message`], sent at `at` when given: placed in time
    /// order (after the messages sent at that same instant), so it may be
    /// earlier than messages already listed (one delivered late).
    fn append_message_at(
        &mut self,
        negotiation_id: &str,
        from: &str,
        text: &str,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Option<SbMessage> {
        let (bi, li) = self.find_lead(negotiation_id)?;
        let (business_id, business_name) = (
            self.businesses[bi].id.clone(),
            self.businesses[bi].name.clone(),
        );
        let lead: serde_json::Value =
            serde_json::from_str(&self.businesses[bi].leads[li].json).unwrap_or_default();
        let id =
            (600_000_000_000_000_000u64 + self.rng.u64(0..100_000_000_000_000_000)).to_string();
        let conversation = self.conversation(negotiation_id)?;
        let mut sent_at = at.unwrap_or_else(chrono::Utc::now);
        if at.is_none()
            && let Some(last) = conversation.last()
            && sent_at <= last.sent_at
        {
            sent_at = last.sent_at + chrono::Duration::milliseconds(1);
        }
        // In time order, after the messages sent at the same instant.
        let position = conversation.partition_point(|m| m.sent_at <= sent_at);
        let m = data::message(
            &id,
            negotiation_id,
            &business_id,
            &business_name,
            &lead,
            from,
            text,
            sent_at,
        );
        conversation.insert(position, m.clone());
        // Every new message, a reply included, goes to the registered webhooks.
        webhooks::enqueue(
            self,
            &business_id,
            "MessageCreatedV4",
            &[(
                Some(negotiation_id.to_string()),
                Some(m.id.clone()),
                m.json.clone(),
            )],
        );
        Some(m)
    }

    fn count(&mut self, route: String) {
        self.stats.requests += 1;
        *self.stats.by_route.entry(route).or_default() += 1;
    }
}

/// A running sandbox. Dropping it stops the server.
pub struct Sandbox {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A business as the sandbox has it.
#[derive(Debug, Clone, Serialize)]
pub struct BusinessInfo {
    pub id: String,
    pub name: String,
    pub leads: usize,
}

impl Sandbox {
    /// Generates the data and starts serving.
    pub async fn start(options: SandboxOptions) -> Result<Sandbox> {
        let (businesses, taken_ids) = data::generate(
            options.seed,
            options.businesses,
            options.leads_per_business,
            options.shape,
        );
        let sequence = (options.businesses * options.leads_per_business) as u64;
        let mut state = State {
            rng: fastrand::Rng::with_seed(options.seed ^ 0x005e_ed0f_7e57),
            businesses,
            removed: HashMap::new(),
            taken_ids,
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            static_tokens: HashMap::new(),
            auth_codes: HashMap::new(),
            token_faults: TokenFaults::default(),
            refresh_gate: None,
            code_gate: None,
            deliveries: Vec::new(),
            conversations: HashMap::new(),
            long_conversations: HashSet::new(),
            replies: Vec::new(),
            refuse: HashSet::new(),
            faults: options.faults.clone(),
            stats: Stats::default(),
            sequence,
            options: options.clone(),
            webhooks: Vec::new(),
            webhook_log: Vec::new(),
            webhook_tx: None,
        };
        let (webhook_tx, webhook_rx) = tokio::sync::mpsc::unbounded_channel();
        state.webhook_tx = Some(webhook_tx);
        state.long_conversations = state
            .businesses
            .iter()
            .filter_map(|b| b.leads.first().map(|l| l.id.clone()))
            .collect();
        // Static tokens are derived from the seed so a fixture written once keeps working.
        for b in state.businesses.clone() {
            let token = format!("sbx_static_{}_{:x}", b.id, options.seed);
            state.static_tokens.insert(token, b.id.clone());
        }
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("sandbox cannot listen on {}", options.listen))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(state));
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(listener, state.clone(), stop.clone()));
        tokio::spawn(webhooks::run(
            state.clone(),
            webhook_rx,
            options.webhook_concurrency,
            stop.clone(),
        ));
        Ok(Sandbox {
            addr,
            state,
            stop,
            task: Some(task),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `api.base_url` for this sandbox.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `oauth.token_url` for this sandbox.
    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    /// The OAuth client id and secret the token endpoint accepts.
    pub fn client_credentials(&self) -> (String, String) {
        let s = self.lock();
        (s.options.client_id.clone(), s.options.client_secret.clone())
    }

    /// The generated businesses.
    pub fn businesses(&self) -> Vec<BusinessInfo> {
        self.lock()
            .businesses
            .iter()
            .map(|b| BusinessInfo {
                id: b.id.clone(),
                name: b.name.clone(),
                leads: b.leads.len(),
            })
            .collect()
    }

    /// A business's lead ids, newest first.
    pub fn lead_ids(&self, business_id: &str) -> Vec<String> {
        self.lock()
            .business(business_id)
            .map(|b| b.leads.iter().map(|l| l.id.clone()).collect())
            .unwrap_or_default()
    }

    /// A lead's JSON exactly as served.
    pub fn lead_json(&self, negotiation_id: &str) -> Option<String> {
        let s = self.lock();
        let (bi, li) = s.find_lead(negotiation_id)?;
        Some(s.businesses[bi].leads[li].json.clone())
    }

    /// A static bearer token for the business (never expires).
    pub fn static_token(&self, business_id: &str) -> Option<String> {
        self.lock()
            .static_tokens
            .iter()
            .find(|(_, b)| *b == business_id)
            .map(|(t, _)| t.clone())
    }

    /// A fresh refresh token for the business (an initial grant).
    pub fn mint_refresh_token(&self, business_id: &str) -> String {
        self.mint_grant(&[business_id])
    }

    /// A fresh refresh token for a grant covering several businesses (one
    /// pro's account).
    pub fn mint_grant(&self, business_ids: &[&str]) -> String {
        let mut s = self.lock();
        let t = s.token("sbx_rt_");
        s.refresh_tokens.insert(
            t.clone(),
            RefreshEntry {
                businesses: business_ids.iter().map(|b| b.to_string()).collect(),
                used: None,
            },
        );
        t
    }

    /// A single-use authorization code for the business.
    pub fn mint_auth_code(&self, business_id: &str) -> String {
        self.mint_grant_code(&[business_id])
    }

    /// A single-use authorization code for a grant covering several businesses.
    pub fn mint_grant_code(&self, business_ids: &[&str]) -> String {
        let mut s = self.lock();
        let c = s.token("sbx_code_");
        s.auth_codes.insert(
            c.clone(),
            business_ids.iter().map(|b| b.to_string()).collect(),
        );
        c
    }

    /// Replaces the token-endpoint faults.
    pub fn set_token_faults(&self, faults: TokenFaults) {
        self.lock().token_faults = faults;
    }

    /// Holds the answer of every successful refresh from now on, after the
    /// token was rotated (a client that gives up meanwhile loses the new
    /// token), until the returned token is cancelled: a test releases it
    /// when what it wants to happen meanwhile has happened, instead of
    /// guessing how long that takes.
    pub fn hold_refresh_answers(&self) -> CancellationToken {
        let gate = CancellationToken::new();
        self.lock().refresh_gate = Some(gate.clone());
        gate
    }

    /// Holds the answer of every successful authorization-code exchange
    /// from now on, after the code was spent (the window in which a client
    /// may lose the grant), until the returned token is cancelled.
    pub fn hold_code_answers(&self) -> CancellationToken {
        let gate = CancellationToken::new();
        self.lock().code_gate = Some(gate.clone());
        gate
    }

    /// Every accepted job status, in order of acceptance.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    /// A lead's conversation as served, oldest first (empty for an unknown lead).
    pub fn messages(&self, negotiation_id: &str) -> Vec<SbMessage> {
        self.lock()
            .conversation(negotiation_id)
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// The business's lead with the long seeded conversation
    /// ([`data::LONG_CONVERSATION`] messages): its newest lead at start.
    pub fn long_conversation_lead(&self, business_id: &str) -> Option<String> {
        let s = self.lock();
        s.business(business_id)
            .and_then(|b| {
                b.leads
                    .iter()
                    .find(|l| s.long_conversations.contains(&l.id))
            })
            .map(|l| l.id.clone())
    }

    /// Every accepted reply, in order of acceptance.
    pub fn replies(&self) -> Vec<Reply> {
        self.lock().replies.clone()
    }

    /// Every secret the sandbox knows: issued access and refresh tokens,
    /// static tokens and the client secret (tests search logs for them).
    pub fn issued_secrets(&self) -> Vec<String> {
        let s = self.lock();
        s.access_tokens
            .keys()
            .chain(s.refresh_tokens.keys())
            .chain(s.static_tokens.keys())
            .cloned()
            .chain(std::iter::once(s.options.client_secret.clone()))
            .collect()
    }

    /// Every webhook delivery so far, in order of creation.
    pub fn webhook_deliveries(&self) -> Vec<webhooks::DeliveryLog> {
        self.lock().webhook_log.clone()
    }

    /// Registered webhooks of a business, as the API lists them.
    pub fn webhooks(&self, business_id: &str) -> Vec<serde_json::Value> {
        self.lock()
            .webhooks
            .iter()
            .filter(|w| w.business_id == business_id)
            .map(|w| w.to_json())
            .collect()
    }

    /// Request counts so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// How many listing requests a business has received.
    pub fn list_requests(&self, business_id: &str) -> u64 {
        self.lock()
            .stats
            .by_route
            .get(&format!("list {business_id}"))
            .copied()
            .unwrap_or(0)
    }

    /// The fault knobs now (a script's entries not yet consumed included).
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Replaces the fault knobs.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Changes the largest page a listing returns from now on.
    pub fn set_max_page_size(&self, max_page_size: usize) {
        self.lock().options.max_page_size = max_page_size;
    }

    /// Changes how listings are paged from now on.
    pub fn set_pagination(&self, pagination: Pagination) {
        self.lock().options.pagination = pagination;
    }

    /// Makes the job-status and reply endpoints refuse (400) this lead, and
    /// its message history answer 403 (history is for active leads only).
    pub fn refuse(&self, negotiation_id: &str) {
        self.lock().refuse.insert(negotiation_id.to_string());
    }

    /// Undoes [`Sandbox::refuse`]: the lead is active again.
    pub fn accept(&self, negotiation_id: &str) {
        self.lock().refuse.remove(negotiation_id);
    }

    /// Applies a mutation; returns the ids it created or touched.
    pub fn mutate(&self, m: Mutation) -> Result<Vec<String>> {
        server::mutate(&mut self.lock(), m)
    }

    /// Writes a ready-to-use leadsync configuration for this sandbox into
    /// `dir`: token files, the client secret, and `leadsync.toml`. With
    /// `oauth`, businesses get refresh-token grants; otherwise static tokens.
    pub fn write_fixture(&self, dir: &Path, oauth: bool) -> Result<PathBuf> {
        // Paths in a configuration file are relative to the file: write
        // absolute ones (`--write-config demo` gave `demo/leadsync.db`).
        let dir = &std::path::absolute(dir)?;
        std::fs::create_dir_all(dir.join("tokens"))?;
        // It holds the token store and the grants: the owner's alone, as in production.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let (client_id, client_secret) = self.client_credentials();
        // Every value written as a TOML string by the toml crate (quotes,
        // backslashes, control characters escaped).
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let path = |p: PathBuf| q(&p.to_string_lossy());
        let mut toml = format!(
            "# Written by leadsync's sandbox for {base}\n\
             database = {db}\n\n[api]\nbase_url = {base_q}\nmax_requests_per_second = 50\n\n",
            base = self.base_url(),
            base_q = q(&self.base_url()),
            db = path(dir.join("leadsync.db")),
        );
        // Secrets as they should be: the owner's alone (a looser file is
        // warned about at every start).
        let write_secret = |path: &Path, text: String| -> Result<()> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(path, text)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(())
        };
        if oauth {
            write_secret(&dir.join("client_secret"), format!("{client_secret}\n"))?;
            toml.push_str(&format!(
                "[oauth]\ntoken_url = {}\nclient_id = {}\nclient_secret_file = {}\ntoken_store = {}\n\n",
                q(&self.token_url()),
                q(&client_id),
                path(dir.join("client_secret")),
                path(dir.join("tokens.db"))
            ));
        }
        for b in self.businesses() {
            let file = dir.join("tokens").join(&b.id);
            let (key, token) = if oauth {
                ("refresh_token_file", self.mint_refresh_token(&b.id))
            } else {
                (
                    "access_token_file",
                    self.static_token(&b.id).unwrap_or_default(),
                )
            };
            write_secret(&file, format!("{token}\n"))?;
            toml.push_str(&format!(
                "[[businesses]]\nid = {}\nname = {}\n{key} = {}\n\n",
                q(&b.id),
                q(&b.name),
                path(file)
            ));
        }
        let path = dir.join("leadsync.toml");
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
