//! The command line (SPEC §1): argument definitions and what each command does.

use crate::config::{Config, ConfigError, ConfigSource};
use crate::daemon::{self, Controls};
use crate::drain::{DrainSettings, Drainer};
use crate::sandbox::{Faults, Pagination, Sandbox, SandboxOptions, Shape};
use crate::secret::Secret;
use crate::store::{self, outbox};
use crate::sync::{PassSettings, ScanKind, sync_business};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Exit code for an invalid or missing configuration (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// leadsync: mirrors Thumbtack leads into SQLite and sends job-status
/// transitions from an outbox table back to Thumbtack.
#[derive(Debug, Parser)]
#[command(name = "leadsync", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file; repeat to merge several (later wins). Default:
    /// /etc/leadsync/leadsync.toml then /etc/leadsync/conf.d/*.toml.
    #[arg(long = "config", value_name = "FILE", global = true)]
    pub config: Vec<PathBuf>,
    /// Log format on stderr (the level comes from LEADSYNC_LOG, e.g. `debug`).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "LEADSYNC_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: scheduled poller and outbox drainer until SIGTERM/SIGINT.
    Run,
    /// One sync pass for all (or one) business, then exit.
    Sync {
        /// Only this business.
        #[arg(long, value_name = "ID")]
        business: Option<String>,
        /// A full scan (every page; marks leads no longer listed as missing).
        #[arg(long)]
        full: bool,
        /// With --full: mark leads missing even when more than half of a
        /// business's leads (and more than 20) vanished at once.
        #[arg(long, requires = "full")]
        accept_missing: bool,
        /// While the daemon runs: how long to wait for it to take the
        /// request before withdrawing it and failing (a stuck daemon, or
        /// one stopped and not restarted).
        #[arg(long, value_name = "SECS", default_value_t = 20,
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        wait: u64,
    },
    /// Attempt every due outbox row once (in each negotiation's order), then exit.
    Drain,
    /// Insert one outbox row, with the table's own validation; prints its id.
    Enqueue(EnqueueArgs),
    /// Insert one reply into message_outbox, with the table's own validation; prints its id.
    Reply(ReplyArgs),
    /// Inspect and act on outbox rows.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Per business: last sync, lead count, needs-reauth; outbox counts.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// OAuth commands.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Manage Thumbtack webhook subscriptions pointing at webhooks.public_url.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Run the built-in simulated Thumbtack API until stopped.
    Sandbox(Box<SandboxArgs>),
    /// Read-only check of what the API really answers for a business: one
    /// list page and one GET (run it against staging first).
    Probe {
        /// The business to look at (must be in the configuration).
        #[arg(long, value_name = "ID")]
        business: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The whole flow against the sandbox, with no credentials or configuration.
    Demo {
        /// The demo database (replaced on every run).
        #[arg(long, default_value = "leadsync-demo.db")]
        database: PathBuf,
    },
    /// Copy the mirror to FILE (SQLite online backup; safe while the daemon runs; never the token store).
    Backup {
        /// Where the copy goes (a new file, unless --force).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print shell completions for SHELL to stdout.
    Completions {
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The lead's negotiationID.
    #[arg(long, value_name = "ID")]
    pub negotiation: String,
    /// not_scheduled, appt_scheduled, job_complete, invoice_paid, customer_cancel or pro_cancel.
    #[arg(long)]
    pub status: String,
    /// When the status changed on your platform: RFC 3339 with a zone.
    #[arg(long, value_name = "TIME")]
    pub at: String,
    /// Invoice amount in cents (job_complete and invoice_paid only).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub invoice_cents: Option<String>,
    /// The business (default: the lead's business in the mirror).
    #[arg(long, value_name = "ID")]
    pub business: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReplyArgs {
    /// The lead's negotiationID.
    #[arg(long, value_name = "ID")]
    pub negotiation: String,
    /// The message (at most 5,000 characters).
    #[arg(long, allow_hyphen_values = true)]
    pub text: String,
    /// The business (default: the lead's business in the mirror).
    #[arg(long, value_name = "ID")]
    pub business: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Show outbox rows.
    List {
        /// `transition` (the outbox table) or `message` (message_outbox).
        #[arg(long, default_value = "transition", value_name = "KIND")]
        kind: outbox::Kind,
        /// Only rows in this state.
        #[arg(long, value_parser = ["pending", "sending", "sent", "dead", "canceled"])]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put dead rows back to pending (attempts reset).
    Retry {
        /// `transition` (the outbox table) or `message` (message_outbox).
        #[arg(long, default_value = "transition", value_name = "KIND")]
        kind: outbox::Kind,
        /// Row ids.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        ids: Vec<i64>,
        /// Every dead row.
        #[arg(long)]
        all_dead: bool,
    },
    /// Cancel pending rows (they are never sent).
    Cancel {
        /// `transition` (the outbox table) or `message` (message_outbox).
        #[arg(long, default_value = "transition", value_name = "KIND")]
        kind: outbox::Kind,
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Register webhooks.public_url for each business that has no webhook there yet.
    Register {
        /// Only these businesses (repeat); default: every enabled business.
        #[arg(long = "business", value_name = "ID")]
        business: Vec<String>,
        /// Event types, comma-separated (default NegotiationCreatedV4,MessageCreatedV4).
        #[arg(long, value_name = "E,E", value_delimiter = ',')]
        events: Vec<String>,
    },
    /// List each business's webhooks.
    List {
        #[arg(long, value_name = "ID")]
        business: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete one webhook.
    Delete {
        #[arg(long, value_name = "ID")]
        business: String,
        #[arg(long, value_name = "WEBHOOK_ID")]
        webhook: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate and print the effective configuration, secrets masked.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Exchange an OAuth authorization code; store the grant's refresh token.
    Exchange {
        /// A configured business: the grant goes to its refresh_token_file's chain.
        #[arg(long, value_name = "ID", required_unless_present = "token_file")]
        business: Option<String>,
        /// Onboarding a new grant: the token file to create (mode 0600) for it.
        #[arg(long, value_name = "FILE", conflicts_with = "business")]
        token_file: Option<PathBuf>,
        /// Write DIR/<businessID>.toml for every business the grant covers.
        #[arg(long, value_name = "DIR")]
        write_conf: Option<PathBuf>,
        /// The code (visible in `ps` and shell history: prefer --code-file).
        #[arg(
            long,
            conflicts_with = "code_file",
            required_unless_present = "code_file",
            value_parser = |s: &str| Ok::<Secret, std::convert::Infallible>(Secret::new(s))
        )]
        code: Option<Secret>,
        /// A file holding the code; `-` reads it from standard input.
        #[arg(long, value_name = "FILE")]
        code_file: Option<PathBuf>,
        #[arg(long, value_name = "URI")]
        redirect_uri: String,
    },
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:8765")]
    pub listen: std::net::SocketAddr,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 3)]
    pub businesses: usize,
    #[arg(long, default_value_t = 60)]
    pub leads_per_business: usize,
    /// Largest page a listing returns.
    #[arg(long, default_value_t = 100)]
    pub max_page_size: usize,
    /// The OAuth client id the token endpoint accepts (any characters but
    /// leading or trailing whitespace: HTTP Basic carries it
    /// form-urlencoded, RFC 6749 §2.3.1).
    #[arg(long, default_value = "sandbox-client", value_parser = credential)]
    pub client_id: String,
    /// The OAuth client secret the token endpoint accepts (as --client-id:
    /// secret files are read trimmed, so edge whitespace could never match).
    #[arg(long, default_value = "sandbox-secret", value_parser = credential)]
    pub client_secret: String,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Latency added to every API response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of API requests answered 500/502/503.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub rate_429: f64,
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Share answered 202 (WAF challenge).
    #[arg(long, default_value_t = 0.0)]
    pub rate_202: f64,
    /// Share that hang for --timeout-ms.
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
    /// Share whose connection is closed without an answer.
    #[arg(long, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Share of job statuses and replies accepted (recorded as delivered)
    /// whose answer is then lost (the connection closed).
    #[arg(long, default_value_t = 0.0)]
    pub lose_after_accept_rate: f64,
    /// Share of job statuses and replies accepted (recorded as delivered)
    /// whose 2xx answer is cut before its body.
    #[arg(long, default_value_t = 0.0)]
    pub cut_body_after_accept_rate: f64,
    /// Share with a broken body.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Share answered with a 301 redirect.
    #[arg(long, default_value_t = 0.0)]
    pub redirect_rate: f64,
    /// Share answered with a 404 HTML page (as a proxy sends).
    #[arg(long, default_value_t = 0.0)]
    pub html_404_rate: f64,
    /// How listings are paged.
    #[arg(long, value_enum, default_value_t = Pagination::Next)]
    pub pagination: Pagination,
    /// Listing `next` URLs name this host (`host[:port]`) instead of the
    /// sandbox's: a `next` that must never be followed (with --pagination
    /// next or next-token only).
    #[arg(long, value_name = "HOST", value_parser = host_port)]
    pub next_host: Option<String>,
    /// Listing: serve from the start whatever `offset` asks (a server that
    /// does not know the parameter).
    #[arg(long)]
    pub ignore_offset: bool,
    /// Listing: leave `limit` out of `pagination` (a capped page does not say so).
    #[arg(long)]
    pub no_limit_echo: bool,
    /// Which published lead shape the leads follow.
    #[arg(long, value_enum, default_value_t = Shape::Mixed)]
    pub shape: Shape,
    /// Send every webhook delivery twice.
    #[arg(long)]
    pub webhook_twice: bool,
    /// Send each batch of webhook deliveries in reverse order.
    #[arg(long)]
    pub webhook_out_of_order: bool,
    /// Webhook deliveries sent at once.
    #[arg(long, default_value_t = 16)]
    pub webhook_concurrency: usize,
    /// Token endpoint: answer every request `invalid_client` (401).
    #[arg(long)]
    pub token_invalid_client: bool,
    /// Token endpoint: answer every request 502 `proxy_oauth_failed` (a wrong audience).
    #[arg(long)]
    pub token_proxy_oauth_failed: bool,
    /// Token endpoint: answer every request `400` with this OAuth error
    /// (`unauthorized_client`, `invalid_request`, `invalid_scope`, ...).
    #[arg(long, value_name = "ERROR")]
    pub token_error: Option<String>,
    /// Token endpoint: answer the next requests with these statuses, one
    /// each, nothing rotated (`503,429,408`; `0` drops the connection).
    #[arg(long, value_name = "STATUS,...", value_delimiter = ',', value_parser = token_fail_status)]
    pub token_fail: Vec<u16>,
    /// Token endpoint: hold a refresh's answer this long after rotating.
    #[arg(long, default_value_t = 0)]
    pub token_hold_ms: u64,
    /// Token endpoint: seconds a used refresh token may be presented again
    /// for the same answer (0: any reuse is refused).
    #[arg(long, default_value_t = 0)]
    pub token_grace_secs: u64,
    /// Negotiations whose job-status posts are refused (400).
    #[arg(long, value_name = "ID")]
    pub refuse: Vec<String>,
    /// Write a ready-to-use leadsync configuration (and token files) into DIR.
    #[arg(long, value_name = "DIR")]
    pub write_config: Option<PathBuf>,
    /// With --write-config: static access tokens instead of OAuth grants.
    #[arg(long)]
    pub static_tokens: bool,
}

impl Command {
    /// The log level used when LEADSYNC_LOG is not set.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Run
            | Command::Sync { .. }
            | Command::Drain
            | Command::Sandbox(_)
            | Command::Auth { .. } => "info",
            Command::Probe { .. } => "warn",
            Command::Demo { .. } => "off",
            _ => "warn",
        }
    }
}

/// A failure that should exit with a given code after its message.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    // A database from a newer leadsync is no more fixed by a restart than a
    // bad configuration: the same code, so systemd stops retrying.
    if e.chain().any(|c| {
        c.downcast_ref::<ConfigError>().is_some()
            || c.downcast_ref::<crate::store::NewerSchema>().is_some()
    }) {
        EXIT_CONFIG
    } else {
        1
    }
}

/// Runs a parsed command; returns the process exit code.
pub async fn execute(cli: Cli) -> Result<u8> {
    let source = ConfigSource {
        files: cli.config.clone(),
        ..Default::default()
    };
    let load = || -> Result<Config> { Ok(source.load()?) };
    match cli.command {
        Command::Run => {
            // Before anything slow (reading thousands of files, a secret
            // on a slow mount): a SIGHUP meeting its default disposition
            // would kill the starting daemon. One received meanwhile is
            // kept by `controls.reload` and applied once started.
            let controls = Controls::default();
            spawn_signal_handlers(&controls)?;
            // SIGTERM stopped a start stuck reading a file at once before
            // the handlers were in place; so it still does.
            let reading = source.clone();
            // Biased, the stop first: a SIGTERM that came while reading is
            // obeyed even if the read is done by the time both are polled.
            let config = tokio::select! {
                biased;
                _ = controls.shutdown.cancelled() => {
                    tracing::info!("stopped while reading the configuration, before the start");
                    return Ok(0);
                }
                loaded = tokio::task::spawn_blocking(move || reading.load()) => {
                    loaded.context("reading the configuration")??
                }
            };
            config.require_client_secret()?;
            daemon::run_with(config, Some(source), controls).await?;
            Ok(0)
        }
        Command::Sync {
            business,
            full,
            accept_missing,
            wait,
        } => {
            let wait = std::time::Duration::from_secs(wait);
            sync(with_secret(load()?)?, business, full, accept_missing, wait).await
        }
        Command::Drain => drain(with_secret(load()?)?).await,
        Command::Webhooks { command } => {
            let config = with_secret(load()?)?;
            match command {
                WebhooksCommand::Register { business, events } => {
                    crate::webhooks::register(&config, &business, &events).await
                }
                WebhooksCommand::List { business, json } => {
                    crate::webhooks::list(&config, business, json).await
                }
                WebhooksCommand::Delete { business, webhook } => {
                    crate::webhooks::delete(&config, &business, &webhook).await
                }
            }
        }
        Command::Enqueue(args) => enqueue(&load()?, args),
        Command::Reply(args) => reply(&load()?, args),
        Command::Outbox { command } => outbox_command(&load()?, command),
        Command::Status { json } => {
            let config = load()?;
            // Read only, never migrated: after an upgrade the older daemon
            // may still run on it (README, "Upgrading").
            let (conn, version) = store::open_read_only(config.database())?;
            let note = store::schema_note(config.database(), version);
            if let Some(n) = &note {
                eprintln!("leadsync: note: {n}");
            }
            let report = crate::status::report(&conn, &config).with_context(|| {
                note.clone()
                    .unwrap_or_else(|| "cannot read the status".to_string())
            })?;
            if json {
                println!("{}", crate::terminal::pretty_json(&report)?);
            } else {
                print!("{}", crate::status::render_text(&report));
            }
            Ok(0)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = load()?;
            // The daemon starts with it (and says so loudly); a check does not pass.
            if let Some(w) = &config.webhooks {
                w.require_usable_auth()?;
            }
            let files: Vec<String> = config
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            println!("# configuration is valid");
            println!(
                "# files: {}",
                if files.is_empty() {
                    "(none)".into()
                } else {
                    files.join(", ")
                }
            );
            if let Some(s) = &config.client_secret_source {
                println!("# client secret from: {s}");
            }
            if config.businesses.is_empty() {
                println!("# warning: no business is configured");
            }
            for w in config
                .warnings()
                .into_iter()
                .chain(config.token_store_warning())
            {
                println!("# warning: {w}");
            }
            for line in crate::schedule::Budget::of(&config, chrono::Utc::now()).render() {
                println!("{line}");
            }
            if config.uses_oauth()
                && let Some(p) = &config.client_secret_problem
            {
                println!(
                    "# warning: {} (only `run`, `sync`, `drain` and `auth exchange` need it)",
                    p.replace('\n', " ")
                );
            }
            // A name `auth exchange --write-conf` took from the server may
            // hold characters a terminal obeys: escaped, still valid TOML.
            print!("{}", crate::terminal::safe_toml(&config.to_masked_toml()));
            Ok(0)
        }
        Command::Auth {
            command:
                AuthCommand::Exchange {
                    business,
                    token_file,
                    write_conf,
                    code,
                    code_file,
                    redirect_uri,
                },
        } => {
            let config = with_secret(load()?)?;
            if config.client_secret.is_none() || config.file.oauth.client_id.is_none() {
                return Err(
                    ConfigError(config.client_secret_problem.clone().unwrap_or_else(|| {
                        "auth exchange needs oauth.client_id and a client secret".into()
                    }))
                    .into(),
                );
            }
            if let Some(dir) = &write_conf
                && !dir.is_dir()
            {
                bail!("--write-conf {}: not a directory", dir.display());
            }
            if let Some(dir) = &write_conf {
                probe_dir(dir).map_err(|e| {
                    anyhow::anyhow!(
                        "--write-conf {}: cannot create a file there ({e}); the code was not spent",
                        dir.display()
                    )
                })?;
            }
            let code = read_code(code, code_file.as_deref())?;
            let target = match (business, token_file) {
                (Some(b), _) => ExchangeTarget::Business(b),
                (None, Some(f)) => {
                    // Configured businesses' grant (their file emptied, the
                    // grant in the store): replacing it would move them to
                    // the new pro's grant without a word.
                    let key = crate::thumbtack::auth::grant_key(&f);
                    let naming: Vec<&str> = config
                        .businesses
                        .iter()
                        .filter(|b| {
                            matches!(&b.token, crate::config::TokenSource::Refresh(g)
                                if crate::thumbtack::auth::grant_key(g) == key)
                        })
                        .map(|b| b.id.as_str())
                        .collect();
                    if let Some(first) = naming.first() {
                        bail!(
                            "the token file {} is the grant of configured business(es) {}: to \
                             re-authorize them run `leadsync auth exchange --business {first}`; \
                             --token-file onboards a new grant into a new file. The code was not \
                             spent",
                            f.display(),
                            naming.join(", ")
                        );
                    }
                    ExchangeTarget::File(f)
                }
                (None, None) => bail!("give --business ID or --token-file FILE"),
            };
            auth_exchange(config, target, &code, &redirect_uri, write_conf.as_deref()).await
        }
        Command::Sandbox(args) => sandbox(*args).await,
        Command::Probe { business, json } => {
            crate::probe::run(with_secret(load()?)?, &business, json).await
        }
        Command::Demo { database } => {
            // Ctrl-C ends the demo by dropping it, so that its private
            // temporary directory (client secret, grants, token store) is
            // removed as on any other end; the default action killed the
            // process and left it in $TMPDIR.
            let stop = stop_on_signal()?;
            let replaced = std::sync::atomic::AtomicBool::new(false);
            tokio::select! {
                done = crate::demo::run(&database, &replaced) => done,
                _ = stop.cancelled() => {
                    let mirror = if replaced.load(std::sync::atomic::Ordering::SeqCst) {
                        "holds what it wrote so far (run it again to start afresh)"
                    } else {
                        "is left as it was"
                    };
                    bail!(
                        "demo interrupted; its temporary files are removed, {} {mirror}",
                        database.display()
                    )
                }
            }
        }
        Command::Backup { file, force } => backup(&load()?, file, force).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into memory first: clap_complete writes with `expect`, so a
            // reader gone away (`| head`) was a panic, exit 101. Written
            // here, a closed pipe is an error like any command's, exit 1.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "leadsync", &mut script);
            std::io::stdout().write_all(&script)?;
            Ok(0)
        }
        Command::Man => {
            let page = crate::manpage::render().context("cannot render the man page")?;
            std::io::stdout().write_all(&page)?;
            Ok(0)
        }
    }
}

/// `leadsync backup FILE`: progress on a terminal, one line at the end.
async fn backup(config: &Config, file: PathBuf, force: bool) -> Result<u8> {
    use std::io::IsTerminal;
    let database = config.database().to_path_buf();
    let token_store = config.file.oauth.token_store.clone();
    let show = std::io::stderr().is_terminal();
    // Ctrl-C, SIGTERM or SIGHUP (an SSH session dropped) stops the copy
    // between steps, so that its temporary file is removed instead of left
    // beside FILE by a killed process.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut hup = hangups()?;
        let flag = interrupted.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hangup(&mut hup) => {}
            }
            flag.store(true, Ordering::SeqCst);
        });
    }
    let report = tokio::task::spawn_blocking(move || {
        let mut last = Instant::now();
        // Progress is best effort: a terminal gone (EIO: `… & disown` or
        // `setsid` after the SSH session dropped, output still on it) made
        // `eprint!` panic here, and the panic left the temporary file.
        let mut show = show;
        store::backup::backup(&database, &[&token_store], &file, force, |copied, total| {
            if show && (copied == total || last.elapsed() >= Duration::from_millis(200)) {
                last = Instant::now();
                let pct = if total > 0 { copied * 100 / total } else { 100 };
                let end = if copied == total { "\n" } else { "" };
                show = write!(
                    std::io::stderr(),
                    "\rbackup: {pct:>3}% ({copied} of {total} pages){end}"
                )
                .is_ok();
            }
            !interrupted.load(Ordering::SeqCst)
        })
        .map(|r| (r, file))
    })
    .await
    .context("the backup task failed")?;
    let (r, file) = report?;
    let _ = writeln!(
        std::io::stdout(),
        "backed up {} to {}: {} pages, {:.1} MiB, {} leads, {} outbox rows, schema version {}, in {:.1} s",
        config.database().display(),
        file.display(),
        r.pages,
        r.bytes as f64 / (1024.0 * 1024.0),
        r.leads,
        r.outbox_rows,
        r.schema_version,
        r.elapsed.as_secs_f64()
    );
    Ok(0)
}

/// The configuration of a command that calls the token endpoint: its client secret must be readable.
fn with_secret(config: Config) -> Result<Config> {
    config.require_client_secret()?;
    Ok(config)
}

/// SIGTERM/SIGINT stop the daemon; SIGHUP reloads its configuration.
fn spawn_signal_handlers(controls: &Controls) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let c = controls.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); c.shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT received"); c.shutdown.cancel(); }
                _ = hup.recv() => { tracing::info!("SIGHUP received: reloading the configuration"); c.reload.notify_one(); }
            }
        }
    });
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP held for the rest of the process: the first
/// cancels `stop` and sets the flag returned, none kills the process.
fn hold_signals(stop: CancellationToken) -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hup = hangups()?;
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hangup(&mut hup) => "SIGHUP",
            };
            if !seen.swap(true, Ordering::SeqCst) {
                // No panic on a terminal gone with the SSH session.
                let _ = writeln!(
                    std::io::stderr(),
                    "leadsync: {name} received: the exchange stops before sending the code, \
                     or else once its grant is stored"
                );
            }
            stop.cancel();
        }
    });
    Ok(flag)
}

/// Whether SIGHUP was ignored when this process started (`nohup`, `trap ''
/// HUP`, a supervisor's choice): the kernel's own record, the `SigIgn` mask
/// of `/proc/self/status` (SIGHUP is its lowest bit). Read before anything
/// in this process listens for SIGHUP, which replaces that disposition.
fn hangup_ignored() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        // Only the last hex digit: the mask is wider than 64 bits where
        // there are 128 signals.
        .and_then(|mask| mask.trim().chars().last()?.to_digit(16))
        .is_some_and(|low| low & 1 == 1)
}

/// SIGHUP for a command that stops on it (`backup`, `auth exchange`), or
/// none when it was ignored at the start: listening would override
/// `nohup`, and a command meant to outlive the session would stop with it.
fn hangups() -> Result<Option<tokio::signal::unix::Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    if hangup_ignored() {
        return Ok(None);
    }
    Ok(Some(
        signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
    ))
}

/// The next SIGHUP of [`hangups`]; never, when there is none to wait for.
async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(h) => {
            h.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// A token cancelled by SIGTERM or SIGINT (for the one-shot commands).
pub(crate) fn stop_on_signal() -> Result<CancellationToken> {
    let controls = Controls::default();
    spawn_signal_handlers(&controls)?;
    Ok(controls.shutdown)
}

async fn sync(
    config: Config,
    business: Option<String>,
    full: bool,
    accept_missing: bool,
    wait: std::time::Duration,
) -> Result<u8> {
    let selected: Vec<String> = match &business {
        Some(id) => match config.business(id) {
            None => bail!("business {id} is not in the configuration"),
            Some(b) if !b.enabled => bail!("business {id} is disabled (enabled = false)"),
            Some(b) => vec![b.id.clone()],
        },
        None => config
            .businesses
            .iter()
            .filter(|b| b.enabled)
            .map(|b| b.id.clone())
            .collect(),
    };
    if selected.is_empty() {
        println!("no enabled business is configured: nothing to sync");
        return Ok(0);
    }
    if let Some(code) =
        sync_through_daemon(&config, business.as_deref(), full, accept_missing, wait).await?
    {
        return Ok(code);
    }
    let stop = stop_on_signal()?;
    let session = crate::app::Session::open(config).await?;
    let settings = PassSettings {
        page_size: session.config.file.poll.page_size,
        stop_after_unchanged_pages: session.config.file.poll.stop_after_unchanged_pages,
        accept_missing,
    };
    let kind = if full { ScanKind::Full } else { ScanKind::Head };
    let messages = crate::messages::MessageSettings::from_config(&session.config);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        session.config.file.daemon.sync_concurrency,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    let progress = SyncProgress::start(selected.len());
    for id in selected {
        let (store, client, slots, stop) = (
            session.store.clone(),
            session.client.clone(),
            slots.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let report = sync_business(&store, &client, &id, kind, settings, &stop).await;
            // The conversations of the leads the pass found new or changed;
            // a failure here is reported but does not fail the pass.
            let polled = if messages.sync && report.is_ok() {
                Some(
                    crate::messages::poll_after_pass(&store, &client, &id, messages, &stop)
                        .await
                        .map(|r| r.summary(&id))
                        .unwrap_or_else(|e| format!("{id}: messages — cannot poll: {e:#}")),
                )
            } else {
                None
            };
            (report, polled)
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = tasks.join_next().await {
        reports.push(r.context("a sync task failed")?);
        if let Some(p) = &progress {
            p.finished(reports.len());
        }
    }
    if let Some(p) = progress {
        p.stop().await;
    }
    session.auth.settle(settle_bound(&session.config)).await;
    reports.sort_by(|a, b| a.0.business_id.cmp(&b.0.business_id));
    let reports: Vec<_> = reports
        .into_iter()
        .map(|(r, polled)| {
            // The server's words in a failure, cleaned here where they
            // are shown (the mirror keeps them as sent).
            println!("{}", crate::terminal::blank(&r.summary()));
            if let Some(p) = polled {
                println!("{}", crate::terminal::blank(&p));
            }
            r
        })
        .collect();
    let failed = reports.iter().filter(|r| !r.is_ok()).count();
    if failed > 0 {
        println!("{failed} of {} businesses failed", reports.len());
        return Ok(1);
    }
    Ok(0)
}

/// The progress line of a long `sync` (pages, leads, rate) on stderr, shown
/// only on a terminal (so never under journald, whose stderr is a socket).
struct SyncProgress {
    done: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SyncProgress {
    /// How long a sync runs before its progress shows, and how often it is redrawn.
    const EVERY: Duration = Duration::from_millis(500);

    fn start(businesses: usize) -> Option<SyncProgress> {
        use std::io::IsTerminal;
        // A terminal is never the journal (an inherited JOURNAL_STREAM
        // does not make it one): a terminal is all it takes.
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (pages0, leads0) = crate::metrics::sync_totals();
        let started = Instant::now();
        let task = {
            let (done, stop) = (done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut shown = false;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Self::EVERY) => {}
                    }
                    let (pages, leads) = crate::metrics::sync_totals();
                    let (pages, leads) = (pages - pages0, leads - leads0);
                    let secs = started.elapsed().as_secs_f64();
                    // Drawn at column 0 and the cursor left there, so that a
                    // log line written meanwhile replaces it instead of
                    // continuing it.
                    eprint!(
                        "\r\x1b[Ksync: {} of {businesses} businesses done, {pages} pages, {leads} leads ({:.0} leads/s, {secs:.0} s)\r",
                        done.load(std::sync::atomic::Ordering::Relaxed),
                        leads as f64 / secs.max(0.001),
                    );
                    shown = true;
                }
                if shown {
                    eprint!("\r\x1b[K");
                }
            })
        };
        Some(SyncProgress { done, stop, task })
    }

    fn finished(&self, n: usize) {
        self.done.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// How long the mirror's lock must stay free before `sync` takes the daemon
/// for stopped and withdraws a request it has not taken: systemd restarts
/// it after `RestartSec=5s`, and the new daemon takes the request. At most
/// half of `sync --wait` (the wait for the request to be taken, 20 s by
/// default; `sync` looks every 100 ms). Once taken, it waits for the
/// passes to end.
const SYNC_RESTART_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Withdraws the request `id` nobody has taken and fails, saying `said`
/// and `advice`; `Ok` when the daemon took it meanwhile. When it cannot be
/// withdrawn (the database's writes blocked, as the daemon's may be), says
/// so: the request stays open and may still run.
fn withdraw_untaken(
    conn: &rusqlite::Connection,
    id: i64,
    why: &str,
    said: &str,
    advice: &str,
) -> Result<()> {
    match store::requests::withdraw(conn, id, why, &crate::time::now()) {
        Ok(true) if advice.is_empty() => {
            bail!("{said}; the request is withdrawn. Run `leadsync sync` again")
        }
        Ok(true) => {
            bail!("{said}; the request is withdrawn. {advice}, then run `leadsync sync` again")
        }
        Ok(false) => Ok(()),
        Err(e) => bail!(
            "{said}; the request could not be withdrawn ({e:#}): it may still run (sync_requests \
             row {id} shows when){}{advice}",
            if advice.is_empty() { "" } else { ". " }
        ),
    }
}

/// While a daemon holds the lock, `sync` asks it through `sync_requests`
/// (SPEC §10), waits for its answer, and prints the lines a local pass
/// prints; `None` when no daemon runs (the caller runs the pass itself).
async fn sync_through_daemon(
    config: &Config,
    business: Option<&str>,
    full: bool,
    accept_missing: bool,
    taken_within: std::time::Duration,
) -> Result<Option<u8>> {
    let restart_grace = SYNC_RESTART_GRACE.min(taken_within / 2);
    let path = config.database();
    if !path.exists() {
        return Ok(None);
    }
    if store::ProcessLock::try_acquire(path)?.is_some() {
        return Ok(None); // released at once: Session::open takes it again
    }
    let pid = store::ProcessLock::holder(path);
    if !store::ProcessLock::held_by_daemon(path) {
        bail!(
            "another leadsync command (pid {}) is running against {}; it is not the daemon, so \
             nobody would take a sync request: wait for it to end, then run this again",
            pid.map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into()),
            path.display()
        );
    }
    let conn = store::open_connection(path, false)?;
    let kind = if full { "full" } else { "head" };
    let id = store::requests::insert(&conn, business, kind, accept_missing)
        .context("cannot ask the running daemon (insert into sync_requests)")?;
    eprintln!(
        "leadsync: the daemon (pid {}) is running: asked it for this sync (sync_requests row {id}); waiting for it",
        pid.map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into())
    );
    // The lock says whether a daemon is there (a pid may be reused, or
    // unknown); looked at once a second while the daemon holds it, every
    // 100 ms once it was seen free or held by another command.
    let pid_text = pid
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    let asked = std::time::Instant::now();
    let mut checked = std::time::Instant::now();
    // Since when, and how many looks in a row, the lock was seen free.
    let mut free_since: Option<std::time::Instant> = None;
    let mut free_looks = 0u32;
    let mut command_looks = 0u32;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let Some(r) = store::requests::get(&conn, id)? else {
            bail!("sync_requests row {id} was deleted before the daemon answered it");
        };
        if r.finished_at.is_some() {
            if let Some(summary) = r.summary.as_deref().filter(|s| !s.is_empty())
                && r.outcome.as_deref() != Some("refused")
            {
                // Any program may write the row: its text reaches the
                // terminal line by line, without escape sequences.
                println!(
                    "{}",
                    crate::terminal::safe_lines(summary, crate::terminal::Unsafe::Blank)
                );
            }
            return match r.outcome.as_deref() {
                Some("ok") => Ok(Some(0)),
                Some("refused") => bail!(
                    "the running daemon refused the request: {}",
                    crate::terminal::blank(r.error.as_deref().unwrap_or("no reason recorded"))
                ),
                // `finished_at` written by another program (its way to
                // cancel the request), not by the daemon.
                None => bail!(
                    "sync_requests row {id} was marked finished without an outcome{}: not by the \
                     daemon (another program ended it), so whether its passes ran is unknown",
                    r.error
                        .as_deref()
                        .map(|e| format!(" ({})", crate::terminal::blank(e)))
                        .unwrap_or_default()
                ),
                _ => {
                    // The lines say which passes failed; an error with no
                    // lines (written by another program) is all there is.
                    let no_lines = r.summary.as_deref().is_none_or(str::is_empty);
                    if let Some(e) = r
                        .error
                        .as_deref()
                        .filter(|e| e.starts_with("interrupted") || no_lines)
                    {
                        eprintln!("leadsync: {}", crate::terminal::blank(e));
                    }
                    Ok(Some(1))
                }
            };
        }
        // A daemon that has not taken the request in this long is stuck (or
        // its writer is blocked), or stopped and not back: a script must
        // not wait forever.
        if r.started_at.is_none() && asked.elapsed() >= taken_within {
            let within = taken_within.as_secs();
            let why = format!("withdrawn: the daemon had not taken it within {within} s");
            if free_since.is_some() {
                withdraw_untaken(
                    &conn,
                    id,
                    &why,
                    &format!(
                        "the daemon stopped before taking the request (sync_requests row {id}), \
                         and none took it within {within} s"
                    ),
                    "",
                )?;
            } else {
                withdraw_untaken(
                    &conn,
                    id,
                    &why,
                    &format!(
                        "the daemon (pid {pid_text}) has not taken the request (sync_requests row \
                         {id}) within {within} s: it may be stuck, or its database writes blocked \
                         by another program's transaction"
                    ),
                    "Look at `GET /healthz` on the admin listener and `journalctl -u leadsync`",
                )?;
            }
            continue; // taken meanwhile
        }
        if checked.elapsed() < std::time::Duration::from_secs(1)
            && free_since.is_none()
            && command_looks == 0
        {
            continue;
        }
        checked = std::time::Instant::now();
        if store::ProcessLock::is_held(path) {
            free_since = None;
            free_looks = 0;
            // Another command (`leadsync drain` from cron) holds it: the
            // daemon stopped, and nobody will take the request. Seen twice,
            // 100 ms apart: another `sync` looking holds it for an instant.
            if !store::ProcessLock::held_by_command(path) {
                command_looks = 0;
                continue;
            }
            command_looks += 1;
            if command_looks < 2 {
                continue;
            }
            let holder = store::ProcessLock::holder(path)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into());
            if r.started_at.is_some() {
                bail!(
                    "the daemon stopped before finishing the request (sync_requests row {id}); \
                     another leadsync command (pid {holder}) holds the lock now"
                );
            }
            withdraw_untaken(
                &conn,
                id,
                "withdrawn: the daemon stopped and another command holds the lock",
                &format!(
                    "the daemon stopped before taking the request (sync_requests row {id}), and \
                     another leadsync command (pid {holder}), not the daemon, holds the lock now: \
                     nobody would take it"
                ),
                "Wait for that command to end",
            )?;
            continue;
        }
        command_looks = 0;
        free_looks += 1;
        let since = *free_since.get_or_insert_with(std::time::Instant::now);
        // A daemon that stops answers its open requests first: look at the
        // row once more after seeing it gone before giving up on a taken
        // one. An untaken one waits for a daemon restarted by systemd.
        if r.started_at.is_some() {
            if free_looks >= 2 {
                bail!("the daemon stopped before finishing the request (sync_requests row {id})");
            }
            continue;
        }
        if since.elapsed() >= restart_grace {
            withdraw_untaken(
                &conn,
                id,
                "withdrawn: the daemon stopped before taking it",
                &format!(
                    "the daemon stopped before taking the request (sync_requests row {id}), and \
                     none took it within {:.1} s",
                    restart_grace.as_secs_f64()
                ),
                "",
            )?;
        }
    }
}

async fn drain(config: Config) -> Result<u8> {
    let stop = stop_on_signal()?;
    let session = crate::app::Session::open(config).await?;
    let drainer = Arc::new(Drainer::new(
        session.store.clone(),
        session.client.clone(),
        DrainSettings::from_config(&session.config),
    ));
    let s = drainer.drain_once(&stop).await;
    session.auth.settle(settle_bound(&session.config)).await;
    let s = s?;
    println!(
        "drained: {} sent, {} to retry later, {} dead, {} held for re-authorization",
        s.sent, s.retried, s.dead, s.held
    );
    let blocked = session.auth.blocked();
    let waiting = if blocked.is_empty() {
        0
    } else {
        let b = blocked.clone();
        session
            .store
            .call(move |c| outbox::pending_for(c, &b))
            .await?
    };
    if waiting > 0 {
        match session.auth.client_refused() {
            Some(why) => {
                println!(
                    "{waiting} rows wait: OAuth client refused: {} (see `leadsync status`)",
                    crate::terminal::blank(&why)
                )
            }
            None => println!(
                "{waiting} rows wait for businesses needing re-authorization: {} (see `leadsync status`)",
                blocked.join(", ")
            ),
        }
    }
    Ok(if s.all_sent() && waiting == 0 { 0 } else { 1 })
}

fn enqueue(config: &Config, args: EnqueueArgs) -> Result<u8> {
    let invoice = match args.invoice_cents.as_deref() {
        None => None,
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) => Some(n),
            Err(_) => bail!(
                "enqueue: rejected: outbox: invoice_amount_in_cents must be a whole number of cents (got {v:?})"
            ),
        },
    };
    let conn = store::open_connection(config.database(), true)?;
    let t = outbox::NewTransition {
        negotiation_id: args.negotiation,
        business_id: args.business,
        status: args.status,
        partner_status_changed_at: args.at,
        invoice_amount_in_cents: invoice,
    };
    let id = outbox::enqueue(&conn, &t).context("enqueue")?;
    println!("{id}");
    Ok(0)
}

fn reply(config: &Config, args: ReplyArgs) -> Result<u8> {
    let conn = store::open_connection(config.database(), true)?;
    let m = outbox::NewMessage {
        negotiation_id: args.negotiation,
        business_id: args.business,
        text: args.text,
    };
    let id = outbox::enqueue_message(&conn, &m).context("reply")?;
    println!("{id}");
    Ok(0)
}

fn outbox_command(config: &Config, command: OutboxCommand) -> Result<u8> {
    match command {
        OutboxCommand::List {
            kind: outbox::Kind::Message,
            state,
            json,
        } => {
            let conn = list_connection(config)?;
            let rows = outbox::list_messages(&conn, state.as_deref())?;
            if json {
                println!("{}", crate::terminal::pretty_json(&rows)?);
                return Ok(0);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>6}  {:<20} {:<9} {:>4}  {:<40}  LAST ERROR",
                "ID", "NEGOTIATION", "STATE", "TRY", "TEXT"
            )?;
            for r in &rows {
                let mut text = crate::terminal::blank(&r.text.chars().take(40).collect::<String>());
                if r.text.chars().count() > 40 {
                    text.pop();
                    text.push('…');
                }
                writeln!(
                    out,
                    "{:>6}  {:<20} {:<9} {:>4}  {:<40}  {}",
                    r.id,
                    crate::terminal::blank(&r.negotiation_id),
                    crate::terminal::blank(&r.state),
                    r.attempts,
                    text,
                    crate::terminal::blank(r.last_error.as_deref().unwrap_or(""))
                )?;
            }
            if rows.is_empty() {
                writeln!(out, "(no rows)")?;
            }
            Ok(0)
        }
        OutboxCommand::List { state, json, .. } => {
            let conn = list_connection(config)?;
            let rows = outbox::list(&conn, state.as_deref())?;
            if json {
                println!("{}", crate::terminal::pretty_json(&rows)?);
                return Ok(0);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>6}  {:<20} {:<16} {:<26} {:>10}  {:<9} {:>4}  LAST ERROR",
                "ID", "NEGOTIATION", "STATUS", "CHANGED AT", "CENTS", "STATE", "TRY"
            )?;
            for r in &rows {
                writeln!(
                    out,
                    "{:>6}  {:<20} {:<16} {:<26} {:>10}  {:<9} {:>4}  {}",
                    r.id,
                    crate::terminal::blank(&r.negotiation_id),
                    crate::terminal::blank(&r.status),
                    crate::terminal::blank(&r.partner_status_changed_at),
                    r.invoice_amount_in_cents
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                    crate::terminal::blank(&r.state),
                    r.attempts,
                    crate::terminal::blank(r.last_error.as_deref().unwrap_or(""))
                )?;
            }
            if rows.is_empty() {
                writeln!(out, "(no rows)")?;
            }
            Ok(0)
        }
        OutboxCommand::Retry {
            kind,
            ids,
            all_dead,
        } => {
            let mut conn = store::open_connection(config.database(), false)?;
            let now = crate::time::now();
            if all_dead {
                let ids = outbox::retry_all_dead(&conn, kind, &now)?;
                println!(
                    "{} dead rows of {} are pending again: {ids:?}",
                    ids.len(),
                    kind.table()
                );
                return Ok(0);
            }
            report_each(
                outbox::retry_dead(&mut conn, kind, &ids, &now)?,
                "pending again",
            )
        }
        OutboxCommand::Cancel { kind, ids } => {
            let mut conn = store::open_connection(config.database(), false)?;
            report_each(outbox::cancel(&mut conn, kind, &ids)?, "canceled")
        }
    }
}

/// `outbox list` reads the mirror without migrating it (like `status`).
fn list_connection(config: &Config) -> Result<rusqlite::Connection> {
    let (conn, version) = store::open_read_only(config.database())?;
    if let Some(n) = store::schema_note(config.database(), version) {
        eprintln!("leadsync: note: {n}");
    }
    Ok(conn)
}

fn report_each(results: Vec<(i64, std::result::Result<(), String>)>, done: &str) -> Result<u8> {
    let mut failed = false;
    for (id, r) in results {
        match r {
            Ok(()) => println!("row {id}: {done}"),
            Err(e) => {
                eprintln!("leadsync: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// The authorization code from `--code` or `--code-file` (`-`: standard input).
fn read_code(code: Option<Secret>, file: Option<&std::path::Path>) -> Result<Secret> {
    let text = match (code, file) {
        (Some(c), _) => c.expose().to_string(),
        (None, Some(p)) if p == std::path::Path::new("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("cannot read the code from standard input")?;
            s
        }
        (None, Some(p)) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the code file {}", p.display()))?,
        (None, None) => bail!("give the code with --code-file FILE (or - for stdin) or --code"),
    };
    let text = crate::secret::trim_secret(&text).to_string();
    if text.is_empty() {
        bail!("the authorization code is empty");
    }
    Ok(Secret::new(text))
}

/// Where `auth exchange` puts the grant.
enum ExchangeTarget {
    /// The chain of a configured business's refresh_token_file.
    Business(String),
    /// A new token file (onboarding).
    File(PathBuf),
}

async fn auth_exchange(
    config: Config,
    target: ExchangeTarget,
    code: &Secret,
    redirect_uri: &str,
    write_conf: Option<&std::path::Path>,
) -> Result<u8> {
    let mirror = {
        let path = config.database().to_path_buf();
        tokio::task::spawn_blocking(move || store::Store::open(&path)).await??
    };
    let auth = crate::app::open_auth_with(&config, Some(mirror), Default::default(), true)?;
    // Once the code is sent, the new grant's refresh token may be in this
    // process alone until the store takes it (its writes are retried for
    // seconds): SIGINT, SIGTERM and SIGHUP (an SSH session dropped) are held
    // until then, and end the exchange only before the code is sent.
    let interrupted = hold_signals(auth.stopping().clone())?;
    let result = match &target {
        ExchangeTarget::Business(b) => auth.exchange_code(b, code, redirect_uri).await,
        ExchangeTarget::File(f) => auth.exchange_code_into(f, code, redirect_uri).await,
    };
    auth.settle(settle_bound(&config)).await;
    let stored_then_interrupted = |file: &std::path::Path| {
        anyhow::anyhow!(
            "interrupted: the new grant is stored (token file {}, token store {}); no \
             configuration file was written: for each of the pro's businesses write a conf.d \
             file holding [[businesses]], its id and refresh_token_file = {} — do not run the \
             exchange again (the code is spent)",
            file.display(),
            config.file.oauth.token_store.display(),
            toml::Value::String(
                std::path::absolute(file)
                    .unwrap_or_else(|_| file.to_path_buf())
                    .display()
                    .to_string()
            )
        )
    };
    let interrupted_after_store = || match &target {
        ExchangeTarget::File(f) => stored_then_interrupted(f),
        ExchangeTarget::Business(_) => anyhow::anyhow!(
            "interrupted: the new grant is stored in {}; a running daemon picks it up at its \
             next sync — do not run the exchange again (the code is spent)",
            config.file.oauth.token_store.display()
        ),
    };
    let access = match result {
        // `context`, not a flattened message: exit_code_of reads the
        // error's type (a configuration error, a refused code).
        Err(e) if interrupted.load(Ordering::SeqCst) => return Err(e.context("interrupted")),
        Err(e) => return Err(e),
        Ok(_) if interrupted.load(Ordering::SeqCst) => return Err(interrupted_after_store()),
        Ok(access) => access,
    };
    let file = match &target {
        ExchangeTarget::Business(b) => match config.business(b).map(|b| &b.token) {
            Some(crate::config::TokenSource::Refresh(file)) => file.clone(),
            _ => bail!("business {b} has no refresh_token_file"),
        },
        ExchangeTarget::File(f) => f.clone(),
    };
    let sharing: Vec<&str> = config
        .businesses
        .iter()
        .filter(|b| matches!(&b.token, crate::config::TokenSource::Refresh(f) if *f == file))
        .map(|b| b.id.as_str())
        .collect();
    // Output only (a closed standard output must not panic before the
    // conf files are written): the grant is stored.
    let _ = writeln!(
        std::io::stdout(),
        "stored the new grant of {} in {}{}; a running daemon picks it up at its next sync",
        file.display(),
        config.file.oauth.token_store.display(),
        if sharing.is_empty() {
            String::new()
        } else {
            format!(" (configured businesses naming it: {})", sharing.join(", "))
        }
    );
    // The grant is stored: a signal now ends the business list at once
    // (its request may hang until the client's timeout). The conf files,
    // local and quick, are written whole once the list is read.
    let listed = tokio::select! {
        listed = auth.businesses_of(
            &config.file.api.base_url,
            &access,
            config.file.api.max_requests_per_second,
        ) => listed,
        () = auth.stopping().cancelled() => return Err(interrupted_after_store()),
    };
    // The grant is stored and the code spent: whatever fails from here
    // on exits as it would without it (never 1 for the list alone, which a
    // script would take for a failed exchange and retry with the spent
    // code, RFC 6749 §4.1.2), and the last line says what to do by hand.
    let token_file = toml::Value::String(
        std::path::absolute(&file)
            .unwrap_or_else(|_| file.clone())
            .display()
            .to_string(),
    );
    let (covered, complete) = match listed {
        Ok(listed) => {
            // Not `eprintln!`, which panics on a dead terminal: the grant
            // is stored, the conf files are still to be written.
            // Cleaned here too, whatever the note quotes from the server.
            for n in &listed.notes {
                let _ = writeln!(
                    std::io::stderr(),
                    "leadsync: warning: {}",
                    crate::terminal::blank(n)
                );
            }
            (listed.list, listed.complete)
        }
        Err(e) => {
            // The list's error may quote the server (a ProblemDetails
            // detail): one line, cleaned.
            let _ = writeln!(
                std::io::stderr(),
                "leadsync: warning: {}",
                crate::terminal::blank(&format!("{e:#}"))
            );
            if let Some(dir) = write_conf {
                let _ = writeln!(
                    std::io::stderr(),
                    "leadsync: WARNING: the business list could not be read (see above), so no \
                     configuration file was written: the grant IS stored — do not run the \
                     exchange again (the code is spent); write {} for each of the pro's \
                     businesses by hand, holding [[businesses]], id = \"<businessID>\" and \
                     refresh_token_file = {token_file}",
                    dir.join("<businessID>.toml").display(),
                );
            }
            return Ok(0);
        }
    };
    let code = match onboard_confs(
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        &covered,
        write_conf,
        &file,
        &config,
    ) {
        Ok(code) => code,
        // Printed here, not returned: the warning below stays the last line.
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "leadsync: error: {e:#}");
            1
        }
    };
    // Exit status unchanged (0 when every file listed was written): the
    // grant is stored and the code spent, so a script must not take a
    // partial list for a failed exchange and retry it. The last line says it.
    if !complete {
        let _ = writeln!(
            std::io::stderr(),
            "leadsync: WARNING: the business list may be incomplete (see above): the grant IS \
             stored — do not run the exchange again (the code is spent); add any business of \
             the pro's missing above by hand, naming refresh_token_file = {token_file}"
        );
    }
    Ok(code)
}

/// What `auth exchange` prints of the grant's businesses, and with
/// `--write-conf DIR` the `DIR/<id>.toml` it writes for each.
fn onboard_confs(
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
    covered: &[(String, Option<String>)],
    write_conf: Option<&std::path::Path>,
    file: &std::path::Path,
    config: &Config,
) -> Result<u8> {
    // Output only: a closed standard output (`| head -1`) must not stop
    // the files, written after the grant was stored (the code is spent).
    macro_rules! say {
        ($($t:tt)*) => {{
            let _ = writeln!($($t)*);
        }};
    }
    // A business listed twice is one business, and so are two ids of one
    // number (`0468`, `468`), as the configuration takes them.
    let mut seen = std::collections::HashMap::with_capacity(covered.len());
    let mut again = Vec::new();
    let covered: Vec<&(String, Option<String>)> = covered
        .iter()
        .filter(|(id, _)| match seen.entry(crate::config::id_number(id)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(id);
                true
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                if *o.get() != id {
                    again.push((id, *o.get()));
                }
                false
            }
        })
        .collect();
    say!(out, "the grant covers {} business(es):", covered.len());
    for (id, name) in &covered {
        // The server's text: no escape sequence reaches the terminal.
        say!(
            out,
            "  {}  {}",
            crate::terminal::blank(id),
            crate::terminal::blank(name.as_deref().unwrap_or(""))
        );
    }
    for (id, first) in again {
        say!(
            out,
            "  {}: listed again as {}, one business to the configuration (the same number)",
            crate::terminal::blank(id),
            crate::terminal::blank(first)
        );
    }
    let Some(dir) = write_conf else {
        return Ok(0);
    };
    // Absolute: a path in the file is relative to conf.d, not to where
    // this command ran.
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut failed = 0usize;
    for (id, name) in &covered {
        if id.is_empty() || !id.bytes().all(|c| c.is_ascii_digit()) {
            say!(
                err,
                "leadsync: warning: skipping business id {id:?}: not a string of digits"
            );
            continue;
        }
        let path = dir.join(format!("{id}.toml"));
        if let Some(b) = config.business_of_number(id) {
            // Named as configured when that is another spelling of the id.
            let as_configured = if b.id == **id {
                String::new()
            } else {
                format!(" as {}", b.id)
            };
            match &b.token {
                crate::config::TokenSource::Refresh(f)
                    if crate::thumbtack::auth::grant_key(f)
                        != crate::thumbtack::auth::grant_key(&file) =>
                {
                    say!(
                        out,
                        "  {id} is configured already{as_configured}, on another grant (refresh_token_file = {}): \
                         no file written, and it keeps that grant; to move it to this one, set its \
                         refresh_token_file to {}",
                        f.display(),
                        file.display()
                    )
                }
                crate::config::TokenSource::Static(f) => say!(
                    out,
                    "  {id} is configured already{as_configured}, with access_token_file = {}: no file written; \
                     to use this grant, replace that key with refresh_token_file = {}",
                    f.display(),
                    file.display()
                ),
                _ => say!(
                    out,
                    "  {id} is configured already{as_configured}: no file written"
                ),
            }
            continue;
        }
        // `symlink_metadata`: a dangling link counts as existing.
        if std::fs::symlink_metadata(&path).is_ok() {
            say!(out, "  {} exists: left as it is", path.display());
            continue;
        }
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut text = format!(
            "# Written by `leadsync auth exchange` at {}: one grant covers the businesses\n\
             # naming the same refresh_token_file.\n[[businesses]]\nid = {}\n",
            crate::time::now(),
            quote(id)
        );
        if let Some(n) = name {
            text.push_str(&format!("name = {}\n", quote(n)));
        }
        text.push_str(&format!(
            "refresh_token_file = {}\n",
            quote(&file.display().to_string())
        ));
        // One file that cannot be written (a name too long for the file
        // system, a full disk) does not keep the others from theirs.
        match write_new_file(&path, &text) {
            Ok(true) => say!(out, "  wrote {}", path.display()),
            Ok(false) => say!(out, "  {} exists: left as it is", path.display()),
            Err(e) => {
                failed += 1;
                say!(
                    err,
                    "leadsync: error: cannot write {}: {e:#}",
                    path.display()
                );
            }
        }
    }
    if failed > 0 {
        say!(
            err,
            "leadsync: error: {failed} configuration file(s) not written; the grant is stored: \
             write each by hand ([[businesses]], its id, refresh_token_file = {}) — do not run \
             the exchange again (the code is spent)",
            toml::Value::String(file.display().to_string())
        );
        return Ok(1);
    }
    say!(out, "then: systemctl reload leadsync");
    Ok(0)
}

/// Whether a new file can be created in `dir`, and linked to another name
/// as `write_new_file` does: asked before the single-use code is spent,
/// whose configuration files could otherwise not be written. Its names
/// are this run's own (a leftover of an earlier run is not in the way).
fn probe_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let probe = dir.join(format!(".leadsync-probe-{}-{nanos}", std::process::id()));
    let linked = dir.join(format!(
        ".leadsync-probe-{}-{nanos}.link",
        std::process::id()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    let link = std::fs::hard_link(&probe, &linked);
    let _ = std::fs::remove_file(&linked);
    let removed = std::fs::remove_file(&probe);
    link.map_err(|e| std::io::Error::new(e.kind(), format!("cannot link a file there: {e}")))?;
    removed
}

/// Creates `path` with `text`, complete or not at all (a reload never reads
/// half a file) and never over anything there — a file, or a link, which
/// is not followed. Ok(false) when something is there.
fn write_new_file(path: &std::path::Path, text: &str) -> Result<bool> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.leadsync-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> std::io::Result<bool> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        // link(2) fails on an existing destination, even a dangling link.
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let wrote = result?;
    if wrote {
        // The new name survives a power loss (the exchange cannot be run
        // again to write it); best effort: the file is there now.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(directory = %dir.display(), error = %e,
                "cannot sync the configuration directory: a power loss now could lose {}",
                path.display());
        }
    }
    Ok(wrote)
}

/// How long a command waits at its end for token refreshes in flight.
pub fn settle_bound(config: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(config.file.api.timeout_secs) * 3
        + std::time::Duration::from_secs(1)
}

/// `--client-id`/`--client-secret`: not empty, no whitespace at either end
/// (the secret file the fixture writes is read trimmed).
fn credential(v: &str) -> Result<String, String> {
    if v.is_empty() || v.trim() != v {
        return Err("must not be empty nor begin or end with whitespace".into());
    }
    Ok(v.to_string())
}

/// `--next-host`: `host` or `host:port`, the host of letters, digits, `.`
/// and `-` (it is pasted into `next` URLs).
fn host_port(v: &str) -> Result<String, String> {
    let (host, port) = match v.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (v, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    if !host_ok || !port_ok {
        return Err("expected host[:port] (letters, digits, '.', '-'; a port up to 65535)".into());
    }
    Ok(v.to_string())
}

/// `--token-fail`: `0` (a dropped connection) or an HTTP status 100–599.
fn token_fail_status(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(s) if s == 0 || (100..=599).contains(&s) => Ok(s),
        _ => Err("expected 0 (drop the connection) or an HTTP status 100-599".into()),
    }
}

async fn sandbox(args: SandboxArgs) -> Result<u8> {
    if args.next_host.is_some()
        && !matches!(args.pagination, Pagination::Next | Pagination::NextToken)
    {
        anyhow::bail!(
            "--next-host applies to --pagination next or next-token only (other styles name no next URL)"
        );
    }
    let options = SandboxOptions {
        listen: args.listen,
        seed: args.seed,
        businesses: args.businesses,
        leads_per_business: args.leads_per_business,
        max_page_size: args.max_page_size,
        access_token_ttl_secs: args.token_ttl_secs,
        client_id: args.client_id,
        client_secret: args.client_secret,
        faults: Faults {
            latency_ms: args.latency_ms,
            error_5xx: args.error_rate,
            rate_429: args.rate_429,
            retry_after_secs: args.retry_after_secs,
            waf_202: args.rate_202,
            timeout: args.timeout_rate,
            timeout_ms: args.timeout_ms,
            reset: args.reset_rate,
            lose_after_accept: args.lose_after_accept_rate,
            cut_body_after_accept: args.cut_body_after_accept_rate,
            malformed: args.malformed_rate,
            redirect: args.redirect_rate,
            html_404: args.html_404_rate,
            webhook_twice: args.webhook_twice,
            webhook_out_of_order: args.webhook_out_of_order,
            next_host: args.next_host,
            ignore_offset: args.ignore_offset,
            no_limit_echo: args.no_limit_echo,
            ..Faults::default()
        },
        pagination: args.pagination,
        shape: args.shape,
        webhook_concurrency: args.webhook_concurrency,
    };
    let sandbox = Sandbox::start(options).await?;
    sandbox.set_token_faults(crate::sandbox::TokenFaults {
        invalid_client: args.token_invalid_client,
        proxy_oauth_failed: args.token_proxy_oauth_failed,
        client_error: args.token_error,
        before_rotate: args.token_fail,
        hold_after_rotate_ms: args.token_hold_ms,
        grace_secs: args.token_grace_secs,
        ..Default::default()
    });
    for id in &args.refuse {
        sandbox.refuse(id);
    }
    println!(
        "sandbox listening on {} ({} pagination, {} lead shape)",
        sandbox.base_url(),
        args.pagination
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        args.shape
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    );
    println!("  token endpoint: {}", sandbox.token_url());
    let (client_id, client_secret) = sandbox.client_credentials();
    println!("  OAuth client: {client_id} / {client_secret}");
    for b in sandbox.businesses() {
        println!("  business {} ({}): {} leads", b.id, b.name, b.leads);
    }
    if let Some(dir) = &args.write_config {
        let path = sandbox.write_fixture(dir, !args.static_tokens)?;
        println!("  configuration written: {}", path.display());
        println!("  try: leadsync --config {} sync --full", path.display());
    }
    println!(
        "  inspect: GET {}/_sandbox/deliveries, /_sandbox/webhook-deliveries, /_sandbox/stats; stop with Ctrl-C",
        sandbox.base_url()
    );
    std::io::stdout().flush()?;
    let stop = stop_on_signal()?;
    stop.cancelled().await;
    sandbox.stop().await;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn onboard(
        covered: &[(&str, Option<&str>)],
        dir: &std::path::Path,
    ) -> (Result<u8>, String, String) {
        onboard_with("", covered, dir)
    }

    fn onboard_with(
        conf: &str,
        covered: &[(&str, Option<&str>)],
        dir: &std::path::Path,
    ) -> (Result<u8>, String, String) {
        let covered: Vec<(String, Option<String>)> = covered
            .iter()
            .map(|(i, n)| (i.to_string(), n.map(str::to_string)))
            .collect();
        let file: crate::config::FileConfig = toml::from_str(conf).unwrap();
        let config = Config::from_file_config(file).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = onboard_confs(
            &mut out,
            &mut err,
            &covered,
            Some(dir),
            std::path::Path::new("/etc/leadsync/tokens/pro-1"),
            &config,
        );
        let s = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (r, s(out), s(err))
    }

    #[test]
    fn server_written_business_names_print_without_control_characters() {
        // A name is the pro's own text, from the server: an escape sequence
        // in it would drive the operator's terminal, a line break forge a
        // line of output.
        let dir = tempfile::tempdir().unwrap();
        let (r, out, _) = onboard(
            &[("11", Some("Pro\x1b]0;pwned\x07\n  wrote /etc/x"))],
            dir.path(),
        );
        assert_eq!(r.unwrap(), 0);
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
        assert!(!out.contains("\n  wrote /etc/x"), "{out:?}");
    }

    #[test]
    fn two_spellings_of_one_number_in_the_list_are_one_business_said_so() {
        // `468` and `0468` are one business to the configuration: one file,
        // and a line naming the spelling left out rather than silence.
        let dir = tempfile::tempdir().unwrap();
        let (r, out, _) = onboard(&[("468", Some("A")), ("0468", Some("B"))], dir.path());
        assert_eq!(r.unwrap(), 0);
        assert!(out.contains("covers 1 business"), "{out}");
        assert!(out.contains("0468: listed again as 468"), "{out}");
        assert!(dir.path().join("468.toml").is_file(), "{out}");
        assert!(!dir.path().join("0468.toml").exists(), "{out}");
    }

    #[test]
    fn a_written_conf_holds_the_name_as_given_and_nothing_else() {
        // TOML-special characters in a server-written name must not add keys.
        let dir = tempfile::tempdir().unwrap();
        let name = "x\"\nenabled = false\n[oauth]\nclient_id = 'evil' # \\";
        let (r, _, _) = onboard(&[("11", Some(name))], dir.path());
        assert_eq!(r.unwrap(), 0);
        let text = std::fs::read_to_string(dir.path().join("11.toml")).unwrap();
        let v: toml::Table = text.parse().unwrap();
        assert_eq!(v.keys().collect::<Vec<_>>(), ["businesses"], "{text}");
        let b = &v["businesses"][0];
        assert_eq!(b["name"].as_str(), Some(name));
        assert_eq!(b.as_table().unwrap().len(), 3, "{text}");
    }

    #[test]
    fn a_business_configured_on_another_grant_is_said_to_keep_it() {
        // Re-authorizing a pro into a new token file leaves a configured
        // business on its old grant (maybe the one needing re-authorization):
        // "configured already" alone hid that.
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old-grant");
        std::fs::write(&old, "t\n").unwrap();
        let conf = format!(
            "[oauth]\nclient_id = \"c\"\n[[businesses]]\nid = \"11\"\nrefresh_token_file = {:?}\n",
            old.display().to_string()
        );
        let (r, out, _) = onboard_with(&conf, &[("11", None)], dir.path());
        assert_eq!(r.unwrap(), 0);
        assert!(out.contains("another grant"), "{out}");
        assert!(out.contains(&old.display().to_string()), "{out}");
        assert!(!dir.path().join("11.toml").exists());
    }

    #[test]
    fn a_business_listed_twice_gets_one_file_and_no_false_exists_message() {
        let dir = tempfile::tempdir().unwrap();
        let (r, out, _) = onboard(&[("11", None), ("11", None)], dir.path());
        assert_eq!(r.unwrap(), 0);
        assert_eq!(out.matches("wrote").count(), 1, "{out}");
        assert!(!out.contains("exists"), "{out}");
    }

    #[test]
    fn a_conf_file_that_cannot_be_written_does_not_stop_the_others() {
        // Too long a name for the file system (the server chose the id):
        // the other businesses still get theirs, and the command fails.
        let dir = tempfile::tempdir().unwrap();
        let long = "9".repeat(300);
        let (r, out, err) = onboard(&[(&long, None), ("22", None)], dir.path());
        assert!(dir.path().join("22.toml").is_file(), "{out}{err}");
        assert_eq!(r.unwrap(), 1, "{out}{err}");
        assert!(err.contains(&long[..20]), "{err}");
    }

    /// Standard output piped into `head -1`: closed after the first line.
    struct Closed(usize);
    impl std::io::Write for Closed {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.0 -= 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_standard_output_does_not_stop_the_conf_files() {
        // `auth exchange --write-conf DIR | head -1`: the grant is stored,
        // but the listing's failed write stopped before any file was written.
        let dir = tempfile::tempdir().unwrap();
        let covered = vec![("11".to_string(), None), ("22".to_string(), None)];
        let config = Config::from_file_config(toml::from_str("").unwrap()).unwrap();
        let mut err = Vec::new();
        let r = onboard_confs(
            &mut Closed(1),
            &mut err,
            &covered,
            Some(dir.path()),
            std::path::Path::new("/etc/leadsync/tokens/pro-1"),
            &config,
        );
        assert_eq!(r.unwrap(), 0, "{}", String::from_utf8_lossy(&err));
        assert!(dir.path().join("11.toml").is_file());
        assert!(dir.path().join("22.toml").is_file());
    }

    #[test]
    fn format_characters_are_neutralised_in_server_text() {
        // A bidi override (U+202E) or an isolate reorders what follows it on
        // the terminal: a name could make an id read as another.
        for c in [
            '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200b}', '\u{feff}',
        ] {
            let p = crate::terminal::blank(&format!("Pro{c}11"));
            assert!(!p.contains(c), "{:?}", p);
        }
        assert_eq!(
            crate::terminal::blank("Ökologische Gärten"),
            "Ökologische Gärten"
        );
    }

    #[test]
    fn line_and_paragraph_separators_are_neutralised_in_server_text() {
        // U+2028/U+2029 (Zl/Zp: neither control nor format) break the line
        // on some terminals: a name could print a line of its own.
        for c in ['\u{2028}', '\u{2029}'] {
            let p = crate::terminal::blank(&format!("Pro{c}  wrote /etc/x"));
            assert!(!p.contains(c), "{:?}", p);
        }
    }

    #[test]
    fn a_leftover_probe_file_does_not_fail_the_directory_probe() {
        // A probe named by pid alone collided with a leftover of an earlier
        // run that had the same pid (killed between create and remove).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path()
                .join(format!(".leadsync-probe-{}", std::process::id())),
            "",
        )
        .unwrap();
        probe_dir(dir.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the probe removes its own files only");
    }

    #[test]
    fn the_code_never_prints_in_debug() {
        let cli = Cli::parse_from([
            "leadsync",
            "auth",
            "exchange",
            "--business",
            "1",
            "--code",
            "code-secret-77",
            "--redirect-uri",
            "https://x/cb",
        ]);
        let d = format!("{cli:?}");
        assert!(!d.contains("code-secret-77"), "{d}");
    }
}
