//! Machine disks: qcow2 overlays on cached base images, blank disks, and the safety checks on
//! base images, all through `qemu-img` behind the [`DiskTool`] trait ([`QemuImg`] is the real
//! implementation; the rest of the agent can be tested against a fake).
//!
//! Safety rules, all enforced here:
//! - Formats are always explicit (`-f`, `-F`): letting QEMU probe a format is how a raw image
//!   whose first bytes look like a qcow2 header (with a backing file of `/etc/shadow`) turns
//!   into a host file read. [`DiskTool::check_base`] refuses a base whose detected format
//!   differs from the declared one, and any base with a backing file or an external data file.
//! - Every `qemu-img` run is bounded, see [`QemuImg`].

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use crate::model::{DiskFormat, MAX_DISK_GIB};

/// Bytes in one GiB.
const GIB: u64 = 1 << 30;

/// CPU seconds one `qemu-img` run may use (`prlimit --cpu`).
pub const QEMU_IMG_CPU_SECONDS: u64 = 30;
/// Address space one `qemu-img` run may map (`prlimit --as`), 1 GiB.
pub const QEMU_IMG_ADDRESS_SPACE_BYTES: u64 = 1 << 30;
/// Default wall-clock limit of one `qemu-img` run.
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(60);

/// What `qemu-img info` reports about one image (only the fields the agent uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format as detected by `qemu-img` (`qcow2`, `raw`, `vmdk`, ...).
    pub format: String,
    /// Size of the disk the guest sees.
    pub virtual_size_bytes: u64,
    /// The backing file as stored in the image (`backing-filename`), if any.
    pub backing_file: Option<String>,
    /// A qcow2 external data file (`format-specific.data.data-file`), if any.
    pub data_file: Option<String>,
}

/// The subset of `qemu-img info --output=json` that [`ImageInfo`] is built from.
#[derive(Debug, Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    data: Option<FormatSpecificData>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecificData {
    #[serde(rename = "data-file")]
    data_file: Option<String>,
}

impl ImageInfo {
    /// Parses the output of `qemu-img info --output=json`.
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        let raw: RawInfo = serde_json::from_slice(json)?;
        Ok(ImageInfo {
            format: raw.format,
            virtual_size_bytes: raw.virtual_size,
            backing_file: raw.backing_filename,
            data_file: raw
                .format_specific
                .and_then(|f| f.data)
                .and_then(|d| d.data_file),
        })
    }
}

/// Errors of disk operations.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `prlimit`/`qemu-img` could not be started.
    #[error("cannot run {program:?}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` exited unsuccessfully (or was killed by its resource limits).
    #[error("qemu-img {args} failed ({status}): {stderr}")]
    Failed {
        /// The arguments, for logs.
        args: String,
        /// Exit status; a signal here usually means a resource limit was hit.
        status: ExitStatus,
        /// What qemu-img wrote to stderr.
        stderr: String,
    },
    /// `qemu-img` ran longer than the wall-clock limit and was killed.
    #[error("qemu-img {args} timed out after {timeout:?}")]
    Timeout {
        /// The arguments, for logs.
        args: String,
        /// The limit.
        timeout: Duration,
    },
    /// `qemu-img info` printed something that is not the expected JSON.
    #[error("cannot parse qemu-img info output for {path:?}")]
    BadInfo {
        /// The image.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Paths handed to qemu-img must be absolute (a relative backing file would be resolved
    /// against the overlay's directory) and UTF-8 (they end up in libvirt XML).
    #[error("{field} path {path:?} must be absolute UTF-8")]
    BadPath {
        /// Which argument.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Sizes are whole GiB, at least 1 and at most [`MAX_DISK_GIB`].
    #[error("disk size {0} GiB is out of range 1..={MAX_DISK_GIB}")]
    BadSize(u64),
    /// A base image with a backing file: its chain would reach files the agent never checked.
    #[error("base image {path:?} has a backing file {backing:?}; refused")]
    BaseHasBackingFile {
        /// The base image.
        path: PathBuf,
        /// Its backing file.
        backing: String,
    },
    /// A base image with an external data file: guest writes/reads would hit another file.
    #[error("base image {path:?} has an external data file {data_file:?}; refused")]
    BaseHasDataFile {
        /// The base image.
        path: PathBuf,
        /// Its data file.
        data_file: String,
    },
    /// The detected format differs from the declared one.
    #[error("base image {path:?} was declared {declared} but qemu-img detects {detected}")]
    FormatMismatch {
        /// The base image.
        path: PathBuf,
        /// What the image record says.
        declared: &'static str,
        /// What qemu-img detected.
        detected: String,
    },
    /// The requested overlay would be smaller than its base: the guest's filesystem would be
    /// cut off. Shrinking is never done silently.
    #[error("overlay of {requested_bytes} bytes is smaller than its base ({base_bytes} bytes)")]
    OverlayTooSmall {
        /// Requested size.
        requested_bytes: u64,
        /// The base's virtual size.
        base_bytes: u64,
    },
    /// A disk would have to shrink to the requested size: what the guest wrote beyond it
    /// would be lost, so disks only ever grow.
    #[error("the disk is {size_bytes} bytes; it cannot shrink to {requested_bytes} bytes")]
    WouldShrink {
        /// Its virtual size now.
        size_bytes: u64,
        /// The size asked for.
        requested_bytes: u64,
    },
    /// A file already exists where the overlay goes but is not an overlay of this base; it
    /// is left alone (it may hold a tenant's data).
    #[error("{path:?} exists but is not the expected disk ({found})")]
    Conflict {
        /// The existing file.
        path: PathBuf,
        /// What it is instead.
        found: String,
    },
    /// Creating the temporary file or renaming it into place failed.
    #[error("cannot write {path:?}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Disk operations the agent needs. Implemented by [`QemuImg`].
#[async_trait::async_trait]
pub trait DiskTool: Send + Sync + std::fmt::Debug {
    /// `qemu-img info` of `path` (format probed, backing file not opened).
    async fn info(&self, path: &Path) -> Result<ImageInfo, DiskError>;

    /// Creates a qcow2 overlay at `overlay` backed by `base` (format `base_format`, always
    /// explicit) with a virtual size of `size_gib` GiB.
    ///
    /// Idempotent: an existing qcow2 at `overlay` whose backing file is `base` is left as it
    /// is (not resized). Anything else already at `overlay` is a [`DiskError::Conflict`].
    /// A size below the base's virtual size is [`DiskError::OverlayTooSmall`].
    async fn create_overlay(
        &self,
        base: &Path,
        base_format: DiskFormat,
        overlay: &Path,
        size_gib: u64,
    ) -> Result<(), DiskError>;

    /// Creates an empty qcow2 disk of `size_gib` GiB (for kernel-boot images, which have no
    /// base disk). Idempotent like [`DiskTool::create_overlay`]: an existing qcow2 without a
    /// backing file is left alone.
    async fn create_blank(&self, disk: &Path, size_gib: u64) -> Result<(), DiskError>;

    /// Checks that `path` is safe to use as a base: detected format equals `declared`, no
    /// backing file, no external data file. Returns its info.
    async fn check_base(&self, path: &Path, declared: DiskFormat) -> Result<ImageInfo, DiskError>;

    /// Grows the qcow2 disk at `disk` to `size_gib` GiB (the guest sees the new size at its
    /// next boot); true if it grew. Idempotent: a disk of that size already is left alone. A
    /// smaller size is [`DiskError::WouldShrink`]. The disk must not be in use (QEMU holds
    /// its write lock while the domain runs).
    async fn grow(&self, disk: &Path, size_gib: u64) -> Result<bool, DiskError>;

    /// Points the qcow2 overlay at `disk` at `base` (format `base_format`) without touching
    /// its data (`qemu-img rebase -u`): for a disk moved from another host, whose base is the
    /// same image (same SHA-256) at another path.
    async fn rebase(
        &self,
        disk: &Path,
        base: &Path,
        base_format: DiskFormat,
    ) -> Result<(), DiskError>;
}

/// Whether a disk of `size_bytes` must grow to reach `requested_bytes`; refuses a shrink.
pub fn must_grow(size_bytes: u64, requested_bytes: u64) -> Result<bool, DiskError> {
    if requested_bytes < size_bytes {
        return Err(DiskError::WouldShrink {
            size_bytes,
            requested_bytes,
        });
    }
    Ok(requested_bytes > size_bytes)
}

/// [`DiskTool`] running the real `qemu-img`, each run bounded.
///
/// Why bounded: `qemu-img info` parses attacker-controlled metadata (tenants or image
/// publishers supply base images), and a crafted image can make it burn CPU for a long time
/// or allocate huge amounts of memory (CVE-2015-5162 and kin). OpenStack (nova, cinder,
/// glance) runs qemu-img under the same limits for this reason: every run is
/// `prlimit --cpu=30 --as=1073741824 -- qemu-img ...` (the `prlimit` command, because this
/// crate forbids the unsafe `pre_exec` a direct `setrlimit` would need; prlimit sets the
/// limits on itself and execs qemu-img, so the limits and our child pid are qemu-img's), plus
/// a wall-clock timeout for what the CPU limit does not cover (blocking I/O, e.g. a stuck
/// NFS mount), after which the process is killed (`kill_on_drop`).
#[derive(Debug, Clone)]
pub struct QemuImg {
    qemu_img: PathBuf,
    prlimit: PathBuf,
    timeout: Duration,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg {
            qemu_img: PathBuf::from("qemu-img"),
            prlimit: PathBuf::from("prlimit"),
            timeout: QEMU_IMG_TIMEOUT,
        }
    }
}

impl QemuImg {
    /// `qemu-img` and `prlimit` from `PATH`, with the default timeout.
    pub fn new() -> Self {
        QemuImg::default()
    }

    /// Overrides the wall-clock limit of each run.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Overrides the `qemu-img` program (tests use a fake).
    pub fn with_program(mut self, qemu_img: impl Into<PathBuf>) -> Self {
        self.qemu_img = qemu_img.into();
        self
    }

    /// Runs `prlimit ... -- qemu-img <args>`; returns stdout on success.
    async fn run(&self, args: &[&OsStr]) -> Result<Vec<u8>, DiskError> {
        let shown = || {
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut cmd = Command::new(&self.prlimit);
        cmd.arg(format!("--cpu={QEMU_IMG_CPU_SECONDS}"))
            .arg(format!("--as={QEMU_IMG_ADDRESS_SPACE_BYTES}"))
            .arg("--")
            .arg(&self.qemu_img)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| DiskError::Spawn {
            program: self.prlimit.clone(),
            source,
        })?;
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            // Dropping the future dropped the child: kill_on_drop killed qemu-img.
            Err(_) => {
                return Err(DiskError::Timeout {
                    args: shown(),
                    timeout: self.timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(DiskError::Spawn {
                    program: self.qemu_img.clone(),
                    source,
                })
            }
            Ok(Ok(output)) => output,
        };
        if !output.status.success() {
            return Err(DiskError::Failed {
                args: shown(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output.stdout)
    }

    /// `qemu-img create` into a temporary file next to `target`, then renamed over it, so a
    /// killed or failed run never leaves a half-made disk at `target`. The temporary file is
    /// 0600 and qemu-img keeps that mode: a tenant's disk is root's until libvirt's dynamic
    /// ownership hands it to the QEMU user at start.
    async fn create_atomically(
        &self,
        target: &Path,
        options: &[&OsStr],
        size_gib: u64,
    ) -> Result<(), DiskError> {
        let dir = target.parent().unwrap_or(Path::new("/"));
        let io_err = |source| DiskError::Io {
            path: target.to_path_buf(),
            source,
        };
        let temp = tempfile::Builder::new()
            .prefix(".disk-")
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(io_err)?;
        let size = OsString::from(format!("{size_gib}G"));
        let mut args: Vec<&OsStr> = vec![OsStr::new("create"), OsStr::new("-q")];
        args.extend_from_slice(options);
        args.push(temp.path().as_os_str());
        args.push(&size);
        self.run(&args).await?;
        temp.persist(target).map_err(|e| io_err(e.error))?;
        Ok(())
    }

    /// Info of an existing `path`, or `None` if nothing is there.
    async fn existing(&self, path: &Path) -> Result<Option<ImageInfo>, DiskError> {
        match tokio::fs::symlink_metadata(path).await {
            Ok(_) => self.info(path).await.map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DiskError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// `path` as UTF-8 if it is absolute.
fn absolute_utf8<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, DiskError> {
    match path.to_str() {
        Some(s) if path.is_absolute() => Ok(s),
        _ => Err(DiskError::BadPath {
            field,
            path: path.to_path_buf(),
        }),
    }
}

fn check_size(size_gib: u64) -> Result<u64, DiskError> {
    if (1..=MAX_DISK_GIB).contains(&size_gib) {
        Ok(size_gib * GIB)
    } else {
        Err(DiskError::BadSize(size_gib))
    }
}

#[async_trait::async_trait]
impl DiskTool for QemuImg {
    async fn info(&self, path: &Path) -> Result<ImageInfo, DiskError> {
        // No -f: the point is to detect the format. qemu-img info opens the image without its
        // backing chain (only --backing-chain follows it). -U (force-share): the image may be
        // open in a running VM, whose write lock would otherwise make info fail.
        let out = self
            .run(&[
                OsStr::new("info"),
                OsStr::new("-U"),
                OsStr::new("--output=json"),
                path.as_os_str(),
            ])
            .await?;
        ImageInfo::from_json(&out).map_err(|source| DiskError::BadInfo {
            path: path.to_path_buf(),
            source,
        })
    }

    async fn create_overlay(
        &self,
        base: &Path,
        base_format: DiskFormat,
        overlay: &Path,
        size_gib: u64,
    ) -> Result<(), DiskError> {
        let base_str = absolute_utf8("base", base)?;
        absolute_utf8("overlay", overlay)?;
        let requested_bytes = check_size(size_gib)?;

        if let Some(existing) = self.existing(overlay).await? {
            return if existing.format == "qcow2"
                && existing.backing_file.as_deref() == Some(base_str)
            {
                Ok(())
            } else {
                Err(DiskError::Conflict {
                    path: overlay.to_path_buf(),
                    found: format!(
                        "format {}, backing file {:?}",
                        existing.format, existing.backing_file
                    ),
                })
            };
        }

        let base_bytes = self.info(base).await?.virtual_size_bytes;
        if requested_bytes < base_bytes {
            return Err(DiskError::OverlayTooSmall {
                requested_bytes,
                base_bytes,
            });
        }
        self.create_atomically(
            overlay,
            &[
                OsStr::new("-f"),
                OsStr::new("qcow2"),
                OsStr::new("-F"),
                OsStr::new(base_format.as_str()),
                OsStr::new("-b"),
                OsStr::new(base_str),
            ],
            size_gib,
        )
        .await
    }

    async fn create_blank(&self, disk: &Path, size_gib: u64) -> Result<(), DiskError> {
        absolute_utf8("disk", disk)?;
        check_size(size_gib)?;
        if let Some(existing) = self.existing(disk).await? {
            return if existing.format == "qcow2" && existing.backing_file.is_none() {
                Ok(())
            } else {
                Err(DiskError::Conflict {
                    path: disk.to_path_buf(),
                    found: format!(
                        "format {}, backing file {:?}",
                        existing.format, existing.backing_file
                    ),
                })
            };
        }
        self.create_atomically(disk, &[OsStr::new("-f"), OsStr::new("qcow2")], size_gib)
            .await
    }

    async fn grow(&self, disk: &Path, size_gib: u64) -> Result<bool, DiskError> {
        absolute_utf8("disk", disk)?;
        let requested_bytes = check_size(size_gib)?;
        let info = self.info(disk).await?;
        if info.format != "qcow2" {
            return Err(DiskError::Conflict {
                path: disk.to_path_buf(),
                found: format!("format {}", info.format),
            });
        }
        if !must_grow(info.virtual_size_bytes, requested_bytes)? {
            return Ok(false);
        }
        // qcow2 grows by rewriting its header in place: a run killed part-way leaves the old
        // size or the new one, and the retry compares again.
        let size = OsString::from(format!("{size_gib}G"));
        self.run(&[
            OsStr::new("resize"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            disk.as_os_str(),
            &size,
        ])
        .await?;
        Ok(true)
    }

    async fn rebase(
        &self,
        disk: &Path,
        base: &Path,
        base_format: DiskFormat,
    ) -> Result<(), DiskError> {
        absolute_utf8("disk", disk)?;
        let base = absolute_utf8("base", base)?;
        self.run(&[
            OsStr::new("rebase"),
            OsStr::new("-u"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-F"),
            OsStr::new(base_format.as_str()),
            OsStr::new("-b"),
            OsStr::new(base),
            disk.as_os_str(),
        ])
        .await?;
        Ok(())
    }

    async fn check_base(&self, path: &Path, declared: DiskFormat) -> Result<ImageInfo, DiskError> {
        let info = self.info(path).await?;
        if let Some(backing) = &info.backing_file {
            return Err(DiskError::BaseHasBackingFile {
                path: path.to_path_buf(),
                backing: backing.clone(),
            });
        }
        if let Some(data_file) = &info.data_file {
            return Err(DiskError::BaseHasDataFile {
                path: path.to_path_buf(),
                data_file: data_file.clone(),
            });
        }
        if info.format != declared.as_str() {
            return Err(DiskError::FormatMismatch {
                path: path.to_path_buf(),
                declared: declared.as_str(),
                detected: info.format,
            });
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command as StdCommand;
    use std::time::Instant;

    const MIB: u64 = 1 << 20;

    fn qemu_img_create(args: &[&str]) {
        let status = StdCommand::new("qemu-img")
            .arg("create")
            .arg("-q")
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create {args:?}");
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn info_json_is_parsed() {
        let json = br#"{
            "backing-filename-format": "qcow2", "virtual-size": 1073741824,
            "filename": "ov.qcow2", "format": "qcow2", "actual-size": 200704,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                "data-file": "/tmp/data.raw", "data-file-raw": false}},
            "full-backing-filename": "/tmp/base.qcow2",
            "backing-filename": "/tmp/base.qcow2", "dirty-flag": false}"#;
        assert_eq!(
            ImageInfo::from_json(json).unwrap(),
            ImageInfo {
                format: "qcow2".into(),
                virtual_size_bytes: 1 << 30,
                backing_file: Some("/tmp/base.qcow2".into()),
                data_file: Some("/tmp/data.raw".into()),
            }
        );
        let raw = br#"{"virtual-size": 1048576, "filename": "r.img", "format": "raw",
            "actual-size": 0, "dirty-flag": false}"#;
        let info = ImageInfo::from_json(raw).unwrap();
        assert_eq!((info.backing_file, info.data_file), (None, None));
        assert!(ImageInfo::from_json(b"qemu-img: oops").is_err());
    }

    #[tokio::test]
    async fn overlay_on_a_qcow2_base_and_idempotent_second_call() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.qcow2");
        let overlay = tmp.path().join("disk.qcow2");
        qemu_img_create(&["-f", "qcow2", s(&base), "64M"]);
        let tool = QemuImg::new();

        let base_info = tool.check_base(&base, DiskFormat::Qcow2).await.unwrap();
        assert_eq!(base_info.virtual_size_bytes, 64 * MIB);

        tool.create_overlay(&base, DiskFormat::Qcow2, &overlay, 2)
            .await
            .unwrap();
        let info = tool.info(&overlay).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size_bytes, 2 * GIB);
        assert_eq!(info.backing_file.as_deref(), Some(s(&base)));
        // The tenant's disk is private: tempfile's 0600, which qemu-img keeps (libvirt hands
        // it to the QEMU user at start).
        let mode = std::fs::metadata(&overlay).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(info.data_file, None);
        // No temp file left next to it.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // Second call: same file, untouched (even with another size).
        let before = std::fs::metadata(&overlay).unwrap().modified().unwrap();
        tool.create_overlay(&base, DiskFormat::Qcow2, &overlay, 3)
            .await
            .unwrap();
        assert_eq!(
            std::fs::metadata(&overlay).unwrap().modified().unwrap(),
            before
        );
        assert_eq!(
            tool.info(&overlay).await.unwrap().virtual_size_bytes,
            2 * GIB
        );

        // A different base for the same overlay path is a conflict, not an overwrite.
        let other = tmp.path().join("other.qcow2");
        qemu_img_create(&["-f", "qcow2", s(&other), "64M"]);
        let err = tool
            .create_overlay(&other, DiskFormat::Qcow2, &overlay, 2)
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::Conflict { .. }), "{err}");
    }

    #[tokio::test]
    async fn overlay_on_a_raw_base() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.raw");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        let overlay = tmp.path().join("disk.qcow2");
        let tool = QemuImg::new();
        tool.check_base(&base, DiskFormat::Raw).await.unwrap();
        tool.create_overlay(&base, DiskFormat::Raw, &overlay, 1)
            .await
            .unwrap();
        let info = tool.info(&overlay).await.unwrap();
        assert_eq!(info.backing_file.as_deref(), Some(s(&base)));
        assert_eq!(info.virtual_size_bytes, GIB);
    }

    #[tokio::test]
    async fn overlay_smaller_than_base_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.qcow2");
        qemu_img_create(&["-f", "qcow2", s(&base), "2G"]);
        let overlay = tmp.path().join("disk.qcow2");
        let err = QemuImg::new()
            .create_overlay(&base, DiskFormat::Qcow2, &overlay, 1)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::OverlayTooSmall {
                    requested_bytes,
                    base_bytes
                } if requested_bytes == GIB && base_bytes == 2 * GIB
            ),
            "{err}"
        );
        assert!(!overlay.exists());
    }

    #[tokio::test]
    async fn bad_arguments_are_refused_before_running_anything() {
        let tool = QemuImg::new().with_program("/nonexistent/qemu-img");
        let abs = Path::new("/tmp/x.qcow2");
        for (base, overlay, size) in [
            (Path::new("base.qcow2"), abs, 1),
            (abs, Path::new("disk.qcow2"), 1),
            (abs, Path::new("/tmp/y.qcow2"), 0),
            (abs, Path::new("/tmp/y.qcow2"), MAX_DISK_GIB + 1),
        ] {
            let err = tool
                .create_overlay(base, DiskFormat::Qcow2, overlay, size)
                .await
                .unwrap_err();
            assert!(
                matches!(err, DiskError::BadPath { .. } | DiskError::BadSize(_)),
                "{err}"
            );
        }
        assert!(matches!(
            tool.create_blank(Path::new("rel"), 1).await,
            Err(DiskError::BadPath { .. })
        ));
    }

    #[tokio::test]
    async fn base_with_backing_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("inner.qcow2");
        let base = tmp.path().join("base.qcow2");
        qemu_img_create(&["-f", "qcow2", s(&inner), "64M"]);
        qemu_img_create(&["-f", "qcow2", "-F", "qcow2", "-b", s(&inner), s(&base)]);
        let err = QemuImg::new()
            .check_base(&base, DiskFormat::Qcow2)
            .await
            .unwrap_err();
        match err {
            DiskError::BaseHasBackingFile { backing, .. } => assert_eq!(backing, s(&inner)),
            other => panic!("expected BaseHasBackingFile, got {other}"),
        }
    }

    #[tokio::test]
    async fn base_with_data_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.qcow2");
        let data = tmp.path().join("data.raw");
        let opt = format!("data_file={}", s(&data));
        qemu_img_create(&["-f", "qcow2", "-o", &opt, s(&base), "64M"]);
        let err = QemuImg::new()
            .check_base(&base, DiskFormat::Qcow2)
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::BaseHasDataFile { .. }), "{err}");
    }

    #[tokio::test]
    async fn format_mismatch_is_refused_both_ways() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; MIB as usize]).unwrap();
        let qcow = tmp.path().join("disk.qcow2");
        qemu_img_create(&["-f", "qcow2", s(&qcow), "64M"]);
        let tool = QemuImg::new();

        let err = tool.check_base(&raw, DiskFormat::Qcow2).await.unwrap_err();
        assert!(
            matches!(&err, DiskError::FormatMismatch { declared: "qcow2", detected, .. } if detected == "raw"),
            "{err}"
        );
        // The dangerous direction: qcow2 bytes declared raw.
        let err = tool.check_base(&qcow, DiskFormat::Raw).await.unwrap_err();
        assert!(
            matches!(&err, DiskError::FormatMismatch { declared: "raw", detected, .. } if detected == "qcow2"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_overlay_grows_once_and_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qemu_img_create(&["-f", "qcow2", s(&base), "1G"]);
        let overlay = dir.path().join("overlay.qcow2");
        let tool = QemuImg::new();
        tool.create_overlay(&base, DiskFormat::Qcow2, &overlay, 1)
            .await
            .unwrap();
        assert!(tool.grow(&overlay, 3).await.unwrap());
        let info = tool.info(&overlay).await.unwrap();
        assert_eq!(info.virtual_size_bytes, 3 * GIB);
        // Still backed by the same base: growing keeps the tenant's data.
        assert_eq!(info.backing_file.as_deref(), Some(s(&base)));
        assert!(!tool.grow(&overlay, 3).await.unwrap(), "same size: no-op");
        let err = tool.grow(&overlay, 2).await.unwrap_err();
        assert!(
            matches!(err, DiskError::WouldShrink { size_bytes, requested_bytes }
                if size_bytes == 3 * GIB && requested_bytes == 2 * GIB),
            "{err:?}"
        );
        assert_eq!(
            tool.info(&overlay).await.unwrap().virtual_size_bytes,
            3 * GIB
        );
    }

    #[tokio::test]
    async fn blank_disk_is_created_once() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.qcow2");
        let tool = QemuImg::new();
        tool.create_blank(&disk, 1).await.unwrap();
        let info = tool.info(&disk).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size_bytes, GIB);
        assert_eq!(info.backing_file, None);
        tool.create_blank(&disk, 1).await.unwrap();

        // A raw file in the way is not overwritten.
        let raw = tmp.path().join("raw.img");
        std::fs::write(&raw, b"tenant data").unwrap();
        assert!(matches!(
            tool.create_blank(&raw, 1).await,
            Err(DiskError::Conflict { .. })
        ));
        assert_eq!(std::fs::read(&raw).unwrap(), b"tenant data");
    }

    #[tokio::test]
    async fn qemu_img_errors_carry_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let err = QemuImg::new()
            .info(&tmp.path().join("missing.qcow2"))
            .await
            .unwrap_err();
        match err {
            DiskError::Failed { stderr, args, .. } => {
                assert!(stderr.contains("missing.qcow2"), "{stderr}");
                assert!(args.starts_with("info -U --output=json"), "{args}");
            }
            other => panic!("expected Failed, got {other}"),
        }
    }

    /// A fake qemu-img (shell script) that reports its limits, and one that hangs.
    fn fake_program(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn runs_are_under_prlimit() {
        let tmp = tempfile::tempdir().unwrap();
        // Prints the CPU and address-space limits it runs under, as JSON-ish text in stderr.
        let fake = fake_program(
            tmp.path(),
            "qemu-img",
            r#"echo "cpu=$(ulimit -t) as=$(ulimit -v)" >&2; exit 1"#,
        );
        let err = QemuImg::new()
            .with_program(&fake)
            .info(Path::new("/x"))
            .await
            .unwrap_err();
        match err {
            // ulimit -v is in KiB.
            DiskError::Failed { stderr, .. } => assert_eq!(stderr, "cpu=30 as=1048576"),
            other => panic!("expected Failed, got {other}"),
        }
    }

    #[tokio::test]
    async fn a_hanging_qemu_img_is_killed_at_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("pid");
        let fake = fake_program(
            tmp.path(),
            "qemu-img",
            &format!("echo $$ > {}; exec sleep 60", s(&marker)),
        );
        let started = Instant::now();
        let err = QemuImg::new()
            .with_program(&fake)
            .with_timeout(Duration::from_millis(500))
            .info(Path::new("/x"))
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The process (prlimit exec'd the script, which exec'd sleep: one pid) is gone.
        let pid = std::fs::read_to_string(&marker).unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_dir.exists() && Instant::now() < deadline {
            // A zombie until tokio reaps it; check its state instead of existence.
            let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
            if stat.contains(") Z ") || stat.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "still running: {stat}"
        );
    }
}
