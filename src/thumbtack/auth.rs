//! Access tokens per business: static ones from a file, or OAuth
//! refresh-token grants whose single-use, rotating refresh tokens are stored
//! durably before the access token they came with is used.

use super::model::{OAuthError, TokenResponse};
use super::problem::{ApiError, Disposition, describe_unreadable};
use crate::config::{Config, TokenSource};
use crate::secret::Secret;
use crate::store::Store;
use crate::store::tokens::TokenStore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Assumed lifetime of an access token whose response gives no `expires_in`.
const DEFAULT_EXPIRES_IN: u64 = 3600;

/// The OAuth client (SPEC §5 token endpoint).
#[derive(Clone)]
struct OAuthClient {
    token_url: String,
    audience: String,
    client_id: String,
    client_secret: Secret,
}

struct Access {
    token: Secret,
    /// `None`: a static token, valid until refused.
    expires_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    access: Option<Access>,
    /// Fingerprint of a static token that got a 401.
    refused_static: Option<String>,
    /// A rotated refresh token the store could not take (kept so it is not lost).
    unsaved_refresh: Option<(Secret, Option<String>)>,
}

/// One business's tokens. The async mutex serialises refreshes: at most one
/// is in flight, and concurrent callers wait for its result.
struct Provider {
    business_id: String,
    source: TokenSource,
    state: tokio::sync::Mutex<State>,
    /// Why a person must re-authorize this business, while they must.
    reauth: Mutex<Option<String>>,
}

/// Token providers for every configured business.
pub struct Auth {
    http: reqwest::Client,
    oauth: RwLock<Option<OAuthClient>>,
    store: Option<TokenStore>,
    mirror: Option<Store>,
    providers: RwLock<HashMap<String, Arc<Provider>>>,
}

/// SHA-256 of a secret, hex; identifies a token file's content without keeping it.
pub fn fingerprint(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_token_file(path: &Path) -> Result<String, ApiError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            ApiError::retry(
                None,
                format!("cannot read token file {}: {e}", path.display()),
            )
        })
}

impl Auth {
    /// Providers for the configuration's businesses. Opens the token store
    /// when a business uses the refresh-token grant. `needs_reauth` carries
    /// the flags a previous run left in the mirror (business id → reason).
    pub fn new(
        config: &Config,
        mirror: Option<Store>,
        needs_reauth: HashMap<String, String>,
    ) -> anyhow::Result<Auth> {
        let http = super::client::http_client(
            Duration::from_secs(config.file.api.timeout_secs),
            &config.file.api.user_agent,
        )?;
        let store = if config.uses_oauth() {
            Some(TokenStore::open(&config.file.oauth.token_store)?)
        } else {
            None
        };
        let auth = Auth {
            http,
            oauth: RwLock::new(None),
            store,
            mirror,
            providers: RwLock::new(HashMap::new()),
        };
        auth.reconfigure(config);
        if let Ok(providers) = auth.providers.read() {
            for (id, reason) in needs_reauth {
                if let Some(p) = providers.get(&id)
                    && let Ok(mut r) = p.reauth.lock()
                {
                    *r = Some(reason);
                }
            }
        }
        Ok(auth)
    }

    /// Applies a new configuration: providers of unchanged businesses keep
    /// their tokens; new ones are added, removed ones dropped.
    pub fn reconfigure(&self, config: &Config) {
        let oauth = match (&config.file.oauth.client_id, &config.client_secret) {
            (Some(id), Some(secret)) => Some(OAuthClient {
                token_url: config.file.oauth.token_url.clone(),
                audience: config.file.oauth.audience.clone(),
                client_id: id.clone(),
                client_secret: secret.clone(),
            }),
            _ => None,
        };
        if let Ok(mut o) = self.oauth.write() {
            *o = oauth;
        }
        if let Ok(mut providers) = self.providers.write() {
            let old = std::mem::take(&mut *providers);
            for b in &config.businesses {
                let p = match old.get(&b.id) {
                    Some(p) if p.source == b.token => p.clone(),
                    _ => Arc::new(Provider {
                        business_id: b.id.clone(),
                        source: b.token.clone(),
                        state: tokio::sync::Mutex::new(State::default()),
                        reauth: Mutex::new(None),
                    }),
                };
                providers.insert(b.id.clone(), p);
            }
        }
    }

    fn provider(&self, business_id: &str) -> Option<Arc<Provider>> {
        self.providers.read().ok()?.get(business_id).cloned()
    }

    /// Businesses that need a person to re-authorize them.
    pub fn blocked(&self) -> Vec<String> {
        let Ok(providers) = self.providers.read() else {
            return Vec::new();
        };
        let mut ids: Vec<String> = providers
            .values()
            .filter(|p| p.reauth.lock().map(|r| r.is_some()).unwrap_or(false))
            .map(|p| p.business_id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Why the business needs re-authorization, if it does.
    pub fn reauth_reason(&self, business_id: &str) -> Option<String> {
        self.provider(business_id)?.reauth.lock().ok()?.clone()
    }

    /// A valid access token for the business: the cached one, or a new one.
    pub async fn token(&self, business_id: &str) -> Result<Secret, ApiError> {
        let Some(p) = self.provider(business_id) else {
            return Err(ApiError::retry(
                None,
                format!("business {business_id} is not in the configuration"),
            ));
        };
        let mut state = p.state.lock().await;
        if let Some(a) = &state.access
            && a.expires_at.is_none_or(|e| Instant::now() < e)
        {
            return Ok(a.token.clone());
        }
        state.access = None;
        let result = match &p.source {
            TokenSource::Static(file) => Self::load_static(&p, &mut state, file),
            TokenSource::Refresh(file) => self.refresh(&p, &mut state, file).await,
        };
        drop(state);
        match &result {
            Ok(_) => self.set_reauth(&p, None).await,
            Err(e) if e.disposition == Disposition::Reauth => {
                self.set_reauth(&p, Some(e.message.clone())).await
            }
            Err(_) => {}
        }
        result
    }

    /// Forgets a token the API refused (401), so the next call gets a new one.
    pub async fn invalidate(&self, business_id: &str, used: &Secret) {
        let Some(p) = self.provider(business_id) else {
            return;
        };
        let mut state = p.state.lock().await;
        if state.access.as_ref().is_some_and(|a| a.token == *used) {
            state.access = None;
            if matches!(p.source, TokenSource::Static(_)) {
                state.refused_static = Some(fingerprint(used.expose()));
            }
        }
    }

    fn load_static(p: &Provider, state: &mut State, file: &Path) -> Result<Secret, ApiError> {
        let token = read_token_file(file)?;
        if token.is_empty() {
            return Err(ApiError::reauth(format!(
                "business {} needs a token: access_token_file {} is empty",
                p.business_id,
                file.display()
            )));
        }
        let fp = fingerprint(&token);
        if state.refused_static.as_deref() == Some(fp.as_str()) {
            return Err(ApiError::reauth(format!(
                "business {} needs re-authorization: its static access token was refused (HTTP 401); \
                 put a valid token in {}",
                p.business_id,
                file.display()
            )));
        }
        let token = Secret::new(token);
        state.access = Some(Access {
            token: token.clone(),
            expires_at: None,
        });
        Ok(token)
    }

    fn oauth(&self) -> Result<OAuthClient, ApiError> {
        self.oauth
            .read()
            .ok()
            .and_then(|o| o.clone())
            .ok_or_else(|| {
                ApiError::retry(
                    None,
                    "OAuth is not configured (oauth.client_id and a client secret)",
                )
            })
    }

    fn token_store(&self) -> Result<TokenStore, ApiError> {
        self.store
            .clone()
            .ok_or_else(|| ApiError::retry(None, "the token store is not open (a restart is needed after adding the first OAuth business)"))
    }

    /// The refresh-token grant, with rotation stored before use.
    async fn refresh(
        &self,
        p: &Provider,
        state: &mut State,
        file: &Path,
    ) -> Result<Secret, ApiError> {
        let oauth = self.oauth()?;
        let store = self.token_store()?;
        let business_id = p.business_id.clone();
        let seed = read_token_file(file)?;
        let seed_fp = (!seed.is_empty()).then(|| fingerprint(&seed));

        let (current, chain_fp) = match state.unsaved_refresh.clone() {
            Some(unsaved) => unsaved,
            None => {
                let stored = {
                    let store = store.clone();
                    let id = business_id.clone();
                    tokio::task::spawn_blocking(move || store.get(&id))
                        .await
                        .map_err(|e| {
                            ApiError::retry(None, format!("token store task failed: {e}"))
                        })?
                        .map_err(|e| {
                            ApiError::retry(None, format!("cannot read the token store: {e:#}"))
                        })?
                };
                let seed_is_new =
                    seed_fp.is_some() && stored.as_ref().is_none_or(|s| s.seed_sha256 != seed_fp);
                match stored {
                    _ if seed_is_new => (Secret::new(seed), seed_fp.clone()),
                    Some(s) if s.refused.is_some() => {
                        return Err(ApiError::reauth(format!(
                            "business {business_id} needs re-authorization: {}; put a new grant in {} \
                             or run `leadsync auth exchange --business {business_id} ...`",
                            s.refused.unwrap_or_default(),
                            file.display()
                        )));
                    }
                    Some(s) if !s.refresh_token.is_empty() => (s.refresh_token, s.seed_sha256),
                    _ => {
                        return Err(ApiError::reauth(format!(
                            "business {business_id} has no refresh token: {} is empty and the token store has none; \
                             run `leadsync auth exchange --business {business_id} ...`",
                            file.display()
                        )));
                    }
                }
            }
        };

        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", current.expose()),
            ("audience", oauth.audience.as_str()),
        ];
        let response = self.post_token(&oauth, &form).await;
        crate::metrics::token_refresh(
            response
                .as_ref()
                .map_or_else(TokenFailure::outcome, |_| "ok"),
        );
        let tokens = match response {
            Ok(t) => t,
            Err(TokenFailure::Refused { error, description }) => {
                let reason = format!(
                    "the refresh token was refused ({error}{})",
                    description.map(|d| format!(": {d}")).unwrap_or_default()
                );
                if error == "invalid_grant" {
                    // Durable: a restart must not replay a refused token.
                    let store = store.clone();
                    let id = business_id.clone();
                    let fp = chain_fp.clone();
                    let r = reason.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        store.mark_refused(&id, fp.as_deref(), &r)
                    })
                    .await;
                    state.unsaved_refresh = None;
                }
                return Err(ApiError::reauth(format!(
                    "business {business_id} needs re-authorization: {reason}; put a new grant in {} \
                     or run `leadsync auth exchange --business {business_id} ...`",
                    file.display()
                )));
            }
            Err(TokenFailure::Transient(msg)) => {
                return Err(ApiError::retry(
                    None,
                    format!("token refresh for business {business_id} failed: {msg}"),
                ));
            }
        };

        // Rotation: the new refresh token is stored before the access token is used.
        let next = tokens.refresh_token.map(Secret::new).unwrap_or(current);
        let saved = {
            let store = store.clone();
            let id = business_id.clone();
            let next = next.clone();
            let fp = chain_fp.clone();
            tokio::task::spawn_blocking(move || store.put(&id, &next, fp.as_deref(), "refresh"))
                .await
        };
        match saved {
            Ok(Ok(_)) => state.unsaved_refresh = None,
            Ok(Err(e)) => {
                error!(business_id, error = %format!("{e:#}"),
                    "cannot store the rotated refresh token; keeping it in memory and retrying at the next refresh — \
                     if leadsync stops before then, the business must be re-authorized");
                state.unsaved_refresh = Some((next, chain_fp));
            }
            Err(e) => {
                error!(business_id, error = %e, "token store task failed; keeping the rotated refresh token in memory");
                state.unsaved_refresh = Some((next, chain_fp));
            }
        }
        let expires_in = tokens.expires_in.unwrap_or(DEFAULT_EXPIRES_IN);
        let margin = Duration::from_secs(expires_in)
            .mul_f64(0.1)
            .min(Duration::from_secs(60));
        let token = Secret::new(tokens.access_token);
        state.access = Some(Access {
            token: token.clone(),
            expires_at: Some(
                Instant::now() + Duration::from_secs(expires_in).saturating_sub(margin),
            ),
        });
        info!(business_id, expires_in, "access token refreshed");
        Ok(token)
    }

    async fn post_token(
        &self,
        oauth: &OAuthClient,
        form: &[(&str, &str)],
    ) -> Result<TokenResponse, TokenFailure> {
        let resp = self
            .http
            .post(&oauth.token_url)
            .basic_auth(&oauth.client_id, Some(oauth.client_secret.expose()))
            .form(form)
            .send()
            .await
            .inspect_err(|_| crate::metrics::http_request("POST", "oauth2/token", None))
            .map_err(|e| TokenFailure::Transient(format!("token endpoint unreachable: {e}")))?;
        let status = resp.status().as_u16();
        crate::metrics::http_request("POST", "oauth2/token", Some(status));
        let body = resp
            .bytes()
            .await
            .map_err(|e| TokenFailure::Transient(format!("token response unreadable: {e}")))?;
        if (200..300).contains(&status) && status != 202 {
            return serde_json::from_slice::<TokenResponse>(&body).map_err(|e| {
                TokenFailure::Transient(format!(
                    "token response is not a token ({e}): {}",
                    describe_unreadable(&body)
                ))
            });
        }
        let oauth_error: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
        match (status, oauth_error.error) {
            (400..=499, Some(error)) if status != 408 && status != 429 => {
                Err(TokenFailure::Refused {
                    error,
                    description: oauth_error.error_description,
                })
            }
            (400 | 401, None) => Err(TokenFailure::Refused {
                error: format!("HTTP {status}"),
                description: Some(describe_unreadable(&body)),
            }),
            _ => Err(TokenFailure::Transient(format!(
                "token endpoint answered HTTP {status}: {}",
                describe_unreadable(&body)
            ))),
        }
    }

    /// The authorization-code grant (`leadsync auth exchange`): stores the
    /// business's new refresh token and clears its re-authorization flag.
    pub async fn exchange_code(
        &self,
        business_id: &str,
        code: &str,
        redirect_uri: &str,
    ) -> anyhow::Result<()> {
        let p = self
            .provider(business_id)
            .ok_or_else(|| anyhow::anyhow!("business {business_id} is not in the configuration"))?;
        let TokenSource::Refresh(file) = &p.source else {
            anyhow::bail!(
                "business {business_id} uses access_token_file; set refresh_token_file to use OAuth"
            );
        };
        let oauth = self.oauth().map_err(|e| anyhow::anyhow!("{e}"))?;
        let store = self.token_store().map_err(|e| anyhow::anyhow!("{e}"))?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("audience", oauth.audience.as_str()),
        ];
        let tokens = match self.post_token(&oauth, &form).await {
            Ok(t) => t,
            Err(TokenFailure::Refused { error, description }) => anyhow::bail!(
                "the authorization code was refused ({error}{}); codes are single-use and short-lived: authorize again",
                description.map(|d| format!(": {d}")).unwrap_or_default()
            ),
            Err(TokenFailure::Transient(m)) => anyhow::bail!("{m}"),
        };
        let Some(refresh) = tokens.refresh_token else {
            anyhow::bail!(
                "the token response has no refresh_token: was the offline_access scope requested?"
            );
        };
        // The current file's content is recorded so it is not taken for a newer grant.
        let seed = read_token_file(file).map_err(|e| anyhow::anyhow!("{e}"))?;
        let seed_fp = (!seed.is_empty()).then(|| fingerprint(&seed));
        let id = business_id.to_string();
        let refresh = Secret::new(refresh);
        tokio::task::spawn_blocking(move || {
            store.put(&id, &refresh, seed_fp.as_deref(), "auth exchange")
        })
        .await??;
        let mut state = p.state.lock().await;
        state.unsaved_refresh = None;
        state.access = Some(Access {
            token: Secret::new(tokens.access_token),
            expires_at: Some(
                Instant::now()
                    + Duration::from_secs(tokens.expires_in.unwrap_or(DEFAULT_EXPIRES_IN) / 2),
            ),
        });
        drop(state);
        // This process may not know the mirror's flag: clear it regardless.
        self.set_reauth_forced(&p, None, true).await;
        Ok(())
    }

    /// Records (or clears) the business's need for re-authorization, in memory and in the mirror.
    async fn set_reauth(&self, p: &Provider, reason: Option<String>) {
        self.set_reauth_forced(p, reason, false).await;
    }

    async fn set_reauth_forced(&self, p: &Provider, reason: Option<String>, force: bool) {
        let previous = p
            .reauth
            .lock()
            .map(|mut r| std::mem::replace(&mut *r, reason.clone()))
            .unwrap_or_default();
        if !force && previous.is_some() == reason.is_some() {
            return;
        }
        match &reason {
            Some(r) => warn!(business_id = %p.business_id, "{r}"),
            None => {
                info!(business_id = %p.business_id, "business re-authorized; resuming its syncs and outbox rows")
            }
        }
        if let Some(mirror) = &self.mirror {
            let id = p.business_id.clone();
            let now = crate::time::now();
            if let Err(e) = mirror
                .call(move |c| {
                    crate::store::mirror::set_needs_reauth(c, &id, reason.as_deref(), &now)
                })
                .await
            {
                error!(business_id = %p.business_id, error = %format!("{e:#}"), "cannot record needs_reauth in the mirror");
            }
        }
    }
}

enum TokenFailure {
    /// The token endpoint refused the grant (an OAuth error such as invalid_grant).
    Refused {
        error: String,
        description: Option<String>,
    },
    /// The endpoint could not be reached or answered oddly; try again later.
    Transient(String),
}

impl TokenFailure {
    /// The `outcome` label of the token-refresh metric.
    fn outcome(&self) -> &'static str {
        match self {
            TokenFailure::Refused { error, .. } if error == "invalid_grant" => "invalid_grant",
            TokenFailure::Refused { .. } => "refused",
            TokenFailure::Transient(_) => "transient",
        }
    }
}
