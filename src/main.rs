//! The `leadsync` binary: parses the command line and hands over to the library.

use clap::Parser;
use leadsync::cli::{Cli, EXIT_CONFIG, execute, exit_code_of};
use std::io::Write;
use std::process::ExitCode;

/// `println!` panics when stdout's reader has gone away (`leadsync status |
/// head`): that ends the process with exit 1 (SPEC §1: any other failure),
/// quietly, as a writer killed by SIGPIPE would, instead of a panic message
/// and 101. Every other panic is reported as before.
fn exit_quietly_on_broken_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // EPIPE is 32 on Linux.
        if message.starts_with("failed printing to stdout: ") && message.ends_with("(os error 32)")
        {
            std::process::exit(1);
        }
        report(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_stdout();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not failures; SPEC §1 has no usage code: 1.
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    leadsync::logging::init(cli.log_format, cli.command.default_log_level());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "leadsync: error: cannot start the async runtime: {e}"
            );
            return ExitCode::from(1);
        }
    };
    let demo = matches!(cli.command, leadsync::cli::Command::Demo { .. });
    let result = runtime.block_on(execute(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if demo {
        leadsync::demo::remove_private_dir();
    }
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit_code_of(&e);
            // 78 also covers a database from a newer leadsync, which is no
            // configuration error.
            let config = e
                .chain()
                .any(|c| c.downcast_ref::<leadsync::config::ConfigError>().is_some());
            let what = if code == EXIT_CONFIG && config {
                "configuration error"
            } else {
                "error"
            };
            // Not `eprintln!`, which panics (exit 101) on a dead terminal:
            // the exit code still says what happened.
            // Each line of the chain is cleaned here, where it is shown, its
            // line breaks kept (leadsync's own messages of several lines):
            // server text never brings one, as an `ApiError` displays as one
            // cleaned line (its stored `.message` keeps the text as sent).
            let _ = writeln!(
                std::io::stderr(),
                "leadsync: {what}: {}",
                leadsync::terminal::safe_lines(
                    &format!("{e:#}"),
                    leadsync::terminal::Unsafe::Blank
                )
            );
            ExitCode::from(code)
        }
    }
}
