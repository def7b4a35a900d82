//! `leadsync demo` (SPEC §7): the whole flow against the in-process sandbox,
//! with no network, credentials or configuration, narrated as it goes.

use crate::app::Session;
use crate::config::ConfigSource;
use crate::drain::{DrainSettings, Drainer};
use crate::sandbox::{Faults, Mutation, Sandbox, SandboxOptions};
use crate::store::ProcessLock;
use crate::sync::{PassSettings, ScanKind, sync_business};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Set once a line could not be written (a pipe whose reader has gone, a
/// full disk): the demo still finishes its mirror, then exits 1.
static OUTPUT_LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", line.as_ref())
        .and_then(|()| out.flush())
        .is_err()
    {
        OUTPUT_LOST.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Removes the previous demo's mirror and its SQLite side files (not its
/// lock file, which the caller holds meanwhile).
fn remove_database(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove {}", Path::new(&p).display()));
            }
        }
    }
    Ok(())
}

/// The schema version that added `message_outbox` (migration
/// `0007_messages.sql`): a mirror below it lacks the table and may still be
/// an earlier demo's.
const MESSAGE_OUTBOX_SINCE: i64 = 7;

/// Refuses to replace a file the demo did not write: `--database` pointed
/// at a real mirror (or any other file) deleted it, with the outbox rows
/// the partner had written. A mirror whose businesses are all the
/// sandbox's (a previous demo), an empty file or none at all is replaced.
fn replaceable(path: &Path, businesses: &[crate::sandbox::BusinessInfo]) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        Ok(m) if m.len() == 0 => return Ok(()),
        Ok(_) => {}
    }
    // Its businesses and leads, and how many outbox rows name a lead it
    // does not hold (a mirror written by `enqueue` alone, say); `None` when
    // it lacks an outbox table its schema version has.
    let read = (|| -> rusqlite::Result<Option<(Vec<String>, i64)>> {
        let c = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(Duration::from_secs(5))?;
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let mut q = c.prepare(
            "SELECT business_id FROM businesses UNION SELECT business_id FROM negotiations",
        )?;
        let ids = q
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        // Every schema has `outbox`; only one older than `message_outbox`
        // lacks that: an earlier version's mirror is still the demo's own,
        // while another program's file with empty lookalike `businesses`
        // and `negotiations` tables is not.
        let mut foreign = 0;
        for (table, since) in [("outbox", 0), ("message_outbox", MESSAGE_OUTBOX_SINCE)] {
            let exists: bool = c.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )?;
            if exists {
                foreign += c.query_row(
                    &format!(
                        "SELECT count(*) FROM {table}
                         WHERE negotiation_id NOT IN (SELECT negotiation_id FROM negotiations)"
                    ),
                    [],
                    |r| r.get::<_, i64>(0),
                )?;
            } else if version >= since {
                return Ok(None);
            }
        }
        Ok(Some((ids, foreign)))
    })();
    let keep = format!(
        "the demo replaces its database: give it another --database, or remove {} yourself",
        path.display()
    );
    match read {
        Ok(Some((ids, foreign))) => {
            match ids
                .iter()
                .find(|id| !businesses.iter().any(|b| &b.id == *id))
            {
                Some(id) => anyhow::bail!(
                    "{} is a mirror with business {id}, not one the demo wrote; {keep}",
                    path.display()
                ),
                None if foreign > 0 => anyhow::bail!(
                    "{} is a mirror with {foreign} outbox row(s) for leads it does not hold, not one \
                     the demo wrote; {keep}",
                    path.display()
                ),
                None => Ok(()),
            }
        }
        Ok(None) | Err(_) => anyhow::bail!(
            "{} exists and is not a mirror the demo wrote; {keep}",
            path.display()
        ),
    }
}

/// The private directory this process created, once it has: the only one
/// [`remove_private_dir`] removes.
static PRIVATE_DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// How many names [`create_private_dir`] tries.
const PRIVATE_DIR_ATTEMPTS: usize = 8;

/// Creates the demo's private temporary directory (grants, client secret,
/// token store) under `base`: a new one, 0700. `leadsync-demo-PID` is
/// predictable, so an existing path there (a link or a directory another
/// local user planted) is never used nor followed: another name with a
/// random suffix is tried instead.
pub fn create_private_dir(base: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let pid = std::process::id();
    for attempt in 0..PRIVATE_DIR_ATTEMPTS {
        let name = match attempt {
            0 => format!("leadsync-demo-{pid}"),
            _ => format!("leadsync-demo-{pid}-{:016x}", fastrand::u64(..)),
        };
        let path = base.join(name);
        // mkdir(2) creates the last component or fails: it follows no link there.
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                *PRIVATE_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.clone());
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot create the demo's private directory {}",
                        path.display()
                    )
                });
            }
        }
    }
    anyhow::bail!(
        "cannot create the demo's private directory in {}: {PRIVATE_DIR_ATTEMPTS} names tried were \
         taken (leadsync-demo-{pid} and random ones); set TMPDIR to a directory of your own",
        base.display()
    )
}

/// Removes the directory [`create_private_dir`] created once more, after
/// the runtime has stopped: a demo dropped by Ctrl-C may leave a token
/// store write on a blocking thread, which can create a file there (the
/// per-grant lock directory) after the drop removed it. Nothing when this
/// process created none.
pub fn remove_private_dir() {
    let created = PRIVATE_DIR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(dir) = created {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes the demo's temporary directory however the demo ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Words a failure to take the mirror's lock file by what is wrong (the
/// underlying error, naming the lock file, follows).
fn lock_error(database: &Path, e: anyhow::Error) -> anyhow::Error {
    use std::io::ErrorKind as K;
    let db = database.display();
    let parent = match database.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
        _ => ".".into(),
    };
    let Some(kind) = e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind)
    else {
        // Its own words say why (root refusing another user's lock file).
        return e.context(format!(
            "the demo will not write its mirror {db} there; give it --database PATH elsewhere"
        ));
    };
    let mut lock = database.as_os_str().to_owned();
    lock.push(".lock");
    let lock = Path::new(&lock);
    let why = match kind {
        K::NotFound => format!(
            "the demo cannot write its mirror {db}: {parent} does not exist; create it, or give \
             it --database PATH"
        ),
        K::NotADirectory => format!(
            "the demo cannot write its mirror {db}: a part of {parent} is not a directory; give it \
             --database PATH"
        ),
        K::IsADirectory => format!(
            "the demo cannot take its mirror's lock: {} is a directory; remove it, or give the \
             demo --database PATH",
            lock.display()
        ),
        K::PermissionDenied | K::ReadOnlyFilesystem if lock.exists() => format!(
            "the demo may not write its lock file {} (another user's, or read-only); give it \
             --database PATH elsewhere",
            lock.display()
        ),
        K::PermissionDenied | K::ReadOnlyFilesystem => format!(
            "the demo cannot write its mirror {db} there: run it in a directory you can write to, \
             or give it --database PATH"
        ),
        _ => format!("the demo cannot take its mirror's lock beside {db}; give it --database PATH"),
    };
    e.context(why)
}

/// Runs the demo, writing the mirror to `database`; `replaced` is set once
/// it has removed the previous one (`[1/7]`).
pub async fn run(database: &Path, replaced: &std::sync::atomic::AtomicBool) -> Result<u8> {
    let started = Instant::now();
    // The grants, the client secret and the token store live in a private
    // (0700) temporary directory, removed at the end even when a step fails:
    // never beside the mirror, whose directory may be /tmp.
    let fixture = create_private_dir(&std::env::temp_dir())?;
    let _cleanup = RemoveOnDrop(fixture.clone());
    let tokens = fixture.join("tokens.db");
    say(
        "leadsync demo: the whole flow against the built-in Thumbtack sandbox (loopback only, no credentials)\n",
    );

    let sandbox = Sandbox::start(SandboxOptions {
        businesses: 3,
        leads_per_business: 45,
        access_token_ttl_secs: 600,
        ..SandboxOptions::default()
    })
    .await?;
    let businesses = sandbox.businesses();
    // Another demo (or a daemon) using this mirror keeps it: removing its
    // files under it made that one fail part way. The lock is held from
    // here until the session has it: let go in between, a second demo
    // could take it and remove this one's fresh mirror.
    let lock = ProcessLock::try_acquire(database)
        .map_err(|e| lock_error(database, e))?
        .with_context(|| {
        let pid = ProcessLock::holder(database)
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into());
        if ProcessLock::held_by_daemon(database) {
            format!(
                "the leadsync daemon (pid {pid}) is running on {}: give the demo `--database OTHER.db`",
                database.display()
            )
        } else {
            format!(
                "another leadsync process (pid {pid}) is using {}: wait for it (another \
                 `leadsync demo` running in this directory, say), or give this one `--database OTHER.db`",
                database.display()
            )
        }
    })?;
    replaceable(database, &businesses)?;
    replaced.store(true, std::sync::atomic::Ordering::SeqCst);
    remove_database(database)?;
    say(format!(
        "[1/7] sandbox started at {} with {} businesses and {} leads (seed 42)",
        sandbox.base_url(),
        businesses.len(),
        businesses.iter().map(|b| b.leads).sum::<usize>()
    ));

    let config_path = sandbox.write_fixture(&fixture, true)?;
    let mut config = ConfigSource {
        files: vec![config_path],
        ..Default::default()
    }
    .load()?;
    config.file.database = database.to_path_buf();
    config.file.oauth.token_store = tokens.clone();
    config.file.outbox.concurrency = 1;
    config.file.outbox.backoff_initial_secs = 1.0;
    config.file.outbox.backoff_max_secs = 5.0;
    config.file.poll.page_size = 20;
    say(format!(
        "[2/7] each business authorized with an OAuth refresh token; rotated tokens go to {}\n      mirror: {}",
        tokens.display(),
        database.display()
    ));

    let session = Session::open_holding(config, lock).await?;
    let stop = CancellationToken::new();
    let settings = PassSettings {
        page_size: session.config.file.poll.page_size,
        stop_after_unchanged_pages: 1,
        accept_missing: false,
    };
    say("[3/7] full sync of every business, page by page:");
    for b in &businesses {
        let r = sync_business(
            &session.store,
            &session.client,
            &b.id,
            ScanKind::Full,
            settings,
            &stop,
        )
        .await;
        say(format!("      {}", crate::terminal::blank(&r.summary())));
    }

    let first = &businesses[0];
    let ids = sandbox.lead_ids(&first.id);
    let added = sandbox.mutate(Mutation::AddLeads {
        business_id: first.id.clone(),
        count: 2,
    })?;
    let current = sandbox
        .lead_json(&ids[1])
        .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_default();
    let new_status = if current == "Canceled" {
        "Picked"
    } else {
        "Canceled"
    };
    sandbox.mutate(Mutation::SetStatus {
        negotiation_id: ids[1].clone(),
        status: new_status.into(),
    })?;
    let removed = ids[ids.len() - 1].clone();
    sandbox.mutate(Mutation::Remove {
        negotiation_id: removed.clone(),
    })?;
    say(format!(
        "[4/7] on Thumbtack's side, business {}: 2 new leads, lead {} went from {current} to {new_status}, lead {} removed",
        first.id, ids[1], removed
    ));
    let r = sync_business(
        &session.store,
        &session.client,
        &first.id,
        ScanKind::Head,
        settings,
        &stop,
    )
    .await;
    say(format!(
        "      head scan (stops at the first page with nothing new): {}",
        crate::terminal::blank(&r.summary())
    ));
    let r = sync_business(
        &session.store,
        &session.client,
        &first.id,
        ScanKind::Full,
        settings,
        &stop,
    )
    .await;
    say(format!(
        "      full scan (finds removals):                          {}",
        crate::terminal::blank(&r.summary())
    ));

    // The partner's software writes the outbox with plain SQL.
    let refused = ids[3].clone();
    sandbox.refuse(&refused);
    let external = rusqlite::Connection::open(database)?;
    external.busy_timeout(Duration::from_secs(5))?;
    let inserts = [
        (
            added[0].as_str(),
            "job_complete",
            "2026-11-20T16:45:00-05:00",
            Some(125_000),
        ),
        (
            added[0].as_str(),
            "appt_scheduled",
            "2026-11-18T09:30:00Z",
            None,
        ),
        (
            ids[1].as_str(),
            "appt_scheduled",
            "2026-11-19T14:00:00.250+01:00",
            None,
        ),
        (
            ids[2].as_str(),
            "customer_cancel",
            "2026-11-21T08:00:00Z",
            None,
        ),
        (
            refused.as_str(),
            "invoice_paid",
            "2026-11-22T12:00:00Z",
            Some(9_900),
        ),
    ];
    say(
        "[5/7] the partner's software inserts 5 transitions with plain SQL (two for one lead, out of time order):",
    );
    for (negotiation, status, at, cents) in inserts {
        external.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, invoice_amount_in_cents)
             VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![negotiation, status, at, cents],
        )?;
        say(format!(
            "      #{} {negotiation} {status:<15} at {at}{}",
            external.last_insert_rowid(),
            cents
                .map(|c| format!(", invoice {c} cents"))
                .unwrap_or_default()
        ));
    }
    let bad = external.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES ('1', 'done', 'now')",
        [],
    );
    if let Err(e) = bad {
        say(format!(
            "      and a bad row is refused by the table itself: {e}"
        ));
    }

    say("[6/7] draining the outbox (the sandbox answers some requests with 429 Retry-After: 1):");
    sandbox.set_faults(Faults {
        rate_429: 0.4,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let drainer = Arc::new(Drainer::new(
        session.store.clone(),
        session.client.clone(),
        DrainSettings::from_config(&session.config),
    ));
    for round in 1..=8 {
        let s = drainer.drain_once(&stop).await?;
        say(format!(
            "      round {round}: {} sent, {} to retry (backoff persisted in the row), {} dead",
            s.sent, s.retried, s.dead
        ));
        let pending = session
            .store
            .call(|c| Ok(crate::store::outbox::counts(c)?.pending))
            .await?;
        if pending == 0 {
            break;
        }
        if round == 4 {
            sandbox.set_faults(Faults::default());
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // Also when every row went before round 4: the 429s were for the drain
    // only (the webhook registration below is not retried).
    sandbox.set_faults(Faults::default());
    say("      Thumbtack (the sandbox) received, in this order:");
    for d in sandbox.deliveries() {
        say(format!(
            "        {} {:<15} partnerStatusChangedAt {}{}",
            d.negotiation_id,
            d.status,
            d.partner_status_changed_at,
            d.invoice_amount_in_cents
                .map(|c| format!(", invoiceAmountInCents {c}"))
                .unwrap_or_default()
        ));
    }
    realtime(&session, &sandbox, &first.id, &external).await?;

    let report = {
        let config = session.config.clone();
        session
            .store
            .call(move |c| crate::status::report(c, &config))
            .await?
    };
    say("\nleadsync status:\n");
    for line in crate::status::render_text(&report).lines() {
        say(format!("  {line}"));
    }
    drop(session);
    sandbox.stop().await;

    let db = database.display();
    say(format!(
        "\ndone in {:.1}s. Look at the result with sqlite3:\n",
        started.elapsed().as_secs_f64()
    ));
    for q in [
        "SELECT business_id, count(*) AS leads, count(missing_since) AS missing FROM negotiations GROUP BY 1",
        "SELECT negotiation_id, status, customer_name, city, created_at FROM negotiations ORDER BY created_at DESC LIMIT 5",
        "SELECT negotiation_id, kind, old_status, new_status, changed_fields FROM negotiation_changes WHERE kind <> 'new'",
        "SELECT id, negotiation_id, status, state, attempts, last_http_status, last_error FROM outbox",
        "SELECT outbox_id, attempt, http_status, outcome, error FROM outbox_attempts ORDER BY id",
        "SELECT json_extract(payload, '$.sandboxExtension.bigNumber'), json_extract(payload, '$.customer.displayName') FROM negotiations LIMIT 3",
        "SELECT id, event_type, business_id, negotiation_id, message_id, outcome FROM webhook_events",
        "SELECT message_id, negotiation_id, sender, sent_at, text, source FROM messages",
        "SELECT id, negotiation_id, state, message_id, sent_at, text FROM message_outbox",
    ] {
        say(format!("  sqlite3 -header -column {db} \"{q}\""));
    }
    // Its output was lost (`leadsync demo | head -1`): exit 1, quietly, as
    // every command does when a pipe's reader has gone.
    Ok(u8::from(
        OUTPUT_LOST.load(std::sync::atomic::Ordering::SeqCst),
    ))
}

/// Waits (up to 10 s) until `sql` counts at least one row; the time it took.
async fn visible_after(
    external: &rusqlite::Connection,
    sql: &str,
    since: Instant,
) -> Result<Duration> {
    let deadline = since + Duration::from_secs(10);
    loop {
        let n: i64 = external.query_row(sql, [], |r| r.get(0))?;
        if n > 0 {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            anyhow::bail!("nothing arrived within 10 s: {sql}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The real-time path: a webhook receiver in this process, registered with
/// the sandbox; a new lead and a customer message arrive by webhook.
async fn realtime(
    session: &Session,
    sandbox: &Sandbox,
    business_id: &str,
    external: &rusqlite::Connection,
) -> Result<()> {
    use crate::config::{WebhookAuth, Webhooks};
    use crate::thumbtack::webhook::{DEFAULT_EVENTS, RegisterAuth, RegisterBody};
    let listener = crate::serve::bind(([127, 0, 0, 1], 0).into(), "demo webhook receiver").await?;
    let addr = listener.local_addr()?;
    let password = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let settings = Webhooks {
        listen: Some(addr),
        path: "/thumbtack/webhooks".into(),
        public_url: Some(format!("http://{addr}/thumbtack/webhooks")),
        auth: WebhookAuth::Basic {
            username: "thumbtack".into(),
            password: crate::secret::Secret::new(password.clone()),
        },
        max_body_bytes: 1 << 20,
        read_timeout: Duration::from_secs(10),
        auth_problem: None,
    };
    let stop = CancellationToken::new();
    let server = tokio::spawn(crate::serve::serve(
        listener,
        crate::serve::webhooks::router(&settings, session.store.clone()),
        stop.clone(),
        crate::serve::ServeOptions::default(),
    ));
    let url = settings.public_url.clone().unwrap_or_default();
    let created = session
        .client
        .create_webhook(
            business_id,
            &RegisterBody {
                webhook_url: url.clone(),
                event_types: DEFAULT_EVENTS.iter().map(|e| e.to_string()).collect(),
                enabled: true,
                auth: RegisterAuth::Basic {
                    username: "thumbtack".into(),
                    password,
                },
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot register the webhook: {e}"))?;
    say(format!(
        "[7/7] real time: a webhook receiver listens on {url} (Basic auth);\n      registered with the sandbox for business {business_id} as webhook {}",
        created.webhook_id
    ));
    let t = Instant::now();
    let lead = sandbox
        .mutate(Mutation::AddLeads {
            business_id: business_id.to_string(),
            count: 1,
        })?
        .remove(0);
    let took = visible_after(
        external,
        &format!("SELECT count(*) FROM negotiations WHERE negotiation_id = '{lead}'"),
        t,
    )
    .await?;
    say(format!(
        "      new lead {lead}: in the mirror {:.1} ms after the sandbox created it (NegotiationCreatedV4, no poll)",
        took.as_secs_f64() * 1000.0
    ));
    let t = Instant::now();
    let message = sandbox
        .mutate(Mutation::AddMessage {
            negotiation_id: lead.clone(),
            text: "Hi! Could you come on Tuesday morning?".into(),
            from: None,
        })?
        .remove(0);
    let took = visible_after(
        external,
        &format!("SELECT count(*) FROM messages WHERE message_id = '{message}'"),
        t,
    )
    .await?;
    say(format!(
        "      customer message {message} on it: in `messages` {:.1} ms later (MessageCreatedV4)",
        took.as_secs_f64() * 1000.0
    ));
    // The reply, written by "the partner's software" with plain SQL, goes
    // out through message_outbox and comes back as a Business message.
    sandbox.set_faults(Faults::default());
    let t = Instant::now();
    external.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'Tuesday 9:00 works. See you then!')",
        [&lead],
    )?;
    let drainer = Arc::new(Drainer::new(
        session.store.clone(),
        session.client.clone(),
        DrainSettings::from_config(&session.config),
    ));
    let s = drainer.drain_once(&CancellationToken::new()).await?;
    let sent: Option<String> = external
        .query_row(
            "SELECT message_id FROM message_outbox WHERE negotiation_id = ?1 AND state = 'sent'",
            [&lead],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    match sent {
        Some(id) => {
            let took = visible_after(
                external,
                &format!("SELECT count(*) FROM messages WHERE message_id = '{id}' AND sender = 'Business'"),
                t,
            )
            .await?;
            say(format!(
                "      reply via message_outbox: sent as message {id}, back in `messages` as from Business {:.1} ms after the INSERT",
                took.as_secs_f64() * 1000.0
            ));
        }
        None => say(format!(
            "      reply via message_outbox: not sent ({} to retry, {} dead)",
            s.retried, s.dead
        )),
    }
    stop.cancel();
    let _ = server.await;
    Ok(())
}
