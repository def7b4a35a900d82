//! SQLite: the only module that writes SQL. One writer thread owns the
//! daemon's connection; readers (sqlite3, Datasette, the CLI) never block it
//! thanks to WAL.

pub mod backup;
pub mod gauges;
pub mod messages;
pub mod mirror;
pub mod outbox;
pub mod requests;
pub mod retention;
pub mod tokens;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a statement waits for another writer (the partner's program, say)
/// before it fails with "database is locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The numbered migrations; `PRAGMA user_version` records the last applied.
fn migrations() -> Vec<(i64, String)> {
    let checks = include_str!("migrations/outbox_checks.sql");
    let v1 = format!(
        "{}\nCREATE TRIGGER outbox_validate_insert BEFORE INSERT ON outbox BEGIN\n{checks}END;\n\
         CREATE TRIGGER outbox_validate_update BEFORE UPDATE OF negotiation_id, business_id, status, \
         partner_status_changed_at, invoice_amount_in_cents ON outbox BEGIN\n{checks}END;\n",
        include_str!("migrations/0001_initial.sql")
    );
    let checks3 = include_str!("migrations/0003_outbox_checks.sql");
    let v3 = format!(
        "{}\nCREATE TRIGGER outbox_validate_insert BEFORE INSERT ON outbox BEGIN\n{checks3}END;\n\
         CREATE TRIGGER outbox_validate_update BEFORE UPDATE OF negotiation_id, business_id, status, \
         partner_status_changed_at, invoice_amount_in_cents ON outbox BEGIN\n{OUTBOX_FROZEN}{checks3}END;\n",
        include_str!("migrations/0003_outbox.sql")
    );
    let checks13 = include_str!("migrations/0013_outbox_checks.sql");
    let v13 = format!(
        "{}\nDROP TRIGGER IF EXISTS outbox_validate_insert;\nDROP TRIGGER IF EXISTS outbox_validate_update;\n\
         CREATE TRIGGER outbox_validate_insert BEFORE INSERT ON outbox BEGIN\n{checks3}{checks13}END;\n\
         CREATE TRIGGER outbox_validate_update BEFORE UPDATE OF negotiation_id, business_id, status, \
         partner_status_changed_at, invoice_amount_in_cents ON outbox BEGIN\n{OUTBOX_FROZEN}{checks3}{checks13}END;\n",
        include_str!("migrations/0013_outbox_input_edges.sql")
    );
    let checks17 = include_str!("migrations/0017_outbox_checks.sql");
    let v17 = format!(
        "{}\nDROP TRIGGER IF EXISTS outbox_validate_insert;\nDROP TRIGGER IF EXISTS outbox_validate_update;\n\
         CREATE TRIGGER outbox_validate_insert BEFORE INSERT ON outbox BEGIN\n{checks3}{checks17}END;\n\
         CREATE TRIGGER outbox_validate_update BEFORE UPDATE OF negotiation_id, business_id, status, \
         partner_status_changed_at, invoice_amount_in_cents ON outbox BEGIN\n{OUTBOX_FROZEN}{checks3}{checks17}END;\n",
        include_str!("migrations/0017_outbox_order.sql")
    );
    vec![
        (1, v1),
        (
            2,
            include_str!("migrations/0002_lead_shapes.sql").to_string(),
        ),
        (3, v3),
        (4, include_str!("migrations/0004_webhooks.sql").to_string()),
        (
            5,
            include_str!("migrations/0005_sync_requests.sql").to_string(),
        ),
        (
            6,
            include_str!("migrations/0006_auth_alerts.sql").to_string(),
        ),
        (7, include_str!("migrations/0007_messages.sql").to_string()),
        (
            8,
            include_str!("migrations/0008_outbox_identity.sql").to_string(),
        ),
        (
            9,
            include_str!("migrations/0009_created_at_millis.sql").to_string(),
        ),
        (
            10,
            include_str!("migrations/0010_change_kinds.sql").to_string(),
        ),
        (
            11,
            include_str!("migrations/0011_present_by_business.sql").to_string(),
        ),
        (
            12,
            include_str!("migrations/0012_message_times_millis.sql").to_string(),
        ),
        (13, v13),
        (
            14,
            include_str!("migrations/0014_webhook_triggered_at.sql").to_string(),
        ),
        (
            16,
            include_str!("migrations/0016_sync_request_checks.sql").to_string(),
        ),
        (17, v17),
        (
            18,
            include_str!("migrations/0018_listing_confirmations.sql").to_string(),
        ),
        (
            19,
            include_str!("migrations/0019_retention.sql").to_string(),
        ),
        (
            20,
            ["outbox", "message_outbox"]
                .map(|table| {
                    include_str!("migrations/0020_waits_follow_triggers.sql")
                        .replace("{table}", table)
                })
                .concat()
                + include_str!("migrations/0020_waits_follow_rows.sql"),
        ),
        (
            21,
            include_str!("migrations/0021_listing_read_at.sql").to_string(),
        ),
        (
            22,
            include_str!("migrations/0022_business_filled.sql").to_string(),
        ),
        (
            23,
            include_str!("migrations/0023_wait_rebased_at.sql").to_string(),
        ),
        (
            24,
            include_str!("migrations/0024_message_poll_backoff.sql").to_string(),
        ),
        (25, include_str!("migrations/0025_claim_id.sql").to_string()),
        (
            26,
            include_str!("migrations/0026_sync_requests_started_open.sql").to_string(),
        ),
    ]
}

/// The CHECK on `negotiation_changes.kind` before schema 10, and after.
const KIND_CHECK_IN: &str = "CHECK (kind IN ('new', 'changed', 'missing', 'reappeared'))";
const KIND_CHECK_OR: &str =
    "CHECK (kind = 'new' OR kind = 'changed' OR kind = 'missing' OR kind = 'reappeared')";

/// Schema 10, before its script: `negotiation_changes` rebuilt with its CHECK
/// on `kind` written with OR instead of IN (SQLite cannot alter a CHECK; see
/// 0010_change_kinds.sql for why). The new table is the old one's own
/// definition with only that text changed, so columns a user added are kept;
/// every row is copied with its id (the change feed's cursor). Indexes and
/// triggers a user put on the table go with DROP TABLE, so they are read
/// first and created again on the new table; views name the table and read
/// the new one. Left as it is when the CHECK is not the one leadsync wrote.
fn rebuild_negotiation_changes(tx: &Connection) -> Result<()> {
    let table: String = tx.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'negotiation_changes'",
        [],
        |r| r.get(0),
    )?;
    if !table.contains(KIND_CHECK_IN) {
        return Ok(());
    }
    // A name nothing in the schema has (a partner's table may be called
    // negotiation_changes_v10).
    let tmp = free_name(tx, "negotiation_changes_v10")?;
    let create =
        table
            .replacen("negotiation_changes", &tmp, 1)
            .replacen(KIND_CHECK_IN, KIND_CHECK_OR, 1);
    // The columns rows are copied by: not `SELECT *`, which includes the
    // generated columns a user may have added (they take no value).
    let columns: Vec<String> = tx
        .prepare("SELECT name FROM pragma_table_xinfo('negotiation_changes') WHERE hidden = 0")?
        .query_map([], |r| r.get::<_, String>(0))?
        .map(|name| name.map(|n| format!("\"{}\"", n.replace('"', "\"\""))))
        .collect::<rusqlite::Result<_>>()?;
    let columns = columns.join(", ");
    let kept: Vec<String> = tx
        .prepare(
            "SELECT sql FROM sqlite_master
              WHERE tbl_name = 'negotiation_changes' COLLATE NOCASE AND type IN ('index', 'trigger')
                AND sql IS NOT NULL
                AND name COLLATE NOCASE NOT IN ('negotiation_changes_by_negotiation',
                                                'negotiation_changes_news_by_business')
              ORDER BY type = 'trigger', rowid",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    tx.execute_batch(&create)?;
    tx.execute_batch(&format!(
        "INSERT INTO \"{tmp}\" ({columns}) SELECT {columns} FROM negotiation_changes;
         DROP TABLE negotiation_changes;"
    ))?;
    // Legacy mode: a modern RENAME re-checks every view and trigger of the
    // schema, and one naming negotiation_changes fails while it is missing.
    tx.pragma_update(None, "legacy_alter_table", true)?;
    let renamed = tx.execute_batch(&format!(
        "ALTER TABLE \"{tmp}\" RENAME TO negotiation_changes"
    ));
    tx.pragma_update(None, "legacy_alter_table", false)?;
    renamed?;
    for sql in kept {
        tx.execute_batch(&sql)
            .with_context(|| format!("cannot re-create on negotiation_changes: {sql}"))?;
    }
    Ok(())
}

/// First statement of the outbox's UPDATE trigger (schema 3): a row's content
/// is what was (or is being) sent once it leaves `pending`.
const OUTBOX_FROZEN: &str = "SELECT RAISE(ABORT, 'outbox: a row''s content (negotiation_id, business_id, status, \
partner_status_changed_at, invoice_amount_in_cents) can only change while it is pending; this row is sending, \
sent, dead or canceled: to correct a transition, insert a new row')
 WHERE OLD.state <> 'pending'
   AND (NEW.negotiation_id IS NOT OLD.negotiation_id OR NEW.business_id IS NOT OLD.business_id
        OR NEW.status IS NOT OLD.status
        OR NEW.partner_status_changed_at IS NOT OLD.partner_status_changed_at
        OR NEW.invoice_amount_in_cents IS NOT OLD.invoice_amount_in_cents);
";

/// The schema version this binary writes.
pub fn schema_version() -> i64 {
    migrations().last().map(|(v, _)| *v).unwrap_or(0)
}

/// The name of a uid, from /etc/passwd (the uid itself when unknown).
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

/// Run as root, refuses to open `path` when it (or, not existing yet, its
/// directory) belongs to another user: root would leave files behind (the
/// database, its journal or WAL) that the service user cannot open.
pub fn refuse_foreign_as_root(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return Ok(());
    };
    if me != 0 {
        return Ok(());
    }
    let owner = match std::fs::metadata(path) {
        Ok(m) => m.uid(),
        Err(_) => match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => match std::fs::metadata(dir) {
                Ok(m) => m.uid(),
                Err(_) => return Ok(()),
            },
            None => return Ok(()),
        },
    };
    if owner != 0 {
        let user = user_name(owner);
        bail!(
            "{what} {} belongs to {user}: run as root, leadsync would leave root-owned files there that \
             {user} cannot open; run the command as that user: `sudo -u {user} leadsync ...`",
            path.display()
        );
    }
    Ok(())
}

/// Opens (creating if `create`) the mirror with leadsync's settings and
/// applies pending migrations.
pub fn open_connection(path: &Path, create: bool) -> Result<Connection> {
    open_connection_with(path, create, None)
}

/// [`open_connection`]; with `held`, this process holds the mirror's lock
/// already, and a migration runs under it (taking it again would fail).
fn open_connection_with(
    path: &Path,
    create: bool,
    held: Option<&ProcessLock>,
) -> Result<Connection> {
    refuse_foreign_as_root(path, "database")?;
    if !create && !path.exists() {
        bail!(
            "database {} does not exist yet: it is created by `leadsync run`, `sync`, `drain` or `enqueue`",
            path.display()
        );
    }
    if create
        && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(
            "cannot create database {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .with_context(|| format!("cannot switch {} to WAL mode", path.display()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "database {} refused WAL mode (journal_mode is {mode})",
            path.display()
        );
    }
    // A checkpoint every 10,000 pages (about 40 MB of WAL) rather than
    // SQLite's 1,000: a first full sync rewrites the same index pages many
    // times, and checkpointing them ten times as often made it 40% slower
    // (README, "Performance"). The WAL file is trimmed back to 64 MB after.
    // A 16 MiB page cache (SQLite's default is 2 MiB) keeps the primary-key
    // index of a few hundred thousand leads resident, so a page write stops
    // re-reading index pages it evicted a moment ago; it fits the 64 MiB RSS
    // budget (README, "Performance").
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 10000;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA cache_size = -16384;",
    )?;
    // A migration runs only while no other leadsync process (`run`, `sync`,
    // `drain`) holds the database: after a package upgrade, the older daemon
    // still runs on it until the service restarts, and a `status` or an
    // `enqueue` of the newer binary must not change the schema under it.
    let current = version_of(&conn)?;
    let _migrating = if current < schema_version() && held.is_none() {
        match wait_for_migration(&conn, path)? {
            Some(lock) => Some(lock),
            None if version_of(&conn)? >= schema_version() => None,
            None => bail!(
                "database {} has schema version {current}, older than this leadsync's \
                 ({}), and another leadsync process (pid {}) is running on it: it is \
                 migrated when that process stops and this version starts \
                 (`systemctl restart leadsync` after an upgrade)",
                path.display(),
                schema_version(),
                ProcessLock::holder(path)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            ),
        }
    } else {
        None
    };
    migrate(&mut conn).with_context(|| format!("cannot migrate database {}", path.display()))?;
    Ok(conn)
}

/// SQLite found no database in the file, or a damaged one.
fn not_a_database(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
                )
        )
    })
}

/// The database's schema version (`PRAGMA user_version`).
fn version_of(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// The process lock for a migration; `None` when another process holds
/// it. One that holds it only to migrate (another command of this binary
/// starting at the same time, the restarted daemon) is waited for, up to
/// [`MIGRATION_WAIT`], until it releases the lock or the schema is current:
/// failing then would fail an `enqueue` (exit 1) for nothing.
fn wait_for_migration(conn: &Connection, path: &Path) -> Result<Option<ProcessLock>> {
    let deadline = std::time::Instant::now() + MIGRATION_WAIT;
    loop {
        match ProcessLock::try_acquire_as(path, Role::Migrating) {
            Ok(Some(lock)) => return Ok(Some(lock)),
            Ok(None) => {}
            // Free now, but this user cannot take it: nothing to wait for
            // once the migration it waited for is done.
            Err(_) if version_of(conn)? >= schema_version() => return Ok(None),
            Err(e) => {
                let Some(denied) = e.downcast_ref::<LockNotWritable>() else {
                    return Err(e);
                };
                bail!(
                    "database {} has schema version {}, older than this leadsync's ({}), and this \
                     user may not write its lock file {} to migrate it ({}); nothing was written: \
                     the leadsync service migrates it when it starts this version (`systemctl \
                     restart leadsync`), or run this command once as the user that owns the lock \
                     file (`sudo -u leadsync leadsync ...`); then run it again",
                    path.display(),
                    version_of(conn)?,
                    schema_version(),
                    denied.path.display(),
                    denied.source,
                );
            }
        }
        if version_of(conn)? >= schema_version()
            || !ProcessLock::held_for_migration(path)
            || std::time::Instant::now() >= deadline
        {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a command waits for another process's migration.
const MIGRATION_WAIT: Duration = Duration::from_secs(120);

/// A database written by a newer leadsync (a downgrade): nothing this binary
/// can do with it, and restarting does not change that (the CLI exits 78, which
/// the unit file lists in `RestartPreventExitStatus=`).
#[derive(Debug)]
pub struct NewerSchema {
    /// "the database" or "the token store".
    pub what: &'static str,
    pub found: i64,
    pub known: i64,
}

impl std::fmt::Display for NewerSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} has schema version {}, newer than this leadsync knows ({}); \
             run a newer leadsync (or restore a backup taken before the upgrade)",
            self.what, self.found, self.known
        )
    }
}

impl std::error::Error for NewerSchema {}

/// Opens an existing mirror to read only: never migrates, never writes
/// (`status`, `outbox list`). Also returns the database's schema version,
/// which may be older than [`schema_version`] while an older leadsync
/// daemon still runs on it after an upgrade (a newer one is refused).
pub fn open_read_only(path: &Path) -> Result<(Connection, i64)> {
    refuse_foreign_as_root(path, "database")?;
    if !path.exists() {
        bail!(
            "database {} does not exist yet: it is created by `leadsync run`, `sync`, `drain` or `enqueue`",
            path.display()
        );
    }
    let wal = sidecar(path, "-wal");
    let shm = sidecar(path, "-shm");
    // To read a WAL database SQLite opens its -wal and -shm, and creates
    // them when missing, as whoever runs the command (then owned by an
    // operator, beside the service user's mirror, and left there: a
    // read-only connection does not remove them); where it may not create
    // them (a directory only the service user writes) it fails with
    // "attempt to write a readonly database". No -wal means no connection
    // is open on the mirror (the last one to close checkpoints it into the
    // database file and removes both): the file alone is the whole mirror,
    // read as immutable, without locks and without those files. A writer
    // starting meanwhile writes to a new -wal, not to the file, until a
    // checkpoint (10,000 pages, or its close), which at worst makes this
    // read fail, never write.
    let (target, flags) = if wal.exists() {
        if !shm.exists() {
            bail!(
                "database {} has a {} but no {}: it cannot be read without creating that file, \
                 which this command does not do; the next `leadsync run`, `sync` or `drain` recovers it",
                path.display(),
                wal.display(),
                shm.display()
            );
        }
        (
            path.as_os_str().to_owned(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    } else {
        (
            immutable_uri(path),
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    };
    let unreadable = || {
        format!(
            "cannot read database {}: this user must be able to read it, and while leadsync runs \
             on it its {} and {} too (or run the command as the user of the service: \
             `sudo -u leadsync leadsync ...`)",
            path.display(),
            wal.display(),
            shm.display()
        )
    };
    let conn = Connection::open_with_flags(Path::new(&target), flags).with_context(unreadable)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version = version_of(&conn).map_err(|e| {
        // A file SQLite does not recognise is no matter of permissions:
        // sending the operator to sudo would hide what is wrong.
        if not_a_database(&e) {
            e.context(format!(
                "database {} is not a SQLite database (damaged or overwritten, or `database` \
                 names another file): fix the path, or restore the mirror from a backup \
                 (README, \"Backup and restore\")",
                path.display()
            ))
        } else {
            e.context(unreadable())
        }
    })?;
    // A newer leadsync's schema is refused as the daemon refuses it (exit 78).
    if version > schema_version() {
        return Err(NewerSchema {
            what: "the database",
            found: version,
            known: schema_version(),
        }
        .into());
    }
    Ok((conn, version))
}

/// `path` with `suffix` appended: its -wal, -shm.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// A `file:` URI opening `path` read-only and immutable (RFC 3986 escapes
/// for the bytes a URI path gives a meaning to).
fn immutable_uri(path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = path.as_os_str().as_bytes();
    // "file:" then the path; an absolute one after an empty authority
    // ("file:///var/..."), so that "//x/..." is never read as a host.
    let mut uri = if bytes.starts_with(b"/") {
        b"file://".to_vec()
    } else {
        b"file:".to_vec()
    };
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b);
        } else {
            uri.extend(format!("%{b:02X}").as_bytes());
        }
    }
    uri.extend(b"?mode=ro&immutable=1");
    std::ffi::OsString::from_vec(uri)
}

/// What a read-only command says when the database's schema is older than
/// the one this binary writes (None otherwise: [`open_read_only`] refuses a
/// newer one).
pub fn schema_note(path: &Path, version: i64) -> Option<String> {
    let latest = schema_version();
    if version < latest {
        Some(format!(
            "database {} has schema version {version}, older than this leadsync's ({latest}): \
             the daemon running on it is an older leadsync (restart it, e.g. `systemctl restart \
             leadsync`, to migrate); this command only reads it and does not migrate it",
            path.display()
        ))
    } else {
        None
    }
}

/// Applies every migration newer than the database's `user_version`.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    migrate_to(conn, schema_version())
}

/// Applies the migrations newer than the database's `user_version`, up to
/// `target` (tests build older schemas with it).
fn migrate_to(conn: &mut Connection, target: i64) -> Result<()> {
    let current = version_of(conn)?;
    let latest = schema_version();
    if current > latest {
        return Err(NewerSchema {
            what: "the database",
            found: current,
            known: latest,
        }
        .into());
    }
    for (version, sql) in migrations() {
        if version <= current || version > target {
            continue;
        }
        // Foreign keys off around a migration (they cannot change inside a
        // transaction): rebuilding a table (migration 3) drops the old one,
        // and with them on that would cascade into `outbox_attempts`.
        conn.pragma_update(None, "foreign_keys", false)?;
        let applied = apply_migration(conn, version, &sql);
        conn.pragma_update(None, "foreign_keys", true)?;
        applied?;
    }
    Ok(())
}

fn apply_migration(conn: &mut Connection, version: i64, sql: &str) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Another process may have migrated while we waited for the lock.
    let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if now >= version {
        return Ok(());
    }
    let before = dangling(&tx)?;
    if version == 10 {
        rebuild_negotiation_changes(&tx).with_context(|| format!("migration {version} failed"))?;
    }
    if version == 3 {
        rebuild_outbox_v3(&tx, sql).with_context(|| format!("migration {version} failed"))?;
        return finish_migration(tx, version, &before);
    }
    if version == 25 {
        claim_id_is_free(&tx).with_context(|| format!("migration {version} failed"))?;
    }
    // Adding a column cannot be said "if not exists": a schema that has it
    // already (a database migrated again from an older user_version) skips it.
    let has_column = |table: &str, column: &str| -> Result<bool> {
        Ok(tx
            .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists([table, column])?)
    };
    // Generated columns are hidden from table_info: asked of table_xinfo.
    if version == 17
        && !tx
            .prepare("SELECT 1 FROM pragma_table_xinfo('outbox') WHERE name = 'changed_at_order'")?
            .exists([])?
    {
        tx.execute_batch(include_str!("migrations/0017_outbox_order_column.sql"))
            .with_context(|| format!("migration {version} failed"))?;
    }
    // Version 18 adds two columns: each one there already is kept (the
    // other still added), and its index is made in any case.
    let v18 = [("listed_at", "TEXT"), ("listed_ids", "BLOB")];
    let v18_present: Vec<bool> = match version {
        18 => v18
            .iter()
            .map(|(column, _)| has_column("sync_runs", column))
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    // Versions 22, 23 and 25 add a column to each of two tables: one there
    // already is kept, the other still added.
    let one_each: &[(&str, &str, &str)] = match version {
        22 => &[
            ("outbox", "business_filled", "INTEGER NOT NULL DEFAULT 0"),
            (
                "message_outbox",
                "business_filled",
                "INTEGER NOT NULL DEFAULT 0",
            ),
        ],
        23 => &[
            ("outbox_attempts", "wait_rebased_at", "TEXT"),
            ("message_outbox_attempts", "wait_rebased_at", "TEXT"),
        ],
        25 => &[
            ("outbox", "claim_id", "INTEGER"),
            ("message_outbox", "claim_id", "INTEGER"),
        ],
        _ => &[],
    };
    let one_each_missing: Vec<&(&str, &str, &str)> = one_each
        .iter()
        .filter_map(|added| match has_column(added.0, added.1) {
            Ok(true) => None,
            Ok(false) => Some(Ok(added)),
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_>>()?;
    let done = (version == 14 && has_column("negotiations", "webhook_triggered_at")?)
        || (version == 21 && has_column("negotiations", "listing_read_at")?)
        || one_each_missing.len() < one_each.len()
        || (version == 24 && has_column("message_polls", "next_poll_at")?)
        || v18_present.contains(&true);
    if !done {
        tx.execute_batch(sql)
            .with_context(|| format!("migration {version} failed"))?;
    }
    if done {
        for (table, column, def) in one_each_missing {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))
                .with_context(|| format!("migration {version} failed"))?;
        }
    }
    if version == 24 {
        tx.execute_batch(include_str!(
            "migrations/0024_message_indexes_and_backfill.sql"
        ))
        .with_context(|| format!("migration {version} failed"))?;
    }
    if version == 25 {
        for table in ["outbox", "message_outbox"] {
            tx.execute_batch(
                &include_str!("migrations/0025_claim_id_triggers.sql").replace("{table}", table),
            )
            .with_context(|| format!("migration {version} failed"))?;
        }
        // A row put aside now holds back only the rows after it: an older
        // claim put aside a row before it too (inserted later with an
        // earlier instant, or waiting for its retry), for that row's
        // business. Schema 20's rule frees exactly those (no row of the
        // business it waits for at or before it) and leaves the rest aside;
        // written again to take one pass, not one search per row.
        tx.execute_batch(include_str!("migrations/0025_waits_follow_rows.sql"))
            .with_context(|| format!("migration {version} failed"))?;
    }
    if version == 18 {
        for ((column, kind), present) in v18.iter().zip(&v18_present) {
            if done && !present {
                tx.execute_batch(&format!("ALTER TABLE sync_runs ADD COLUMN {column} {kind}"))
                    .with_context(|| format!("migration {version} failed"))?;
            }
        }
        tx.execute_batch(include_str!(
            "migrations/0018_listing_confirmations_index.sql"
        ))
        .with_context(|| format!("migration {version} failed"))?;
    }
    finish_migration(tx, version, &before)
}

/// Schema 25 adds `claim_id` to each outbox, and each claim writes its own
/// number there. A column by that name (in any case) that is not exactly
/// leadsync's (`claim_id INTEGER`, nothing more: there only when the
/// version was set back by hand) is a partner's (schema 3 keeps a
/// partner's columns word for word): taken for leadsync's, its values were
/// written over by each claim, and with a DEFAULT every partner insert was
/// refused. Stops the upgrade, before anything changed, to have it renamed.
fn claim_id_is_free(tx: &Connection) -> Result<()> {
    for table in ["outbox", "message_outbox"] {
        let found: Option<(String, String, bool, Option<String>, i64, i64)> = tx
            .query_row(
                "SELECT name, type, \"notnull\", dflt_value, pk, hidden
                   FROM pragma_table_xinfo(?1) WHERE name = 'claim_id' COLLATE NOCASE",
                [table],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((name, kind, not_null, default, pk, hidden)) = found else {
            continue;
        };
        if name == "claim_id"
            && kind == "INTEGER"
            && !not_null
            && default.is_none()
            && pk == 0
            && hidden == 0
        {
            continue;
        }
        bail!(
            "the {table} has a column `{name}` that is not leadsync's, and schema 25 adds a column by that name \
             (each claim writes its own number there): rename yours \
             (ALTER TABLE {table} RENAME COLUMN \"{}\" TO partner_{name}; and in your programs), \
             then start leadsync again",
            name.replace('"', "\"\"")
        );
    }
    Ok(())
}

/// A row pointing at nothing: its table, rowid (none in a table WITHOUT
/// ROWID), the table it points into, and which of its references.
type Dangling = (String, Option<i64>, String, i64);

/// The rows pointing at nothing (foreign keys are off around a migration,
/// so one can leave some), each with how many rows it stands for (the rows
/// of a table WITHOUT ROWID have no rowid to tell them apart).
fn dangling(tx: &Connection) -> Result<HashMap<Dangling, usize>> {
    let mut found = HashMap::new();
    let mut check = tx.prepare("PRAGMA foreign_key_check")?;
    let mut rows = check.query([])?;
    while let Some(r) = rows.next()? {
        *found
            .entry((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            .or_insert(0) += 1;
    }
    Ok(found)
}

/// Checks what a migration left and records its version, in its
/// transaction. Rows pointing at nothing that were there `before` are not
/// its doing (a partner's program writes with foreign keys off, SQLite's
/// default): they stay as they were, and do not stop the upgrade.
fn finish_migration(
    tx: rusqlite::Transaction<'_>,
    version: i64,
    before: &HashMap<Dangling, usize>,
) -> Result<()> {
    let broken = dangling(&tx)?;
    if let Some(((table, ..), _)) = broken
        .iter()
        .filter(|(key, n)| before.get(*key).is_none_or(|was| *n > was))
        .min()
    {
        bail!("migration {version} failed: it left rows of {table} pointing at nothing");
    }
    tx.pragma_update(None, "user_version", version)?;
    tx.commit()?;
    Ok(())
}

/// leadsync's own outbox columns before schema 3: the drainer reads and
/// writes each of them.
const OUTBOX_V1_COLUMNS: [&str; 16] = [
    "id",
    "negotiation_id",
    "business_id",
    "status",
    "partner_status_changed_at",
    "invoice_amount_in_cents",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "last_http_status",
    "last_trace_id",
    "created_at",
    "sent_at",
    "sending_since",
    "changed_at_utc",
];

/// A table's name as its definition (`sql` in sqlite_master) gives it,
/// unquoted, and the text after its opening parenthesis. SQLite keeps the
/// name as written: a rename writes it back quoted (`CREATE TABLE "outbox"
/// (`), a tool may write `[outbox]` or another case.
fn table_body(definition: &str) -> Option<(String, &str)> {
    let rest = definition
        .get(..12)
        .filter(|create| create.eq_ignore_ascii_case("CREATE TABLE"))
        .map(|_| definition[12..].trim_start())?;
    let (name, rest) = match rest.chars().next()? {
        open @ ('"' | '`' | '[' | '\'') => {
            let close = if open == '[' { ']' } else { open };
            let mut name = String::new();
            let mut at = 1;
            loop {
                let c = rest[at..].chars().next()?;
                at += c.len_utf8();
                if c != close {
                    name.push(c);
                } else if close != ']' && rest[at..].starts_with(close) {
                    // A doubled quote stands for one.
                    name.push(close);
                    at += 1;
                } else {
                    break (name, &rest[at..]);
                }
            }
        }
        _ => {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
                .unwrap_or(rest.len());
            (rest[..end].to_string(), &rest[end..])
        }
    };
    Some((name, rest.trim_start().strip_prefix('(')?))
}

/// Schema 3's script (`sql`: the outbox rebuilt with AUTOINCREMENT, which
/// SQLite cannot add in place), keeping what a partner put on the outbox
/// of schema 1 or 2. When the old table's definition (its text in
/// sqlite_master) is still schema 1's own, whatever SQLite appended to it
/// (each added column as it was declared) or however the name is quoted,
/// the new table is that definition with the key made AUTOINCREMENT and
/// schema 3's columns put before `changed_at_utc`, as in the script: a
/// partner's columns keep their type, default, constraints, collation,
/// reference and generated expression word for word. When a tool wrote the
/// definition again in its own words, the new table is the script's with a
/// partner's stored columns added by name and declared type, and a warning
/// says what of theirs was not kept. Either way every stored column's
/// values are copied. Its indexes and triggers go with the old table: read
/// first, created again (SQLite keeps a trigger's table name as written:
/// matched in any case). Its views name the table: the rename runs in
/// legacy mode, which does not re-check them while `outbox` is missing (as
/// schema 10). A column of leadsync's missing (renamed), or a partner's
/// column or object with a name schema 3 gives to one of its own, fails the
/// upgrade, saying which and what to do (nothing is changed).
fn rebuild_outbox_v3(tx: &Connection, sql: &str) -> Result<()> {
    const CREATE: &str = "CREATE TABLE outbox_v3 (";
    const OLD_CREATE: &str = "CREATE TABLE outbox (";
    const KEY: &str = "INTEGER PRIMARY KEY,";
    const AFTER: &str = "    sending_since             TEXT,\n";
    const BEFORE: &str = "    -- the instant in UTC";
    const END: &str = "\n);\n";
    const COPIED: &str = "FROM outbox ORDER BY id;\n";
    const RENAME: &str = "ALTER TABLE outbox_v3 RENAME TO outbox;";
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let once = |text: &str, part: &str| text.matches(part).count() == 1;
    let (Some(start), Some(after), Some(before), Some(end), Some(copied), true) = (
        sql.find(CREATE),
        sql.find(AFTER),
        sql.find(BEFORE),
        sql.find(CREATE)
            .and_then(|start| Some(start + sql[start..].find(END)?)),
        sql.find(COPIED),
        [CREATE, AFTER, BEFORE, COPIED, RENAME]
            .iter()
            .all(|part| once(sql, part)),
    ) else {
        bail!("schema 3's script has changed: cannot rebuild the outbox from its own definition");
    };
    // Schema 1's outbox, from its opening parenthesis to its last column.
    let v1 = include_str!("migrations/0001_initial.sql");
    let Some(v1_body) = v1
        .find(OLD_CREATE)
        .map(|at| &v1[at + OLD_CREATE.len()..])
        .and_then(|body| Some(&body[..body.find(END)?]))
        .filter(|body| once(body, KEY) && once(body, BEFORE))
    else {
        bail!("schema 1's script has changed: cannot rebuild the outbox from its own definition");
    };
    // Schema 3's columns, as the script declares them (with their comments).
    let new_columns = &sql[after + AFTER.len()..before];
    let old: String = tx.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox' COLLATE NOCASE",
        [],
        |r| r.get(0),
    )?;
    // What follows schema 1's columns: a partner's, as SQLite appended them.
    let partners = table_body(&old)
        .filter(|(name, _)| name.eq_ignore_ascii_case("outbox"))
        .and_then(|(_, body)| body.strip_prefix(v1_body));
    let columns: Vec<Column> = tx
        .prepare(
            "SELECT name, type, hidden, \"notnull\", dflt_value,
                    (SELECT group_concat(DISTINCT f.\"table\") FROM pragma_foreign_key_list('outbox') AS f
                      WHERE f.\"from\" = c.name COLLATE NOCASE)
               FROM pragma_table_xinfo('outbox') AS c",
        )?
        .query_map([], |r| {
            Ok(Column {
                name: r.get(0)?,
                kind: r.get(1)?,
                hidden: r.get(2)?,
                not_null: r.get(3)?,
                default: r.get(4)?,
                references: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let own = |name: &str| {
        OUTBOX_V1_COLUMNS
            .iter()
            .any(|v1| v1.eq_ignore_ascii_case(name))
    };
    if let Some(missing) = OUTBOX_V1_COLUMNS
        .iter()
        .find(|v1| !columns.iter().any(|c| c.name.eq_ignore_ascii_case(v1)))
    {
        bail!(
            "the outbox has no column `{missing}`, one of leadsync's own (the drainer reads and writes it): \
             if you renamed it, rename it back (ALTER TABLE outbox RENAME COLUMN <its name now> TO {missing}; \
             and in your programs), then start leadsync again"
        );
    }
    for Column { name, .. } in &columns {
        if ["late", "waiting_for"]
            .iter()
            .any(|new| new.eq_ignore_ascii_case(name))
        {
            bail!(
                "the outbox has a column `{name}` that is not leadsync's, and schema 3 adds a column by that name: \
                 rename yours (ALTER TABLE outbox RENAME COLUMN {} TO partner_{name}; and in your programs), \
                 then start leadsync again",
                quote(name)
            );
        }
    }
    // What the script makes, but the outbox of schema 1 did not have: a
    // partner's object by one of these names is in the way.
    let had = [
        "outbox_due",
        "outbox_open_by_negotiation",
        "outbox_by_state",
        "outbox_validate_insert",
        "outbox_validate_update",
    ];
    let made: Vec<&str> = sql
        .lines()
        .filter_map(|line| {
            ["CREATE TABLE ", "CREATE INDEX ", "CREATE TRIGGER "]
                .iter()
                .find_map(|create| line.strip_prefix(create))
                .and_then(|rest| rest.split([' ', '(']).next())
        })
        .filter(|name| *name != "outbox_v3" && !had.contains(name))
        .collect();
    for name in made {
        let found: Option<(String, String)> = tx
            .query_row(
                "SELECT type, name FROM sqlite_master WHERE name = ?1 COLLATE NOCASE",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((kind, found)) = found {
            bail!(
                "your {kind} `{found}` has a name schema 3 gives to one of leadsync's own: rename it \
                 (for an index or trigger: drop it and create it again under another name; \
                 for a table: ALTER TABLE {} RENAME TO partner_{found}), then start leadsync again",
                quote(&found)
            );
        }
    }
    // A name nothing in the schema has (a partner's table may be called
    // outbox_v3).
    let tmp = free_name(tx, "outbox_v3")?;
    let create = match partners {
        Some(partners) => format!(
            "CREATE TABLE {tmp} ({}{partners}",
            v1_body
                .replacen(KEY, "INTEGER PRIMARY KEY AUTOINCREMENT,", 1)
                .replacen(BEFORE, &format!("{new_columns}{BEFORE}"), 1)
        ),
        None => {
            // Not schema 1's text (a tool wrote it again): the script's
            // table, with a partner's stored columns by name and type.
            let theirs: Vec<&Column> = columns.iter().filter(|c| !own(&c.name)).collect();
            let added: String = theirs
                .iter()
                .filter(|c| c.hidden == 0)
                .map(|c| format!(",\n    {} {}", quote(&c.name), c.kind))
                .collect();
            if !theirs.is_empty() {
                let lost = theirs
                    .iter()
                    .map(|c| c.lost())
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(
                    "the outbox's definition is not as leadsync wrote it (a tool wrote it again?): schema 3 \
                     made the outbox from leadsync's own and added your columns by name and declared type, \
                     with their values. Not kept: {lost}; nor any CHECK, COLLATE or UNIQUE on your columns \
                     or constraint on the table. Put back by hand what your programs need (your definition \
                     was: {old})"
                );
            }
            format!(
                "{}{added}\n)",
                &sql[start..end].replacen("outbox_v3", &tmp, 1)
            )
        }
    };
    let copy = columns
        .iter()
        .filter(|c| c.hidden == 0)
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        "{}{create};\nINSERT INTO {tmp} ({copy})\n    SELECT {copy}\n      {COPIED}{}",
        &sql[..start],
        sql[copied + COPIED.len()..].replacen(
            RENAME,
            &format!("ALTER TABLE {tmp} RENAME TO outbox;"),
            1
        )
    );
    let kept: Vec<String> = tx
        .prepare(
            "SELECT sql FROM sqlite_master
              WHERE tbl_name = 'outbox' COLLATE NOCASE AND type IN ('index', 'trigger')
                AND sql IS NOT NULL
                AND name COLLATE NOCASE NOT IN ('outbox_due', 'outbox_open_by_negotiation', 'outbox_by_state',
                                                'outbox_validate_insert', 'outbox_validate_update')
              ORDER BY type = 'trigger', rowid",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    tx.pragma_update(None, "legacy_alter_table", true)?;
    let rebuilt = tx.execute_batch(&script);
    tx.pragma_update(None, "legacy_alter_table", false)?;
    rebuilt?;
    // A counter a restore carried over (README: a backup of schema 1 or 2
    // restored over a newer mirror) is left beside the one the new table
    // got from its rows: one is kept, the larger, so no id handed out
    // before the restore is handed out again.
    let top: Option<i64> = tx.query_row(
        "SELECT max(seq) FROM sqlite_sequence WHERE name = 'outbox' COLLATE NOCASE",
        [],
        |r| r.get(0),
    )?;
    if let Some(top) = top {
        tx.execute(
            "DELETE FROM sqlite_sequence WHERE name = 'outbox' COLLATE NOCASE",
            [],
        )?;
        tx.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?1)",
            [top],
        )?;
    }
    for sql in kept {
        tx.execute_batch(&sql)
            .with_context(|| format!("cannot re-create on outbox: {sql}"))?;
    }
    Ok(())
}

/// A column of the outbox before schema 3, as SQLite reports it.
struct Column {
    name: String,
    /// Its declared type.
    kind: String,
    /// 0 stored, 2 or 3 generated.
    hidden: i64,
    not_null: bool,
    default: Option<String>,
    /// The tables its foreign keys point into.
    references: Option<String>,
}

impl Column {
    /// What a rebuild by name and type does not keep of it.
    fn lost(&self) -> String {
        if self.hidden != 0 {
            return format!("your generated column `{}` (dropped)", self.name);
        }
        let mut lost = Vec::new();
        if self.not_null {
            lost.push("NOT NULL".to_string());
        }
        if let Some(default) = &self.default {
            lost.push(format!("DEFAULT {default}"));
        }
        if let Some(table) = &self.references {
            lost.push(format!("REFERENCES {table}"));
        }
        match lost.is_empty() {
            true => format!("`{}`: nothing SQLite reports", self.name),
            false => format!("`{}`: {}", self.name, lost.join(", ")),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The writer thread's work: urgent jobs (a webhook delivery waiting for its
/// answer) go before queued ones (listing pages, drainer bookkeeping), so a
/// delivery waits for at most the one job in progress, not for a full sync's
/// backlog.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    urgent: VecDeque<Job>,
    normal: VecDeque<Job>,
    /// Handles alive; the thread stops when the last one is dropped and
    /// the queue is empty.
    handles: usize,
    /// Urgent jobs run in a row: after [`URGENT_STREAK`] a waiting normal job
    /// goes, so a flood of deliveries slows a sync pass but never stops it.
    streak: usize,
    /// The writer thread is gone: jobs are refused (their callers get an error).
    closed: bool,
}

/// See [`QueueState::streak`].
const URGENT_STREAK: usize = 16;

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job, urgent: bool) {
        let mut s = self.lock();
        if s.closed {
            // Dropping the job drops its answer channel: the caller sees an error.
            return;
        }
        if urgent {
            s.urgent.push_back(job);
        } else {
            s.normal.push_back(job);
        }
        drop(s);
        self.ready.notify_one();
    }

    /// The next job, or `None` once every handle is gone and nothing is left.
    fn pop(&self) -> Option<Job> {
        let mut s = self.lock();
        loop {
            let take_normal = s.streak >= URGENT_STREAK || s.urgent.is_empty();
            let job = if take_normal {
                s.streak = 0;
                s.normal.pop_front().or_else(|| s.urgent.pop_front())
            } else {
                s.streak += 1;
                s.urgent.pop_front()
            };
            if job.is_some() {
                return job;
            }
            if s.handles == 0 {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One handle's share of the queue: counts handles so that the writer
/// thread ends with the last of them.
struct Handle(Arc<Queue>);

impl Handle {
    fn new(queue: Arc<Queue>) -> Handle {
        queue.lock().handles += 1;
        Handle(queue)
    }
}

impl Clone for Handle {
    fn clone(&self) -> Handle {
        Handle::new(self.0.clone())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.lock().handles -= 1;
        self.0.ready.notify_all();
    }
}

/// WAL size from which the background checkpointer copies frames back.
const CHECKPOINT_AT_BYTES: u64 = 4 << 20;

/// Copies the WAL back into the database from its own connection (PASSIVE:
/// never waits for the writer or readers) while the WAL is larger than
/// [`CHECKPOINT_AT_BYTES`], until the store's writer thread is gone.
fn spawn_checkpointer(path: &Path, queue: std::sync::Weak<Queue>) {
    let db = path.to_path_buf();
    let wal = sidecar(path, "-wal");
    let spawned = std::thread::Builder::new()
        .name("leadsync-checkpoint".into())
        .spawn(move || {
            let mut conn: Option<Connection> = None;
            while queue.strong_count() > 0 {
                // When nothing was written since the last pass this is a
                // no-op that reads the WAL index only.
                std::thread::sleep(Duration::from_millis(100));
                let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                if size < CHECKPOINT_AT_BYTES {
                    continue;
                }
                if conn.is_none() {
                    conn = Connection::open_with_flags(
                        &db,
                        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .ok();
                }
                let Some(c) = &conn else { continue };
                // PASSIVE: copies what no reader still needs, waits for nobody.
                if let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "checkpoint failed; the writer's backstop still applies");
                    conn = None;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the checkpoint thread; the writer checkpoints itself");
    }
}

/// Group commit for answers that promise their write is on disk (a webhook
/// delivery's 200, SPEC §8). The writer commits with `synchronous = NORMAL`:
/// in WAL mode such a commit survives a crash of the process but not a power
/// loss or an OS crash until the WAL is next synced (at a checkpoint). A
/// caller that must not answer before that asks this thread for a sync of
/// the WAL after its commit; every caller waiting when a round starts is
/// answered by that round's one `fdatasync`, so a burst of deliveries costs
/// one or two syncs, not one each, and the writer thread (which page writes
/// and the drainer share) never waits for the disk.
///
/// An `fdatasync` of the `-wal` file from its own descriptor makes durable
/// every frame written to it before the call, which is what
/// `synchronous = FULL` does at each commit: frames are written with
/// `write()` at commit time; a frame overwritten by a later restart of the
/// WAL was first checkpointed into the database file, which SQLite syncs
/// before it restarts the WAL. SQLite takes no lock on the `-wal` file, so
/// closing this descriptor releases none of its locks. The first round also
/// syncs the directory: the `-wal` file (and a database file just created)
/// may be new, and a file's sync does not make its name durable.
struct WalSync {
    state: Mutex<WalSyncState>,
    wake: Condvar,
}

type SyncWaiter = tokio::sync::oneshot::Sender<std::result::Result<(), String>>;

/// A test's stand-in for part of a round: runs before the round's sync; an
/// error fails the round as a failed sync would.
#[cfg(test)]
type Probe = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

#[derive(Default)]
struct WalSyncState {
    waiting: Vec<SyncWaiter>,
    /// A sync is wanted soon, nobody waits for it ([`Store::sync_soon`]).
    soon: bool,
    /// Why a round's sync failed, once one did: every later durable call
    /// fails with it until restart. After a failed write-back the kernel may
    /// mark the pages clean and reports the error once, so a later sync
    /// that succeeds does not mean the frames before it are on disk (and
    /// SQLite's recovery stops at the first bad frame: every later one is
    /// lost with it).
    failed: Option<String>,
    /// The thread ended (the store is gone, or it panicked): a durable call
    /// fails at once instead of waiting for a round that never comes.
    ended: bool,
    /// Rounds done (tests).
    #[cfg(test)]
    rounds: u64,
    /// Called at the start of each round, before the sync (tests: what a
    /// round covers is whatever is committed when it is called).
    #[cfg(test)]
    probe: Option<Probe>,
    /// In place of [`DURABLE_WITHIN`] (tests).
    #[cfg(test)]
    within: Option<Duration>,
}

/// Tells whether a sync of the database to disk has failed (then every
/// durable call fails until restart), for health checks and metrics.
#[derive(Clone)]
pub struct DurableSyncWatch(Arc<WalSync>);

impl DurableSyncWatch {
    /// Why durable calls fail until restart, once a sync to disk failed.
    pub fn failure(&self) -> Option<String> {
        self.0.lock().failed.clone()
    }
}

impl std::fmt::Debug for DurableSyncWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DurableSyncWatch")
            .field(&self.failure())
            .finish()
    }
}

/// A durable call not on disk within this time fails (the webhook receiver
/// answers 503, Thumbtack delivers again): a hung disk must not hang
/// requests.
const DURABLE_WITHIN: Duration = Duration::from_secs(5);

/// Why a round failed, and whether that taints every later round.
struct RoundError {
    error: std::io::Error,
    /// A sync itself failed (not an open): what it should have written may
    /// be lost, and no later sync can say otherwise.
    sticky: bool,
}

/// The `-wal` file, opened once and kept: write-back errors are reported
/// once per open file description, so a descriptor opened for each round
/// would not see an error that another one (the checkpointer's) saw first.
/// Reopened only if the file was replaced (another device or inode).
struct KeptWal {
    file: File,
    dev: u64,
    ino: u64,
}

impl WalSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, WalSyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the syncing thread; it ends once the store's writer thread is
    /// gone (`queue` dropped), nobody waits, and a round asked for with
    /// [`Store::sync_soon`] is done.
    fn start(path: &Path, queue: std::sync::Weak<Queue>) -> Result<Arc<WalSync>> {
        let sync = Arc::new(WalSync {
            state: Mutex::new(WalSyncState::default()),
            wake: Condvar::new(),
        });
        let wal = sidecar(path, "-wal");
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let me = sync.clone();
        std::thread::Builder::new()
            .name("leadsync-wal-sync".into())
            .spawn(move || {
                /// Whatever ends this thread (a panic too), waiters fail
                /// instead of waiting forever.
                struct Ended(Arc<WalSync>);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        let mut s = self.0.lock();
                        s.ended = true;
                        s.waiting.clear();
                    }
                }
                let _ended = Ended(me.clone());
                let mut kept: Option<KeptWal> = None;
                let mut dir_synced = false;
                let mut last_round = std::time::Instant::now();
                loop {
                    let mut s = me.lock();
                    let gone = loop {
                        let gone = queue.strong_count() == 0;
                        if !s.waiting.is_empty() {
                            break gone;
                        }
                        // At a stop, a round asked for is done at once.
                        if s.soon && (gone || last_round.elapsed() >= SYNC_SOON_EVERY) {
                            break gone;
                        }
                        // Gone: its connection's close checkpoints and syncs.
                        if gone {
                            return;
                        }
                        let since = last_round.elapsed();
                        let wait = if s.soon {
                            SYNC_SOON_EVERY.saturating_sub(since)
                        } else {
                            Duration::from_millis(500)
                        };
                        s = me
                            .wake
                            .wait_timeout(s, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    };
                    s.soon = false;
                    let waiting = std::mem::take(&mut s.waiting);
                    if let Some(e) = s.failed.clone() {
                        // No sync can be trusted any more.
                        for w in waiting {
                            let _ = w.send(Err(e.clone()));
                        }
                        continue;
                    }
                    last_round = std::time::Instant::now();
                    #[cfg(test)]
                    let probe = s.probe.clone();
                    drop(s);
                    #[cfg(test)]
                    let probed = match probe {
                        Some(p) => p().map_err(|error| RoundError {
                            error,
                            sticky: true,
                        }),
                        None => Ok(()),
                    };
                    #[cfg(not(test))]
                    let probed: std::result::Result<(), RoundError> = Ok(());
                    let result = probed
                        .and_then(|()| sync_wal(&wal, &dir, &mut kept, &mut dir_synced, gone));
                    let mut s = me.lock();
                    #[cfg(test)]
                    {
                        s.rounds += 1;
                    }
                    let result = match result {
                        Ok(()) => Ok(()),
                        Err(RoundError { error, sticky }) => {
                            let e = format!("cannot sync {} to disk: {error}", wal.display());
                            if sticky {
                                tracing::error!(error = %e, "a sync of the database to disk failed: what it covered may be lost; every webhook delivery is now answered 503 until leadsync is restarted");
                                s.failed = Some(e.clone());
                            } else {
                                tracing::warn!(error = %e, waiting = waiting.len(), "a sync of the database to disk could not be done");
                            }
                            Err(e)
                        }
                    };
                    drop(s);
                    for w in waiting {
                        let _ = w.send(result.clone());
                    }
                }
            })
            .context("cannot start the WAL sync thread")?;
        Ok(sync)
    }

    /// Waits until a sync that started after this call has finished; fails
    /// at once once a sync failed or the thread ended.
    async fn synced(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = self.lock();
            if let Some(e) = &s.failed {
                bail!("{e} (earlier; no later sync is trusted until leadsync is restarted)");
            }
            if s.ended {
                bail!("the WAL sync thread has stopped");
            }
            s.waiting.push(tx);
        }
        self.wake.notify_one();
        rx.await
            .map_err(|_| anyhow!("the WAL sync thread stopped before answering"))?
            .map_err(|e| anyhow!(e))
    }

    /// How long a durable call may take.
    fn within(&self) -> Duration {
        #[cfg(test)]
        if let Some(d) = self.lock().within {
            return d;
        }
        DURABLE_WITHIN
    }
}

/// At most one round a [`Store::sync_soon`] asks for in this time: the
/// drainer records up to hundreds of outcomes a second, each asking.
const SYNC_SOON_EVERY: Duration = Duration::from_millis(100);

/// One round of [`WalSync`]: the `-wal` file's data (from the descriptor
/// kept in `kept`), and the directory once. A missing `-wal` file is an
/// error while the store's writer is open (it keeps it; the database file
/// is never opened here: closing a descriptor of it would drop the
/// process's SQLite locks on it); once the writer is gone (`gone`) its
/// close checkpointed everything into the database file and synced it.
fn sync_wal(
    wal: &Path,
    dir: &Path,
    kept: &mut Option<KeptWal>,
    dir_synced: &mut bool,
    gone: bool,
) -> std::result::Result<(), RoundError> {
    use std::os::unix::fs::MetadataExt;
    let opening = |error| RoundError {
        error,
        sticky: false,
    };
    let syncing = |error| RoundError {
        error,
        sticky: true,
    };
    let meta = match std::fs::metadata(wal) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && gone => return Ok(()),
        Err(e) => return Err(opening(e)),
    };
    if !kept
        .as_ref()
        .is_some_and(|k| k.dev == meta.dev() && k.ino == meta.ino())
    {
        let file = File::open(wal).map_err(opening)?;
        let m = file.metadata().map_err(opening)?;
        *kept = Some(KeptWal {
            file,
            dev: m.dev(),
            ino: m.ino(),
        });
    }
    if let Some(k) = kept {
        k.file.sync_data().map_err(syncing)?;
    }
    if !*dir_synced {
        File::open(dir)
            .map_err(opening)?
            .sync_all()
            .map_err(syncing)?;
        *dir_synced = true;
    }
    Ok(())
}

/// The daemon's handle on the mirror: every statement runs on one writer
/// thread that owns the connection, never on an async worker.
#[derive(Clone)]
pub struct Store {
    /// Read-only connections [`Store::read`] gave back, for the next read:
    /// a fresh connection reads the whole schema before its first
    /// statement (~4 M instructions with this schema, 5% of an unchanged
    /// re-sync of 100k leads: one read per business) and opens the files.
    /// The writer thread closes those still idle before its own
    /// connection, so that its close, the last one, checkpoints the WAL
    /// and removes it (declared first too, so that a dropped store's
    /// share of the pool goes before the writer is told to stop).
    readers: Arc<std::sync::Mutex<Vec<Connection>>>,
    jobs: Handle,
    path: PathBuf,
    wal_sync: Arc<WalSync>,
    /// When the last urgent job was asked for (ms since the epoch; 0: never).
    last_urgent_ms: Arc<std::sync::atomic::AtomicI64>,
    /// Whether the writer thread's writes fail for want of storage.
    writes: WriteWatch,
}

/// Whether the writer thread's writes fail for want of storage (a full
/// disk, an I/O error, a file system turned read-only), and since when. For
/// `/healthz` and `/readyz`: the loops go on beating while none of their
/// writes lands.
///
/// A failure is cleared only once writes have worked for a quiet period
/// ([`WRITES_QUIET`] unless [`WriteWatch::set_quiet`] says otherwise) with
/// no storage failure in it: a job that commits pages to the WAL file
/// (whether or not a row changed) starts that period, the next storage
/// failure ends it. One small write that still fits (the lag table,
/// rewritten every second while writes fail) between two failures of a
/// large one (a sync pass) cleared it, and `/healthz` flapped to 200 while
/// every pass failed. The "since" of a failure is kept until it is cleared,
/// so the time it reports goes on counting across such flaps.
#[derive(Clone, Debug, Default)]
pub struct WriteWatch(Arc<std::sync::Mutex<WriteState>>);

/// How long writes must work with no storage failure before a failure is
/// cleared, unless [`WriteWatch::set_quiet`] says otherwise.
pub const WRITES_QUIET: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct WriteState {
    failed: Option<WriteFailure>,
    quiet: Duration,
}

impl Default for WriteState {
    fn default() -> Self {
        WriteState {
            failed: None,
            quiet: WRITES_QUIET,
        }
    }
}

#[derive(Debug)]
struct WriteFailure {
    /// The last storage error.
    why: String,
    /// The first storage failure since the last clearing.
    since: std::time::Instant,
    /// The first write that worked after the last storage failure.
    working_since: Option<std::time::Instant>,
}

impl WriteState {
    /// Clears a failure whose quiet period has passed.
    fn settle(&mut self) {
        if self
            .failed
            .as_ref()
            .and_then(|f| f.working_since)
            .is_some_and(|t| t.elapsed() >= self.quiet)
        {
            self.failed = None;
        }
    }
}

impl WriteWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why writes fail, and for how long, until they have worked for the
    /// quiet period.
    pub fn failure(&self) -> Option<(String, Duration)> {
        let mut state = self.lock();
        state.settle();
        state
            .failed
            .as_ref()
            .map(|f| (f.why.clone(), f.since.elapsed()))
    }

    /// Whether the last write that committed or failed for storage failed:
    /// no write has worked since the last storage failure.
    pub fn failing(&self) -> bool {
        self.lock()
            .failed
            .as_ref()
            .is_some_and(|f| f.working_since.is_none())
    }

    /// How long writes must work with no storage failure before a failure
    /// is cleared ([`WRITES_QUIET`] by default).
    pub fn set_quiet(&self, quiet: Duration) {
        self.lock().quiet = quiet;
    }

    /// A job's result: `wrote` when it committed pages to the WAL file.
    fn note<R>(&self, result: &Result<R>, wrote: bool) {
        let mut state = self.lock();
        state.settle();
        match result {
            Ok(_) if wrote => {
                if let Some(f) = state.failed.as_mut() {
                    f.working_since.get_or_insert_with(std::time::Instant::now);
                }
            }
            Ok(_) => {}
            Err(e) => {
                let storage = e.chain().find_map(|c| {
                    let code = c.downcast_ref::<rusqlite::Error>()?.sqlite_error_code()?;
                    matches!(
                        code,
                        rusqlite::ErrorCode::DiskFull
                            | rusqlite::ErrorCode::SystemIoFailure
                            | rusqlite::ErrorCode::ReadOnly
                    )
                    .then(|| c.to_string())
                });
                if let Some(why) = storage {
                    let since = state
                        .failed
                        .take()
                        .map_or_else(std::time::Instant::now, |f| f.since);
                    state.failed = Some(WriteFailure {
                        why,
                        since,
                        working_since: None,
                    });
                }
            }
        }
    }
}

/// How many idle read-only connections a [`Store`] keeps (one per business
/// scanned at the same time is what the sync asks for; more are closed).
const IDLE_READERS: usize = 8;

impl Store {
    /// Opens the mirror (creating and migrating it) and starts its writer thread.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, None)
    }

    /// [`Store::open`] while this process holds `lock`, the mirror's
    /// process lock: a migration runs under it.
    pub fn open_holding(path: &Path, lock: &ProcessLock) -> Result<Store> {
        Store::open_with(path, Some(lock))
    }

    fn open_with(path: &Path, held: Option<&ProcessLock>) -> Result<Store> {
        let mut conn = open_connection_with(path, true, held)?;
        // The writer still checkpoints every 10,000 pages (it is the only
        // one that can finish a checkpoint while it keeps writing, so that
        // the WAL restarts), but a second connection copies the WAL back in
        // the background meanwhile, so the writer's checkpoint finds little
        // left to copy: a 40 MB checkpoint inline took the writer away for
        // 100-400 ms, which a webhook delivery waiting for its 200 felt.
        let queue = Arc::new(Queue::default());
        let queue_for_checkpoints = queue.clone();
        let jobs = Handle::new(queue.clone());
        let readers: Arc<std::sync::Mutex<Vec<Connection>>> = Arc::default();
        let idle = readers.clone();
        std::thread::Builder::new()
            .name("leadsync-db".into())
            .spawn(move || {
                /// Whatever ends this thread, later jobs fail instead of waiting forever.
                struct Closer(Arc<Queue>);
                impl Drop for Closer {
                    fn drop(&mut self) {
                        let mut s = self.0.lock();
                        s.closed = true;
                        s.urgent.clear();
                        s.normal.clear();
                    }
                }
                let _closer = Closer(queue.clone());
                while let Some(job) = queue.pop() {
                    // A panic in one job must not take the writer down with it.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
                // Idle readers go first, whatever still holds the pool: the
                // writer's connection must be the last one, whose close
                // checkpoints the WAL and removes the -wal file.
                idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                drop(conn);
            })
            .context("cannot start the database thread")?;
        spawn_checkpointer(path, Arc::downgrade(&queue_for_checkpoints));
        let wal_sync = WalSync::start(path, Arc::downgrade(&queue_for_checkpoints))?;
        Ok(Store {
            jobs,
            path: path.to_path_buf(),
            wal_sync,
            last_urgent_ms: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            readers,
            writes: WriteWatch::default(),
        })
    }

    /// True when an urgent job (a webhook delivery) was asked for within
    /// `window`: bulk writers then keep their transactions short, since an
    /// urgent job overtakes queued jobs but waits for the one running.
    pub fn urgent_within(&self, window: Duration) -> bool {
        let last = self
            .last_urgent_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        last > 0 && chrono::Utc::now().timestamp_millis() - last <= window.as_millis() as i64
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a read-only connection of its own, on a blocking thread:
    /// a long read (a business's known leads before a full scan) never
    /// holds the writer thread, which webhook deliveries wait on. In WAL
    /// mode it neither waits for the writer nor holds it up.
    ///
    /// The connection is one an earlier read gave back when there is one
    /// (no read shares it meanwhile): each read still sees what was
    /// committed before it began, as a new connection would, since a
    /// connection given back holds no transaction open and no statement
    /// stepping. One that `f` left inside a transaction or with a
    /// statement not reset, or that failed, is closed instead.
    ///
    /// State set on the connection (temp tables, pragmas, ATTACH,
    /// functions, collations) carries over to later reads that get it:
    /// `f` must set none.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path.clone();
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match idle {
                Some(conn) => conn,
                None => {
                    let conn = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .with_context(|| format!("cannot open database {} to read", path.display()))?;
                    conn.busy_timeout(BUSY_TIMEOUT)?;
                    conn
                }
            };
            let r = f(&conn);
            // A statement still stepping (one `f` left in the statement
            // cache unreset) would hold its read mark on the WAL for as
            // long as the connection idles, as a transaction would.
            if r.is_ok() && conn.is_autocommit() && !conn.is_busy() {
                // Any commit invalidates an idle connection's page cache
                // before its next read: keeping it only costs memory.
                let _ = conn.release_memory();
                let mut idle = readers.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < IDLE_READERS {
                    idle.push(conn);
                }
            }
            r
        })
        .await
        .map_err(|e| anyhow!("the read failed: {e}"))?
    }

    /// How many read-only connections wait for the next [`Store::read`].
    #[cfg(test)]
    fn idle_readers(&self) -> usize {
        self.readers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Runs `f` on the writer thread and waits for its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.run(f, false).await
    }

    /// Like [`Store::call`], ahead of every queued job that is not urgent:
    /// for a request whose sender waits on the answer (a webhook delivery).
    pub async fn call_urgent<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.last_urgent_ms.store(
            chrono::Utc::now().timestamp_millis(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.run(f, true).await
    }

    /// Like [`Store::call_urgent`], and answers only once what `f` committed
    /// is on disk (see [`WalSync`]): for an answer that promises it survives
    /// a power loss (a webhook delivery's 200). An error of `f` is returned
    /// as it is; a failed sync is an error (the caller must not promise).
    pub async fn call_urgent_durable<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let r = self.call_urgent(f).await?;
        // Only the sync is bounded: a commit that waited out the busy
        // timeout failed and stored nothing (a 503 then means "not stored");
        // a sync cut off here leaves a commit that a redelivery finds
        // (a `duplicate`, answered once a later sync covers it).
        let within = self.wal_sync.within();
        tokio::time::timeout(within, self.wal_sync.synced())
            .await
            .unwrap_or_else(|_| {
                bail!(
                    "committed, but not synced to disk within {} s",
                    within.as_secs_f64()
                )
            })?;
        Ok(r)
    }

    /// Why durable calls fail until restart, once a sync to disk failed.
    pub fn durable_sync_failure(&self) -> Option<String> {
        self.wal_sync.lock().failed.clone()
    }

    /// A handle that tells whether the writer thread's writes fail for want
    /// of storage ([`WriteWatch`]), without keeping the store open.
    pub fn write_watch(&self) -> WriteWatch {
        self.writes.clone()
    }

    /// A handle that tells [`Store::durable_sync_failure`] without keeping
    /// the store (its writer thread) open.
    pub fn durable_sync_watch(&self) -> DurableSyncWatch {
        DurableSyncWatch(self.wal_sync.clone())
    }

    /// Asks for a sync of the WAL within about [`SYNC_SOON_EVERY`], without
    /// waiting for it: for a commit whose loss to a power cut would make
    /// leadsync do again something not idempotent (an outbox row's `sent`
    /// rolled back is sent again), but which nothing outside waits on. An
    /// fsync per outcome, on the writer thread, would cost the drainer one
    /// disk flush per row; this costs at most ten a second, off it.
    pub fn sync_soon(&self) {
        let mut s = self.wal_sync.lock();
        if !s.soon && s.failed.is_none() {
            s.soon = true;
            drop(s);
            self.wal_sync.wake.notify_one();
        }
    }

    /// Test hook: `probe` runs at the start of every WAL sync round, before
    /// its sync.
    #[cfg(test)]
    pub(crate) fn on_wal_sync(&self, probe: impl Fn() + Send + Sync + 'static) {
        self.wal_sync.lock().probe = Some(Arc::new(move || {
            probe();
            Ok(())
        }));
    }

    /// Test hook: like [`Store::on_wal_sync`], and an error of `probe`
    /// fails the round as a failed sync would.
    #[cfg(test)]
    pub(crate) fn on_wal_sync_result(
        &self,
        probe: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
    ) {
        self.wal_sync.lock().probe = Some(Arc::new(probe));
    }

    /// Test hook: durable calls fail after `within` instead of
    /// [`DURABLE_WITHIN`].
    #[cfg(test)]
    pub(crate) fn durable_within(&self, within: Duration) {
        self.wal_sync.lock().within = Some(within);
    }

    /// Test hook: WAL sync rounds done.
    #[cfg(test)]
    pub(crate) fn wal_sync_rounds(&self) -> u64 {
        self.wal_sync.lock().rounds
    }

    async fn run<R, F>(&self, f: F, urgent: bool) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let writes = self.writes.clone();
        self.jobs.0.push(
            Box::new(move |conn| {
                let before = pages_written(conn);
                let result = f(conn);
                writes.note(
                    &result,
                    pages_written(conn) != before && conn.is_autocommit(),
                );
                let _ = tx.send(result);
            }),
            urgent,
        );
        rx.await
            .map_err(|_| anyhow!("the database thread stopped before answering"))?
    }
}

/// Pages `conn` has written to the WAL file so far (SQLite's
/// `SQLITE_DBSTATUS_CACHE_WRITE`): what tells a write the file system took
/// (with `synchronous = NORMAL` a commit is written to the WAL file, which
/// is in the OS page cache until the WAL is next synced or checkpointed),
/// whether or not it changed a row (rewriting an empty table changes none
/// but writes its page), from one that wrote nothing (an UPDATE that
/// matched no row).
pub(crate) fn pages_written(conn: &Connection) -> i64 {
    let (rc, cur) = db_status(conn, rusqlite::ffi::SQLITE_DBSTATUS_CACHE_WRITE);
    if rc == rusqlite::ffi::SQLITE_OK {
        cur
    } else {
        0
    }
}

/// `sqlite3_db_status(conn, op)` without reset: SQLite's result code and
/// the counter's current value.
fn db_status(conn: &Connection, op: std::ffi::c_int) -> (std::ffi::c_int, i64) {
    let (mut cur, mut hi) = (0, 0);
    // SAFETY: the handle is open for the duration of the borrow, and the
    // pointers are to live locals.
    let rc = unsafe { rusqlite::ffi::sqlite3_db_status(conn.handle(), op, &mut cur, &mut hi, 0) };
    (rc, i64::from(cur))
}

/// An exclusive hold on a database for one leadsync process that sends
/// requests (`run`, `sync`, `drain`): two of them would reset each other's
/// in-flight rows and race for single-use refresh tokens.
pub struct ProcessLock {
    /// The flock on the database file itself: deleting the lock file while
    /// its holder runs lets another process take a new one, but not this.
    /// Declared first, so dropped first (fields drop in declaration order):
    /// released after the lock file, it was still held for a moment when
    /// the lock file was free, and a command taking the lock then without
    /// retrying (`sync_through_daemon`, `wait_for_migration`, the demo) was
    /// refused as if another leadsync ran.
    _database: Option<DatabaseHold>,
    _file: File,
}

/// Descriptors of database files this process opened for their flock
/// ([`ProcessLock`]): (device, inode, file, held now). Never closed while
/// the process runs: closing any descriptor of a file drops every POSIX
/// (fcntl) lock the process holds on it, SQLite's own included; an idle
/// one is used again for the next hold. flock(2) is independent of those
/// locks on a local Linux file system: taking or releasing it leaves
/// SQLite's alone.
static DATABASE_FILES: std::sync::Mutex<Vec<(u64, u64, File, bool)>> =
    std::sync::Mutex::new(Vec::new());

/// Why [`idle_descriptor`] has no descriptor to give.
enum Unopened {
    Open(std::io::Error),
    Stat(std::io::Error),
}

/// The index in [`DATABASE_FILES`] of a descriptor on the database `meta`
/// describes that no hold has: one kept from before, else one opened now
/// and kept for good.
fn idle_descriptor(
    files: &mut Vec<(u64, u64, File, bool)>,
    database: &Path,
    meta: &std::fs::Metadata,
) -> std::result::Result<usize, Unopened> {
    use std::os::unix::fs::MetadataExt;
    if let Some(at) = files
        .iter()
        .position(|(dev, ino, _, held)| (*dev, *ino) == (meta.dev(), meta.ino()) && !held)
    {
        return Ok(at);
    }
    let file = File::open(database).map_err(Unopened::Open)?;
    match file.metadata() {
        Ok(m) => {
            files.push((m.dev(), m.ino(), file, false));
            Ok(files.len() - 1)
        }
        Err(e) => {
            // Closing any descriptor on the database drops this process's
            // SQLite (fcntl) locks on it: never close this one either.
            std::mem::forget(file);
            Err(Unopened::Stat(e))
        }
    }
}

/// An exclusive flock on a database file, released (not closed) when dropped.
struct DatabaseHold(usize);

impl DatabaseHold {
    /// Takes it; `Ok(None)` when another holder has it. A database that
    /// does not exist yet (`probe` before the first start) is not held.
    fn take(database: &Path) -> Result<Option<Option<DatabaseHold>>> {
        let meta = match std::fs::metadata(database) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(None)),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", database.display()));
            }
        };
        let mut files = DATABASE_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let at = match idle_descriptor(&mut files, database, &meta) {
            Ok(at) => at,
            Err(Unopened::Open(e)) => {
                return Err(e)
                    .with_context(|| format!("cannot open {} to lock it", database.display()));
            }
            Err(Unopened::Stat(e)) => {
                return Err(e).with_context(|| format!("cannot read {}", database.display()));
            }
        };
        match files[at].2.try_lock() {
            Ok(()) => {
                files[at].3 = true;
                Ok(Some(Some(DatabaseHold(at))))
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", database.display()))
            }
        }
    }
}

impl DatabaseHold {
    /// Whether another holder has the database's flock now: a shared flock
    /// taken on one of [`DATABASE_FILES`]' descriptors (never closed: see
    /// there) and released at once. A database that does not exist is not
    /// held; one that cannot be opened or locked is, as far as can be told.
    fn is_held(database: &Path) -> bool {
        let meta = match std::fs::metadata(database) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(_) => return true,
        };
        let mut files = DATABASE_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(at) = idle_descriptor(&mut files, database, &meta) else {
            return true;
        };
        match files[at].2.try_lock_shared() {
            Ok(()) => {
                let _ = files[at].2.unlock();
                false
            }
            Err(_) => true,
        }
    }
}

impl Drop for DatabaseHold {
    fn drop(&mut self) {
        let mut files = DATABASE_FILES.lock().unwrap_or_else(|p| p.into_inner());
        let _ = files[self.0].2.unlock();
        files[self.0].3 = false;
    }
}

/// What the lock file says of its holder on its second line: the daemon
/// takes `sync_requests`; another command (`sync`, `drain`, `probe`) does not.
const DAEMON_ROLE: &str = "daemon";
/// A process holding the lock only while it migrates the schema.
const MIGRATING_ROLE: &str = "migrating";
/// How long taking the lock is retried before another holder is assumed:
/// well above the instant a probe of [`ProcessLock::is_held`] holds it.
const LOCK_PROBE_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Who holds the lock (written on the lock file's second line).
#[derive(Clone, Copy)]
enum Role {
    Daemon,
    Command,
    Migrating,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Daemon => DAEMON_ROLE,
            Role::Command => "command",
            Role::Migrating => MIGRATING_ROLE,
        }
    }
}

impl ProcessLock {
    /// Takes the lock next to the database (`<database>.lock`) or says who holds it.
    pub fn acquire(database: &Path) -> Result<ProcessLock> {
        ProcessLock::acquire_as(database, false)
    }

    /// [`ProcessLock::acquire`]; `daemon`: the lock file names its holder
    /// the daemon, which takes `sync_requests` rows (a `leadsync sync`
    /// meeting another command's lock fails at once instead of asking).
    pub fn acquire_as(database: &Path, daemon: bool) -> Result<ProcessLock> {
        let role = if daemon { Role::Daemon } else { Role::Command };
        // A waiting `leadsync sync` looks whether the lock is held with a
        // shared lock it releases at once ([`ProcessLock::is_held`]): a
        // start meeting that probe tries again for a moment before it
        // says another process runs.
        let deadline = std::time::Instant::now() + LOCK_PROBE_GRACE;
        let mut found = ProcessLock::try_acquire_as(database, role)?;
        while found.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            found = ProcessLock::try_acquire_as(database, role)?;
        }
        match found {
            Some(lock) => Ok(lock),
            None => bail!(
                "another leadsync process (pid {}) is running against {}; \
                 `leadsync run` already syncs and drains on schedule — stop it first to run this by hand",
                ProcessLock::holder(database)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                database.display()
            ),
        }
    }

    /// Takes the lock, or `None` when another process holds it.
    pub fn try_acquire(database: &Path) -> Result<Option<ProcessLock>> {
        ProcessLock::try_acquire_as(database, Role::Command)
    }

    fn try_acquire_as(database: &Path, role: Role) -> Result<Option<ProcessLock>> {
        let path = lock_path(database);
        // Root would create it 0644 root's: no later daemon start could
        // take it (`probe` takes the lock before it opens anything else).
        refuse_foreign_as_root(&path, "lock file")?;
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(file) => file,
            // Another user's lock file this one may only read (the service
            // user's, created under umask 0022 by `sudo -u leadsync leadsync
            // probe`), or a directory it may not create it in: flock needs
            // no write access, so whether another process holds the lock
            // can still be told, and a process holding it is waited for as
            // usual. A free one cannot be taken (its holder's pid and role
            // cannot be written).
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                if let Ok(file) = File::open(&path)
                    && let Err(std::fs::TryLockError::WouldBlock) = file.try_lock()
                {
                    return Ok(None);
                }
                return Err(LockNotWritable { path, source: e }.into());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open lock file {}", path.display()));
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // And the database itself: a holder whose lock file was deleted
        // (by hand, a cleanup of the directory) still holds it, and a
        // second process would set its rows in flight back to pending at
        // start, to be sent twice.
        let Some(database_hold) = DatabaseHold::take(database)? else {
            return Ok(None);
        };
        // The pid, and the holder's role on a second line.
        use std::os::unix::fs::FileExt;
        let role = role.as_str();
        file.set_len(0)?;
        file.write_all_at(format!("{}\n{role}\n", std::process::id()).as_bytes(), 0)?;
        Ok(Some(ProcessLock {
            _database: database_hold,
            _file: file,
        }))
    }

    /// Whether some process holds the lock now. Nothing is kept: a shared
    /// lock taken to find out is released at once. A lock file that cannot
    /// be read: held, as far as can be told. A free or missing lock file is
    /// not the whole answer: a holder whose lock file was deleted (by hand,
    /// a cleanup of the directory) still holds the database's own flock,
    /// and runs (`sync` called such a daemon stopped).
    pub fn is_held(database: &Path) -> bool {
        let file_held = match File::open(lock_path(database)) {
            Ok(file) => match file.try_lock_shared() {
                Ok(()) => {
                    let _ = file.unlock();
                    false
                }
                Err(_) => true,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(_) => true,
        };
        file_held || DatabaseHold::is_held(database)
    }

    /// The pid the lock file names (the holder's, while it is held).
    pub fn holder(database: &Path) -> Option<u32> {
        std::fs::read_to_string(lock_path(database))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the lock file says its holder holds it only to migrate.
    fn held_for_migration(database: &Path) -> bool {
        std::fs::read_to_string(lock_path(database))
            .is_ok_and(|t| t.lines().nth(1).map(str::trim) == Some(MIGRATING_ROLE))
    }

    /// Whether the lock file names another command (`drain`, `sync`,
    /// `probe`) as its holder: not the daemon, nor a process migrating the
    /// schema (a daemon starting may hold it for that first).
    pub fn held_by_command(database: &Path) -> bool {
        std::fs::read_to_string(lock_path(database))
            .is_ok_and(|t| t.lines().nth(1).map(str::trim) == Some(Role::Command.as_str()))
    }

    /// Whether the lock file names the daemon as its holder. A file naming
    /// no role (written by an older leadsync, or read while being written)
    /// counts as the daemon's: asking is what leadsync did before.
    pub fn held_by_daemon(database: &Path) -> bool {
        let Ok(text) = std::fs::read_to_string(lock_path(database)) else {
            return true;
        };
        text.lines()
            .nth(1)
            .map(str::trim)
            .is_none_or(|role| role.is_empty() || role == DAEMON_ROLE)
    }
}

/// The lock file cannot be opened for writing by this user, and no other
/// process holds the lock.
#[derive(Debug)]
pub struct LockNotWritable {
    path: PathBuf,
    source: std::io::Error,
}

impl std::fmt::Display for LockNotWritable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot open lock file {}", self.path.display())
    }
}

impl std::error::Error for LockNotWritable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn lock_path(database: &Path) -> PathBuf {
    // Next to the database itself, not to a symlink to it: two paths to one
    // database must meet at one lock (the database exists by now: it is
    // opened before the lock is taken).
    let database = std::fs::canonicalize(database).unwrap_or_else(|_| database.to_path_buf());
    let mut name = database.into_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// The indexes leadsync's statements name with `INDEXED BY`, as its
/// migrations create them. Left to itself the planner walks worse ones:
/// without statistics, `outbox_by_state` for a claim (sorting every pending
/// row) and for the late check (every sent row); with statistics taken
/// while no row waited, the index of all waiting rows for each walked row's
/// probe. See each statement.
const PINNED_INDEXES: &[(&str, &str)] = &[
    (
        "outbox_due",
        "CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE state = 'pending' AND waiting_for IS NULL",
    ),
    (
        "outbox_open_by_negotiation",
        "CREATE INDEX outbox_open_by_negotiation ON outbox (negotiation_id, changed_at_order, id)
         WHERE state IN ('pending', 'sending')",
    ),
    (
        "outbox_sent_by_negotiation",
        "CREATE INDEX outbox_sent_by_negotiation ON outbox (negotiation_id, changed_at_order, id)
         WHERE state = 'sent'",
    ),
    (
        "outbox_waiting_by_negotiation",
        "CREATE INDEX outbox_waiting_by_negotiation ON outbox (negotiation_id) WHERE waiting_for IS NOT NULL",
    ),
    (
        "outbox_ready_by_business",
        "CREATE INDEX outbox_ready_by_business ON outbox (business_id)
         WHERE state = 'pending' AND waiting_for IS NULL",
    ),
    (
        "message_outbox_due",
        "CREATE INDEX message_outbox_due ON message_outbox (next_attempt_at, id)
         WHERE state = 'pending' AND waiting_for IS NULL",
    ),
    (
        "message_outbox_open_by_negotiation",
        "CREATE INDEX message_outbox_open_by_negotiation ON message_outbox (negotiation_id, id)
         WHERE state IN ('pending', 'sending')",
    ),
    (
        "message_outbox_sent_by_negotiation",
        "CREATE INDEX message_outbox_sent_by_negotiation ON message_outbox (negotiation_id, id)
         WHERE state = 'sent'",
    ),
    (
        "message_outbox_waiting_by_negotiation",
        "CREATE INDEX message_outbox_waiting_by_negotiation ON message_outbox (negotiation_id)
         WHERE waiting_for IS NOT NULL",
    ),
    (
        "message_outbox_ready_by_business",
        "CREATE INDEX message_outbox_ready_by_business ON message_outbox (business_id)
         WHERE state = 'pending' AND waiting_for IS NULL",
    ),
    (
        "negotiation_changes_news_by_business",
        "CREATE INDEX negotiation_changes_news_by_business ON negotiation_changes (business_id, id)
         WHERE kind <> 'missing'",
    ),
];

/// Which of [`PINNED_INDEXES`] the mirror has, as leadsync made them. The
/// mirror's schema is the user's too (SPEC §3): SQLite fails a statement
/// whose `INDEXED BY` names an index that is missing (dropped, renamed) or
/// unusable (redefined), so a loop that named one would fail every pass
/// for good. A statement names its index only when it is there as made;
/// otherwise the planner chooses (slower, never stuck). Read it in the
/// transaction that runs the statements: no one changes the schema under a
/// write transaction, and a reader's statement that meets a change fails
/// once, not again on the next pass.
#[derive(Debug, Clone, Default)]
pub struct Pins(std::collections::HashSet<&'static str>);

impl Pins {
    /// Reads the pinned indexes the mirror has (one look at its schema).
    pub fn read(conn: &Connection) -> Result<Pins> {
        let mut stmt = conn.prepare_cached(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL",
        )?;
        let mut rows = stmt.query([])?;
        let mut pins = std::collections::HashSet::new();
        while let Some(r) = rows.next()? {
            let (Ok(name), Ok(sql)) = (r.get_ref(0)?.as_str(), r.get_ref(1)?.as_str()) else {
                continue;
            };
            let Some((pinned, def)) = PINNED_INDEXES.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            if same_definition(def, sql) {
                pins.insert(*pinned);
            }
        }
        Ok(Pins(pins))
    }

    /// The pinned indexes the mirror lacks (dropped, renamed, redefined),
    /// each with the statement that makes it again.
    pub fn missing(&self) -> Vec<(&'static str, String)> {
        PINNED_INDEXES
            .iter()
            .filter(|(name, _)| !self.0.contains(name))
            .map(|(name, def)| (*name, def.split_whitespace().collect::<Vec<_>>().join(" ")))
            .collect()
    }

    /// `INDEXED BY index` when the mirror has it as leadsync made it, else
    /// nothing (the planner chooses).
    pub fn by(&self, index: &str) -> String {
        if self.0.contains(index) {
            format!("INDEXED BY {index}")
        } else {
            String::new()
        }
    }
}

/// Whether an index's stored `sql` is `def`, whitespace aside, and with
/// the table's name in double quotes or not: SQLite writes it so in the
/// indexes of a table it renames (a table renamed and back, or rebuilt by a
/// tool from the stored definitions, has its indexes as made). Nothing else
/// is unquoted: `IS "NULL"` is another index than `IS NULL`, one whose
/// predicate the statements do not imply (naming it would fail them).
fn same_definition(def: &str, sql: &str) -> bool {
    let mut sql = sql.split_whitespace();
    let mut previous = "";
    for word in def.split_whitespace() {
        let Some(stored) = sql.next() else {
            return false;
        };
        let table = previous == "ON"
            && stored.len() == word.len() + 2
            && stored.starts_with('"')
            && stored.ends_with('"')
            && &stored[1..stored.len() - 1] == word;
        if stored != word && !table {
            return false;
        }
        previous = word;
    }
    sql.next().is_none()
}

/// True when SQLite gave up waiting for another connection's lock.
pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// True when an error from a [`Store::call`] is SQLite giving up on a lock
/// (worth trying again), as opposed to anything else (not worth it).
pub fn is_busy_error(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<rusqlite::Error>())
        .any(is_busy)
}

/// Maps a SQLite error from a write by the outbox's triggers or constraints
/// to its message alone (`outbox: status must be ...`).
pub fn constraint_message(e: &rusqlite::Error) -> Option<String> {
    match e {
        rusqlite::Error::SqliteFailure(f, Some(msg))
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Some(msg.clone())
        }
        _ => None,
    }
}

/// `base`, or `base` followed by as many `_` as make a name no table,
/// index, view or trigger of the schema has (case-insensitively): a
/// rebuild's temporary table.
fn free_name(tx: &Connection, base: &str) -> rusqlite::Result<String> {
    let mut name = base.to_string();
    while tx
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE name = ?1 COLLATE NOCASE",
            [&name],
            |_| Ok(()),
        )
        .optional()?
        .is_some()
    {
        name.push('_');
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storage error as the writer thread sees one.
    fn disk_full() -> Result<()> {
        Err(anyhow::Error::new(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ))
        .context("cannot record the pass"))
    }

    /// A large write that keeps failing (a sync pass) and small ones that
    /// still fit (the lag table, rewritten every second while writes fail):
    /// each small one cleared the failure, and `/healthz` went 200 between
    /// two failed passes. Writes must work for a quiet period with no
    /// storage failure first, and the "for N s" goes on counting meanwhile.
    #[test]
    fn a_small_write_that_fits_between_failing_ones_does_not_clear_the_failure() {
        let watch = WriteWatch::default();
        watch.note(&disk_full(), false);
        let (why, _) = watch.failure().expect("a failure");
        assert!(why.contains("full"), "{why}");
        // As if it had failed for a minute.
        let minute = Duration::from_secs(60);
        watch.lock().failed.as_mut().unwrap().since -= minute;
        watch.note(&Ok(()), true);
        assert!(
            watch.failure().is_some(),
            "cleared by one small write right after a failure"
        );
        watch.note(&disk_full(), false);
        let (_, since) = watch.failure().expect("failing again");
        assert!(since >= minute, "the count restarted: {since:?}");
        assert!(watch.failing());
        watch.note(&Ok(()), true);
        assert!(watch.failure().is_some());
        assert!(!watch.failing(), "a write worked since the last failure");
        // A write that committed nothing starts no quiet period.
        let other = WriteWatch::default();
        other.set_quiet(Duration::ZERO);
        other.note(&disk_full(), false);
        other.note(&Ok(()), false);
        assert!(other.failure().is_some());
        // Once the quiet period has passed with no failure, it is cleared,
        // and a later failure counts from itself.
        watch.set_quiet(Duration::ZERO);
        assert_eq!(watch.failure(), None);
        watch.note(&disk_full(), false);
        let (_, again) = watch.failure().expect("failing anew");
        assert!(again < minute, "{again:?} counts from the earlier failure");
    }

    /// `sudo leadsync probe` (root) before the daemon's first start: the
    /// probe takes the lock before anything else, and a lock file root
    /// creates in the service user's directory (0644) stopped every later
    /// daemon start ("cannot open lock file"). Refused instead, like the
    /// database, and nothing is left behind.
    #[test]
    fn root_takes_no_lock_in_the_service_users_directory() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("state");
        std::fs::create_dir(&theirs).unwrap();
        if std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).is_err() {
            eprintln!("skipped: cannot chown (not root)");
            return;
        }
        let db = theirs.join("mirror.db");
        let e = ProcessLock::acquire(&db).err().expect("root took the lock");
        assert!(format!("{e:#}").contains("sudo -u"), "{e:#}");
        assert!(
            !lock_path(&db).exists(),
            "a root-owned lock file was left behind"
        );
    }

    #[test]
    fn a_table_renamed_and_back_keeps_its_indexes_named() {
        // SQLite rewrites the indexes of a renamed table with its name in
        // double quotes (`ON "outbox" (...)`): a table renamed and back (or
        // rebuilt by a tool that reuses the stored definitions) has the
        // indexes as made, and must keep its fast plans, with no warning.
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("m.db"), true).unwrap();
        for table in ["outbox", "message_outbox", "negotiation_changes"] {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} RENAME TO {table}_moved;
                 ALTER TABLE {table}_moved RENAME TO {table};"
            ))
            .unwrap();
        }
        let quoted: String = conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'outbox_due'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(quoted.contains(r#"ON "outbox" ("#), "{quoted}");
        assert_eq!(Pins::read(&conn).unwrap().missing(), []);
        // Only the table's name: `IS "NULL"` (the text 'NULL', for SQLite
        // takes an unknown double-quoted name for a string) is another
        // index, whose predicate a claim does not imply: naming it would
        // fail every claim.
        conn.execute_batch(
            r#"DROP INDEX outbox_due;
               CREATE INDEX outbox_due ON "outbox" (next_attempt_at, id)
                WHERE state = 'pending' AND waiting_for IS "NULL";
               DROP INDEX message_outbox_due;
               CREATE INDEX message_outbox_due ON "message_outbox" (next_attempt_at, id)
                WHERE state = 'pending' AND waiting_for IS NULL;"#,
        )
        .unwrap();
        let missing: Vec<&str> = Pins::read(&conn)
            .unwrap()
            .missing()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(missing, ["outbox_due"]);
    }

    #[test]
    fn every_pinned_index_is_named_on_a_fresh_mirror() {
        // A definition here that drifted from its migration would quietly
        // leave its statements to the planner.
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("m.db"), true).unwrap();
        let pins = Pins::read(&conn).unwrap();
        for (index, _) in PINNED_INDEXES {
            assert_eq!(pins.by(index), format!("INDEXED BY {index}"));
        }
        assert!(pins.missing().is_empty());
        // So on a mirror that went through every migration, from schema 1.
        let mut upgraded = Connection::open(dir.path().join("v1.db")).unwrap();
        migrate_to(&mut upgraded, 1).unwrap();
        migrate(&mut upgraded).unwrap();
        assert!(Pins::read(&upgraded).unwrap().missing().is_empty());
        conn.execute_batch(
            "DROP INDEX outbox_due;
             CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
             DROP INDEX message_outbox_due;",
        )
        .unwrap();
        let pins = Pins::read(&conn).unwrap();
        let missing: Vec<&str> = pins.missing().into_iter().map(|(name, _)| name).collect();
        assert_eq!(missing, ["outbox_due", "message_outbox_due"]);
        assert_eq!(pins.by("outbox_due"), "");
        assert_eq!(pins.by("message_outbox_due"), "");
        assert_eq!(
            pins.by("outbox_open_by_negotiation"),
            "INDEXED BY outbox_open_by_negotiation"
        );
    }

    /// Waits (polling, bounded) until `cond` holds.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_call_answers_after_a_wal_sync_that_covers_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let store = Store::open(&path).unwrap();
        store
            .call(|c| Ok(c.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .await
            .unwrap();
        // Each round records how many rows were committed when it began:
        // its sync covers those.
        let seen = Arc::new(Mutex::new(Vec::<i64>::new()));
        let (p, s) = (path.clone(), seen.clone());
        store.on_wal_sync(move || {
            let c = Connection::open_with_flags(&p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let n: i64 = c
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            s.lock().unwrap().push(n);
        });
        store
            .call_urgent_durable(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?))
            .await
            .unwrap();
        assert!(
            seen.lock().unwrap().iter().any(|&n| n >= 1),
            "answered before a sync covering its commit: rounds saw {:?}",
            seen.lock().unwrap()
        );
        // A plain call waits for no sync.
        let rounds = store.wal_sync_rounds();
        store
            .call_urgent(|c| Ok(c.execute("INSERT INTO t VALUES (2)", [])?))
            .await
            .unwrap();
        assert_eq!(store.wal_sync_rounds(), rounds);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_asked_for_soon_covers_the_commit_before_it_without_a_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        store
            .call(|c| Ok(c.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::<i64>::new()));
        let (p, s) = (path.clone(), seen.clone());
        store.on_wal_sync(move || {
            let c = Connection::open_with_flags(&p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            let n: i64 = c
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            s.lock().unwrap().push(n);
        });
        // An outcome recorded: nobody waits for the disk, but it gets there soon.
        store
            .call(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?))
            .await
            .unwrap();
        store.sync_soon();
        until("no sync round covered the commit", || {
            seen.lock().unwrap().iter().any(|&n| n >= 1)
        })
        .await;
    }

    /// A store with table `t`, for the WAL sync tests.
    async fn store_with_t(dir: &tempfile::TempDir) -> Store {
        let store = Store::open(&dir.path().join("w.db")).unwrap();
        store
            .call(|c| Ok(c.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .await
            .unwrap();
        store
    }

    /// A read takes the connection an earlier read gave back (no schema
    /// read, no files opened again) and still sees every commit made
    /// before it; one left in a transaction, or whose read failed, is
    /// closed rather than given back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_reuses_an_idle_connection_and_sees_later_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        let count =
            |c: &Connection| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))?);
        assert_eq!(store.idle_readers(), 0);
        assert_eq!(store.read(count).await.unwrap(), 0);
        assert_eq!(store.idle_readers(), 1);
        // Marks the connection: a new one would not have this temp table.
        store
            .read(|c| Ok(c.execute_batch("CREATE TEMP TABLE mark (x)")?))
            .await
            .unwrap();
        for n in 1..=3 {
            store
                .call(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?))
                .await
                .unwrap();
            assert_eq!(store.read(count).await.unwrap(), n);
            assert_eq!(store.idle_readers(), 1);
        }
        let marked = |c: &Connection| {
            Ok(c.query_row(
                "SELECT count(*) FROM temp.sqlite_schema WHERE name = 'mark'",
                [],
                |r| r.get::<_, i64>(0),
            )?)
        };
        assert_eq!(
            store.read(marked).await.unwrap(),
            1,
            "the connection was not reused"
        );
        // Left inside a transaction: closed, not given back.
        store
            .read(|c| Ok(c.execute_batch("BEGIN; SELECT count(*) FROM t;")?))
            .await
            .unwrap();
        assert_eq!(store.idle_readers(), 0);
        assert_eq!(store.read(marked).await.unwrap(), 0);
        assert_eq!(store.idle_readers(), 1);
        // A failed read: closed too.
        assert!(
            store
                .read(|c| Ok(c.execute_batch("SELECT nope FROM t")?))
                .await
                .is_err()
        );
        assert_eq!(store.idle_readers(), 0);
        assert_eq!(store.read(count).await.unwrap(), 3);
        assert_eq!(store.idle_readers(), 1);
        // A cached statement left stepping (its rows never dropped, so
        // never reset) holds the read transaction open: closed too.
        store
            .read(|c| {
                let mut stmt = c.prepare_cached("SELECT x FROM t")?;
                let mut rows = stmt.query([])?;
                assert!(rows.next()?.is_some());
                std::mem::forget(rows);
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(store.idle_readers(), 0);
    }

    /// A connection given back keeps no page cache: any commit would
    /// invalidate it before the next read anyway.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_reader_keeps_no_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        store
            .call(|c| {
                Ok(c.execute_batch(
                    "CREATE TABLE big (b BLOB);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
                     INSERT INTO big SELECT zeroblob(2000) FROM n;",
                )?)
            })
            .await
            .unwrap();
        fn cache_used(c: &Connection) -> i64 {
            let (rc, cur) = super::db_status(c, rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED);
            assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
            cur
        }
        let after_scan = store
            .read(|c| {
                let n: i64 = c.query_row("SELECT count(length(b)) FROM big", [], |r| r.get(0))?;
                assert_eq!(n, 1000);
                Ok(cache_used(c))
            })
            .await
            .unwrap();
        assert!(after_scan > 1_000_000, "the scan cached {after_scan} bytes");
        assert_eq!(store.idle_readers(), 1);
        let idle = store.read(|c| Ok(cache_used(c))).await.unwrap();
        assert!(idle < 100_000, "the idle reader kept {idle} bytes of cache");
    }

    /// Dropping the store closes its idle readers before the writer's
    /// connection, which is then the last one: its close checkpoints the
    /// WAL and removes the `-wal` file. A reader still open then would
    /// leave the WAL behind: the pool is held here past the store's drop,
    /// as a field dropped after the writer's handle, or a read still in
    /// progress, would hold it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_store_with_an_idle_reader_removes_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        let wal = sidecar(store.path(), "-wal");
        store
            .call(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?))
            .await
            .unwrap();
        let n = store
            .read(|c| Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))?))
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(store.idle_readers(), 1);
        assert!(wal.exists());
        let pool = store.readers.clone();
        drop(store);
        // The writer closes on its own thread once its handle is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while wal.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the -wal file outlived the store"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(pool.lock().unwrap().is_empty());
    }

    /// After a failed write-back the kernel reports the error once and may
    /// mark the pages clean: a later sync that succeeds proves nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_every_later_durable_call_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        let failures = Arc::new(std::sync::atomic::AtomicU32::new(1));
        let f = failures.clone();
        store.on_wal_sync_result(move || {
            if f.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                Err(std::io::Error::other("EIO (injected)"))
            } else {
                Ok(())
            }
        });
        let insert = |c: &mut Connection| Ok(c.execute("INSERT INTO t VALUES (1)", [])?);
        let first = store.call_urgent_durable(insert).await;
        assert!(first.is_err(), "a failed sync answered Ok");
        for _ in 0..2 {
            let later = store.call_urgent_durable(insert).await;
            assert!(
                later.is_err(),
                "a durable call after a failed sync answered Ok"
            );
        }
        assert!(store.durable_sync_failure().unwrap().contains("EIO"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_asked_for_soon_is_done_at_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        // A round just done: the next one asked for soon waits ~0.1 s.
        store
            .call_urgent_durable(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?))
            .await
            .unwrap();
        store
            .call(|c| Ok(c.execute("INSERT INTO t VALUES (2)", [])?))
            .await
            .unwrap();
        store.sync_soon();
        let wal_sync = store.wal_sync.clone();
        drop(store);
        // The thread wakes (as it may at any time) with the store gone.
        wal_sync.wake.notify_all();
        until("the WAL sync thread never ended", || wal_sync.lock().ended).await;
        assert_eq!(wal_sync.lock().rounds, 2, "the round asked for was dropped");
        assert!(wal_sync.lock().failed.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_call_fails_when_its_sync_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        store.durable_within(Duration::from_millis(200));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        store.on_wal_sync(move || {
            let _ = release_rx.lock().unwrap().recv();
        });
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            store.call_urgent_durable(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?)),
        )
        .await
        .expect("a hung sync hung the durable call");
        let e = r.expect_err("answered Ok with its sync hung");
        assert!(format!("{e:#}").contains("within"), "{e:#}");
        release_tx.send(()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicked_sync_thread_fails_durable_calls_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_t(&dir).await;
        store.on_wal_sync(|| panic!("injected"));
        for _ in 0..2 {
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                store.call_urgent_durable(|c| Ok(c.execute("INSERT INTO t VALUES (1)", [])?)),
            )
            .await
            .expect("a durable call hung on a dead sync thread");
            assert!(r.is_err());
        }
    }

    /// The database file is never opened in its place: closing a
    /// descriptor of it drops the process's SQLite locks on it.
    #[test]
    fn a_missing_wal_file_is_an_error_while_the_writer_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("n.db");
        std::fs::write(&db, b"").unwrap();
        let wal = sidecar(&db, "-wal");
        let (mut kept, mut dir_synced) = (None, false);
        assert!(sync_wal(&wal, dir.path(), &mut kept, &mut dir_synced, false).is_err());
        // Once the writer is gone its close checkpointed everything.
        assert!(sync_wal(&wal, dir.path(), &mut kept, &mut dir_synced, true).is_ok());
    }

    /// The descriptor is kept across rounds (an error is reported once per
    /// open file description), and replaced when the file is.
    #[test]
    fn the_wal_descriptor_is_kept_until_the_file_is_replaced() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("k.db-wal");
        std::fs::write(&wal, b"x").unwrap();
        let (mut kept, mut dir_synced) = (None, false);
        assert!(sync_wal(&wal, dir.path(), &mut kept, &mut dir_synced, false).is_ok());
        let first = kept.as_ref().unwrap().file.try_clone().unwrap();
        use std::os::fd::AsRawFd;
        let fd = kept.as_ref().unwrap().file.as_raw_fd();
        assert!(sync_wal(&wal, dir.path(), &mut kept, &mut dir_synced, false).is_ok());
        assert_eq!(kept.as_ref().unwrap().file.as_raw_fd(), fd, "reopened");
        std::fs::remove_file(&wal).unwrap();
        std::fs::write(&wal, b"y").unwrap();
        assert!(sync_wal(&wal, dir.path(), &mut kept, &mut dir_synced, false).is_ok());
        assert_eq!(
            kept.as_ref().unwrap().ino,
            std::fs::metadata(&wal).unwrap().ino()
        );
        drop(first);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_calls_waiting_together_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("g.db")).unwrap();
        store
            .call(|c| Ok(c.execute_batch("CREATE TABLE t (x INTEGER)")?))
            .await
            .unwrap();
        // The first round is held until 20 more callers wait behind it.
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        store.on_wal_sync(move || {
            let _ = entered_tx.send(());
            let _ = release_rx.lock().unwrap().recv();
        });
        let first = {
            let s = store.clone();
            tokio::spawn(async move {
                s.call_urgent_durable(|c| Ok(c.execute("INSERT INTO t VALUES (0)", [])?))
                    .await
            })
        };
        until("the first round never began", || {
            entered_rx.try_recv().is_ok()
        })
        .await;
        let rest: Vec<_> = (1..=20)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move {
                    s.call_urgent_durable(move |c| Ok(c.execute("INSERT INTO t VALUES (?1)", [i])?))
                        .await
                })
            })
            .collect();
        until("the callers never queued for a sync", || {
            store.wal_sync.lock().waiting.len() == 20
        })
        .await;
        assert!(!first.is_finished(), "answered before its sync finished");
        // Round 1 (the first caller), then one round for the other twenty.
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        assert_eq!(store.wal_sync_rounds(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn urgent_jobs_overtake_queued_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("q.db")).unwrap();
        assert!(!store.urgent_within(Duration::from_secs(60)));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        // Hold the writer until both jobs below are queued.
        let s = store.clone();
        let blocker = tokio::spawn(async move {
            s.call(move |_| {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
                Ok(())
            })
            .await
        });
        // The writer may still be migrating (slow under a loaded disk): count
        // the queue only once it holds the blocker, or the blocker is counted.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while started_rx.try_recv().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never took the blocking job"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let (o1, o2, s1, s2) = (order.clone(), order.clone(), store.clone(), store.clone());
        let normal = tokio::spawn(async move {
            s1.call(move |_| {
                o1.lock().unwrap().push("normal");
                Ok(())
            })
            .await
        });
        let queued = |n: usize| {
            let q = store.jobs.0.lock();
            q.normal.len() + q.urgent.len() == n
        };
        while !queued(1) {
            assert!(
                std::time::Instant::now() < deadline,
                "the normal job never queued"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let urgent = tokio::spawn(async move {
            s2.call_urgent(move |_| {
                o2.lock().unwrap().push("urgent");
                Ok(())
            })
            .await
        });
        while !queued(2) {
            assert!(
                std::time::Instant::now() < deadline,
                "the urgent job never queued"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        normal.await.unwrap().unwrap();
        urgent.await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["urgent", "normal"]);
        // Bulk writers can tell that latency-sensitive writes are about.
        assert!(store.urgent_within(Duration::from_secs(60)));
        assert!(store.clone().urgent_within(Duration::from_secs(60)));
    }

    #[test]
    fn the_bundled_sqlite_keeps_no_memory_statistics() {
        // .cargo/config.toml: with statistics on, every SQLite allocation
        // takes a global mutex (seen in the full sync's profile).
        let conn = Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
    }

    /// Every column SPEC §3, §9 and §10 let partners write by hand, with a
    /// NUL after a valid value (SQLite's GLOB, length() and the like stop
    /// there): the table refuses each.
    #[test]
    fn no_hand_written_column_takes_a_value_cut_by_a_nul() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let nul = "|| char(0) || 'x'";
        for sql in [
            format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES ('519' {nul}, 'hired', '2024-06-14T09:30:00Z')"
            ),
            format!(
                "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at) VALUES ('519', '12' {nul}, 'hired', '2024-06-14T09:30:00Z')"
            ),
            format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES ('519', 'hired' {nul}, '2024-06-14T09:30:00Z')"
            ),
            format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES ('519', 'hired', '2024-06-14T09:30:00Z' {nul})"
            ),
            format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, next_attempt_at) VALUES ('519', 'hired', '2024-06-14T09:30:00Z', '2024-06-14T09:30:00Z' {nul})"
            ),
            format!("INSERT INTO message_outbox (negotiation_id, text) VALUES ('519' {nul}, 'hi')"),
            format!(
                "INSERT INTO message_outbox (negotiation_id, business_id, text) VALUES ('519', '12' {nul}, 'hi')"
            ),
            format!("INSERT INTO message_outbox (negotiation_id, text) VALUES ('519', 'hi' {nul})"),
            format!("INSERT INTO sync_requests (business_id) VALUES ('12' {nul})"),
            format!("INSERT INTO sync_requests (kind) VALUES ('full' {nul})"),
        ] {
            assert!(c.execute(&sql, []).is_err(), "taken: {sql}");
        }
    }

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        drop(open_connection(&path, true).unwrap());
        let conn = open_connection(&path, true).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema_version());
    }

    /// Version 24 gives the messages stored before their lead was mirrored
    /// (before it, they kept a NULL business for good) their lead's
    /// business, and counts a failed poll from before as one failure.
    #[test]
    fn version_24_gives_messages_their_leads_business() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(
            "DROP INDEX message_polls_due;
             DROP INDEX messages_without_business;
             ALTER TABLE message_polls DROP COLUMN next_poll_at;
             ALTER TABLE message_polls DROP COLUMN failures;
             INSERT INTO negotiations (negotiation_id, business_id, created_at, payload,
                 payload_hash, first_seen_at, last_seen_at, changed_at)
             VALUES ('1', '7', 't', '{}', 0, 't', 't', 't');
             INSERT INTO messages (message_id, negotiation_id, business_id, payload, source, first_seen_at)
             VALUES ('a', '1', NULL, '{}', 'webhook', 't'), ('b', '1', '8', '{}', 'poll', 't'),
                    ('c', '2', NULL, '{}', 'webhook', 't');
             INSERT INTO message_polls (negotiation_id, business_id, polled_at, outcome)
             VALUES ('1', '7', 't', 'error'), ('3', '7', 't', 'ok');",
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 23).unwrap();
        migrate(&mut conn).unwrap();
        let all = |sql: &str| -> Vec<(String, Option<String>)> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        assert_eq!(
            all("SELECT message_id, business_id FROM messages ORDER BY 1"),
            [
                ("a".to_string(), Some("7".to_string())),
                ("b".to_string(), Some("8".to_string())),
                ("c".to_string(), None)
            ]
        );
        assert_eq!(
            all("SELECT negotiation_id, CAST(failures AS TEXT) FROM message_polls ORDER BY 1"),
            [
                ("1".to_string(), Some("1".to_string())),
                ("3".to_string(), Some("0".to_string()))
            ]
        );
    }

    /// Version 24 run again over a schema that has its columns (migrated
    /// again from an older `user_version`): the columns were taken for the
    /// whole migration done, and the messages without a business kept none.
    #[test]
    fn version_24_run_again_still_gives_messages_their_leads_business() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(
            "DROP INDEX messages_without_business;
             INSERT INTO negotiations (negotiation_id, business_id, created_at, payload,
                 payload_hash, first_seen_at, last_seen_at, changed_at)
             VALUES ('1', '7', 't', '{}', 0, 't', 't', 't');
             INSERT INTO messages (message_id, negotiation_id, business_id, payload, source, first_seen_at)
             VALUES ('a', '1', NULL, '{}', 'webhook', 't');",
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 23).unwrap();
        migrate(&mut conn).unwrap();
        let business: Option<String> = conn
            .query_row("SELECT business_id FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(business.as_deref(), Some("7"));
        let index: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'messages_without_business'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);
    }

    /// Version 21 run again over a schema that has its column (migrated
    /// again from an older `user_version`): kept, and the schema current.
    #[test]
    fn version_21_run_again_keeps_its_column() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.pragma_update(None, "user_version", 20).unwrap();
        migrate(&mut conn).unwrap();
        let n = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            n("SELECT count(*) FROM pragma_table_info('negotiations')
                WHERE name = 'listing_read_at'"),
            1
        );
        assert_eq!(n("PRAGMA user_version"), schema_version());
    }

    /// Version `version` (which adds `column` to each of two `tables`) run
    /// again over a schema that has its columns, or one of them: what is
    /// missing is added, what is there is kept.
    fn one_column_each_run_again_adds_what_is_missing(
        version: i64,
        tables: [&str; 2],
        column: &str,
    ) {
        let undos = tables
            .iter()
            .map(|table| format!("ALTER TABLE {table} DROP COLUMN {column}"))
            .chain(["SELECT 1".to_string()]);
        for undo in undos {
            let dir = tempfile::tempdir().unwrap();
            let mut conn = open_connection(&dir.path().join("m.db"), true).unwrap();
            conn.execute_batch(&undo).unwrap();
            conn.pragma_update(None, "user_version", version - 1)
                .unwrap();
            migrate(&mut conn).unwrap();
            let n = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
            for table in tables {
                assert_eq!(
                    n(&format!(
                        "SELECT count(*) FROM pragma_table_info('{table}')
                          WHERE name = '{column}'"
                    )),
                    1,
                    "{undo}"
                );
            }
            assert_eq!(n("PRAGMA user_version"), schema_version());
        }
    }

    #[test]
    fn version_22_run_again_adds_what_is_missing() {
        one_column_each_run_again_adds_what_is_missing(
            22,
            ["outbox", "message_outbox"],
            "business_filled",
        );
    }

    #[test]
    fn version_23_run_again_adds_what_is_missing() {
        one_column_each_run_again_adds_what_is_missing(
            23,
            ["outbox_attempts", "message_outbox_attempts"],
            "wait_rebased_at",
        );
    }

    /// Version 18 run again over a schema that has some of it (migrated
    /// again from an older `user_version`, or a column added by hand):
    /// what is missing is added, what is there is kept.
    #[test]
    fn version_18_run_again_adds_what_is_missing() {
        for undo in [
            "ALTER TABLE sync_runs DROP COLUMN listed_ids",
            "ALTER TABLE sync_runs DROP COLUMN listed_at",
            "SELECT 1",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut conn = open_connection(&dir.path().join("m.db"), true).unwrap();
            conn.execute_batch(&format!("DROP INDEX sync_runs_listed; {undo};"))
                .unwrap();
            conn.pragma_update(None, "user_version", 17).unwrap();
            migrate(&mut conn).unwrap();
            let n = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
            assert_eq!(
                n("SELECT count(*) FROM pragma_table_info('sync_runs')
                    WHERE name IN ('listed_at', 'listed_ids')"),
                2,
                "{undo}"
            );
            assert_eq!(
                n("SELECT count(*) FROM sqlite_schema WHERE name = 'sync_runs_listed'"),
                1,
                "{undo}"
            );
            assert_eq!(n("PRAGMA user_version"), schema_version());
        }
    }

    /// How `negotiation_changes` is defined now.
    fn changes_table_sql(conn: &Connection) -> String {
        conn.query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'negotiation_changes'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn version_10_rebuilds_the_change_log_keeping_rows_ids_and_what_users_added() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("v9.db")).unwrap();
        migrate_to(&mut conn, 9).unwrap();
        // What a partner may have added to the change feed: a column, an
        // index, a trigger feeding their own table, a view.
        conn.execute_batch(
            "ALTER TABLE negotiation_changes ADD COLUMN handled_at TEXT;
             CREATE INDEX partner_changes_by_status ON negotiation_changes (new_status);
             CREATE TABLE partner_feed (change_id INTEGER, kind TEXT);
             CREATE TRIGGER partner_feed_insert AFTER INSERT ON negotiation_changes
             BEGIN INSERT INTO partner_feed VALUES (NEW.id, NEW.kind); END;
             CREATE VIEW partner_news AS
                 SELECT id, negotiation_id FROM negotiation_changes WHERE kind = 'new';
             INSERT INTO negotiation_changes (id, negotiation_id, business_id, observed_at, kind,
                 old_status, new_status, changed_fields, old_payload, sync_run_id, source, handled_at)
             VALUES (7, 'n1', 'b', '2026-01-01T00:00:00.000Z', 'new', NULL, 'Open', NULL, NULL, 3, 'poll', 'x'),
                    (9, 'n1', 'b', '2026-01-02T00:00:00.000Z', 'changed', 'Open', 'Closed', '[\"status\"]',
                     '{\"status\":\"Open\"}', 4, 'webhook', NULL),
                    (12, 'n2', 'b', '2026-01-03T00:00:00.000Z', 'missing', 'Open', 'Open', NULL, NULL, 5, 'poll', NULL);
             DELETE FROM partner_feed;",
        )
        .unwrap();
        let rows = |c: &Connection| -> Vec<String> {
            c.prepare(
                "SELECT id || '|' || negotiation_id || '|' || kind || '|' || ifnull(old_status, '') || '|'
                     || ifnull(new_status, '') || '|' || ifnull(changed_fields, '') || '|'
                     || ifnull(old_payload, '') || '|' || sync_run_id || '|' || source || '|'
                     || ifnull(handled_at, '')
                   FROM negotiation_changes ORDER BY id",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
        };
        let before = rows(&conn);
        migrate(&mut conn).unwrap();
        assert_eq!(rows(&conn), before);
        let sql = changes_table_sql(&conn);
        assert!(
            sql.contains(KIND_CHECK_OR) && !sql.contains(KIND_CHECK_IN),
            "{sql}"
        );
        let objects: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE tbl_name IN ('negotiation_changes', 'partner_news')
                  ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            objects,
            [
                "negotiation_changes",
                "negotiation_changes_by_negotiation",
                "negotiation_changes_news_by_business",
                "partner_changes_by_status",
                "partner_feed_insert",
                "partner_news"
            ]
        );
        // The partner's trigger still fires, the view still reads, ids go on
        // from the largest, and the news index serves the message poll.
        conn.execute(
            "INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind)
             VALUES ('n3', 'b', 't', 'new')",
            [],
        )
        .unwrap();
        let fed: Vec<(i64, String)> = conn
            .prepare("SELECT change_id, kind FROM partner_feed")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(fed, [(13, "new".to_string())]);
        let news: i64 = conn
            .query_row("SELECT count(*) FROM partner_news", [], |r| r.get(0))
            .unwrap();
        assert_eq!(news, 2);
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id FROM negotiation_changes
                  WHERE business_id = 'b' AND id > 0 AND kind <> 'missing' ORDER BY id",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(
            plan.contains("negotiation_changes_news_by_business"),
            "{plan}"
        );
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        let legacy: i64 = conn
            .query_row("PRAGMA legacy_alter_table", [], |r| r.get(0))
            .unwrap();
        assert_eq!((fk, legacy), (1, 0));
    }

    #[test]
    fn version_10_keeps_a_generated_column_a_user_added() {
        // ALTER TABLE ADD COLUMN accepts a VIRTUAL generated column; copying
        // the rows with `SELECT *` supplied it a value, and the migration
        // (so the daemon's start) failed.
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("v9.db")).unwrap();
        migrate_to(&mut conn, 9).unwrap();
        conn.execute_batch(
            "ALTER TABLE negotiation_changes ADD COLUMN day TEXT
                 GENERATED ALWAYS AS (substr(observed_at, 1, 10)) VIRTUAL;
             ALTER TABLE negotiation_changes ADD COLUMN \"handled \"\"at\"\"\" TEXT;
             INSERT INTO negotiation_changes (id, negotiation_id, business_id, observed_at, kind,
                 \"handled \"\"at\"\"\")
             VALUES (5, 'n1', 'b', '2026-01-01T00:00:00.000Z', 'new', 'x');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let row: (i64, String, String) = conn
            .query_row(
                "SELECT id, day, \"handled \"\"at\"\"\" FROM negotiation_changes",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(row, (5, "2026-01-01".to_string(), "x".to_string()));
        let sql = changes_table_sql(&conn);
        assert!(sql.contains(KIND_CHECK_OR), "{sql}");
    }

    #[test]
    fn version_10_works_beside_a_table_named_like_its_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("v9.db")).unwrap();
        migrate_to(&mut conn, 9).unwrap();
        conn.execute_batch(
            "CREATE TABLE negotiation_changes_v10 (partner TEXT);
             INSERT INTO negotiation_changes_v10 VALUES ('theirs');
             INSERT INTO negotiation_changes (id, negotiation_id, business_id, observed_at, kind)
             VALUES (5, 'n1', 'b', '2026-01-01T00:00:00.000Z', 'new');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let theirs: String = conn
            .query_row("SELECT partner FROM negotiation_changes_v10", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(theirs, "theirs");
        let ids: i64 = conn
            .query_row("SELECT id FROM negotiation_changes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ids, 5);
        let sql = changes_table_sql(&conn);
        assert!(sql.contains(KIND_CHECK_OR), "{sql}");
    }

    #[test]
    fn version_9_gives_created_at_its_milliseconds() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        for (id, at) in [
            ("1", "2026-01-01T00:00:00Z"),
            ("2", "2026-01-01T00:00:00.500Z"),
            ("3", "1718357400"),
        ] {
            conn.execute(
                "INSERT INTO negotiations (negotiation_id, business_id, created_at, payload,
                     payload_hash, first_seen_at, last_seen_at, changed_at)
                 VALUES (?1, 'b', ?2, '{}', 0, 't', 't', 't')",
                [id, at],
            )
            .unwrap();
        }
        conn.pragma_update(None, "user_version", 8).unwrap();
        migrate(&mut conn).unwrap();
        let at: Vec<String> = conn
            .prepare("SELECT created_at FROM negotiations ORDER BY created_at")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            at,
            [
                "1718357400",
                "2026-01-01T00:00:00.000Z",
                "2026-01-01T00:00:00.500Z"
            ]
        );
    }

    /// A WAL mirror at `path` migrated to the version before the last
    /// (numbers may have gaps), and that version.
    fn previous_schema_mirror(path: &Path) -> (Connection, i64) {
        let mut conn = Connection::open(path).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        let previous = migrations().iter().rev().nth(1).map_or(0, |(v, _)| *v);
        migrate_to(&mut conn, previous).unwrap();
        (conn, previous)
    }

    /// Schema 25: a row put aside behind a later row (for that row's
    /// business) by an older claim is first in line and is freed by the
    /// upgrade; a row aside behind an earlier one, or for its own business,
    /// stays aside.
    #[test]
    fn schema_25_frees_the_rows_put_aside_behind_a_later_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
        migrate_to(&mut conn, 24).unwrap();
        for (table, columns, values) in [
            (
                "outbox",
                "status, partner_status_changed_at",
                [
                    "'appt_scheduled', '2024-06-14T09:31:00Z'",
                    "'appt_scheduled', '2024-06-14T09:32:00Z'",
                    "'appt_scheduled', '2024-06-14T09:33:00Z'",
                ],
            ),
            ("message_outbox", "text", ["'a'", "'b'", "'c'"]),
        ] {
            // In order: before (business 7), the row aside (business 9),
            // after (business 7), all put aside for business 9.
            for (business, v) in ["7", "9", "7"].iter().zip(values) {
                conn.execute(
                    &format!(
                        "INSERT INTO {table} (negotiation_id, business_id, {columns})
                         VALUES ('1', '{business}', {v})"
                    ),
                    [],
                )
                .unwrap();
            }
            conn.execute(
                &format!("UPDATE {table} SET waiting_for = '9', last_error = 'waiting: 9'"),
                [],
            )
            .unwrap();
        }
        migrate_to(&mut conn, 25).unwrap();
        for table in ["outbox", "message_outbox"] {
            let aside: Vec<(i64, Option<String>)> = conn
                .prepare(&format!("SELECT id, waiting_for FROM {table} ORDER BY id"))
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert_eq!(
                aside,
                [(1, None), (2, Some("9".into())), (3, Some("9".into()))],
                "{table}"
            );
        }
    }

    /// A partner's own `claim_id` (on either outbox) is not leadsync's:
    /// schema 25 stops with an error naming it and saying to rename it,
    /// and changes nothing; once renamed, the upgrade goes through and the
    /// partner's values are kept. A schema that has leadsync's column
    /// exactly (its version set back by hand) still upgrades.
    #[test]
    fn schema_25_refuses_a_partners_claim_id() {
        for (table, name, def) in [
            ("outbox", "claim_id", "TEXT DEFAULT 'x'"),
            ("message_outbox", "claim_id", "INTEGER DEFAULT 1"),
            ("outbox", "claim_id", "INTEGER NOT NULL DEFAULT 0"),
            ("message_outbox", "claim_id", "TEXT"),
            ("outbox", "Claim_Id", "INTEGER"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
            migrate_to(&mut conn, 24).unwrap();
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {def}"))
                .unwrap();
            let schema = |c: &Connection| -> Vec<String> {
                c.prepare("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<rusqlite::Result<_>>()
                    .unwrap()
            };
            let before = schema(&conn);
            let err = format!("{:#}", migrate(&mut conn).unwrap_err());
            assert!(
                err.contains(&format!("the {table} has a column `{name}`"))
                    && err.contains("schema 25 adds a column by that name")
                    && err.contains(&format!(
                        "ALTER TABLE {table} RENAME COLUMN \"{name}\" TO partner_{name}"
                    )),
                "{table} {def}: {err}"
            );
            assert_eq!(version_of(&conn).unwrap(), 24, "{table} {def}");
            assert_eq!(schema(&conn), before, "{table} {def}");
            conn.execute_batch(&format!(
                "ALTER TABLE {table} RENAME COLUMN {name} TO partner_{name}"
            ))
            .unwrap();
            conn.execute(&format!("UPDATE {table} SET partner_{name} = 5"), [])
                .unwrap();
            migrate(&mut conn).unwrap();
            assert_eq!(version_of(&conn).unwrap(), schema_version());
        }
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.pragma_update(None, "user_version", 24).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version_of(&conn).unwrap(), schema_version());
    }

    /// Schema 25's pass over the rows put aside frees exactly the rows
    /// schema 20's rule frees (it is that rule, without a search of the
    /// negotiation per row), on rows of every kind: ties in the order,
    /// rows with no place in it (a time SQLite cannot read), rows of no
    /// business, rows out of `pending` (`sending` and `dead` among them).
    #[test]
    fn schema_25_frees_the_rows_schema_20s_rule_frees() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = fastrand::Rng::with_seed(25);
        for round in 0..3 {
            let path = dir.path().join(format!("m{round}.db"));
            let mut conn = Connection::open(&path).unwrap();
            migrate_to(&mut conn, 24).unwrap();
            conn.execute_batch("BEGIN").unwrap();
            for _ in 0..400 {
                let negotiation = rng.u8(1..5).to_string();
                let business = ["'7'", "'9'", "NULL"][rng.usize(..3)];
                // Ties: the same instant, in UTC or another zone.
                let at = [
                    "2024-06-14T09:30:00Z",
                    "2024-06-14T10:30:00+01:00",
                    "2024-06-14T09:31:00Z",
                    "2024-06-14T09:30:00.5Z",
                ][rng.usize(..4)];
                conn.execute(
                    &format!(
                        "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
                         VALUES ('{negotiation}', {business}, 'appt_scheduled', '{at}')"
                    ),
                    [],
                )
                .unwrap();
                conn.execute(
                    &format!(
                        "INSERT INTO message_outbox (negotiation_id, business_id, text)
                         VALUES ('{negotiation}', {business}, 'hi')"
                    ),
                    [],
                )
                .unwrap();
            }
            // Rows whose time SQLite cannot read (no place in the order:
            // changed_at_order NULL), as a schema before the checks let in.
            // The checks refuse them now: set around them.
            let check: String = conn
                .query_row(
                    "SELECT sql FROM sqlite_schema WHERE name = 'outbox_validate_update'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            conn.execute_batch("DROP TRIGGER outbox_validate_update")
                .unwrap();
            for id in 1..=400 {
                if rng.u8(..8) == 0 {
                    conn.execute(
                        "UPDATE outbox SET partner_status_changed_at = '2024-13-40T09:30:00Z' WHERE id = ?1",
                        [id],
                    )
                    .unwrap();
                }
            }
            conn.execute_batch(&check).unwrap();
            for table in ["outbox", "message_outbox"] {
                let ids: Vec<i64> = (1..=400).collect();
                for id in ids {
                    if rng.u8(..10) == 0 {
                        // `sending` as a claim makes it (its attempt
                        // counted, stamped).
                        let state = [
                            "'canceled'",
                            "'sent'",
                            "'dead'",
                            "'sending', attempts = attempts + 1, sending_since = 't'",
                        ][rng.usize(..4)];
                        conn.execute(
                            &format!("UPDATE {table} SET state = {state} WHERE id = {id}"),
                            [],
                        )
                        .unwrap();
                    }
                    if rng.bool() {
                        let wait = ["7", "9"][rng.usize(..2)];
                        conn.execute(
                            &format!(
                                "UPDATE {table} SET waiting_for = '{wait}', last_error = 'waiting: {wait}' WHERE id = {id}"
                            ),
                            [],
                        )
                        .unwrap();
                    }
                }
            }
            conn.execute_batch("COMMIT").unwrap();
            let copy = dir.path().join(format!("c{round}.db"));
            conn.execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
                .unwrap();
            let copy = Connection::open(&copy).unwrap();
            conn.execute_batch(include_str!("migrations/0020_waits_follow_rows.sql"))
                .unwrap();
            copy.execute_batch(include_str!("migrations/0025_waits_follow_rows.sql"))
                .unwrap();
            for table in ["outbox", "message_outbox"] {
                let rows = |c: &Connection| -> Vec<(i64, Option<String>, Option<String>)> {
                    c.prepare(&format!(
                        "SELECT id, waiting_for, last_error FROM {table} ORDER BY id"
                    ))
                    .unwrap()
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap()
                    .collect::<rusqlite::Result<_>>()
                    .unwrap()
                };
                let (old, new) = (rows(&conn), rows(&copy));
                assert!(
                    old.iter().any(|r| r.1.is_some()) && old.iter().any(|r| r.1.is_none()),
                    "{table}: the rule freed all or none"
                );
                assert_eq!(old, new, "{table}, round {round}");
            }
            let n = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
            for sql in [
                "SELECT count(*) FROM outbox WHERE changed_at_order IS NULL AND waiting_for IS NOT NULL",
                "SELECT count(*) FROM outbox WHERE state = 'sending'",
                "SELECT count(*) FROM outbox WHERE state = 'dead'",
                "SELECT count(*) FROM message_outbox WHERE state = 'sending'",
                "SELECT count(*) FROM message_outbox WHERE state = 'dead'",
            ] {
                assert!(n(sql) > 0, "round {round}: none of {sql}");
            }
        }
    }

    /// A real mirror of the previous schema (not only its number) is read
    /// by `outbox list`'s queries through [`open_read_only`], at a path
    /// with the bytes a URI gives a meaning to, and left at its version
    /// with no file created beside it.
    #[test]
    fn read_only_reads_the_previous_schema_at_any_path_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a b%20#?&=.db");
        let (conn, previous) = previous_schema_mirror(&path);
        conn.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) \
             VALUES ('519153480500518912', 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [],
        )
        .unwrap();
        drop(conn);
        let files = || {
            let mut v: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let before = files();
        let (ro, version) = open_read_only(&path).unwrap();
        assert_eq!(version, previous);
        assert!(schema_note(&path, version).is_some());
        let rows = outbox::list(&ro, None).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].negotiation_id, "519153480500518912");
        assert!(outbox::list_messages(&ro, None).unwrap().is_empty());
        assert!(ro.execute("DELETE FROM outbox", []).is_err(), "read only");
        drop(ro);
        assert_eq!(files(), before, "a file was left beside the mirror");
        let v: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, previous);
    }

    /// Two commands of the new binary starting at once (the restarted
    /// daemon and an `enqueue`): the one that finds the other migrating
    /// waits for it instead of failing (a failed `enqueue` exits 1, which a
    /// partner may take for a rejected transition).
    #[test]
    fn a_command_meeting_a_migration_in_progress_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let (mut conn, _) = previous_schema_mirror(&path);
        conn.busy_timeout(BUSY_TIMEOUT).unwrap();
        let migrating = ProcessLock::try_acquire_as(&path, Role::Migrating)
            .unwrap()
            .unwrap();
        let (started, ready) = std::sync::mpsc::channel();
        let other = {
            let path = path.clone();
            std::thread::spawn(move || {
                started.send(()).unwrap();
                open_connection(&path, false).map(drop)
            })
        };
        ready.recv().unwrap();
        migrate(&mut conn).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !other.is_finished() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        drop(migrating);
        let result = other.join().unwrap();
        assert!(result.is_ok(), "{:#}", result.unwrap_err());
    }

    /// A waiting `leadsync sync` looks whether the lock is held with a
    /// shared lock it releases at once; a daemon starting at that instant
    /// must not refuse to start ("another leadsync process is running")
    /// for it.
    #[test]
    fn a_starting_daemon_is_not_refused_for_a_probe_of_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        drop(ProcessLock::acquire(&path).unwrap());
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let probes = std::sync::Arc::new(AtomicU64::new(0));
        let prober = {
            let (path, stop, probes) = (path.clone(), stop.clone(), probes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    ProcessLock::is_held(&path);
                    probes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        while probes.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let mut refused = 0;
        for _ in 0..5000 {
            match ProcessLock::acquire_as(&path, true) {
                Ok(lock) => drop(lock),
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap();
        let probes = probes.load(Ordering::Relaxed);
        assert_eq!(
            refused, 0,
            "refused {refused} of 5000 starts ({probes} probes)"
        );
    }

    /// A holder releases the database's flock before its lock file's: in
    /// between, a command that takes the lock without retrying
    /// (`sync_through_daemon`, `wait_for_migration`, the demo) found the
    /// lock file free and the database held, and was refused as if another
    /// leadsync ran. Another open description spins on the lock file while
    /// the holder drops, and looks at the database the instant it is free.
    #[test]
    fn the_database_is_free_once_the_lock_file_is() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::mpsc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        std::fs::write(&path, b"").unwrap();
        drop(ProcessLock::try_acquire(&path).unwrap().unwrap());
        let lock_file = File::open(lock_path(&path)).unwrap();
        let database = File::open(&path).unwrap();
        let spinning = std::sync::Arc::new(AtomicBool::new(false));
        let (go, went) = mpsc::channel::<()>();
        let (found, seen) = mpsc::channel::<bool>();
        let watcher = {
            let spinning = spinning.clone();
            std::thread::spawn(move || {
                for () in went {
                    loop {
                        match lock_file.try_lock() {
                            Ok(()) => break,
                            Err(std::fs::TryLockError::WouldBlock) => {
                                spinning.store(true, Ordering::Release)
                            }
                            Err(std::fs::TryLockError::Error(e)) => panic!("{e}"),
                        }
                    }
                    let free = database.try_lock().is_ok();
                    let _ = database.unlock();
                    lock_file.unlock().unwrap();
                    found.send(free).unwrap();
                }
            })
        };
        let rounds = 500;
        let mut held = 0;
        for _ in 0..rounds {
            let lock = ProcessLock::try_acquire(&path).unwrap().expect("free");
            spinning.store(false, Ordering::Release);
            go.send(()).unwrap();
            while !spinning.load(Ordering::Acquire) {
                // A watcher that panicked (a lock error) never spins: fail,
                // not hang.
                assert!(!watcher.is_finished(), "the watcher stopped");
                std::thread::yield_now();
            }
            drop(lock);
            if !seen.recv().unwrap() {
                held += 1;
            }
        }
        drop(go);
        watcher.join().unwrap();
        assert_eq!(
            held, 0,
            "the database was still held when the lock file was free ({held} of {rounds})"
        );
    }

    /// Taking and dropping the process lock twice, with a write transaction
    /// open on the same database: SQLite's own (fcntl) locks must stay.
    /// Closing any descriptor of the file would drop every fcntl lock this
    /// process holds on it, and another process could write under the
    /// transaction; fcntl locks are per process, so the other writer is this
    /// test binary again ([`another_process_tries_to_write`]).
    #[test]
    fn taking_and_dropping_the_lock_leaves_sqlites_locks_in_place() {
        let dir = tempfile::tempdir().unwrap();
        // A rollback journal: the write lock is on the database file itself.
        let path = dir.path().join("m.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        let other_writes = || -> String {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "store::tests::another_process_tries_to_write",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("LEADSYNC_TEST_WRITE_DB", &path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{text}");
            ["write refused: busy", "write taken"]
                .into_iter()
                .find(|w| text.contains(w))
                .unwrap_or_else(|| panic!("the other process said nothing: {text}"))
                .to_string()
        };
        assert_eq!(other_writes(), "write refused: busy", "before the lock");
        for _ in 0..2 {
            drop(ProcessLock::try_acquire(&path).unwrap().expect("free"));
        }
        assert_eq!(other_writes(), "write refused: busy", "after the lock");
        writer.execute_batch("COMMIT").unwrap();
        assert_eq!(other_writes(), "write taken", "once committed");
    }

    /// Run by [`taking_and_dropping_the_lock_leaves_sqlites_locks_in_place`]
    /// as another process, with `LEADSYNC_TEST_WRITE_DB` set: tries at once
    /// to start writing to that database and says what SQLite answered.
    /// Without it (the suite), there is nothing to do.
    #[test]
    fn another_process_tries_to_write() {
        let Some(path) = std::env::var_os("LEADSYNC_TEST_WRITE_DB") else {
            return;
        };
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::ZERO).unwrap();
        match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => println!("write taken"),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                println!("write refused: busy")
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// After a package upgrade, before the service restarts, the older
    /// daemon still runs on the mirror: another command of the newer binary
    /// (`status`, `enqueue`, a `drain` about to be refused) must not migrate
    /// the schema under it. It says so and leaves the database as it was;
    /// once the lock is free (the service restarted), it migrates.
    #[test]
    fn no_migration_under_another_process_holding_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let (conn, previous) = previous_schema_mirror(&path);
        drop(conn);
        let daemon = ProcessLock::acquire_as(&path, true).unwrap();
        let e = open_connection(&path, false).expect_err("refused");
        let text = format!("{e:#}");
        assert!(
            text.contains("is running on it") && text.contains("restart"),
            "{text}"
        );
        let version = |p: &Path| -> i64 {
            Connection::open(p)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(version(&path), previous);
        drop(daemon);
        drop(open_connection(&path, false).unwrap());
        assert_eq!(version(&path), schema_version());
        // Up to date: opening needs no lock, whoever holds it.
        let _daemon = ProcessLock::acquire_as(&path, true).unwrap();
        drop(open_connection(&path, false).unwrap());
    }

    /// The names of `table`'s triggers and indexes (not SQLite's own).
    fn on_table(conn: &Connection, table: &str) -> Vec<String> {
        conn.prepare(
            "SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')
                AND tbl_name = ?1 COLLATE NOCASE AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .unwrap()
        .query_map([table], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    #[test]
    fn version_3_keeps_a_trigger_written_on_the_outbox_in_capitals() {
        // SQLite keeps a trigger's table name as written (`ON OUTBOX`): the
        // rebuild must still see it as the outbox's, or it is dropped with
        // the old table and never made again.
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch(
            "CREATE TABLE partner_log (outbox_id INTEGER);
             CREATE TRIGGER partner_logs AFTER INSERT ON OUTBOX BEGIN
                 INSERT INTO partner_log VALUES (NEW.id);
             END;
             CREATE INDEX partner_by_created ON Outbox (created_at);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let kept = on_table(&conn, "outbox");
        assert!(kept.contains(&"partner_logs".to_string()), "{kept:?}");
        assert!(kept.contains(&"partner_by_created".to_string()), "{kept:?}");
        conn.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [],
        )
        .unwrap();
        let logged: i64 = conn
            .query_row("SELECT count(*) FROM partner_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(logged, 1);
    }

    #[test]
    fn version_10_keeps_a_trigger_written_on_the_change_log_in_capitals() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 9).unwrap();
        conn.execute_batch(
            "CREATE TABLE partner_log (change_id INTEGER);
             CREATE TRIGGER partner_logs AFTER INSERT ON NEGOTIATION_CHANGES BEGIN
                 INSERT INTO partner_log VALUES (NEW.id);
             END;",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let kept = on_table(&conn, "negotiation_changes");
        assert!(kept.contains(&"partner_logs".to_string()), "{kept:?}");
        conn.execute(
            "INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind, new_status)
             VALUES ('1', '2', '2024-06-14T09:30:00Z', 'new', 'pending')",
            [],
        )
        .unwrap();
        let logged: i64 = conn
            .query_row("SELECT count(*) FROM partner_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(logged, 1);
    }

    #[test]
    fn version_3_keeps_a_partners_columns_word_for_word() {
        // Columns a partner added to the outbox of schema 2: a generated one
        // (indexed), one with a default, NOT NULL, CHECK and COLLATE, one
        // referring to a table of its own. The rebuild keeps each as it was
        // declared, with its values.
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        let declared = [
            "partner_total INTEGER GENERATED ALWAYS AS (coalesce(invoice_amount_in_cents, 0) * 2) VIRTUAL",
            "partner_kind TEXT NOT NULL DEFAULT 'job' CHECK (partner_kind <> '') COLLATE NOCASE",
            "partner_job INTEGER REFERENCES partner_jobs (id)",
        ];
        conn.execute_batch("CREATE TABLE partner_jobs (id INTEGER PRIMARY KEY); INSERT INTO partner_jobs VALUES (7);")
            .unwrap();
        for column in declared {
            conn.execute_batch(&format!("ALTER TABLE outbox ADD COLUMN {column}"))
                .unwrap();
        }
        conn.execute_batch(
            "CREATE INDEX partner_by_total ON outbox (partner_total);
             INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, invoice_amount_in_cents,
                                 partner_kind, partner_job)
             VALUES ('1', 'job_complete', '2024-06-14T09:30:00Z', 100, 'Visit', 7);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let table: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        for column in declared {
            assert!(table.contains(column), "{column} not in {table}");
        }
        let row: (i64, String, i64) = conn
            .query_row(
                "SELECT partner_total, partner_kind, partner_job FROM outbox WHERE partner_kind = 'visit'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(row, (200, "Visit".to_string(), 7));
        let insert = |extra: &str, values: &str| {
            conn.execute_batch(&format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at{extra})
                 VALUES ('2', 'appt_scheduled', '2024-06-14T09:30:00Z'{values})"
            ))
        };
        insert("", "").unwrap();
        let kind: String = conn
            .query_row(
                "SELECT partner_kind FROM outbox WHERE negotiation_id = '2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kind, "job", "the default");
        assert!(insert(", partner_kind", ", ''").is_err(), "the CHECK");
        assert!(insert(", partner_kind", ", NULL").is_err(), "NOT NULL");
        assert!(insert(", partner_job", ", 8").is_err(), "the foreign key");
        assert!(on_table(&conn, "outbox").contains(&"partner_by_total".to_string()));
    }

    #[test]
    fn rows_of_a_partner_pointing_at_nothing_before_an_upgrade_do_not_stop_it() {
        // A partner's program writes with foreign keys off (SQLite's
        // default): its column's reference may point at nothing already.
        // Schema 3 keeps that column's REFERENCES, so the row still points
        // at nothing after it: that is not the migration's doing, and must
        // not keep the daemon from starting. What a migration breaks itself
        // still fails it.
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = OFF;
             CREATE TABLE partner_jobs (id INTEGER PRIMARY KEY);
             ALTER TABLE outbox ADD COLUMN partner_job INTEGER REFERENCES partner_jobs (id);
             INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, partner_job)
             VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z', 8);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version_of(&conn).unwrap(), schema_version());
        let job: i64 = conn
            .query_row("SELECT partner_job FROM outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(job, 8);

        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z');
             INSERT INTO outbox_attempts (outbox_id, attempt, started_at, outcome)
             VALUES (1, 1, '2024-06-14T09:31:00Z', 'retry');",
        )
        .unwrap();
        // A schema 3 that lost the outbox's rows leaves the attempt behind.
        let broken = migrations()
            .into_iter()
            .find(|(v, _)| *v == 3)
            .unwrap()
            .1
            .replacen(
                "DROP TABLE outbox;\n",
                "DROP TABLE outbox;\nDELETE FROM outbox_v3;\n",
                1,
            );
        conn.pragma_update(None, "foreign_keys", false).unwrap();
        let e = apply_migration(&mut conn, 3, &broken).expect_err("attempts of nothing");
        assert!(
            format!("{e:#}").contains("outbox_attempts pointing at nothing"),
            "{e:#}"
        );
        assert_eq!(version_of(&conn).unwrap(), 2);
    }

    #[test]
    fn version_3_from_a_plain_outbox_writes_its_scripts_own_table() {
        // The rebuild edits the old table's definition: with nothing of a
        // partner's on it, the result is the script's table, word for word.
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 3).unwrap();
        let table: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let script = include_str!("migrations/0003_outbox.sql");
        let start = script.find("CREATE TABLE outbox_v3 (").unwrap();
        let end = start + script[start..].find("\n);").unwrap() + 2;
        assert_eq!(
            table,
            script[start..end].replacen("outbox_v3", "\"outbox\"", 1)
        );
    }

    #[test]
    fn version_3_works_beside_a_table_named_like_its_temporary_one() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch("CREATE TABLE Outbox_V3 (x); INSERT INTO Outbox_V3 VALUES (1);")
            .unwrap();
        migrate(&mut conn).unwrap();
        let x: i64 = conn
            .query_row("SELECT x FROM outbox_v3", [], |r| r.get(0))
            .unwrap();
        assert_eq!(x, 1);
        conn.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [],
        )
        .unwrap();
    }

    #[test]
    fn version_3_names_a_partners_column_or_index_it_clashes_with() {
        for (partner, named) in [
            ("ALTER TABLE outbox ADD COLUMN late INTEGER", "late"),
            (
                "ALTER TABLE outbox ADD COLUMN Waiting_For TEXT",
                "Waiting_For",
            ),
            (
                "CREATE INDEX outbox_waiting ON outbox (status)",
                "outbox_waiting",
            ),
            (
                "CREATE TABLE partner (x); CREATE INDEX OUTBOX_READY_BY_BUSINESS ON partner (x)",
                "OUTBOX_READY_BY_BUSINESS",
            ),
            ("CREATE TABLE outbox_waits (x)", "outbox_waits"),
        ] {
            let mut conn = Connection::open_in_memory().unwrap();
            migrate_to(&mut conn, 2).unwrap();
            conn.execute_batch(partner).unwrap();
            let e = format!("{:#}", migrate(&mut conn).expect_err(partner));
            assert!(
                e.contains(&format!("`{named}`")) && e.contains("rename"),
                "{partner}: {e}"
            );
            assert_eq!(version_of(&conn).unwrap(), 2, "{partner}");
        }
    }

    /// A row of the outbox of schema 2 with a partner's columns filled in
    /// (`partner_kind` 'Visit', `partner_job` 7), after `partner` ran.
    fn schema_2_with_partner_columns(columns: &[&str], partner: &str) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch(
            "CREATE TABLE partner_jobs (id INTEGER PRIMARY KEY); INSERT INTO partner_jobs VALUES (7);",
        )
        .unwrap();
        for column in columns {
            conn.execute_batch(&format!("ALTER TABLE outbox ADD COLUMN {column}"))
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, partner_kind, partner_job)
             VALUES ('1', 'job_complete', '2024-06-14T09:30:00Z', 'Visit', 7);",
        )
        .unwrap();
        conn.execute_batch(partner).unwrap();
        conn
    }

    fn partner_values(conn: &Connection) -> (i64, String, i64) {
        conn.query_row(
            "SELECT id, partner_kind, partner_job FROM outbox WHERE negotiation_id = '1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    fn outbox_definition(conn: &Connection) -> String {
        conn.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox' COLLATE NOCASE",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    const PARTNER_KIND: &str = "partner_kind TEXT NOT NULL DEFAULT 'job'";
    const PARTNER_JOB: &str = "partner_job INTEGER REFERENCES partner_jobs (id)";

    #[test]
    fn version_3_upgrades_an_outbox_renamed_away_and_back() {
        // SQLite writes the name back quoted: `CREATE TABLE "outbox" (`.
        let mut conn = schema_2_with_partner_columns(
            &[PARTNER_KIND, PARTNER_JOB],
            "ALTER TABLE outbox RENAME TO partner_tmp; ALTER TABLE partner_tmp RENAME TO outbox;",
        );
        assert!(outbox_definition(&conn).starts_with("CREATE TABLE \"outbox\" ("));
        migrate(&mut conn).unwrap();
        assert_eq!(partner_values(&conn), (1, "Visit".to_string(), 7));
        let table = outbox_definition(&conn);
        for column in [PARTNER_KIND, PARTNER_JOB, "AUTOINCREMENT"] {
            assert!(table.contains(column), "{column} not in {table}");
        }
    }

    #[test]
    fn version_3_upgrades_an_outbox_with_a_default_holding_leadsyncs_own_text() {
        let note = "partner_note TEXT DEFAULT 'INTEGER PRIMARY KEY,    -- the instant in UTC'";
        let mut conn = schema_2_with_partner_columns(&[PARTNER_KIND, PARTNER_JOB, note], "");
        migrate(&mut conn).unwrap();
        assert_eq!(partner_values(&conn), (1, "Visit".to_string(), 7));
        let table = outbox_definition(&conn);
        assert!(table.contains(note), "{table}");
        assert!(table.contains("id                        INTEGER PRIMARY KEY AUTOINCREMENT,"));
        conn.execute_batch(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('2', 'appt_scheduled', '2024-06-14T09:30:00Z')",
        )
        .unwrap();
        let default: String = conn
            .query_row(
                "SELECT partner_note FROM outbox WHERE negotiation_id = '2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(default, "INTEGER PRIMARY KEY,    -- the instant in UTC");
    }

    /// The log lines `f` writes at WARN and above.
    fn warnings_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[test]
    fn version_3_rebuilds_an_outbox_a_tool_rewrote_from_names_and_types_and_says_what_it_lost() {
        // A tool (sqlite-utils transform, DB Browser's "Modify table") makes
        // the table again from its own text: comments gone, spaces its own.
        let mut conn = schema_2_with_partner_columns(
            &[
                PARTNER_KIND,
                PARTNER_JOB,
                "partner_total INTEGER GENERATED ALWAYS AS (coalesce(invoice_amount_in_cents, 0) * 2) VIRTUAL",
            ],
            "",
        );
        let old = outbox_definition(&conn);
        let flat = old
            .lines()
            .map(|line| line.split("--").next().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replacen("CREATE TABLE outbox (", "CREATE TABLE [outbox_new] (", 1);
        conn.execute_batch(&format!(
            "{flat};
             INSERT INTO outbox_new (id, negotiation_id, status, partner_status_changed_at, created_at,
                                     next_attempt_at, partner_kind, partner_job)
                  SELECT id, negotiation_id, status, partner_status_changed_at, created_at, next_attempt_at,
                         partner_kind, partner_job FROM outbox;
             DROP TABLE outbox;
             ALTER TABLE outbox_new RENAME TO outbox;"
        ))
        .unwrap();
        let (migrated, warned) = warnings_of(|| migrate(&mut conn));
        migrated.unwrap();
        assert_eq!(partner_values(&conn), (1, "Visit".to_string(), 7));
        for said in [
            "partner_kind",
            "NOT NULL",
            "DEFAULT",
            "partner_job",
            "REFERENCES",
            "partner_total",
        ] {
            assert!(warned.contains(said), "{said} not in {warned}");
        }
        assert!(outbox_definition(&conn).contains("AUTOINCREMENT"));
        conn.execute_batch(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('2', 'appt_scheduled', '2024-06-14T09:30:00Z')",
        )
        .unwrap();
    }

    #[test]
    fn version_3_names_a_column_of_leadsyncs_a_partner_renamed() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch("ALTER TABLE outbox RENAME COLUMN last_trace_id TO trace")
            .unwrap();
        let e = format!("{:#}", migrate(&mut conn).unwrap_err());
        assert!(
            e.contains("`last_trace_id`") && e.contains("RENAME COLUMN"),
            "{e}"
        );
        assert_eq!(version_of(&conn).unwrap(), 2);
    }

    #[test]
    fn version_3_keeps_one_outbox_counter_a_restore_carried_over() {
        // A restore of a schema 2 backup (README) carries the mirror's
        // counter over, above the restored rows: the rebuild keeps it, as
        // the outbox's one counter.
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 2).unwrap();
        conn.execute_batch(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                  VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z'),
                         ('2', 'appt_scheduled', '2024-06-14T09:30:00Z');
             CREATE TABLE seq (id INTEGER PRIMARY KEY AUTOINCREMENT); DROP TABLE seq;
             INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', 5);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let counters: Vec<i64> = conn
            .prepare("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(counters, [5]);
        conn.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('3', 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [],
        )
        .unwrap();
        assert_eq!(conn.last_insert_rowid(), 6);
    }

    #[test]
    fn a_migration_fails_on_a_row_it_left_dangling_beside_one_already_there() {
        // The row of a table WITHOUT ROWID has no rowid to tell it from
        // another; one pointing at nothing through a second reference is
        // another break than through the first.
        for (table, left) in [
            (
                "CREATE TABLE child (k TEXT PRIMARY KEY, p INTEGER REFERENCES parent (id)) WITHOUT ROWID;
                 INSERT INTO child VALUES ('a', 1);",
                "INSERT INTO child VALUES ('b', 2);",
            ),
            (
                "CREATE TABLE child (p INTEGER REFERENCES parent (id), q INTEGER REFERENCES parent (id));
                 INSERT INTO child VALUES (1, NULL);",
                "UPDATE child SET q = 2;",
            ),
        ] {
            let mut conn = Connection::open_in_memory().unwrap();
            conn.execute_batch(&format!("PRAGMA foreign_keys = OFF; CREATE TABLE parent (id INTEGER PRIMARY KEY); {table}"))
                .unwrap();
            let tx = conn.transaction().unwrap();
            let before = dangling(&tx).unwrap();
            tx.execute_batch(left).unwrap();
            let e = finish_migration(tx, 99, &before).expect_err(left);
            assert!(format!("{e:#}").contains("child pointing at nothing"), "{e:#}");
        }
    }

    #[test]
    fn version_17_keeps_a_partners_views_triggers_and_indexes_on_the_outbox() {
        // Schema 17 adds a column to the outbox and makes its order indexes
        // and validating triggers again: what a partner put on the table
        // stays, and still works; and the migration runs again cleanly.
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 14).unwrap();
        conn.execute_batch(
            "CREATE TABLE partner_log (outbox_id INTEGER, at TEXT);
             CREATE VIEW partner_open AS SELECT id, changed_at_utc, * FROM outbox WHERE state = 'pending';
             CREATE TRIGGER partner_logs AFTER INSERT ON outbox BEGIN
                 INSERT INTO partner_log VALUES (NEW.id, NEW.changed_at_utc);
             END;
             CREATE INDEX partner_by_status ON outbox (status, changed_at_utc);
             CREATE TABLE partner_gone (x);
             CREATE VIEW partner_broken AS SELECT o.id, g.x FROM outbox o, partner_gone g;
             DROP TABLE partner_gone;
             INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('1', 'appt_scheduled', '2024-06-14T11:30:00.0004+02:00');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        conn.pragma_update(None, "user_version", 14).unwrap();
        migrate(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00.0001Z')",
            [],
        )
        .unwrap();
        let n = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(n("SELECT count(*) FROM partner_log"), 2);
        assert_eq!(n("SELECT count(*) FROM partner_open"), 2);
        assert_eq!(
            n("SELECT count(*) FROM sqlite_schema WHERE name = 'partner_by_status'"),
            1
        );
        let order: Vec<String> = conn
            .prepare("SELECT changed_at_order FROM outbox ORDER BY changed_at_order")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            order,
            ["2024-06-14T09:30:00.0001", "2024-06-14T09:30:00.0004"]
        );
        assert!(Pins::read(&conn).unwrap().missing().is_empty());
    }

    #[test]
    fn version_17_makes_a_pending_row_never_due_since_before_schema_8_due() {
        // Before schema 8 a partner's program could write any next_attempt_at:
        // a BLOB or a word sorts after every time, so the row was never due
        // (claim and its look-ahead alike) and held back its negotiation's
        // later rows for good. A time SQLite reads becomes that time in the
        // drainer's form; anything else, due now (as when left out).
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 7).unwrap();
        let rows = [
            ("outbox", "X'00'"),
            ("outbox", "'tomorrow'"),
            ("outbox", "'2030-01-01 09:00:00'"),
            ("outbox", "'2030-01-01T11:00:00+02:00'"),
            ("outbox", "'9999-12-31T23:30:00-01:00'"),
            ("outbox", "'2024-06-14T09:30:00Z' || char(0) || 'x'"),
            ("message_outbox", "X'31'"),
            ("message_outbox", "'later'"),
        ];
        for (table, at) in rows {
            let content = if table == "outbox" {
                "status, partner_status_changed_at) VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z'"
            } else {
                "text) VALUES ('1', 'hi'"
            };
            conn.execute_batch(&format!(
                "INSERT INTO {table} (negotiation_id, {content});
                 UPDATE {table} SET next_attempt_at = {at} WHERE id = last_insert_rowid();"
            ))
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let now = crate::time::now();
        let at = |table: &str| -> Vec<String> {
            conn.prepare(&format!("SELECT next_attempt_at FROM {table} ORDER BY id"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let outbox = at("outbox");
        assert!(outbox[0] <= now && outbox[1] <= now, "{outbox:?}");
        assert_eq!(
            outbox[2..4],
            ["2030-01-01T09:00:00.000Z", "2030-01-01T09:00:00.000Z"]
        );
        assert!(outbox[4] <= now, "{outbox:?}");
        assert_eq!(outbox[5], "2024-06-14T09:30:00.000Z");
        let replies = at("message_outbox");
        assert!(replies.iter().all(|t| *t <= now), "{replies:?}");
    }

    #[test]
    fn version_12_gives_message_times_their_milliseconds() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 11).unwrap();
        for (id, at) in [
            ("1", Some("2026-01-01T00:00:00Z")),
            ("2", Some("2026-01-01T00:00:00.500Z")),
            ("3", Some("2026-01-01T00:00:00.500001Z")),
            ("4", Some("yesterday")),
            ("5", None),
        ] {
            conn.execute(
                "INSERT INTO messages (message_id, negotiation_id, sent_at, payload, source, first_seen_at)
                 VALUES (?1, 'n', ?2, '{}', 'poll', 't')",
                rusqlite::params![id, at],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let at: Vec<(String, Option<String>)> = conn
            .prepare("SELECT message_id, sent_at FROM messages ORDER BY message_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let at: Vec<Option<&str>> = at.iter().map(|(_, t)| t.as_deref()).collect();
        assert_eq!(
            at,
            [
                Some("2026-01-01T00:00:00.000Z"),
                Some("2026-01-01T00:00:00.500Z"),
                Some("2026-01-01T00:00:00.500001Z"),
                Some("yesterday"),
                None
            ]
        );
    }

    #[test]
    fn version_2_back_fills_the_columns_of_both_shapes_from_the_payload() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("v1.db")).unwrap();
        let (_, v1) = migrations().remove(0);
        conn.execute_batch(&v1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let schema = r#"{"negotiationID":"1","createdAt":"2026-01-01T00:00:00Z",
            "request":{"category":{"name":"Plumbing"},"location":{"city":"Austin","zipCode":"78701"}},
            "customer":{"firstName":"Zoë","lastName":"Ø.","phone":"+1 555 0100"},
            "leadPrice":"$25.00","chargeState":"Charged"}"#;
        let docs = r#"{"negotiationID":"2","category":{"name":"Roofing"},
            "customer":{"displayName":"Ann B.","location":{"city":"Reno","zipCode":"89501"}}}"#;
        let only_first =
            r#"{"negotiationID":"3","customer":{"firstName":"李雷","lastName":""},"leadPrice":25}"#;
        for (id, payload) in [("1", schema), ("2", docs), ("3", only_first)] {
            conn.execute(
                "INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                     first_seen_at, last_seen_at, changed_at)
                 VALUES (?1, 'b', ?2, 0, 't', 't', 't')",
                [id, payload],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let row = |id: &str| -> [Option<String>; 7] {
            conn.query_row(
                "SELECT category, customer_name, city, zip, customer_phone, lead_price, charge_state
                   FROM negotiations WHERE negotiation_id = ?1",
                [id],
                |r| {
                    Ok([
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ])
                },
            )
            .unwrap()
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            row("1"),
            [
                s("Plumbing"),
                s("Zoë Ø."),
                s("Austin"),
                s("78701"),
                s("+1 555 0100"),
                s("$25.00"),
                s("Charged")
            ]
        );
        assert_eq!(
            row("2"),
            [
                s("Roofing"),
                s("Ann B."),
                s("Reno"),
                s("89501"),
                None,
                None,
                None
            ]
        );
        assert_eq!(row("3"), [None, s("李雷"), None, None, None, s("25"), None]);
        // The same columns as the wire module fills from the same payloads.
        for (id, payload) in [("1", schema), ("2", docs), ("3", only_first)] {
            let lead = crate::thumbtack::model::parse_lead_body(payload).unwrap();
            let cols = row(id);
            assert_eq!(
                [
                    lead.category,
                    lead.customer_name,
                    lead.city,
                    lead.zip,
                    lead.customer_phone,
                    lead.lead_price,
                    lead.charge_state
                ],
                cols,
                "lead {id}"
            );
        }
        let typ: String = conn
            .query_row(
                "SELECT typeof(lead_price) FROM negotiations WHERE negotiation_id = '3'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(typ, "text");
    }
}

#[cfg(test)]
mod migration_3 {
    use super::*;

    /// A database left by schema 1, with rows schema 3 would refuse.
    fn schema_1(path: &Path) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        let (_, v1) = migrations().into_iter().next().unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(&v1).unwrap();
        tx.pragma_update(None, "user_version", 1).unwrap();
        tx.commit().unwrap();
        conn.execute_batch(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES
                 ('11', 'appt_scheduled', '2024-06-14T09:30:00Z'),
                 ('12', 'appt_scheduled', '2024-06-14T09:30:00+15:00'),
                 (X'3132', 'appt_scheduled', '2024-06-14T09:30:00Z'),
                 ('14', 'appt_scheduled', '2024-06-14T09:30:00Z'),
                 ('15', 'appt_scheduled', '2024-06-14T09:30:00Z');
             DELETE FROM outbox WHERE id = 5;
             UPDATE outbox SET state = 'sent', attempts = 3 WHERE id = 1;
             INSERT INTO outbox_attempts (outbox_id, attempt, started_at, outcome)
                 VALUES (1, 1, 'x', 'retry'), (1, 2, 'x', 'retry'), (4, 1, 'x', 'retry');",
        )
        .unwrap();
        conn
    }

    #[test]
    fn rebuild_keeps_rows_ids_attempts_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        drop(schema_1(&path));
        let conn = open_connection(&path, true).unwrap();
        let n = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(n("PRAGMA user_version"), schema_version());
        let ids: String = conn
            .query_row(
                "SELECT group_concat(id) FROM (SELECT id FROM outbox ORDER BY id)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(ids, "1,2,3,4");
        assert_eq!(n("SELECT count(*) FROM outbox"), 4);
        assert_eq!(
            n("SELECT attempts FROM outbox WHERE id = 1 AND state = 'sent'"),
            3
        );
        assert_eq!(
            n("SELECT count(*) FROM outbox WHERE id = 3 AND typeof(negotiation_id) = 'blob'"),
            1,
            "a bad row is kept as it was (the drainer fails it alone)"
        );
        assert_eq!(n("SELECT count(*) FROM outbox_attempts"), 3);
        assert_eq!(
            n("SELECT count(*) FROM outbox WHERE late = 0 AND waiting_for IS NULL"),
            4
        );
        // The attempts still belong to their rows: deleting one takes its history.
        conn.execute("DELETE FROM outbox WHERE id = 1", []).unwrap();
        assert_eq!(n("SELECT count(*) FROM outbox_attempts"), 1);
        // AUTOINCREMENT: no id is handed out twice, not even the highest.
        conn.execute("DELETE FROM outbox WHERE id = 4", []).unwrap();
        conn.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('16', 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [],
        )
        .unwrap();
        assert!(
            conn.last_insert_rowid() >= 5,
            "{}",
            conn.last_insert_rowid()
        );
        // The new triggers are in place.
        assert!(
            conn.execute(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                 VALUES (X'31', 'appt_scheduled', '2024-06-14T09:30:00Z')",
                [],
            )
            .is_err()
        );
        assert_eq!(n("PRAGMA foreign_keys"), 1);
    }
}

/// An upgrade from every older schema, each with the rows a running
/// mirror has in it: a lead and its change log, passes, outbox rows in
/// every state (one `sending`: the daemon was stopped mid-send for the
/// upgrade) with their attempts, and from schema 4 on messages and from
/// schema 7 on replies. Nothing is lost, ids and states are kept, the
/// database checks clean, and the current code drains from it.
#[cfg(test)]
pub(crate) mod every_version {
    use super::*;

    fn has_table(conn: &Connection, table: &str) -> bool {
        conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }

    /// A mirror at `version` with a running daemon's rows in it.
    /// Every schema version there is.
    pub(crate) fn versions() -> Vec<i64> {
        migrations().into_iter().map(|(v, _)| v).collect()
    }

    /// An empty mirror at each version (the file's bytes), made once for
    /// the test binary by one database migrated step by step (each test
    /// building every version from scratch took seconds). Held in memory: a
    /// directory kept in a `static` is never dropped, and each run left one
    /// behind in /tmp.
    fn empty_at(version: i64) -> &'static [u8] {
        static EMPTY: std::sync::OnceLock<Vec<(i64, Vec<u8>)>> = std::sync::OnceLock::new();
        let files = EMPTY.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut conn = Connection::open_in_memory().unwrap();
            versions()
                .into_iter()
                .map(|v| {
                    migrate_to(&mut conn, v).unwrap();
                    let file = dir.path().join(format!("{v}.db"));
                    conn.backup(rusqlite::MAIN_DB, &file, rusqlite::backup::NO_PROGRESS)
                        .unwrap();
                    (v, std::fs::read(&file).unwrap())
                })
                .collect()
        });
        &files.iter().find(|(v, _)| *v == version).unwrap().1
    }

    pub(crate) fn populated(path: &Path, version: i64) -> Connection {
        std::fs::write(path, empty_at(version)).unwrap();
        let conn = Connection::open(path).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        assert_eq!(version_of(&conn).unwrap(), version);
        conn.execute_batch(
            r#"INSERT INTO businesses (business_id, name, last_sync_outcome) VALUES ('468046965846925323', 'Robert', 'ok');
             INSERT INTO negotiations (negotiation_id, business_id, status, created_at, payload, payload_hash,
                                       first_seen_at, last_seen_at, changed_at)
                  VALUES ('519153480500518912', '468046965846925323', 'pending', '2024-06-14T09:30:00Z',
                          '{"negotiationID":"519153480500518912","status":"pending","x":12345678901234567890}', 42,
                          '2024-06-14T09:30:00Z', '2024-06-14T09:30:00Z', '2024-06-14T09:30:00Z');
             INSERT INTO sync_runs (business_id, kind, started_at, finished_at, outcome, pages, seen, inserted)
                  VALUES ('468046965846925323', 'full', '2024-06-14T09:30:00Z', '2024-06-14T09:31:00Z', 'ok', 1, 1, 1);
             INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind, new_status, sync_run_id)
                  VALUES ('519153480500518912', '468046965846925323', '2024-06-14T09:30:00Z', 'new', 'pending', 1);
             INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind, old_status, new_status,
                                              changed_fields, old_payload, sync_run_id)
                  VALUES ('519153480500518912', '468046965846925323', '2024-06-14T10:30:00Z', 'changed', 'pending',
                          'pending', '["x"]', '{"negotiationID":"519153480500518912"}', 1);
             INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at, invoice_amount_in_cents)
                  VALUES ('519153480500518912', '468046965846925323', 'appt_scheduled', '2024-06-14T09:30:00Z', NULL),
                         ('519153480500518912', '468046965846925323', 'job_complete', '2024-06-15T09:30:00Z', 125000),
                         ('519153480500518913', NULL, 'appt_scheduled', '2024-06-14T09:30:00.250+02:00', NULL),
                         ('519153480500518914', '468046965846925323', 'appt_scheduled', '2024-06-14T09:30:00Z', NULL),
                         ('519153480500518915', '468046965846925323', 'appt_scheduled', '2024-06-14T09:30:00Z', NULL);
             UPDATE outbox SET state = 'sent', attempts = 1, sent_at = '2024-06-14T09:31:00Z',
                               last_http_status = 200, last_trace_id = 'trace-1' WHERE id = 1;
             UPDATE outbox SET attempts = 1, last_error = 'HTTP 503', last_http_status = 503 WHERE id = 2;
             UPDATE outbox SET state = 'sending', attempts = 2, sending_since = '2024-06-15T09:31:00Z'
              WHERE id = 2;
             UPDATE outbox SET state = 'dead', attempts = 20, last_error = 'HTTP 400: bad' WHERE id = 4;
             UPDATE outbox SET state = 'canceled' WHERE id = 5;
             INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error, trace_id, duration_ms)
                  VALUES (1, 1, '2024-06-14T09:31:00Z', 200, 'sent', NULL, 'trace-1', 120),
                         (2, 1, '2024-06-15T09:30:30Z', 503, 'retry', 'HTTP 503', 'trace-2', 80);"#,
        )
        .unwrap();
        // What a partner adds beside leadsync's schema: a view, an index
        // and a trigger of its own on the outbox and the leads.
        conn.execute_batch(
            "CREATE VIEW partner_open AS SELECT id, negotiation_id, status FROM outbox
                 WHERE state IN ('pending', 'sending');
             CREATE VIEW partner_leads AS SELECT negotiation_id, status FROM negotiations;
             CREATE INDEX partner_outbox_by_created ON outbox (created_at);
             CREATE TABLE partner_log (outbox_id INTEGER, state TEXT);
             ALTER TABLE outbox ADD COLUMN partner_ref TEXT;
             UPDATE outbox SET partner_ref = 'job-' || id;
             CREATE TRIGGER partner_logs AFTER UPDATE OF state ON outbox BEGIN
                 INSERT INTO partner_log VALUES (NEW.id, NEW.state);
             END;",
        )
        .unwrap();
        if has_table(&conn, "messages") {
            conn.execute_batch(
                r#"INSERT INTO messages (message_id, negotiation_id, business_id, sent_at, sender, text, payload,
                                        source, first_seen_at)
                     VALUES ('m1', '519153480500518912', '468046965846925323', '2024-06-14T09:35:00Z', 'Customer',
                             'Hello', '{"messageID":"m1","text":"Hello"}', 'poll', '2024-06-14T09:36:00Z');"#,
            )
            .unwrap();
        }
        if has_table(&conn, "message_outbox") {
            conn.execute_batch(
                "INSERT INTO message_outbox (negotiation_id, business_id, text)
                      VALUES ('519153480500518912', '468046965846925323', 'On my way!'),
                             ('519153480500518912', '468046965846925323', 'Running late');
                 UPDATE message_outbox SET state = 'sent', attempts = 1, sent_at = '2024-06-14T09:40:00Z',
                                           message_id = 'm2' WHERE id = 1;",
            )
            .unwrap();
        }
        conn
    }

    fn rows(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| Ok(format!("{:?}", r.get::<_, rusqlite::types::Value>(i)?)))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map(|v| v.join("|"))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    /// What must survive an upgrade, as the columns of schema 1 (and 4, 7).
    fn kept(conn: &Connection) -> Vec<Vec<String>> {
        let mut v = vec![
            rows(
                conn,
                "SELECT business_id, name, last_sync_outcome FROM businesses ORDER BY business_id",
            ),
            rows(
                conn,
                "SELECT negotiation_id, business_id, status, payload, first_seen_at, changed_at, missing_since
                   FROM negotiations ORDER BY negotiation_id",
            ),
            rows(
                conn,
                "SELECT id, negotiation_id, kind, old_status, new_status, changed_fields, old_payload, sync_run_id
                   FROM negotiation_changes ORDER BY id",
            ),
            rows(
                conn,
                "SELECT id, business_id, kind, outcome, pages, seen FROM sync_runs ORDER BY id",
            ),
            rows(
                conn,
                "SELECT id, negotiation_id, business_id, status, partner_status_changed_at,
                        invoice_amount_in_cents, state, attempts, last_error, last_http_status,
                        last_trace_id, created_at, sent_at
                   FROM outbox ORDER BY id",
            ),
            rows(
                conn,
                "SELECT outbox_id, attempt, started_at, http_status, outcome, error, trace_id
                   FROM outbox_attempts ORDER BY id",
            ),
        ];
        if has_table(conn, "messages") {
            v.push(rows(
                conn,
                "SELECT message_id, negotiation_id, strftime('%Y-%m-%dT%H:%M:%fZ', sent_at), text, payload
                   FROM messages",
            ));
        }
        if has_table(conn, "message_outbox") {
            v.push(rows(
                conn,
                "SELECT id, negotiation_id, text, state, attempts, sent_at, message_id
                   FROM message_outbox ORDER BY id",
            ));
        }
        v
    }

    #[test]
    fn every_older_schema_with_rows_in_it_upgrades_without_loss() {
        let latest = schema_version();
        for (version, _) in migrations() {
            if version == latest {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.db");
            let conn = populated(&path, version);
            let before = kept(&conn);
            drop(conn);
            let mut conn = open_connection(&path, false)
                .unwrap_or_else(|e| panic!("from schema {version}: {e:#}"));
            assert_eq!(version_of(&conn).unwrap(), latest, "from schema {version}");
            let after = kept(&conn);
            assert_eq!(
                after[..before.len()],
                before[..],
                "from schema {version}: rows changed"
            );
            let check: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(check, "ok", "from schema {version}");
            let broken: Option<String> = conn
                .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
                .optional()
                .unwrap();
            assert_eq!(broken, None, "from schema {version}");
            assert_eq!(
                rows(&conn, "SELECT group_concat(partner_ref) FROM outbox"),
                vec![r#"Text("job-1,job-2,job-3,job-4,job-5")"#],
                "from schema {version}: a column the partner added"
            );
            let partner: Vec<String> = rows(
                &conn,
                "SELECT type || ' ' || name FROM sqlite_master WHERE name LIKE 'partner%' ORDER BY name",
            );
            assert_eq!(
                partner.len(),
                5,
                "from schema {version}: the partner's view, index, table and trigger: {partner:?}"
            );
            assert_eq!(
                rows(&conn, "SELECT count(*) FROM partner_open"),
                vec!["Integer(2)"],
                "from schema {version}"
            );
            // The current code works on it: the row left sending goes back
            // to pending and is claimed again, after the sent one.
            let now = crate::time::now();
            let recovered = outbox::recover_sending(&mut conn, &now).unwrap();
            assert!(
                recovered.contains(&(outbox::Kind::Transition, 2)),
                "from schema {version}: {recovered:?}"
            );
            let filter = outbox::ClaimFilter {
                waiting: Default::default(),
                configured: std::sync::Arc::new(
                    ["468046965846925323".to_string()].into_iter().collect(),
                ),
                default_business: Some("468046965846925323".into()),
            };
            let claimed =
                outbox::claim(&mut conn, outbox::Kind::Transition, &now, 10, &filter).unwrap();
            let mut ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
            ids.sort();
            assert_eq!(ids, vec![2, 3], "from schema {version}");
            let c2 = claimed.iter().find(|c| c.id == 2).unwrap();
            assert_eq!(c2.attempt, 3, "from schema {version}: attempts kept");
            assert_eq!(
                rows(
                    &conn,
                    "SELECT count(*) FROM partner_log WHERE state = 'sending'"
                ),
                vec!["Integer(2)"],
                "from schema {version}: the partner's trigger fires"
            );
            let listed = outbox::list(&conn, None).unwrap();
            assert_eq!(listed.len(), 5, "from schema {version}");
            let replies = outbox::list_messages(&conn, None).unwrap();
            assert_eq!(
                replies.len(),
                if version >= 7 { 2 } else { 0 },
                "from schema {version}"
            );
            // New rows still go in, bad ones are still refused.
            conn.execute(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                 VALUES ('519153480500518916', 'appt_scheduled', '2024-06-14T09:30:00Z')",
                [],
            )
            .unwrap();
            assert!(
                conn.execute(
                    "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                     VALUES ('519153480500518916', 'done', '2024-06-14T09:30:00Z')",
                    [],
                )
                .is_err(),
                "from schema {version}"
            );
        }
    }
}
