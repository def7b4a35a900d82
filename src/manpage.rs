//! `leadsync man`: one man page, generated from the clap definitions, with
//! every command's synopsis and options, exit status, files and environment.

use clap::CommandFactory;
use clap_mangen::Man;
use std::io::Write;

/// The roff source of `leadsync(1)`.
pub fn render() -> std::io::Result<Vec<u8>> {
    let cmd = crate::cli::Cli::command();
    let man = Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    writeln!(out, ".SH COMMANDS")?;
    for (path, sub) in leaves(&cmd, "leadsync") {
        // Each command's own synopsis and options, as a subsection.
        let mut part = Vec::new();
        let m = Man::new(sub.clone().bin_name(path.clone()));
        writeln!(part, ".SS \"{path}\"")?;
        if let Some(about) = sub.get_about() {
            writeln!(part, "{}", escape(&about.to_string()))?;
            writeln!(part, ".PP")?;
        }
        m.render_synopsis_section(&mut part)?;
        m.render_options_section(&mut part)?;
        let text = String::from_utf8_lossy(&part)
            .replace(".SH SYNOPSIS\n", "")
            .replace(".SH OPTIONS\n", ".PP\nOptions:\n");
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(TAIL.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// Every runnable command under `cmd`, with its full name (`leadsync outbox retry`).
fn leaves(cmd: &clap::Command, prefix: &str) -> Vec<(String, clap::Command)> {
    let mut found = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let path = format!("{prefix} {}", sub.get_name());
        if sub.has_subcommands() {
            found.extend(leaves(sub, &path));
        } else {
            found.push((path, sub.clone()));
        }
    }
    found
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('-', "\\-")
}

const TAIL: &str = r#".SH EXIT STATUS
.TP
0
Success.
.TP
78
The configuration is invalid or missing (EX_CONFIG); the message names the file and the key. Also a database written by a newer leadsync: neither is fixed by a restart.
.TP
1
Any other failure: a sync where some business failed, a drain where some row was not sent, a rejected enqueue.
.SH ENVIRONMENT
.TP
LEADSYNC_<KEY>
Overrides a configuration key, with __ for nesting (LEADSYNC_OUTBOX__CONCURRENCY=8, LEADSYNC_OAUTH__CLIENT_SECRET).
.TP
LEADSYNC_LOG
The log level (env\-filter syntax: debug, leadsync=debug).
.TP
LEADSYNC_LOG_FORMAT
text or json.
.TP
CREDENTIALS_DIRECTORY
Where systemd's LoadCredential= puts client_secret.
.SH FILES
.TP
/etc/leadsync/leadsync.toml, /etc/leadsync/conf.d/*.toml
The configuration, read in this order.
.TP
/var/lib/leadsync/leadsync.db
The mirror (SQLite, WAL): negotiations, outbox and the other tables users read and write.
.TP
/var/lib/leadsync/private/
The token store's directory (rotated refresh tokens; mode 0700; never in a backup).
.SH SEE ALSO
sqlite3(1), systemctl(1), journalctl(1); /usr/share/doc/leadsync/README.md
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn every_command_has_a_subsection() {
        let page = String::from_utf8(super::render().unwrap()).unwrap();
        for name in [
            "leadsync sync",
            "leadsync outbox retry",
            "leadsync backup",
            "leadsync config check",
        ] {
            assert!(page.contains(&format!(".SS \"{name}\"")), "{name}\n{page}");
        }
        assert!(page.contains("\\-\\-force"), "{page}");
    }
}
