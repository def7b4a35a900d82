//! Configuration errors exit 78 naming the file and the key; overrides
//! layer as SPEC §2 says; secrets are never printed.

mod common;

use common::{bin, text, write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Dir {
    dir: tempfile::TempDir,
    token: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        let token = write(
            dir.path(),
            "tokens/468046965846925323",
            "sbx_static_secret_token_value\n",
        );
        // As a secret should be (a looser one draws a warning).
        chmod(&token, 0o600);
        Dir { dir, token }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A valid base configuration using a static token.
    fn base(&self) -> String {
        format!(
            "database = \"{db}\"\n\n[[businesses]]\nid = \"468046965846925323\"\nname = \"Robert's Remodeling\"\naccess_token_file = \"{t}\"\n",
            db = self.path().join("m.db").display(),
            t = self.token.display()
        )
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        write(self.path(), name, content)
    }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn check(files: &[&Path], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    for f in files {
        c.arg("--config").arg(f);
    }
    c.args(["config", "check"]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.env_remove("CREDENTIALS_DIRECTORY");
    c.output().unwrap()
}

/// Asserts exit 78 and that the message names everything in `needles`.
fn assert_config_error(o: &Output, needles: &[&str]) {
    let t = text(o);
    assert_eq!(
        o.status.code(),
        Some(78),
        "expected exit 78, got {:?}:\n{t}",
        o.status.code()
    );
    for n in needles {
        assert!(t.contains(n), "message should name {n:?}:\n{t}");
    }
}

#[test]
fn a_valid_configuration_is_printed_with_defaults() {
    let d = Dir::new();
    let f = d.file("a.toml", &d.base());
    let o = check(&[&f], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("configuration is valid"), "{t}");
    assert!(t.contains("concurrency = 4"), "defaults are shown: {t}");
    assert!(t.contains("schedule = \"0 */5 * * * *\""), "{t}");
    assert!(t.contains("468046965846925323"), "{t}");
}

#[test]
fn unknown_keys_are_refused_at_every_level() {
    let d = Dir::new();
    let top = d.file("top.toml", &format!("databse = \"x\"\n{}", d.base()));
    assert_config_error(
        &check(&[&top], &[]),
        &["top.toml", "databse", "unknown key"],
    );

    let section = d.file(
        "section.toml",
        &format!("{}\n[outbox]\nconcurency = 3\n", d.base()),
    );
    assert_config_error(
        &check(&[&section], &[]),
        &["section.toml", "outbox.concurency"],
    );

    let business = d.file("business.toml", &format!("{}enabeld = false\n", d.base()));
    assert_config_error(
        &check(&[&business], &[]),
        &["business.toml", "businesses.0.enabeld"],
    );
}

#[test]
fn wrong_types_and_syntax_errors_name_the_place() {
    let d = Dir::new();
    let wrong = d.file(
        "wrong.toml",
        &format!("{}\n[outbox]\nconcurrency = \"many\"\n", d.base()),
    );
    assert_config_error(
        &check(&[&wrong], &[]),
        &["wrong.toml", "outbox.concurrency", "many"],
    );

    let broken = d.file(
        "broken.toml",
        "database = \"x\"\n[outbox\nconcurrency = 3\n",
    );
    assert_config_error(&check(&[&broken], &[]), &["broken.toml", "line 2"]);
}

#[test]
fn business_ids_must_be_digits_and_unique_across_files() {
    let d = Dir::new();
    let bad = d.file(
        "bad.toml",
        &d.base()
            .replace("id = \"468046965846925323\"", "id = \"abc-123\""),
    );
    assert_config_error(
        &check(&[&bad], &[]),
        &["bad.toml", "businesses.0.id", "abc-123", "digits"],
    );

    // conf.d style: each file adds a business; the same id twice is an error naming the second file.
    let first = d.file("conf.d/10-first.toml", &d.base());
    let second = d.file(
        "conf.d/20-second.toml",
        &format!(
            "[[businesses]]\nid = \"468046965846925323\"\naccess_token_file = \"{}\"\n",
            d.token.display()
        ),
    );
    // Review (conf): the key is the one in that file (`businesses.0`, its
    // first entry), not the position among all files' entries
    // (`businesses.1`), which a file of one entry does not have.
    assert_config_error(
        &check(&[&first, &second], &[]),
        &[
            "20-second.toml: key `businesses.0.id`",
            "twice",
            "10-first.toml: key `businesses.0.id`",
        ],
    );
    // So do figment's own errors (unknown keys, wrong types).
    let typo = d.file(
        "conf.d/30-typo.toml",
        &format!(
            "[[businesses]]\nid = \"468046965846925324\"\naccess_token_file = \"{t}\"\n\
             [[businesses]]\nid = \"468046965846925325\"\nacess_token_file = \"{t}\"\n",
            t = d.token.display()
        ),
    );
    assert_config_error(
        &check(&[&first, &typo], &[]),
        &[
            "30-typo.toml: key `businesses.1.acess_token_file`",
            "unknown key",
        ],
    );
}

#[test]
fn business_ids_that_are_the_same_number_are_duplicates() {
    // Review (conf): `0468…` in one conf.d file and `468…` in another
    // were two businesses, though Thumbtack's ids are int64 numbers: the
    // same pro synced twice under two ids in the mirror.
    let d = Dir::new();
    let first = d.file("conf.d/10-first.toml", &d.base());
    let second = d.file(
        "conf.d/20-second.toml",
        &format!(
            "[[businesses]]\nid = \"0468046965846925323\"\naccess_token_file = \"{}\"\n",
            d.token.display()
        ),
    );
    assert_config_error(
        &check(&[&first, &second], &[]),
        &[
            "20-second.toml",
            "twice",
            "10-first.toml",
            "same number",
            "likely the same business",
            "leading zeros",
        ],
    );
    // Distinct numbers stay distinct, a single leading-zero id stays valid,
    // with a warning (review, conf 2nd): webhooks and the API likely name
    // it without the zeros.
    let third = d.file(
        "conf.d/30-third.toml",
        &format!(
            "[[businesses]]\nid = \"0468046965846925324\"\naccess_token_file = \"{}\"\n",
            d.token.display()
        ),
    );
    let o = check(&[&first, &third], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("warning")
            && text(&o).contains("0468046965846925324")
            && text(&o).contains("leading zero"),
        "{}",
        text(&o)
    );
    let o = check(&[&first], &[]);
    assert!(!text(&o).contains("leading zero"), "{}", text(&o));
}

#[test]
fn cron_expressions_are_checked_and_five_fields_accepted() {
    let d = Dir::new();
    let bad = d.file(
        "cron.toml",
        &format!("{}\n[poll]\nschedule = \"0 */5 * * * * * *\"\n", d.base()),
    );
    assert_config_error(&check(&[&bad], &[]), &["cron.toml", "poll.schedule"]);

    let bad_value = d.file(
        "cron2.toml",
        &format!("{}\n[poll]\nfull_schedule = \"0 61 * * * *\"\n", d.base()),
    );
    assert_config_error(
        &check(&[&bad_value], &[]),
        &["cron2.toml", "poll.full_schedule"],
    );

    let per_business = d.file(
        "cron3.toml",
        &format!("{}schedule = \"every day\"\n", d.base()),
    );
    assert_config_error(
        &check(&[&per_business], &[]),
        &["cron3.toml", "businesses.0.schedule"],
    );

    let five = d.file(
        "five.toml",
        &format!("{}\n[poll]\nschedule = \"*/10 * * * *\"\n", d.base()),
    );
    let o = check(&[&five], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("schedule = \"0 */10 * * * *\""),
        "{}",
        text(&o)
    );
}

/// A schedule that parses but never fires (February 30th, April 31st)
/// would leave its businesses unsynced after the first pass, silently: it is
/// a bad cron expression too (SPEC §2), named with its file and key.
#[test]
fn a_schedule_that_never_fires_is_refused() {
    let d = Dir::new();
    let never = d.file(
        "never.toml",
        &format!("{}\n[poll]\nschedule = \"0 0 0 30 2 *\"\n", d.base()),
    );
    assert_config_error(
        &check(&[&never], &[]),
        &["never.toml", "poll.schedule", "never"],
    );
    let per_business = d.file(
        "never2.toml",
        &format!("{}full_schedule = \"0 0 3 31 4 *\"\n", d.base()),
    );
    assert_config_error(
        &check(&[&per_business], &[]),
        &["never2.toml", "businesses.0.full_schedule", "never"],
    );
    // Rare is fine: February 29th comes back.
    let leap = d.file(
        "leap.toml",
        &format!("{}\n[poll]\nfull_schedule = \"0 0 3 29 2 *\"\n", d.base()),
    );
    let o = check(&[&leap], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn token_sources_must_be_exactly_one_readable_file() {
    let d = Dir::new();
    let neither = d.file(
        "neither.toml",
        &format!(
            "database = \"{}\"\n[[businesses]]\nid = \"1\"\n",
            d.path().join("m.db").display()
        ),
    );
    assert_config_error(
        &check(&[&neither], &[]),
        &["neither.toml", "no token source"],
    );

    let both = d.file(
        "both.toml",
        &format!(
            "{}refresh_token_file = \"{}\"\n",
            d.base(),
            d.token.display()
        ),
    );
    assert_config_error(&check(&[&both], &[]), &["both.toml", "both"]);

    let missing = d.file(
        "missing.toml",
        &d.base()
            .replace(&d.token.display().to_string(), "/nonexistent/token"),
    );
    assert_config_error(
        &check(&[&missing], &[]),
        &[
            "missing.toml",
            "businesses.0.access_token_file",
            "/nonexistent/token",
        ],
    );
}

#[test]
fn a_missing_config_file_is_an_error() {
    let o = check(&[Path::new("/nonexistent/leadsync.toml")], &[]);
    assert_config_error(&o, &["/nonexistent/leadsync.toml", "does not exist"]);
}

#[test]
fn environment_overrides_files_and_later_files_override_earlier() {
    let d = Dir::new();
    let a = d.file(
        "a.toml",
        &format!(
            "{}\n[outbox]\nconcurrency = 2\nmax_attempts = 7\n",
            d.base()
        ),
    );
    let b = d.file("b.toml", "[outbox]\nconcurrency = 3\n");
    let o = check(&[&a, &b], &[]);
    assert!(
        text(&o).contains("concurrency = 3"),
        "later file wins: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("max_attempts = 7"),
        "earlier keys stay: {}",
        text(&o)
    );

    let o = check(&[&a, &b], &[("LEADSYNC_OUTBOX__CONCURRENCY", "8")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("concurrency = 8"),
        "environment wins: {}",
        text(&o)
    );

    let o = check(&[&a], &[("LEADSYNC_OUTBOX__CONCURRENCY", "lots")]);
    assert_config_error(&o, &["LEADSYNC_OUTBOX__CONCURRENCY"]);

    // The log level variable is not a configuration key.
    let o = check(&[&a], &[("LEADSYNC_LOG", "debug")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

fn oauth_base(d: &Dir) -> String {
    format!(
        "database = \"{db}\"\n[oauth]\nclient_id = \"partner-app\"\ntoken_store = \"{ts}\"\n\n[[businesses]]\nid = \"468046965846925323\"\nrefresh_token_file = \"{t}\"\n",
        db = d.path().join("m.db").display(),
        ts = d.path().join("tokens.db").display(),
        t = d.token.display()
    )
}

#[test]
fn secrets_are_masked_wherever_they_come_from() {
    let d = Dir::new();
    let secret = "cs_live_9f8e7d6c5b4a";
    let secret_file = d.file("client_secret", &format!("{secret}\n"));

    let from_file = d.file(
        "file.toml",
        &format!("{}\n", oauth_base(&d)).replace(
            "client_id = \"partner-app\"",
            &format!(
                "client_id = \"partner-app\"\nclient_secret_file = \"{}\"",
                secret_file.display()
            ),
        ),
    );
    let o = check(&[&from_file], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains(secret), "secret printed: {}", text(&o));
    assert!(
        !text(&o).contains("sbx_static_secret_token_value"),
        "token printed"
    );

    let plain = d.file("plain.toml", &oauth_base(&d));
    let o = check(&[&plain], &[("LEADSYNC_OAUTH__CLIENT_SECRET", secret)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains(secret), "secret printed: {}", text(&o));
    assert!(
        text(&o).contains("client_secret = \"********\""),
        "{}",
        text(&o)
    );

    let creds = tempfile::tempdir().unwrap();
    write(creds.path(), "client_secret", secret);
    let mut c = Command::new(bin());
    c.args(["--config"]).arg(&plain).args(["config", "check"]);
    c.env("CREDENTIALS_DIRECTORY", creds.path());
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains(secret));
    assert!(text(&o).contains("client secret from"), "{}", text(&o));

    // A client secret file that is not there.
    let gone = d.file(
        "gone.toml",
        &oauth_base(&d).replace(
            "client_id = \"partner-app\"",
            "client_id = \"partner-app\"\nclient_secret_file = \"/nonexistent/client_secret\"",
        ),
    );
    let o = check(&[&gone], &[]);
    assert_eq!(o.status.code(), Some(0), "a warning only: {}", text(&o));
    assert!(
        text(&o).contains("oauth.client_secret_file")
            && text(&o).contains("/nonexistent/client_secret"),
        "{}",
        text(&o)
    );

    // A numeric-looking secret is taken as text and never echoed.
    for numeric in ["0012345678", "12345678901234567890123456789", "1.5e10"] {
        let o = check(&[&plain], &[("LEADSYNC_OAUTH__CLIENT_SECRET", numeric)]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert!(!text(&o).contains(numeric), "secret printed: {}", text(&o));
    }

    // Without any client secret, `config check` (and the other commands that
    // never call the token endpoint) still works and warns; `sync` refuses.
    let o = check(&[&plain], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("warning") && text(&o).contains("client secret"),
        "{}",
        text(&o)
    );
    let o = Command::new(bin())
        .arg("--config")
        .arg(&plain)
        .arg("sync")
        .env_remove("LEADSYNC_OAUTH__CLIENT_SECRET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_config_error(&o, &["plain.toml", "client secret"]);
}

#[test]
fn the_documented_example_is_accepted_when_its_files_exist() {
    let d = Dir::new();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/leadsync.toml"))
            .unwrap();
    let etc = d.path().join("etc");
    let var = d.path().join("var");
    std::fs::create_dir_all(&var).unwrap();
    let example = example
        .replace("/etc/leadsync/", &format!("{}/", etc.display()))
        .replace("/var/lib/leadsync/", &format!("{}/", var.display()));
    // Create every file the example points at.
    for line in example.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some((key, value)) = line.split_once('=')
            && key.trim().ends_with("_file")
            && let Some(path) = value.split('"').nth(1)
        {
            write(
                Path::new("/"),
                path.trim_start_matches('/'),
                "example-secret\n",
            );
        }
    }
    let f = d.file("example.toml", &example);
    let o = check(&[&f], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Thousands of businesses, one conf.d file each: loading is linear (it was
/// quadratic: locating each entry cloned the whole merged document), and an
/// error in the last file still names that file and its key. The bound is
/// ~10× what a loaded debug build needs; the measured figures live in the
/// README's Performance section (bench/many.py).
#[test]
fn thousands_of_conf_d_files_load_quickly_and_errors_still_name_the_file() {
    const N: usize = 5_000;
    let d = Dir::new();
    let main = d.file(
        "leadsync.toml",
        &format!("database = \"{}\"\n", d.path().join("m.db").display()),
    );
    let mut files = vec![main];
    for i in 0..N {
        files.push(d.file(
            &format!("conf.d/{i:05}.toml"),
            &format!(
                "[[businesses]]\nid = \"{}\"\nname = \"Pro {i}\"\naccess_token_file = \"{}\"\n",
                100_000_000_000 + i,
                d.token.display()
            ),
        ));
    }
    let refs: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
    let started = std::time::Instant::now();
    let o = check(&refs, &[]);
    let took = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        took < std::time::Duration::from_secs(30),
        "config check of {N} businesses took {took:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches("[[businesses]]")
            .count(),
        N
    );

    let last = d.file(
        "conf.d/99999.toml",
        &format!(
            "[[businesses]]\nid = \"{}\"\naccess_token_file = \"{}\"\n",
            100_000_000_000usize + 17,
            d.token.display()
        ),
    );
    files.push(last);
    let refs: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
    assert_config_error(
        &check(&refs, &[]),
        &[
            "99999.toml: key `businesses.0.id`",
            "twice",
            "00017.toml: key `businesses.0.id`",
        ],
    );
}

/// `config check` shows the request budget arithmetic and warns when the
/// schedules need more than `api.max_requests_per_second` (SPEC §11).
#[test]
fn config_check_warns_when_the_budget_cannot_keep_up() {
    let d = Dir::new();
    let mut toml = format!(
        "database = \"{}\"\n[api]\nmax_requests_per_second = 5\n[poll]\nschedule = \"*/5 * * * *\"\nstop_after_unchanged_pages = 2\n",
        d.path().join("m.db").display()
    );
    for i in 0..1_000 {
        toml.push_str(&format!(
            "[[businesses]]\nid = \"{}\"\naccess_token_file = \"{}\"\n",
            500_000 + i,
            d.token.display()
        ));
    }
    let f = d.file("many.toml", &toml);
    let o = check(&[&f], &[]);
    assert!(
        o.status.success(),
        "a warning is not an error: {}",
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    // 1,000 × 2 pages every 300 s = 6.67 requests/s > 5.
    assert!(
        out.contains("# budget: head scans `0 */5 * * * *`: 1000 businesses × 2 pages ÷ 300 s = 6.67 requests/s"),
        "{out}"
    );
    assert!(
        out.contains("# budget: full scans `0 17 3 * * *`: 1000 businesses × ≥ 1 page ÷ 86400 s = 0.01 requests/s"),
        "{out}"
    );
    assert!(
        out.contains(
            "# warning: the schedules need ≥ 6.68 requests/s but api.max_requests_per_second = 5"
        ),
        "{out}"
    );
    assert!(
        out.contains("needs ≥ 400 s of requests at 5 requests/s, but it comes every 300 s"),
        "{out}"
    );

    // The same businesses fit in a larger budget: the arithmetic, no warning.
    let f = d.file(
        "many.toml",
        &toml.replace(
            "max_requests_per_second = 5",
            "max_requests_per_second = 10",
        ),
    );
    let o = check(&[&f], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(
            "# budget: together ≥ 6.68 requests/s of api.max_requests_per_second = 10 (67%)"
        ),
        "{out}"
    );
    assert!(!out.contains("# warning"), "{out}");
}

#[test]
fn a_webhook_path_is_a_plain_path_not_a_route_pattern() {
    // The path becomes an axum route: `:x`, `*x` and braces are route
    // syntax there (a panic at start, or a wildcard), so the configuration
    // refuses them instead of the daemon failing later.
    let d = Dir::new();
    let pw = d.file("webhook_password", "hook-pass\n");
    for (i, path) in ["/hooks/:token", "/hooks/*rest", "/hooks/{id}", "/hooks/{"]
        .iter()
        .enumerate()
    {
        let f = d.file(
            &format!("p{i}.toml"),
            &format!(
                "{}\n[webhooks]\nlisten = \"127.0.0.1:8780\"\npath = \"{path}\"\nusername = \"thumbtack\"\npassword_file = \"{}\"\n",
                d.base(),
                pw.display()
            ),
        );
        assert_config_error(
            &check(&[&f], &[]),
            &[&format!("p{i}.toml"), "webhooks.path"],
        );
    }
    let ok = d.file(
        "ok.toml",
        &format!(
            "{}\n[webhooks]\nlisten = \"127.0.0.1:8780\"\npath = \"/thumbtack/web-hooks_v1.0~x\"\nusername = \"thumbtack\"\npassword_file = \"{}\"\n",
            d.base(),
            pw.display()
        ),
    );
    let o = check(&[&ok], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn webhook_credentials_are_masked_in_config_check() {
    let d = Dir::new();
    let inline = d.file(
        "inline.toml",
        &format!(
            "{}\n[webhooks]\nlisten = \"127.0.0.1:8780\"\nusername = \"thumbtack\"\npassword = \"inline-hook-pass-77\"\n",
            d.base()
        ),
    );
    let o = check(&[&inline], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(!t.contains("inline-hook-pass-77"), "{t}");
    let header = d.file(
        "header.toml",
        &format!(
            "{}\n[webhooks]\nlisten = \"127.0.0.1:8780\"\nheader = \"X-Hook\"\n",
            d.base()
        ),
    );
    let o = check(
        &[&header],
        &[("LEADSYNC_WEBHOOKS__HEADER_VALUE", "env-hook-value-88")],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(!t.contains("env-hook-value-88"), "{t}");
}

#[test]
fn retention_is_a_whole_number_of_days_zero_keeping_everything() {
    let d = Dir::new();
    let defaults = d.file("defaults.toml", &d.base());
    let o = check(&[&defaults], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("keep_days = 30"), "{}", text(&o));
    assert!(
        text(&o).contains("webhook_events_keep_days = 0"),
        "{}",
        text(&o)
    );
    let f = d.file(
        "events.toml",
        &format!(
            "{}\n[retention]\nwebhook_events_keep_days = 36501\n",
            d.base()
        ),
    );
    assert_config_error(
        &check(&[&f], &[]),
        &[
            "events.toml",
            "retention.webhook_events_keep_days",
            "at most 36500",
        ],
    );
    for (i, bad, needle) in [
        (0, "-1", "retention.keep_days"),
        (1, "\"30d\"", "retention.keep_days"),
        (2, "1.5", "retention.keep_days"),
        (3, "36501", "at most 36500"),
    ] {
        let f = d.file(
            &format!("r{i}.toml"),
            &format!("{}\n[retention]\nkeep_days = {bad}\n", d.base()),
        );
        assert_config_error(&check(&[&f], &[]), &[&format!("r{i}.toml"), needle]);
    }
    let typo = d.file(
        "typo.toml",
        &format!("{}\n[retention]\nkeep_day = 7\n", d.base()),
    );
    assert_config_error(&check(&[&typo], &[]), &["typo.toml", "retention.keep_day"]);
    for days in ["0", "1", "36500"] {
        let f = d.file(
            &format!("ok{days}.toml"),
            &format!("{}\n[retention]\nkeep_days = {days}\n", d.base()),
        );
        let o = check(&[&f], &[]);
        assert_eq!(o.status.code(), Some(0), "{days}: {}", text(&o));
    }
}

/// The bearer token travels with every API request (and `webhooks register`
/// sends the webhook password in its body): a plain-http `api.base_url` is
/// refused unless the host is loopback (the sandbox), like `oauth.token_url`.
#[test]
fn a_plain_http_api_base_url_is_refused_unless_loopback() {
    let d = Dir::new();
    let remote = d.file(
        "remote.toml",
        &format!(
            "{}\n[api]\nbase_url = \"http://api.thumbtack.com\"\n",
            d.base()
        ),
    );
    let o = check(&[&remote], &[]);
    assert_config_error(&o, &["remote.toml", "api.base_url", "https"]);
    let o = check(
        &[&d.file("ok.toml", &d.base())],
        &[("LEADSYNC_API__BASE_URL", "http://10.0.0.5:8080")],
    );
    assert_config_error(&o, &["LEADSYNC_API__BASE_URL", "https"]);
    for ok in [
        "http://127.0.0.1:9",
        "http://localhost:8080",
        "http://[::1]:80",
        "https://staging-api.thumbtack.com",
    ] {
        let f = d.file(
            "loop.toml",
            &format!("{}\n[api]\nbase_url = \"{ok}\"\n", d.base()),
        );
        let o = check(&[&f], &[]);
        assert_eq!(o.status.code(), Some(0), "{ok}: {}", text(&o));
    }
}

/// Text-typed keys set in the environment are taken exactly as written: the
/// environment provider would read `007123` as the number 7123, `"x"` as x
/// and `1.50` as 1.5 (a webhook password changed that way gets every
/// delivery a 401).
#[test]
fn text_keys_from_the_environment_are_kept_exactly() {
    let d = Dir::new();
    let f = d.file("a.toml", &oauth_base(&d));
    let o = check(
        &[&f],
        &[
            ("LEADSYNC_OAUTH__CLIENT_ID", "007123"),
            ("LEADSYNC_OAUTH__CLIENT_SECRET", "s"),
            ("LEADSYNC_WEBHOOKS__USERNAME", "0042"),
            ("LEADSYNC_WEBHOOKS__PASSWORD", "1.50"),
            ("LEADSYNC_API__USER_AGENT", "\"quoted\""),
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("client_id = \"007123\""), "{t}");
    assert!(t.contains("username = \"0042\""), "{t}");
    assert!(t.contains("user_agent = \"quoted\""), "{t}");
    assert!(!t.contains("1.50") && !t.contains("1.5\n"), "{t}");
}

/// The shipped conffile as the shipped unit runs it: the client secret comes
/// from `LoadCredential=client_secret:/etc/leadsync/client_secret`
/// (`$CREDENTIALS_DIRECTORY/client_secret`) and /etc/leadsync/client_secret
/// itself is root-only, unreadable to the service user. A `client_secret_file`
/// set in the example took precedence over the credential, so a fresh
/// install exited 78 until the key was removed.
#[test]
fn the_shipped_example_takes_the_client_secret_from_the_units_credential() {
    let d = Dir::new();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/leadsync.toml"))
            .unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/leadsync.service"
    ))
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.trim() == "LoadCredential=client_secret:/etc/leadsync/client_secret"),
        "the unit loads the client secret as a credential"
    );
    let etc = d.path().join("etc");
    let var = d.path().join("var");
    std::fs::create_dir_all(&var).unwrap();
    let example = example
        .replace("/etc/leadsync/", &format!("{}/", etc.display()))
        .replace("/var/lib/leadsync/", &format!("{}/", var.display()));
    // Only the grant the example's business names; etc/client_secret is
    // not there (root-only: the service user cannot read it).
    let grant = write(&etc, "tokens/468046965846925323", "the-refresh-token\n");
    chmod(&grant, 0o600);
    let creds = tempfile::tempdir().unwrap();
    write(creds.path(), "client_secret", "cs-from-credential\n");
    let f = d.file("leadsync.toml", &example);
    let o = Command::new(bin())
        .arg("--config")
        .arg(&f)
        .args(["config", "check"])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .env_remove("LEADSYNC_OAUTH__CLIENT_SECRET")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!(
            "client secret from: {}",
            creds.path().join("client_secret").display()
        )),
        "{t}"
    );
    assert!(!t.contains("warning"), "{t}");
}

/// A relative path in a file is relative to that file's directory, not to
/// wherever the command runs (an `enqueue` from another directory created a
/// new mirror there; a relative grant passed `config check` in /etc/leadsync
/// and failed in the daemon, whose working directory is /). In the
/// environment, where there is no file to be relative to, it is refused.
#[test]
fn relative_paths_are_relative_to_the_file_that_sets_them() {
    let d = Dir::new();
    let conf = d.path().join("conf");
    let f = write(
        &conf,
        "leadsync.toml",
        "database = \"m.db\"\n\n[[businesses]]\nid = \"468046965846925323\"\naccess_token_file = \"../tokens/468046965846925323\"\n",
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .arg("--config")
        .arg(&f)
        .args(["config", "check"])
        .current_dir(elsewhere.path())
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("database = \"{}\"", conf.join("m.db").display())),
        "{t}"
    );
    // The same file named relatively, from its own directory.
    let o = Command::new(bin())
        .args(["--config", "leadsync.toml", "config", "check"])
        .current_dir(&conf)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("database = \"{}\"", conf.join("m.db").display())),
        "{t}"
    );
    let o = check(&[&f], &[("LEADSYNC_DATABASE", "other.db")]);
    assert_config_error(&o, &["LEADSYNC_DATABASE", "absolute"]);
}

/// Non-secret text from the environment loses surrounding whitespace and one
/// pair of matching quotes, as before (Docker `--env-file` and compose keep
/// quotes literally: a base URL ending in a space put a space in every
/// request URL, a quoted username got every delivery a 401), and is never
/// turned into a number.
#[test]
fn non_secret_text_from_the_environment_is_trimmed_and_unquoted() {
    let d = Dir::new();
    let f = d.file("a.toml", &oauth_base(&d));
    let o = check(
        &[&f],
        &[
            ("LEADSYNC_API__BASE_URL", "https://api.thumbtack.com "),
            ("LEADSYNC_OAUTH__CLIENT_ID", " '007123'"),
            ("LEADSYNC_OAUTH__CLIENT_SECRET", "s"),
            ("LEADSYNC_WEBHOOKS__USERNAME", "\"0042\""),
            ("LEADSYNC_WEBHOOKS__PASSWORD", "pw"),
            ("LEADSYNC_POLL__SCHEDULE", "'0 */5 * * * *'"),
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("base_url = \"https://api.thumbtack.com\"\n"),
        "{t}"
    );
    assert!(t.contains("client_id = \"007123\""), "{t}");
    assert!(t.contains("username = \"0042\""), "{t}");
    assert!(!t.contains("warning"), "{t}");
}

/// Secrets are kept exactly (a password may end in a space), but one that
/// begins or ends with whitespace or is wrapped in matching quotes is
/// warned about, without printing it.
#[test]
fn a_secret_with_surrounding_space_or_quotes_is_warned_about() {
    let d = Dir::new();
    let f = d.file("a.toml", &oauth_base(&d));
    let o = check(
        &[&f],
        &[
            ("LEADSYNC_OAUTH__CLIENT_SECRET", "cs-value-31 "),
            ("LEADSYNC_WEBHOOKS__USERNAME", "u"),
            ("LEADSYNC_WEBHOOKS__PASSWORD", "'pw-value-77'"),
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.lines().any(|l| l.starts_with("# warning:")
            && l.contains("oauth.client_secret")
            && l.contains("whitespace")),
        "{t}"
    );
    assert!(
        t.lines().any(|l| l.starts_with("# warning:")
            && l.contains("webhooks.password")
            && l.contains("quotes")),
        "{t}"
    );
    assert!(
        !t.contains("cs-value-31") && !t.contains("pw-value-77"),
        "{t}"
    );
    let o = check(
        &[&f],
        &[
            ("LEADSYNC_OAUTH__CLIENT_SECRET", "cs"),
            ("LEADSYNC_WEBHOOKS__USERNAME", "u"),
            ("LEADSYNC_WEBHOOKS__PASSWORD", "pw'"),
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(!t.contains("warning"), "{t}");
}

/// Day of month and weekday, both restricted, combine with OR (croner, like
/// cron for fields not starting with `*`): `config check` says so and
/// points to the `+` form, since a schedule written for the earlier AND now
/// fires far more often.
#[test]
fn restricted_day_of_month_and_weekday_are_warned_about() {
    let d = Dir::new();
    let f = d.file(
        "a.toml",
        &format!(
            "{}schedule = \"0 0 */2 * FRI\"\n\n[poll]\nschedule = \"0 0 9 1-7 * MON\"\n",
            d.base()
        ),
    );
    let o = check(&[&f], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let warnings: Vec<&str> = t.lines().filter(|l| l.starts_with("# warning:")).collect();
    assert!(
        warnings.iter().any(|l| l.contains("poll.schedule")
            && l.contains("0 0 9 1-7 * MON")
            && l.contains(" OR ")
            && l.contains("+MON")),
        "{t}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("468046965846925323") && l.contains("*/2") && l.contains("+FRI")),
        "{t}"
    );
    for quiet in [
        "0 0 9 1-7 * +MON",
        "0 0 9 * * MON",
        "0 0 9 1 * *",
        "0 0 9 ? * MON#1",
    ] {
        let f = d.file(
            "q.toml",
            &format!("{}\n[poll]\nschedule = \"{quiet}\"\n", d.base()),
        );
        let o = check(&[&f], &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{quiet}: {t}");
        assert!(!t.contains("warning"), "{quiet}: {t}");
    }
}

/// An install that relied on the working directory (`database =
/// "leadsync.db"` run from /var/lib/leadsync) would silently get a new,
/// empty mirror or token store beside the file: refused, naming both paths,
/// when the new one does not exist and the old one does.
#[test]
fn a_relative_path_that_moved_is_refused() {
    let d = Dir::new();
    let conf = d.path().join("conf");
    let f = write(
        &conf,
        "leadsync.toml",
        &format!(
            "database = \"m.db\"\n[oauth]\nclient_id = \"p\"\ntoken_store = \"t.db\"\n\n[[businesses]]\nid = \"468046965846925323\"\nrefresh_token_file = \"{}\"\n",
            d.token.display()
        ),
    );
    let old = tempfile::tempdir().unwrap();
    let run = |cwd: &Path| {
        Command::new(bin())
            .arg("--config")
            .arg(&f)
            .args(["config", "check"])
            .current_dir(cwd)
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("LEADSYNC_OAUTH__CLIENT_SECRET", "s")
            .output()
            .unwrap()
    };
    write(old.path(), "m.db", "");
    let o = run(old.path());
    assert_config_error(
        &o,
        &[
            "database",
            &conf.join("m.db").display().to_string(),
            &old.path().join("m.db").display().to_string(),
        ],
    );
    // Once the database is where the file says, the token store is checked too.
    write(&conf, "m.db", "");
    write(old.path(), "t.db", "");
    let o = run(old.path());
    assert_config_error(
        &o,
        &[
            "oauth.token_store",
            &conf.join("t.db").display().to_string(),
            &old.path().join("t.db").display().to_string(),
        ],
    );
    write(&conf, "t.db", "");
    let o = run(old.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `~` is not expanded (no shell reads the file): `~/tokens.db` would be a
/// directory named `~` beside the file. Refused.
#[test]
fn a_path_starting_with_a_tilde_is_refused() {
    let d = Dir::new();
    let f = d.file(
        "a.toml",
        &format!("{}\n[oauth]\ntoken_store = \"~/tokens.db\"\n", d.base()),
    );
    assert_config_error(&check(&[&f], &[]), &["oauth.token_store", "~"]);
    let f = d.file("b.toml", &d.base());
    assert_config_error(
        &check(&[&f], &[("LEADSYNC_DATABASE", "~leadsync/m.db")]),
        &["LEADSYNC_DATABASE", "~"],
    );
}

#[test]
fn a_syntax_error_on_a_secret_line_does_not_print_the_secret() {
    // Review (cfg): a TOML syntax error quoted the offending line, so an
    // unquoted or unterminated `client_secret` (or webhook password) written
    // in a file reached the terminal, and the daemon's reload log.
    let d = Dir::new();
    let secret = "cs_live_Sup3rS3cretValue";
    for (name, line) in [
        (
            "unquoted.toml",
            format!("[oauth]\nclient_secret = {secret}\n"),
        ),
        (
            "unterminated.toml",
            format!("[oauth]\nclient_secret = \"{secret}\n"),
        ),
        (
            "trailing.toml",
            format!("[webhooks]\npassword = \"{secret}\" x\n"),
        ),
        (
            "twice.toml",
            format!("[webhooks]\nheader_value = \"{secret}\"\nheader_value = \"{secret}\"\n"),
        ),
    ] {
        let content = format!("{}\n{line}", d.base());
        let f = d.file(name, &content);
        let o = check(&[&f], &[]);
        // Still says where: the file and the line (the last one holding the
        // secret: the second of two keys is the error).
        let at = content
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(secret))
            .last()
            .expect("the secret's line")
            .0
            + 1;
        assert_config_error(&o, &[name, &format!("line {at},")]);
        assert!(
            !text(&o).contains(secret),
            "{name}: the secret was printed:\n{}",
            text(&o)
        );
    }
}

#[test]
fn admin_timers_too_large_for_a_duration_are_refused() {
    // Review (cfg): `config check` accepted `admin.refresh_secs = 1e300` and
    // `run` then panicked (exit 101) converting it to a duration.
    let d = Dir::new();
    for key in ["refresh_secs", "stale_after_secs"] {
        let f = d.file(
            &format!("{key}.toml"),
            &format!("{}\n[admin]\n{key} = 1e300\n", d.base()),
        );
        assert_config_error(&check(&[&f], &[]), &[&format!("admin.{key}"), "seconds"]);
    }
    // Review (cfg, 2nd): a cap of a day refused `stale_after_secs = 604800`
    // or `1e9` (staleness switched off), valid before: an upgrade stopped
    // the service (78). Only what a duration cannot hold is refused.
    for value in ["604800", "1e9"] {
        for key in ["refresh_secs", "stale_after_secs"] {
            let f = d.file(
                "ok.toml",
                &format!("{}\n[admin]\n{key} = {value}\n", d.base()),
            );
            let o = check(&[&f], &[]);
            assert_eq!(o.status.code(), Some(0), "{key} = {value}: {}", text(&o));
        }
    }
}

#[test]
fn a_directory_given_as_the_mirror_or_the_token_store_is_a_configuration_error() {
    // Review (cfg): `database = "/var/lib/leadsync"` (the directory) passed
    // `config check`; `run` then failed with exit 1 ("unable to open
    // database file"), which systemd restarts forever instead of stopping
    // at 78.
    let d = Dir::new();
    let dir = d.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let db = d.file(
        "db.toml",
        &d.base().replace(
            &format!("database = \"{}\"", d.path().join("m.db").display()),
            &format!("database = \"{}\"", dir.display()),
        ),
    );
    assert_config_error(
        &check(&[&db], &[]),
        &["db.toml", "database", "is a directory"],
    );
    let store = d.file(
        "store.toml",
        &format!(
            "{}\n[oauth]\ntoken_store = \"{}\"\n",
            d.base(),
            dir.display()
        ),
    );
    assert_config_error(
        &check(&[&store], &[]),
        &["store.toml", "oauth.token_store", "is a directory"],
    );
    // Through `run` too: exit 78, so that systemd does not restart it.
    let o = common::output(
        Command::new(bin())
            .arg("--config")
            .arg(&db)
            .arg("run")
            .env_remove("CREDENTIALS_DIRECTORY"),
    )
    .unwrap();
    assert_config_error(&o, &["database", "is a directory"]);
}

#[test]
fn businesses_from_the_environment_replacing_those_of_the_files_are_warned_about() {
    // Review (cfg): LEADSYNC_BUSINESSES replaces the files' businesses (the
    // environment overrides files; arrays are not added up), silently: one
    // business added that way in a container dropped every conf.d one.
    let d = Dir::new();
    let f = d.file("a.toml", &d.base());
    let env = format!(
        "[{{id=\"42\", access_token_file=\"{}\"}}]",
        d.token.display()
    );
    let o = check(&[&f], &[("LEADSYNC_BUSINESSES", &env)]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("warning") && t.contains("LEADSYNC_BUSINESSES") && t.contains("replaces 1"),
        "{t}"
    );
    // Without businesses in the files, nothing to warn about.
    let none = d.file(
        "none.toml",
        &format!("database = \"{}\"\n", d.path().join("m.db").display()),
    );
    let o = check(&[&none], &[("LEADSYNC_BUSINESSES", &env)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("LEADSYNC_BUSINESSES"), "{}", text(&o));
}

#[test]
fn a_sync_concurrency_beyond_65536_is_refused() {
    // Review (cfg): `daemon.sync_concurrency = 100000000` (a typo) passed
    // `config check`; `run` started one worker task per unit and ran out of
    // memory (aborted) before syncing anything.
    let d = Dir::new();
    let f = d.file(
        "a.toml",
        &format!("{}\n[daemon]\nsync_concurrency = 100000000\n", d.base()),
    );
    assert_config_error(
        &check(&[&f], &[]),
        &["a.toml", "daemon.sync_concurrency", "between 1 and 65536"],
    );
    let over = d.file(
        "over.toml",
        &format!("{}\n[daemon]\nsync_concurrency = 65537\n", d.base()),
    );
    assert_config_error(&check(&[&over], &[]), &["daemon.sync_concurrency"]);
    // Review (cfg, 2nd): a cap of 256 refused 300, valid before: an upgrade
    // stopped a running service (78). Plausible values still start.
    for n in [256, 300, 65536] {
        let ok = d.file(
            "ok.toml",
            &format!("{}\n[daemon]\nsync_concurrency = {n}\n", d.base()),
        );
        let o = check(&[&ok], &[]);
        assert_eq!(o.status.code(), Some(0), "{n}: {}", text(&o));
    }
}

#[test]
fn an_environment_variable_with_an_empty_part_is_refused_not_ignored() {
    // Review (cfg): `LEADSYNC_OUTBOX__CONCURRENCY__=8` (a trailing `__`) or
    // `LEADSYNC_OUTBOX____CONCURRENCY=8` was silently ignored: the
    // configuration ran with the file's value and `config check` said
    // nothing, where any other unknown key is an error.
    let d = Dir::new();
    let f = d.file("a.toml", &d.base());
    for var in [
        "LEADSYNC_OUTBOX__CONCURRENCY__",
        "LEADSYNC_OUTBOX____CONCURRENCY",
        "LEADSYNC_",
    ] {
        assert_config_error(&check(&[&f], &[(var, "8")]), &[var, "empty"]);
    }
    // The logging variables are not configuration keys.
    let o = check(&[&f], &[("LEADSYNC_LOG", "debug")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn output_to_a_reader_gone_away_is_no_panic() {
    // `leadsync config check | head -1` (or `status`, `outbox list`): the
    // reader closing the pipe made println! panic (exit 101, "panicked at
    // ... Broken pipe"). Now a quiet failure, exit 1 (SPEC: any other
    // failure), without the panic message.
    use std::os::fd::FromRawFd;
    let d = Dir::new();
    let f = d.file("a.toml", &d.base());
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // The read end closed before the child starts: its first write fails.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) });
    let write_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(&f)
        .args(["config", "check"])
        .stdin(std::process::Stdio::null())
        .stdout(write_end)
        .stderr(std::process::Stdio::piped());
    let o = common::spawn(&mut cmd).unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn secret_files_other_users_can_read_are_warned_about_by_name_not_content() {
    // Review (odd): a client secret or token file left 0644 drew no word.
    let d = Dir::new();
    let secret = "cs_value_open_to_all_41";
    let secret_file = d.file("client_secret", &format!("{secret}\n"));
    let password = "hook_pw_open_to_group_52";
    let password_file = d.file("hook_password", &format!("{password}\n"));
    let store = d.path().join("tokens.db");
    std::fs::write(&store, "").unwrap();
    let f = d.file(
        "c.toml",
        &format!(
            "{}\n[webhooks]\nlisten = \"127.0.0.1:8780\"\nusername = \"t\"\npassword_file = \"{}\"\n",
            oauth_base(&d).replace(
                "client_id = \"partner-app\"",
                &format!(
                    "client_id = \"partner-app\"\nclient_secret_file = \"{}\"",
                    secret_file.display()
                )
            ),
            password_file.display()
        ),
    );
    chmod(&secret_file, 0o644);
    chmod(&password_file, 0o640);
    chmod(&store, 0o604);
    chmod(&d.token, 0o640);

    let o = check(&[&f], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "a warning, not a failure: {t}");
    let warnings: Vec<&str> = t.lines().filter(|l| l.starts_with("# warning:")).collect();
    for (path, mode) in [
        (&secret_file, "0644"),
        (&password_file, "0640"),
        (&store, "0604"),
        (&d.token, "0640"),
    ] {
        let name = path.display().to_string();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(&name) && w.contains(mode) && w.contains("chmod 600")),
            "no warning naming {name} ({mode}) and the fix: {t}"
        );
    }
    assert!(!t.contains(secret) && !t.contains(password), "{t}");
    assert!(!t.contains("sbx_static_secret_token_value"), "{t}");

    assert!(!t.contains("changed by other users"), "{t}");

    // Review (odd, second): 0620 and 0602 let nobody else read the secret,
    // but another user can replace it (a webhook password of theirs, to
    // forge deliveries; a refresh token of their grant): a warning of its
    // own, naming the file, the mode and the fix.
    for (p, mode) in [
        (&secret_file, 0o600),
        (&password_file, 0o620),
        (&store, 0o602),
        (&d.token, 0o602),
    ] {
        chmod(p, mode);
    }
    let o = check(&[&f], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "a warning, not a failure: {t}");
    let token = d.token.display().to_string();
    assert!(
        t.lines().any(|l| l.starts_with("# warning:")
            && l.contains(&format!("{token} (business "))
            && l.contains("mode 0602: can be changed)")),
        "{t}"
    );
    assert!(!t.contains("read by other users"), "{t}");
    let warnings: Vec<&str> = t.lines().filter(|l| l.starts_with("# warning:")).collect();
    for (path, mode) in [(&password_file, "0620"), (&store, "0602")] {
        let name = path.display().to_string();
        assert!(
            warnings.iter().any(|w| w.contains(&name)
                && w.contains(mode)
                && w.contains("changed by other users")
                && w.contains("chmod 600")),
            "no warning naming {name} ({mode}) as changeable: {t}"
        );
    }
    assert_eq!(warnings.len(), 3, "{warnings:#?}");

    for p in [&password_file, &store, &d.token] {
        chmod(p, 0o600);
    }
    let o = check(&[&f], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        !t.contains("other users"),
        "files no one else can read or change draw no warning: {t}"
    );
}

/// A URL carrying `user:password@` would print the password wherever the URL
/// is shown: `config check`, `probe`, the logs, and every network error
/// (reqwest's message names the URL), which lands in `sync_runs.error` and
/// the outbox's `last_error`. Such a URL is refused, naming the key and
/// never the password — even when it would also fail another check, or is
/// not a URL at all.
#[test]
fn a_url_with_a_password_in_it_is_refused_without_printing_the_password() {
    let d = Dir::new();
    let secret = "hunter2-url-secret";
    let hook = "\n[webhooks]\nlisten = \"127.0.0.1:8780\"\nusername = \"thumbtack\"\npassword = \"p-123456\"\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "{}\n[api]\nbase_url = \"https://partner:{secret}@api.thumbtack.com\"\n",
                d.base()
            ),
            "api.base_url",
        ),
        (
            format!(
                "{}\n[api]\nbase_url = \"http://partner:{secret}@api.thumbtack.com\"\n",
                d.base()
            ),
            "api.base_url",
        ),
        (
            format!(
                "{}\n[api]\nbase_url = \"https://partner:{secret}@api.thumbtack.com:99999\"\n",
                d.base()
            ),
            "api.base_url",
        ),
        (
            format!(
                "{}\n[api]\nbase_url = \"https://{secret}@127.0.0.1:9\"\n",
                d.base()
            ),
            "api.base_url",
        ),
        (
            format!(
                "{}\n[oauth]\ntoken_url = \"https://partner:{secret}@auth.thumbtack.com/oauth2/token\"\n",
                d.base()
            ),
            "oauth.token_url",
        ),
        (
            format!(
                "{}\n[oauth]\ntoken_url = \"http://partner:{secret}@auth.thumbtack.com/oauth2/token\"\n",
                d.base()
            ),
            "oauth.token_url",
        ),
        (
            format!(
                "{}{hook}public_url = \"https://partner:{secret}@hooks.example.com/thumbtack/webhooks\"\n",
                d.base()
            ),
            "webhooks.public_url",
        ),
        (
            format!(
                "{}{hook}public_url = \"http://partner:{secret}@hooks.example.com/thumbtack/webhooks\"\n",
                d.base()
            ),
            "webhooks.public_url",
        ),
    ];
    for (i, (content, key)) in cases.iter().enumerate() {
        let f = d.file(&format!("userinfo{i}.toml"), content);
        let o = check(&[&f], &[]);
        assert_config_error(&o, &[key, "user"]);
        let t = text(&o);
        assert!(!t.contains(secret), "case {i} printed the password:\n{t}");
    }
    // From the environment too.
    let o = check(
        &[&d.file("ok.toml", &d.base())],
        &[(
            "LEADSYNC_API__BASE_URL",
            &format!("https://u:{secret}@api.thumbtack.com"),
        )],
    );
    assert_config_error(&o, &["LEADSYNC_API__BASE_URL", "user"]);
    assert!(!text(&o).contains(secret), "{}", text(&o));
}

/// The scheduler and the drainer beat once a second: a staleness limit
/// below two beats flags a healthy loop between two of them, and `/healthz`
/// flaps between 200 and 503. With the admin listener it is refused,
/// naming the key, in one message whatever the value (0.01 said "at least
/// 0.05"); without it the key is unused and a warning says so, so that an
/// upgrade does not stop a service over it.
#[test]
fn a_staleness_limit_below_two_beats_is_refused() {
    let d = Dir::new();
    for value in ["0", "0.01", "0.05", "0.5", "1", "1.9"] {
        let f = d.file(
            "stale.toml",
            &format!(
                "{}\n[admin]\nlisten = \"127.0.0.1:9187\"\nstale_after_secs = {value}\n",
                d.base()
            ),
        );
        assert_config_error(
            &check(&[&f], &[]),
            &[
                "admin.stale_after_secs",
                "at least 2 seconds",
                "once a second",
            ],
        );
        let f = d.file(
            "stale-off.toml",
            &format!("{}\n[admin]\nstale_after_secs = {value}\n", d.base()),
        );
        let o = check(&[&f], &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{value}: {t}");
        assert!(
            t.contains("admin.stale_after_secs") && t.contains("at least 2 seconds"),
            "{value}: {t}"
        );
    }
    let f = d.file(
        "ok.toml",
        &format!("{}\n[admin]\nstale_after_secs = 2\n", d.base()),
    );
    let o = check(&[&f], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// The masking must not depend on the URL parsing, nor on a literal `://`,
/// nor on where the text's authority would end: `#`, `/` or `?` inside the
/// password, a single slash or backslashes after the scheme, and a URL the
/// parser takes as host `u`, port 12 with the rest as a fragment. Any `@`
/// in a configured URL is refused, and no message quotes what comes before
/// the last `@`.
#[test]
fn a_url_with_an_at_sign_never_prints_what_precedes_it() {
    let d = Dir::new();
    let hook = "\n[webhooks]\nlisten = \"127.0.0.1:8780\"\nusername = \"thumbtack\"\npassword = \"p-123456\"\n";
    let urls = [
        r"https://u:p#SECRET1@api.example.com",
        r"https://u:SE/CRET2@api.example.com",
        r"https:/u:SECRET3@api.example.com",
        r"https:\\u:SECRET4@api.example.com",
        r"https:\u:SECRET4b@api.example.com",
        r"https://u:SE?CRET5@api.example.com",
        r"https://u:12#SECRET7@api.example.com",
        r"https://u:SECRET8@x@api.example.com",
        r"u:SECRET9@api.example.com",
        r"https://api.example.com/p?x=SECRET10@y",
    ];
    for (k, key) in ["api.base_url", "oauth.token_url", "webhooks.public_url"]
        .iter()
        .enumerate()
    {
        for (i, url) in urls.iter().enumerate() {
            // TOML literal strings: the backslashes stay as they are.
            let content = match *key {
                "api.base_url" => format!("{}\n[api]\nbase_url = '{url}'\n", d.base()),
                "oauth.token_url" => format!("{}\n[oauth]\ntoken_url = '{url}'\n", d.base()),
                _ => format!("{}{hook}public_url = '{url}'\n", d.base()),
            };
            let f = d.file(&format!("at{k}-{i}.toml"), &content);
            let o = check(&[&f], &[]);
            let t = text(&o);
            assert_config_error(&o, &[key]);
            assert!(
                !t.contains("SECRET") && !t.contains("SE/CRET") && !t.contains("SE?CRET"),
                "{key} = {url} printed what precedes its last @:\n{t}"
            );
        }
    }
}

/// The README's configuration table is where an operator looks a key up;
/// `config/leadsync.toml` is "a complete commented example". Every key the
/// example sets (or shows commented out) has a row in the table, and every
/// row names a key of the example: the `[webhooks]` keys had no row (only
/// the Webhooks section's sample), so a reader of the table did not know
/// they existed.
#[test]
fn the_readme_table_and_the_example_name_the_same_keys() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("| key | default | meaning |")
        .expect("the README's configuration table");
    let table = &readme[start..];
    let table = &table[..table.find("\n\n").unwrap_or(table.len())];
    let mut documented = std::collections::BTreeSet::new();
    for row in table.lines().skip(2) {
        let cell = row.split('|').nth(1).unwrap_or("");
        let mut prefix = String::new();
        for (i, key) in cell.split('`').skip(1).step_by(2).enumerate() {
            // `businesses[].schedule`, `full_schedule`: the second shares the prefix.
            if i == 0 {
                prefix = key
                    .rsplit_once('.')
                    .map_or(String::new(), |(p, _)| format!("{p}."));
                documented.insert(key.to_string());
            } else {
                documented.insert(format!("{prefix}{key}"));
            }
        }
    }
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/leadsync.toml"))
            .unwrap();
    let mut section = String::new();
    let mut shown = std::collections::BTreeSet::new();
    for line in example.lines() {
        let l = line.trim().trim_start_matches('#').trim();
        let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            section = format!("{name}[].");
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
            && word(name)
        {
            section = format!("{name}.");
        } else if let Some((key, _)) = l.split_once(" = ")
            && word(key.trim())
        {
            shown.insert(format!("{section}{}", key.trim()));
        }
    }
    assert!(shown.len() > 30, "the example was not read: {shown:?}");
    let undocumented: Vec<_> = shown.difference(&documented).collect();
    let not_in_example: Vec<_> = documented.difference(&shown).collect();
    assert!(
        undocumented.is_empty() && not_in_example.is_empty(),
        "keys of config/leadsync.toml with no row in the README's table: {undocumented:?}\n\
         rows of the table the example does not show: {not_in_example:?}"
    );
}

/// `auth exchange --write-conf` writes each business's name as Thumbtack
/// gives it, and TOML allows C1 controls (U+009B is a one-character CSI),
/// bidirectional overrides and zero-width characters in a string: `config
/// check` printed them raw. It now writes each as its TOML escape (a
/// literal string holding one becomes a basic string), so the printed
/// configuration is safe on a terminal and still reads back the same.
#[test]
fn config_check_prints_hostile_names_escaped_and_still_valid_toml() {
    let d = Dir::new();
    let f = d.file(
        "c.toml",
        &format!(
            // The second name makes the toml crate pick a literal string.
            "{}\n[[businesses]]\nid = \"468046965846925324\"\naccess_token_file = \"t\"\nname = 'say \"hi\" \u{9b}'\n",
            d.base().replace(
                "name = \"Robert's Remodeling\"",
                "name = \"Rob\\u009b2J\\u202eerts\\u200b\"",
            )
        ),
    );
    std::fs::write(d.path().join("t"), "token\n").unwrap();
    chmod(&d.path().join("t"), 0o600);
    let o = check(&[&f], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let bad: Vec<String> = out
        .chars()
        .filter(|c| *c != '\n' && leadsync::terminal::is_unsafe(*c))
        .map(|c| c.escape_unicode().to_string())
        .collect();
    assert!(bad.is_empty(), "config check printed {bad:?}:\n{out}");
    let printed: toml::Value = toml::from_str(
        &out.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{out}"));
    let names: Vec<&str> = printed["businesses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Rob\u{9b}2J\u{202e}erts\u{200b}", "say \"hi\" \u{9b}"],
        "{out}"
    );
}
