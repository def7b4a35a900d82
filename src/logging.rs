//! Logs: `tracing` to stderr, one event per line; no timestamps of our own
//! under journald (`JOURNAL_STREAM`), which adds its own; JSON on request.

use crate::cli::LogFormat;
use std::io::IsTerminal;
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

/// Installs the global subscriber. The level comes from `LEADSYNC_LOG`
/// (env-filter syntax, e.g. `debug` or `leadsync=debug`), else `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = match std::env::var("LEADSYNC_LOG") {
        Ok(spec) => EnvFilter::try_new(with_quiet_dependencies(&spec)).unwrap_or_else(|e| {
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
