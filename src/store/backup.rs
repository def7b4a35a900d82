//! `leadsync backup FILE`: a consistent copy of the mirror through SQLite's
//! online backup API, safe while the daemon writes.
//!
//! The copy is one snapshot: a read transaction is held on the mirror for
//! the whole copy, so the pages copied step by step all belong to the same
//! moment (WAL: the daemon keeps writing meanwhile, and the backup never
//! restarts because of it). The copy is written beside FILE under a
//! temporary name, checked, and only then renamed to FILE: a failed or
//! interrupted backup never leaves a partial FILE. The token store is a
//! different database and is never part of it.

use anyhow::{Context, Result, bail};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Pages copied per step (1 MiB with 4 KiB pages): progress is reported
/// between steps.
const PAGES_PER_STEP: i32 = 256;

/// What a finished backup copied.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub pages: i64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub leads: i64,
    pub outbox_rows: i64,
    pub schema_version: i64,
}

/// Copies the mirror at `database` to `dest`. `dest` must not exist unless
/// `force`, and must not be the mirror or any of `protected` (the token
/// store). `progress(copied, total)` is called after each step; when it
/// returns false (the user interrupted) the copy stops, its temporary file
/// is removed and nothing is published.
pub fn backup(
    database: &Path,
    protected: &[&Path],
    dest: &Path,
    force: bool,
    mut progress: impl FnMut(i64, i64) -> bool,
) -> Result<BackupReport> {
    let started = Instant::now();
    if !database.is_file() {
        bail!("database {} does not exist", database.display());
    }
    refuse_protected(database, protected, dest)?;
    if dest.is_dir() {
        bail!("{} is a directory; give a file name", dest.display());
    }
    if dest.exists() && !force {
        bail!(
            "{} already exists; use --force to replace it",
            dest.display()
        );
    }
    refuse_leftover_journal(dest)?;
    let dir = match dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!("directory {} does not exist", dir.display());
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    let partial = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let result = copy_to(database, &partial, &mut progress).and_then(|report| {
        publish(&partial, database, protected, dest, force)?;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
        let mut journal = partial.as_os_str().to_owned();
        journal.push("-journal");
        let _ = std::fs::remove_file(PathBuf::from(journal));
    }
    let mut report = result?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Refuses a destination that is the mirror or the token store (`protected`)
/// or one of their files, under any name.
fn refuse_protected(database: &Path, protected: &[&Path], dest: &Path) -> Result<()> {
    if is_database_file(database, dest) {
        bail!(
            "{} is the mirror itself (or one of its files); give another path",
            dest.display()
        );
    }
    if let Some(p) = protected
        .iter()
        .find(|p| is_database_file(p, dest) || in_lock_dir(p, dest))
    {
        bail!(
            "{} is the token store ({}) or one of its files; give another path",
            dest.display(),
            p.display()
        );
    }
    Ok(())
}

/// True when `dest` is in the token store's `<store>.locks/` directory
/// (the grants' lock and note files), or is one of its files under another
/// name (a hard link).
fn in_lock_dir(store: &Path, dest: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mut name = store.as_os_str().to_owned();
    name.push(".locks");
    let locks = PathBuf::from(name);
    let Ok(locks_full) = locks.canonicalize() else {
        return false;
    };
    let dest_dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dest_dir.canonicalize().is_ok_and(|d| d == locks_full) {
        return true;
    }
    let Ok(d) = std::fs::metadata(dest) else {
        return false;
    };
    std::fs::read_dir(&locks_full).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.metadata()
                .is_ok_and(|f| f.dev() == d.dev() && f.ino() == d.ino())
        })
    })
}

/// Refuses a destination with a `-wal` or `-journal` beside it. SQLite
/// pairs those files with a database by name alone: one left by a program
/// that has (or had, and was killed with) an older FILE open would be
/// applied to the new copy the next time FILE is opened, and the copy
/// would read back as a mix of both, or as the old database.
fn refuse_leftover_journal(dest: &Path) -> Result<()> {
    for suffix in ["-wal", "-journal"] {
        let mut name = dest.as_os_str().to_owned();
        name.push(suffix);
        let leftover = PathBuf::from(name);
        if std::fs::symlink_metadata(&leftover).is_ok() {
            bail!(
                "{} exists: a program has {} open, or one that had it open stopped without \
                 closing it, and SQLite would apply that file to the new copy; close the program \
                 (or, if none has it open, move {} away) and back up again",
                leftover.display(),
                dest.display(),
                leftover.display()
            );
        }
    }
    Ok(())
}

/// True when `dest` names the mirror or its WAL, shared-memory or lock file,
/// by its path or as the same file under another name (a hard link, a bind
/// mount: no path comparison sees through those).
fn is_database_file(database: &Path, dest: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let Ok(d) = std::fs::metadata(dest) {
        let same = ["", "-wal", "-shm", "-journal", ".lock"]
            .iter()
            .any(|suffix| {
                let mut name = database.as_os_str().to_owned();
                name.push(suffix);
                std::fs::metadata(PathBuf::from(name))
                    .is_ok_and(|f| f.dev() == d.dev() && f.ino() == d.ino())
            });
        if same {
            return true;
        }
    }
    let canonical = |p: &Path| {
        if let Ok(full) = p.canonicalize() {
            return Some(full);
        }
        // The file may not exist yet: compare its directory, then its name.
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        dir.canonicalize()
            .ok()
            .map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    let (Some(db), Some(dest)) = (canonical(database), canonical(dest)) else {
        return false;
    };
    ["", "-wal", "-shm", "-journal", ".lock"]
        .iter()
        .any(|suffix| {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            name == dest.as_os_str()
        })
}

fn copy_to(
    database: &Path,
    partial: &Path,
    progress: &mut impl FnMut(i64, i64) -> bool,
) -> Result<BackupReport> {
    // Created here, mode 0600: the copy holds customer data, and must not be
    // readable by others even for a moment.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    // Read-write without create: SQLite needs the WAL index to read a WAL
    // database; nothing is written to the mirror.
    let source = Connection::open_with_flags(
        database,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open database {}", database.display()))?;
    source.busy_timeout(super::BUSY_TIMEOUT)?;
    // One snapshot for the whole copy (see the module comment).
    source
        .execute_batch("BEGIN DEFERRED; SELECT count(*) FROM sqlite_schema;")
        .with_context(|| format!("cannot read database {}", database.display()))?;
    let schema_version: i64 = source
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .with_context(|| format!("cannot read database {}", database.display()))?;
    let mut copy =
        Connection::open(partial).with_context(|| format!("cannot open {}", partial.display()))?;
    let pages = {
        let backup = Backup::new(&source, &mut copy).context("cannot start the backup")?;
        let mut stalls = 0u32;
        loop {
            match backup.step(PAGES_PER_STEP).context("backup step failed")? {
                StepResult::Done => break,
                StepResult::More => {
                    let p = backup.progress();
                    if !progress(i64::from(p.pagecount - p.remaining), i64::from(p.pagecount)) {
                        bail!("interrupted: the partial copy was removed");
                    }
                }
                // The copy's own file is locked by someone else: wait a little.
                StepResult::Busy | StepResult::Locked => {
                    let p = backup.progress();
                    if !progress(i64::from(p.pagecount - p.remaining), i64::from(p.pagecount)) {
                        bail!("interrupted: the partial copy was removed");
                    }
                    stalls += 1;
                    if stalls > 200 {
                        bail!(
                            "the backup stayed locked for 10 s; is another program using {}?",
                            partial.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => bail!("unexpected backup step result"),
            }
        }
        let p = backup.progress();
        if !progress(i64::from(p.pagecount), i64::from(p.pagecount)) {
            bail!("interrupted: the partial copy was removed");
        }
        i64::from(p.pagecount)
    };
    source.execute_batch("COMMIT")?;
    drop(source);
    // A self-contained single file (the mirror's WAL flag is copied with its pages).
    let mode: String = copy.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        bail!("the copy refused journal_mode DELETE ({mode})");
    }
    let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        bail!("the copy failed its check: {check}");
    }
    let count = |table: &str| -> Result<i64> {
        Ok(copy.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)
    };
    let (leads, outbox_rows) = (count("negotiations")?, count("outbox")?);
    copy.close()
        .map_err(|(_, e)| e)
        .context("cannot close the copy")?;
    let bytes = std::fs::metadata(partial)?.len();
    Ok(BackupReport {
        pages,
        bytes,
        elapsed: Duration::ZERO,
        leads,
        outbox_rows,
        schema_version,
    })
}

/// Moves the finished copy to `dest`: replacing it only with `force`, and
/// never over a file that appeared meanwhile otherwise.
fn publish(
    partial: &Path,
    database: &Path,
    protected: &[&Path],
    dest: &Path,
    force: bool,
) -> Result<()> {
    std::fs::File::open(partial)?
        .sync_all()
        .with_context(|| format!("cannot sync {}", partial.display()))?;
    // Again, right before: a program may have opened FILE during the copy,
    // or FILE become the mirror or the token store under another name.
    refuse_protected(database, protected, dest)?;
    refuse_leftover_journal(dest)?;
    if force {
        std::fs::rename(partial, dest)
            .with_context(|| format!("cannot move the copy to {}", dest.display()))?;
    } else {
        // A hard link fails if `dest` exists: no check-then-write race.
        match std::fs::hard_link(partial, dest) {
            Ok(()) => std::fs::remove_file(partial)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists || dest.exists() => bail!(
                "{} already exists; use --force to replace it",
                dest.display()
            ),
            // A file system without hard links: a plain rename.
            Err(_) => std::fs::rename(partial, dest)
                .with_context(|| format!("cannot move the copy to {}", dest.display()))?,
        }
    }
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another connection commits between every step: the copy neither
    /// restarts (progress only grows) nor takes in the later rows.
    #[test]
    fn the_copy_is_one_snapshot_while_another_connection_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        let setup = Connection::open(&db).unwrap();
        setup
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE negotiations (id INTEGER PRIMARY KEY, payload TEXT);
                 CREATE TABLE outbox (id INTEGER PRIMARY KEY);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
                 INSERT INTO negotiations (payload) SELECT printf('%.2000c', 'x') FROM n;",
            )
            .unwrap();
        let writer = Connection::open(&db).unwrap();
        let mut seen = Vec::new();
        let dest = dir.path().join("copy.db");
        let report = backup(&db, &[], &dest, false, |copied, total| {
            seen.push((copied, total));
            writer
                .execute(
                    "INSERT INTO negotiations (payload) VALUES (printf('%.2000c', 'y'))",
                    [],
                )
                .unwrap();
            true
        })
        .unwrap();
        assert!(seen.len() > 5, "several steps: {seen:?}");
        assert!(
            seen.windows(2).all(|w| w[1].0 >= w[0].0),
            "the copy restarted: {seen:?}"
        );
        assert_eq!(report.leads, 3000, "only the rows of the snapshot");
        let live: i64 = writer
            .query_row("SELECT count(*) FROM negotiations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(live, 3000 + seen.len() as i64);
    }

    /// A `-wal` (or hot `-journal`) left beside FILE by a program that had
    /// an older FILE open belongs to that older file: SQLite applies it to
    /// whatever database it finds at FILE next, so the new copy would open
    /// as the old one's tables. The backup refuses instead of reporting a
    /// success that reads back as another database.
    #[test]
    fn a_leftover_wal_beside_the_destination_never_mixes_into_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        let mirror = Connection::open(&db).unwrap();
        mirror
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE negotiations (id INTEGER PRIMARY KEY);
                 CREATE TABLE outbox (id INTEGER PRIMARY KEY);
                 INSERT INTO outbox DEFAULT VALUES;",
            )
            .unwrap();
        for force in [true, false] {
            let dest = dir.path().join(format!("copy-{force}.db"));
            let wal = dir.path().join(format!("copy-{force}.db-wal"));
            // An older database at FILE whose last writes are still in its
            // WAL (its program was killed, or still has it open).
            let old = Connection::open(&dest).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE something_else (x);",
            )
            .unwrap();
            let leftover = std::fs::read(&wal).unwrap();
            std::mem::forget(old); // as if killed: the WAL stays
            if !force {
                std::fs::remove_file(&dest).unwrap();
            }
            let result = backup(&db, &[], &dest, force, |_, _| true);
            if let Ok(report) = &result {
                let copy = Connection::open(&dest).unwrap();
                let outbox: rusqlite::Result<i64> =
                    copy.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0));
                panic!(
                    "force={force}: reported {} outbox rows, but FILE reads back as {outbox:?}",
                    report.outbox_rows
                );
            }
            let e = format!("{:#}", result.unwrap_err());
            assert!(e.contains(&wal.display().to_string()), "{e}");
            assert_eq!(std::fs::read(&wal).unwrap(), leftover, "not ours to remove");
        }
    }

    /// The mirror under another name that no path comparison sees through
    /// (a hard link here; a bind mount of its directory does the same): with
    /// `--force` the copy was renamed over that name, and under a bind
    /// mount that is the mirror's own directory entry, while the daemon
    /// keeps writing to the old file and its `-wal` pairs with the copy.
    /// The same file is refused whatever it is called.
    #[test]
    fn the_mirror_or_the_token_store_under_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE negotiations (id INTEGER PRIMARY KEY);
                 CREATE TABLE outbox (id INTEGER PRIMARY KEY);",
            )
            .unwrap();
        let tokens = dir.path().join("tokens.db");
        std::fs::write(&tokens, "tokens").unwrap();
        let other = tempfile::tempdir_in(dir.path()).unwrap();
        for (target, said) in [(&db, "the mirror itself"), (&tokens, "token store")] {
            let alias = other.path().join("alias.db");
            let _ = std::fs::remove_file(&alias);
            std::fs::hard_link(target, &alias).unwrap();
            let e = format!(
                "{:#}",
                backup(&db, &[&tokens], &alias, true, |_, _| true).unwrap_err()
            );
            assert!(e.contains(said), "{e}");
            let meta = |p: &Path| {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(p).unwrap();
                (m.dev(), m.ino())
            };
            assert_eq!(meta(&alias), meta(target), "the alias was replaced");
        }
    }

    /// Review adm: `publish` looked again for a journal beside FILE but not
    /// at what FILE is; one made the mirror under another name during the
    /// copy (here a hard link made between two steps) was replaced by the
    /// copy with `--force`.
    #[test]
    fn the_mirror_made_under_the_destination_name_during_the_copy_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE negotiations (id INTEGER PRIMARY KEY, pad TEXT);
             CREATE TABLE outbox (id INTEGER PRIMARY KEY);",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO negotiations (pad) SELECT zeroblob(4096) FROM \
             (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600) \
             SELECT i FROM n)",
            [],
        )
        .unwrap();
        let dest = dir.path().join("copy.db");
        let mut linked = false;
        let result = backup(&db, &[], &dest, true, |_, _| {
            if !linked {
                std::fs::hard_link(&db, &dest).unwrap();
                linked = true;
            }
            true
        });
        assert!(linked);
        let e = format!("{:#}", result.expect_err("the mirror was replaced"));
        assert!(e.contains("the mirror itself"), "{e}");
        let meta = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        assert_eq!(
            meta(&dest),
            meta(&db),
            "the mirror's other name was replaced"
        );
    }

    /// The grants' lock files in `<token store>.locks/` are the token
    /// store's too: a backup written over one (or under a new name there)
    /// breaks the lock a refresh holds, or leaves customer data among them.
    #[test]
    fn the_token_stores_lock_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "CREATE TABLE negotiations (id INTEGER PRIMARY KEY);
                 CREATE TABLE outbox (id INTEGER PRIMARY KEY);",
            )
            .unwrap();
        let tokens = dir.path().join("tokens.db");
        std::fs::write(&tokens, "tokens").unwrap();
        let locks = dir.path().join("tokens.db.locks");
        std::fs::create_dir(&locks).unwrap();
        let lock = locks.join("grant-1.lock");
        std::fs::write(&lock, "").unwrap();
        let alias = dir.path().join("alias.db");
        std::fs::hard_link(&lock, &alias).unwrap();
        for dest in [lock.clone(), locks.join("new.db"), alias.clone()] {
            let e = format!(
                "{:#}",
                backup(&db, &[&tokens], &dest, true, |_, _| true)
                    .expect_err(&dest.display().to_string())
            );
            assert!(e.contains("token store"), "{e}");
        }
        assert_eq!(std::fs::read(&lock).unwrap(), b"");
        assert!(!locks.join("new.db").exists());
    }

    /// SPEC §1: every error names what is wrong and where.
    #[test]
    fn a_mirror_that_is_not_a_database_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        std::fs::write(&db, "not a database, but long enough to be read as one").unwrap();
        let dest = dir.path().join("copy.db");
        let e = format!(
            "{:#}",
            backup(&db, &[], &dest, false, |_, _| true).unwrap_err()
        );
        assert!(e.contains(&db.display().to_string()), "{e}");
        assert!(!dest.exists());
    }
}
