//! What `run`, `sync` and `drain` share: the mirror, the process lock,
//! crash recovery, and the API client with its token providers.

use crate::config::Config;
use crate::secret::Secret;
use crate::store::tokens::{GrantWrite, StoredGrant, TokenStore, Written};
use crate::store::{ProcessLock, Store, mirror, outbox};
use crate::thumbtack::auth::{AuthRecorder, BoxFuture, GrantStore};
use crate::thumbtack::{Auth, Client, ClientSettings};
use anyhow::Result;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};

/// An open mirror held by this process, with an API client.
pub struct Session {
    pub config: Arc<Config>,
    pub store: Store,
    pub auth: Arc<Auth>,
    pub client: Arc<Client>,
    /// The token store, when one was opened with the session (a business
    /// uses OAuth): the daemon's `/healthz` watches it.
    pub tokens: Option<TokenStore>,
    _lock: ProcessLock,
}

impl Session {
    /// Opens (creating and migrating) the mirror, takes the process lock,
    /// recovers what a stopped process left behind, and builds the client.
    pub async fn open(config: Config) -> Result<Session> {
        Session::open_as(config, false).await
    }

    /// [`Session::open`]; `daemon`: the lock file says at once that its
    /// holder is the daemon, which takes `sync_requests` rows (a `leadsync
    /// sync` meeting another command's lock fails instead of asking).
    pub async fn open_as(config: Config, daemon: bool) -> Result<Session> {
        Session::open_with(config, daemon, None).await
    }

    /// [`Session::open`] with the mirror's lock, which this process took
    /// already: it is never let go meanwhile (`demo` takes it before it
    /// replaces the mirror; taking it again after a moment without it let
    /// a second demo remove the first one's fresh mirror).
    pub async fn open_holding(config: Config, lock: ProcessLock) -> Result<Session> {
        Session::open_with(config, false, Some(lock)).await
    }

    async fn open_with(config: Config, daemon: bool, held: Option<ProcessLock>) -> Result<Session> {
        let path = config.database().to_path_buf();
        let (store, lock) = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || match held {
                Some(lock) => Store::open_holding(&path, &lock).map(|s| (s, Some(lock))),
                None => Store::open(&path).map(|s| (s, None)),
            })
            .await??
        };
        let lock = match lock {
            Some(lock) => lock,
            None => ProcessLock::acquire_as(&path, daemon)?,
        };
        let businesses = config.businesses.clone();
        let ((recovered, rebased), interrupted, needs_reauth, missing_indexes) = store
            .call(move |c| {
                let now = crate::time::now();
                let recovered = outbox::recover_sending(c, &now)?;
                let rebased = outbox::rebase_future_waits(c, &now)?;
                let interrupted = mirror::interrupt_running(
                    c,
                    &now,
                    "interrupted: leadsync stopped during this pass",
                )?;
                mirror::upsert_businesses(c, &businesses)?;
                let missing_indexes = crate::store::Pins::read(c)?.missing();
                Ok((
                    (recovered, rebased),
                    interrupted,
                    mirror::needs_reauth_map(c)?,
                    missing_indexes,
                ))
            })
            .await?;
        // Not made again here: dropping it may have been the user's choice,
        // and a renamed one would then be kept twice (README, "Database").
        for (index, create) in missing_indexes {
            warn!(index, create = %create,
                "an index leadsync made is missing or redefined: leadsync works without it, more slowly; to restore it, drop any index of that name and run `create`");
        }
        if !rebased.is_empty() {
            warn!(rows = ?rebased, "outbox rows that a clock ahead had scheduled far in the future are due after their wait counted from now");
        }
        if !recovered.is_empty() {
            warn!(rows = ?recovered, "outbox rows left `sending` by a stopped process are pending again and will be resent");
        }
        if interrupted > 0 {
            info!(
                passes = interrupted,
                "sync passes left running by a stopped process were recorded as interrupted"
            );
        }
        let tokens = if config.uses_oauth() {
            Some(TokenStore::open(&config.file.oauth.token_store)?)
        } else {
            None
        };
        let auth = Arc::new(auth_with(
            &config,
            Some(store.clone()),
            needs_reauth,
            tokens.clone(),
        )?);
        let client = Arc::new(Client::new(
            ClientSettings::from_config(&config),
            auth.clone(),
        )?);
        Ok(Session {
            config: Arc::new(config),
            store,
            auth,
            client,
            tokens,
            _lock: lock,
        })
    }
}

/// The token providers of a configuration: the token store (opened when a
/// business uses the refresh-token grant) for grants, the mirror (when
/// given) for re-authorization flags and alerts.
pub fn open_auth(
    config: &Config,
    mirror: Option<Store>,
    needs_reauth: HashMap<String, String>,
) -> Result<Auth> {
    open_auth_with(config, mirror, needs_reauth, config.uses_oauth())
}

/// [`open_auth`], opening the token store also when no business uses OAuth
/// yet (onboarding the first grant).
pub fn open_auth_with(
    config: &Config,
    mirror: Option<Store>,
    needs_reauth: HashMap<String, String>,
    open_store: bool,
) -> Result<Auth> {
    let tokens = if open_store {
        Some(TokenStore::open(&config.file.oauth.token_store)?)
    } else {
        None
    };
    auth_with(config, mirror, needs_reauth, tokens)
}

/// [`open_auth`] with the token store opened (or not) already.
fn auth_with(
    config: &Config,
    mirror: Option<Store>,
    needs_reauth: HashMap<String, String>,
    tokens: Option<TokenStore>,
) -> Result<Auth> {
    let grants = tokens.map(|t| Arc::new(StoreGrants(t)) as Arc<dyn GrantStore>);
    let recorder = mirror.map(|m| Arc::new(MirrorRecorder(m)) as Arc<dyn AuthRecorder>);
    Auth::new(config, grants, recorder, needs_reauth)
}

/// The token store, as auth's narrow persistence interface.
pub struct StoreGrants(pub TokenStore);

impl GrantStore for StoreGrants {
    fn load(
        &self,
        grant: &str,
        seed_sha256: Option<&str>,
        businesses: &[String],
    ) -> Result<Option<StoredGrant>> {
        self.0.get(grant, seed_sha256, businesses)
    }

    fn save(&self, grant: &str, expected: i64, write: &GrantWrite) -> Result<Written> {
        self.0.put(grant, expected, write)
    }

    fn refuse(
        &self,
        grant: &str,
        expected: i64,
        file_sha256: Option<&str>,
        reason: &str,
    ) -> Result<bool> {
        self.0.mark_refused(grant, expected, file_sha256, reason)
    }

    fn refuse_file(&self, grant: &str, file_sha256: &str) -> Result<()> {
        self.0.mark_file_refused(grant, file_sha256)
    }

    fn forget_access(&self, grant: &str, access_token: &Secret) -> Result<()> {
        self.0.forget_access(grant, access_token)
    }

    fn try_lock(&self, grant: &str) -> Result<Option<Box<dyn Send>>> {
        Ok(self
            .0
            .try_lock_grant(grant)?
            .map(|l| Box::new(l) as Box<dyn Send>))
    }

    fn refresh_note(&self, grant: &str) -> Result<Option<String>> {
        self.0.refresh_note(grant)
    }

    fn set_refresh_note(&self, grant: &str, note: Option<&str>) -> Result<()> {
        self.0.set_refresh_note(grant, note)
    }

    fn lock_unsaved(&self, grant: &str) -> Result<Option<Box<dyn Send>>> {
        Ok(Some(Box::new(self.0.lock_unsaved(grant)?)))
    }

    fn unsaved_held(&self, grant: &str) -> Result<bool> {
        self.0.unsaved_held(grant)
    }

    fn check_writable(&self) -> Result<()> {
        self.0.check_writable()
    }

    fn note_unsaved(&self, grant: &str, over_generation: i64, token_sha256: &str) -> Result<()> {
        self.0.set_refresh_note(
            grant,
            Some(&crate::store::tokens::unsaved_note(
                std::process::id(),
                over_generation,
                Some(token_sha256),
            )),
        )
    }
}

/// Auth's flags and alerts, written to the mirror.
struct MirrorRecorder(Store);

impl AuthRecorder for MirrorRecorder {
    fn needs_reauth(&self, business_ids: Vec<String>, reason: Option<String>) -> BoxFuture {
        let store = self.0.clone();
        Box::pin(async move {
            let now = crate::time::now();
            let ids = business_ids.clone();
            if let Err(e) = store
                .call(move |c| {
                    for id in &ids {
                        mirror::set_needs_reauth(c, id, reason.as_deref(), &now)?;
                    }
                    Ok(())
                })
                .await
            {
                tracing::error!(businesses = ?business_ids, error = %format!("{e:#}"), "cannot record needs_reauth in the mirror");
            }
        })
    }

    fn alert(&self, key: String, message: Option<String>) -> BoxFuture {
        let store = self.0.clone();
        Box::pin(async move {
            let now = crate::time::now();
            if let Err(e) = store
                .call(move |c| mirror::set_auth_alert(c, &key, message.as_deref(), &now))
                .await
            {
                tracing::error!(error = %format!("{e:#}"), "cannot record an auth alert in the mirror");
            }
        })
    }
}
