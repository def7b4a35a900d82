//! Logs: `tracing` to stderr, one event per line; no timestamps of our own
//! under journald (stderr is the stream `JOURNAL_STREAM` names), which adds
//! its own; JSON on request.
//!
//! Whoever wrote the text a line carries (Thumbtack, a partner's program
//! through the outbox tables or its triggers, a configuration file, a
//! webhook delivery), no character of [`crate::terminal::is_unsafe`]
//! reaches the output as it is: in the text formats every field and
//! message is written through [`Escaped`] ([`CleanFields`]), so a line
//! break cannot start a line that reads as leadsync's and an escape
//! sequence cannot drive the terminal of whoever reads the log; in JSON,
//! serde escapes the C0 controls and [`JsonSafe`] the rest. One place for
//! every event: the call sites log text as it is.

use crate::cli::LogFormat;
use crate::terminal::is_unsafe;
use std::fmt;
use std::io::{IsTerminal, Write};
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::util::SubscriberInitExt;

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
    let output = match format {
        LogFormat::Json => Output::Json,
        LogFormat::Text if stderr_is_journal() => Output::Journal,
        LogFormat::Text => Output::Stream {
            ansi: std::io::stderr().is_terminal(),
        },
    };
    let _ = subscriber(output, filter, std::io::stderr).try_init();
}

/// What the log lines look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// One JSON object a line (`--log-format json`).
    Json,
    /// Text for journald, which adds its own timestamps: none of ours, no colour.
    Journal,
    /// Text with timestamps, coloured on a terminal (`ansi`).
    Stream { ansi: bool },
}

/// The subscriber [`init`] installs, writing to `writer`: a test installs
/// it on a buffer (`tracing::subscriber::with_default`) to read the lines
/// an operator would.
pub fn subscriber<W>(output: Output, filter: EnvFilter, writer: W) -> tracing::Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // `log_internal_errors(false)`: tracing-subscriber otherwise reports a
    // failed stderr write (a closed pipe, a dead SSH terminal: EPIPE, EIO)
    // with `eprintln!`, which panics — in `auth exchange` that was before
    // the spent code's grant reached the store, and in the daemon it ends
    // a sync. A log line that cannot be written is dropped.
    let builder = tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_env_filter(filter)
        .with_target(false);
    match output {
        Output::Json => builder
            .with_writer(JsonSafe(writer))
            .json()
            .flatten_event(true)
            .finish()
            .into(),
        Output::Journal => builder
            .with_writer(writer)
            .fmt_fields(CleanFields)
            .without_time()
            .with_ansi(false)
            .finish()
            .into(),
        Output::Stream { ansi } => builder
            .with_writer(writer)
            .fmt_fields(CleanFields)
            .with_ansi(ansi)
            .finish()
            .into(),
    }
}

/// A `fmt::Write` that writes each [`is_unsafe`] character as its escape,
/// as Rust's `{:?}` writes it in a string: `\n`, `\r`, `\t`, else
/// `\u{1b}`. Runs of other characters are written as they come: nothing
/// is allocated.
pub struct Escaped<'a, W: ?Sized>(pub &'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Printable ASCII, by far the most of what is logged: as it is.
        if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return self.0.write_str(s);
        }
        let mut from = 0;
        for (i, c) in s.char_indices() {
            if !is_unsafe(c) {
                continue;
            }
            self.0.write_str(&s[from..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "{}", c.escape_unicode())?,
            }
            from = i + c.len_utf8();
        }
        self.0.write_str(&s[from..])
    }
}

/// The text formats' fields: written as tracing-subscriber's
/// `DefaultFields` writes them (names in italics and a dimmed `=` in
/// colour), every value and message through [`Escaped`]. Span fields
/// (`send{negotiation_id=..}`) are written by it too.
#[derive(Debug, Default, Clone, Copy)]
pub struct CleanFields;

impl<'w> FormatFields<'w> for CleanFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = CleanVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct CleanVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

/// The SGR sequences tracing-subscriber's formatter puts around a field's
/// name and its `=` when colour is on (nu-ansi-term's italic and dimmed).
const ITALIC: (&str, &str) = ("\x1b[3m", "\x1b[0m");
const DIMMED: (&str, &str) = ("\x1b[2m", "\x1b[0m");

impl CleanVisitor<'_> {
    fn styled(&mut self, style: (&str, &str), s: &str) -> fmt::Result {
        if self.writer.has_ansi_escapes() {
            write!(self.writer, "{}{s}{}", style.0, style.1)
        } else {
            self.writer.write_str(s)
        }
    }

    /// The separating space and `name=` (nothing but the space before the
    /// message); false for the `log.` fields of a `log` record, which the
    /// formatter shows elsewhere.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if !self.first {
            self.result = self.writer.write_char(' ');
        }
        self.first = false;
        if name != "message" && self.result.is_ok() {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .styled(ITALIC, name)
                .and_then(|_| self.styled(DIMMED, "="));
        }
        self.result.is_ok()
    }

    fn value(&mut self, args: fmt::Arguments<'_>) {
        use fmt::Write as _;
        self.result = Escaped(&mut self.writer).write_fmt(args);
    }
}

impl Visit for CleanVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        if field.name() == "message" {
            self.value(format_args!("{value}"));
        } else {
            self.value(format_args!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        self.value(format_args!("{value}"));
        let Some(source) = value.source() else {
            return;
        };
        // ` error.sources=[first, second]`, as `DefaultFields` writes it.
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .result
            .and_then(|_| self.writer.write_char(' '))
            .and_then(|_| self.styled(ITALIC, name))
            .and_then(|_| self.styled(ITALIC, ".sources"))
            .and_then(|_| self.styled(DIMMED, "="))
            .and_then(|_| self.writer.write_char('['));
        let mut next = Some(source);
        let mut first = true;
        while let Some(e) = next
            && self.result.is_ok()
        {
            if !first {
                self.result = self.writer.write_str(", ");
            }
            first = false;
            if self.result.is_ok() {
                self.value(format_args!("{e}"));
            }
            next = e.source();
        }
        self.result = self.result.and_then(|_| self.writer.write_char(']'));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.value(format_args!("{value:?}"));
        }
    }
}

/// The JSON format's writer: serde_json escapes the C0 controls, and
/// leaves DEL, the C1 controls (U+009B is a one-character CSI) and the
/// other [`is_unsafe`] characters as they are; each can only be inside a
/// string, where its `\uXXXX` escape stands for it, so the line is the
/// same JSON. A line with none of them (every line but a hostile one) is
/// written as it is, without a copy.
#[derive(Clone, Copy, Debug)]
pub struct JsonSafe<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for JsonSafe<M> {
    type Writer = JsonSafe<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        JsonSafe(self.0.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        JsonSafe(self.0.make_writer_for(meta))
    }
}

impl<W: Write> Write for JsonSafe<W> {
    /// The formatter writes each event, its line break included, in one
    /// call; it is written in one call too (no line split between writes).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let clean = |c: char| c <= '\u{1f}' || !is_unsafe(c);
        let text = match std::str::from_utf8(buf) {
            Ok(text) if !buf.is_ascii() || buf.contains(&0x7f) => text,
            // ASCII without DEL (nearly every line), or not text at all.
            _ => return self.0.write_all(buf).map(|_| buf.len()),
        };
        if text.chars().all(clean) {
            return self.0.write_all(buf).map(|_| buf.len());
        }
        let mut out = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            if clean(c) {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    use fmt::Write as _;
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
        self.0.write_all(out.as_bytes()).map(|_| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the lines of a test go to.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `f` logs through the subscriber [`init`] installs for `output`.
    fn capture(output: Output, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let d = subscriber(output, EnvFilter::new("trace"), move || w.clone());
        tracing::dispatcher::with_default(&d, f);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    /// The line another party's text tries to add after a line break.
    const FORGED: &str = "ERROR leadsync: forged";

    /// Text a partner's program or a server wrote: a line break and a
    /// carriage return before a line of "leadsync's", an OSC title change,
    /// BEL, a screen clear, a one-character CSI, a bidi override, a tab,
    /// DEL. No SGR (`ESC [ .. m`): the coloured output has its own.
    fn hostile() -> String {
        format!("why\n{FORGED}\r\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m\u{202e}\t\u{7f}end")
    }

    #[derive(Debug)]
    struct Failure(String, Option<Box<Failure>>);

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// Six events, one of each way text reaches a line: a Display field,
    /// the message, a Debug field, a span's field, an error with a source,
    /// a `&str` field; and a field named as a keyword.
    fn six_events(t: &str) {
        tracing::error!(outbox_id = 7, error = %t, "dead: not sent");
        tracing::warn!("{t}");
        tracing::warn!(note = ?t, "pass finished with a note");
        let span = tracing::info_span!("send", kind = "transition", negotiation_id = %t);
        span.in_scope(|| tracing::info!(business_id = "b1", "sent"));
        let e = Failure(t.to_string(), Some(Box::new(Failure(t.to_string(), None))));
        tracing::error!(
            error = &e as &(dyn std::error::Error + 'static),
            "cannot poll messages"
        );
        tracing::info!(r#type = t, pages = 3, "done");
    }

    /// `out` without the SGR sequences (`ESC [ digits ; m`) of a coloured output.
    fn without_sgr(out: &str) -> String {
        let mut rest = out;
        let mut kept = String::new();
        while let Some(i) = rest.find("\u{1b}[") {
            kept.push_str(&rest[..i]);
            let tail = &rest[i + 2..];
            let end = tail
                .find(|c: char| !(c.is_ascii_digit() || c == ';'))
                .unwrap_or(tail.len());
            if tail[end..].starts_with('m') {
                rest = &tail[end + 1..];
            } else {
                kept.push_str("\u{1b}[");
                rest = tail;
            }
        }
        kept.push_str(rest);
        kept
    }

    /// Under journald (and on a pipe, and on a terminal) a line break in a
    /// partner's or the server's text started a line of its own — a forged
    /// ERROR — and escape sequences reached the operator's terminal: every
    /// field and message of every event is escaped, one event a line.
    #[test]
    fn text_lines_carry_no_line_break_or_escape_another_party_wrote() {
        for output in [
            Output::Journal,
            Output::Stream { ansi: false },
            Output::Stream { ansi: true },
        ] {
            let out = capture(output, || six_events(&hostile()));
            let plain = without_sgr(&out);
            assert_eq!(plain.matches('\n').count(), 6, "{output:?}: {out}");
            assert!(plain.ends_with('\n'), "{output:?}: {out}");
            assert!(
                !plain
                    .chars()
                    .any(|c| c != '\n' && crate::terminal::is_unsafe(c)),
                "{output:?}: a control character reached the log: {out:?}"
            );
            assert!(
                !plain.lines().any(|l| l.trim_start().starts_with(FORGED)),
                "{output:?}: a forged line: {out}"
            );
            // What was there is shown, escaped as Rust writes it.
            let shown = format!(
                "why\\n{FORGED}\\r\\u{{1b}}]0;owned\\u{{7}}\\u{{1b}}[2J\\u{{9b}}31m\\u{{202e}}\\t\\u{{7f}}end"
            );
            assert_eq!(plain.matches(&shown).count(), 7, "{output:?}: {out}");
        }
    }

    /// JSON lines stay valid JSON, one event a line, the text read back as
    /// written; serde escapes the C0 controls, and the characters it leaves
    /// (DEL, C1 controls such as the one-character CSI, bidi overrides)
    /// are `\u` escapes too.
    #[test]
    fn json_lines_are_one_event_each_with_every_control_escaped() {
        let out = capture(Output::Json, || six_events(&hostile()));
        assert!(
            !out.chars()
                .any(|c| c != '\n' && crate::terminal::is_unsafe(c)),
            "a control character reached the log: {out:?}"
        );
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 6, "{out}");
        assert_eq!(lines[0]["error"], hostile().as_str(), "{out}");
        assert_eq!(lines[1]["message"], hostile().as_str(), "{out}");
        assert_eq!(
            lines[3]["span"]["negotiation_id"],
            hostile().as_str(),
            "{out}"
        );
        assert_eq!(lines[5]["type"], hostile().as_str(), "{out}");
    }

    /// Plain text is written as tracing-subscriber's own formatter writes
    /// it, colours and all: the escaping changes nothing else.
    #[test]
    fn plain_text_is_written_as_the_default_formatter_writes_it() {
        let plain = "a dead row: 404 Not Found (ünïcode, \"quoted\", back\\slash)";
        let journal = capture(Output::Journal, || six_events(plain));
        let buf = Buf::default();
        let w = buf.clone();
        let reference = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace"))
            .with_target(false)
            .with_writer(move || w.clone())
            .without_time()
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(reference, || six_events(plain));
        let expected = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(journal, expected);
        assert!(journal.contains("error.sources=["), "{journal}");

        // Coloured, the timestamps (which differ) aside.
        let untimed = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_string())
                .collect()
        };
        let coloured = capture(Output::Stream { ansi: true }, || six_events(plain));
        let buf = Buf::default();
        let w = buf.clone();
        let reference = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace"))
            .with_target(false)
            .with_writer(move || w.clone())
            .with_ansi(true)
            .finish();
        tracing::subscriber::with_default(reference, || six_events(plain));
        let expected = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(untimed(&coloured), untimed(&expected));
        assert!(coloured.contains("\u{1b}[3merror\u{1b}[0m"), "{coloured:?}");
    }

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
