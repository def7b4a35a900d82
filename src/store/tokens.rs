//! The token store: each OAuth grant's latest refresh token (and the access
//! token that came with it), written durably and atomically in a SQLite file
//! of its own with mode 0600 — never inside the mirror.
//!
//! A grant is one pro's authorization; it is keyed by the
//! `refresh_token_file` that businesses name (businesses naming the same
//! file share the grant). Every write is a compare-and-set on the row's
//! `generation`, so a writer that read an older row never overwrites a newer
//! one. A per-grant lock file keeps two processes from refreshing the same
//! chain at once.

use crate::secret::Secret;
use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The schema version this binary writes (`PRAGMA user_version`).
/// 0: `refresh_tokens` keyed by business (before grants were shared).
/// 2: `grants` keyed by grant, with the access token and generation CAS.
/// 3: `grants.seed_prior_sha256`, the chain's seed before a rotated token
///    kept in the token file replaced it.
/// A migration takes no process lock: `auth exchange`, `webhooks` or `probe`
/// of a newer binary may run it under an older daemon, which checks the
/// version only when it opens the store. Keep migrations additive (new
/// tables or columns), or the older daemon's writes of rotated tokens fail.
const SCHEMA_VERSION: i64 = 3;

/// A grant's stored state.
#[derive(Debug, Clone)]
pub struct StoredGrant {
    /// Empty when the store has none (a refused initial grant).
    pub refresh_token: Secret,
    /// Increases with every write; 0 for a row that never held a token.
    pub generation: i64,
    /// SHA-256 (hex) of the token file content the chain started from (or
    /// that was current when `auth exchange` stored it): a different file
    /// content means a person put a new grant there.
    pub seed_sha256: Option<String>,
    /// The seed before a rotated token kept in the token file (the store
    /// refused it for a while) replaced it: the file's original content,
    /// still this chain's (deployed again, or at a new path).
    pub seed_prior_sha256: Option<String>,
    /// SHA-256 of a token file content Thumbtack refused while the stored
    /// chain was kept.
    pub file_refused_sha256: Option<String>,
    /// The access token issued with the refresh token, and its expiry (RFC 3339).
    pub access_token: Option<(Secret, String)>,
    /// Set when Thumbtack refused the stored token: the reason.
    pub refused: Option<String>,
}

/// What a write stores.
#[derive(Debug, Clone)]
pub struct GrantWrite {
    pub refresh_token: Secret,
    pub access_token: Option<(Secret, String)>,
    pub seed_sha256: Option<String>,
    /// `refresh` or `auth exchange`.
    pub source: String,
}

/// The outcome of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored; the row's new generation.
    Stored(i64),
    /// The row had another generation (someone else wrote meanwhile): nothing written.
    Conflict(i64),
}

/// Handle on the token store file; cheap to clone. Calls block: use them
/// from `spawn_blocking`.
#[derive(Clone)]
pub struct TokenStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// The file (device, inode) `path` named when it was opened.
    opened: Option<(u64, u64)>,
    /// Whether writes to it fail for want of storage.
    writes: super::WriteWatch,
}

/// What `/healthz` watches of a token store: its path, the file (device,
/// inode) it named when opened, and whether writes to it fail for storage.
#[derive(Clone, Debug)]
pub struct TokenWatch {
    pub path: PathBuf,
    pub opened: Option<(u64, u64)>,
    pub writes: super::WriteWatch,
}

/// Why the token store's path no longer names the file opened as
/// `opened`, if it does not (a path that cannot be looked at for another
/// reason than its absence says nothing either way).
pub fn moved_problem(
    path: &Path,
    opened: (u64, u64),
    now: std::io::Result<(u64, u64)>,
) -> Option<String> {
    let now = match now {
        Ok(now) => Some(now),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => return None,
    };
    (now != Some(opened)).then(|| {
        format!(
            "the token store {} was moved, removed or replaced while leadsync runs: rotated \
             refresh tokens would be written only into the file it opened, and the next start \
             would find no chains there (every business re-authorized), so no token refresh \
             starts; put the file (or its directory) back where it was, or stop leadsync, put \
             the store you mean to keep at that path and start it",
            path.display()
        )
    })
}

/// The grant lock's note while a rotated token is held in memory, unsaved,
/// by process `pid`, which holds the grant's lock until it is stored (see
/// [`TokenStore::get`]). Once the lock is free the note is stale: its
/// writer ended and the token it held is lost.
/// `token_sha256`: the fingerprint of the rotated token, which leadsync
/// also keeps in the grant's token file: a file holding it (moved or copied
/// under another name) is this chain's, held, not a new grant.
pub fn unsaved_note(pid: u32, over_generation: i64, token_sha256: Option<&str>) -> String {
    match token_sha256 {
        Some(fp) => format!("{UNSAVED_NOTE} {pid}{OVER}{over_generation}{IN_FILE}{fp}"),
        None => format!("{UNSAVED_NOTE} {pid}{OVER}{over_generation}"),
    }
}

/// How an [`unsaved_note`] names the fingerprint of the token it holds.
const IN_FILE: &str = "; token file copy sha256 ";

/// The fingerprint of the rotated token an [`unsaved_note`] holds, if it
/// names one.
pub fn unsaved_token_sha256(note: &str) -> Option<&str> {
    unsaved_by(note)?;
    let fp = note.rsplit_once(IN_FILE)?.1.trim();
    (!fp.is_empty()).then_some(fp)
}

/// A note without its token fingerprint (parsed by the functions below).
fn without_fingerprint(note: &str) -> &str {
    note.split_once(IN_FILE).map_or(note, |(n, _)| n)
}

/// How an [`unsaved_note`] names the stored generation its token replaces:
/// a row beyond it says the token was stored (or superseded) after all.
const OVER: &str = ", to replace stored generation ";

const UNSAVED_NOTE: &str =
    "rotated refresh token not stored yet, held in memory by leadsync process";

/// The grant's note while a refresh is out: when, by which process, and the
/// stored generation its rotated token is to replace (a row beyond it, found
/// by the next refresh, says its answer was stored after all: the process
/// ended between the store's write and the note's removal).
pub fn sent_note(at: &str, pid: u32, over_generation: i64) -> String {
    format!("sent at {at} by leadsync process {pid}{OVER}{over_generation}")
}

/// The stored generation a note (either kind) says its token was to
/// replace, if it says.
pub fn note_over(note: &str) -> Option<i64> {
    without_fingerprint(note)
        .rsplit_once(OVER)?
        .1
        .trim()
        .parse()
        .ok()
}

/// The process an [`unsaved_note`] names; it holds the rotated token for
/// as long as it holds the grant's lock.
pub fn unsaved_by(note: &str) -> Option<u32> {
    unsaved_over(note).map(|(pid, _)| pid)
}

/// The process an [`unsaved_note`] names and the generation its token was
/// to replace (`None` in a note that does not say).
pub fn unsaved_over(note: &str) -> Option<(u32, Option<i64>)> {
    let rest = without_fingerprint(note).strip_prefix(UNSAVED_NOTE)?.trim();
    match rest.split_once(OVER) {
        Some((pid, generation)) => Some((pid.trim().parse().ok()?, generation.trim().parse().ok())),
        None => Some((rest.parse().ok()?, None)),
    }
}

/// The most of a note read (a note is a line; a bigger file is not one).
const NOTE_MAX: usize = 400;

/// A held per-grant lock (released on drop).
pub struct GrantLock {
    _file: File,
}

/// SHA-256 of a text, hex.
pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The uid this process runs as (without libc: the owner of `/proc/self`).
fn current_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Refuses a path that is a symlink or belongs to another user.
fn check_owned(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot inspect {what} {}", path.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "{what} {} is a symbolic link: refusing it (point oauth.token_store at the real file)",
            path.display()
        );
    }
    if let Some(uid) = current_uid()
        && meta.uid() != uid
    {
        bail!(
            "{what} {} belongs to uid {}, not to the user leadsync runs as (uid {uid}): refusing it; \
             run leadsync as its service user (`sudo -u leadsync leadsync ...`)",
            path.display(),
            meta.uid()
        );
    }
    Ok(())
}

impl TokenStore {
    /// Opens (creating with mode 0600) the token store. Its directory is
    /// created (mode 0700) when only it is missing; a store that is a
    /// symlink or belongs to another user is refused.
    pub fn open(path: &Path) -> Result<TokenStore> {
        super::refuse_foreign_as_root(path, "token store")?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            let grandparent_exists = dir
                .parent()
                .is_none_or(|g| g.as_os_str().is_empty() || g.is_dir());
            if !grandparent_exists {
                bail!(
                    "cannot open token store {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                );
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| {
                    format!(
                        "cannot create the token store's directory {}",
                        dir.display()
                    )
                })?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(meta) = std::fs::metadata(dir)
        {
            // Whoever owns the directory can rename the store (or its lock
            // directory) away and put their own in its place. Root's own
            // directories (/tmp, /var/lib) are not another user's.
            if let Some(uid) = current_uid()
                && meta.uid() != uid
                && meta.uid() != 0
            {
                bail!(
                    "the token store's directory {} belongs to uid {}, not to the user leadsync runs \
                     as (uid {uid}) nor to root: refusing it (its owner could replace the store); \
                     put the store in a directory of the service user's, mode 0700 (for example \
                     /var/lib/leadsync/private/tokens.db)",
                    dir.display(),
                    meta.uid()
                );
            }
            let mode = meta.permissions().mode();
            if mode & 0o022 != 0 {
                // A warning, not a refusal: /tmp, a umask-002 home or the
                // shared /var/lib/leadsync of older releases must keep
                // working; changing the parent's mode would take the
                // partner group's (or everyone's) access away.
                tracing::warn!(directory = %dir.display(), mode = format!("{:o}", mode & 0o7777),
                    "the token store's directory is writable by its group or others: they can \
                     delete or replace the store; move the store into a private subdirectory \
                     (mode 0700, the service user's), e.g. {}, and point oauth.token_store there \
                     (do not change this directory's mode)",
                    dir.join("private").join(path.file_name().unwrap_or_default()).display());
            } else if mode & 0o077 != 0 {
                tracing::warn!(directory = %dir.display(), mode = format!("{:o}", mode & 0o777),
                    "the token store's directory can be entered by other users: make it mode 0700");
            }
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
                check_owned(path, "token store")?;
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
                if mode & 0o066 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                        "token store could be read or changed by others; setting mode 0600");
                }
                if mode & 0o077 != 0 {
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
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .with_context(|| format!("cannot open token store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The rollback journal (created with the database's mode) makes each
        // write atomic. FULL syncs the database and the journal but not the
        // directory after the journal is deleted, so a power cut right after
        // a commit can bring the journal back and roll the commit back —
        // losing a rotated token Thumbtack already considers current. EXTRA
        // also syncs the directory: a commit is durable before we use what
        // it protects.
        conn.execute_batch(
            "PRAGMA journal_mode = DELETE;
             PRAGMA synchronous = EXTRA;",
        )
        .with_context(|| format!("cannot initialise token store {}", path.display()))?;
        migrate(&conn)
            .with_context(|| format!("cannot initialise token store {}", path.display()))?;
        // The file as opened (NOFOLLOW: the path names it, not a link).
        let opened = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(TokenStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            opened,
            writes: super::WriteWatch::default(),
        })
    }

    /// What `/healthz` watches of this store.
    pub fn watch(&self) -> TokenWatch {
        TokenWatch {
            path: self.path.clone(),
            opened: self.opened,
            writes: self.writes.clone(),
        }
    }

    /// Why the store's path no longer names the file opened, if it does
    /// not (moved aside, removed, replaced): then a rotated token written
    /// would land only in a file the next start does not open.
    pub fn moved_away(&self) -> Option<String> {
        let opened = self.opened?;
        let now = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
        moved_problem(&self.path, opened, now)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the store's file to 0600 again when other users can read or
    /// write it (a `chmod`, a restore from a backup since it was opened),
    /// warning then, once: the next call finds it 0600. A daemon calls it
    /// at each reload. An error (the file gone) is warned about too.
    pub fn tighten(path: &Path) {
        let mode = match std::fs::metadata(path) {
            Ok(m) => m.permissions().mode() & 0o777,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot read the token store's mode");
                return;
            }
        };
        if mode & 0o077 == 0 {
            return;
        }
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                "token store was open to other users since it was opened; setting mode 0600"),
            Err(e) => tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                error = %e, "token store is open to other users and cannot be set to mode 0600: \
                 run `chmod 600` on it"),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("token store lock poisoned"))?;
        f(&mut conn)
    }

    /// Makes writes fail as on a read-only file system (tests: root may
    /// write whatever the modes say).
    #[cfg(test)]
    pub(crate) fn set_query_only(&self, on: bool) {
        self.with(|c| Ok(c.pragma_update(None, "query_only", on)?))
            .unwrap();
    }

    /// [`TokenStore::with`] for a write: a failure for want of storage is
    /// recorded for `/healthz` until writes work again.
    /// Only a call that wrote a page proves writes work again (as the
    /// mirror's [`super::WriteWatch`] counts): a put that lost its
    /// compare-and-set, or a forget that matched nothing, succeeds on a full
    /// disk too.
    fn write<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        let mut wrote = false;
        let result = self.with(|conn| {
            let before = super::pages_written(conn);
            let result = f(conn);
            wrote = super::pages_written(conn) != before && conn.is_autocommit();
            result
        });
        self.writes.note(&result, result.is_ok() && wrote);
        result
    }

    /// The directory of the grants' lock and note files (`<token store>.locks/`).
    fn lock_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}.locks", self.path.display()))
    }

    /// The grant's lock file (in `<token store>.locks/`). Its identity (the
    /// inode every process locks) never changes: nothing renames over it.
    fn lock_path(&self, grant: &str) -> PathBuf {
        self.lock_dir().join(&sha256_hex(grant)[..32])
    }

    /// The grant's "unsaved" lock file, beside its lock file: held
    /// (exclusively) by a process keeping the grant's rotated token in
    /// memory, unsaved, for as long as it does (with the grant's lock).
    fn unsaved_lock_path(&self, grant: &str) -> PathBuf {
        self.lock_dir()
            .join(format!("{}.unsaved", &sha256_hex(grant)[..32]))
    }

    /// The grant's note file, beside its lock file: always a whole note,
    /// replaced by rename, so a failed or interrupted rewrite leaves the
    /// previous one (see [`TokenStore::set_refresh_note`]).
    fn note_path(&self, grant: &str) -> PathBuf {
        self.lock_dir()
            .join(format!("{}.note", &sha256_hex(grant)[..32]))
    }

    /// What the grant's note says of a refresh whose answer was not stored
    /// (see [`TokenStore::set_refresh_note`]); `None` when nothing. Read by
    /// the lock's holder (or to explain why the lock is held). A note file,
    /// when there is one, is the note; else a lock file with content holds
    /// one an older leadsync wrote there (in place).
    pub fn refresh_note(&self, grant: &str) -> Result<Option<String>> {
        for path in [self.note_path(grant), self.lock_path(grant)] {
            match read_note(&path) {
                Ok(bytes) => {
                    // Lossy: a note is only ever read to be judged and shown,
                    // and a stray byte must not hide it.
                    let text = String::from_utf8_lossy(&bytes);
                    let note: String = text.trim().chars().take(NOTE_MAX).collect();
                    return Ok(Some(note).filter(|n| !n.is_empty()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot read the grant note {}", path.display()));
                }
            }
        }
        Ok(None)
    }

    /// Records durably that a refresh is being sent (`Some(note)`: when, by
    /// which process), or that its answer is stored (`None`). A refresh the
    /// process did not live to store is then known to the next one. Written
    /// by the lock's holder.
    ///
    /// The note is a file of its own, replaced whole: written to a
    /// temporary file, synced, renamed over the note, and the directory
    /// synced. A write that fails (disk full, EIO) or a process that dies
    /// part way leaves the previous note as it was, never an empty or half
    /// one (which would read as no refresh, or as another process's). It is
    /// not kept in the lock file: replacing that by rename would change the
    /// inode other processes lock, and rewriting it in place cannot be
    /// atomic.
    pub fn set_refresh_note(&self, grant: &str, note: Option<&str>) -> Result<()> {
        use std::io::Write;
        self.set_refresh_note_with(grant, note, &|f, bytes| f.write_all(bytes))
    }

    /// [`TokenStore::set_refresh_note`], writing the note's bytes with
    /// `write` (tests make it fail part way, as a full disk does).
    fn set_refresh_note_with(
        &self,
        grant: &str,
        note: Option<&str>,
        write: &dyn Fn(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let dir = self.lock_dir();
        let path = self.note_path(grant);
        let sync_dir = || {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync the grant lock directory {}", dir.display()))
        };
        match note {
            Some(note) => {
                let temp = dir.join(format!("{}.note.tmp", &sha256_hex(grant)[..32]));
                crate::secret::replace_private(&path, &temp, format!("{note}\n").as_bytes(), write)
                    .with_context(|| format!("cannot write the grant note {}", path.display()))?;
                // The note file now says it all: a note an older leadsync
                // left in the lock file goes (in place: the lock is kept).
                self.clear_legacy_note(grant)
            }
            None => {
                // The older leadsync's note first: were the note file
                // removed and this failed, that older note would come back.
                self.clear_legacy_note(grant)?;
                match std::fs::remove_file(&path) {
                    Ok(()) => sync_dir(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e).with_context(|| {
                        format!("cannot remove the grant note {}", path.display())
                    }),
                }
            }
        }
    }

    /// Empties a lock file an older leadsync wrote its note into (its
    /// length only: the file, and the lock on it, stay).
    fn clear_legacy_note(&self, grant: &str) -> Result<()> {
        let path = self.lock_path(grant);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => bail!(
                "the grant lock {} is a symbolic link: refusing it",
                path.display()
            ),
            Ok(m) if m.len() > 0 => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open the grant lock {}", path.display()))?;
                f.set_len(0)
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("cannot empty the grant lock {}", path.display()))
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("cannot inspect the grant lock {}", path.display()))
            }
        }
    }

    /// Tries to take the grant's cross-process lock; `None` while another
    /// process (or handle) holds it.
    pub fn try_lock_grant(&self, grant: &str) -> Result<Option<GrantLock>> {
        self.try_lock_named(&sha256_hex(grant)[..32])
    }

    /// [`TokenStore::try_lock_grant`] by the name of the grant's lock file.
    fn try_lock_named(&self, name: &str) -> Result<Option<GrantLock>> {
        let dir = self.lock_dir();
        if !dir.is_dir() {
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot create the token store's lock directory {}",
                            dir.display()
                        )
                    });
                }
            }
        }
        let file = dir.join(name);
        if std::fs::symlink_metadata(&file).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "the grant lock {} is a symbolic link: refusing it",
                file.display()
            );
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("cannot open the grant lock {}", file.display()))?;
        match file.try_lock() {
            Ok(()) => {
                // Created now, while the disk has room: a store write that
                // fails for want of it must still find the file to lock.
                let _ = open_lock_file(&dir.join(format!("{name}.unsaved")));
                Ok(Some(GrantLock { _file: file }))
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).context("cannot lock the grant's lock file")
            }
        }
    }

    /// Takes the grant's "unsaved" lock, by the grant's lock holder once
    /// the store refused its rotated token: held until the token is stored
    /// or superseded, it tells every other process that a live one keeps
    /// the grant's only valid refresh token (a note alone cannot: it may be
    /// stale, or a full disk may refuse it). Retried briefly: a process
    /// looking ([`TokenStore::unsaved_held`]) holds it shared for an instant.
    pub fn lock_unsaved(&self, grant: &str) -> Result<GrantLock> {
        let path = self.unsaved_lock_path(grant);
        let file = open_lock_file(&path)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(GrantLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    bail!("the grant's unsaved lock {} stays held", path.display())
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| {
                        format!("cannot lock the grant's unsaved lock {}", path.display())
                    });
                }
            }
        }
    }

    /// Whether a live process holds the grant's rotated token unsaved (its
    /// "unsaved" lock is held). Looks with a shared lock, so two processes
    /// looking at once do not see each other as the holder.
    pub fn unsaved_held(&self, grant: &str) -> Result<bool> {
        let path = self.unsaved_lock_path(grant);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(false);
        }
        let file = open_lock_file(&path)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| {
                format!("cannot look at the grant's unsaved lock {}", path.display())
            }),
        }
    }

    /// The grant's stored state. When the store has no row for it yet, a
    /// row left under another key for the same initial token file content
    /// (`seed_sha256`; the file was moved) or a per-business row of one of
    /// `businesses` (written before grants were shared) is adopted.
    pub fn get(
        &self,
        grant: &str,
        seed_sha256: Option<&str>,
        businesses: &[String],
    ) -> Result<Option<StoredGrant>> {
        if let Some(g) = self.with(|c| read_grant(c, grant))? {
            return Ok(Some(g));
        }
        // The file holds a rotated token a process keeps unsaved under
        // another name (leadsync keeps such a token in its token file too;
        // the file was moved or copied since): that chain's, while its
        // holder lives — presented here it would be spent twice. Looked at
        // before the seeds: a holder that stores it meanwhile names the
        // file's content as its seed, found below.
        let mut held_from = None;
        if let Some(fp) = seed_sha256 {
            for (name, note) in self.holding_in_file(grant, fp)? {
                match self.try_lock_named(&name)? {
                    // Its holder ended (the token is the file's: a new
                    // grant here), or stored it just now (its row names
                    // the file as its seed: taken over below).
                    Some(lock) => held_from = Some((name, lock)),
                    None => {
                        let holder = match unsaved_by(&note) {
                            Some(pid) => format!("leadsync process {pid}"),
                            None => "a leadsync process".to_string(),
                        };
                        bail!(
                            "the grant's token file holds the rotated refresh token {holder} keeps \
                             in memory, unsaved (the token store could not take it), for another \
                             token file name (the file was moved or copied since); it is used once \
                             that token is stored"
                        )
                    }
                }
            }
        }
        let moved_from = self.with(|c| {
            if read_grant(c, grant)?.is_some() {
                return Ok(None);
            }
            moved_from(c, seed_sha256)
        })?;
        // A chain is taken over from its old key only under that key's lock:
        // a refresh in flight there stores its rotated token under the old
        // key when its answer comes, and a row moved away meanwhile would
        // make that write a conflict, the rotated token dropped and the
        // spent one kept. A refresh whose rotated token the store could not
        // take keeps holding the lock, with the token in memory, until it is
        // stored. Until either ends, this key waits (an error: retried).
        // The lock, not /proc, tells whether the holder lives: under
        // systemd's ProtectProc=invisible another user's process is not in
        // /proc, and a pid seen there may be another process's.
        let _old_key_lock = match &moved_from {
            Some(from)
                if held_from
                    .as_ref()
                    .is_some_and(|(name, _)| *name == sha256_hex(from)[..32]) =>
            {
                held_from.take().map(|(_, lock)| lock)
            }
            Some(from) => match self.try_lock_grant(from)? {
                Some(lock) => Some(lock),
                // Its "unsaved" lock says whether the holder keeps a
                // rotated token; the note (maybe stale) only names it.
                None if self.unsaved_held(from).unwrap_or(false) => {
                    let holder = match self
                        .refresh_note(from)
                        .ok()
                        .flatten()
                        .as_deref()
                        .and_then(unsaved_by)
                    {
                        Some(pid) => format!("leadsync process {pid}"),
                        None => "a leadsync process".to_string(),
                    };
                    bail!(
                        "the grant's token file moved while {holder} holds the rotated refresh \
                         token of its old name ({from}) in memory, unsaved (the token store could not take it); \
                         its chain is taken over once that token is stored"
                    )
                }
                None => {
                    bail!(
                        "the grant's token file moved while a token refresh under its old name ({from}) \
                         is in flight; its chain is taken over once that refresh ends"
                    )
                }
            },
            None => None,
        };
        // The lock is free, yet a note says a process holds a rotated token
        // unsaved: that process ended (its lock ended with it) and the token
        // it held is lost. The chain is taken over as it is stored; the note
        // goes, so it blocks nothing and is not reported twice.
        if let Some(from) = &moved_from
            && let Some((pid, over)) = self.refresh_note(from)?.as_deref().and_then(unsaved_over)
        {
            // Unless its write landed after all, and it ended before it
            // cleared its note: the row is beyond the generation it replaced.
            let stored = match over {
                Some(over) => self
                    .with(|c| read_grant(c, from))?
                    .is_some_and(|g| g.generation > over),
                None => false,
            };
            if !stored {
                tracing::warn!(grant = %grant, old_name = %from,
                "leadsync process {pid} held a rotated refresh token of this grant that the token store \
                 could not take, and ended without storing it: that token is lost. The moved token file \
                 takes over the stored chain; if Thumbtack refuses its refresh token, re-authorize with \
                 `leadsync auth exchange`");
            }
            // The takeover needs no note: a failure to clear it only leaves
            // it to the old name, which no chain uses now.
            if let Err(e) = self.set_refresh_note(from, None) {
                tracing::warn!(grant = %grant, error = %format!("{e:#}"),
                    "cannot clear the stale note in the old name's grant lock");
            }
        }
        self.with(|c| {
            if let Some(g) = read_grant(c, grant)? {
                return Ok(Some(g));
            }
            adopt(c, grant, seed_sha256, moved_from.as_deref(), businesses)?;
            read_grant(c, grant)
        })
    }

    /// The lock names (see [`TokenStore::lock_path`]) of the other grants
    /// whose note says a process keeps, unsaved, the rotated token whose
    /// fingerprint is `token_sha256`, with the note. Every note file is
    /// read, not only those of stored grants: a new grant's first rotated
    /// token has no row yet. A note that cannot be read is passed over (it
    /// must not keep every new grant out).
    fn holding_in_file(&self, grant: &str, token_sha256: &str) -> Result<Vec<(String, String)>> {
        let own = &sha256_hex(grant)[..32];
        let entries = match std::fs::read_dir(self.lock_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot list the token store's lock directory {}",
                        self.lock_dir().display()
                    )
                });
            }
        };
        let mut holding = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".note")) else {
                continue;
            };
            if name == own {
                continue;
            }
            let Ok(bytes) = read_note(&entry.path()) else {
                continue;
            };
            let note = String::from_utf8_lossy(&bytes).trim().to_string();
            if unsaved_token_sha256(&note) == Some(token_sha256) {
                holding.push((name.to_string(), note));
            }
        }
        Ok(holding)
    }

    /// Whether a write works now: a committed write transaction (the
    /// header's schema version rewritten with its own value, journaled and
    /// synced like every write), asked before a single-use authorization
    /// code is spent.
    ///
    /// A store whose path no longer names the file opened is not writable:
    /// a token written into the file opened would be lost at the next
    /// start (SQLite refuses that write too, as "readonly database"; this
    /// says what happened).
    pub fn check_writable(&self) -> Result<()> {
        if let Some(why) = self.moved_away() {
            bail!(why);
        }
        self.write(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Its own value: an older leadsync (during an upgrade) must not
            // set a newer store's version back.
            let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            tx.pragma_update(None, "user_version", v)?;
            tx.commit()?;
            Ok(())
        })
        .with_context(|| format!("cannot write the token store {}", self.path.display()))
    }

    /// Stores a grant's new refresh token if the row still has generation
    /// `expected` (0: no row, or a row that never held a token).
    pub fn put(&self, grant: &str, expected: i64, w: &GrantWrite) -> Result<Written> {
        self.write(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let found: Option<i64> = tx
                .query_row(
                    "SELECT generation FROM grants WHERE grant_key = ?1",
                    [grant],
                    |r| r.get(0),
                )
                .optional()?;
            if found.unwrap_or(0) != expected {
                return Ok(Written::Conflict(found.unwrap_or(0)));
            }
            let (access, expires) = match &w.access_token {
                Some((a, e)) => (Some(a.expose()), Some(e.as_str())),
                None => (None, None),
            };
            let generation = expected + 1;
            tx.execute(
                "INSERT INTO grants (grant_key, refresh_token, generation, seed_sha256, access_token,
                     access_expires_at, source, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (grant_key) DO UPDATE SET refresh_token = excluded.refresh_token,
                     generation = excluded.generation, seed_sha256 = excluded.seed_sha256,
                     seed_prior_sha256 = CASE
                         WHEN excluded.source = 'auth exchange' THEN NULL
                         WHEN grants.seed_sha256 IS excluded.seed_sha256 THEN grants.seed_prior_sha256
                         ELSE COALESCE(grants.seed_prior_sha256, grants.seed_sha256) END,
                     access_token = excluded.access_token, access_expires_at = excluded.access_expires_at,
                     source = excluded.source, updated_at = excluded.updated_at,
                     refused_at = NULL, refused_reason = NULL",
                params![
                    grant,
                    w.refresh_token.expose(),
                    generation,
                    w.seed_sha256,
                    access,
                    expires,
                    w.source,
                    crate::time::now()
                ],
            )?;
            tx.commit()?;
            Ok(Written::Stored(generation))
        })
        .with_context(|| {
            format!(
                "cannot store the rotated refresh token of the grant in {} in {}",
                grant,
                self.path.display()
            )
        })
    }

    /// Records that Thumbtack refused the grant's token, if the row still
    /// has generation `expected`; `seed_sha256` (the token file refused, when
    /// no chain was stored) keeps a restart from presenting it again.
    /// Returns false when the row changed meanwhile (nothing written).
    pub fn mark_refused(
        &self,
        grant: &str,
        expected: i64,
        seed_sha256: Option<&str>,
        reason: &str,
    ) -> Result<bool> {
        self.write(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let found: Option<i64> = tx
                .query_row(
                    "SELECT generation FROM grants WHERE grant_key = ?1",
                    [grant],
                    |r| r.get(0),
                )
                .optional()?;
            if found.unwrap_or(0) != expected {
                return Ok(false);
            }
            let now = crate::time::now();
            tx.execute(
                "INSERT INTO grants (grant_key, refresh_token, generation, seed_sha256, source,
                     updated_at, refused_at, refused_reason)
                 VALUES (?1, '', 0, ?2, 'refused', ?3, ?3, ?4)
                 ON CONFLICT (grant_key) DO UPDATE SET refused_at = excluded.refused_at,
                     refused_reason = excluded.refused_reason, access_token = NULL,
                     access_expires_at = NULL,
                     seed_sha256 = COALESCE(excluded.seed_sha256, seed_sha256)",
                params![grant, seed_sha256, now, reason],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Records that Thumbtack refused a token file content while the stored
    /// chain stays in use (a stale or mistyped file).
    pub fn mark_file_refused(&self, grant: &str, file_sha256: &str) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE grants SET file_refused_sha256 = ?2 WHERE grant_key = ?1",
                params![grant, file_sha256],
            )?;
            Ok(())
        })
    }

    /// Forgets a stored access token the API refused (401), so no process adopts it.
    pub fn forget_access(&self, grant: &str, access_token: &Secret) -> Result<()> {
        self.write(|c| {
            c.execute(
                "UPDATE grants SET access_token = NULL, access_expires_at = NULL
                  WHERE grant_key = ?1 AND access_token = ?2",
                params![grant, access_token.expose()],
            )?;
            Ok(())
        })
    }
}

/// The most of a note file read: a note is one short line.
const MAX_NOTE_BYTES: u64 = 4096;

/// A note file's bytes (at most [`MAX_NOTE_BYTES`]): a regular file, never
/// read through a symbolic link — its content goes into logs and `status`,
/// and must not be another file's. (libc is not a dependency, so no
/// O_NOFOLLOW: the path is checked, then the file opened is checked to be
/// the one checked.)
fn read_note(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let not_regular = || std::io::Error::other("not a regular file (a symbolic link?): not read");
    let checked = std::fs::symlink_metadata(path)?;
    if !checked.is_file() {
        return Err(not_regular());
    }
    let file = File::open(path)?;
    let opened = file.metadata()?;
    if !opened.is_file() || (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    file.take(MAX_NOTE_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens (creating, mode 0600) a lock file that is not a symlink.
fn open_lock_file(path: &Path) -> Result<File> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "the lock {} is a symbolic link: refusing it",
            path.display()
        );
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the lock {}", path.display()))
}

fn migrate(c: &Connection) -> Result<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(super::NewerSchema {
            what: "the token store",
            found: version,
            known: SCHEMA_VERSION,
        }
        .into());
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    c.execute_batch("BEGIN IMMEDIATE")?;
    // 2 -> 3 adds a column, looked for inside the write transaction (a
    // second process may be migrating too).
    let rest = || -> Result<()> {
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS refresh_tokens (
             business_id    TEXT PRIMARY KEY,
             refresh_token  TEXT NOT NULL,
             generation     INTEGER NOT NULL,
             seed_sha256    TEXT,
             source         TEXT NOT NULL,
             updated_at     TEXT NOT NULL,
             refused_at     TEXT,
             refused_reason TEXT
         );
         CREATE TABLE IF NOT EXISTS grants (
             grant_key           TEXT PRIMARY KEY,
             refresh_token       TEXT NOT NULL,
             generation          INTEGER NOT NULL,
             seed_sha256         TEXT,
             seed_prior_sha256   TEXT,
             file_refused_sha256 TEXT,
             access_token        TEXT,
             access_expires_at   TEXT,
             source              TEXT NOT NULL,
             updated_at          TEXT NOT NULL,
             refused_at          TEXT,
             refused_reason      TEXT
         );
         ",
        )?;
        let has_prior: i64 = c.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('grants') WHERE name = 'seed_prior_sha256'",
            [],
            |r| r.get(0),
        )?;
        if has_prior == 0 {
            c.execute_batch("ALTER TABLE grants ADD COLUMN seed_prior_sha256 TEXT")?;
        }
        c.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        c.execute_batch("COMMIT")?;
        Ok(())
    };
    rest().inspect_err(|_| {
        let _ = c.execute_batch("ROLLBACK");
    })
}

fn read_grant(c: &Connection, grant: &str) -> Result<Option<StoredGrant>> {
    Ok(c.query_row(
        "SELECT refresh_token, generation, seed_sha256, file_refused_sha256, access_token,
                access_expires_at, refused_reason, seed_prior_sha256
           FROM grants WHERE grant_key = ?1",
        [grant],
        |r| {
            let access: Option<String> = r.get(4)?;
            let expires: Option<String> = r.get(5)?;
            Ok(StoredGrant {
                refresh_token: Secret::new(r.get::<_, String>(0)?),
                generation: r.get(1)?,
                seed_sha256: r.get(2)?,
                file_refused_sha256: r.get(3)?,
                access_token: access.zip(expires).map(|(a, e)| (Secret::new(a), e)),
                refused: r.get(6)?,
                seed_prior_sha256: r.get(7)?,
            })
        },
    )
    .optional()?)
}

/// Moves a row stored under another key (same initial file content) or a
/// per-business row of the old schema to `grant`, in one transaction.
/// The key of a chain whose token file moved: the newest usable row for the
/// same initial file content whose file is gone. A file that still exists
/// names a live grant of its own (two files with the same content are two
/// grants), and taking its row would let two chains refresh one token.
fn moved_from(c: &Connection, seed_sha256: Option<&str>) -> Result<Option<String>> {
    let Some(seed) = seed_sha256 else {
        return Ok(None);
    };
    let from: Option<String> = c
        .query_row(
            "SELECT grant_key FROM grants
              WHERE (seed_sha256 = ?1 OR seed_prior_sha256 = ?1) AND refused_at IS NULL
              ORDER BY updated_at DESC LIMIT 1",
            [seed],
            |r| r.get(0),
        )
        .optional()?;
    Ok(from.filter(|k| !Path::new(k).exists()))
}

/// Gives `grant` a stored chain when it has none: the one of a moved file
/// (only `locked_from`, whose lock the caller holds), or a per-business row.
fn adopt(
    c: &mut Connection,
    grant: &str,
    seed_sha256: Option<&str>,
    locked_from: Option<&str>,
    businesses: &[String],
) -> Result<()> {
    // Plain reads first: nothing to adopt is the common case, and it must
    // not wait for another process's write lock.
    let by_seed = match seed_sha256 {
        Some(seed) => c
            .query_row(
                "SELECT 1 FROM grants
                  WHERE (seed_sha256 = ?1 OR seed_prior_sha256 = ?1) AND refused_at IS NULL LIMIT 1",
                [seed],
                |_| Ok(()),
            )
            .optional()?
            .is_some(),
        None => false,
    };
    let mut legacy = false;
    for b in businesses {
        legacy |= c
            .query_row(
                "SELECT 1 FROM refresh_tokens WHERE business_id = ?1",
                [b],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
    }
    if !by_seed && !legacy {
        return Ok(());
    }
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if tx
        .query_row("SELECT 1 FROM grants WHERE grant_key = ?1", [grant], |_| {
            Ok(())
        })
        .optional()?
        .is_some()
    {
        return Ok(());
    }
    if seed_sha256.is_some() {
        // The candidate again, inside the transaction: moved only if it is
        // still the one whose lock is held.
        let from = moved_from(&tx, seed_sha256)?.filter(|f| Some(f.as_str()) == locked_from);
        let moved = match from {
            Some(from) => tx.execute(
                "UPDATE grants SET grant_key = ?1 WHERE grant_key = ?2",
                params![grant, from],
            )?,
            None => 0,
        };
        if moved > 0 {
            tracing::info!(
                grant,
                "the grant's token file moved: adopting its stored chain"
            );
            tx.commit()?;
            return Ok(());
        }
    }
    // The newest usable per-business token of the grant's businesses wins:
    // two businesses given the same initial token had two chains, and only
    // the one rotated last can still be valid.
    let mut best: Option<(String, String, i64, Option<String>)> = None;
    for b in businesses {
        let row: Option<(String, String, i64, Option<String>)> = tx
            .query_row(
                "SELECT refresh_token, updated_at, generation, seed_sha256 FROM refresh_tokens
                  WHERE business_id = ?1 AND refresh_token <> '' AND refused_at IS NULL",
                [b],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        if let Some(row) = row
            && best.as_ref().is_none_or(|b| row.1 > b.1)
        {
            best = Some(row);
        }
    }
    if let Some((token, _, generation, seed)) = best {
        tx.execute(
            "INSERT INTO grants (grant_key, refresh_token, generation, seed_sha256, source, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'adopted', ?5)",
            params![grant, token, generation.max(1), seed, crate::time::now()],
        )?;
        for b in businesses {
            tx.execute("DELETE FROM refresh_tokens WHERE business_id = ?1", [b])?;
        }
        tracing::info!(
            grant,
            "adopted a per-business token of an older token store as the grant's chain"
        );
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(token: &str) -> GrantWrite {
        GrantWrite {
            refresh_token: Secret::new(token),
            access_token: None,
            seed_sha256: None,
            source: "refresh".into(),
        }
    }

    #[test]
    fn a_shared_sticky_or_group_writable_directory_is_a_warning_not_a_refusal() {
        // Review (authfix): refusing these broke `demo --database /tmp/d.db`,
        // umask-002 homes and the old /var/lib/leadsync/tokens.db path.
        use std::os::unix::fs::PermissionsExt;
        for mode in [0o1777, 0o775, 0o770] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let s = TokenStore::open(&dir.path().join("tokens.db"))
                .unwrap_or_else(|e| panic!("mode {mode:o}: {e:#}"));
            assert_eq!(s.put("g", 0, &write("a")).unwrap(), Written::Stored(1));
        }
    }

    #[test]
    fn a_directory_another_user_owns_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let me = current_uid().unwrap();
        let other = if me == 65534 { 65533 } else { 65534 };
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("theirs");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        if std::os::unix::fs::chown(&sub, Some(other), None).is_err() {
            eprintln!("skipped: cannot chown (not root)");
            return;
        }
        let e = TokenStore::open(&sub.join("tokens.db"))
            .err()
            .expect("refused");
        let msg = format!("{e:#}");
        // As root, the check for root-owned files in another user's place
        // answers first ("belongs to nobody"); as another user, this one.
        assert!(msg.contains("belongs to"), "{msg}");
        assert!(!msg.contains("chmod"), "{msg}");
        assert!(!sub.join("tokens.db").exists());
    }

    #[test]
    fn the_write_check_keeps_the_stores_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let s = TokenStore::open(&path).unwrap();
        // A newer leadsync's store, opened by this one during an upgrade.
        let newer = SCHEMA_VERSION + 1;
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", newer)
            .unwrap();
        s.check_writable().unwrap();
        let v: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, newer);
    }

    #[test]
    fn a_version_2_store_gains_the_prior_seed_and_keeps_its_grants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE grants (
                     grant_key TEXT PRIMARY KEY, refresh_token TEXT NOT NULL,
                     generation INTEGER NOT NULL, seed_sha256 TEXT, file_refused_sha256 TEXT,
                     access_token TEXT, access_expires_at TEXT, source TEXT NOT NULL,
                     updated_at TEXT NOT NULL, refused_at TEXT, refused_reason TEXT);
                 INSERT INTO grants (grant_key, refresh_token, generation, seed_sha256, source,
                     updated_at) VALUES ('g', 't', 4, 'seed0', 'refresh', 'x');
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let s = TokenStore::open(&path).unwrap();
        let g = s.get("g", None, &[]).unwrap().unwrap();
        assert_eq!((g.generation, g.seed_sha256.as_deref()), (4, Some("seed0")));
        // A rotated token kept in the file names a new seed; the old one
        // stays the chain's prior seed.
        let w = GrantWrite {
            seed_sha256: Some("seed1".into()),
            ..write("t2")
        };
        assert_eq!(s.put("g", 4, &w).unwrap(), Written::Stored(5));
        let g = s.get("g", None, &[]).unwrap().unwrap();
        assert_eq!(g.seed_prior_sha256.as_deref(), Some("seed0"));
        // A new grant (`auth exchange`) has none.
        let w = GrantWrite {
            seed_sha256: Some("seed2".into()),
            source: "auth exchange".into(),
            ..write("e")
        };
        assert_eq!(s.put("g", 5, &w).unwrap(), Written::Stored(6));
        assert_eq!(
            s.get("g", None, &[]).unwrap().unwrap().seed_prior_sha256,
            None
        );
        let v: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn a_store_moved_aside_is_named_and_refuses_a_refresh_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        let path = private.join("tokens.db");
        let s = TokenStore::open(&path).unwrap();
        assert_eq!(s.moved_away(), None);
        // `mv private private.old` under a running daemon.
        std::fs::rename(&private, dir.path().join("private.old")).unwrap();
        let why = s.moved_away().expect("a moved-aside store is a problem");
        assert!(why.contains(&path.display().to_string()), "{why}");
        assert!(why.contains("token store"), "{why}");
        let watch = s.watch();
        assert_eq!(watch.path, path);
        // An empty store made at the path is not the file opened either.
        std::fs::create_dir(&private).unwrap();
        drop(TokenStore::open(&path).unwrap());
        assert!(s.moved_away().is_some());
        // Put back, it is the file opened again.
        std::fs::remove_dir_all(&private).unwrap();
        std::fs::rename(dir.path().join("private.old"), &private).unwrap();
        assert_eq!(s.moved_away(), None);
    }

    #[test]
    fn a_write_that_fails_for_storage_is_watched_until_writes_work_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let watch = s.watch().writes;
        watch.set_quiet(std::time::Duration::ZERO);
        assert!(s.put("g", 0, &write("a")).is_ok());
        assert!(watch.failure().is_none());
        // A read-only store (as a file system turned read-only answers).
        s.set_query_only(true);
        assert!(s.put("g", 1, &write("b")).is_err());
        let (why, _) = watch.failure().expect("the failed write is watched");
        assert!(why.contains("readonly"), "{why}");
        s.set_query_only(false);
        assert!(s.put("g", 1, &write("b")).is_ok());
        assert!(watch.failure().is_none());
    }

    /// A call that succeeds without writing a page (a put that lost its
    /// compare-and-set, a forget that matched nothing) succeeds on a full
    /// disk too: it is no proof that writes work again, and counted as one
    /// it turned `/healthz` 200 while a rotated token waited in memory.
    #[test]
    fn a_call_that_writes_no_page_does_not_clear_a_storage_failure() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let watch = s.watch().writes;
        watch.set_quiet(std::time::Duration::ZERO);
        assert_eq!(s.put("g", 0, &write("a")).unwrap(), Written::Stored(1));
        s.set_query_only(true);
        assert!(s.put("g", 1, &write("b")).is_err());
        s.set_query_only(false);
        assert!(matches!(
            s.put("g", 0, &write("c")),
            Ok(Written::Conflict(_))
        ));
        assert!(
            watch.failure().is_some(),
            "cleared by a put that wrote nothing"
        );
        assert_eq!(s.put("g", 1, &write("b")).unwrap(), Written::Stored(2));
        assert!(watch.failure().is_none());
    }

    #[test]
    fn writes_are_compare_and_set_on_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        assert_eq!(s.put("g", 0, &write("a")).unwrap(), Written::Stored(1));
        assert_eq!(s.put("g", 0, &write("b")).unwrap(), Written::Conflict(1));
        assert_eq!(s.put("g", 1, &write("c")).unwrap(), Written::Stored(2));
        // A refusal seen by a writer that read generation 1 must not mark the newer token.
        assert!(!s.mark_refused("g", 1, None, "invalid_grant").unwrap());
        let g = s.get("g", None, &[]).unwrap().unwrap();
        assert_eq!(g.refresh_token.expose(), "c");
        assert!(g.refused.is_none());
        assert!(s.mark_refused("g", 2, None, "invalid_grant").unwrap());
        assert!(s.get("g", None, &[]).unwrap().unwrap().refused.is_some());
    }

    #[test]
    fn a_moved_token_file_keeps_its_chain_but_a_live_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let old = dir.path().join("old");
        std::fs::write(&old, "t0").unwrap();
        let old_key = old.display().to_string();
        let w = GrantWrite {
            seed_sha256: Some(sha256_hex("t0")),
            ..write("t1")
        };
        s.put(&old_key, 0, &w).unwrap();
        // Another file with the same content while the first still exists: its own grant.
        assert!(
            s.get("copy", Some(&sha256_hex("t0")), &[])
                .unwrap()
                .is_none()
        );
        // The file moved: the chain follows it.
        std::fs::remove_file(&old).unwrap();
        let g = s.get("new", Some(&sha256_hex("t0")), &[]).unwrap().unwrap();
        assert_eq!(g.refresh_token.expose(), "t1");
        assert!(s.get(&old_key, None, &[]).unwrap().is_none());
    }

    /// A refresh whose rotated token could not be stored (disk full) keeps
    /// it in memory and holds the grant's lock until it stores it under the
    /// old key. A moved file taking the row meanwhile made that write a
    /// conflict: the rotated token dropped, the spent one kept, the grant
    /// lost. The lock says the holder lives, not `/proc`: under systemd's
    /// `ProtectProc=invisible` another user's process is not there (the pid
    /// in the note is one this process cannot see).
    #[test]
    fn a_moved_file_never_takes_a_chain_whose_rotated_token_is_unsaved() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let old_key = dir.path().join("old").display().to_string();
        let seed = sha256_hex("t0");
        let w = |t: &str| GrantWrite {
            seed_sha256: Some(seed.clone()),
            ..write(t)
        };
        assert_eq!(s.put(&old_key, 0, &w("t1")).unwrap(), Written::Stored(1));
        let holder = s.try_lock_grant(&old_key).unwrap().expect("free");
        let holding = s.lock_unsaved(&old_key).unwrap();
        s.set_refresh_note(&old_key, Some(&unsaved_note(u32::MAX - 1, 1, None)))
            .unwrap();
        let during = s.get("new", Some(&seed), &[]);
        let Err(e) = during else {
            panic!(
                "taken while the rotated token is unsaved: {:?}",
                during.map(|g| g.map(|g| g.generation))
            );
        };
        assert!(format!("{e:#}").contains("unsaved"), "{e:#}");
        // The message names the file; a temporary directory's random name
        // can hold "t1" itself (`/tmp/.tmpt1vRNh`), which is not the token.
        let shown = format!("{e:#}").replace(&dir.path().display().to_string(), "<dir>");
        assert!(!shown.contains("t1"), "{e:#}");
        // Stored at last: the holder clears its note, then lets go.
        assert_eq!(s.put(&old_key, 1, &w("t2")).unwrap(), Written::Stored(2));
        s.set_refresh_note(&old_key, None).unwrap();
        drop(holding);
        drop(holder);
        let g = s.get("new", Some(&seed), &[]).unwrap().expect("adopted");
        assert_eq!(g.refresh_token.expose(), "t2");
    }

    /// A new grant's first rotated token (no row yet) that the store
    /// refused is kept in its token file, and the file is moved: its
    /// content matches no stored row, but the holder's note names it. The
    /// new name waits while the holder lives; once it ended, the token in
    /// the file is the new name's (a new grant).
    #[test]
    fn a_file_holding_an_unsaved_token_of_a_grant_without_a_row_waits_for_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let old_key = dir.path().join("old").display().to_string();
        let fp = sha256_hex("t1");
        let holder = s.try_lock_grant(&old_key).unwrap().expect("free");
        let holding = s.lock_unsaved(&old_key).unwrap();
        s.set_refresh_note(&old_key, Some(&unsaved_note(u32::MAX - 1, 0, Some(&fp))))
            .unwrap();
        let during = s.get("new", Some(&fp), &[]);
        let Err(e) = during else {
            panic!("taken for a new grant while its holder lives");
        };
        assert!(format!("{e:#}").contains("unsaved"), "{e:#}");
        // Another content is not held.
        assert!(
            s.get("new", Some(&sha256_hex("t0")), &[])
                .unwrap()
                .is_none()
        );
        drop(holding);
        drop(holder);
        assert!(s.get("new", Some(&fp), &[]).unwrap().is_none());
    }

    /// A process that ended holding an unsaved rotated token (killed, or
    /// stopped while the store still failed) leaves its note, but its lock
    /// ends with it: the token it held is gone with it. The note must not
    /// keep the chain from its moved file forever (a pid in /proc proves
    /// nothing: reused, or this very process); it is cleared and the chain
    /// taken over.
    #[test]
    fn a_note_whose_holder_is_gone_is_cleared_and_the_chain_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let old_key = dir.path().join("old").display().to_string();
        let seed = sha256_hex("u0");
        let w = GrantWrite {
            seed_sha256: Some(seed.clone()),
            ..write("u1")
        };
        assert_eq!(s.put(&old_key, 0, &w).unwrap(), Written::Stored(1));
        // Its writer held the lock, and ended. The pid is a live one (this
        // process's), which holds no lock.
        drop(s.try_lock_grant(&old_key).unwrap().expect("free"));
        s.set_refresh_note(&old_key, Some(&unsaved_note(std::process::id(), 1, None)))
            .unwrap();
        let g = s.get("new", Some(&seed), &[]).unwrap().expect("adopted");
        assert_eq!(g.refresh_token.expose(), "u1");
        assert_eq!(s.refresh_note(&old_key).unwrap(), None);
    }

    /// The token file moved (and the configuration reloaded) while a refresh
    /// of the grant under its old name is in flight: that refresh stores
    /// the rotated token under the old key when its answer comes. Taking the
    /// row over meanwhile made that write a conflict, and the rotated token
    /// was dropped while the new key kept the spent one: the grant was lost.
    /// The new key waits for the old one's lock instead.
    #[test]
    fn a_moved_file_never_takes_the_chain_from_a_refresh_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let old = dir.path().join("old");
        let old_key = old.display().to_string();
        let seed = sha256_hex("t0");
        let w = |t: &str| GrantWrite {
            seed_sha256: Some(seed.clone()),
            ..write(t)
        };
        assert_eq!(s.put(&old_key, 0, &w("t1")).unwrap(), Written::Stored(1));
        // The old chain's refresh is out (it holds its grant's lock); the
        // file is gone, moved to its new name.
        let refreshing = s.try_lock_grant(&old_key).unwrap().expect("free");
        let during = s.get("new", Some(&seed), &[]);
        assert!(
            during.as_ref().is_err(),
            "the new key must not be handed the old token while its refresh is out: {:?}",
            during.map(|g| g.map(|g| g.refresh_token.expose().to_string()))
        );
        // Its answer is stored where it was read.
        assert_eq!(s.put(&old_key, 1, &w("t2")).unwrap(), Written::Stored(2));
        drop(refreshing);
        let g = s.get("new", Some(&seed), &[]).unwrap().expect("adopted");
        assert_eq!(
            g.refresh_token.expose(),
            "t2",
            "the rotated token follows the file"
        );
    }

    /// A token store from a newer leadsync is the typed error the CLI
    /// turns into exit 78 (no restart loop), naming the token store.
    #[test]
    fn a_token_store_from_a_newer_leadsync_is_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        drop(TokenStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = TokenStore::open(&path).err().expect("refused");
        let newer = e
            .chain()
            .find_map(|c| c.downcast_ref::<super::super::NewerSchema>())
            .expect("a NewerSchema");
        assert_eq!(
            (newer.what, newer.found),
            ("the token store", SCHEMA_VERSION + 1)
        );
    }

    #[test]
    fn commits_sync_the_directory_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let (sync, journal): (i64, String) = s
            .with(|c| {
                Ok((
                    c.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
                    c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
                ))
            })
            .unwrap();
        // 3 = EXTRA: with a rollback journal, FULL alone may lose a commit at a power cut.
        assert_eq!((sync, journal.as_str()), (3, "delete"));
    }

    /// The note says a refresh was sent whose answer may not be stored, or
    /// that a process holds a rotated token unsaved: the next process must
    /// learn it. Rewriting it in place (truncate, then write) lost it when
    /// the write failed (disk full, EIO) or the process died in between —
    /// the file left empty, or holding half a note that reads as another
    /// (a pid cut short names another process).
    #[test]
    fn a_note_rewrite_that_fails_part_way_keeps_the_previous_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let s = TokenStore::open(&path).unwrap();
        let held = s.try_lock_grant("g").unwrap().expect("free");
        let previous = unsaved_note(123_456, 7, None);
        s.set_refresh_note("g", Some(&previous)).unwrap();
        let full_disk = |f: &mut File, bytes: &[u8]| -> std::io::Result<()> {
            use std::io::Write;
            f.write_all(&bytes[..bytes.len() / 2])?;
            Err(std::io::Error::from_raw_os_error(28))
        };
        let killed_before_writing = |_: &mut File, _: &[u8]| -> std::io::Result<()> {
            Err(std::io::Error::other("killed (test)"))
        };
        for (what, fault) in [
            (
                "a write cut short",
                &full_disk as &dyn Fn(&mut File, &[u8]) -> _,
            ),
            ("no write at all", &killed_before_writing),
        ] {
            for next in [
                Some("sent at 2026-11-29T00:00:00Z by leadsync process 42"),
                Some(unsaved_note(99, 8, None).as_str()),
            ] {
                assert!(s.set_refresh_note_with("g", next, fault).is_err(), "{what}");
                assert_eq!(
                    s.refresh_note("g").unwrap().as_deref(),
                    Some(previous.as_str()),
                    "{what} lost the previous note"
                );
            }
        }
        // A rewrite that succeeds replaces it whole, and the lock is still
        // the one other handles meet (not a file renamed from under it).
        let other = TokenStore::open(&path).unwrap();
        s.set_refresh_note(
            "g",
            Some("sent at 2026-11-29T00:00:01Z by leadsync process 42"),
        )
        .unwrap();
        assert_eq!(
            other.refresh_note("g").unwrap().as_deref(),
            Some("sent at 2026-11-29T00:00:01Z by leadsync process 42")
        );
        assert!(
            other.try_lock_grant("g").unwrap().is_none(),
            "lock identity lost"
        );
        s.set_refresh_note("g", None).unwrap();
        assert_eq!(other.refresh_note("g").unwrap(), None);
        assert!(
            other.try_lock_grant("g").unwrap().is_none(),
            "lock identity lost"
        );
        drop(held);
        assert!(other.try_lock_grant("g").unwrap().is_some());
    }

    /// An older leadsync wrote its note into the lock file itself: it is
    /// still read (a refresh it cut short is still named), and cleared in
    /// place with the next write, the lock kept. A temporary note left by
    /// a process that died writing it is never read.
    #[test]
    fn a_note_in_the_lock_file_of_an_older_leadsync_is_read_and_cleared_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let held = s.try_lock_grant("g").unwrap().expect("free");
        let old = "sent at 2026-11-28T00:00:00Z by leadsync process 7";
        std::fs::write(s.lock_path("g"), format!("{old}\n")).unwrap();
        std::fs::write(
            s.lock_dir()
                .join(format!("{}.note.tmp", &sha256_hex("g")[..32])),
            "rotated refresh token not stored yet, held in memory by leadsync process 1",
        )
        .unwrap();
        assert_eq!(s.refresh_note("g").unwrap().as_deref(), Some(old));
        s.set_refresh_note(
            "g",
            Some("sent at 2026-11-29T00:00:00Z by leadsync process 8"),
        )
        .unwrap();
        assert_eq!(std::fs::metadata(s.lock_path("g")).unwrap().len(), 0);
        s.set_refresh_note("g", None).unwrap();
        assert_eq!(s.refresh_note("g").unwrap(), None);
        std::fs::write(s.lock_path("g"), format!("{old}\n")).unwrap();
        s.set_refresh_note("g", None).unwrap();
        assert_eq!(s.refresh_note("g").unwrap(), None);
        assert!(
            s.try_lock_grant("g").unwrap().is_none(),
            "lock identity lost"
        );
        drop(held);
    }

    /// The note goes into logs and `status`: a note file that is a link
    /// (to another file of the service user's) is never read, nor is
    /// more of a note than a note can be.
    #[test]
    fn a_symlinked_note_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let held = s.try_lock_grant("g").unwrap().expect("free");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "SECRET-CONTENT").unwrap();
        std::os::unix::fs::symlink(&secret, s.note_path("g")).unwrap();
        match s.refresh_note("g") {
            Ok(note) => assert!(
                !note.unwrap_or_default().contains("SECRET"),
                "the link was followed"
            ),
            Err(e) => {
                let e = format!("{e:#}");
                assert!(!e.contains("SECRET"), "{e}");
                assert!(e.contains("not a regular file"), "{e}");
            }
        }
        std::fs::remove_file(s.note_path("g")).unwrap();
        std::fs::write(s.note_path("g"), "x".repeat(1 << 20)).unwrap();
        assert_eq!(s.refresh_note("g").unwrap().unwrap().len(), NOTE_MAX);
        drop(held);
    }

    #[test]
    fn the_grant_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.db");
        let a = TokenStore::open(&path).unwrap();
        let b = TokenStore::open(&path).unwrap();
        let held = a.try_lock_grant("g").unwrap();
        assert!(held.is_some());
        assert!(b.try_lock_grant("g").unwrap().is_none());
        assert!(b.try_lock_grant("other").unwrap().is_some());
        drop(held);
        assert!(b.try_lock_grant("g").unwrap().is_some());
    }

    #[test]
    fn a_symlinked_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.db");
        TokenStore::open(&real).unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = TokenStore::open(&link).err().unwrap();
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
    }
}
