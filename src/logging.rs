//! Logs: `tracing` to stderr, one event per line; no timestamps of our own
//! under journald (stderr is the stream `JOURNAL_STREAM` names), which adds
//! its own; JSON on request.

use crate::cli::LogFormat;
use std::io::{IsTerminal, Write};
use tracing_subscriber::EnvFilter;

/// Dependencies are quiet unless asked for by name in `LEADSYNC_LOG`.
const QUIET_DEPENDENCIES: &str = "hyper=warn,hyper_util=warn,reqwest=warn,rustls=warn";

/// `LEADSYNC_LOG` plus the dependency-noise filter for every crate it does not name.
fn with_quiet_dependencies(spec: &str) -> String {
    let mut full = spec.to_string();
    for directive in QUIET_DEPENDENCIES.split(',') {
        let krate = directive.split('=').next().unwrap_or(directive);
        if !spec.contains(krate) {
            full.push(',');
            full.push_str(directive);
        }
    }
    full
}

/// True when stderr is the journal stream `JOURNAL_STREAM` names
/// (`DEVICE:INODE`). The variable alone is not enough: it is inherited by
/// every child of a service, e.g. a shell in a terminal emulator the user
/// manager started, whose stderr is a terminal (systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = named.to_str().and_then(|s| s.trim().split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Installs the global subscriber. The level comes from `LEADSYNC_LOG`
/// (env-filter syntax, e.g. `debug` or `leadsync=debug`), else `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = match std::env::var("LEADSYNC_LOG") {
        Ok(spec) => EnvFilter::try_new(with_quiet_dependencies(&spec)).unwrap_or_else(|e| {
            let _ = writeln!(
                std::io::stderr(),
                "leadsync: LEADSYNC_LOG={spec:?} is not a valid filter ({e}); using {default_level:?}"
            );
            EnvFilter::new(format!("{default_level},{QUIET_DEPENDENCIES}"))
        }),
        Err(_) => EnvFilter::new(format!("{default_level},{QUIET_DEPENDENCIES}")),
    };
    let journald = stderr_is_journal();
    // `log_internal_errors(false)`: tracing-subscriber otherwise reports a
    // failed stderr write (a closed pipe, a dead SSH terminal: EPIPE, EIO)
    // with `eprintln!`, which panics — in `auth exchange` that was before
    // the spent code's grant reached the store, and in the daemon it ends
    // a sync. A log line that cannot be written is dropped.
    let builder = tracing_subscriber::fmt()
        .log_internal_errors(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_keeps_the_dependency_filter_unless_a_crate_is_named() {
        let f = with_quiet_dependencies("trace");
        assert!(f.starts_with("trace,") && f.contains("hyper=warn") && f.contains("reqwest=warn"));
        let f = with_quiet_dependencies("debug,reqwest=trace");
        assert!(
            f.contains("hyper=warn") && !f.contains("reqwest=warn"),
            "{f}"
        );
    }
}
