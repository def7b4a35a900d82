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
//! every event: the call sites log text as it is. Each value is cut to
//! [`VALUE_MAX`] and each line to [`LINE_MAX`], well under journald's
//! `LineMax`, past which one line would be several journal entries.

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
            .with_writer(LineMax(writer))
            .fmt_fields(CleanFields)
            .without_time()
            .with_ansi(false)
            .finish()
            .into(),
        Output::Stream { ansi } => builder
            .with_writer(LineMax(writer))
            .fmt_fields(CleanFields)
            .with_ansi(ansi)
            .finish()
            .into(),
    }
}

/// At most this many bytes of one value (a field, the message, an
/// error's list of sources) are written, escaped (in JSON: as JSON writes
/// them), then `…[N bytes more]`, N the bytes left out: a partner's
/// trigger message has no length limit, and journald makes a line longer
/// than its `LineMax` (48K by default) several entries.
pub const VALUE_MAX: usize = 4096;

/// At most this many bytes a line, its line break included: text lines
/// longer (several long values) are cut, with the same marker; in JSON the
/// line's string values then share half of it (see [`JsonSafe`]).
pub const LINE_MAX: usize = 32 * 1024;

/// The longest marker: `…[N bytes more]`, N of up to 10 digits.
const MARKER_MAX: usize = "…[".len() + 10 + " bytes more]".len();

/// A `fmt::Write` that writes each [`is_unsafe`] character as its escape:
/// `\n`, `\r`, `\t`, else `\u{1b}` (a backslash is written as it is).
/// Writes at most `max` bytes, each character or escape whole or not at
/// all, and counts the rest for [`Self::finish`]'s marker. Inside a quoted
/// string (a `?` field: Debug writes `"a \"b\" \\ c"`), a backslash and
/// what it escapes (`\\`, `\"`, `\u{1b}`) are whole or not at all too,
/// and a cut in one writes the marker and its closing quote, so the
/// string ends as it began. Nothing is allocated.
pub struct Escaped<'a, W: ?Sized> {
    out: &'a mut W,
    room: usize,
    more: usize,
    /// Inside a quoted string, as far as the value was read.
    open: bool,
    /// Inside a quoted string, as far as the value was written.
    written_open: bool,
    /// An unescaped quote was left out, the one that closes the string
    /// the cut fell in: [`Self::finish`] writes it.
    left_quote: bool,
    /// A backslash escape of a quoted string not yet whole, as written.
    escape: [u8; 16],
    escape_len: usize,
}

impl<'a, W: fmt::Write + ?Sized> Escaped<'a, W> {
    pub fn new(out: &'a mut W, max: usize) -> Self {
        Escaped {
            out,
            room: max,
            more: 0,
            open: false,
            written_open: false,
            left_quote: false,
            escape: [0; 16],
            escape_len: 0,
        }
    }

    /// `s` whole if it fits and nothing was left out before it; else counted.
    fn piece(&mut self, s: &str) -> fmt::Result {
        if self.more == 0 && s.len() <= self.room {
            self.room -= s.len();
            self.out.write_str(s)
        } else {
            self.more += s.len();
            Ok(())
        }
    }

    /// A run of safe characters: as many whole ones as fit.
    fn run(&mut self, s: &str) -> fmt::Result {
        if self.more > 0 || s.len() <= self.room {
            return self.piece(s);
        }
        let mut end = self.room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.piece(&s[..end])?;
        self.more += s.len() - end;
        Ok(())
    }

    /// `c` as written: itself, or its escape if [`is_unsafe`].
    fn written(c: char, buf: &mut [u8; 12]) -> &str {
        if !is_unsafe(c) {
            return c.encode_utf8(buf);
        }
        match c {
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c => {
                let mut at = 0;
                for e in c.escape_unicode() {
                    at += e.encode_utf8(&mut buf[at..]).len();
                }
                std::str::from_utf8(&buf[..at]).expect("ASCII")
            }
        }
    }

    /// One character of a quoted string, or of the escape it ends or continues.
    fn quoted(&mut self, c: char) -> fmt::Result {
        let mut buf = [0u8; 12];
        let w = Self::written(c, &mut buf);
        if self.escape_len > 0 {
            // `\` and the character it escapes; `\u{..}` to its brace.
            let unicode = self.escape_len > 1 && self.escape[1] == b'u';
            let goes_on =
                self.escape_len == 1 || unicode && (c == '{' || c == '}' || c.is_ascii_hexdigit());
            if !goes_on || self.escape_len + w.len() > self.escape.len() {
                self.end_escape()?;
                return self.quoted(c);
            }
            self.escape[self.escape_len..][..w.len()].copy_from_slice(w.as_bytes());
            self.escape_len += w.len();
            if self.escape[1] != b'u' || c == '}' {
                self.end_escape()?;
            }
            return Ok(());
        }
        match c {
            '\\' => {
                self.escape[0] = b'\\';
                self.escape_len = 1;
                Ok(())
            }
            '"' => {
                self.piece("\"")?;
                if self.more == 0 {
                    self.written_open = false;
                } else if self.written_open {
                    self.left_quote = true;
                }
                self.open = false;
                Ok(())
            }
            _ => self.piece(w),
        }
    }

    /// Writes the pending escape, whole or not at all.
    fn end_escape(&mut self) -> fmt::Result {
        let n = std::mem::take(&mut self.escape_len);
        let escape = self.escape;
        self.piece(std::str::from_utf8(&escape[..n]).expect("whole characters"))
    }

    /// Ends the value: `…[N bytes more]` if N bytes were left out, and
    /// the quote that closes a string the cut fell in (not counted in N
    /// if it was left out).
    pub fn finish(mut self) -> fmt::Result {
        if self.escape_len > 0 {
            self.end_escape()?;
        }
        match self.more {
            0 => Ok(()),
            n if self.written_open => {
                let n = n - usize::from(self.left_quote);
                write!(self.out, "…[{n} bytes more]\"")
            }
            n => write!(self.out, "…[{n} bytes more]"),
        }
    }
}

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
        // Printable ASCII, by far the most of what is logged: as it is.
        if self.escape_len == 0 && s.bytes().all(plain) {
            return self.run(s);
        }
        let mut from = 0;
        for (i, c) in s.char_indices() {
            let quote = c == '"' || (c == '\\' && self.open);
            if !(is_unsafe(c) || quote || self.escape_len > 0) {
                continue;
            }
            self.run(&s[from..i])?;
            from = i + c.len_utf8();
            if self.open || self.escape_len > 0 {
                self.quoted(c)?;
            } else if c == '"' {
                self.piece("\"")?;
                self.open = true;
                self.written_open |= self.more == 0;
            } else {
                let mut buf = [0u8; 12];
                self.piece(Self::written(c, &mut buf))?;
            }
        }
        self.run(&s[from..])
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
        let mut e = Escaped::new(&mut self.writer, VALUE_MAX);
        self.result = e.write_fmt(args).and_then(|_| e.finish());
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
        // ` error.sources=[first, second]`, as `DefaultFields` writes it
        // (the name as tracing gives it, `r#` and all); the list is one
        // value: one bound for the whole chain.
        self.result = self
            .result
            .and_then(|_| self.writer.write_char(' '))
            .and_then(|_| self.styled(ITALIC, field.name()))
            .and_then(|_| self.styled(ITALIC, ".sources"))
            .and_then(|_| self.styled(DIMMED, "="))
            .and_then(|_| self.writer.write_char('['));
        if self.result.is_err() {
            return;
        }
        use fmt::Write as _;
        let mut list = Escaped::new(&mut self.writer, VALUE_MAX);
        let mut next = Some(source);
        let mut result = Ok(());
        let mut first = true;
        while let Some(e) = next
            && result.is_ok()
        {
            if !first {
                result = list.write_str(", ");
            }
            first = false;
            result = result.and_then(|_| write!(list, "{e}"));
            next = e.source();
        }
        self.result = result
            .and_then(|_| list.finish())
            .and_then(|_| self.writer.write_char(']'));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.value(format_args!("{value:?}"));
        }
    }
}

/// `MakeWriter` for a line-filtering writer `$name<M>`: it makes the
/// inner writer and wraps it, for every event alike.
macro_rules! wrap_make_writer {
    ($name:ident) => {
        impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for $name<M> {
            type Writer = $name<M::Writer>;

            fn make_writer(&'a self) -> Self::Writer {
                $name(self.0.make_writer())
            }

            fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
                $name(self.0.make_writer_for(meta))
            }
        }
    };
}

/// The text formats' writer: a line longer than [`LINE_MAX`] (only
/// several long values make one) is cut before it, between characters,
/// outside an escape and outside a colour sequence, and ends with
/// `…[N bytes more]` (and a colour reset when coloured) and its line break.
#[derive(Clone, Copy, Debug)]
pub struct LineMax<M>(pub M);

wrap_make_writer!(LineMax);

impl<W: Write> Write for LineMax<W> {
    /// tracing-subscriber formats each event, its line break included,
    /// into one `String` and writes it with one `write_all`: `buf` is a
    /// whole line, written in one call too.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() <= LINE_MAX {
            return self.0.write_all(buf).map(|_| buf.len());
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        // Room for the marker, a colour reset and the line break.
        let mut cut = LINE_MAX - 64;
        while cut > 0 && body[cut] & 0xc0 == 0x80 {
            cut -= 1;
        }
        // An escape (`\u{10ffff}` at most) cut short begins with the last
        // backslash of its 9 bytes before the cut; one that is whole, or a
        // backslash as written, is only cut a little earlier.
        if let Some(i) = body[cut - 9..cut].iter().rposition(|&b| b == b'\\') {
            cut = cut - 9 + i;
        }
        // Only the formatter's colours hold ESC (the values are escaped).
        let coloured = body.contains(&0x1b);
        if let Some(i) = body[..cut].iter().rposition(|&b| b == 0x1b)
            && !body[i..cut].contains(&b'm')
        {
            cut = i;
        }
        let mut line = body[..cut].to_vec();
        if coloured {
            line.extend_from_slice(b"\x1b[0m");
        }
        line.extend_from_slice(format!("…[{} bytes more]\n", body.len() - cut).as_bytes());
        self.0.write_all(&line).map(|_| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The JSON format's writer: serde_json escapes the C0 controls, and
/// leaves DEL, the C1 controls (U+009B is a one-character CSI) and the
/// other [`is_unsafe`] characters as they are; each can only be inside a
/// string, where its `\uXXXX` escape stands for it, so the line is the
/// same JSON. A string value longer than [`VALUE_MAX`] as written is cut
/// (between characters and escapes) and ends with `…[N bytes more]`; if
/// the line is still longer than [`LINE_MAX`], its string values share
/// half of that equally, quotes and markers counted (within the bound for
/// up to 500 string values: 16 KiB / [`MARKER_MAX`] and quotes). A line
/// with none of this to do (every line but a hostile one) is written as it
/// is, without a copy.
#[derive(Clone, Copy, Debug)]
pub struct JsonSafe<M>(pub M);

wrap_make_writer!(JsonSafe);

impl<W: Write> Write for JsonSafe<W> {
    /// tracing-subscriber formats each event, its line break included,
    /// into one `String` and writes it with one `write_all`: `buf` is a
    /// whole line of UTF-8 (no character split between calls), written in
    /// one call too.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let clean = |c: char| c <= '\u{1f}' || !is_unsafe(c);
        debug_assert!(
            std::str::from_utf8(buf).is_ok(),
            "a line split in a character"
        );
        // Should a line ever come in pieces, a split character is written
        // as U+FFFD rather than as bytes no one checked.
        let text = String::from_utf8_lossy(buf);
        let short = buf.len() <= VALUE_MAX || !needs_cut(buf);
        if short && (buf.is_ascii() && !buf.contains(&0x7f) || text.chars().all(clean)) {
            return self.0.write_all(text.as_bytes()).map(|_| buf.len());
        }
        let (mut line, values) = json_line(&text, VALUE_MAX, 0);
        if line.len() > LINE_MAX {
            // Each string's share, its quotes and marker included.
            let share = (LINE_MAX / 2 / values.max(1)).saturating_sub(2);
            line = json_line(&text, share, MARKER_MAX).0;
        }
        self.0.write_all(line.as_bytes()).map(|_| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Whether [`json_line`] would cut something of `line` (serde_json's
/// compact output, each string as written): the line is longer than
/// [`LINE_MAX`], or a string (a key too, though keys are not cut) longer
/// than [`VALUE_MAX`]. One pass over the bytes: a backslash is only ever
/// in a string, and escapes the byte after it.
fn needs_cut(line: &[u8]) -> bool {
    if line.len() > LINE_MAX {
        return true;
    }
    let (mut open, mut escaped, mut from) = (false, false, 0);
    for (i, &b) in line.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            if open && i - from - 1 > VALUE_MAX {
                return true;
            }
            (open, from) = (!open, i);
        }
    }
    false
}

/// `line` (serde_json's compact output) with every [`is_unsafe`]
/// character serde left as a `\uXXXX` escape, and every string value
/// (not a key) cut to `max` bytes as written, each character or escape
/// whole, with `…[N bytes more]`; and how many string values it holds.
/// A string cut keeps at most `max - reserve` bytes (none if `max` is
/// less), to leave `reserve` bytes for its marker.
fn json_line(line: &str, max: usize, reserve: usize) -> (String, usize) {
    let mut out = String::with_capacity(line.len().min(2 * LINE_MAX));
    // Whether each open container is an object; the last character
    // outside a string that is not white space.
    let mut objects: Vec<bool> = Vec::new();
    let mut last = ' ';
    let mut values = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {}
            '{' | '[' => {
                objects.push(c == '{');
                last = c;
                out.push(c);
                continue;
            }
            '}' | ']' => {
                objects.pop();
                last = c;
                out.push(c);
                continue;
            }
            c => {
                if !c.is_whitespace() {
                    last = c;
                }
                out.push(c);
                continue;
            }
        }
        // A string: a key if it opens a member of an object.
        let key = objects.last() == Some(&true) && matches!(last, '{' | ',');
        values += usize::from(!key);
        out.push('"');
        let cap = if key { usize::MAX } else { max };
        let (mut room, mut more) = (cap, 0);
        // Where a cut string ends, and the bytes it keeps: the last piece
        // within `cap - reserve`.
        let (mut kept, mut keep) = (out.len(), 0);
        let soft = cap.saturating_sub(reserve);
        let mut piece = String::new();
        while let Some(c) = chars.next() {
            piece.clear();
            match c {
                '"' => break,
                '\\' => {
                    piece.push(c);
                    let kind = chars.next().unwrap_or('\\');
                    piece.push(kind);
                    if kind == 'u' {
                        piece.extend(chars.by_ref().take(4));
                    }
                }
                c if c <= '\u{1f}' || !is_unsafe(c) => piece.push(c),
                c => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        use fmt::Write as _;
                        let _ = write!(piece, "\\u{unit:04x}");
                    }
                }
            }
            if more == 0 && piece.len() <= room {
                room -= piece.len();
                out.push_str(&piece);
                if cap - room <= soft {
                    (kept, keep) = (out.len(), cap - room);
                }
            } else {
                more += piece.len();
            }
        }
        if more > 0 {
            more += cap - room - keep;
            out.truncate(kept);
            use fmt::Write as _;
            let _ = write!(out, "…[{more} bytes more]");
        }
        out.push('"');
        last = '"';
    }
    (out, values)
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
    /// the message, a Debug field, a span's field (and one recorded
    /// later), an error with a source, a `&str` field; and a field named
    /// as a keyword.
    fn six_events(t: &str) {
        tracing::error!(outbox_id = 7, error = %t, "dead: not sent");
        tracing::warn!("{t}");
        tracing::warn!(note = ?t, "pass finished with a note");
        let span = tracing::info_span!(
            "send",
            kind = "transition",
            negotiation_id = %t,
            lead = tracing::field::Empty
        );
        // A field recorded after the span was made (`Span::record`).
        span.record("lead", tracing::field::display(t));
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
            assert_eq!(plain.matches(&shown).count(), 8, "{output:?}: {out}");
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
        assert_eq!(lines[3]["span"]["lead"], hostile().as_str(), "{out}");
        assert_eq!(lines[5]["type"], hostile().as_str(), "{out}");
    }

    /// Every output.
    const OUTPUTS: [Output; 4] = [
        Output::Journal,
        Output::Stream { ansi: false },
        Output::Stream { ansi: true },
        Output::Json,
    ];

    /// The value after `name=` (text) or of `name` (JSON) in `line`, as
    /// written (JSON: as read back).
    fn value_of(output: Output, line: &str, name: &str) -> String {
        if output == Output::Json {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            return v[name].as_str().unwrap().to_string();
        }
        let plain = without_sgr(line);
        let at = plain.find(&format!("{name}=")).unwrap() + name.len() + 1;
        let rest = &plain[at..];
        let end = rest.find(' ').unwrap_or(rest.len());
        let end = match rest.find("…[") {
            // The marker of a cut value has spaces of its own.
            Some(i) if i < end => i + rest[i..].find(']').unwrap() + 1,
            _ => end,
        };
        rest[..end].to_string()
    }

    /// `(kept, n)` of a value cut as `kept…[n bytes more]`.
    fn cut(value: &str) -> (&str, usize) {
        let (kept, marker) = value
            .split_once("…[")
            .unwrap_or_else(|| panic!("no marker: {value:.200}"));
        let n = marker.strip_suffix(" bytes more]").unwrap();
        (kept, n.parse().unwrap())
    }

    /// journald makes a line longer than its LineMax (48K) several
    /// entries: 100 KB of a partner's trigger message followed by a line
    /// of "leadsync's" started an entry of its own. A value is cut to a
    /// few KiB, with how much was cut, on the event's one line.
    #[test]
    fn a_long_value_is_cut_with_a_marker_and_its_line_stays_short() {
        let long = format!("{}\n{FORGED}", "x".repeat(100_000));
        // Written, the line break is two bytes (`\n`, serde's too).
        let written = 100_000 + 2 + FORGED.len();
        for output in OUTPUTS {
            let out = capture(
                output,
                || tracing::error!(error = %long, outbox_id = 7, "dead: not sent"),
            );
            assert_eq!(out.matches('\n').count(), 1, "{output:?}: {out:.300}");
            assert!(out.len() < 8 * 1024, "{output:?}: {} bytes", out.len());
            let value = value_of(output, &out, "error");
            let (kept, n) = cut(&value);
            assert!(
                kept.len() <= 4096 && kept.len() > 4000,
                "{output:?}: {}",
                kept.len()
            );
            assert!(kept.bytes().all(|b| b == b'x'), "{output:?}: {kept:.100}");
            assert_eq!(kept.len() + n, written, "{output:?}: {value:.100}");
            assert!(!out.contains(FORGED), "{output:?}");
            // The fields after it are still there.
            assert!(
                without_sgr(&out).contains("outbox_id"),
                "{output:?}: {out:.300}"
            );
        }
    }

    /// The cut falls between characters and between escapes, never in one.
    #[test]
    fn a_cut_never_splits_a_character_or_an_escape() {
        for pad in 0..4 {
            let long = format!("{}{}", "a".repeat(pad), "é\u{1b}\u{9b}".repeat(5000));
            for output in OUTPUTS {
                let out = capture(
                    output,
                    || tracing::warn!(note = %long, "pass finished with a note"),
                );
                let value = value_of(output, &out, "note");
                let (kept, _) = cut(&value);
                let kept = kept.trim_start_matches('a');
                let rest = if output == Output::Json {
                    kept.replace(['\u{1b}', '\u{9b}'], "")
                } else {
                    kept.replace("\\u{1b}", "").replace("\\u{9b}", "")
                };
                assert!(
                    rest.chars().all(|c| c == 'é'),
                    "{output:?} {pad}: {kept:.100}"
                );
                // Written, each 5 bytes of JSON's text are 14 (two `\u009b`).
                let least = if output == Output::Json {
                    4000 * 5 / 14
                } else {
                    4000
                };
                assert!(kept.len() > least, "{output:?}: {}", kept.len());
            }
        }
    }

    /// Many long values, and a span field recorded again and again, do
    /// not add up past the line bound: one line, still valid JSON.
    #[test]
    fn many_long_values_keep_the_line_under_the_line_bound() {
        let v = "y".repeat(10_000);
        for output in OUTPUTS {
            let out = capture(output, || {
                let span = tracing::info_span!("send", note = tracing::field::Empty);
                for _ in 0..12 {
                    span.record("note", tracing::field::display(&v));
                }
                span.in_scope(|| {
                    tracing::warn!(
                        a = %v, b = %v, c = %v, d = %v, e = %v, f = %v,
                        g = %v, h = %v, i = %v, j = %v, k = %v, l = %v,
                        "many"
                    )
                });
            });
            assert_eq!(out.matches('\n').count(), 1, "{output:?}: {out:.300}");
            assert!(out.len() <= 32 * 1024, "{output:?}: {} bytes", out.len());
            assert!(out.contains(" bytes more]"), "{output:?}: {out:.300}");
            if output == Output::Json {
                serde_json::from_str::<serde_json::Value>(&out).unwrap();
            }
        }
    }

    /// A cut quoted value (a `?` field: `error = ?error`, `rows = ?rows`)
    /// lost its closing quote and could end on half a `\\` escape, whose
    /// odd backslash escaped the marker: a logfmt reader took the rest of
    /// the line as part of the value. The cut falls between escapes and
    /// the marker ends the quoted string, closed.
    #[test]
    fn a_cut_quoted_value_keeps_whole_escapes_and_its_closing_quote() {
        for output in [
            Output::Journal,
            Output::Stream { ansi: false },
            Output::Stream { ansi: true },
        ] {
            let long = "\\".repeat(5000);
            let out = capture(output, || tracing::warn!(note = ?long, after = 1, "m"));
            let out = without_sgr(&out);
            let at = out.find("note=\"").unwrap_or_else(|| panic!("{out:.300}")) + 6;
            let rest = &out[at..];
            let kept = rest.trim_start_matches('\\');
            let slashes = rest.len() - kept.len();
            assert!(
                slashes.is_multiple_of(2) && slashes > 4000,
                "{output:?}: {slashes}"
            );
            let (marker, tail) = kept.split_once('"').unwrap();
            // Written: 10,000 backslashes and two quotes, of which the
            // opening quote, `slashes` and the closing quote are there.
            assert_eq!(
                marker,
                format!("…[{} bytes more]", 10_000 - slashes),
                "{output:?}"
            );
            assert!(tail.starts_with(" after=1"), "{output:?}: {tail:.100}");

            // Escapes of every length, cut at every offset: whole ones only.
            for pad in 0..4 {
                let long = format!("{}{}", "a".repeat(pad), "é\u{1b}\\\"\n".repeat(2000));
                let out = capture(output, || tracing::warn!(note = ?long, after = 1, "m"));
                let out = without_sgr(&out);
                let at = out.find("note=\"").unwrap() + 6;
                let (kept, tail) = out[at..].split_once("…[").unwrap();
                let rest = kept
                    .trim_start_matches('a')
                    .replace("\\u{1b}", "")
                    .replace("\\\\", "")
                    .replace("\\\"", "")
                    .replace("\\n", "");
                assert!(
                    rest.chars().all(|c| c == 'é'),
                    "{output:?} {pad}: {rest:.100}"
                );
                assert!(kept.len() > 4000, "{output:?} {pad}");
                let (_, tail) = tail.split_once(" bytes more]\"").unwrap();
                assert!(tail.starts_with(" after=1"), "{output:?}: {tail:.100}");
            }
        }
    }

    /// The JSON second pass gave each string value its share of 16 KiB
    /// without counting its marker: a line of many values stayed over the
    /// line bound. A line of 500 long values (what the README promises)
    /// fits, still valid JSON.
    #[test]
    fn a_json_line_of_many_values_counts_their_markers_in_the_bound() {
        let members: Vec<String> = (0..500)
            .map(|i| format!("\"field_name_{i:03}\":\"{}\"", "y".repeat(200)))
            .collect();
        let line = format!("{{{}}}\n", members.join(","));
        let buf = Buf::default();
        JsonSafe(buf.clone()).write_all(line.as_bytes()).unwrap();
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.len() <= LINE_MAX, "{} bytes", out.len());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 500);
        assert!(
            v["field_name_499"]
                .as_str()
                .unwrap()
                .ends_with(" bytes more]"),
            "{out:.300}"
        );
    }

    /// A clean JSON line over 4 KiB was parsed and copied every time: it
    /// is written as it is unless a string in it is longer than
    /// [`VALUE_MAX`] as written (an escaped quote does not end one) or the
    /// line is longer than [`LINE_MAX`]. Skipped, the rewrite would have
    /// changed nothing; a long key (never cut) is rewritten, needlessly.
    #[test]
    fn a_clean_json_line_is_written_as_it_is_unless_a_cut_is_due() {
        let y = |n: usize| "y".repeat(n);
        let lines = [
            (format!("{{\"a\":\"{}\",\"b\":1}}\n", y(VALUE_MAX)), true),
            (
                format!("{{\"a\":\"{}\",\"b\":1}}\n", y(VALUE_MAX + 1)),
                false,
            ),
            (format!("{{\"a\":\"{}\\\"{}\"}}\n", y(3000), y(3000)), false),
            (
                format!("{{\"a\":\"{}\\\\\",\"b\":\"{}\"}}\n", y(3000), y(3000)),
                true,
            ),
            (format!("{{\"{}\":\"x\"}}\n", y(VALUE_MAX + 1)), false),
            (
                format!(
                    "{{\"a\":[{}\"z\"]}}\n",
                    format!("\"{}\",", y(4000)).repeat(9)
                ),
                false,
            ),
            (format!("{{\"a\":\"{}\"}}\n", y(100)), true),
        ];
        for (line, skipped) in &lines {
            assert_eq!(!needs_cut(line.as_bytes()), *skipped, "{line:.80}");
            if *skipped {
                assert_eq!(json_line(line, VALUE_MAX, 0).0, *line);
                assert!(line.len() <= LINE_MAX);
            }
        }
    }

    /// What tracing-subscriber's own formatter writes of `f`'s events.
    fn default_output(ansi: bool, f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let reference = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace"))
            .with_target(false)
            .with_writer(move || w.clone())
            .without_time()
            .with_ansi(ansi)
            .finish();
        tracing::subscriber::with_default(reference, f);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    /// An error field whose name starts with `r#` (tracing's macros strip
    /// it from `r#type`, not from a name given as a string): its sources
    /// are `r#type.sources=[..]`, as the default formatter names them.
    #[test]
    fn a_keyword_errors_sources_are_named_as_the_default_names_them() {
        let e = Failure(
            "outer".into(),
            Some(Box::new(Failure("inner".into(), None))),
        );
        let log = || {
            tracing::error!(
                "r#type" = &e as &(dyn std::error::Error + 'static),
                "cannot poll messages"
            )
        };
        assert_eq!(capture(Output::Journal, log), default_output(false, log));
        let untimed = |s: String| s.split_once(' ').map(|(_, r)| r.to_string()).unwrap();
        assert_eq!(
            untimed(capture(Output::Stream { ansi: true }, log)),
            default_output(true, log)
        );
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
