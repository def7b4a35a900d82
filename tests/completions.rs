//! `leadsync completions SHELL` and `leadsync man`, generated from the
//! command definitions.

mod common;

use common::{bin, text};
use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run leadsync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn completions_for_bash_zsh_and_fish_generate() {
    for (shell, marker) in [
        ("bash", "complete -F _leadsync"),
        ("zsh", "#compdef leadsync"),
        ("fish", "complete -c leadsync"),
    ] {
        let (code, out) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}");
        assert!(out.contains(marker), "{shell}: no {marker:?} in\n{out}");
        // Subcommands and their options are in every script.
        for word in ["backup", "outbox", "business", "force", "full"] {
            assert!(out.contains(word), "{shell}: {word} missing");
        }
    }
    let out = Command::new(bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn bash_accepts_its_completion_script() {
    let (_, script) = run(&["completions", "bash"]);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("leadsync.bash");
    std::fs::write(&path, script).expect("write");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p leadsync", path.display()))
        .output();
    match out {
        Ok(out) => assert!(out.status.success(), "{}", text(&out)),
        Err(e) => eprintln!("bash is not available ({e}); syntax not checked"),
    }
}

#[test]
fn the_man_page_is_roff_with_every_command() {
    let (code, out) = run(&["man"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(".ie") || out.contains(".TH leadsync 1"),
        "{out}"
    );
    assert!(out.contains(".TH leadsync 1"), "{out}");
    for word in ["backup", "completions", "sync", "enqueue", "status"] {
        assert!(out.contains(word), "{word} missing from the man page");
    }
}
