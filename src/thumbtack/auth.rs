//! Access tokens per business: static ones from a file, or OAuth
//! refresh-token grants whose single-use, rotating refresh tokens are stored
//! durably before the access token they came with is used.
//!
//! A grant (one pro's authorization) is named by its `refresh_token_file`;
//! businesses naming the same file share one chain: one refresh at a time,
//! one stored token, one re-authorization flag. A refresh and the write of
//! its rotated token run as one detached task that no caller can cancel;
//! shutdown waits for it ([`Auth::settle`]). Persistence goes through
//! [`GrantStore`] and what a person must see through [`AuthRecorder`]: this
//! module knows the token endpoint, not SQL.

use super::client::{BodyError, read_body};
use super::model::{OAuthError, TokenResponse};
use super::problem::{ApiError, Disposition};
use crate::config::{Config, TokenSource};
use crate::secret::Secret;
use crate::store::tokens::{
    GrantWrite, StoredGrant, Written, note_over, sent_note, sha256_hex, unsaved_by,
    unsaved_token_sha256,
};
use base64::Engine;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// Assumed lifetime of an access token whose response gives no `expires_in`.
const DEFAULT_EXPIRES_IN: u64 = 3600;
/// The shortest lifetime believed. (Real tokens live an hour; the
/// sandbox's tests use seconds.) `expires_in: 0` — or a negative one, read
/// as 0 — counts as absent: flooring it at this would still refresh, and
/// rotate the refresh token, every second while requests go out; a 401
/// gets a refresh anyway (at most one a minute).
const MIN_EXPIRES_IN: u64 = 1;
/// The longest lifetime believed (Thumbtack's tokens live an hour). A
/// larger `expires_in` (`1e300`, a typo) would overflow the clocks' sums —
/// a panic between the token endpoint's answer and the write of the
/// rotated token, which loses the token — and keep a token cached forever.
const MAX_EXPIRES_IN: u64 = 86_400;
/// How often refreshes are tried again while the OAuth client is refused.
pub const CLIENT_REFUSED_RETRY: Duration = Duration::from_secs(300);
/// Immediate retries of a refresh whose response was lost (Thumbtack's grace period).
const LOST_RESPONSE_RETRIES: usize = 2;

/// The largest token response read (one is a few hundred bytes).
const MAX_TOKEN_BODY_BYTES: usize = 1 << 20;
/// While stopping: the time kept after a token request for storing its
/// rotated token, and the shortest request worth sending in what remains.
const STORE_RESERVE: Duration = Duration::from_millis(500);
const SHORTEST_RETRY: Duration = Duration::from_secs(1);
/// At most one refresh per grant per this interval because of 401s (or
/// half the token's lifetime, when shorter).
const REFRESH_ON_401_INTERVAL: Duration = Duration::from_secs(60);

/// A rotated token held unsaved is written again on its own after this,
/// then twice as long each time, up to [`UNSAVED_RETRY_MAX`].
const UNSAVED_RETRY_FIRST: Duration = Duration::from_secs(1);
const UNSAVED_RETRY_MAX: Duration = Duration::from_secs(60);

/// A boxed future, for the object-safe traits below.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where grants are kept (the token store). Calls block: auth runs them on
/// the blocking pool.
pub trait GrantStore: Send + Sync {
    /// The grant's stored state (adopting a moved or older row, see the store).
    fn load(
        &self,
        grant: &str,
        seed_sha256: Option<&str>,
        businesses: &[String],
    ) -> anyhow::Result<Option<StoredGrant>>;
    /// A compare-and-set write on the generation.
    fn save(&self, grant: &str, expected: i64, write: &GrantWrite) -> anyhow::Result<Written>;
    /// Marks the stored token refused, if the generation is still `expected`.
    fn refuse(
        &self,
        grant: &str,
        expected: i64,
        file_sha256: Option<&str>,
        reason: &str,
    ) -> anyhow::Result<bool>;
    /// Remembers a refused token file content while the stored chain is kept.
    fn refuse_file(&self, grant: &str, file_sha256: &str) -> anyhow::Result<()>;
    /// Forgets an access token the API refused.
    fn forget_access(&self, grant: &str, access_token: &Secret) -> anyhow::Result<()>;
    /// The grant's cross-process lock, if free now.
    fn try_lock(&self, grant: &str) -> anyhow::Result<Option<Box<dyn Send>>>;
    /// What was recorded of a refresh whose answer was not stored (by the
    /// lock's holder), if anything.
    fn refresh_note(&self, _grant: &str) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// Records durably that a refresh is being sent (`Some`), or that its
    /// answer is stored or was never rotated (`None`).
    fn set_refresh_note(&self, _grant: &str, _note: Option<&str>) -> anyhow::Result<()> {
        Ok(())
    }
    /// Takes the grant's "unsaved" lock (by the lock's holder, whose store
    /// refused its rotated token), held until the token is stored or
    /// superseded: how another process knows a live one keeps it.
    fn lock_unsaved(&self, _grant: &str) -> anyhow::Result<Option<Box<dyn Send>>> {
        Ok(None)
    }
    /// Whether a live process holds the grant's rotated token unsaved (its
    /// "unsaved" lock is held).
    fn unsaved_held(&self, _grant: &str) -> anyhow::Result<bool> {
        Ok(false)
    }
    /// Records durably that this process holds the grant's rotated token in
    /// memory, unsaved (by the lock's holder): a moved token file must not
    /// take the chain from under it until it is stored.
    /// `over_generation`: the stored generation its write is to replace;
    /// `token_sha256`: the token's fingerprint (leadsync keeps it in the
    /// token file too: a file moved since that holds it is not a new grant).
    fn note_unsaved(
        &self,
        _grant: &str,
        _over_generation: i64,
        _token_sha256: &str,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    /// Whether a write to the store works now (a committed, synced write
    /// transaction): asked before a single-use authorization code is spent.
    fn check_writable(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// What a person must see (`status`, the mirror), recorded by the caller.
pub trait AuthRecorder: Send + Sync {
    /// These businesses need re-authorization (`Some(reason)`) or no longer do.
    fn needs_reauth(&self, business_ids: Vec<String>, reason: Option<String>) -> BoxFuture;
    /// An operator-visible condition, set (`Some`) or cleared, by key.
    fn alert(&self, key: String, message: Option<String>) -> BoxFuture;
}

/// The grant's `lock` with its "unsaved" lock taken too, for a rotated
/// token held unsaved; dropped in this order: the unsaved lock, then the
/// grant's.
async fn with_unsaved_lock(
    store: &Arc<dyn GrantStore>,
    chain: &Chain,
    lock: Box<dyn Send>,
) -> Box<dyn Send> {
    let (s, key) = (store.clone(), chain.key.clone());
    let held = blocking(move || s.lock_unsaved(&key))
        .await
        .unwrap_or_else(|e| {
            warn!(grant = %chain.file.display(), error = %format!("{e:#}"),
                "cannot take the grant's unsaved lock: other processes \
                 wait for this one's lock instead of being told at once");
            None
        });
    Box::new((held, lock))
}

/// A stop with the chain's rotated token still unsaved: said loudly.
fn stops_unsaved(chain: &Chain, error: &str) {
    error!(grant = %chain.file.display(), error = %error,
        "leadsync stops with a rotated refresh token it could not store: that token ends with \
         this process, and the stored one was spent by the refresh that rotated it; the grant \
         must be re-authorized (`leadsync auth exchange`) unless Thumbtack still accepts the \
         stored one (its grace period for retries)");
}

/// The alert key of a refused OAuth client.
pub const CLIENT_ALERT: &str = "oauth-client";

/// The OAuth client (SPEC §5 token endpoint).
#[derive(Clone)]
struct OAuthClient {
    token_url: String,
    audience: String,
    client_id: String,
    client_secret: Secret,
}

impl OAuthClient {
    /// `Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
    fn basic(&self) -> Secret {
        let enc = |v: &str| {
            serde_urlencoded::to_string([("v", v)])
                .map(|s| s[2..].to_string())
                .unwrap_or_default()
        };
        let pair = format!(
            "{}:{}",
            enc(&self.client_id),
            enc(self.client_secret.expose())
        );
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
    }
}

#[derive(Clone)]
struct Access {
    token: Secret,
    expires_at: Instant,
}

/// A rotated refresh token the store has not taken yet.
struct Unsaved {
    expected: i64,
    write: GrantWrite,
    access: Access,
    error: String,
    /// The grant's cross-process lock, held until the token is stored (or
    /// superseded): it is how every other process — and a moved token file
    /// — knows a live process holds the only valid refresh token. A pid in
    /// the lock file cannot say so: under systemd's `ProtectProc=invisible`
    /// another user's process is not in /proc. The lock ends with the
    /// process, whatever ends it. `None` only after the store's write task
    /// failed (panicked) with it and it could not be taken again.
    lock: Option<Box<dyn Send>>,
    /// Fingerprint of the token file's content when the refresh was sent
    /// (`None`: empty or unreadable): the file is replaced by the rotated
    /// token only while it still holds that, never over a grant a person
    /// put there since.
    file_seen: Option<String>,
    /// Whether the rotated token is in the token file too (see [`Inner::keep_in_file`]).
    in_file: InFile,
}

/// An unsaved rotated token's copy in the grant's token file.
#[derive(Clone, Copy, PartialEq)]
enum InFile {
    /// Not written (yet): tried again with the token's next write.
    No,
    /// Written: the next refresh presents it, whatever process makes it.
    Yes,
    /// Written, but its directory's fsync failed: there, yet maybe not
    /// after a power loss (synced again with the token's next write).
    Unsynced,
    /// Not written: the file holds a grant a person put there since.
    Superseded,
}

impl InFile {
    /// Whether the token file holds the token.
    fn there(self) -> bool {
        matches!(self, InFile::Yes | InFile::Unsynced)
    }
}

/// What [`Inner::keep_in_file`] did.
enum Kept {
    /// The file holds another grant than the refresh was sent with.
    Changed,
    /// The file cannot be read: not written over.
    Unreadable(String),
    /// Written (the error of a failed step, if any; whether the file holds
    /// the token now).
    Written(Option<String>, bool),
}

#[derive(Default)]
struct ChainState {
    access: Option<Access>,
    unsaved: Option<Unsaved>,
    /// Until when the access token counts as fresh: a 401 then is not
    /// about expiry, and refreshing again would only burn a rotation.
    fresh_until: Option<Instant>,
    /// Fingerprint of an access token the API refused: never adopted again.
    refused_access: Option<String>,
}

/// One grant's chain of refresh tokens. Never dropped while the process
/// runs, so a reload keeps its lock and any unsaved token.
struct Chain {
    key: String,
    file: PathBuf,
    state: Arc<tokio::sync::Mutex<ChainState>>,
    reauth: Mutex<Option<String>>,
    /// A refresh unit of this chain is running (what a stop cut short names).
    refreshing: AtomicBool,
    /// A task writes the chain's unsaved rotated token again on its own
    /// (changed only while holding `state`).
    retrying_unsaved: AtomicBool,
    /// Its token file could not be read while a stored chain was used
    /// (said once).
    file_unreadable: AtomicBool,
}

/// A static bearer token from a file.
struct StaticToken {
    business_id: String,
    file: PathBuf,
    state: Mutex<(Option<Secret>, Option<String>)>,
    reauth: Mutex<Option<String>>,
}

#[derive(Clone)]
enum Member {
    Static(Arc<StaticToken>),
    Grant(Arc<Chain>),
}

struct Inner {
    http: reqwest::Client,
    timeout: Duration,
    oauth: RwLock<Option<OAuthClient>>,
    /// Set at start, or by the reload that adds the first OAuth business.
    store: std::sync::OnceLock<Arc<dyn GrantStore>>,
    recorder: Option<Arc<dyn AuthRecorder>>,
    members: RwLock<HashMap<String, Member>>,
    chains: Mutex<HashMap<String, Arc<Chain>>>,
    /// Why the OAuth client is refused, and since when.
    client_refused: Mutex<Option<(String, Instant)>>,
    /// This process has cleared the client alert (a previous run may have left one).
    client_alert_cleared: AtomicBool,
    /// Refresh units in flight (shutdown waits for them).
    tasks: TaskTracker,
    /// Cancelled when the daemon stops: no new refresh starts, no new
    /// request is sent, and a refresh already sent has until
    /// `refresh_deadline` to finish and store its rotated token.
    stopping: CancellationToken,
    refresh_deadline: Mutex<Option<Instant>>,
    /// Notified when [`Auth::settle`] starts: the tasks writing unsaved
    /// tokens again end, and settle makes the last try itself.
    settling: tokio::sync::Notify,
    /// The configured chains' token files as last looked at (see
    /// [`Inner::twin_file`]): when, and each file's metadata and content
    /// fingerprint. A look reads again only the files whose metadata
    /// changed, and serves every check that started before it.
    file_index: tokio::sync::Mutex<FileIndex>,
}

/// What [`Inner::file_index`] keeps.
#[derive(Default)]
struct FileIndex {
    /// When the last look started.
    looked: Option<Instant>,
    /// The same, by the wall clock file times are in: a file modified or
    /// changed at or after it (less a second, for filesystems' coarse
    /// clocks) is read again at the next look even if its metadata is
    /// unchanged (Git's "racily clean" rule: a same-length rewrite in the
    /// tick in which the look read it leaves its metadata as then).
    looked_wall: Option<std::time::SystemTime>,
    /// Token file → its metadata (device, inode, length, modification and
    /// change times) and content fingerprint (None: empty or unreadable).
    files: HashMap<PathBuf, (FileStamp, Option<String>)>,
}

type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

fn file_stamp(file: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Token providers for every configured business.
pub struct Auth {
    inner: Arc<Inner>,
}

/// Why a refresh did not produce a token.
enum Failure {
    /// Try again later.
    Retry(String),
    /// The grant was refused: a person must re-authorize.
    Reauth(String),
    /// The application's OAuth configuration is refused; no business is at fault.
    ClientRefused(String),
    /// The daemon is stopping: no refresh was sent, the stored token stays valid.
    Stopping(String),
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> ApiError {
        match f {
            Failure::Retry(m) => ApiError::retry(None, m),
            Failure::Reauth(m) => ApiError::reauth(m),
            Failure::ClientRefused(m) => client_refused_error(&m),
            Failure::Stopping(m) => stopping_error(&m),
        }
    }
}

/// Work refused because the daemon is stopping waits for the next start:
/// nothing was sent, no attempt counts, and no business is marked (its own
/// disposition, so that it is never taken for a re-authorization).
pub fn stopping_error(m: &str) -> ApiError {
    ApiError {
        disposition: Disposition::Stopping,
        http_status: None,
        trace_id: None,
        retry_after: None,
        from_api: false,
        message: format!("not sent: {m}"),
    }
}

/// Rows of a business whose OAuth client is refused wait like those of a
/// business needing re-authorization: a person must act, no attempt counts.
fn client_refused_error(m: &str) -> ApiError {
    ApiError {
        disposition: Disposition::Reauth,
        http_status: None,
        trace_id: None,
        retry_after: None,
        from_api: false,
        message: format!("OAuth client refused: {m}"),
    }
}

/// What the token endpoint answered.
enum TokenFailure {
    /// `invalid_grant`: this grant is refused.
    GrantRefused(String),
    /// The client's configuration is refused (`invalid_client`, a wrong audience, ...).
    ClientRefused(String),
    /// The request may have been processed but the answer was lost (a
    /// dropped connection, an unreadable body, a 5xx).
    Lost(String),
    /// Not processed, or not worth an immediate retry: later.
    Transient(String),
}

/// The grant key of a refresh token file: its canonical path.
pub fn grant_key(file: &Path) -> String {
    file.canonicalize()
        .unwrap_or_else(|_| file.to_path_buf())
        .display()
        .to_string()
}

fn read_token_file(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map(|s| crate::secret::trim_secret(&s).to_string())
        .map_err(|e| Failure::Retry(format!("cannot read token file {}: {e}", path.display())))
}

/// The sibling through which `write_private` replaces `path`.
fn temp_of(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.leadsync-tmp"))
}

/// Whether `write_private` can create its temporary file next to `path`
/// (a directory the service user cannot write refuses it): asked before a
/// single-use code is spent, whose refresh token would otherwise be lost.
/// Its own name: another run's temporary file, mid-write, is left alone.
fn probe_replaceable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // write_private removes a stale temporary file, but not a directory.
    if std::fs::symlink_metadata(temp_of(path)).is_ok_and(|m| m.is_dir()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} is a directory", temp_of(path).display()),
        ));
    }
    let mut tmp = temp_of(path).into_os_string();
    tmp.push(format!("-probe-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::fs::remove_file(&tmp)
}

/// Opens (creating, mode 0600) the token file `auth exchange --token-file`
/// writes, never through a link: one planted after the caller's check must
/// not make it create, or chmod, the file it points to. (libc is not a
/// dependency, so no O_NOFOLLOW: O_CREAT|O_EXCL never follows a link, and
/// an existing file opened is checked to be the one at the path.)
fn open_token_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => return Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let (opened, named) = (f.metadata()?, std::fs::symlink_metadata(path)?);
    if !named.is_file() || (opened.dev(), opened.ino()) != (named.dev(), named.ino()) {
        return Err(std::io::Error::other(
            "a symbolic link or not a regular file: refusing it",
        ));
    }
    Ok(f)
}

/// Refuses a token file `auth exchange --token-file` would overwrite: one
/// holding anything but whitespace (another grant's token, or a file
/// named by mistake), or one that cannot be read to tell. The code is
/// not spent when this refuses.
fn refuse_held(file: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    const MOST: u64 = 4096;
    let held = (|| -> std::io::Result<bool> {
        let mut bytes = Vec::new();
        std::fs::File::open(file)?
            .take(MOST + 1)
            .read_to_end(&mut bytes)?;
        // Whitespace and an editor's byte order mark are empty, as they
        // are when the file is read.
        Ok(bytes.len() as u64 > MOST
            || !crate::secret::trim_secret(&String::from_utf8_lossy(&bytes)).is_empty())
    })();
    match held {
        Ok(false) => Ok(()),
        Ok(true) => anyhow::bail!(
            "the token file {} is not empty (another grant's token? a previous onboarding may \
             have written it): --token-file onboards a new grant into a new or empty file; to \
             re-authorize configured businesses use --business ID; to replace this grant on \
             purpose, move the file aside first (keep it until the new grant works). The code \
             was not spent",
            file.display()
        ),
        Err(e) => anyhow::bail!(
            "cannot read the token file {} to check that it holds no other grant ({e}): \
             refusing it. The code was not spent",
            file.display()
        ),
    }
}

/// Refuses onboarding into an empty token file whose grant the token store
/// holds alone: the file's write failed after an earlier exchange's code
/// was spent (the store took the grant, keyed by the file's path). A new
/// grant there would replace it without a word. A row Thumbtack refused
/// is no grant to keep. The code is not spent when this refuses.
async fn refuse_stored_only(store: &Arc<dyn GrantStore>, chain: &Chain) -> anyhow::Result<()> {
    let (s, key) = (store.clone(), chain.key.clone());
    let row = blocking(move || s.load(&key, None, &[]))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the token store to check that it holds no grant for the token file {} \
             ({e:#}): refusing it. The code was not spent",
                chain.file.display()
            )
        })?;
    let file = read_token_file(&chain.file).unwrap_or_default();
    match row {
        Some(g)
            if g.refused.is_none()
                && !g.refresh_token.expose().is_empty()
                && g.refresh_token.expose() != file =>
        {
            anyhow::bail!(
                "the token file {} is empty, but the token store holds a grant for it (an \
                 earlier exchange could not write the file and kept the grant in the store \
                 alone): a new grant here would replace it. Onboard the new grant into another \
                 file (--token-file NEW_FILE); to re-authorize the businesses on that grant, \
                 configure them with refresh_token_file = {} and use --business ID. The code \
                 was not spent",
                chain.file.display(),
                chain.file.display()
            )
        }
        _ => Ok(()),
    }
}

/// Replaces `path` with `text` atomically, mode 0600: a crash leaves the
/// old content or the new, and a link planted at `path` is replaced, not
/// followed.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    crate::secret::replace_private(path, &temp_of(path), text.as_bytes(), &|f, b| {
        f.write_all(b)
    })
}

/// A grant's businesses as its list answered them.
#[derive(Debug, Default)]
pub struct BusinessList {
    /// (id, name) of each business read.
    pub list: Vec<(String, Option<String>)>,
    /// Warnings about what the list left unread.
    pub notes: Vec<String>,
    /// False when the grant may cover businesses not in `list`: a page
    /// that could not be read, paging that did not advance or was not
    /// proven at its end, or an entry without a readable `businessID`.
    pub complete: bool,
}

/// Why a page of the business list could not be read.
#[derive(Debug)]
pub struct PageError {
    pub error: anyhow::Error,
    /// The server answered 4xx (429 aside): it refuses that page, which
    /// after a short page means there is none; anything else (network,
    /// 5xx, 429, an unreadable body) says nothing of what remains.
    pub refused: bool,
}

impl From<anyhow::Error> for PageError {
    fn from(error: anyhow::Error) -> PageError {
        PageError {
            error,
            refused: false,
        }
    }
}

/// One page of `GET /api/v4/businesses`: its businesses (id, name),
/// warnings about entries it could not read, and what it says of the next.
#[derive(Debug, Default)]
pub struct BusinessPage {
    pub list: Vec<(String, Option<String>)>,
    pub notes: Vec<String>,
    /// Entries on the page, readable or not (the next offset counts them).
    pub entries: usize,
    /// `pagination.limit`, when echoed (Thumbtack answers `{limit: 20}`).
    pub limit: Option<u64>,
    /// `pagination.next` (a URL) or a top-level `next`.
    pub next: Option<String>,
    /// `nextPageToken` (sent back as `pageToken`).
    pub next_page_token: Option<String>,
}

/// Reads one page of a `GET /api/v4/businesses` answer. An answer holding
/// no list is an error, not a grant covering nothing; an entry without a
/// readable id is named.
pub fn business_page(body: &[u8]) -> anyhow::Result<BusinessPage> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| anyhow::anyhow!("the business list is not JSON ({} bytes)", body.len()))?;
    let Some(entries) = v
        .get("data")
        .and_then(|d| d.as_array())
        .or_else(|| v.as_array())
    else {
        let keys = v
            .as_object()
            .map(|o| {
                o.keys()
                    .take(8)
                    .map(|k| excerpt(k).chars().take(40).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        anyhow::bail!(
            "the business list answer holds no list of businesses (expected {{\"data\": [...]}}; \
             top-level keys: {})",
            if keys.is_empty() { "none" } else { &keys }
        );
    };
    let mut notes = Vec::new();
    let mut list = Vec::with_capacity(entries.len());
    for (i, b) in entries.iter().enumerate() {
        let name = b.get("name").and_then(|n| n.as_str()).map(str::to_string);
        let id = match b.get("businessID") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        match id {
            Some(id) => list.push((id, name)),
            None => notes.push(format!(
                "entry {} of {} in the business list has no readable businessID{}: skipped",
                i + 1,
                entries.len(),
                name.map(|n| format!(" (name \"{}\")", excerpt(&n)))
                    .unwrap_or_default()
            )),
        }
    }
    let pagination = v.get("pagination");
    let text = |k: &str| {
        pagination
            .and_then(|p| p.get(k))
            .or_else(|| v.get(k))
            .and_then(|x| x.as_str())
            .filter(|x| !x.is_empty())
            .map(str::to_string)
    };
    Ok(BusinessPage {
        list,
        notes,
        entries: entries.len(),
        limit: pagination
            .and_then(|p| p.get("limit"))
            .and_then(|l| l.as_u64())
            .filter(|l| *l > 0),
        next: text("next"),
        next_page_token: text("nextPageToken").or_else(|| text("pageToken")),
    })
}

/// The query of the business list's page after `page` (`None`: none
/// named): `next`'s query, only from `base_url`'s host or Thumbtack's;
/// else `nextPageToken` as `pageToken`; else, on a page echoing its
/// `limit` (Thumbtack names no next page), the next `offset`.
fn next_business_query(
    base_url: &str,
    page: &BusinessPage,
    offset: usize,
) -> Result<Option<String>, String> {
    if let Some(next) = &page.next {
        let base =
            reqwest::Url::parse(base_url).map_err(|e| format!("api.base_url is not a URL: {e}"))?;
        use super::paging::{NextRefused, resolve_next};
        let url = resolve_next(&base, next).map_err(|refused| match refused {
            NextRefused::NotUrl(e) => format!("its pagination.next is not a URL: {e}"),
            NextRefused::OtherHost(host) => format!(
                "its pagination.next names another host ({}), never followed",
                excerpt(&host)
            ),
        })?;
        return match url.query().filter(|q| !q.is_empty()) {
            Some(q) => Ok(Some(q.to_string())),
            None => Err("its pagination.next names no page (no query)".into()),
        };
    }
    if let Some(t) = &page.next_page_token {
        return Ok(Some(
            serde_urlencoded::to_string([("pageToken", t.as_str())]).unwrap_or_default(),
        ));
    }
    Ok(page.limit.map(|l| format!("limit={l}&offset={offset}")))
}

/// Pages of the business list read at most.
pub const MAX_BUSINESS_PAGES: usize = 100;

/// How a warning that the business list may be incomplete begins.
pub const MAY_COVER_MORE: &str = "the grant may cover more businesses";

/// Tries of one page of the business list while it fails transiently.
pub const BUSINESS_PAGE_ATTEMPTS: u32 = 3;
/// The wait before trying a page again when the server names none.
pub const BUSINESS_RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before trying a page again (`Retry-After` included).
pub const BUSINESS_RETRY_CAP: Duration = Duration::from_secs(10);

/// The wait before trying a page of the business list again after an
/// answer of `status` (`None`: not transient, not tried again): its
/// `Retry-After` (`0` or a past date: the backoff) up to the cap.
fn business_retry_wait(status: u16, retry_after: Option<Duration>) -> Option<Duration> {
    (status == 429 || (500..600).contains(&status)).then(|| {
        retry_after
            .unwrap_or(BUSINESS_RETRY_BACKOFF)
            .clamp(BUSINESS_RETRY_BACKOFF, BUSINESS_RETRY_CAP)
    })
}

/// Reads every page of the business list, each asked of `fetch` by its
/// query (`""` first): `next`, `nextPageToken`, or (Thumbtack echoes only
/// `{limit}`) the next `offset`, until an empty page, at most
/// [`MAX_BUSINESS_PAGES`]. A first page that fails is an error; a later
/// one, or paging that does not advance, keeps the businesses read and
/// warns that the grant may cover more. A page shorter than its limit
/// proves the end only until a page after one brings new businesses (a
/// server capping pages below the limit it echoes). An empty offset page
/// after a full one proves the end only when `limit=2&offset={end-1}`
/// answers the last business read first: a server reading `offset` as a
/// page number answers an empty page there with more businesses unread.
pub async fn read_business_list(
    base_url: &str,
    mut fetch: impl AsyncFnMut(&str) -> Result<BusinessPage, PageError>,
) -> anyhow::Result<BusinessList> {
    let mut query = String::new();
    let mut asked = std::collections::HashSet::from([String::new()]);
    let mut seen = std::collections::HashSet::new();
    let (mut all, mut notes) = (Vec::new(), Vec::new());
    let mut offset = 0usize;
    // The page before was shorter than its limit (and that still proves
    // the end), or full and asked on by offset (its last business, if read).
    let mut after_short = false;
    let mut shorts_lie = false;
    let mut after_full_offset: Option<Option<String>> = None;
    let mut skipped = false;
    // Why the list may cover more (`None`: read to its proven end).
    let why: Option<String> = 'list: {
        for n in 0..MAX_BUSINESS_PAGES {
            let page = match fetch(&query).await {
                Ok(page) => page,
                Err(e) if n == 0 => return Err(e.error),
                // After a page shorter than its limit, the offset past it
                // only confirms the end: a server refusing `offset` (which
                // Thumbtack does not document) leaves nothing unread. An
                // outage there (5xx, 429, network) proves nothing.
                Err(e) if after_short && e.refused => {
                    debug!(error = %format!("{:#}", e.error), "the page after a short page of the business list was refused");
                    break 'list None;
                }
                Err(e) => {
                    break 'list Some(format!(
                        "its page {} could not be read ({:#})",
                        n + 1,
                        e.error
                    ));
                }
            };
            notes.extend(page.notes.iter().cloned());
            // An entry without a readable id: that business gets no conf file.
            skipped |= page.list.len() < page.entries;
            let before = all.len();
            all.extend(
                page.list
                    .iter()
                    .filter(|(id, _)| seen.insert(id.clone()))
                    .cloned(),
            );
            if after_short && all.len() > before {
                shorts_lie = true;
            }
            offset += page.entries;
            if page.entries == 0 {
                if let Some(last) = after_full_offset.take() {
                    let proof = format!("limit=2&offset={}", offset.saturating_sub(1));
                    // No last business read (its entry unreadable): nothing
                    // to prove the end by, so nothing is asked.
                    let proven = match &last {
                        Some(last) => fetch(&proof)
                            .await
                            .is_ok_and(|p| p.list.first().is_some_and(|(id, _)| id == last)),
                        None => false,
                    };
                    if !proven {
                        break 'list Some(format!(
                            "page {} (offset {offset}) is empty after a full page, and the list \
                         asked at offset {} does not begin with the last business read: the \
                         server may not read `offset` as a count of businesses",
                            n + 1,
                            offset.saturating_sub(1)
                        ));
                    }
                }
                break 'list None;
            }
            let next = match next_business_query(base_url, &page, offset) {
                Ok(Some(q)) => q,
                Ok(None) => break 'list None,
                Err(e) => break 'list Some(format!("page {} of the list: {e}", n + 1)),
            };
            // A page of businesses already read: a server ignoring the
            // offset (or a token) serves the same page again. After a page
            // shorter than its limit that is the whole list.
            let by_offset = page.next.is_none() && page.next_page_token.is_none();
            let short =
                !shorts_lie && by_offset && page.limit.is_some_and(|l| (page.entries as u64) < l);
            if all.len() == before && page.list.len() == page.entries {
                if !short {
                    break 'list Some(format!(
                        "page {} lists only businesses of earlier pages: its paging does not advance",
                        n + 1
                    ));
                }
                break 'list None;
            }
            if !asked.insert(next.clone()) {
                break 'list Some(format!(
                    "the list names a page it already answered (?{next})"
                ));
            }
            after_short = short;
            after_full_offset = (by_offset && !short).then(|| {
                (page.list.len() == page.entries)
                    .then(|| page.list.last().map(|(id, _)| id.clone()))
                    .flatten()
            });
            query = next;
        }
        Some(format!(
            "the list still names a next page after {MAX_BUSINESS_PAGES} pages"
        ))
    };
    if let Some(why) = &why {
        notes.push(format!(
            "{MAY_COVER_MORE} than the {} listed: {why}; configure any other business of the \
             pro's with a conf.d file naming the same refresh_token_file",
            all.len()
        ));
    }
    Ok(BusinessList {
        list: all,
        notes,
        complete: why.is_none() && !skipped,
    })
}

/// A short, printable excerpt of a server-written description (never a token body):
/// the characters [`crate::terminal::is_unsafe`] names are spaces, as in
/// every other piece of server text shown ([`crate::terminal::blank`]).
fn excerpt(s: &str) -> String {
    crate::terminal::blank(s).chars().take(200).collect()
}

/// How a token endpoint's redirect is told ([`TokenFailure::Transient`]).
const REDIRECTED: &str = "redirected to";
/// How a token endpoint that could not be reached is told.
const UNREACHABLE: &str = "token endpoint unreachable";

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<R> + Send + 'static,
) -> anyhow::Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("token store task failed: {e}"))?
}

fn wall_after(d: Duration) -> String {
    let now = chrono::Utc::now();
    let at = chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now);
    crate::time::fmt(at)
}

fn instant_of(rfc3339: &str) -> Option<Instant> {
    let at = crate::time::parse(rfc3339)?;
    let left = (at - chrono::Utc::now()).to_std().ok()?;
    Instant::now().checked_add(left.min(Duration::from_secs(MAX_EXPIRES_IN)))
}

impl Auth {
    /// Providers for the configuration's businesses. `store` keeps grants
    /// (required once a business uses the refresh-token grant); `recorder`
    /// records re-authorization flags and alerts. `needs_reauth` carries the
    /// flags a previous run left (business id → reason).
    pub fn new(
        config: &Config,
        store: Option<Arc<dyn GrantStore>>,
        recorder: Option<Arc<dyn AuthRecorder>>,
        needs_reauth: HashMap<String, String>,
    ) -> anyhow::Result<Auth> {
        let timeout = Duration::from_secs(config.file.api.timeout_secs);
        let http = super::client::http_client(timeout, &config.file.api.user_agent)?;
        let auth = Auth {
            inner: Arc::new(Inner::new(http, timeout, store, recorder)),
        };
        auth.reconfigure(config);
        for (id, reason) in needs_reauth {
            if let Some(m) = auth.inner.member(&id) {
                let slot = match &m {
                    Member::Static(s) => &s.reauth,
                    Member::Grant(c) => &c.reauth,
                };
                if let Ok(mut r) = slot.lock() {
                    *r = Some(reason);
                }
            }
        }
        Ok(auth)
    }

    /// Whether rotated refresh tokens can be stored (the token store is open).
    pub fn has_grant_store(&self) -> bool {
        self.inner.store.get().is_some()
    }

    /// Gives a daemon started without an OAuth business its token store,
    /// when a reload adds the first one; a store already set is kept.
    pub fn set_grant_store(&self, store: Arc<dyn GrantStore>) {
        let _ = self.inner.store.set(store);
    }

    /// Applies a new configuration. Chains are kept by grant, whatever
    /// happens to the businesses naming them: a reload never loses a refresh
    /// lock or an unsaved rotated token.
    pub fn reconfigure(&self, config: &Config) {
        let oauth = match (&config.file.oauth.client_id, &config.client_secret) {
            (Some(id), Some(secret)) => Some(OAuthClient {
                token_url: config.file.oauth.token_url.clone(),
                audience: config.file.oauth.audience.clone(),
                client_id: id.clone(),
                client_secret: secret.clone(),
            }),
            _ => None,
        };
        if let Ok(mut o) = self.inner.oauth.write() {
            *o = oauth;
        }
        let Ok(mut chains) = self.inner.chains.lock() else {
            return;
        };
        let Ok(mut members) = self.inner.members.write() else {
            return;
        };
        let old = std::mem::take(&mut *members);
        for b in &config.businesses {
            let m = match &b.token {
                TokenSource::Static(file) => match old.get(&b.id) {
                    Some(Member::Static(s)) if s.file == *file => {
                        // Read again at its next use: a reload is how a
                        // new token put in the file is taken (one replaced
                        // because it leaked, or named the wrong account,
                        // must not stay in use until the API refuses it).
                        // What the API refused is still remembered.
                        if let Ok(mut st) = s.state.lock() {
                            st.0 = None;
                        }
                        Member::Static(s.clone())
                    }
                    _ => Member::Static(Arc::new(StaticToken {
                        business_id: b.id.clone(),
                        file: file.clone(),
                        state: Mutex::new((None, None)),
                        reauth: Mutex::new(None),
                    })),
                },
                TokenSource::Refresh(file) => {
                    let key = grant_key(file);
                    let chain = chains
                        .entry(key.clone())
                        .or_insert_with(|| {
                            Arc::new(Chain {
                                key,
                                file: file.clone(),
                                state: Arc::new(tokio::sync::Mutex::new(ChainState::default())),
                                reauth: Mutex::new(None),
                                refreshing: AtomicBool::new(false),
                                retrying_unsaved: AtomicBool::new(false),
                                file_unreadable: AtomicBool::new(false),
                            })
                        })
                        .clone();
                    Member::Grant(chain)
                }
            };
            members.insert(b.id.clone(), m);
        }
    }

    /// Businesses whose rows and passes must wait: they need
    /// re-authorization, or their OAuth client is refused.
    pub fn blocked(&self) -> Vec<String> {
        let Ok(members) = self.inner.members.read() else {
            return Vec::new();
        };
        let client_refused = self.inner.client_refused_now().is_some();
        let mut ids: Vec<String> = members
            .iter()
            .filter(|(_, m)| match m {
                Member::Static(s) => s.reauth.lock().map(|r| r.is_some()).unwrap_or(false),
                Member::Grant(c) => {
                    client_refused || c.reauth.lock().map(|r| r.is_some()).unwrap_or(false)
                }
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Why the business needs re-authorization, if it does.
    pub fn reauth_reason(&self, business_id: &str) -> Option<String> {
        match self.inner.member(business_id)? {
            Member::Static(s) => s.reauth.lock().ok()?.clone(),
            Member::Grant(c) => c.reauth.lock().ok()?.clone(),
        }
    }

    /// Why the OAuth client is refused, while it is.
    pub fn client_refused(&self) -> Option<String> {
        self.inner.client_refused_now()
    }

    /// The businesses whose rows wait because the OAuth client is refused
    /// (every business on a grant), with the reason; empty while it is not.
    pub fn client_refused_businesses(&self) -> Vec<(String, String)> {
        let Some(why) = self.inner.client_refused_now() else {
            return Vec::new();
        };
        let Ok(members) = self.inner.members.read() else {
            return Vec::new();
        };
        members
            .iter()
            .filter(|(_, m)| matches!(m, Member::Grant(_)))
            .map(|(id, _)| (id.clone(), why.clone()))
            .collect()
    }

    /// A valid access token for the business: the cached one, or a new one.
    pub async fn token(&self, business_id: &str) -> Result<Secret, ApiError> {
        let Some(member) = self.inner.member(business_id) else {
            return Err(ApiError::retry(
                None,
                format!("business {business_id} is not in the configuration"),
            ));
        };
        match member {
            Member::Static(s) => self.inner.static_token(&s).await,
            Member::Grant(chain) => {
                let state = chain.state.clone().lock_owned().await;
                if let Some(a) = &state.access
                    && Instant::now() < a.expires_at
                {
                    return Ok(a.token.clone());
                }
                if state.unsaved.is_none()
                    && let Some(m) = self.inner.client_refused_recently()
                {
                    return Err(client_refused_error(&m));
                }
                if self.inner.stopping.is_cancelled() {
                    return Err(stopping_error(
                        "leadsync is stopping and starts no token refresh; it goes at the next start",
                    ));
                }
                // The refresh and the write of its rotated token are one unit
                // that runs to its end even if this caller is cancelled.
                let inner = self.inner.clone();
                let unit = self
                    .inner
                    .tasks
                    .spawn(async move { inner.refresh_unit(chain, state).await });
                match unit.await {
                    Ok(r) => r,
                    Err(e) => Err(ApiError::retry(
                        None,
                        format!("the token refresh task failed: {e}"),
                    )),
                }
            }
        }
    }

    /// Forgets a token the API refused (401), so the next call gets a new
    /// one. Returns false when no refresh will follow: the token came from
    /// a refresh less than a minute ago (a 401 then is not about expiry —
    /// a missing scope, most likely), so refreshing again would only burn
    /// a rotation.
    pub async fn invalidate(&self, business_id: &str, used: &Secret) -> bool {
        let Some(member) = self.inner.member(business_id) else {
            return false;
        };
        match member {
            Member::Static(s) => {
                if let Ok(mut st) = s.state.lock()
                    && st.0.as_ref() == Some(used)
                {
                    st.0 = None;
                    st.1 = Some(sha256_hex(used.expose()));
                }
                true
            }
            Member::Grant(chain) => {
                let mut state = chain.state.lock().await;
                if state.access.as_ref().is_none_or(|a| a.token != *used) {
                    // Another caller already replaced it.
                    return true;
                }
                if state.fresh_until.is_some_and(|t| Instant::now() < t) {
                    return false;
                }
                state.access = None;
                state.refused_access = Some(sha256_hex(used.expose()));
                drop(state);
                if let Some(store) = self.inner.store.get().cloned() {
                    let (key, used) = (chain.key.clone(), used.clone());
                    self.inner.tasks.spawn(async move {
                        let _ = blocking(move || store.forget_access(&key, &used)).await;
                    });
                }
                true
            }
        }
    }

    /// The daemon stops: from now on no refresh starts and no request is
    /// sent ([`Auth::stopping`]); a refresh already sent may finish, ask
    /// again for a lost answer and store its rotated token until
    /// `refresh_deadline`, which [`Auth::settle`] is then given.
    pub fn begin_shutdown(&self, refresh_deadline: Instant) {
        if let Ok(mut d) = self.inner.refresh_deadline.lock() {
            *d = Some(refresh_deadline);
        }
        self.inner.stopping.cancel();
    }

    /// Cancelled once the daemon stops: a request not sent yet is not sent.
    pub fn stopping(&self) -> &CancellationToken {
        &self.inner.stopping
    }

    /// Waits (up to `bound`) for refreshes in flight and the writes of their
    /// rotated tokens; a rotated token still unsaved is tried once more and,
    /// if it cannot be stored, reported loudly, as is a refresh the bound
    /// cut short.
    pub async fn settle(&self, bound: Duration) {
        let inner = &self.inner;
        let until = tokio::time::Instant::now() + bound;
        inner.tasks.close();
        inner.settling.notify_waiters();
        let finished = tokio::time::timeout_at(until, inner.tasks.wait())
            .await
            .is_ok();
        inner.tasks.reopen();
        let chains: Vec<Arc<Chain>> = inner
            .chains
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        for chain in chains {
            if chain.refreshing.load(Ordering::SeqCst) {
                // A refresh the bound cut short: whether Thumbtack rotated
                // the token is unknown.
                error!(grant = %chain.file.display(), businesses = ?inner.members_of(&chain),
                    "stopping before a token refresh of this grant finished: if Thumbtack rotated \
                     its refresh token, the new one was not stored and the next start presents the \
                     old one (accepted within Thumbtack's grace period for retries, else the grant \
                     must be re-authorized with `leadsync auth exchange`)");
                continue;
            }
            let mut state = match chain.state.clone().try_lock_owned() {
                Ok(state) => state,
                // The task writing an unsaved token again holds it while
                // its write runs: waited for until the bound, and if it
                // is still running then, the token is said lost as below
                // (not only "a write was still running").
                Err(_) if chain.retrying_unsaved.load(Ordering::SeqCst) => {
                    match tokio::time::timeout_at(until, chain.state.clone().lock_owned()).await {
                        Ok(state) => state,
                        Err(_) => {
                            stops_unsaved(
                                &chain,
                                "its write was still running at the shutdown bound",
                            );
                            continue;
                        }
                    }
                }
                // Held only by a caller that is about to be told "stopping".
                Err(_) => continue,
            };
            let Some((error, in_file)) =
                state.unsaved.as_ref().map(|u| (u.error.clone(), u.in_file))
            else {
                continue;
            };
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let saved = tokio::time::timeout(left, inner.save_unsaved(&chain, &mut state)).await;
            // Where the token is at the stop (its write cut off by the
            // bound: where it was before, whatever that write does).
            let in_file = match (&saved, state.unsaved.as_ref()) {
                (Ok(_), Some(u)) => Some(u.in_file),
                (Ok(_), None) => None,
                (Err(_), _) => Some(in_file),
            };
            match in_file {
                Some(InFile::Yes) => {
                    warn!(grant = %chain.file.display(), error = %error,
                        "leadsync stops with a rotated refresh token the token store could not \
                         take; it is in the grant's token file, which the next refresh \
                         presents first (nothing is lost)");
                }
                Some(InFile::Unsynced) => {
                    error!(grant = %chain.file.display(), error = %error,
                        "leadsync stops with a rotated refresh token the token store could not \
                         take; it is in the grant's token file, which the next refresh \
                         presents first, but that file's directory could not be synced: a power \
                         loss before the system writes it back loses the token (the grant must \
                         then be re-authorized with `leadsync auth exchange`)");
                }
                _ if saved.is_err() || state.unsaved.is_some() => {
                    let error = state.unsaved.as_ref().map_or(error, |u| u.error.clone());
                    stops_unsaved(&chain, &error);
                }
                _ => {}
            }
        }
        if !finished {
            warn!("a token store write was still running at the shutdown bound");
        }
    }

    /// The authorization-code grant (`leadsync auth exchange`): stores the
    /// grant of the business's `refresh_token_file` (shared by every business
    /// naming it) and clears their re-authorization flag. Returns the new
    /// access token (to list the businesses the grant covers).
    pub async fn exchange_code(
        &self,
        business_id: &str,
        code: &Secret,
        redirect_uri: &str,
    ) -> anyhow::Result<Secret> {
        let Some(Member::Grant(chain)) = self.inner.member(business_id) else {
            anyhow::bail!(
                "business {business_id} is not in the configuration with a refresh_token_file; \
                 set refresh_token_file to use OAuth"
            );
        };
        self.exchange_on(chain, code, redirect_uri, false).await
    }

    /// Onboarding: the authorization-code grant for a new token file. The
    /// file is created empty (mode 0600) before the code is spent, then holds
    /// the grant's initial refresh token, which the token store keeps too.
    pub async fn exchange_code_into(
        &self,
        file: &Path,
        code: &Secret,
        redirect_uri: &str,
    ) -> anyhow::Result<Secret> {
        use std::os::unix::fs::PermissionsExt;
        // A link would send the refresh token wherever it points.
        match std::fs::symlink_metadata(file) {
            Ok(m) if m.file_type().is_symlink() => anyhow::bail!(
                "the token file {} is a symbolic link: refusing it (give the real path)",
                file.display()
            ),
            Ok(m) if !m.is_file() => {
                anyhow::bail!("the token file {} is not a regular file", file.display())
            }
            // Another grant's token (a typo for another pro's file, or the
            // mirror): the exchange would overwrite it, in the file and in
            // the store. Refused before the file is opened, let alone chmodded.
            Ok(_) => refuse_held(file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot inspect the token file {}: {e}", file.display()),
        }
        let handle = open_token_file(file)
            .map_err(|e| anyhow::anyhow!("cannot create the token file {}: {e}", file.display()))?;
        // An existing file keeps its mode (a `touch` under umask 022 makes
        // it 0644): make it the owner's alone before it holds a token.
        handle
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| {
                anyhow::anyhow!("cannot make the token file {} private: {e}", file.display())
            })?;
        drop(handle);
        probe_replaceable(file).map_err(|e| {
            anyhow::anyhow!(
                "cannot write the token file {}: its directory refuses a temporary file ({e}); \
                 the code was not spent",
                file.display()
            )
        })?;
        let key = grant_key(file);
        let chain = self
            .inner
            .chains
            .lock()
            .map_err(|_| anyhow::anyhow!("auth state poisoned"))?
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Chain {
                    key,
                    file: file.to_path_buf(),
                    state: Arc::new(tokio::sync::Mutex::new(ChainState::default())),
                    reauth: Mutex::new(None),
                    refreshing: AtomicBool::new(false),
                    retrying_unsaved: AtomicBool::new(false),
                    file_unreadable: AtomicBool::new(false),
                })
            })
            .clone();
        self.exchange_on(chain, code, redirect_uri, true).await
    }

    /// The businesses a grant's access token covers (`GET /api/v4/businesses`):
    /// id and name, and warnings about what the answer left unread (see
    /// [`read_business_list`]). Each page is tried up to
    /// [`BUSINESS_PAGE_ATTEMPTS`] times while it fails transiently (network,
    /// 429 honouring `Retry-After` up to [`BUSINESS_RETRY_CAP`], 5xx), and
    /// requests are spaced by `api.max_requests_per_second`. The caller
    /// stops it by dropping it (a signal): every wait is a sleep.
    pub async fn businesses_of(
        &self,
        base_url: &str,
        access_token: &Secret,
        max_requests_per_second: f64,
    ) -> anyhow::Result<BusinessList> {
        let list_url = format!("{}/api/v4/businesses", base_url.trim_end_matches('/'));
        let gap = if max_requests_per_second.is_finite() && max_requests_per_second > 0.0 {
            Duration::from_secs_f64((1.0 / max_requests_per_second).min(60.0))
        } else {
            Duration::ZERO
        };
        let mut last: Option<tokio::time::Instant> = None;
        read_business_list(base_url, async |query: &str| {
            let url = if query.is_empty() {
                list_url.clone()
            } else {
                format!("{list_url}?{query}")
            };
            let mut attempt = 1;
            loop {
                if let Some(t) = last {
                    tokio::time::sleep_until(t + gap).await;
                }
                last = Some(tokio::time::Instant::now());
                match self.business_page_at(&url, access_token).await {
                    Ok(page) => return Ok(page),
                    Err((e, Some(wait))) if attempt < BUSINESS_PAGE_ATTEMPTS => {
                        debug!(error = %format!("{:#}", e.error), attempt, "a page of the business list failed; retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        })
        .await
    }

    /// One page of the business list at `url`; a failure carries the wait
    /// before a retry when it is transient (network, 429, 5xx), and says
    /// whether the server refused the page (4xx but 429).
    async fn business_page_at(
        &self,
        url: &str,
        access_token: &Secret,
    ) -> Result<BusinessPage, (PageError, Option<Duration>)> {
        let resp = self
            .inner
            .http
            .get(url)
            .bearer_auth(access_token.expose())
            .send()
            .await
            .map_err(|e| {
                (
                    anyhow::anyhow!(
                        "cannot list the grant's businesses: {}",
                        ApiError::transport(&e)
                    )
                    .into(),
                    Some(BUSINESS_RETRY_BACKOFF),
                )
            })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                super::problem::parse_retry_after(v, chrono::Utc::now(), BUSINESS_RETRY_CAP)
            });
        let refused = (400..500).contains(&status) && status != 429;
        let wait = business_retry_wait(status, retry_after);
        let fail = |error: anyhow::Error, wait| (PageError { error, refused }, wait);
        let body = match super::client::read_body(resp, super::client::MAX_BODY_BYTES).await {
            Ok(body) => body,
            // The status is known: a refusal (401, 403, 404...) whose
            // body broke off is still a refusal, never tried again.
            Err(super::client::BodyError::Read(e)) => {
                return Err(fail(
                    e.into(),
                    (!refused).then_some(wait.unwrap_or(BUSINESS_RETRY_BACKOFF)),
                ));
            }
            Err(super::client::BodyError::TooLarge(what)) => {
                return Err(fail(
                    anyhow::anyhow!(
                        "cannot list the grant's businesses: HTTP {status} with a body {what} larger than {} bytes",
                        super::client::MAX_BODY_BYTES
                    ),
                    None,
                ));
            }
        };
        if !super::problem::is_success(status) {
            return Err(fail(
                anyhow::anyhow!(
                    "cannot list the grant's businesses: {}",
                    ApiError::from_response(status, "", None, &body)
                ),
                wait,
            ));
        }
        business_page(&body).map_err(|e| (e.into(), None))
    }

    async fn exchange_on(
        &self,
        chain: Arc<Chain>,
        code: &Secret,
        redirect_uri: &str,
        write_file: bool,
    ) -> anyhow::Result<Secret> {
        let inner = &self.inner;
        let oauth = inner
            .oauth()
            .map_err(|e| anyhow::anyhow!("{}", ApiError::from(e)))?;
        let store = inner
            .store()
            .map_err(|e| anyhow::anyhow!("{}", ApiError::from(e)))?;
        // Read the file before spending the single-use code.
        let seed =
            read_token_file(&chain.file).map_err(|e| anyhow::anyhow!("{}", ApiError::from(e)))?;
        let seed_fp = (!seed.is_empty()).then(|| sha256_hex(&seed));
        let mut state = chain.state.clone().lock_owned().await;
        // A new grant supersedes a rotated token held unsaved, here (whose
        // lock this process holds already) or by another process (which
        // holds it until its store write, a conflict now, drops the token):
        // neither can refresh meanwhile, so the exchange needs no lock then.
        let mut holds_lock = true;
        let _lock = if state.unsaved.is_some() {
            None
        } else {
            match inner
                .lock_grant_or_unsaved(&chain)
                .await
                .map_err(|e| anyhow::anyhow!("{}; the code was not spent", ApiError::from(e)))?
            {
                Ok(lock) => Some(lock),
                Err(held) => {
                    info!(grant = %chain.file.display(), "{held}; the new grant supersedes that token");
                    holds_lock = false;
                    None
                }
            }
        };
        // Onboarding: another exchange into the same file may have taken
        // the lock first and written its grant since the caller's check.
        if write_file {
            refuse_held(&chain.file)?;
            refuse_stored_only(&store, &chain).await?;
        }
        // The file the exchange's fallback writes if the store fails after
        // the code is spent: the one the grant is keyed by (a symlinked
        // token file is written through, never replaced by a regular file,
        // which would split the grant at the next reload).
        let fallback = std::path::PathBuf::from(&chain.key);
        if !write_file && let Err(e) = probe_replaceable(&fallback) {
            warn!(grant = %chain.file.display(), error = %e,
                "the token file {} cannot be replaced: should the token store fail after the code \
                 is spent, the new grant's refresh token could not be kept there either",
                fallback.display());
        }
        // The store must take the new grant: checked before the single-use
        // code is spent (its refresh token is the only copy).
        {
            let s = store.clone();
            blocking(move || s.check_writable()).await.map_err(|e| {
                anyhow::anyhow!(
                    "the token store cannot be written ({e:#}); the code was not spent: fix the \
                     token store and run the exchange again"
                )
            })?;
        }
        // The last moment to stop (an interrupted `auth exchange`): once
        // sent, the code's grant is stored whatever comes.
        if inner.stopping.is_cancelled() {
            anyhow::bail!("stopped before the code was sent: the code was not spent");
        }
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
            ("redirect_uri", redirect_uri),
            ("audience", oauth.audience.as_str()),
        ];
        let tokens = match inner.post_token(&oauth, &form, None).await {
            Ok(t) => t,
            Err(TokenFailure::GrantRefused(m)) => anyhow::bail!(
                "the authorization code was refused ({m}); codes are single-use and short-lived: authorize again"
            ),
            Err(TokenFailure::ClientRefused(m)) => anyhow::bail!("OAuth client refused: {m}"),
            // Not asked again: a code is single-use, and a second use may
            // revoke what the first one issued (RFC 6749 §4.1.2). The
            // operator is told what became of it, and what to do.
            Err(TokenFailure::Lost(m)) => anyhow::bail!(
                "{m}: the code may have been spent without its answer arriving — run the same \
                 command again at once (a code the endpoint did not take still works); if it is \
                 refused as used, the pro must authorize again for a new code"
            ),
            // A redirect is met again until the key is fixed; an answer
            // without an OAuth error (a 404, a proxy's 400) says nothing
            // of the code.
            Err(TokenFailure::Transient(m)) if m.contains(REDIRECTED) => anyhow::bail!(
                "{m}: the code was not passed on (a redirect is never followed) — fix \
                 oauth.token_url, then run the command again (codes are short-lived: soon)"
            ),
            Err(TokenFailure::Transient(m))
                if m.contains(UNREACHABLE) || m.contains("HTTP 408") || m.contains("HTTP 429") =>
            {
                anyhow::bail!(
                    "{m}: the code was not spent (the endpoint did not take the request) — run \
                     the same command again (codes are short-lived: soon)"
                )
            }
            Err(TokenFailure::Transient(m)) => anyhow::bail!(
                "{m}: the endpoint refused the request without an OAuth error: the code is most \
                 likely not spent — check oauth.token_url, then run the command again (codes are \
                 short-lived: soon); if it is refused as used, the pro must authorize again"
            ),
        };
        let Some(refresh) = tokens.refresh_token.filter(|t| !t.is_empty()) else {
            anyhow::bail!(
                "the token response has no refresh_token: was the offline_access scope requested?"
            );
        };
        let access = Inner::access_of(tokens.access_token, tokens.expires_in);
        // The file holds the initial token; the store the same, as its seed.
        // A file that cannot be written (a full disk, a quota on the tokens
        // directory) does not keep the grant from the store: the code is spent.
        let mut file_failure = None;
        let seed_fp = if write_file {
            if let Err(e) = write_private(&chain.file, &format!("{}\n", refresh.expose())) {
                error!(grant = %chain.file.display(), error = %e,
                    "cannot write the token file: the new grant goes to the token store only");
                file_failure = Some(e.to_string());
            }
            // The seed is what the file holds now (the token, or nothing).
            match read_token_file(&chain.file) {
                Ok(t) if !t.is_empty() => Some(sha256_hex(&t)),
                _ => None,
            }
        } else {
            seed_fp
        };
        let no_access = access.0.token.is_empty();
        let write = GrantWrite {
            refresh_token: refresh,
            access_token: (!no_access).then(|| (access.0.token.clone(), access.1.clone())),
            seed_sha256: seed_fp.clone(),
            source: "auth exchange".into(),
        };
        let businesses = inner.members_of(&chain);
        // The code is spent: the new grant's refresh token is never
        // dropped. A failing write is tried again a few times; if the store
        // still refuses it, the token goes to the grant's token file, which
        // the next refresh takes as a changed file.
        let mut failure = String::new();
        let mut stored = false;
        'tries: for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            for _ in 0..3 {
                match inner
                    .store_grant(&store, &chain, &seed_fp, &businesses, &write)
                    .await
                {
                    Ok(true) => {
                        stored = true;
                        break 'tries;
                    }
                    Ok(false) => {
                        failure =
                            "the token store kept changing while storing the new grant".to_string();
                    }
                    Err(e) => {
                        failure = format!("{e:#}");
                        continue 'tries;
                    }
                }
            }
        }
        if !stored {
            let file = chain.file.display();
            error!(grant = %file, error = %failure,
                "the token store could not take the new grant's refresh token");
            if write_file && file_failure.is_none() {
                anyhow::bail!(
                    "the token store could not take the new grant ({failure}); its refresh token is \
                     NOT lost: it is in the token file {file} (mode 0600), written before the store, \
                     and the next refresh (`leadsync sync`, or the daemon) takes it from there once \
                     the token store can be written — do not run the exchange again (the code is spent)"
                );
            }
            let file = fallback.display();
            return match write_private(&fallback, &format!("{}\n", write.refresh_token.expose())) {
                Ok(()) => Err(anyhow::anyhow!(
                    "the token store could not take the new grant ({failure}); its refresh token is \
                     NOT lost: it was written to the grant's token file {file} (mode 0600), and the \
                     next refresh (`leadsync sync`, or the daemon) takes it from there, as a changed \
                     token file, once the token store can be written — fix the token store; do not \
                     run the exchange again (the code is spent)"
                )),
                // Renamed into place, then the directory's fsync failed:
                // the token IS in the file (not yet durable).
                Err(e)
                    if read_token_file(&fallback)
                        .is_ok_and(|t| t == write.refresh_token.expose()) =>
                {
                    Err(anyhow::anyhow!(
                        "the token store could not take the new grant ({failure}); its refresh \
                         token was written to the grant's token file {file} (mode 0600), but \
                         syncing that file's directory failed ({e}): it is there now, though a \
                         power loss could still lose it — keep the machine up, fix the token store \
                         and run `leadsync sync` (it takes the file's token); do not run the \
                         exchange again (the code is spent)"
                    ))
                }
                Err(e) => Err(anyhow::anyhow!(
                    "the token store could not take the new grant ({failure}) and the token file \
                     {file} cannot be written either ({e}): the new grant's refresh token is lost; \
                     fix the token store, then authorize again (`leadsync auth exchange`)"
                )),
            };
        }
        if let Some(e) = &file_failure {
            warn!(grant = %chain.file.display(),
                "the new grant's refresh token is NOT in the token file {} (it could not be \
                 written: {e}) but it is stored in the token store, where every refresh takes it \
                 from: the grant is usable, and the file may stay empty (it is only read for a \
                 new grant) — do not run the exchange again (the code is spent)",
                chain.file.display());
        }
        // A rotated token held unsaved (here, or by the process whose note
        // names it) may be in the token file, written there after the file
        // was read above: its holder refuses that copy once its write is a
        // conflict, but may end first (killed, or the store still failing).
        // The file would then be a new grant to the next refresh, which
        // presents the superseded token — valid, so the exchange would be
        // silently undone. The copy is refused here, now that the new
        // grant's row exists (the holder's note goes only after its own
        // refusal, so it is still there to be read).
        let superseded = match state.unsaved.as_ref() {
            Some(u) => Some(sha256_hex(u.write.refresh_token.expose())),
            None => {
                let (s, key) = (store.clone(), chain.key.clone());
                blocking(move || s.refresh_note(&key))
                    .await
                    .ok()
                    .flatten()
                    .as_deref()
                    .and_then(unsaved_token_sha256)
                    .map(str::to_string)
            }
        };
        if let Some(fp) = superseded {
            let (s, key) = (store.clone(), chain.key.clone());
            if let Err(e) = blocking(move || s.refuse_file(&key, &fp)).await {
                warn!(grant = %chain.file.display(), error = %format!("{e:#}"),
                    "cannot record that the token file's copy of the superseded rotated token is \
                     not to be used: should its holder end before its write, the next refresh may \
                     present it over the new grant");
            }
        }
        // A new grant: an earlier refresh cut short no longer matters. The
        // note is the lock holder's: another process holding a token
        // unsaved clears its own once its write (a conflict) drops it.
        if holds_lock {
            inner.note_refresh(&chain, None).await;
        }
        state.unsaved = None;
        state.refused_access = None;
        state.fresh_until = Some(Instant::now() + REFRESH_ON_401_INTERVAL);
        state.access = (!no_access).then(|| access.0.clone());
        drop(state);
        inner.clear_client_refused().await;
        // A new grant: a refresh whose answers were lost no longer matters.
        inner.alert(format!("lost:{}", chain.key), None).await;
        // This process may not know the mirror's flag: clear it regardless.
        inner.set_reauth(&chain, None, true).await;
        Ok(access.0.token)
    }
}

impl Inner {
    /// No members yet, nothing in flight: what [`Auth::reconfigure`] fills.
    fn new(
        http: reqwest::Client,
        timeout: Duration,
        store: Option<Arc<dyn GrantStore>>,
        recorder: Option<Arc<dyn AuthRecorder>>,
    ) -> Inner {
        Inner {
            http,
            timeout,
            oauth: RwLock::new(None),
            store: store.map(std::sync::OnceLock::from).unwrap_or_default(),
            recorder,
            members: RwLock::new(HashMap::new()),
            chains: Mutex::new(HashMap::new()),
            client_refused: Mutex::new(None),
            client_alert_cleared: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            refresh_deadline: Mutex::new(None),
            settling: tokio::sync::Notify::new(),
            file_index: tokio::sync::Mutex::new(FileIndex::default()),
        }
    }

    /// One compare-and-set write of a new grant (`auth exchange`): `Ok(false)`
    /// when the row changed meanwhile.
    async fn store_grant(
        &self,
        store: &Arc<dyn GrantStore>,
        chain: &Chain,
        seed_fp: &Option<String>,
        businesses: &[String],
        write: &GrantWrite,
    ) -> anyhow::Result<bool> {
        let (s, key, fp, b) = (
            store.clone(),
            chain.key.clone(),
            seed_fp.clone(),
            businesses.to_vec(),
        );
        // Taking a moved file's chain over fails while that chain's lock
        // is held (a refresh in flight, a rotated token held unsaved by
        // another process). The code is spent by now, and a new grant
        // needs no old chain: this grant's own row alone then says what
        // to replace.
        let expected = match blocking(move || s.load(&key, fp.as_deref(), &b)).await {
            Ok(row) => row,
            Err(e) => {
                debug!(grant = %chain.file.display(), error = %format!("{e:#}"),
                    "the new grant takes over no other chain");
                let (s, key) = (store.clone(), chain.key.clone());
                blocking(move || s.load(&key, None, &[])).await?
            }
        }
        .map(|r| r.generation)
        .unwrap_or(0);
        let (s, key, w) = (store.clone(), chain.key.clone(), write.clone());
        Ok(matches!(
            blocking(move || s.save(&key, expected, &w)).await?,
            Written::Stored(_)
        ))
    }

    fn member(&self, business_id: &str) -> Option<Member> {
        self.members.read().ok()?.get(business_id).cloned()
    }

    /// The businesses naming this chain's grant.
    fn members_of(&self, chain: &Arc<Chain>) -> Vec<String> {
        let Ok(members) = self.members.read() else {
            return Vec::new();
        };
        let mut ids: Vec<String> = members
            .iter()
            .filter(|(_, m)| matches!(m, Member::Grant(c) if Arc::ptr_eq(c, chain)))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn client_refused_now(&self) -> Option<String> {
        self.client_refused
            .lock()
            .ok()?
            .as_ref()
            .map(|(m, _)| m.clone())
    }

    /// The refusal, while the next retry is not due.
    fn client_refused_recently(&self) -> Option<String> {
        let r = self.client_refused.lock().ok()?;
        match r.as_ref() {
            Some((m, at)) if at.elapsed() < CLIENT_REFUSED_RETRY => Some(m.clone()),
            _ => None,
        }
    }

    async fn set_client_refused(&self, message: &str) {
        self.client_alert_cleared.store(false, Ordering::SeqCst);
        let first = match self.client_refused.lock() {
            Ok(mut r) => {
                let first = r.is_none();
                *r = Some((message.to_string(), Instant::now()));
                first
            }
            Err(_) => false,
        };
        if first {
            error!(
                "OAuth client refused: {message}; no business is marked for re-authorization, \
                 their rows wait, and refreshes are tried again every 5 minutes"
            );
            if let Some(r) = &self.recorder {
                r.alert(
                    CLIENT_ALERT.into(),
                    Some(format!(
                        "OAuth client refused: {message} (check oauth.client_id, the client secret \
                         and oauth.audience; retried every 5 minutes)"
                    )),
                )
                .await;
            }
        }
    }

    async fn clear_client_refused(&self) {
        let was = self
            .client_refused
            .lock()
            .map(|mut r| r.take().is_some())
            .unwrap_or(false);
        if was {
            info!("the OAuth client is accepted again");
        }
        if !self.client_alert_cleared.swap(true, Ordering::SeqCst)
            && let Some(r) = &self.recorder
        {
            r.alert(CLIENT_ALERT.into(), None).await;
        }
    }

    async fn alert(&self, key: String, message: Option<String>) {
        if let Some(r) = &self.recorder {
            r.alert(key, message).await;
        }
    }

    /// Records (or clears) the need for re-authorization of every business of the chain.
    async fn set_reauth(&self, chain: &Arc<Chain>, reason: Option<String>, force: bool) {
        let previous = chain
            .reauth
            .lock()
            .map(|mut r| std::mem::replace(&mut *r, reason.clone()))
            .unwrap_or_default();
        if !force && previous == reason {
            return;
        }
        let businesses = self.members_of(chain);
        match &reason {
            Some(r) => warn!(businesses = ?businesses, "{r}"),
            None if previous.is_some() => {
                info!(businesses = ?businesses, "grant re-authorized; resuming its businesses' syncs and outbox rows")
            }
            None => {}
        }
        if let Some(r) = &self.recorder {
            r.needs_reauth(businesses, reason).await;
        }
    }

    async fn static_token(&self, s: &StaticToken) -> Result<Secret, ApiError> {
        if let Ok(st) = s.state.lock()
            && let Some(t) = &st.0
        {
            return Ok(t.clone());
        }
        let result = (|| {
            let token = read_token_file(&s.file)?;
            if token.is_empty() {
                return Err(Failure::Reauth(format!(
                    "business {} needs a token: access_token_file {} is empty",
                    s.business_id,
                    s.file.display()
                )));
            }
            let mut st = s
                .state
                .lock()
                .map_err(|_| Failure::Retry("token state poisoned".into()))?;
            if st.1.as_deref() == Some(sha256_hex(&token).as_str()) {
                return Err(Failure::Reauth(format!(
                    "business {} needs re-authorization: its static access token was refused (HTTP 401); \
                     put a valid token in {}",
                    s.business_id,
                    s.file.display()
                )));
            }
            let token = Secret::new(token);
            st.0 = Some(token.clone());
            Ok(token)
        })();
        let reason = match &result {
            Ok(_) => None,
            Err(Failure::Reauth(m)) => Some(m.clone()),
            Err(_) => return result.map_err(Into::into),
        };
        let previous = s
            .reauth
            .lock()
            .map(|mut r| std::mem::replace(&mut *r, reason.clone()))
            .unwrap_or_default();
        if previous != reason
            && let Some(r) = &self.recorder
        {
            if let Some(m) = &reason {
                warn!(business_id = %s.business_id, "{m}");
            }
            r.needs_reauth(vec![s.business_id.clone()], reason).await;
        }
        result.map_err(Into::into)
    }

    fn oauth(&self) -> Result<OAuthClient, Failure> {
        self.oauth
            .read()
            .ok()
            .and_then(|o| o.clone())
            .ok_or_else(|| {
                Failure::Retry(
                    "OAuth is not configured (oauth.client_id and a client secret)".into(),
                )
            })
    }

    fn store(&self) -> Result<Arc<dyn GrantStore>, Failure> {
        self.store.get().cloned().ok_or_else(|| {
            Failure::Retry(
                "the token store is not open (a restart is needed after adding the first OAuth business)"
                    .into(),
            )
        })
    }

    /// Takes the grant's cross-process lock, waiting while another process
    /// refreshes it (bounded: a refresh takes at most a few request timeouts).
    /// A process holding the grant's rotated token unsaved holds the lock
    /// until the store takes it: that is not waited for (it may take
    /// hours), and the stored token is spent meanwhile.
    async fn lock_grant(&self, chain: &Chain) -> Result<Box<dyn Send>, Failure> {
        match self.lock_grant_or_unsaved(chain).await? {
            Ok(lock) => Ok(lock),
            Err(held) => Err(Failure::Retry(held)),
        }
    }

    /// [`Inner::lock_grant`], telling apart a lock held by a process that
    /// keeps the grant's rotated token unsaved (`Ok(Err(why))`).
    async fn lock_grant_or_unsaved(
        &self,
        chain: &Chain,
    ) -> Result<Result<Box<dyn Send>, String>, Failure> {
        let store = self.store()?;
        let deadline = Instant::now() + self.timeout * 4 + Duration::from_secs(5);
        let mut waiting = false;
        loop {
            if self.stopping.is_cancelled() {
                return Err(self.abandoned(chain, "before it took the grant's lock"));
            }
            let (s, key) = (store.clone(), chain.key.clone());
            // The holder keeps a rotated token unsaved only while it holds
            // the grant's "unsaved" lock too: a note saying so may be stale
            // (its writer ended, or stored the token and was killed before
            // clearing it) while the lock is held for an ordinary refresh,
            // which is waited for. The note only names the holder.
            match blocking(move || s.try_lock(&key)).await {
                Ok(Some(lock)) => return Ok(Ok(lock)),
                Ok(None)
                    if let (s, key) = (store.clone(), chain.key.clone())
                        && blocking(move || s.unsaved_held(&key))
                            .await
                            .unwrap_or(false) =>
                {
                    let (s, key) = (store.clone(), chain.key.clone());
                    let holder = match blocking(move || s.refresh_note(&key))
                        .await
                        .ok()
                        .flatten()
                        .as_deref()
                        .and_then(unsaved_by)
                    {
                        Some(pid) => format!("leadsync process {pid}"),
                        None => "a leadsync process".to_string(),
                    };
                    return Ok(Err(format!(
                        "{holder} holds the rotated refresh token of the grant in {} in \
                         memory, unsaved (the token store cannot take it); the stored one is spent, so no \
                         other refresh of this grant starts until that process stores it",
                        chain.file.display()
                    )));
                }
                Ok(None) if Instant::now() < deadline => {
                    if !waiting {
                        waiting = true;
                        debug!(grant = %chain.file.display(),
                            "another process holds the grant's lock (refreshing it): waiting for it");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = self.stopping.cancelled() => {}
                    }
                }
                Ok(None) => {
                    return Err(Failure::Retry(format!(
                        "another leadsync process has been refreshing the grant in {} for too long; trying again later",
                        chain.file.display()
                    )));
                }
                Err(e) => return Err(Failure::Retry(format!("{e:#}"))),
            }
        }
    }

    /// Records (or clears) the grant's refresh in flight; a failure is
    /// logged, never fails the refresh (the note only explains).
    async fn note_refresh(&self, chain: &Chain, note: Option<String>) {
        let Some(store) = self.store.get().cloned() else {
            return;
        };
        let key = chain.key.clone();
        if let Err(e) = blocking(move || store.set_refresh_note(&key, note.as_deref())).await {
            warn!(grant = %chain.file.display(), error = %format!("{e:#}"),
                "cannot record the token refresh in flight in the grant's note");
        }
    }

    /// Clears the grant's note of a rotated token held unsaved once it is
    /// stored or superseded, then lets the grant's lock go (in that order:
    /// a note without its lock says the holder ended with the token).
    async fn release_unsaved(&self, chain: &Chain, lock: Option<Box<dyn Send>>) {
        self.note_refresh(chain, None).await;
        drop(lock);
    }

    /// A refresh given up at a stop before anything was sent: logged, and
    /// the stored token stays the valid one.
    fn abandoned(&self, chain: &Chain, when: &str) -> Failure {
        let m = format!(
            "leadsync is stopping: the token refresh of the grant in {} is abandoned {when}; \
             nothing was sent, the stored refresh token stays valid",
            chain.file.display()
        );
        info!("{m}");
        Failure::Stopping(m)
    }

    /// While stopping: the time a token request may still take, if one
    /// is worth sending. `None` while running (the request timeout applies).
    fn time_left_to_ask(&self) -> Option<Option<Duration>> {
        if !self.stopping.is_cancelled() {
            return None;
        }
        let deadline = self.refresh_deadline.lock().ok().and_then(|d| *d);
        let left = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
            .saturating_sub(STORE_RESERVE)
            .min(self.timeout);
        Some((left >= SHORTEST_RETRY).then_some(left))
    }

    /// The access token of a response, with its expiry (monotonic and wall clock).
    fn access_of(token: Secret, expires_in: Option<u64>) -> (Access, String) {
        let lifetime = Duration::from_secs(
            expires_in
                .filter(|&s| s > 0)
                .unwrap_or(DEFAULT_EXPIRES_IN)
                .clamp(MIN_EXPIRES_IN, MAX_EXPIRES_IN),
        );
        let margin = lifetime.mul_f64(0.1).min(Duration::from_secs(60));
        let valid_for = lifetime.saturating_sub(margin);
        (
            Access {
                token,
                expires_at: Instant::now() + valid_for,
            },
            wall_after(valid_for),
        )
    }

    /// A refresh (and the write of its rotated token), then what a person
    /// must see of its outcome. Runs detached; holds the chain's lock.
    async fn refresh_unit(
        self: Arc<Self>,
        chain: Arc<Chain>,
        mut state: tokio::sync::OwnedMutexGuard<ChainState>,
    ) -> Result<Secret, ApiError> {
        /// Clears the chain's `refreshing` however the unit ends.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        chain.refreshing.store(true, Ordering::SeqCst);
        let _running = Running(&chain.refreshing);
        let outcome = self.refresh_locked(&chain, &mut state).await;
        match &outcome {
            Ok(_) => {
                self.clear_client_refused().await;
                self.set_reauth(&chain, None, false).await;
            }
            Err(Failure::Reauth(m)) => self.set_reauth(&chain, Some(m.clone()), false).await,
            Err(Failure::ClientRefused(m)) => self.set_client_refused(m).await,
            Err(Failure::Retry(_) | Failure::Stopping(_)) => {}
        }
        if state.unsaved.is_some() {
            self.retry_unsaved(&chain);
        }
        drop(state);
        outcome.map_err(Into::into)
    }

    /// Writes the chain's rotated token held unsaved again on its own until
    /// the store takes it or a newer grant supersedes it, and so lets the
    /// grant's lock go: no business of the grant may ask for a token for
    /// hours (disabled, nothing to send, a long schedule), and meanwhile
    /// every other process is kept out. One task per chain; it ends at a
    /// stop ([`Auth::settle`] tries once more). Called holding the chain's
    /// state.
    fn retry_unsaved(self: &Arc<Self>, chain: &Arc<Chain>) {
        if chain.retrying_unsaved.swap(true, Ordering::SeqCst) {
            return;
        }
        let (inner, chain) = (self.clone(), chain.clone());
        self.tasks.spawn(async move {
            let mut wait = UNSAVED_RETRY_FIRST;
            loop {
                let settling = inner.settling.notified();
                tokio::pin!(settling);
                // Registered before the check: a settle between them is seen.
                settling.as_mut().enable();
                if inner.tasks.is_closed() {
                    break;
                }
                let state = tokio::select! {
                    state = async {
                        tokio::time::sleep(wait).await;
                        chain.state.clone().lock_owned().await
                    } => state,
                    _ = inner.stopping.cancelled() => break,
                    _ = &mut settling => break,
                };
                let mut state = state;
                let stored = state.unsaved.is_none()
                    || matches!(inner.save_unsaved(&chain, &mut state).await, Ok(true));
                if stored || inner.stopping.is_cancelled() || inner.tasks.is_closed() {
                    // Under the state, so a token left unsaved later finds
                    // no task and starts one.
                    chain.retrying_unsaved.store(false, Ordering::SeqCst);
                    return;
                }
                wait = (wait * 2).min(UNSAVED_RETRY_MAX);
            }
            chain.retrying_unsaved.store(false, Ordering::SeqCst);
        });
    }

    /// Tries again to store the rotated tokens held unsaved by chains no
    /// business names any more (a reload renamed their token file): no
    /// caller asks them, and the new name's chain cannot take the stored
    /// chain over until they are stored (their lock says a token is held).
    async fn save_orphans(&self, chain: &Arc<Chain>) {
        let orphans = self.other_chains(chain);
        for orphan in orphans {
            if !self.members_of(&orphan).is_empty() {
                continue;
            }
            // Held: its own refresh or save is running.
            let Ok(mut state) = orphan.state.clone().try_lock_owned() else {
                continue;
            };
            if state.unsaved.is_some() {
                let _ = self.save_unsaved(&orphan, &mut state).await;
            }
        }
    }

    /// Keeps a rotated token the store refused in the grant's token file
    /// too (atomic, mode 0600), as `auth exchange` does with a new grant the
    /// store refuses: should this process end before the store takes it (a
    /// crash, the watchdog, a stop), the next refresh, here or in any other
    /// process, finds a changed token file and presents it first, instead of
    /// the spent stored token. Only over the content the refresh was sent
    /// with (a grant a person put there since is theirs); the store's write
    /// then names the file's new content as the chain's seed, so that once
    /// stored the file does not count as changed. Tried again with every
    /// write of the token until it is there.
    async fn keep_in_file(&self, chain: &Chain, u: &mut Unsaved) {
        let path = PathBuf::from(&chain.key);
        let file = path.display();
        if u.in_file == InFile::Unsynced {
            // In the file, its directory's fsync failed: tried again.
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            if blocking(move || Ok(std::fs::File::open(&dir)?.sync_all()?))
                .await
                .is_ok()
            {
                u.in_file = InFile::Yes;
                info!(grant = %chain.file.display(),
                    "the token file {file} keeping the unsaved rotated refresh token is synced now");
            }
            return;
        }
        if u.in_file != InFile::No {
            return;
        }
        // The path the grant is keyed by: a symlinked token file is
        // written through, as the exchange's fallback does.
        let (p, token, seen) = (
            path.clone(),
            u.write.refresh_token.clone(),
            u.file_seen.clone(),
        );
        let fp = sha256_hex(token.expose());
        // The write owns the grant's locks while it runs, as the store's
        // write does: were this task dropped meanwhile (a stop's bound, the
        // runtime's shutdown), they must not go while the file may still
        // change, or another process reads it before and presents the
        // spent stored token.
        let held = u.lock.take();
        let written = blocking(move || {
            // The file's content now: its fingerprint (`None`: empty or
            // missing); an error when it cannot be read (EACCES, not
            // UTF-8): then it is not known to be the one the refresh was
            // sent with, and is not written over.
            let content = || -> std::io::Result<Option<String>> {
                match std::fs::read_to_string(&p) {
                    Ok(t) => Ok(Some(crate::secret::trim_secret(&t).to_string())
                        .filter(|t| !t.is_empty())
                        .map(|t| sha256_hex(&t))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            };
            let outcome = match content() {
                Err(e) => Kept::Unreadable(e.to_string()),
                Ok(now) if now != seen => Kept::Changed,
                Ok(_) => {
                    // Asked again just before the rename: a grant a person
                    // wrote there meanwhile is theirs.
                    let changed = std::cell::Cell::new(false);
                    let r = crate::secret::replace_private_checked(
                        &p,
                        &temp_of(&p),
                        format!("{}\n", token.expose()).as_bytes(),
                        &|f, b| {
                            use std::io::Write;
                            f.write_all(b)
                        },
                        &|| match content() {
                            Ok(now) if now == seen => Ok(()),
                            Ok(_) => {
                                changed.set(true);
                                Err(std::io::Error::other("the token file changed"))
                            }
                            Err(e) => Err(e),
                        },
                    );
                    if changed.get() {
                        Kept::Changed
                    } else {
                        // Renamed into place, then the directory's fsync
                        // failed: the token is in the file, not yet durable.
                        let there = std::fs::read_to_string(&p)
                            .is_ok_and(|t| crate::secret::trim_secret(&t) == token.expose());
                        Kept::Written(r.err().map(|e| e.to_string()), there)
                    }
                }
            };
            Ok((outcome, held))
        })
        .await;
        let written = match written {
            Ok((outcome, held)) => {
                u.lock = held;
                Ok(outcome)
            }
            Err(e) => {
                // The task failed with the locks: take them again if free.
                if let Ok(store) = self.store() {
                    let (s, key) = (store.clone(), chain.key.clone());
                    if let Some(lock) = blocking(move || s.try_lock(&key)).await.ok().flatten() {
                        u.lock = Some(with_unsaved_lock(&store, chain, lock).await);
                    }
                }
                Err(e)
            }
        };
        match written {
            Ok(Kept::Changed) => {
                u.in_file = InFile::Superseded;
                warn!(grant = %chain.file.display(),
                    "the token file {file} changed since the refresh was sent (a new grant?): \
                     the unsaved rotated refresh token is not written over it");
            }
            Ok(Kept::Unreadable(error)) => {
                warn!(grant = %chain.file.display(), error = %error,
                    "the token file {file} cannot be read, so it is not known to hold what the \
                     refresh was sent with: the unsaved rotated refresh token is not written over \
                     it (tried again with its next write)");
            }
            Ok(Kept::Written(error, there)) => {
                if there {
                    u.in_file = if error.is_some() {
                        InFile::Unsynced
                    } else {
                        InFile::Yes
                    };
                    u.write.seed_sha256 = Some(fp);
                    warn!(grant = %chain.file.display(), sync_error = ?error,
                        "the rotated refresh token the token store refused is kept in the token \
                         file {file} until the store takes it: if leadsync ends first, the next \
                         refresh presents it from there");
                } else {
                    error!(grant = %chain.file.display(), error = ?error,
                        "the rotated refresh token the token store refused cannot be kept in the \
                         token file {file} either: it lives only in this process until the store \
                         takes it");
                }
            }
            Err(e) => {
                error!(grant = %chain.file.display(), error = %format!("{e:#}"),
                    "cannot keep the unsaved rotated refresh token in the token file {file}");
            }
        }
    }

    /// Every chain of this process but `chain`.
    fn other_chains(&self, chain: &Arc<Chain>) -> Vec<Arc<Chain>> {
        self.chains
            .lock()
            .map(|c| {
                c.values()
                    .filter(|o| !Arc::ptr_eq(o, chain))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Another chain of this process, named by a configured business,
    /// whose token file holds the token whose fingerprint is `seed`: its
    /// file and businesses. Called after the caller read its own file: the
    /// other files are looked at after that read (a look started before
    /// it is not used: a copy made meanwhile would be missed), each read
    /// again only when its metadata changed since the last look (or was
    /// changed less than a second before it began); checks waiting
    /// together share one look. A file that cannot be statted counts as
    /// no copy. A chain no business names (a file
    /// renamed by a copy, then reloaded) is nobody's copy. Err: the files
    /// could not be looked at (the caller retries, never presents).
    async fn twin_file(
        &self,
        chain: &Arc<Chain>,
        seed: &str,
    ) -> Result<Option<(PathBuf, Vec<String>)>, String> {
        let asked = Instant::now();
        // The list is taken under the look's lock, after the look's start:
        // a look another check started with a list taken before a reload
        // (which added a file) must not be reused by a check that began
        // after the reload.
        let mut index = self.file_index.lock().await;
        let started = Instant::now();
        let started_wall = std::time::SystemTime::now();
        let named: Vec<(Arc<Chain>, Vec<String>)> = {
            let chains = self
                .chains
                .lock()
                .map_err(|_| "the grants' state is poisoned".to_string())?;
            let members = self
                .members
                .read()
                .map_err(|_| "the businesses' state is poisoned".to_string())?;
            let mut by_chain: HashMap<&str, Vec<String>> = HashMap::new();
            for (id, m) in members.iter() {
                if let Member::Grant(g) = m
                    && chains.get(&g.key).is_some_and(|c| Arc::ptr_eq(c, g))
                {
                    by_chain.entry(g.key.as_str()).or_default().push(id.clone());
                }
            }
            by_chain
                .into_iter()
                .filter_map(|(key, mut ids)| {
                    ids.sort();
                    Some((chains.get(key)?.clone(), ids))
                })
                .collect()
        };
        if !named.iter().any(|(c, _)| !Arc::ptr_eq(c, chain)) {
            return Ok(None);
        }
        if index.looked.is_none_or(|at| at < asked) {
            let racy_from = index
                .looked_wall
                .map(|t| {
                    t.checked_sub(Duration::from_secs(1))
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or((i64::MIN, 0), |d| {
                            (d.as_secs() as i64, i64::from(d.subsec_nanos()))
                        })
                })
                .unwrap_or((i64::MIN, 0));
            let mut before = std::mem::take(&mut index.files);
            let files: Vec<PathBuf> = named.iter().map(|(c, _)| c.file.clone()).collect();
            index.files = blocking(move || {
                let mut now = HashMap::new();
                for file in files {
                    let Some(stamp) = file_stamp(&file) else {
                        continue;
                    };
                    let fingerprint = match before.remove(&file) {
                        Some((was, fp))
                            if was == stamp
                                && (stamp.3, stamp.4) < racy_from
                                && (stamp.5, stamp.6) < racy_from =>
                        {
                            fp
                        }
                        _ => read_token_file(&file)
                            .ok()
                            .filter(|t| !t.is_empty())
                            .map(|t| sha256_hex(&t)),
                    };
                    now.insert(file, (stamp, fingerprint));
                }
                Ok(now)
            })
            .await
            .map_err(|e| format!("cannot look at the other token files: {e:#}"))?;
            index.looked = Some(started);
            index.looked_wall = Some(started_wall);
        }
        Ok(named
            .into_iter()
            .filter(|(c, _)| !Arc::ptr_eq(c, chain))
            .find(|(c, _)| index.files.get(&c.file).and_then(|(_, fp)| fp.as_deref()) == Some(seed))
            .map(|(c, members)| (c.file.clone(), members)))
    }

    /// Whether another chain of this process keeps, unsaved, the rotated
    /// token whose copy in its token file has fingerprint `seed`.
    fn holds_in_file(&self, chain: &Arc<Chain>, seed: Option<&str>) -> bool {
        let others = self.other_chains(chain);
        others.iter().any(|o| {
            // Held: its own save is running (its token still unsaved).
            o.state
                .try_lock()
                .map_or(o.retrying_unsaved.load(Ordering::SeqCst), |st| {
                    st.unsaved.as_ref().is_some_and(|u| {
                        u.in_file.there() && u.write.seed_sha256.as_deref() == seed
                    })
                })
        })
    }

    /// Stores an unsaved rotated token; Ok(true) when stored (or superseded).
    async fn save_unsaved(&self, chain: &Chain, state: &mut ChainState) -> Result<bool, Failure> {
        let Some(u) = state.unsaved.take() else {
            return Ok(true);
        };
        let store = self.store()?;
        let Unsaved {
            expected,
            write,
            access,
            error: _,
            lock,
            file_seen,
            in_file,
        } = u;
        let (key, w) = (chain.key.clone(), write.clone());
        let alert_key = format!("unsaved:{}", chain.key);
        // The write owns the grant's lock while it runs: a caller that
        // stops waiting (a stop's bound) must not let it go while the
        // write may still land.
        let s = store.clone();
        let saved = blocking(move || Ok((s.save(&key, expected, &w), lock))).await;
        let (saved, lock) = match saved {
            Ok((saved, lock)) => (saved, lock),
            Err(e) => {
                // The task failed with the locks: take them again if free
                // (the "unsaved" one too: it tells other processes at once).
                let (s, key) = (store.clone(), chain.key.clone());
                let lock = match blocking(move || s.try_lock(&key)).await.ok().flatten() {
                    Some(lock) => Some(with_unsaved_lock(&store, chain, lock).await),
                    None => None,
                };
                (Err(e), lock)
            }
        };
        match saved {
            Ok(Written::Stored(_)) => {
                info!(grant = %chain.file.display(), "the rotated refresh token is stored now");
                self.release_unsaved(chain, lock).await;
                self.alert(alert_key, None).await;
                self.alert(format!("lost:{}", chain.key), None).await;
                if Instant::now() < access.expires_at {
                    state.access = Some(access);
                }
                Ok(true)
            }
            Ok(Written::Conflict(found)) => {
                warn!(grant = %chain.file.display(), generation = found,
                    "the token store took a newer grant meanwhile (auth exchange?); dropping the unsaved rotated token");
                // Its copy in the token file is dropped too: remembered as
                // refused (before the locks go), or the next refresh, here
                // or elsewhere, takes the file for a new grant and replaces
                // the newer one with it.
                // The write owns the locks, as the store's write does.
                let mut lock = lock;
                if in_file.there() {
                    let (s, key) = (store.clone(), chain.key.clone());
                    let fp = sha256_hex(write.refresh_token.expose());
                    let held = lock.take();
                    let refused = blocking(move || Ok((s.refuse_file(&key, &fp), held))).await;
                    let refused = match refused {
                        Ok((r, held)) => {
                            lock = held;
                            r
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = refused {
                        warn!(grant = %chain.file.display(), error = %format!("{e:#}"),
                            "cannot record that the token file's copy of the dropped rotated token is \
                             not to be used: the next refresh may present it over the newer grant");
                    }
                }
                self.release_unsaved(chain, lock).await;
                self.alert(alert_key, None).await;
                Ok(true)
            }
            Err(e) => {
                let error = format!("{e:#}");
                error!(grant = %chain.file.display(), error = %error,
                    "STILL cannot store the rotated refresh token; it is kept in memory and no new refresh \
                     starts until it is stored — do not stop leadsync before this is fixed");
                let mut u = Unsaved {
                    expected,
                    write,
                    access,
                    error,
                    lock,
                    file_seen,
                    in_file,
                };
                self.keep_in_file(chain, &mut u).await;
                state.unsaved = Some(u);
                Ok(false)
            }
        }
    }

    async fn refresh_locked(
        &self,
        chain: &Arc<Chain>,
        state: &mut ChainState,
    ) -> Result<Secret, Failure> {
        let oauth = self.oauth()?;
        let store = self.store()?;
        let file = chain.file.display().to_string();
        self.save_orphans(chain).await;
        // A refresh never starts while the previous rotated token is unsaved:
        // it would use up the only valid token while the store keeps an older one.
        if state.unsaved.is_some() {
            if !self.save_unsaved(chain, state).await? {
                let e = state
                    .unsaved
                    .as_ref()
                    .map(|u| u.error.clone())
                    .unwrap_or_default();
                return Err(Failure::Retry(format!(
                    "the rotated refresh token of the grant in {file} is not stored yet ({e}); \
                     no new refresh until it is"
                )));
            }
            if let Some(a) = &state.access {
                return Ok(a.token.clone());
            }
        }
        if self.stopping.is_cancelled() {
            return Err(self.abandoned(chain, "before it was sent"));
        }
        let lock = self.lock_grant(chain).await?;
        // A refresh of this grant whose answer was never stored (a process
        // killed mid-refresh, or an answer lost): its token may be spent.
        let mut cut_short = {
            let (s, key) = (store.clone(), chain.key.clone());
            blocking(move || s.refresh_note(&key)).await.ok().flatten()
        };
        // A token file removed (or unreadable) once its chain is stored:
        // the stored chain is used (the file is only the initial grant).
        let (seed, unreadable) = match read_token_file(&chain.file) {
            Ok(seed) => {
                chain.file_unreadable.store(false, Ordering::SeqCst);
                self.alert(format!("file:{}", chain.key), None).await;
                (seed, None)
            }
            Err(Failure::Retry(m)) => (String::new(), Some(m)),
            Err(f) => return Err(f),
        };
        let seed_fp = (!seed.is_empty()).then(|| sha256_hex(&seed));
        let businesses = self.members_of(chain);
        let who = if businesses.len() == 1 {
            format!("business {}", businesses[0])
        } else {
            format!("businesses {}", businesses.join(", "))
        };
        let row = {
            let (s, key, fp, b) = (
                store.clone(),
                chain.key.clone(),
                seed_fp.clone(),
                businesses.clone(),
            );
            blocking(move || s.load(&key, fp.as_deref(), &b))
                .await
                .map_err(|e| Failure::Retry(format!("cannot read the token store: {e:#}")))?
        };
        if let Some(m) = unreadable {
            if !row
                .as_ref()
                .is_some_and(|r| r.refused.is_none() && !r.refresh_token.is_empty())
            {
                return Err(Failure::Retry(m));
            }
            if !chain.file_unreadable.swap(true, Ordering::SeqCst) {
                warn!(grant = %chain.file.display(), error = %m,
                    "the token file cannot be read; using the grant's stored refresh token \
                     (the file is only read for a new grant)");
            }
            // `config check` (start, reload) still requires the file.
            self.alert(
                format!("file:{}", chain.key),
                Some(format!(
                    "{m}: the grant's stored refresh token is used, but the next start or reload \
                     (a restart) fails until the file is restored — an empty file will do"
                )),
            )
            .await;
        }
        // A note of a token held unsaved whose write landed after all (its
        // process ended before it cleared the note): nothing was lost.
        // Likewise a refresh's note whose answer was stored (its process
        // ended before it removed the note).
        if let Some(over) = cut_short.as_deref().and_then(note_over)
            && row.as_ref().is_some_and(|r| r.generation > over)
        {
            cut_short = None;
        }
        let file_is_new = seed_fp.is_some()
            && row.as_ref().is_none_or(|r| {
                r.seed_sha256 != seed_fp
                    && r.seed_prior_sha256 != seed_fp
                    && r.file_refused_sha256 != seed_fp
            });
        if let Some(note) = &cut_short
            && let Some(pid) = unsaved_by(note)
            && file_is_new
        {
            // Its rotated token was kept in the token file (or a person
            // put a new grant there): presented first, below.
            warn!(grant = %chain.file.display(), "leadsync process {pid} held a rotated refresh token of \
                this grant that the token store could not take, and ended without storing it; the token \
                file changed since (leadsync keeps such a token there too): presenting the file's token first");
        } else if let Some(note) = &cut_short
            && let Some(pid) = unsaved_by(note)
        {
            // Its lock ended with it: so did the token it held.
            warn!(grant = %chain.file.display(), "leadsync process {pid} held a rotated refresh token of \
                this grant that the token store could not take, and ended without storing it: that token \
                is lost. Presenting the stored refresh token again (Thumbtack accepts it within its grace \
                period for retries; else the grant must be re-authorized with `leadsync auth exchange`)");
        } else if let Some(note) = &cut_short {
            warn!(grant = %chain.file.display(), "a token refresh of this grant ({note}) did not get its answer \
                stored; presenting the stored refresh token again (Thumbtack accepts it within its grace \
                period for retries; else the grant must be re-authorized)");
        }
        // Another process (or an exchange) may have refreshed meanwhile.
        if let Some(r) = &row
            && r.refused.is_none()
            && let Some((token, expires)) = &r.access_token
            && state.refused_access.as_deref() != Some(sha256_hex(token.expose()).as_str())
            && let Some(at) = instant_of(expires)
            && at > Instant::now() + Duration::from_secs(5)
        {
            state.access = Some(Access {
                token: token.clone(),
                expires_at: at,
            });
            // A token another process stored: the grant works.
            self.alert(format!("lost:{}", chain.key), None).await;
            return Ok(token.clone());
        }
        let expected = row.as_ref().map(|r| r.generation).unwrap_or(0);
        let stored = row
            .as_ref()
            .filter(|r| r.refused.is_none() && !r.refresh_token.is_empty())
            .map(|r| r.refresh_token.clone());
        // The file holds a rotated token another chain of this process
        // keeps unsaved (its file was renamed meanwhile): that chain's, not
        // a new grant; taken over once it is stored (as a moved file is).
        if file_is_new && self.holds_in_file(chain, seed_fp.as_deref()) {
            return Err(Failure::Retry(format!(
                "the token file {file} holds a rotated refresh token this process keeps unsaved \
                 under the file's former name; it is taken over once the token store takes it"
            )));
        }
        // The file holds what another grant's token file holds (the
        // onboarding's file copied for a second business of the pro,
        // instead of named twice): one single-use token in two chains, each
        // presenting it: the second presents it spent (or spends the
        // first's). Not presented; the stored chain, if any, is used.
        let twin = match seed_fp.as_deref() {
            Some(fp) if file_is_new => self.twin_file(chain, fp).await.map_err(Failure::Retry)?,
            _ => None,
        };
        let twin_reason = twin.map(|(other, members)| {
            format!(
                "the token file {file} holds the same refresh token as {}, the token file of \
                 business(es) {}: name that one refresh_token_file for every business of the \
                 grant (a grant is one chain of single-use tokens; two files would present it \
                 twice), then reload",
                other.display(),
                members.join(", ")
            )
        });
        if let Some(m) = &twin_reason
            && stored.is_some()
        {
            warn!(grant = %file, "{m}; not presented: using the grant's stored refresh token");
        }
        let mut candidates: Vec<(bool, Secret)> = Vec::new();
        if file_is_new && twin_reason.is_none() {
            candidates.push((true, Secret::new(seed)));
        }
        if let Some(s) = &stored {
            candidates.push((false, s.clone()));
        }
        if candidates.is_empty()
            && let Some(m) = twin_reason
        {
            return Err(Failure::Reauth(format!("{who} is not refreshed: {m}")));
        }
        if candidates.is_empty() {
            return Err(Failure::Reauth(match row.and_then(|r| r.refused) {
                Some(refused) => format!(
                    "{who} needs re-authorization: {refused}; put a new grant in {file} \
                     or run `leadsync auth exchange --business {} ...`",
                    businesses.first().map(String::as_str).unwrap_or("ID")
                ),
                None => format!(
                    "{who} has no refresh token: {file} is empty and the token store has none; \
                     run `leadsync auth exchange --business {} ...`",
                    businesses.first().map(String::as_str).unwrap_or("ID")
                ),
            }));
        }
        let previous_seed = row.as_ref().and_then(|r| r.seed_sha256.clone());
        for (from_file, presented) in candidates {
            // A new refresh (the stored token after the file was refused)
            // never starts once stopping: the stored token stays valid.
            if self.stopping.is_cancelled() {
                return Err(self.abandoned(chain, "before it was sent"));
            }
            // Without its note a refresh is not sent: a store that cannot
            // take the note (a full disk, a read-only file system) could not
            // take the rotated token either, which would then live only in
            // this process and be lost at its next stop. Not sending keeps
            // the stored token the valid one.
            // Nor when the token store itself cannot take a write (a
            // read-only tokens.db, SQLITE_FULL, a refusing trigger) while
            // the note, a file beside it, still can: one journaled
            // transaction per refresh (about hourly per grant).
            let s = store.clone();
            if let Err(e) = blocking(move || s.check_writable()).await {
                let m = format!(
                    "token refresh of {who} not sent: the token store cannot be written ({e:#}), \
                     so it could not keep a rotated refresh token; the stored refresh token stays \
                     valid — make the token store writable"
                );
                error!(grant = %file, error = %format!("{e:#}"), "{m}");
                self.alert(format!("note:{}", chain.key), Some(m.clone()))
                    .await;
                return Err(Failure::Retry(m));
            }
            let note = sent_note(&crate::time::now(), std::process::id(), expected);
            let (s, key, ours) = (store.clone(), chain.key.clone(), note.clone());
            if let Err(e) = blocking(move || s.set_refresh_note(&key, Some(&note))).await {
                // Its write may have failed after the rename (the directory's
                // fsync): a note saying "sent" for a refresh never sent is
                // removed, best-effort; another's note (an earlier lost
                // answer) is kept.
                let (s, key) = (store.clone(), chain.key.clone());
                let _ = blocking(move || {
                    if s.refresh_note(&key)?.as_deref() == Some(ours.as_str()) {
                        s.set_refresh_note(&key, None)?;
                    }
                    Ok(())
                })
                .await;
                let m = format!(
                    "token refresh of {who} not sent: the grant's note that a refresh is out cannot \
                     be written ({e:#}), so the token store could not keep a rotated refresh token \
                     either; the stored refresh token stays valid — make the token store's directory \
                     writable (disk full? read-only file system?)"
                );
                error!(grant = %file, error = %format!("{e:#}"), "{m}");
                self.alert(format!("note:{}", chain.key), Some(m.clone()))
                    .await;
                return Err(Failure::Retry(m));
            }
            // The note's write (an fsync) may take a while: a stop meanwhile
            // still keeps this refresh from being sent.
            if self.stopping.is_cancelled() {
                self.note_refresh(chain, None).await;
                return Err(self.abandoned(chain, "before it was sent"));
            }
            let response = self.post_refresh(&oauth, &presented).await;
            // Nothing rotated, or the answer is about to be stored: a lost
            // answer keeps the note (the token may be spent).
            if let Err(
                TokenFailure::GrantRefused(_)
                | TokenFailure::ClientRefused(_)
                | TokenFailure::Transient(_),
            ) = &response
            {
                self.note_refresh(chain, None).await;
            }
            match response {
                Ok(tokens) => {
                    // No (or an empty) refresh_token: the presented one stays valid.
                    let next = tokens
                        .refresh_token
                        .filter(|t| !t.is_empty())
                        .unwrap_or(presented);
                    // A rotated refresh token without an access token: stored
                    // all the same, and this caller tries again later.
                    let no_access = tokens.access_token.is_empty();
                    let (mut access, wall) =
                        Self::access_of(tokens.access_token, tokens.expires_in);
                    if no_access {
                        access.expires_at = Instant::now();
                    }
                    let write = GrantWrite {
                        refresh_token: next,
                        access_token: (!no_access).then(|| (access.token.clone(), wall)),
                        seed_sha256: if from_file {
                            seed_fp.clone()
                        } else {
                            previous_seed.clone()
                        },
                        source: "refresh".into(),
                    };
                    state.fresh_until = Some(
                        Instant::now()
                            + REFRESH_ON_401_INTERVAL.min(
                                access.expires_at.saturating_duration_since(Instant::now()) / 2,
                            ),
                    );
                    state.refused_access = None;
                    // The write owns the grant's lock while it runs: a stop
                    // that drops this task (the runtime's shutdown) must not
                    // let it go while the write may still land, or another
                    // process reads the generation before it and presents
                    // the spent token.
                    let (s, key, w) = (store.clone(), chain.key.clone(), write.clone());
                    let (saved, lock) =
                        match blocking(move || Ok((s.save(&key, expected, &w), lock))).await {
                            Ok((saved, lock)) => (saved, Some(lock)),
                            Err(e) => {
                                // The task failed with the lock: take it again if free.
                                let (s, key) = (store.clone(), chain.key.clone());
                                (
                                    Err(e),
                                    blocking(move || s.try_lock(&key)).await.ok().flatten(),
                                )
                            }
                        };
                    if saved.is_ok() {
                        self.note_refresh(chain, None).await;
                    }
                    match saved {
                        Ok(Written::Stored(_)) => {
                            // Both, every time (about once an hour): another
                            // process (a `sync` by hand behind a bad proxy, or
                            // whose token store refused its write) may have
                            // raised them since this one last cleared them;
                            // a token stored under the grant's lock says the
                            // grant works and no process holds one unsaved.
                            self.alert(format!("unsaved:{}", chain.key), None).await;
                            self.alert(format!("lost:{}", chain.key), None).await;
                            self.alert(format!("note:{}", chain.key), None).await;
                        }
                        Ok(Written::Conflict(found)) => {
                            warn!(grant = %file, generation = found,
                                "the token store took a newer grant while refreshing; keeping the stored one");
                        }
                        Err(e) => {
                            let error = format!("{e:#}");
                            error!(grant = %file, error = %error,
                                "cannot store the rotated refresh token; it is kept in memory, its access token \
                                 is not used, and no new refresh starts until the store takes it — \
                                 do not stop leadsync before this is fixed");
                            self.alert(
                                format!("unsaved:{}", chain.key),
                                Some(format!(
                                    "the rotated refresh token of {who} cannot be stored in the token store \
                                     ({error}); leadsync keeps it in memory and retries: fix the store \
                                     before stopping leadsync"
                                )),
                            )
                            .await;
                            // The grant's lock stays held with the token, and
                            // its "unsaved" lock is taken (before the note: a
                            // process seeing the note may look for it); the
                            // note names the holder (a full disk may refuse
                            // it: the locks alone are what keep the chain).
                            let lock = match lock {
                                Some(lock) => Some(with_unsaved_lock(&store, chain, lock).await),
                                None => None,
                            };
                            let (s, key) = (store.clone(), chain.key.clone());
                            let fp = sha256_hex(write.refresh_token.expose());
                            if let Err(e) =
                                blocking(move || s.note_unsaved(&key, expected, &fp)).await
                            {
                                warn!(grant = %file, error = %format!("{e:#}"),
                                    "cannot record the unsaved rotated token in the grant's note");
                            }
                            let mut u = Unsaved {
                                expected,
                                write,
                                access,
                                error: error.clone(),
                                lock,
                                file_seen: seed_fp.clone(),
                                in_file: InFile::No,
                            };
                            self.keep_in_file(chain, &mut u).await;
                            state.unsaved = Some(u);
                            return Err(Failure::Retry(format!(
                                "the rotated refresh token of the grant in {file} cannot be stored ({error})"
                            )));
                        }
                    }
                    if no_access {
                        state.fresh_until = None;
                        warn!(grant = %file, "the token endpoint answered without an access token; \
                            its rotated refresh token is stored and the next refresh uses it");
                        return Err(Failure::Retry(format!(
                            "the token endpoint answered without an access token for {who}; \
                             its rotated refresh token is stored"
                        )));
                    }
                    if from_file {
                        self.alert(format!("file-refused:{}", chain.key), None)
                            .await;
                    }
                    info!(businesses = ?businesses, expires_in = tokens.expires_in, "access token refreshed");
                    let token = access.token.clone();
                    state.access = Some(access);
                    return Ok(token);
                }
                Err(TokenFailure::GrantRefused(m)) if from_file && stored.is_some() => {
                    warn!(grant = %file, "the token file was refused by Thumbtack ({m}); using the stored token");
                    if let Some(fp) = seed_fp.clone() {
                        let (s, key) = (store.clone(), chain.key.clone());
                        if let Err(e) = blocking(move || s.refuse_file(&key, &fp)).await {
                            warn!(error = %format!("{e:#}"), "cannot record the refused token file");
                        }
                    }
                    self.alert(
                        format!("file-refused:{}", chain.key),
                        Some(format!(
                            "token file {file} refused; using the stored token ({m})"
                        )),
                    )
                    .await;
                }
                Err(TokenFailure::GrantRefused(m)) => {
                    let reason = match &cut_short {
                        Some(note) if let Some(pid) = unsaved_by(note) => format!(
                            "the refresh token was refused ({m}), most likely because leadsync process {pid} \
                             held its rotated successor in memory, could not store it, and ended: that token \
                             is lost"
                        ),
                        Some(note) => format!(
                            "the refresh token was refused ({m}), most likely because an earlier refresh \
                             of this grant ({note}) was cut short before its answer was stored"
                        ),
                        None => format!("the refresh token was refused ({m})"),
                    };
                    let file_fp = if from_file { seed_fp.clone() } else { None };
                    let (s, key, r) = (store.clone(), chain.key.clone(), reason.clone());
                    match blocking(move || s.refuse(&key, expected, file_fp.as_deref(), &r)).await {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(Failure::Retry(format!(
                                "the grant in {file} changed in the token store while it was refreshed \
                                 (auth exchange?); trying again with the new one"
                            )));
                        }
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "cannot record the refused grant in the token store");
                        }
                    }
                    return Err(Failure::Reauth(format!(
                        "{who} needs re-authorization: {reason}; put a new grant in {file} \
                         or run `leadsync auth exchange --business {} ...`",
                        businesses.first().map(String::as_str).unwrap_or("ID")
                    )));
                }
                Err(TokenFailure::ClientRefused(m)) => return Err(Failure::ClientRefused(m)),
                // Every answer lost: the token may be spent. The note stays
                // for the next refresh, and the operator is told (the log
                // and `status`) until a refresh gets through.
                Err(TokenFailure::Lost(m)) => {
                    error!(grant = %file, error = %m,
                        "no answer to the token refresh could be read: if Thumbtack rotated the refresh token, \
                         the new one is lost; the next refresh presents the same one (accepted within \
                         Thumbtack's grace period for retries, else the grant needs re-authorization)");
                    self.alert(
                        format!("lost:{}", chain.key),
                        Some(format!(
                            "the token refresh of {who} got no answer leadsync could read ({m}); \
                             its refresh token may be spent: the next refresh presents it again, \
                             else the grant needs re-authorization"
                        )),
                    )
                    .await;
                    return Err(Failure::Retry(format!(
                        "token refresh for {who} failed: {m}"
                    )));
                }
                Err(TokenFailure::Transient(m)) => {
                    return Err(Failure::Retry(format!(
                        "token refresh for {who} failed: {m}"
                    )));
                }
            }
        }
        Err(Failure::Retry(format!("token refresh for {who} failed")))
    }

    /// The refresh-token grant; a lost answer is asked again at once with
    /// the same refresh token (Thumbtack's grace period for retries).
    async fn post_refresh(
        &self,
        oauth: &OAuthClient,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, TokenFailure> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
            ("audience", oauth.audience.as_str()),
        ];
        let mut retries = 0;
        let mut timeout = None;
        loop {
            let response = self.post_token(oauth, &form, timeout).await;
            crate::metrics::token_refresh(
                response
                    .as_ref()
                    .map_or_else(TokenFailure::outcome, |_| "ok"),
            );
            // Stopping: the refresh was sent, so Thumbtack may have rotated
            // the token; asking again is the only way to get it back, as
            // long as the answer can arrive and be stored within the bound.
            let left = self.time_left_to_ask();
            match response {
                Err(TokenFailure::Lost(m))
                    if retries < LOST_RESPONSE_RETRIES && left == Some(None) =>
                {
                    return Err(TokenFailure::Lost(format!(
                        "{m}; not asked again: leadsync is stopping and no answer could arrive within \
                         daemon.shutdown_timeout_secs (the next start presents the same refresh token, \
                         accepted within Thumbtack's grace period for retries, else the grant needs \
                         re-authorization)"
                    )));
                }
                Err(TokenFailure::Lost(m)) if retries < LOST_RESPONSE_RETRIES => {
                    timeout = left.flatten();
                    retries += 1;
                    warn!(error = %m, retry = retries,
                        "the token response was lost; asking again at once with the same refresh token");
                }
                Err(TokenFailure::Lost(m)) => {
                    return Err(TokenFailure::Lost(format!(
                        "{m} ({} attempts; the grant may need re-authorization if Thumbtack rotated it)",
                        retries + 1
                    )));
                }
                // Asking again did not get through (throttled, unreachable):
                // the first answer is still lost, so the token may be spent.
                Err(TokenFailure::Transient(m)) if retries > 0 => {
                    return Err(TokenFailure::Lost(format!(
                        "{m}, when asked again after the first answer was lost"
                    )));
                }
                // The same request again, refused: the first one did rotate
                // the token, and its answer is lost for good.
                Err(TokenFailure::GrantRefused(m)) if retries > 0 => {
                    return Err(TokenFailure::GrantRefused(format!(
                        "{m}; asked again after the first answer was lost, so Thumbtack had rotated \
                         the token and its answer never arrived"
                    )));
                }
                other => return other,
            }
        }
    }

    /// One token request; `timeout` shortens the client's request timeout.
    async fn post_token(
        &self,
        oauth: &OAuthClient,
        form: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Result<TokenResponse, TokenFailure> {
        let mut basic =
            reqwest::header::HeaderValue::from_str(oauth.basic().expose()).map_err(|_| {
                TokenFailure::ClientRefused("the client id cannot be sent in a header".into())
            })?;
        basic.set_sensitive(true);
        let mut request = self
            .http
            .post(&oauth.token_url)
            .header(reqwest::header::AUTHORIZATION, basic)
            .form(form);
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        let sent = request.send().await;
        crate::metrics::http_request(
            "POST",
            &oauth.token_url,
            sent.as_ref().ok().map(|r| r.status().as_u16()),
        );
        let resp = sent.map_err(|e| {
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                return TokenFailure::Transient(format!("{UNREACHABLE}: could not connect"));
            } else {
                "connection failed"
            };
            TokenFailure::Lost(format!("token endpoint {what} after the request was sent"))
        })?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
        // A token response is a few hundred bytes: one larger than this
        // is not read, and what it says is unknown — whatever its status: a
        // small `400 invalid_grant` cannot have rotated the token, but an
        // unreadable 4xx may be a proxy's page in front of a server that
        // did. Lost, like a cut one: asked again with the same token (the
        // grace period makes that safe either way), the note kept, and the
        // status named so the operator can look for the proxy.
        let body = read_body(resp, MAX_TOKEN_BODY_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge(what) => TokenFailure::Lost(format!(
                    "token endpoint answered HTTP {status} with a body {what} larger than \
                     {MAX_TOKEN_BODY_BYTES} bytes: not read{}",
                    if (400..500).contains(&status) {
                        " (a proxy's page? what it says is unknown, so it is taken as a lost answer)"
                    } else {
                        ""
                    }
                )),
                BodyError::Read(e) => TokenFailure::Lost(format!(
                    "token response lost while reading it ({})",
                    if e.is_timeout() {
                        "timed out"
                    } else {
                        "connection failed"
                    }
                )),
            })?;
        if (200..300).contains(&status) && status != 202 {
            // Never quote this body: it holds tokens.
            // Whitespace around an access token is no part of it: no HTTP
            // header could carry a newline, and every request would fail
            // until it expired. (A refresh token is kept exactly as answered.)
            let parsed = serde_json::from_slice::<TokenResponse>(&body)
                .ok()
                .map(|mut t| {
                    let trimmed = t.access_token.expose().trim();
                    if trimmed.len() != t.access_token.expose().len() {
                        t.access_token = Secret::new(trimmed);
                    }
                    t
                });
            let has_refresh =
                |t: &TokenResponse| t.refresh_token.as_ref().is_some_and(|r| !r.is_empty());
            match parsed {
                Some(t) if !t.access_token.is_empty() || has_refresh(&t) => return Ok(t),
                _ => {}
            }
            // No usable access token, but the server may have rotated the
            // refresh token all the same: the new one must not be dropped
            // (an empty access_token tells the caller there is none).
            let refresh = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("refresh_token")?
                        .as_str()
                        .filter(|r| !r.is_empty())
                        .map(Secret::new)
                });
            return match refresh {
                Some(r) => Ok(TokenResponse {
                    access_token: Secret::new(""),
                    expires_in: None,
                    refresh_token: Some(r),
                }),
                None => Err(TokenFailure::Lost(format!(
                    "unreadable token response ({} bytes)",
                    body.len()
                ))),
            };
        }
        let oauth_error: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
        // The server's words may quote what it was sent: never repeat a
        // token, a code or the secret (masked before the text is cut short,
        // so no prefix of one survives either).
        let secrets: Vec<&str> = form
            .iter()
            .filter(|(k, _)| matches!(*k, "refresh_token" | "code"))
            .map(|(_, v)| *v)
            .chain([oauth.client_secret.expose()])
            .filter(|v| !v.is_empty())
            .collect();
        let clean = |text: &str| {
            excerpt(
                &secrets
                    .iter()
                    .fold(text.to_string(), |t, s| t.replace(s, crate::secret::MASK)),
            )
        };
        let describe = |code: &str| match oauth_error.error_description.as_deref() {
            Some(d) if !d.is_empty() => format!("{code}: {}", clean(d)),
            _ => code.to_string(),
        };
        let proxy_failed = oauth_error.error.as_deref() == Some("proxy_oauth_failed")
            || (status == 502
                && body
                    .windows(b"proxy_oauth_failed".len())
                    .any(|w| w == b"proxy_oauth_failed"));
        if proxy_failed {
            return Err(TokenFailure::ClientRefused(format!(
                "HTTP {status} {} (a wrong oauth.audience?)",
                describe("proxy_oauth_failed")
            )));
        }
        match (status, oauth_error.error.as_deref()) {
            // Never followed (the client secret and the refresh token must
            // not go where it points), nor read as the endpoint's words:
            // a redirect's body is not its answer.
            (300..=399, _) => Err(TokenFailure::Transient(format!(
                "token endpoint answered HTTP {status}: {REDIRECTED} {} (not followed: check \
                 oauth.token_url)",
                location
                    .as_deref()
                    .map_or_else(|| "(no Location header)".to_string(), clean)
            ))),
            (_, Some("invalid_grant")) => {
                Err(TokenFailure::GrantRefused(describe("invalid_grant")))
            }
            // A 5xx may come from a gateway after the server rotated the
            // token: only a retry within the grace period gets the new one.
            (500..=599, _) => Err(TokenFailure::Lost(format!(
                "token endpoint answered HTTP {status} ({} bytes)",
                body.len()
            ))),
            (408 | 429, _) => Err(TokenFailure::Transient(format!(
                "token endpoint answered HTTP {status} ({} bytes)",
                body.len()
            ))),
            (400..=499, Some(code)) => Err(TokenFailure::ClientRefused(format!(
                "HTTP {status} {}",
                describe(&clean(code))
            ))),
            (401 | 403, None) => Err(TokenFailure::ClientRefused(format!(
                "HTTP {status} from the token endpoint ({} bytes)",
                body.len()
            ))),
            _ => Err(TokenFailure::Transient(format!(
                "token endpoint answered HTTP {status} ({} bytes)",
                body.len()
            ))),
        }
    }
}

impl TokenFailure {
    /// The `outcome` label of the token-refresh metric.
    fn outcome(&self) -> &'static str {
        match self {
            TokenFailure::GrantRefused(_) => "invalid_grant",
            TokenFailure::ClientRefused(_) => "client_refused",
            TokenFailure::Lost(_) => "lost",
            TokenFailure::Transient(_) => "transient",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The business list's excerpts deleted the unsafe characters where
    /// every other piece of server text shown has them as spaces: a line
    /// break or tab between two words joined them.
    #[test]
    fn an_excerpt_has_unsafe_characters_as_spaces_like_all_shown_text() {
        assert_eq!(
            excerpt("Acme\nPlumbing\t\u{1b}[2J\u{202e}x"),
            "Acme Plumbing  [2J x"
        );
        assert_eq!(excerpt(&"é".repeat(300)).chars().count(), 200);
    }

    #[test]
    fn a_link_planted_at_the_token_file_after_its_check_is_not_followed() {
        // exchange_code_into refuses a link first, but one planted between
        // that check and the open made root create, or chmod 0600, the
        // file it points to (/etc/passwd made 0600 breaks every login).
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (absent, present) = (dir.path().join("absent"), dir.path().join("present"));
        std::fs::write(&present, "x").unwrap();
        std::fs::set_permissions(&present, std::fs::Permissions::from_mode(0o644)).unwrap();
        for target in [&absent, &present] {
            let link = dir.path().join("grant");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).unwrap();
            let opened = open_token_file(&link);
            assert!(opened.is_err(), "{}", target.display());
        }
        assert!(!absent.exists());
        let mode = std::fs::metadata(&present).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn a_business_list_answer_without_a_list_is_an_error_not_an_empty_grant() {
        // A 200 carrying an error object (or a list under another key) read
        // as "the grant covers 0 businesses": nothing written, no word why.
        for body in [
            &br#"{"error":"temporarily unavailable"}"#[..],
            br#"{"data":null}"#,
            br#"{"data":{"businessID":"1"}}"#,
            br#""ok""#,
        ] {
            let r = business_page(body);
            assert!(r.is_err(), "{}: {r:?}", String::from_utf8_lossy(body));
        }
        let p = business_page(br#"{"data":[],"pagination":{"limit":20}}"#).unwrap();
        assert!(p.list.is_empty() && p.notes.is_empty(), "{p:?}");
    }

    #[test]
    fn a_business_list_entry_without_a_readable_id_is_named_not_dropped() {
        let BusinessPage { list, notes, .. } = business_page(
            br#"{"data":[{"businessID":"11","name":"A"},{"name":"Pro B"},{"businessID":null}]}"#,
        )
        .unwrap();
        assert_eq!(list, vec![("11".to_string(), Some("A".to_string()))]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("2 of 3"), "{notes:?}");
        assert!(notes[0].contains("Pro B"), "{notes:?}");
        assert!(notes[1].contains("3 of 3"), "{notes:?}");
    }

    #[test]
    fn an_empty_business_id_is_named_like_an_unreadable_one() {
        let BusinessPage { list, notes, .. } =
            business_page(br#"{"data":[{"businessID":"","name":"Pro E"},{"businessID":"12"}]}"#)
                .unwrap();
        assert_eq!(list, vec![("12".to_string(), None)]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("Pro E"), "{notes:?}");
    }

    #[test]
    fn the_business_lists_next_page_is_its_next_its_token_or_the_next_offset() {
        let base = "https://api.thumbtack.com";
        let page = |body: &str| business_page(body.as_bytes()).unwrap();
        let q = |p: &BusinessPage, offset| next_business_query(base, p, offset);
        // Thumbtack echoes only the limit: the next offset.
        let p = page(r#"{"data":[{"businessID":"1"}],"pagination":{"limit":20}}"#);
        assert_eq!(q(&p, 1), Ok(Some("limit=20&offset=1".into())));
        // A bare list names no paging: one page.
        assert_eq!(q(&page(r#"[{"businessID":"1"}]"#), 1), Ok(None));
        let p = page(
            r#"{"data":[],"pagination":{"limit":2,"next":"https://api.thumbtack.com/v4/businesses?limit=2&offset=2"}}"#,
        );
        assert_eq!(q(&p, 0), Ok(Some("limit=2&offset=2".into())));
        let p = page(r#"{"data":[],"pagination":{"limit":2,"nextPageToken":"a b"}}"#);
        assert_eq!(q(&p, 0), Ok(Some("pageToken=a+b".into())));
        let p = page(
            r#"{"data":[],"pagination":{"next":"https://evil.example/v4/businesses?offset=2"}}"#,
        );
        assert!(q(&p, 0).unwrap_err().contains("another host"));
    }

    #[test]
    fn basic_credentials_are_form_urlencoded_first() {
        let c = OAuthClient {
            token_url: String::new(),
            audience: String::new(),
            client_id: "id:1".into(),
            client_secret: Secret::new("s3c+r/t %"),
        };
        let b = c.basic();
        let encoded = b.expose().strip_prefix("Basic ").unwrap();
        let pair = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(String::from_utf8(pair).unwrap(), "id%3A1:s3c%2Br%2Ft+%25");
    }

    #[test]
    fn token_responses_print_masked() {
        let t: TokenResponse = serde_json::from_str(
            r#"{"access_token":"at-secret-1","refresh_token":"rt-secret-2","expires_in":0}"#,
        )
        .unwrap();
        let d = format!("{t:?}");
        assert!(
            !d.contains("at-secret-1") && !d.contains("rt-secret-2"),
            "{d}"
        );
        // expires_in 0 (or negative, read as 0) says nothing usable: the
        // token is kept as one without expires_in, not refreshed — rotating
        // the refresh token — every second while requests go out. A 401
        // still gets a refresh, at most one a minute.
        let (a, _) = Inner::access_of(t.access_token, t.expires_in);
        assert!(a.expires_at > Instant::now() + Duration::from_secs(600));
    }

    #[test]
    fn an_absurd_lifetime_is_capped_not_a_panic() {
        for secs in [u64::MAX, 100_000_000_000_000, 86_401] {
            let (a, wall) = Inner::access_of(Secret::new("a"), Some(secs));
            assert!(a.expires_at <= Instant::now() + Duration::from_secs(MAX_EXPIRES_IN));
            assert!(crate::time::parse(&wall).is_some(), "{wall}");
        }
        assert!(
            instant_of("+200000-01-01T00:00:00Z")
                .is_none_or(|i| i <= Instant::now() + Duration::from_secs(MAX_EXPIRES_IN))
        );
    }

    /// A business list served by offset: `total` businesses `b1`..,
    /// at most `cap` a page, echoing `echo` (else the page's own limit),
    /// `offset` read as a page number when `as_page`, failing from
    /// `fail_from` on.
    fn offset_server(
        total: usize,
        cap: usize,
        echo: Option<usize>,
        as_page: bool,
        fail_from: Option<usize>,
    ) -> impl FnMut(&str) -> anyhow::Result<String> {
        move |q: &str| {
            let p: HashMap<String, usize> = serde_urlencoded::from_str(q).unwrap();
            let offset = p.get("offset").copied().unwrap_or(0);
            if fail_from.is_some_and(|f| offset >= f && offset > 0) {
                anyhow::bail!("HTTP 503");
            }
            let size = p.get("limit").copied().unwrap_or(20).min(cap);
            let skip = if as_page { offset * size } else { offset };
            let data: Vec<_> = (skip..total.max(skip))
                .take(size)
                .map(|i| serde_json::json!({"businessID": format!("b{}", i + 1)}))
                .collect();
            Ok(
                serde_json::json!({"data": data, "pagination": {"limit": echo.unwrap_or(size)}})
                    .to_string(),
            )
        }
    }

    /// Runs [`read_business_list`] on `serve`: the list and the queries asked.
    async fn list_with(
        mut serve: impl FnMut(&str) -> anyhow::Result<String>,
    ) -> (anyhow::Result<BusinessList>, Vec<String>) {
        let mut asked = Vec::new();
        let r = read_business_list("https://api.thumbtack.com", async |q: &str| {
            asked.push(q.to_string());
            // An error `HTTP 4..` (429 aside) stands for a refusal.
            let text = serve(q).map_err(|error| PageError {
                refused: format!("{error}").starts_with("HTTP 4")
                    && !format!("{error}").starts_with("HTTP 429"),
                error,
            })?;
            Ok(business_page(text.as_bytes())?)
        })
        .await;
        (r, asked)
    }

    #[tokio::test]
    async fn a_business_list_serving_the_same_page_forever_stops_and_warns() {
        let page = r#"{"data":[{"businessID":"1"}],"pagination":{"limit":1}}"#;
        let (r, asked) = list_with(|_| Ok(page.to_string())).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert!(
            notes.iter().any(|n| n.contains("does not advance")),
            "{notes:?}"
        );
        // The same token forever, each page with a new business.
        let mut n = 0;
        let (r, asked) = list_with(|_| {
            n += 1;
            Ok(format!(
                r#"{{"data":[{{"businessID":"{n}"}}],"nextPageToken":"t"}}"#
            ))
        })
        .await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!((list.len(), asked.len()), (2, 2), "{asked:?}");
        assert!(
            notes.iter().any(|n| n.contains("already answered")),
            "{notes:?}"
        );
    }

    #[tokio::test]
    async fn a_business_list_next_on_another_host_is_never_followed() {
        let page = r#"{"data":[{"businessID":"1"}],"pagination":{"next":"https://evil.example/api/v4/businesses?offset=1"}}"#;
        let (r, asked) = list_with(|_| Ok(page.to_string())).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!((list.len(), asked.len()), (1, 1), "{asked:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("another host") && n.contains("may cover more")),
            "{notes:?}"
        );
    }

    #[tokio::test]
    async fn a_later_page_failing_keeps_the_businesses_read_and_warns() {
        let (r, _) = list_with(offset_server(5, 2, None, false, Some(1))).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 2);
        assert!(
            notes.iter().any(|n| n.contains("page 2 could not be read")),
            "{notes:?}"
        );
        // The first page failing is an error.
        let (r, _) = list_with(|_| anyhow::bail!("HTTP 503")).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn a_business_list_is_read_at_most_max_pages() {
        let mut n = 0;
        let (r, asked) = list_with(|_| {
            n += 1;
            Ok(format!(
                r#"{{"data":[{{"businessID":"{n}"}}],"nextPageToken":"t{n}"}}"#
            ))
        })
        .await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(
            (list.len(), asked.len()),
            (MAX_BUSINESS_PAGES, MAX_BUSINESS_PAGES)
        );
        assert!(
            notes.iter().any(|n| n.contains("after 100 pages")),
            "{notes:?}"
        );
    }

    #[tokio::test]
    async fn pages_capped_below_the_limit_they_echo_then_failing_warn() {
        // Pages of 10 echoing limit 20: each looks short, yet the next one
        // brings new businesses, so a short page no longer proves the end.
        let (r, asked) = list_with(offset_server(25, 10, Some(20), false, Some(20))).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 20, "{asked:?}");
        assert!(
            notes.iter().any(|n| n.contains("page 3 could not be read")),
            "{notes:?}"
        );
        // Read whole, it ends without a warning.
        let (r, asked) = list_with(offset_server(25, 10, Some(20), false, None)).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 25, "{asked:?}");
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[tokio::test]
    async fn an_empty_page_after_a_full_one_proves_the_end_or_warns() {
        // `offset` read as a page number: offset 20 is page 20, empty.
        let (r, asked) = list_with(offset_server(30, 20, None, true, None)).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 20, "{asked:?}");
        assert!(
            notes.iter().any(|n| n.contains("empty after a full page")),
            "{notes:?}"
        );
        // Exactly two full pages of a server counting businesses: the
        // proof answers the last business read, and no warning.
        let (r, asked) = list_with(offset_server(40, 20, None, false, None)).await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 40);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(asked.last().unwrap(), "limit=2&offset=39", "{asked:?}");
        // A proof that fails warns too.
        let mut serve = offset_server(40, 20, None, false, None);
        let (r, _) = list_with(move |q: &str| {
            if q.ends_with("offset=39") {
                anyhow::bail!("HTTP 503")
            }
            serve(q)
        })
        .await;
        let BusinessList { list, notes, .. } = r.unwrap();
        assert_eq!(list.len(), 40);
        assert!(
            notes.iter().any(|n| n.contains("empty after a full page")),
            "{notes:?}"
        );
    }

    #[tokio::test]
    async fn an_outage_after_a_short_page_warns_only_a_refusal_ends_the_list() {
        // Pages capped at 10 echoing limit 20, 25 businesses: page 2
        // failing with a 503 (retries spent) proves nothing.
        let (r, asked) = list_with(offset_server(25, 10, Some(20), false, Some(10))).await;
        let l = r.unwrap();
        assert_eq!(l.list.len(), 10, "{asked:?}");
        assert!(!l.complete);
        assert!(
            l.notes
                .iter()
                .any(|n| n.contains("may cover more") && n.contains("page 2 could not be read")),
            "{:?}",
            l.notes
        );
        // A 4xx there refuses the offset: the short page was the end.
        let mut serve = offset_server(5, 10, Some(20), false, None);
        let (r, _) = list_with(move |q: &str| {
            if q.contains("offset=5") {
                anyhow::bail!("HTTP 400")
            }
            serve(q)
        })
        .await;
        let l = r.unwrap();
        assert_eq!(l.list.len(), 5);
        assert!(l.complete && l.notes.is_empty(), "{:?}", l.notes);
    }

    #[tokio::test]
    async fn a_list_with_an_unreadable_entry_or_a_warning_is_not_complete() {
        let page = r#"{"data":[{"businessID":"1"},{"name":"no id"}]}"#;
        let (r, _) = list_with(|_| Ok(page.to_string())).await;
        let l = r.unwrap();
        assert_eq!(l.list.len(), 1);
        assert!(!l.complete, "{:?}", l.notes);
        let (r, _) = list_with(offset_server(5, 2, None, false, Some(1))).await;
        assert!(!r.unwrap().complete);
        let (r, _) = list_with(offset_server(3, 20, None, false, None)).await;
        assert!(r.unwrap().complete);
    }

    #[tokio::test]
    async fn a_full_page_ending_on_an_unreadable_entry_asks_no_proof() {
        // Two entries echoing limit 2, the last without an id, then an
        // empty page: no last business to prove the end by.
        let (r, asked) = list_with(|q: &str| {
            Ok(if q.is_empty() {
                r#"{"data":[{"businessID":"1"},{"name":"x"}],"pagination":{"limit":2}}"#
            } else {
                r#"{"data":[],"pagination":{"limit":2}}"#
            }
            .to_string())
        })
        .await;
        let l = r.unwrap();
        assert_eq!(asked, ["", "limit=2&offset=2"], "{asked:?}");
        assert!(
            !l.complete
                && l.notes
                    .iter()
                    .any(|n| n.contains("empty after a full page")),
            "{:?}",
            l.notes
        );
    }

    fn bare_inner() -> Inner {
        Inner::new(
            crate::thumbtack::client::http_client(Duration::from_secs(5), "test").unwrap(),
            Duration::from_secs(5),
            None,
            None,
        )
    }

    /// What a reload naming business `id` with token file `file` does.
    fn add_grant(inner: &Inner, id: &str, file: &Path) -> Arc<Chain> {
        let chain = Arc::new(Chain {
            key: grant_key(file),
            file: file.to_path_buf(),
            state: Arc::new(tokio::sync::Mutex::new(ChainState::default())),
            reauth: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            retrying_unsaved: AtomicBool::new(false),
            file_unreadable: AtomicBool::new(false),
        });
        inner
            .chains
            .lock()
            .unwrap()
            .insert(chain.key.clone(), chain.clone());
        inner
            .members
            .write()
            .unwrap()
            .insert(id.to_string(), Member::Grant(chain.clone()));
        chain
    }

    fn fingerprint(file: &Path) -> String {
        sha256_hex(&read_token_file(file).ok().unwrap())
    }

    /// Polls `f` once: whether it is still waiting.
    async fn waits<F: Future>(f: &mut std::pin::Pin<Box<F>>) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn a_check_waiting_on_a_look_begun_before_a_reload_sees_the_added_file() {
        // C's check took its list of files before a reload added B (whose
        // file copies A's), then waited on the look; A's check, started
        // after the reload, waited behind it and reused C's look, which
        // never looked at B's file: A presented its token, B later the
        // spent copy.
        let dir = tempfile::tempdir().unwrap();
        let (fa, fb, fc) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&fa, "token-a").unwrap();
        std::fs::write(&fc, "token-c").unwrap();
        let inner = bare_inner();
        let a = add_grant(&inner, "A", &fa);
        let c = add_grant(&inner, "C", &fc);
        let held = inner.file_index.lock().await;
        let seed_c = fingerprint(&fc);
        let mut c_check = Box::pin(inner.twin_file(&c, &seed_c));
        assert!(waits(&mut c_check).await);
        std::fs::copy(&fa, &fb).unwrap();
        add_grant(&inner, "B", &fb);
        let seed_a = fingerprint(&fa);
        let mut a_check = Box::pin(inner.twin_file(&a, &seed_a));
        assert!(waits(&mut a_check).await);
        drop(held);
        assert_eq!(c_check.await, Ok(None));
        assert_eq!(a_check.await, Ok(Some((fb, vec!["B".to_string()]))));
    }

    #[tokio::test]
    async fn a_file_written_since_the_last_look_began_is_read_again_at_the_next() {
        // A same-length rewrite in the timestamp tick in which a look read
        // the file leaves its metadata as that look saw it: the look's
        // fingerprint (made stale here) was kept, and the copy missed.
        let dir = tempfile::tempdir().unwrap();
        let (fa, fb) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&fa, "token-a").unwrap();
        std::fs::write(&fb, "token-b").unwrap();
        let inner = bare_inner();
        let a = add_grant(&inner, "A", &fa);
        add_grant(&inner, "B", &fb);
        assert_eq!(inner.twin_file(&a, &fingerprint(&fa)).await, Ok(None));
        {
            let mut index = inner.file_index.lock().await;
            let entry = index.files.get_mut(&fb).unwrap();
            assert_eq!(Some(entry.0), file_stamp(&fb));
            entry.1 = Some(sha256_hex("token-x"));
        }
        assert_eq!(
            inner.twin_file(&a, &fingerprint(&fb)).await,
            Ok(Some((fb, vec!["B".to_string()])))
        );
    }

    #[test]
    fn a_retry_after_of_0_or_past_waits_the_backoff() {
        let ms = Duration::from_millis;
        assert_eq!(
            business_retry_wait(429, Some(Duration::ZERO)),
            Some(BUSINESS_RETRY_BACKOFF)
        );
        assert_eq!(business_retry_wait(503, None), Some(BUSINESS_RETRY_BACKOFF));
        assert_eq!(business_retry_wait(429, Some(ms(2000))), Some(ms(2000)));
        assert_eq!(
            business_retry_wait(503, Some(Duration::from_secs(3600))),
            Some(BUSINESS_RETRY_CAP)
        );
        assert_eq!(business_retry_wait(401, Some(ms(2000))), None);
        assert_eq!(business_retry_wait(200, None), None);
    }
}
