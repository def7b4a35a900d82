//! Logs: `tracing` to stderr, one event per line; no timestamps of our own
//! under journald (`JOURNAL_STREAM`), which adds its own; JSON on request.

use crate::cli::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Dependencies are quiet unless asked for by name in `LEADSYNC_LOG`.
const QUIET_DEPENDENCIES: &str = "hyper=warn,hyper_util=warn,reqwest=warn,rustls=warn";

/// Installs the global subscriber. The level comes from `LEADSYNC_LOG`
/// (env-filter syntax, e.g. `debug` or `leadsync=debug`), else `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = match std::env::var("LEADSYNC_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("leadsync: LEADSYNC_LOG={spec:?} is not a valid filter ({e}); using {default_level:?}");
            EnvFilter::new(format!("{default_level},{QUIET_DEPENDENCIES}"))
        }),
        Err(_) => EnvFilter::new(format!("{default_level},{QUIET_DEPENDENCIES}")),
    };
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false);
    let _ = match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
