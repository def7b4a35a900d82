//! Text another party chose (Thumbtack's answers, rows a partner program
//! wrote), made safe for a terminal: one list of the characters that can
//! drive a screen or hide text, for every command that prints such text.

/// Whether `c` must not reach a terminal as it is: control characters
/// (C0 and C1: escape sequences, line breaks, tabs; U+009B is a
/// one-character CSI) and the format characters (Unicode Cf) a terminal
/// shows as nothing or uses to reorder what follows — bidirectional
/// overrides, isolates and marks, zero-width characters, the soft hyphen,
/// the byte order mark, tag characters — and the line and paragraph
/// separators (U+2028/2029) some break the line at. No Unicode tables are
/// a dependency: the ones that matter, listed.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{ad}' | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
            | '\u{e0001}' | '\u{e0020}'..='\u{e007f}')
}

/// How an unsafe character is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsafe {
    /// By a space: table cells and one-line messages.
    Blank,
    /// By its `\u{..}` escape, so that a report shows what was there.
    Escape,
}

/// `s` with every [`is_unsafe`] character replaced as `how` says.
pub fn safe(s: &str, how: Unsafe) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if how == Unsafe::Blank {
            out.push(' ');
        } else {
            out.extend(c.escape_unicode());
        }
    }
    out
}

/// `s` as one line of a table or a message: every [`is_unsafe`] character
/// (line breaks and tabs too) is a space. What leadsync prints of text
/// another party chose goes through this or [`safe_lines`]; the text is
/// stored as it was sent. Log lines need neither: the log formatter
/// escapes every field and message ([`crate::logging`]).
pub fn blank(s: &str) -> String {
    safe(s, Unsafe::Blank)
}

/// `s` safe, each of its lines apart: text of several lines (a summary,
/// one line per business) keeps its line breaks and nothing else.
pub fn safe_lines(s: &str, how: Unsafe) -> String {
    s.split('\n')
        .map(|l| safe(l, how))
        .collect::<Vec<_>>()
        .join("\n")
}

/// JSON as serde_json wrote it (`raw`), safe on a terminal: serde_json
/// escapes C0 controls only; DEL, C1 controls (U+009B is a one-character
/// CSI) and the other characters of [`is_unsafe`] are written as `\uXXXX`
/// escapes too (a surrogate pair beyond the BMP: the tag characters), so
/// the output reads back the same. Each can only be inside a string (the
/// rest of serde_json's output is ASCII punctuation, digits, letters and
/// whitespace), where such an escape stands for the character itself.
pub fn safe_json(raw: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        // C0 controls outside strings are the output's own line breaks
        // and indentation; inside one serde_json escaped them already.
        if c > '\u{1f}' && is_unsafe(c) {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `v` as pretty JSON for a terminal (`--json` of `status`, `probe`,
/// `outbox list`, `webhooks list`): serde_json's output through
/// [`safe_json`]; it reads back as the same values.
pub fn pretty_json<T: serde::Serialize + ?Sized>(v: &T) -> serde_json::Result<String> {
    Ok(safe_json(&serde_json::to_string_pretty(v)?))
}

/// TOML as the `toml` crate wrote it (`raw`), safe on a terminal and read
/// back the same: in a basic string each [`is_unsafe`] character (line
/// breaks of a multi-line string aside) is written as its `\uXXXX` /
/// `\UXXXXXXXX` escape; a literal string (which has no escapes) holding one
/// is written as a basic string instead. `config check` prints the
/// configuration this way: a business name `auth exchange --write-conf`
/// took from the server can hold such characters.
pub fn safe_toml(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    let mut out = String::with_capacity(raw.len());
    let starts = |i: usize, q: char| {
        chars
            .get(i..i + 3)
            .is_some_and(|w| w.iter().all(|c| *c == q))
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '#' {
            // A comment (a line of leadsync's own, such as a rendering
            // failure's): to the end of its line, a quote in it no string.
            while i < chars.len() && chars[i] != '\n' {
                if is_unsafe(chars[i]) {
                    push_toml_escape(&mut out, chars[i]);
                } else {
                    out.push(chars[i]);
                }
                i += 1;
            }
            continue;
        }
        if c != '"' && c != '\'' {
            if c != '\n' && is_unsafe(c) {
                push_toml_escape(&mut out, c);
            } else {
                out.push(c);
            }
            i += 1;
            continue;
        }
        let multi = starts(i, c);
        let open = if multi { 3 } else { 1 };
        // The string's content as written (escapes kept), and its end:
        // a multi-line string may end with up to two more quotes.
        let mut j = i + open;
        let mut body = String::new();
        while j < chars.len() {
            if c == '"' && chars[j] == '\\' {
                body.extend(chars.get(j..j + 2).unwrap_or(&chars[j..]));
                j += 2;
                continue;
            }
            if (multi && starts(j, c) && !starts(j + 1, c)) || (!multi && chars[j] == c) {
                break;
            }
            body.push(chars[j]);
            j += 1;
        }
        let close = (j + open).min(chars.len());
        let hostile = |ch: char| is_unsafe(ch) && !(multi && ch == '\n');
        if c == '"' {
            out.extend(&chars[i..i + open]);
            for ch in body.chars() {
                if hostile(ch) {
                    push_toml_escape(&mut out, ch);
                } else {
                    out.push(ch);
                }
            }
            out.extend(&chars[j.min(chars.len())..close]);
        } else if body.chars().any(hostile) {
            let quotes = if multi { "\"\"\"" } else { "\"" };
            out.push_str(quotes);
            for ch in body.chars() {
                match ch {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    ch if hostile(ch) => push_toml_escape(&mut out, ch),
                    ch => out.push(ch),
                }
            }
            out.push_str(quotes);
        } else {
            out.extend(&chars[i..close]);
        }
        i = close;
    }
    out
}

/// `c` as a TOML basic string's escape.
fn push_toml_escape(out: &mut String, c: char) {
    use std::fmt::Write;
    let n = c as u32;
    let _ = if n <= 0xffff {
        write!(out, "\\u{n:04X}")
    } else {
        write!(out, "\\U{n:08X}")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hidden_or_controlling_character_is_replaced() {
        let hostile = "a\u{1b}[2J\u{9b}\u{202e}\u{200b}\u{200d}\u{2060}\u{2064}\u{feff}\u{ad}\u{e0041}\u{2028}\tb";
        let blank = safe(hostile, Unsafe::Blank);
        assert!(blank.starts_with('a') && blank.ends_with('b'), "{blank:?}");
        assert!(!blank.chars().any(is_unsafe), "{blank:?}");
        let escaped = safe(hostile, Unsafe::Escape);
        assert!(!escaped.chars().any(is_unsafe), "{escaped:?}");
        assert!(escaped.contains("\\u{200b}") && escaped.contains("\\u{e0041}"));
        assert_eq!(safe_lines("x\u{1b}\ny", Unsafe::Blank), "x \ny");
        assert_eq!(safe("plain é", Unsafe::Escape), "plain é");
    }

    /// Whatever style the toml crate picks for a string (basic, literal,
    /// multi-line), the safe output has no character a terminal obeys and
    /// reads back as the same value.
    #[test]
    fn toml_strings_of_every_style_are_escaped_and_read_back_the_same() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct T {
            v: Vec<String>,
        }
        let t = T {
            v: [
                "a\u{9b}2J\u{202e}b",
                "quote\" and \u{9b} C1",
                "back\\slash \u{200b} and 'single'",
                "two\nlines \u{1b}[2J\u{9b}",
                "two\nlines \"q\" \\ \u{e0041}",
                "tab\there",
                "plain é",
                "'''triple''' \u{9b}",
                "ends with quotes \u{9b}\"\"",
            ]
            .map(String::from)
            .to_vec(),
        };
        let raw = toml::to_string_pretty(&t).unwrap();
        let safe = safe_toml(&raw);
        assert!(
            !safe.chars().any(|c| c != '\n' && is_unsafe(c)),
            "{raw}\n=>\n{safe}"
        );
        let back: T = toml::from_str(&safe).unwrap_or_else(|e| panic!("{e}\n{safe}"));
        assert_eq!(back, t, "{raw}\n=>\n{safe}");
    }

    /// A comment outside any string (`config check`'s `# cannot render:
    /// {e}` when the configuration cannot be written as TOML) with an
    /// apostrophe or a quote in it: that quote opened a "string" that ran
    /// into the next line's value and garbled it.
    #[test]
    fn a_quote_in_a_comment_opens_no_string() {
        let raw = "# cannot render: it's \"odd\" \u{9b}\nkey = 'a\u{9b}'\nother = \"b\"\n";
        let safe = safe_toml(raw);
        assert!(!safe.chars().any(|c| c != '\n' && is_unsafe(c)), "{safe}");
        assert!(
            safe.starts_with("# cannot render: it's \"odd\" \\u009B\n"),
            "{safe}"
        );
        let back: toml::Table = toml::from_str(&safe).unwrap_or_else(|e| panic!("{e}\n{safe}"));
        assert_eq!(back["key"].as_str(), Some("a\u{9b}"), "{safe}");
        assert_eq!(back["other"].as_str(), Some("b"), "{safe}");
    }
}
