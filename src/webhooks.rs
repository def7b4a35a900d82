//! `leadsync webhooks register|list|delete` (SPEC §8): Thumbtack webhook
//! subscriptions of the configured businesses, pointing at
//! `webhooks.public_url` with the receiver's credentials.

use crate::config::{Config, ConfigError, WebhookAuth, check_public_url};
use crate::thumbtack::webhook::{DEFAULT_EVENTS, RegisterAuth, RegisterBody, Subscription};
use crate::thumbtack::{Auth, Client, ClientSettings};
use anyhow::{Result, bail};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Standard output that a dead reader (`| head -1`, a dropped SSH
/// session) cannot stop: `println!` panicked there (EPIPE, EIO) and main's
/// panic hook exited before [`settled`] stored a rotated token. After the
/// first failed write nothing more is written; the work goes on.
#[derive(Default)]
struct Out {
    dead: AtomicBool,
}

impl Out {
    fn line(&self, args: std::fmt::Arguments<'_>) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_fmt(args)
            .and_then(|()| out.write_all(b"\n"))
            .is_err()
        {
            self.dead.store(true, Ordering::Relaxed);
        }
    }

    /// The command's exit code, at least 1 once the output was lost (a
    /// full disk under `> list.json`, a closed pipe): a script must not take
    /// a cut file for the whole answer, and a closed pipe ends with exit 1
    /// as it does for every other command (README, "Exit codes").
    fn exit(&self, code: u8) -> u8 {
        if self.dead.load(Ordering::Relaxed) {
            code.max(1)
        } else {
            code
        }
    }
}

/// `println!` into an [`Out`].
macro_rules! say {
    ($out:expr, $($t:tt)*) => {
        $out.line(format_args!($($t)*))
    };
}

/// A client for commands that run beside the daemon (no process lock),
/// and its token providers (settled at the end, see [`settled`]).
async fn client(config: &Config) -> Result<(Client, Arc<Auth>)> {
    let mirror = {
        let path = config.database().to_path_buf();
        tokio::task::spawn_blocking(move || crate::store::Store::open(&path)).await??
    };
    let needs_reauth = mirror
        .call(|c| crate::store::mirror::needs_reauth_map(c))
        .await?;
    // The token store's grant locks keep this process and the daemon from
    // refreshing one grant at once.
    let auth = Arc::new(crate::app::open_auth(config, Some(mirror), needs_reauth)?);
    Ok((
        Client::new(ClientSettings::from_config(config), auth.clone())?,
        auth,
    ))
}

/// Runs a command's requests until done or SIGTERM/SIGINT, then settles
/// the token providers as `sync` does: a refresh in flight finishes and
/// stores its rotated token, and one still unsaved gets a last write and,
/// failing that, the loud "stops with a rotated refresh token" line.
async fn settled(
    config: &Config,
    auth: &Auth,
    work: impl std::future::Future<Output = Result<u8>>,
) -> Result<u8> {
    let stop = crate::cli::stop_on_signal()?;
    let outcome = tokio::select! {
        r = work => r,
        _ = stop.cancelled() => {
            say!(Out::default(), "stopped by a signal before every request was answered");
            Ok(1)
        }
    };
    auth.settle(crate::cli::settle_bound(config)).await;
    outcome
}

/// The businesses a command acts on: the given ones (each must be
/// configured), else every enabled one.
fn selected(config: &Config, given: &[String]) -> Result<Vec<String>> {
    if given.is_empty() {
        return Ok(config
            .businesses
            .iter()
            .filter(|b| b.enabled)
            .map(|b| b.id.clone())
            .collect());
    }
    for id in given {
        if config.business(id).is_none() {
            bail!("business {id} is not in the configuration");
        }
    }
    Ok(given.to_vec())
}

/// Registers `public_url` for each business unless a subscription already
/// points there; one line per business; exit 1 if any failed.
pub async fn register(config: &Config, businesses: &[String], events: &[String]) -> Result<u8> {
    let Some(w) = &config.webhooks else {
        return Err(ConfigError(
            "[webhooks]: no credentials: set webhooks.username with password_file (or header with \
             header_value_file) so that Thumbtack can authenticate its deliveries"
                .into(),
        )
        .into());
    };
    let Some(public_url) = &w.public_url else {
        return Err(ConfigError(
            "[webhooks]: public_url is not set: the https URL where Thumbtack reaches the receiver"
                .into(),
        )
        .into());
    };
    check_public_url(public_url).map_err(|e| ConfigError(format!("webhooks.public_url: {e}")))?;
    w.require_usable_auth()?;
    if let Some(w) = w.public_path_warning() {
        let _ = writeln!(std::io::stderr(), "warning: {w}");
    }
    let events: Vec<String> = if events.is_empty() {
        DEFAULT_EVENTS.iter().map(|e| e.to_string()).collect()
    } else {
        events
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect()
    };
    if events.is_empty() {
        bail!("--events names no event type (e.g. --events NegotiationCreatedV4,MessageCreatedV4)");
    }
    let auth = match &w.auth {
        WebhookAuth::Basic { username, password } => RegisterAuth::Basic {
            username: username.clone(),
            password: password.expose().to_string(),
        },
        WebhookAuth::Header { name, value } => RegisterAuth::Header {
            header: name.clone(),
            value: value.expose().to_string(),
        },
    };
    let expected_kind = match &auth {
        RegisterAuth::Basic { .. } => "Basic",
        RegisterAuth::Header { .. } => "Header",
    };
    let out = Out::default();
    let ids = selected(config, businesses)?;
    if ids.is_empty() {
        say!(
            out,
            "no enabled business is configured: nothing to register"
        );
        return Ok(out.exit(0));
    }
    let (client, tokens) = client(config).await?;
    settled(config, &tokens, async {
        let mut failed = false;
        for id in ids {
            let existing = match client.list_webhooks(&id).await {
                Ok(list) => list,
                Err(e) => {
                    say!(out, "error {id}: cannot list its webhooks: {}", crate::terminal::blank(&e.to_string()));
                    failed = true;
                    continue;
                }
            };
            // Every webhook at public_url: an install hit by the old
            // text-equality bug may have several, each delivery coming once per
            // webhook (and being refused by one of another auth kind).
            let matches: Vec<&Subscription> = existing
                .iter()
                .filter(|s| same_url(&s.webhook_url, public_url))
                .collect();
            // Its kind of auth, when another than the receiver's: the password
            // itself cannot be read back, but its kind can, and a webhook of
            // another kind has every delivery refused with 401.
            let other_kind = |s: &Subscription| {
                auth_kind(s.auth_type.as_deref()).filter(|kind| *kind != expected_kind)
            };
            let missing = |s: &Subscription| -> Vec<String> {
                events
                    .iter()
                    .filter(|e| !s.event_types.contains(e))
                    .cloned()
                    .collect()
            };
            // The ids are the server's text: shown cleaned, as one word of
            // a line (a line break in one would forge a line of our own).
            let shown_id = |w: &str| crate::terminal::blank(w);
            let delete = |w: &str| {
                format!(
                    "leadsync webhooks delete --business {id} --webhook {}",
                    shown_id(w)
                )
            };
            if matches.len() > 1 {
                // `already registered` (SPEC's line), but none is kept: a
                // password cannot be read back, so the one
                // that looks right may hold an older secret (W1 and W2 under
                // the old one, W1 deleted and W3 registered under the new:
                // keeping W2 and deleting W3 has every delivery refused).
                let described: Vec<String> = matches
                    .iter()
                    .map(|s| {
                        let mut notes = Vec::new();
                        if let Some(kind) = other_kind(s) {
                            notes.push(format!(
                                "authenticates with {kind}, not {expected_kind}: every delivery \
                                 refused"
                            ));
                        }
                        if s.enabled == Some(false) {
                            notes.push("disabled".to_string());
                        }
                        let missing = missing(s);
                        if !missing.is_empty() {
                            notes.push(format!("without {}", missing.join(",")));
                        }
                        if notes.is_empty() {
                            shown_id(&s.webhook_id)
                        } else {
                            format!("{} ({})", shown_id(&s.webhook_id), notes.join(", "))
                        }
                    })
                    .collect();
                // Thumbtack sends an event to every enabled webhook with its
                // type: the most any one event type is sent.
                let times = events
                    .iter()
                    .map(|e| {
                        matches
                            .iter()
                            .filter(|s| s.enabled != Some(false) && s.event_types.contains(e))
                            .count()
                    })
                    .max()
                    .unwrap_or(0);
                let repeats = match times {
                    0 => "none of them is enabled with these event types".to_string(),
                    1 => "one of them delivers each event type".to_string(),
                    n => format!("a delivery is sent up to {n} times"),
                };
                say!(
                    out,
                    "already registered {id} ({} webhooks at {public_url}: {}), none kept: \
                     {repeats}, and any of them may hold an older secret (a password cannot be read back), its \
                     deliveries refused with 401: if you know which one was registered with the \
                     current secret (and it is enabled, of kind {expected_kind}, with every event \
                     type), delete the others; else delete them all ({}) and run leadsync \
                     webhooks register again",
                    matches.len(),
                    described.join(", "),
                    matches
                        .iter()
                        .map(|s| delete(&s.webhook_id))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                failed = true;
                continue;
            }
            if let Some(found) = matches.first() {
                let missing = missing(found);
                let mut note = String::new();
                let other_auth = other_kind(found).map(|kind| {
                    format!(
                        ", but it authenticates with {kind}, not {expected_kind}, so every \
                         delivery is refused: delete it ({}) and register again",
                        delete(&found.webhook_id)
                    )
                });
                if let Some(other) = &other_auth {
                    note.push_str(other);
                    failed = true;
                }
                if found.enabled == Some(false) {
                    note.push_str(", but it is disabled");
                }
                if !missing.is_empty() && other_auth.is_none() {
                    note.push_str(&format!(
                        ", without {}: delete it ({}) and register again",
                        missing.join(","),
                        delete(&found.webhook_id)
                    ));
                }
                say!(
                    out,
                    "already registered {id} (webhook {}){note}",
                    shown_id(&found.webhook_id)
                );
                continue;
            }
            let body = RegisterBody {
                webhook_url: public_url.clone(),
                event_types: events.clone(),
                enabled: true,
                auth: auth.clone(),
            };
            match client.create_webhook(&id, &body).await {
                Ok(s) => say!(
                    out,
                    "registered {id} (webhook {})",
                    crate::terminal::blank(&s.webhook_id)
                ),
                Err(e) => {
                    // An answer may quote the request (a gateway, a debug page):
                    // the credential it carried is never printed.
                    let secret = match &auth {
                        RegisterAuth::Basic { password, .. } => password,
                        RegisterAuth::Header { value, .. } => value,
                    };
                    let mut e = e.message;
                    if !secret.is_empty() {
                        e = e.replace(secret.as_str(), crate::secret::MASK);
                    }
                    say!(out, "error {id}: {}", crate::terminal::blank(&e));
                    failed = true;
                }
            }
        }
        Ok(if failed { 1 } else { 0 })
    })
    .await
    .map(|code| out.exit(code))
}

/// Whether a listed `webhookURL` is `public_url`: compared as URLs (host
/// case, a default port, an empty path are how a server may normalize
/// one), else as text.
fn same_url(listed: &str, public_url: &str) -> bool {
    match (reqwest::Url::parse(listed), reqwest::Url::parse(public_url)) {
        (Ok(a), Ok(b)) => a == b,
        _ => listed.trim() == public_url.trim(),
    }
}

/// A webhook's `authType` as one of `Basic`, `Header`, `None`; `None`
/// (Rust's) when absent or not recognized, which proves nothing.
fn auth_kind(auth_type: Option<&str>) -> Option<&'static str> {
    let t = auth_type?.trim().to_ascii_lowercase();
    if t.contains("basic") {
        Some("Basic")
    } else if t.contains("header") {
        Some("Header")
    } else if t == "none" || t == "noauth" || t == "no_auth" {
        Some("None")
    } else {
        None
    }
}

/// Lists each business's subscriptions, one line each.
pub async fn list(config: &Config, business: Option<String>, json: bool) -> Result<u8> {
    let ids = selected(config, business.as_slice())?;
    let out = Out::default();
    let (client, auth) = client(config).await?;
    settled(config, &auth, async {
        let mut failed = false;
        let mut all = Vec::new();
        for id in ids {
            match client.list_webhooks(&id).await {
                Ok(list) if json => {
                    all.push(serde_json::json!({"businessID": id, "webhooks": list}))
                }
                Ok(list) if list.is_empty() => say!(out, "{id}: no webhook"),
                Ok(list) => {
                    // The server's text, each terminal-driving or invisible
                    // character a space (crate::terminal::is_unsafe).
                    let shown = crate::terminal::blank;
                    for s in list {
                        say!(
                            out,
                            "{id} webhook {} {} {} [{}]",
                            shown(&s.webhook_id),
                            if s.enabled == Some(false) {
                                "disabled"
                            } else {
                                "enabled"
                            },
                            shown(&s.webhook_url),
                            shown(&s.event_types.join(","))
                        );
                    }
                }
                Err(e) => {
                    if json {
                        all.push(serde_json::json!({"businessID": id, "error": e.message}));
                    } else {
                        say!(
                            out,
                            "error {id}: {}",
                            crate::terminal::blank(&e.to_string())
                        );
                    }
                    failed = true;
                }
            }
        }
        if json {
            say!(out, "{}", crate::terminal::pretty_json(&all)?);
        }
        Ok(if failed { 1 } else { 0 })
    })
    .await
    .map(|code| out.exit(code))
}

/// Deletes one subscription.
pub async fn delete(config: &Config, business: &str, webhook: &str) -> Result<u8> {
    selected(config, &[business.to_string()])?;
    let out = Out::default();
    let (client, auth) = client(config).await?;
    settled(config, &auth, async {
        match client.delete_webhook(business, webhook).await {
            Ok(()) => {
                say!(out, "deleted {business} webhook {webhook}");
                Ok(0)
            }
            Err(e) => {
                say!(
                    out,
                    "error {business}: cannot delete webhook {webhook}: {}",
                    crate::terminal::blank(&e.to_string())
                );
                Ok(1)
            }
        }
    })
    .await
    .map(|code| out.exit(code))
}
