//! The image cache: each image file (base disk, kernel, initrd) is fetched once from its
//! source URL into `images/<sha256>.<ext>` under the data directory and verified against its
//! SHA-256 before it becomes visible there.
//!
//! - Sources: `file:///abs/path` (copied) and `http://` / `https://` (streamed with reqwest).
//! - The bytes go to a temporary file in the cache directory while being hashed; only when
//!   the digest matches is the file made 0644 (QEMU, as `libvirt-qemu`, reads it) and renamed
//!   into place, so a cache file always holds verified bytes. A mismatch deletes the temp file.
//! - A later [`ImageCache::ensure`] trusts a cache file whose size matches the size recorded
//!   at verification (a `<file>.size` sidecar), without re-hashing: hashing a multi-GiB base
//!   on every VM start would cost seconds of I/O, and the file is only ever written by this
//!   module through verify-then-rename. A size mismatch or a missing sidecar (e.g. a crash
//!   between the two renames) triggers a full re-hash, and a file that fails it is replaced.
//!   This guards against truncation, not against someone with root on the host editing
//!   bytes in place; that is out of scope.
//! - Concurrent ensures of one digest share one fetch (single flight): a per-digest async
//!   mutex; whoever gets it second finds the verified file.

use std::collections::HashMap;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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
        /// The URL.
        url: String,
        /// Why.
        reason: String,
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
    /// The HTTP request failed or answered with an error status.
    #[error("fetching {url:?}: {source}")]
    Http {
        /// The source.
        url: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// Reading the source or writing the cache failed.
    #[error("{path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The cache directory could not be created.
    #[error(transparent)]
    Dir(#[from] PathsError),
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
    max_bytes: u64,
    in_flight: Mutex<HashMap<Sha256Digest, Arc<Mutex<()>>>>,
}

impl ImageCache {
    /// A cache under `data` with a default HTTP client (30 s connect and read timeouts,
    /// proxies from the environment).
    pub fn new(data: DataDir) -> Result<Self, ImageError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| ImageError::Http {
                url: String::new(),
                source,
            })?;
        Ok(Self::with_client(data, client))
    }

    /// A cache using `client` for http(s) sources.
    pub fn with_client(data: DataDir, client: reqwest::Client) -> Self {
        ImageCache {
            data,
            client,
            max_bytes: DEFAULT_MAX_IMAGE_BYTES,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Overrides the largest image accepted.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Returns the path of the verified cache file for `spec`, fetching it first if needed.
    pub async fn ensure(&self, spec: &ImageSourceSpec) -> Result<PathBuf, ImageError> {
        let digest: Sha256Digest = spec.sha256.parse()?;
        let source = parse_source(&spec.url)?;
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
        let (actual, len) = match source {
            Source::File(path) => self.copy_file(&spec.url, path, &mut out).await?,
            Source::Http(url) => self.download(&spec.url, url, &mut out).await?,
        };
        out.sync_all().await.map_err(io_err(temp.path()))?;
        drop(out);
        if actual != *digest {
            tracing::warn!(url = %spec.url, expected = %digest.as_str(), actual = %actual.as_str(), "image digest mismatch");
            return Err(ImageError::DigestMismatch {
                url: spec.url.clone(),
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

    /// Copies a local file into `out`, hashing on the way.
    async fn copy_file(
        &self,
        url: &str,
        path: &Path,
        out: &mut tokio::fs::File,
    ) -> Result<(Sha256Digest, u64), ImageError> {
        // Only regular files: opening a FIFO would block until a writer appears (a hang), and
        // a device such as /dev/zero would stream until the size limit.
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if !meta.is_file() {
            return Err(ImageError::BadUrl {
                url: url.to_owned(),
                reason: "not a regular file".into(),
            });
        }
        let mut input = tokio::fs::File::open(path)
            .await
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let mut sink = HashingSink::new(url, self.max_bytes);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input
                .read(&mut buf)
                .await
                .map_err(|source| ImageError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
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
        let http_err = |source| ImageError::Http {
            url: url_str.to_owned(),
            source,
        };
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(http_err)?;
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
        while let Some(chunk) = response.chunk().await.map_err(http_err)? {
            sink.write(out, &chunk).await?;
        }
        Ok(sink.finish())
    }
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
        url: url.to_owned(),
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
        "http" | "https" => Ok(Source::Http(parsed)),
        other => Err(bad(&format!("scheme {other:?} is not file, http or https"))),
    }
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

async fn remove_if_exists(path: &Path) -> Result<(), ImageError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ImageError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        for path in [fifo.as_path(), Path::new("/dev/zero"), tmp.path()] {
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
                err.to_string().contains("not a regular file"),
                "{path:?}: {err}"
            );
        }
    }

    fn cache(tmp: &Path) -> ImageCache {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        ImageCache::with_client(DataDir::new(tmp.join("agent")).unwrap(), client)
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
                matches!(err, ImageError::BadDigest(_) | ImageError::BadUrl { .. }),
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
            Err(ImageError::Http { .. })
        ));
        assert_eq!(cache_entries(&cache).len(), 2);
        server.abort();
    }
}
