//! Secrets (client secret, tokens): never printed, never in `Debug` output.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// What every secret prints as.
pub const MASK: &str = "********";

/// A secret string whose `Debug`, `Display` and `Serialize` forms are masked.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The secret itself: only for the one place that must send it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({MASK})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(MASK)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Accepts any scalar: a secret that looks like a number (an environment
    /// variable parsed as one, say) must not fail with an error quoting it.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl serde::de::Visitor<'_> for Scalar {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        deserializer.deserialize_any(Scalar)
    }
}

/// The secret a file (or a pasted value) holds: without surrounding
/// whitespace (a trailing newline, CRLF) and without a leading UTF-8 byte
/// order mark, which some editors write (Notepad, PowerShell 5's
/// `-Encoding UTF8`) and `str::trim` keeps: a token sent with it is
/// refused, and a refused refresh token tells the operator to have the pro
/// re-authorize for a token that was fine. No token, code or secret
/// starts with U+FEFF.
pub fn trim_secret(text: &str) -> &str {
    text.trim().trim_start_matches('\u{feff}').trim()
}

/// Replaces `path` with `bytes` atomically, mode 0600, through `temp` (a
/// sibling): a crash leaves the old content or the new, a link planted at
/// either is replaced or refused, not followed, and the directory is synced
/// so the rename survives a power loss. `write` writes the bytes (tests make
/// it fail part way, as a full disk does); a failed write leaves `path`
/// untouched and removes `temp`. A `temp` left by a process that died
/// writing it is removed first.
pub fn replace_private(
    path: &std::path::Path,
    temp: &std::path::Path,
    bytes: &[u8],
    write: &dyn Fn(&mut std::fs::File, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    replace_private_checked(path, temp, bytes, write, &|| Ok(()))
}

/// [`replace_private`], asking `before_rename` last, just before the
/// rename: its error leaves `path` untouched (and removes `temp`).
pub fn replace_private_checked(
    path: &std::path::Path,
    temp: &std::path::Path,
    bytes: &[u8],
    write: &dyn Fn(&mut std::fs::File, &[u8]) -> std::io::Result<()>,
    before_rename: &dyn Fn() -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        // create_new: never through a link planted there.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temp)?;
        write(&mut f, bytes)?;
        f.sync_all()?;
        before_rename()?;
        std::fs::rename(temp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_form_is_masked() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn a_secret_is_read_without_a_byte_order_mark_or_line_ends() {
        assert_eq!(trim_secret("\u{feff}tok\r\n"), "tok");
        assert_eq!(trim_secret(" \u{feff} tok \n"), "tok");
        assert_eq!(trim_secret("\u{feff}\r\n"), "");
        assert_eq!(trim_secret("a\u{feff}b"), "a\u{feff}b");
    }
}
