//! What `run`, `sync` and `drain` share: the mirror, the process lock,
//! crash recovery, and the API client with its token providers.

use crate::config::Config;
use crate::store::{ProcessLock, Store, mirror, outbox};
use crate::thumbtack::{Auth, Client, ClientSettings};
use anyhow::Result;
use std::sync::Arc;
use tracing::{info, warn};

/// An open mirror held by this process, with an API client.
pub struct Session {
    pub config: Arc<Config>,
    pub store: Store,
    pub auth: Arc<Auth>,
    pub client: Arc<Client>,
    _lock: ProcessLock,
}

impl Session {
    /// Opens (creating and migrating) the mirror, takes the process lock,
    /// recovers what a stopped process left behind, and builds the client.
    pub async fn open(config: Config) -> Result<Session> {
        let path = config.database().to_path_buf();
        let store = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Store::open(&path)).await??
        };
        let lock = ProcessLock::acquire(&path)?;
        let businesses = config.businesses.clone();
        let (recovered, interrupted, needs_reauth) = store
            .call(move |c| {
                let now = crate::time::now();
                let recovered = outbox::recover_sending(c, &now)?;
                let interrupted = mirror::interrupt_running(
                    c,
                    &now,
                    "interrupted: leadsync stopped during this pass",
                )?;
                mirror::upsert_businesses(c, &businesses)?;
                Ok((recovered, interrupted, mirror::needs_reauth_map(c)?))
            })
            .await?;
        if !recovered.is_empty() {
            warn!(rows = ?recovered, "outbox rows left `sending` by a stopped process are pending again and will be resent");
        }
        if interrupted > 0 {
            info!(
                passes = interrupted,
                "sync passes left running by a stopped process were recorded as interrupted"
            );
        }
        let auth = Arc::new(Auth::new(&config, Some(store.clone()), needs_reauth)?);
        let client = Arc::new(Client::new(
            ClientSettings::from_config(&config),
            auth.clone(),
        )?);
        Ok(Session {
            config: Arc::new(config),
            store,
            auth,
            client,
            _lock: lock,
        })
    }
}
