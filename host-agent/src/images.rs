//! The image cache: each image file (base disk, kernel, initrd) is fetched once from its
//! source URL into `images/<sha256>.<ext>` under the data directory and verified against its
//! SHA-256 before it becomes visible there. Which sources may be fetched at all is the
//! operator's [`SourcePolicy`], checked before anything is read or sent.
//!
//! - Sources: `file:///abs/path` (copied) and `http://` / `https://` (streamed with reqwest).
//! - The source policy (an administrator of the control plane writes the URLs, the agent runs
//!   as root on the host, so a URL must not reach what the operator did not offer):
//!   - `file://` only for regular files under a directory given with `--image-dir`, checked on
//!     the canonical path (symlinks and `..` resolved, also when `..` hides behind `%2F`);
//!     without `--image-dir` no file source is accepted;
//!   - `http`/`https` only, without credentials in the URL (they would travel into events and
//!     logs), and not to a link-local (169.254.0.0/16, fe80::/10: cloud metadata services),
//!     unspecified (0.0.0.0/8, ::), multicast or broadcast address: a literal address is
//!     checked when the URL is parsed, a host name on every resolution ([`CheckedResolver`], so
//!     a name that changes its answer between check and connect changes nothing);
//!   - redirects keep the scheme, obey the same rules and number at most [`MAX_REDIRECTS`];
//!   - loopback and private addresses stay allowed: operators serve images from the host
//!     itself or their network, and the tests only have 127.0.0.1. Through an HTTP proxy from
//!     the environment the proxy resolves names, so only literal addresses are checked there.
//! - What a caller (the control plane, then the tenant and the administrator) reads is uniform:
//!   a refused source names the rule it broke ([`ImageError::NotAllowed`]); a source that could
//!   not be read or fetched says only that ([`ImageError::Fetch`]). Whether a file is missing
//!   or unreadable, a port closed or answering 404, goes to the agent's log alone, so image
//!   URLs cannot be used to probe the host's files or its network.
//! - The bytes go to a temporary file in the cache directory while being hashed; only when
//!   the digest matches is the file made 0644 (QEMU, as `libvirt-qemu`, reads it) and renamed
//!   into place, so a cache file always holds verified bytes. A mismatch deletes the temp file
//!   and is final for the caller: the same URL will not hash differently on a retry.
//! - A later [`ImageCache::ensure`] trusts a cache file whose size matches the size recorded
//!   at verification (a `<file>.size` sidecar), without re-hashing: hashing a multi-GiB base
//!   on every VM start would cost seconds of I/O, and the file is only ever written by this
//!   module through verify-then-rename. A size mismatch or a missing sidecar (e.g. a crash
//!   between the two renames) triggers a full re-hash, and a file that fails it is replaced.
//!   This guards against truncation, not against someone with root on the host editing
//!   bytes in place; that is out of scope. The source policy is checked before the cache, so
//!   a refused URL cannot even learn whether a digest is cached.
//! - Concurrent ensures of one digest share one fetch (single flight): a per-digest async
//!   mutex; whoever gets it second finds the verified file.

use std::collections::HashMap;
use std::fmt;
use std::fs::Permissions;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::paths::{create_dir_0755, DataDir, ImageFileKind, PathsError, Sha256Digest};

/// Mode of cached image files: readable by `libvirt-qemu`.
const FILE_MODE: u32 = 0o644;
/// Default upper bound on one image's size; a source sending more is cut off.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 << 30;
/// Redirects followed per fetch: enough for a mirror or a CDN hop, few enough that a loop
/// fails fast.
pub const MAX_REDIRECTS: usize = 5;

/// Where one image file comes from and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSourceSpec {
    /// `file:///abs/path`, `http://...` or `https://...`.
    pub url: String,
    /// Expected SHA-256, 64 lowercase hex characters.
    pub sha256: String,
    /// What the file is; decides its extension in the cache.
    pub format: ImageFileKind,
}

/// Errors of the image cache.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The spec's sha256 is not a digest.
    #[error(transparent)]
    BadDigest(#[from] crate::paths::InvalidDigest),
    /// The URL does not parse or has an unsupported scheme.
    #[error("unsupported image URL {url:?}: {reason}")]
    BadUrl {
        /// The URL, credentials masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// The source breaks a rule of the [`SourcePolicy`]; nothing was read or sent.
    #[error("image source {url:?} is not allowed: {rule}")]
    NotAllowed {
        /// The URL, credentials masked.
        url: String,
        /// The rule it breaks.
        rule: SourceRule,
    },
    /// The fetched bytes hash to something else. Nothing was kept.
    // The actual digest is logged, not returned: it would tell a caller the hash of any file
    // the agent can read.
    #[error("image {url:?} does not match its sha256 {expected}")]
    DigestMismatch {
        /// The source.
        url: String,
        /// The digest in the spec.
        expected: Sha256Digest,
        /// The digest of what was fetched.
        actual: Sha256Digest,
    },
    /// The source is larger than the cache accepts.
    #[error("image {url:?} exceeds {limit} bytes")]
    TooLarge {
        /// The source.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// An allowed source could not be read or fetched. The text is the same whatever the
    /// cause (see [`ImageError::hides_cause`]); the cause is in the agent's log.
    #[error("fetching image {url:?} failed (the host agent's log has the cause)")]
    Fetch {
        /// The source, credentials masked.
        url: String,
        /// What went wrong: for the log only.
        #[source]
        source: FetchError,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// Writing or reading the cache failed.
    #[error("{path:?}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The cache directory could not be created.
    #[error(transparent)]
    Dir(#[from] PathsError),
}

impl ImageError {
    /// Whether this error's sources must stay out of what callers read: the OS's or the
    /// network's words would tell a missing file from an unreadable one, or a closed port from
    /// an open one. gRPC statuses (status.rs) stop their message here.
    pub fn hides_cause(&self) -> bool {
        matches!(self, ImageError::Fetch { .. })
    }
}

/// Why an allowed source could not be read or fetched (the agent's log shows it).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Opening or reading a `file://` source failed.
    #[error("reading {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The HTTP request or the body failed.
    #[error("HTTP request")]
    Http(#[source] reqwest::Error),
    /// The server answered with an error status.
    #[error("HTTP status {0}")]
    Status(reqwest::StatusCode),
}

/// A rule of the [`SourcePolicy`]; its text is what a refused caller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRule {
    /// A `file://` path outside every `--image-dir`.
    FileOutsideImageDirs,
    /// A `file://` path under an `--image-dir` that is not a regular file (a FIFO would hang
    /// the fetch, a device stream until the size limit).
    NotRegularFile,
    /// A URL with `user[:password]@`.
    Credentials,
    /// A host that is or resolves to a forbidden address.
    Address(AddressKind),
    /// A redirect to another scheme.
    RedirectScheme,
    /// More than [`MAX_REDIRECTS`] redirects.
    TooManyRedirects,
    /// A redirect the client could not follow (no usable `Location`, e.g. a `file:` one).
    UnfollowedRedirect,
}

impl fmt::Display for SourceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceRule::FileOutsideImageDirs => f.write_str(
                "file:// sources must be files under a directory the host agent allows \
                 (--image-dir)",
            ),
            SourceRule::NotRegularFile => f.write_str("file:// sources must be regular files"),
            SourceRule::Credentials => {
                f.write_str("URLs with credentials (user:password@) are refused")
            }
            SourceRule::Address(kind) => write!(f, "the host is or resolves to a {kind} address"),
            SourceRule::RedirectScheme => f.write_str("a redirect may not change the scheme"),
            SourceRule::TooManyRedirects => {
                write!(f, "more than {MAX_REDIRECTS} redirects")
            }
            SourceRule::UnfollowedRedirect => {
                f.write_str("the source answered with a redirect to something other than http(s)")
            }
        }
    }
}

/// Addresses no image is fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    /// 169.254.0.0/16, fe80::/10: where cloud metadata services (credentials) answer.
    LinkLocal,
    /// 0.0.0.0/8, `::`: connecting there reaches the host itself under another name.
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
}

impl fmt::Display for AddressKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressKind::LinkLocal => "link-local",
            AddressKind::Unspecified => "unspecified",
            AddressKind::Multicast => "multicast",
            AddressKind::Broadcast => "broadcast",
        })
    }
}

/// What kind of forbidden address `ip` is, if it is one. IPv4-mapped IPv6 addresses
/// (`::ffff:169.254.169.254`) are judged as the IPv4 address they reach.
pub fn forbidden_address(ip: IpAddr) -> Option<AddressKind> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<AddressKind> {
    if ip.is_link_local() {
        Some(AddressKind::LinkLocal)
    } else if ip.octets()[0] == 0 {
        Some(AddressKind::Unspecified)
    } else if ip.is_multicast() {
        Some(AddressKind::Multicast)
    } else if ip.is_broadcast() {
        Some(AddressKind::Broadcast)
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<AddressKind> {
    if ip.is_unicast_link_local() {
        Some(AddressKind::LinkLocal)
    } else if ip.is_unspecified() {
        Some(AddressKind::Unspecified)
    } else if ip.is_multicast() {
        Some(AddressKind::Multicast)
    } else {
        None
    }
}

/// A directory given with `--image-dir` that cannot serve as one.
#[derive(Debug, thiserror::Error)]
pub enum ImageDirError {
    /// Relative: it would depend on the agent's working directory.
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// It does not resolve (missing, a dangling link, no permission).
    #[error("{path:?}")]
    Resolve {
        /// The directory as given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// It is a file, not a directory.
    #[error("{0:?} is not a directory")]
    NotADirectory(PathBuf),
}

/// Which sources the agent fetches images from; see the module comment. The default allows
/// http(s) sources only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Canonical directories `file://` sources must lie under.
    file_dirs: Vec<PathBuf>,
}

impl SourcePolicy {
    /// A policy that also allows `file://` sources under `dirs` (canonicalised here, once: the
    /// sources are canonicalised on every fetch and compared with these).
    pub fn with_file_dirs(dirs: &[PathBuf]) -> Result<Self, ImageDirError> {
        let mut file_dirs = Vec::with_capacity(dirs.len());
        for dir in dirs {
            if !dir.is_absolute() {
                return Err(ImageDirError::NotAbsolute(dir.clone()));
            }
            let canonical =
                std::fs::canonicalize(dir).map_err(|source| ImageDirError::Resolve {
                    path: dir.clone(),
                    source,
                })?;
            if !canonical.is_dir() {
                return Err(ImageDirError::NotADirectory(dir.clone()));
            }
            if !file_dirs.contains(&canonical) {
                file_dirs.push(canonical);
            }
        }
        Ok(SourcePolicy { file_dirs })
    }

    /// The canonical directories `file://` sources may come from.
    pub fn file_dirs(&self) -> &[PathBuf] {
        &self.file_dirs
    }

    fn allows_path(&self, path: &Path) -> bool {
        self.file_dirs.iter().any(|dir| path.starts_with(dir))
    }
}

/// Where the bytes come from, after URL validation.
enum Source {
    File(PathBuf),
    Http(reqwest::Url),
}

/// The agent's image cache. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ImageCache {
    data: DataDir,
    client: reqwest::Client,
    policy: SourcePolicy,
    max_bytes: u64,
    in_flight: Mutex<HashMap<Sha256Digest, Arc<Mutex<()>>>>,
}

impl ImageCache {
    /// A cache under `data` fetching what `policy` allows, with the HTTP client of
    /// [`http_client`] (proxies from the environment).
    pub fn new(data: DataDir, policy: SourcePolicy) -> Result<Self, ImageError> {
        let client = http_client(reqwest::Client::builder()).map_err(ImageError::Client)?;
        Ok(Self::with_client(data, policy, client))
    }

    /// A cache using `client` for http(s) sources. Build it with [`http_client`]: another
    /// client would follow redirects and resolve names without the policy's checks.
    pub fn with_client(data: DataDir, policy: SourcePolicy, client: reqwest::Client) -> Self {
        ImageCache {
            data,
            client,
            policy,
            max_bytes: DEFAULT_MAX_IMAGE_BYTES,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Overrides the largest image accepted.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Removes verified cache files that `in_use` does not claim (by file name, e.g.
    /// `<sha256>.qcow2`) and that nobody has ensured within `grace`; returns them. Each is
    /// removed under its digest's lock, after checking its last use again, so an ensure
    /// running meanwhile either finds it whole or fetches it anew.
    pub async fn remove_unused(
        &self,
        in_use: &(dyn Fn(&str) -> bool + Sync),
        grace: Duration,
    ) -> Result<Vec<PathBuf>, ImageError> {
        let dir = self.data.images_dir();
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { path, source }
        };
        let mut files = Vec::new();
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(io_err(&dir))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".size") || name.ends_with(".partial") {
                continue;
            }
            if let Some(used) = last_used(&entry.path()).await {
                files.push((name, used));
            }
        }
        let now = std::time::SystemTime::now();
        let mut removed = Vec::new();
        for name in unused_files(&files, in_use, now, grace) {
            let Some(digest): Option<Sha256Digest> =
                name.split('.').next().and_then(|d| d.parse().ok())
            else {
                continue;
            };
            let flight: Arc<Mutex<()>> = {
                let mut map = self.in_flight.lock().await;
                map.entry(digest.clone()).or_default().clone()
            };
            let _guard = flight.lock().await;
            let path = dir.join(&name);
            // Used since the listing: kept.
            let still_unused = last_used(&path)
                .await
                .is_some_and(|used| now.duration_since(used).unwrap_or_default() >= grace);
            if still_unused && !in_use(&name) {
                remove_if_exists(&path).await?;
                remove_if_exists(&sidecar_path(&path)).await?;
                removed.push(path);
            }
            drop(_guard);
            // Forget the per-digest lock once nobody else holds it, as `ensure` does.
            let mut map = self.in_flight.lock().await;
            if Arc::strong_count(&flight) == 2 {
                map.remove(&digest);
            }
        }
        Ok(removed)
    }

    /// Returns the path of the verified cache file for `spec`, fetching it first if needed.
    pub async fn ensure(&self, spec: &ImageSourceSpec) -> Result<PathBuf, ImageError> {
        let result = self.ensure_checked(spec).await;
        match &result {
            Err(e @ ImageError::Fetch { .. }) => tracing::warn!(
                error = %crate::report::chain(e),
                "image fetch failed"
            ),
            Err(e @ ImageError::NotAllowed { .. }) => {
                tracing::warn!(error = %e, "image source refused")
            }
            _ => {}
        }
        result
    }

    async fn ensure_checked(&self, spec: &ImageSourceSpec) -> Result<PathBuf, ImageError> {
        let digest: Sha256Digest = spec.sha256.parse()?;
        let source = parse_source(&spec.url)?;
        // Before the cache: a refused URL learns nothing, not even whether a digest is cached.
        if let Source::File(path) = &source {
            self.check_file(&spec.url, path).await?;
        }
        let dest = self.data.image(&digest, spec.format);

        let flight = {
            let mut map = self.in_flight.lock().await;
            map.entry(digest.clone()).or_default().clone()
        };
        let result = {
            let _guard = flight.lock().await;
            self.ensure_locked(spec, &source, &digest, &dest).await
        };
        // Forget the per-digest lock once nobody else holds it (map + ours = 2).
        {
            let mut map = self.in_flight.lock().await;
            if Arc::strong_count(&flight) == 2 {
                map.remove(&digest);
            }
        }
        result.map(|()| dest)
    }

    /// Refuses a `file://` source outside the policy's directories, before the cache is
    /// looked at.
    async fn check_file(&self, url: &str, path: &Path) -> Result<(), ImageError> {
        let allowed = match tokio::fs::canonicalize(path).await {
            Ok(canonical) => self.policy.allows_path(&canonical),
            // A path that does not resolve: judged by its spelling alone. Outside the allowed
            // directories it is refused exactly as an existing file there would be, so the
            // answer never tells whether something exists outside them. Inside, a cached copy
            // still serves (the operator may have removed the source); a fetch resolves it
            // again ([`Self::open_source`]).
            Err(_) => self.policy.allows_path(&lexically_normal(path)),
        };
        if allowed {
            Ok(())
        } else {
            Err(ImageError::NotAllowed {
                url: mask_credentials(url),
                rule: SourceRule::FileOutsideImageDirs,
            })
        }
    }

    /// Opens a `file://` source for reading: resolved again (it may have changed since
    /// [`Self::check_file`]), then opened by its canonical path if the policy allows it.
    async fn open_source(&self, url: &str, path: &Path) -> Result<tokio::fs::File, ImageError> {
        let read_err = |source| ImageError::Fetch {
            url: url.to_owned(),
            source: FetchError::Read {
                path: path.to_path_buf(),
                source,
            },
        };
        let canonical = tokio::fs::canonicalize(path).await.map_err(read_err)?;
        if !self.policy.allows_path(&canonical) {
            return Err(ImageError::NotAllowed {
                url: url.to_owned(),
                rule: SourceRule::FileOutsideImageDirs,
            });
        }
        // O_NOFOLLOW: the checked path has no links; one put in its place since is not
        // followed out of the directory. O_NONBLOCK: opening a FIFO must not wait for a
        // writer (it is refused below, after fstat on what was actually opened).
        let input = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(&canonical)
            .await
            .map_err(read_err)?;
        // Only regular files: a FIFO would block on read (a hang), and a device such as
        // /dev/zero would stream until the size limit.
        if !input.metadata().await.map_err(read_err)?.is_file() {
            return Err(ImageError::NotAllowed {
                url: url.to_owned(),
                rule: SourceRule::NotRegularFile,
            });
        }
        Ok(input)
    }

    async fn ensure_locked(
        &self,
        spec: &ImageSourceSpec,
        source: &Source,
        digest: &Sha256Digest,
        dest: &Path,
    ) -> Result<(), ImageError> {
        let sidecar = sidecar_path(dest);
        if let Ok(meta) = tokio::fs::metadata(dest).await {
            let recorded = tokio::fs::read_to_string(&sidecar).await.ok();
            if recorded.and_then(|s| s.trim().parse::<u64>().ok()) == Some(meta.len()) {
                mark_used(&sidecar).await;
                return Ok(());
            }
            // Unknown or wrong size: re-hash what is there before trusting it.
            if hash_file(dest).await? == *digest {
                write_sidecar(&sidecar, meta.len()).await?;
                return Ok(());
            }
            remove_if_exists(dest).await?;
        }

        let dir = self.data.images_dir();
        create_dir_0755(&dir)?;
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { path, source }
        };
        // Deleted on drop: on any error below (and on cancellation) nothing stays behind.
        let temp = tempfile::Builder::new()
            .prefix(".fetch-")
            .suffix(".partial")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        let std_file = temp.as_file().try_clone().map_err(io_err(temp.path()))?;
        let mut out = tokio::fs::File::from_std(std_file);
        let url = mask_credentials(&spec.url);
        let (actual, len) = match source {
            Source::File(path) => self.copy_file(&url, path, &mut out).await?,
            Source::Http(http) => self.download(&url, http, &mut out).await?,
        };
        out.sync_all().await.map_err(io_err(temp.path()))?;
        drop(out);
        if actual != *digest {
            tracing::warn!(url = %url, expected = %digest.as_str(), actual = %actual.as_str(), "image digest mismatch");
            return Err(ImageError::DigestMismatch {
                url,
                expected: digest.clone(),
                actual,
            });
        }
        tokio::fs::set_permissions(temp.path(), Permissions::from_mode(FILE_MODE))
            .await
            .map_err(io_err(temp.path()))?;
        write_sidecar(&sidecar, len).await?;
        temp.persist(dest).map_err(|e| ImageError::Io {
            path: dest.to_path_buf(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Copies a local file the policy allows into `out`, hashing on the way.
    async fn copy_file(
        &self,
        url: &str,
        path: &Path,
        out: &mut tokio::fs::File,
    ) -> Result<(Sha256Digest, u64), ImageError> {
        let read_err = |source| ImageError::Fetch {
            url: url.to_owned(),
            source: FetchError::Read {
                path: path.to_path_buf(),
                source,
            },
        };
        let mut input = self.open_source(url, path).await?;
        let mut sink = HashingSink::new(url, self.max_bytes);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).await.map_err(read_err)?;
            if n == 0 {
                break;
            }
            sink.write(out, &buf[..n]).await?;
        }
        Ok(sink.finish())
    }

    /// Streams an HTTP(S) response body into `out`, hashing on the way.
    async fn download(
        &self,
        url_str: &str,
        url: &reqwest::Url,
        out: &mut tokio::fs::File,
    ) -> Result<(Sha256Digest, u64), ImageError> {
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| http_error(url_str, e))?;
        let status = response.status();
        if status.is_redirection() {
            // reqwest hands back a redirect it could not follow (a `file:` Location, none).
            return Err(ImageError::NotAllowed {
                url: url_str.to_owned(),
                rule: SourceRule::UnfollowedRedirect,
            });
        }
        if !status.is_success() {
            return Err(ImageError::Fetch {
                url: url_str.to_owned(),
                source: FetchError::Status(status),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(ImageError::TooLarge {
                url: url_str.to_owned(),
                limit: self.max_bytes,
            });
        }
        let mut sink = HashingSink::new(url_str, self.max_bytes);
        while let Some(chunk) = response.chunk().await.map_err(|e| http_error(url_str, e))? {
            sink.write(out, &chunk).await?;
        }
        Ok(sink.finish())
    }
}

/// `builder` with what image fetches need: 30 s connect and read timeouts, the redirect
/// policy (same scheme, same rules, at most [`MAX_REDIRECTS`]) and a resolver that refuses
/// forbidden addresses.
pub fn http_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, reqwest::Error> {
    http_client_resolving(builder, CheckedResolver::system())
}

fn http_client_resolving(
    builder: reqwest::ClientBuilder,
    resolver: CheckedResolver,
) -> Result<reqwest::Client, reqwest::Error> {
    builder
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::custom(
            |attempt| match check_redirect(attempt.url(), attempt.previous()) {
                Ok(()) => attempt.follow(),
                Err(rule) => attempt.error(RedirectRefused(rule)),
            },
        ))
        .dns_resolver(Arc::new(resolver))
        .build()
}

/// A refused redirect, carried through reqwest's error to [`http_error`].
#[derive(Debug, thiserror::Error)]
#[error("redirect refused: {0}")]
struct RedirectRefused(SourceRule);

/// A name that resolved to a forbidden address, carried through reqwest's error to
/// [`http_error`].
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {addr}, a {kind} address")]
struct AddressRefused {
    host: String,
    addr: IpAddr,
    kind: AddressKind,
}

/// Whether the client may follow a redirect to `next`; `previous` holds the URLs so far,
/// the first one the original request.
fn check_redirect(next: &reqwest::Url, previous: &[reqwest::Url]) -> Result<(), SourceRule> {
    if previous.len() > MAX_REDIRECTS {
        return Err(SourceRule::TooManyRedirects);
    }
    if previous.last().is_some_and(|p| p.scheme() != next.scheme()) {
        return Err(SourceRule::RedirectScheme);
    }
    check_http_url(next)
}

/// The rules an http(s) URL must follow before a connection: no credentials, no literal
/// forbidden address (names are checked by [`CheckedResolver`]).
fn check_http_url(url: &reqwest::Url) -> Result<(), SourceRule> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SourceRule::RedirectScheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SourceRule::Credentials);
    }
    // The URL parser already wrote literal addresses in their normal form (`0xa9fea9fe`
    // becomes 169.254.169.254), IPv6 ones in brackets.
    let literal = url.host_str().and_then(|h| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    });
    match literal.and_then(forbidden_address) {
        Some(kind) => Err(SourceRule::Address(kind)),
        None => Ok(()),
    }
}

/// Turns a reqwest error into a refusal when one of our checks caused it, else into a fetch
/// failure.
fn http_error(url: &str, error: reqwest::Error) -> ImageError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = cause {
        let rule = if let Some(RedirectRefused(rule)) = e.downcast_ref() {
            Some(*rule)
        } else {
            e.downcast_ref::<AddressRefused>()
                .map(|a| SourceRule::Address(a.kind))
        };
        if let Some(rule) = rule {
            return ImageError::NotAllowed {
                url: url.to_owned(),
                rule,
            };
        }
        cause = e.source();
    }
    ImageError::Fetch {
        url: url.to_owned(),
        source: FetchError::Http(error),
    }
}

/// Looks a host name up.
type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>> + Send + Sync,
>;

/// A resolver that refuses a name if any of its addresses is forbidden: checking each
/// connection's own lookup (not a lookup made beforehand) leaves no window for a name whose
/// answer changes (DNS rebinding).
struct CheckedResolver {
    lookup: Lookup,
}

impl CheckedResolver {
    /// With the system's resolver (getaddrinfo, as reqwest's default).
    fn system() -> Self {
        CheckedResolver {
            lookup: Arc::new(|host: String| {
                Box::pin(async move {
                    Ok(tokio::net::lookup_host((host.as_str(), 0))
                        .await?
                        .map(|a| a.ip())
                        .collect())
                })
            }),
        }
    }
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let lookup = Arc::clone(&self.lookup);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = lookup(host.clone()).await?;
            if let Some((addr, kind)) = addrs
                .iter()
                .find_map(|a| forbidden_address(*a).map(|k| (*a, k)))
            {
                return Err(Box::new(AddressRefused { host, addr, kind }) as _);
            }
            // Port 0: the connector puts the URL's port in.
            let addrs: Vec<SocketAddr> = addrs.into_iter().map(|a| SocketAddr::new(a, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// `url` with any `user:password@` replaced by `***@` and any query string by `***`: what
/// error messages and logs show.
/// Text that does not parse as a URL is masked by its spelling (what follows `://` up to the
/// last `@` before the path).
pub fn mask_credentials(url: &str) -> String {
    // A query string may carry a credential of its own (a pre-signed URL's signature): it is
    // masked like user:password@, since these texts reach tenants' events.
    let url = match url.split_once('?') {
        Some((base, query)) if !query.is_empty() => {
            let fragment = query.split_once('#').map_or("", |(_, f)| f);
            let fragment = if fragment.is_empty() {
                String::new()
            } else {
                format!("#{fragment}")
            };
            format!("{base}?***{fragment}")
        }
        _ => url.to_owned(),
    };
    let url = url.as_str();
    if let Ok(mut parsed) = reqwest::Url::parse(url) {
        if parsed.username().is_empty() && parsed.password().is_none() {
            return url.to_owned();
        }
        if parsed.set_password(None).is_ok() && parsed.set_username("***").is_ok() {
            return parsed.to_string();
        }
    }
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

/// `path` with `.` and `..` resolved by spelling alone (no file system access).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Hashes and writes bytes, enforcing the size limit.
struct HashingSink<'a> {
    url: &'a str,
    hasher: Sha256,
    len: u64,
    max: u64,
}

impl<'a> HashingSink<'a> {
    fn new(url: &'a str, max: u64) -> Self {
        HashingSink {
            url,
            hasher: Sha256::new(),
            len: 0,
            max,
        }
    }

    async fn write(&mut self, out: &mut tokio::fs::File, bytes: &[u8]) -> Result<(), ImageError> {
        self.len += bytes.len() as u64;
        if self.len > self.max {
            return Err(ImageError::TooLarge {
                url: self.url.to_owned(),
                limit: self.max,
            });
        }
        self.hasher.update(bytes);
        out.write_all(bytes).await.map_err(|source| ImageError::Io {
            path: PathBuf::from("<cache temp file>"),
            source,
        })
    }

    fn finish(self) -> (Sha256Digest, u64) {
        (
            Sha256Digest::from_bytes(&self.hasher.finalize().into()),
            self.len,
        )
    }
}

fn parse_source(url: &str) -> Result<Source, ImageError> {
    let bad = |reason: &str| ImageError::BadUrl {
        url: mask_credentials(url),
        reason: reason.to_owned(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            if parsed
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(bad("file URLs must name a local path (file:///...)"));
            }
            let path = parsed
                .to_file_path()
                .map_err(|()| bad("not an absolute local path"))?;
            Ok(Source::File(path))
        }
        "http" | "https" => {
            check_http_url(&parsed).map_err(|rule| ImageError::NotAllowed {
                url: mask_credentials(url),
                rule,
            })?;
            Ok(Source::Http(parsed))
        }
        other => Err(bad(&format!("scheme {other:?} is not file, http or https"))),
    }
}

/// Records that a cache file was just used: its sidecar's modification time is when it was
/// last ensured, which [`ImageCache::remove_unused`] reads. Failing to record it is logged,
/// not fatal: the file only becomes removable sooner, and only if nothing refers to it.
async fn mark_used(sidecar: &Path) {
    let sidecar = sidecar.to_path_buf();
    let touched = tokio::task::spawn_blocking(move || {
        std::fs::File::options()
            .write(true)
            .open(&sidecar)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .map_err(|e| (sidecar, e))
    })
    .await;
    if let Ok(Err((path, e))) = touched {
        tracing::warn!(path = %path.display(), error = %e, "could not record an image's use");
    }
}

/// The cache files whose last use (see [`mark_used`]) is older than `grace` before `now` and
/// that `in_use` does not claim, by file name. Files without a sidecar (never verified, or
/// being written) are never candidates.
pub fn unused_files(
    files: &[(String, std::time::SystemTime)],
    in_use: &dyn Fn(&str) -> bool,
    now: std::time::SystemTime,
    grace: Duration,
) -> Vec<String> {
    files
        .iter()
        .filter(|(name, last_used)| {
            now.duration_since(*last_used).unwrap_or_default() >= grace && !in_use(name)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

fn sidecar_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".size");
    PathBuf::from(name)
}

/// Writes the verified size next to the cache file (temp + rename, so it is never partial).
async fn write_sidecar(sidecar: &Path, len: u64) -> Result<(), ImageError> {
    let mut temp = sidecar.as_os_str().to_owned();
    temp.push(".partial");
    let temp = PathBuf::from(temp);
    let io_err = |source| ImageError::Io {
        path: sidecar.to_path_buf(),
        source,
    };
    tokio::fs::write(&temp, format!("{len}\n"))
        .await
        .map_err(io_err)?;
    tokio::fs::rename(&temp, sidecar).await.map_err(io_err)
}

async fn hash_file(path: &Path) -> Result<Sha256Digest, ImageError> {
    let io_err = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Digest::from_bytes(&hasher.finalize().into()))
}

/// When the verified cache file at `path` was last used: its sidecar's modification time;
/// `None` without a sidecar.
async fn last_used(path: &Path) -> Option<std::time::SystemTime> {
    tokio::fs::metadata(sidecar_path(path))
        .await
        .and_then(|m| m.modified())
        .ok()
}

async fn remove_if_exists(path: &Path) -> Result<(), ImageError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ImageError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_unused_only_past_the_grace_and_unclaimed() {
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        let files = vec![
            ("old.qcow2".to_owned(), now - 2 * hour),
            ("claimed.qcow2".to_owned(), now - 2 * hour),
            ("fresh.qcow2".to_owned(), now - hour / 2),
        ];
        let claims = ["/data/images/claimed.qcow2"];
        let in_use = |name: &str| claims.iter().any(|c| c.contains(name));
        assert_eq!(unused_files(&files, &in_use, now, hour), ["old.qcow2"]);
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[tokio::test]
    async fn a_file_source_that_is_not_a_regular_file_is_refused_not_waited_on() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let cache = cache(tmp.path());
        for (path, rule) in [
            (fifo.as_path(), SourceRule::NotRegularFile),
            (tmp.path(), SourceRule::NotRegularFile),
            (Path::new("/dev/zero"), SourceRule::FileOutsideImageDirs),
        ] {
            let spec = ImageSourceSpec {
                url: format!("file://{}", path.display()),
                sha256: "a".repeat(64),
                format: ImageFileKind::Kernel,
            };
            let err = tokio::time::timeout(Duration::from_secs(5), cache.ensure(&spec))
                .await
                .expect("no hang")
                .unwrap_err();
            assert!(
                matches!(&err, ImageError::NotAllowed { rule: r, .. } if *r == rule),
                "{path:?}: {err}"
            );
        }
    }

    /// A cache under `tmp` that allows file sources under `tmp`.
    fn cache(tmp: &Path) -> ImageCache {
        cache_allowing(tmp, &[tmp.to_path_buf()])
    }

    fn cache_allowing(tmp: &Path, dirs: &[PathBuf]) -> ImageCache {
        let client = http_client(reqwest::Client::builder().no_proxy()).unwrap();
        ImageCache::with_client(
            DataDir::new(tmp.join("agent")).unwrap(),
            SourcePolicy::with_file_dirs(dirs).unwrap(),
            client,
        )
    }

    fn cache_entries(cache: &ImageCache) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(cache.data.images_dir()) {
            Ok(dir) => dir
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    #[tokio::test]
    async fn file_source_is_copied_and_verified_once() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("vmlinuz");
        let content = b"not really a kernel".repeat(1000);
        std::fs::write(&src, &content).unwrap();
        let cache = cache(tmp.path());
        let spec = ImageSourceSpec {
            url: format!("file://{}", src.display()),
            sha256: sha256_hex(&content),
            format: ImageFileKind::Kernel,
        };
        let path = cache.ensure(&spec).await.unwrap();
        let digest: Sha256Digest = spec.sha256.parse().unwrap();
        assert_eq!(path, cache.data.image(&digest, ImageFileKind::Kernel));
        assert_eq!(std::fs::read(&path).unwrap(), content);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let dir_mode = std::fs::metadata(cache.data.images_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o755);
        assert_eq!(
            cache_entries(&cache),
            vec![
                format!("{}.vmlinuz", spec.sha256),
                format!("{}.vmlinuz.size", spec.sha256)
            ]
        );

        // The source may go away: the second ensure does not read it.
        std::fs::remove_file(&src).unwrap();
        assert_eq!(cache.ensure(&spec).await.unwrap(), path);
    }

    #[tokio::test]
    async fn wrong_sha256_is_refused_and_nothing_is_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("disk.raw");
        std::fs::write(&src, b"some bytes").unwrap();
        let cache = cache(tmp.path());
        let spec = ImageSourceSpec {
            url: format!("file://{}", src.display()),
            sha256: sha256_hex(b"other bytes"),
            format: ImageFileKind::Raw,
        };
        let err = cache.ensure(&spec).await.unwrap_err();
        match &err {
            ImageError::DigestMismatch { actual, .. } => {
                assert_eq!(actual.as_str(), sha256_hex(b"some bytes"))
            }
            other => panic!("expected DigestMismatch, got {other}"),
        }
        assert_eq!(cache_entries(&cache), Vec::<String>::new());
    }

    #[tokio::test]
    async fn truncated_cache_file_is_detected_and_refetched() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("initrd");
        std::fs::write(&src, b"0123456789").unwrap();
        let cache = cache(tmp.path());
        let spec = ImageSourceSpec {
            url: format!("file://{}", src.display()),
            sha256: sha256_hex(b"0123456789"),
            format: ImageFileKind::Initrd,
        };
        let path = cache.ensure(&spec).await.unwrap();
        std::fs::write(&path, b"01234").unwrap();
        assert_eq!(cache.ensure(&spec).await.unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
    }

    #[tokio::test]
    async fn bad_specs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = cache(tmp.path());
        let good = sha256_hex(b"x");
        for (url, sha) in [
            ("file:///etc/hostname", "ABC"),
            ("file:///etc/hostname", &good.to_uppercase()),
            ("ftp://127.0.0.1/x", &good),
            ("file://otherhost/etc/hostname", &good),
            ("/etc/hostname", &good),
        ] {
            let spec = ImageSourceSpec {
                url: url.into(),
                sha256: sha.into(),
                format: ImageFileKind::Raw,
            };
            let err = cache.ensure(&spec).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    ImageError::BadDigest(_)
                        | ImageError::BadUrl { .. }
                        | ImageError::NotAllowed { .. }
                ),
                "{url} {sha}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn oversized_source_is_cut_off() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("big");
        std::fs::write(&src, vec![7u8; 4096]).unwrap();
        let cache = cache(tmp.path()).with_max_bytes(1000);
        let spec = ImageSourceSpec {
            url: format!("file://{}", src.display()),
            sha256: sha256_hex(&[7u8; 4096]),
            format: ImageFileKind::Raw,
        };
        assert!(matches!(
            cache.ensure(&spec).await,
            Err(ImageError::TooLarge { limit: 1000, .. })
        ));
        assert_eq!(cache_entries(&cache), Vec::<String>::new());
    }

    /// Serves `body` at /image on 127.0.0.1 (slowly, so concurrent requests would overlap)
    /// and counts requests; 404 elsewhere.
    async fn serve(body: Vec<u8>) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().route(
            "/image",
            axum::routing::get(move || {
                let counter = counter.clone();
                let body = body.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    body
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (format!("http://{addr}"), hits, server)
    }

    #[tokio::test]
    async fn concurrent_http_ensures_share_one_request() {
        let tmp = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sha = sha256_hex(&body);
        let (base, hits, server) = serve(body.clone()).await;
        let cache = Arc::new(cache(tmp.path()));
        let spec = ImageSourceSpec {
            url: format!("{base}/image"),
            sha256: sha,
            format: ImageFileKind::Qcow2,
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (cache, spec) = (cache.clone(), spec.clone());
            tasks.spawn(async move { cache.ensure(&spec).await.unwrap() });
        }
        let mut paths = Vec::new();
        while let Some(path) = tasks.join_next().await {
            paths.push(path.unwrap());
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(paths.len(), 8);
        assert!(paths.iter().all(|p| *p == paths[0]), "{paths:?}");
        assert_eq!(std::fs::read(&paths[0]).unwrap(), body);
        assert!(cache.in_flight.lock().await.is_empty());

        // An error status is an error, and leaves nothing behind.
        let missing = ImageSourceSpec {
            url: format!("{base}/missing"),
            sha256: sha256_hex(b"x"),
            format: ImageFileKind::Raw,
        };
        assert!(matches!(
            cache.ensure(&missing).await,
            Err(ImageError::Fetch {
                source: FetchError::Status(reqwest::StatusCode::NOT_FOUND),
                ..
            })
        ));
        assert_eq!(cache_entries(&cache).len(), 2);
        server.abort();
    }

    /// `spec` for `url` with the digest of `bytes`.
    fn spec_for(url: &str, bytes: &[u8]) -> ImageSourceSpec {
        ImageSourceSpec {
            url: url.into(),
            sha256: sha256_hex(bytes),
            format: ImageFileKind::Raw,
        }
    }

    fn refused_rule(err: &ImageError) -> Option<SourceRule> {
        match err {
            ImageError::NotAllowed { rule, .. } => Some(*rule),
            _ => None,
        }
    }

    /// `tmp/allowed` (the only image dir) holding `image`, and `tmp/secret` next to it.
    fn allowed_and_secret(tmp: &Path) -> (PathBuf, PathBuf) {
        let allowed = tmp.join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("image"), b"image bytes").unwrap();
        let secret = tmp.join("secret");
        std::fs::write(&secret, b"secret bytes").unwrap();
        (allowed, secret)
    }

    #[tokio::test]
    async fn file_sources_outside_the_image_dirs_are_refused_without_being_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (allowed, secret) = allowed_and_secret(tmp.path());
        let cache = cache_allowing(tmp.path(), std::slice::from_ref(&allowed));
        // The right digest would prove the file was read (a mismatch too): neither happens.
        let secret_url = format!("file://{}", secret.display());
        for url in [
            "file:///etc/shadow",
            "file:///proc/self/environ",
            "file:///etc/no-such-file",
            &secret_url,
        ] {
            let err = cache
                .ensure(&spec_for(url, b"secret bytes"))
                .await
                .unwrap_err();
            assert_eq!(
                refused_rule(&err),
                Some(SourceRule::FileOutsideImageDirs),
                "{url}: {err}"
            );
            // One text for files that exist and files that do not.
            assert_eq!(
                err.to_string(),
                format!(
                    "image source {url:?} is not allowed: file:// sources must be files under \
                     a directory the host agent allows (--image-dir)"
                )
            );
        }
        assert_eq!(cache_entries(&cache), Vec::<String>::new());

        // Without --image-dir no file source is accepted, not even one in a listed place.
        let none = cache_allowing(tmp.path(), &[]);
        let url = format!("file://{}/image", allowed.display());
        let err = none
            .ensure(&spec_for(&url, b"image bytes"))
            .await
            .unwrap_err();
        assert_eq!(refused_rule(&err), Some(SourceRule::FileOutsideImageDirs));
        // With it, the same source is fetched.
        let path = cache.ensure(&spec_for(&url, b"image bytes")).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"image bytes");
    }

    #[tokio::test]
    async fn a_symlink_out_of_an_image_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (allowed, secret) = allowed_and_secret(tmp.path());
        std::os::unix::fs::symlink(&secret, allowed.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).unwrap();
        let cache = cache_allowing(tmp.path(), std::slice::from_ref(&allowed));
        for url in [
            format!("file://{}/link", allowed.display()),
            format!("file://{}/etc/hostname", allowed.display()),
        ] {
            let err = cache
                .ensure(&spec_for(&url, b"secret bytes"))
                .await
                .unwrap_err();
            assert_eq!(
                refused_rule(&err),
                Some(SourceRule::FileOutsideImageDirs),
                "{url}: {err}"
            );
        }
        // A link that stays inside is fine: the rule is about where the bytes are.
        std::os::unix::fs::symlink(allowed.join("image"), allowed.join("alias")).unwrap();
        let url = format!("file://{}/alias", allowed.display());
        cache.ensure(&spec_for(&url, b"image bytes")).await.unwrap();
        // An image dir reached through a link is compared in its canonical form.
        std::os::unix::fs::symlink(&allowed, tmp.path().join("via-link")).unwrap();
        let linked = cache_allowing(tmp.path(), &[tmp.path().join("via-link")]);
        assert_eq!(linked.policy.file_dirs(), [allowed.canonicalize().unwrap()]);
        linked
            .ensure(&spec_for(&url, b"image bytes"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn dot_dot_cannot_escape_an_image_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let (allowed, _secret) = allowed_and_secret(tmp.path());
        let cache = cache_allowing(tmp.path(), std::slice::from_ref(&allowed));
        let a = allowed.display();
        for url in [
            // The URL parser folds a plain `..` away; an encoded slash survives it and
            // decodes to `../secret` in the path.
            format!("file://{a}/..%2Fsecret"),
            format!("file://{a}/..%2F..%2F..%2F..%2F..%2Fetc%2Fshadow"),
            format!("file://{a}/../secret"),
            // Missing files are refused the same way, judged by their spelling.
            format!("file://{a}/..%2Fmissing"),
        ] {
            let err = cache
                .ensure(&spec_for(&url, b"secret bytes"))
                .await
                .unwrap_err();
            assert_eq!(
                refused_rule(&err),
                Some(SourceRule::FileOutsideImageDirs),
                "{url}: {err}"
            );
        }
        // `..` that stays inside is fine.
        let url = format!("file://{a}/sub%2F..%2Fimage");
        std::fs::create_dir(allowed.join("sub")).unwrap();
        cache.ensure(&spec_for(&url, b"image bytes")).await.unwrap();
    }

    #[test]
    fn image_dirs_must_be_absolute_existing_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            SourcePolicy::with_file_dirs(&[PathBuf::from("relative")]),
            Err(ImageDirError::NotAbsolute(_))
        ));
        assert!(matches!(
            SourcePolicy::with_file_dirs(&[tmp.path().join("missing")]),
            Err(ImageDirError::Resolve { .. })
        ));
        assert!(matches!(
            SourcePolicy::with_file_dirs(&[file]),
            Err(ImageDirError::NotADirectory(_))
        ));
        assert_eq!(SourcePolicy::default().file_dirs(), [] as [PathBuf; 0]);
    }

    #[tokio::test]
    async fn urls_with_credentials_are_refused_and_never_shown() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = cache(tmp.path());
        for url in [
            "http://alice:hunter2@127.0.0.1:9/image",
            "https://alice@127.0.0.1:9/image",
            "http://:hunter2@127.0.0.1:9/image",
        ] {
            let err = cache.ensure(&spec_for(url, b"x")).await.unwrap_err();
            assert_eq!(refused_rule(&err), Some(SourceRule::Credentials), "{url}");
            let text = err.to_string();
            assert!(
                !text.contains("hunter2") && !text.contains("alice"),
                "{text}"
            );
            assert!(text.contains("***@127.0.0.1:9"), "{text}");
        }
        assert_eq!(
            mask_credentials("http://u:p@[bad/x"),
            "http://***@[bad/x",
            "unparseable URLs are masked too"
        );
        assert_eq!(mask_credentials("http://h/a@b"), "http://h/a@b");
        // A pre-signed URL's signature is a credential too.
        assert_eq!(
            mask_credentials("https://b.example/x.qcow2?X-Amz-Signature=abc&X-Amz-Credential=k#f"),
            "https://b.example/x.qcow2?***#f"
        );
        assert_eq!(
            mask_credentials("https://u:p@b.example/x?sig=1"),
            "https://***@b.example/x?***"
        );
    }

    #[test]
    fn forbidden_addresses_are_link_local_unspecified_multicast_and_broadcast() {
        let cases: [(&str, Option<AddressKind>); 14] = [
            ("169.254.169.254", Some(AddressKind::LinkLocal)),
            ("169.254.0.1", Some(AddressKind::LinkLocal)),
            ("fe80::1", Some(AddressKind::LinkLocal)),
            ("febf::1", Some(AddressKind::LinkLocal)),
            ("::ffff:169.254.169.254", Some(AddressKind::LinkLocal)),
            ("0.0.0.0", Some(AddressKind::Unspecified)),
            ("0.1.2.3", Some(AddressKind::Unspecified)),
            ("::", Some(AddressKind::Unspecified)),
            ("224.0.0.1", Some(AddressKind::Multicast)),
            ("ff02::1", Some(AddressKind::Multicast)),
            ("255.255.255.255", Some(AddressKind::Broadcast)),
            ("127.0.0.1", None),
            ("::1", None),
            ("10.1.2.3", None),
        ];
        for (addr, kind) in cases {
            assert_eq!(forbidden_address(addr.parse().unwrap()), kind, "{addr}");
        }
        assert_eq!(forbidden_address("fec0::1".parse().unwrap()), None);
    }

    /// Literal addresses are refused when the URL is checked: no packet leaves the host.
    #[tokio::test]
    async fn link_local_and_other_forbidden_literals_are_refused_before_connecting() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = cache(tmp.path());
        for (url, kind) in [
            (
                "http://169.254.169.254/latest/meta-data/",
                AddressKind::LinkLocal,
            ),
            ("http://0xa9fea9fe/", AddressKind::LinkLocal),
            ("http://169.254.43518/", AddressKind::LinkLocal),
            ("https://[fe80::1]:8443/x", AddressKind::LinkLocal),
            ("http://[::ffff:a9fe:a9fe]/", AddressKind::LinkLocal),
            ("http://0.0.0.0:8080/", AddressKind::Unspecified),
            ("http://[::]:8080/", AddressKind::Unspecified),
            ("http://239.1.2.3/", AddressKind::Multicast),
            ("http://255.255.255.255/", AddressKind::Broadcast),
        ] {
            let err = cache.ensure(&spec_for(url, b"x")).await.unwrap_err();
            assert_eq!(
                refused_rule(&err),
                Some(SourceRule::Address(kind)),
                "{url}: {err}"
            );
        }
    }

    /// A client whose resolver answers every name with `ip` (no DNS query is sent).
    fn cache_resolving_to(tmp: &Path, ip: IpAddr) -> ImageCache {
        let resolver = CheckedResolver {
            lookup: Arc::new(move |_host| Box::pin(async move { Ok(vec![ip]) })),
        };
        let client =
            http_client_resolving(reqwest::Client::builder().no_proxy(), resolver).unwrap();
        ImageCache::with_client(
            DataDir::new(tmp.join("agent")).unwrap(),
            SourcePolicy::default(),
            client,
        )
    }

    /// Names are checked on the addresses they resolve to, before a connection is made.
    #[tokio::test]
    async fn a_name_resolving_to_a_link_local_address_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let metadata = cache_resolving_to(tmp.path(), "169.254.169.254".parse().unwrap());
        let err = metadata
            .ensure(&spec_for("http://metadata.invalid/latest", b"x"))
            .await
            .unwrap_err();
        assert_eq!(
            refused_rule(&err),
            Some(SourceRule::Address(AddressKind::LinkLocal)),
            "{err}"
        );

        // The same resolver path with an allowed answer reaches the server.
        let body = b"served by name".to_vec();
        let (base, _hits, server) = serve(body.clone()).await;
        let port = base.rsplit(':').next().unwrap();
        let local = cache_resolving_to(tmp.path(), "127.0.0.1".parse().unwrap());
        let url = format!("http://images.invalid:{port}/image");
        local.ensure(&spec_for(&url, &body)).await.unwrap();
        server.abort();
    }

    /// Serves on 127.0.0.1: `/image` (the body), `/to/<n>` (redirects to `/to/<n-1>`, `/to/0`
    /// to `/image`), and `/redirect?to=<url>` (redirects there).
    async fn serve_redirects(body: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
        use axum::extract::{Path as UrlPath, Query};
        use axum::response::Redirect;
        let app = axum::Router::new()
            .route("/image", axum::routing::get(move || async move { body }))
            .route(
                "/to/{n}",
                axum::routing::get(|UrlPath(n): UrlPath<u32>| async move {
                    match n {
                        0 => Redirect::temporary("/image"),
                        n => Redirect::temporary(&format!("/to/{}", n - 1)),
                    }
                }),
            )
            .route(
                "/redirect",
                axum::routing::get(|Query(q): Query<HashMap<String, String>>| async move {
                    Redirect::temporary(&q["to"])
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (format!("http://{addr}"), server)
    }

    #[tokio::test]
    async fn redirects_keep_the_scheme_and_the_rules_and_stay_few() {
        let tmp = tempfile::tempdir().unwrap();
        // The secret lies in an allowed directory: even so a redirect may not reach it.
        let (allowed, _secret) = allowed_and_secret(tmp.path());
        let cache = cache_allowing(tmp.path(), std::slice::from_ref(&allowed));
        let body = b"image bytes".to_vec();
        let (base, server) = serve_redirects(body.clone()).await;
        let port = base.rsplit(':').next().unwrap();
        let redirect = |to: &str| format!("{base}/redirect?to={}", to.replace('&', "%26"));
        for (url, rule) in [
            (
                redirect(&format!("file://{}/image", allowed.display())),
                SourceRule::UnfollowedRedirect,
            ),
            (
                redirect("file:///etc/passwd"),
                SourceRule::UnfollowedRedirect,
            ),
            (
                redirect("http://169.254.169.254/latest/meta-data/"),
                SourceRule::Address(AddressKind::LinkLocal),
            ),
            (
                redirect("http://[fe80::1]/"),
                SourceRule::Address(AddressKind::LinkLocal),
            ),
            (
                redirect(&format!("http://user:pw@127.0.0.1:{port}/image")),
                SourceRule::Credentials,
            ),
            (
                redirect(&format!("https://127.0.0.1:{port}/image")),
                SourceRule::RedirectScheme,
            ),
            (
                format!("{base}/to/{}", MAX_REDIRECTS),
                SourceRule::TooManyRedirects,
            ),
        ] {
            let err = cache.ensure(&spec_for(&url, &body)).await.unwrap_err();
            assert_eq!(refused_rule(&err), Some(rule), "{url}: {err}");
        }
        // Up to MAX_REDIRECTS hops on the same scheme are followed.
        let url = format!("{base}/to/{}", MAX_REDIRECTS - 1);
        cache.ensure(&spec_for(&url, &body)).await.unwrap();
        server.abort();
    }

    #[test]
    fn redirect_checks_are_pure() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        let from = [url("http://127.0.0.1/a")];
        assert_eq!(check_redirect(&url("http://127.0.0.1/b"), &from), Ok(()));
        assert_eq!(
            check_redirect(&url("https://127.0.0.1/b"), &from),
            Err(SourceRule::RedirectScheme)
        );
        assert_eq!(
            check_redirect(&url("file:///etc/passwd"), &from),
            Err(SourceRule::RedirectScheme)
        );
        assert_eq!(
            check_redirect(&url("http://169.254.169.254/"), &from),
            Err(SourceRule::Address(AddressKind::LinkLocal))
        );
        let many: Vec<_> = (0..=MAX_REDIRECTS)
            .map(|i| url(&format!("http://127.0.0.1/{i}")))
            .collect();
        assert_eq!(
            check_redirect(&url("http://127.0.0.1/b"), &many),
            Err(SourceRule::TooManyRedirects)
        );
    }

    /// What a caller reads of a failed fetch is one text whatever happened; the cause is
    /// kept (as the error's source) for the agent's log only.
    #[tokio::test]
    async fn fetch_failures_read_the_same_whatever_the_cause() {
        let tmp = tempfile::tempdir().unwrap();
        let (allowed, _secret) = allowed_and_secret(tmp.path());
        let cache = cache_allowing(tmp.path(), std::slice::from_ref(&allowed));
        let (base, server) = serve_redirects(b"image bytes".to_vec()).await;
        // A port nothing listens on: bound, then closed.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        std::fs::create_dir(allowed.join("unreadable")).unwrap();
        std::os::unix::fs::symlink("missing-target", allowed.join("dangling")).unwrap();
        let a = allowed.display();
        for url in [
            format!("file://{a}/missing"),
            format!("file://{a}/dangling"),
            format!("file://{a}/unreadable/..%2F..%2Fallowed%2Fmissing"),
            format!("http://{closed}/image"),
            format!("{base}/missing"),
        ] {
            let err = cache.ensure(&spec_for(&url, b"x")).await.unwrap_err();
            assert!(matches!(err, ImageError::Fetch { .. }), "{url}: {err}");
            assert!(err.hides_cause());
            assert_eq!(
                err.to_string(),
                format!("fetching image {url:?} failed (the host agent's log has the cause)")
            );
            let status = tonic::Status::from(crate::machines::ManagerError::FetchImage(err));
            assert_eq!(status.code(), tonic::Code::Unavailable);
            for leak in ["No such file", "refused", "404", "Not Found", "os error"] {
                assert!(
                    !status.message().contains(leak),
                    "{url}: {}",
                    status.message()
                );
            }
        }
        server.abort();
    }
}
