//! The token store: each business's latest refresh token, written durably
//! and atomically (SQLite, rollback journal, `synchronous = FULL`) in a file
//! of its own with mode 0600 — never inside the mirror.

use crate::secret::Secret;
use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A business's stored refresh token.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub refresh_token: Secret,
    /// Increases with every stored token.
    pub generation: i64,
    /// SHA-256 (hex) of the `refresh_token_file` content this chain started
    /// from; a different file content means a person re-authorized.
    pub seed_sha256: Option<String>,
    /// Set when Thumbtack refused this token: the reason.
    pub refused: Option<String>,
}

/// Handle on the token store file; cheap to clone. Calls block: use them
/// from `spawn_blocking`.
#[derive(Clone)]
pub struct TokenStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl TokenStore {
    /// Opens (creating with mode 0600) the token store.
    pub fn open(path: &Path) -> Result<TokenStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            bail!(
                "cannot open token store {}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
        // Create the file ourselves so it is never readable by others, even briefly.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                        "token store was readable by others; setting mode 0600");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create token store {}", path.display()));
            }
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open token store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The journal (created with the database's mode) makes each write
        // atomic; FULL makes it durable before we use what it protects.
        conn.execute_batch(
            "PRAGMA journal_mode = DELETE;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS refresh_tokens (
                 business_id    TEXT PRIMARY KEY,
                 refresh_token  TEXT NOT NULL,
                 generation     INTEGER NOT NULL,
                 seed_sha256    TEXT,
                 source         TEXT NOT NULL,
                 updated_at     TEXT NOT NULL,
                 refused_at     TEXT,
                 refused_reason TEXT
             );",
        )
        .with_context(|| format!("cannot initialise token store {}", path.display()))?;
        Ok(TokenStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("token store lock poisoned"))?;
        f(&conn)
    }

    /// The latest stored token of a business.
    pub fn get(&self, business_id: &str) -> Result<Option<StoredToken>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT refresh_token, generation, seed_sha256, refused_reason
                   FROM refresh_tokens WHERE business_id = ?1",
                [business_id],
                |r| {
                    Ok(StoredToken {
                        refresh_token: Secret::new(r.get::<_, String>(0)?),
                        generation: r.get(1)?,
                        seed_sha256: r.get(2)?,
                        refused: r.get(3)?,
                    })
                },
            )
            .optional()?)
        })
    }

    /// Stores a business's new refresh token durably; returns its generation.
    pub fn put(
        &self,
        business_id: &str,
        token: &Secret,
        seed_sha256: Option<&str>,
        source: &str,
    ) -> Result<i64> {
        self.with(|c| {
            let generation: i64 = c.query_row(
                "INSERT INTO refresh_tokens (business_id, refresh_token, generation, seed_sha256, source, updated_at)
                 VALUES (?1, ?2, 1, ?3, ?4, ?5)
                 ON CONFLICT (business_id) DO UPDATE SET refresh_token = excluded.refresh_token,
                     generation = generation + 1, seed_sha256 = excluded.seed_sha256,
                     source = excluded.source, updated_at = excluded.updated_at,
                     refused_at = NULL, refused_reason = NULL
                 RETURNING generation",
                params![business_id, token.expose(), seed_sha256, source, crate::time::now()],
                |r| r.get(0),
            )?;
            Ok(generation)
        })
        .with_context(|| format!("cannot store the rotated refresh token of business {business_id} in {}", self.path.display()))
    }

    /// Records that Thumbtack refused the business's stored token.
    pub fn mark_refused(
        &self,
        business_id: &str,
        seed_sha256: Option<&str>,
        reason: &str,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO refresh_tokens (business_id, refresh_token, generation, seed_sha256, source,
                     updated_at, refused_at, refused_reason)
                 VALUES (?1, '', 0, ?2, 'refused', ?3, ?3, ?4)
                 ON CONFLICT (business_id) DO UPDATE SET refused_at = excluded.refused_at,
                     refused_reason = excluded.refused_reason,
                     seed_sha256 = COALESCE(excluded.seed_sha256, seed_sha256)",
                params![business_id, seed_sha256, crate::time::now(), reason],
            )?;
            Ok(())
        })
    }
}
