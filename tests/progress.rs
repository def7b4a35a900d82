//! A long `sync --full` shows its progress on a terminal, and stays quiet
//! when stderr is not a terminal (as under journald).

mod common;

use common::{Env, FAST, bin, text};
use leadsync::sandbox::{Faults, SandboxOptions};
use std::process::Command;

async fn slow_env() -> Env {
    Env::new(
        SandboxOptions {
            businesses: 2,
            leads_per_business: 400,
            faults: Faults {
                latency_ms: 40,
                ..Faults::default()
            },
            ..SandboxOptions::default()
        },
        false,
        FAST,
    )
    .await
}

/// Runs `sync --full` under `script`, which gives it a pseudo-terminal.
fn sync_on_a_terminal(env: &Env, journald: bool) -> Option<String> {
    let mut cmd = format!("{}", bin().display());
    for f in env.config_files() {
        cmd.push_str(&format!(" --config {}", f.display()));
    }
    cmd.push_str(" sync --full");
    let mut script = Command::new("script");
    script
        .args(["-qefc", &cmd, "/dev/null"])
        .env("LEADSYNC_LOG", "warn");
    if journald {
        script.env("JOURNAL_STREAM", "8:12345");
    } else {
        script.env_remove("JOURNAL_STREAM");
    }
    let out = script.output().ok()?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    Some(text(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_full_sync_shows_progress_on_a_terminal_only() {
    let env = slow_env().await;
    let Some(shown) = sync_on_a_terminal(&env, false) else {
        eprintln!("`script` (util-linux) is not installed: the terminal case is not checked");
        return;
    };
    assert!(
        shown.contains("pages") && shown.contains("leads/s") && shown.contains("businesses done"),
        "no progress line on a terminal:\n{shown}"
    );
    assert!(shown.contains(": ok — full scan"), "{shown}");

    // A terminal whose shell inherited JOURNAL_STREAM from a service (a
    // terminal emulator started by the user manager): stderr is the terminal,
    // not that journal stream, so the progress still shows (systemd.exec(5):
    // compare the variable with stderr's device and inode).
    let inherited = sync_on_a_terminal(&env, true).unwrap_or_default();
    assert!(inherited.contains("leads/s"), "{inherited}");

    // Not a terminal: quiet.
    let out = env
        .cli()
        .env("LEADSYNC_LOG", "warn")
        .env_remove("JOURNAL_STREAM")
        .args(["sync", "--full"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let all = text(&out);
    assert!(!all.contains("leads/s") && !all.contains('\r'), "{all}");
}
