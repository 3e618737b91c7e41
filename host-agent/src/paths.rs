//! The agent's on-disk layout under one data directory ([`DataDir`]).
//!
//! ```text
//! <root>/                         0755
//!   images/                       0755  the image cache (images.rs)
//!     <sha256>.<ext>              0644  one verified file per digest, e.g. `<hex>.qcow2`
//!   machines/                     0755
//!     <uuid>/                     0755  one directory per machine
//!       disk.qcow2                      the machine's overlay (disks.rs)
//!       seed.iso                  0644  the NoCloud seed (seed.rs)
//!       console.log                     the serial console log
//! ```
//!
//! Every path is built from a [`Uuid`] or a validated [`Sha256Digest`], never from a tenant
//! string, so no name a tenant picks can escape the data directory (`..`, `/`) or collide
//! with another machine's files.
//!
//! Directories are 0755 because QEMU runs as `libvirt-qemu`, which must traverse every
//! directory on the path of a file it opens (HOST-NOTES.md): a disk or seed inside a 0700
//! directory fails with "Permission denied" at domain start.

use std::fmt;
use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use uuid::Uuid;

/// Mode of every directory the agent creates: traversable and listable by `libvirt-qemu`.
pub const DIR_MODE: u32 = 0o755;

/// Errors of the data directory layout.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    /// The data directory must be absolute: libvirt XML and qcow2 backing files store these
    /// paths, and a relative one would be resolved against some other process's directory.
    #[error("data directory {0:?} is not an absolute path")]
    RelativeRoot(PathBuf),
    /// Creating or changing the mode of a directory failed.
    #[error("cannot prepare directory {path:?}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A directory on the path to the data directory is not traversable by other users, so
    /// QEMU (running as `libvirt-qemu`) could not open anything below it.
    #[error(
        "directory {path:?} (mode {mode:04o}) is not traversable by other users; \
         QEMU runs as libvirt-qemu and could not open files below it"
    )]
    NotTraversable {
        /// The offending directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Errors parsing a [`Sha256Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 digest (64 lowercase hex characters): {0:?}")]
pub struct InvalidDigest(pub String);

/// A SHA-256 digest as 64 lowercase hex characters: the only form in which an image's
/// identity reaches a file name. Uppercase is refused rather than folded, so one image has
/// exactly one spelling (and one cache file).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(String);

impl Sha256Digest {
    /// The digest as lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digest of `bytes` as computed by a finished hasher.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Sha256Digest(hex::encode(bytes))
    }
}

impl FromStr for Sha256Digest {
    type Err = InvalidDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Sha256Digest(s.to_owned()))
        } else {
            Err(InvalidDigest(s.to_owned()))
        }
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a cached image file is; decides its extension in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFileKind {
    /// A qcow2 base disk.
    Qcow2,
    /// A raw base disk.
    Raw,
    /// A kernel for direct kernel boot.
    Kernel,
    /// An initramfs for direct kernel boot.
    Initrd,
}

impl ImageFileKind {
    /// Extension of the cache file (`images/<sha256>.<ext>`).
    pub fn extension(self) -> &'static str {
        match self {
            ImageFileKind::Qcow2 => "qcow2",
            ImageFileKind::Raw => "raw",
            ImageFileKind::Kernel => "vmlinuz",
            ImageFileKind::Initrd => "initrd",
        }
    }
}

/// The root under which the agent keeps its image cache and per-machine files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A data directory at `root`, which must be absolute. Nothing is created yet; see
    /// [`DataDir::prepare`].
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, PathsError> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(PathsError::RelativeRoot(root));
        }
        Ok(DataDir { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image cache directory.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The directory holding one sub-directory per machine.
    pub fn machines_dir(&self) -> PathBuf {
        self.root.join("machines")
    }

    /// The directory of machine `id` (its hyphenated lowercase UUID).
    pub fn machine_dir(&self, id: Uuid) -> PathBuf {
        self.machines_dir()
            .join(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()) as &str)
    }

    /// The machine's qcow2 overlay disk.
    pub fn overlay(&self, id: Uuid) -> PathBuf {
        self.machine_dir(id).join("disk.qcow2")
    }

    /// The machine's NoCloud seed ISO.
    pub fn seed(&self, id: Uuid) -> PathBuf {
        self.machine_dir(id).join("seed.iso")
    }

    /// The machine's serial console log.
    pub fn console_log(&self, id: Uuid) -> PathBuf {
        self.machine_dir(id).join("console.log")
    }

    /// The cache file of the image with `digest`.
    pub fn image(&self, digest: &Sha256Digest, kind: ImageFileKind) -> PathBuf {
        self.images_dir()
            .join(format!("{}.{}", digest.as_str(), kind.extension()))
    }

    /// Creates the root, `images/` and `machines/` with mode 0755 (also fixing the mode of
    /// ones that already exist, since the umask may have narrowed it), after checking that
    /// every existing ancestor of the root is traversable by other users (`o+x`): otherwise
    /// QEMU could not open any disk, seed or kernel below it, and failing here names the
    /// culprit instead of a "Permission denied" at the first domain start.
    pub fn prepare(&self) -> Result<(), PathsError> {
        check_ancestors_traversable(&self.root)?;
        for dir in [self.root.clone(), self.images_dir(), self.machines_dir()] {
            create_dir_0755(&dir)?;
        }
        Ok(())
    }

    /// Creates the directory of machine `id` (and its parents) with mode 0755; returns it.
    pub fn prepare_machine(&self, id: Uuid) -> Result<PathBuf, PathsError> {
        let dir = self.machine_dir(id);
        create_dir_0755(&dir)?;
        Ok(dir)
    }
}

/// `mkdir -p` with mode 0755, then an explicit chmod: `DirBuilder::mode` is filtered by the
/// umask, and a pre-existing directory keeps whatever mode it had.
pub(crate) fn create_dir_0755(dir: &Path) -> Result<(), PathsError> {
    let io_err = |source| PathsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err)?;
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(io_err)
}

/// Fails on the first existing ancestor of `path` (itself excluded) that other users cannot
/// traverse. Ancestors that do not exist yet will be created 0755 and are skipped.
fn check_ancestors_traversable(path: &Path) -> Result<(), PathsError> {
    for dir in path.ancestors().skip(1) {
        match fs::metadata(dir) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o001 == 0 {
                    return Err(PathsError::NotTraversable {
                        path: dir.to_path_buf(),
                        mode,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(PathsError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "3807a0f899ed0713e71da9b5dfd0f0e4ad20135097c4a2e0f5895bfc746f10ba";

    /// A temp dir other users can traverse, whatever tempfile's default mode (a 0700 one
    /// would rightly be refused by [`DataDir::prepare`]).
    fn open_tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("skygate-paths-")
            .permissions(Permissions::from_mode(0o755))
            .tempdir()
            .unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn relative_root_is_refused() {
        assert!(matches!(
            DataDir::new("var/lib/skygate"),
            Err(PathsError::RelativeRoot(_))
        ));
        assert!(DataDir::new("").is_err());
    }

    #[test]
    fn machine_paths_come_from_the_uuid() {
        let data = DataDir::new("/var/lib/skygate-agent").unwrap();
        let id = Uuid::parse_str("01890A5D-AC96-774B-BCCE-B302099A8057").unwrap();
        let dir = "/var/lib/skygate-agent/machines/01890a5d-ac96-774b-bcce-b302099a8057";
        assert_eq!(data.machine_dir(id), PathBuf::from(dir));
        assert_eq!(data.overlay(id), PathBuf::from(format!("{dir}/disk.qcow2")));
        assert_eq!(data.seed(id), PathBuf::from(format!("{dir}/seed.iso")));
        assert_eq!(
            data.console_log(id),
            PathBuf::from(format!("{dir}/console.log"))
        );
    }

    #[test]
    fn distinct_machines_get_distinct_directories() {
        let data = DataDir::new("/d").unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_ne!(data.machine_dir(a), data.machine_dir(b));
        assert!(data.overlay(a).starts_with(data.machines_dir()));
    }

    #[test]
    fn image_paths_come_from_the_digest_and_kind() {
        let data = DataDir::new("/d").unwrap();
        let digest: Sha256Digest = DIGEST.parse().unwrap();
        assert_eq!(
            data.image(&digest, ImageFileKind::Qcow2),
            PathBuf::from(format!("/d/images/{DIGEST}.qcow2"))
        );
        assert_eq!(
            data.image(&digest, ImageFileKind::Raw).extension().unwrap(),
            "raw"
        );
        assert_eq!(
            data.image(&digest, ImageFileKind::Kernel)
                .file_name()
                .unwrap(),
            format!("{DIGEST}.vmlinuz").as_str()
        );
        assert_eq!(
            data.image(&digest, ImageFileKind::Initrd)
                .file_name()
                .unwrap(),
            format!("{DIGEST}.initrd").as_str()
        );
    }

    #[test]
    fn digest_parsing_accepts_only_lowercase_hex_of_64() {
        assert_eq!(DIGEST.parse::<Sha256Digest>().unwrap().to_string(), DIGEST);
        for bad in [
            "",
            &DIGEST[..63],
            &format!("{DIGEST}0"),
            &DIGEST.to_uppercase(),
            &format!("../{}", &DIGEST[3..]),
            &format!("{}/", &DIGEST[..63]),
            &format!("{}g", &DIGEST[..63]),
        ] {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Sha256Digest::from_bytes(&[0xab; 32]).as_str(),
            "ab".repeat(32)
        );
    }

    #[test]
    fn prepare_creates_0755_directories_despite_existing_narrow_modes() {
        let tmp = open_tempdir();
        let data = DataDir::new(tmp.path().join("agent")).unwrap();
        // An existing, too narrow images/ (e.g. made by hand under umask 077) gets fixed.
        fs::create_dir_all(data.images_dir()).unwrap();
        fs::set_permissions(data.images_dir(), Permissions::from_mode(0o700)).unwrap();
        data.prepare().unwrap();
        for dir in [
            data.root().to_path_buf(),
            data.images_dir(),
            data.machines_dir(),
        ] {
            assert!(dir.is_dir(), "{dir:?}");
            assert_eq!(mode(&dir), 0o755, "{dir:?}");
        }
        // Idempotent.
        data.prepare().unwrap();

        let id = Uuid::new_v4();
        let dir = data.prepare_machine(id).unwrap();
        assert_eq!(dir, data.machine_dir(id));
        assert_eq!(mode(&dir), 0o755);
    }

    #[test]
    fn prepare_refuses_a_root_below_a_0700_directory() {
        // A 0700 directory (what `mktemp -d` makes): the trap HOST-NOTES.md describes.
        let private = tempfile::Builder::new()
            .permissions(Permissions::from_mode(0o700))
            .tempdir()
            .unwrap();
        assert_eq!(mode(private.path()), 0o700);
        let data = DataDir::new(private.path().join("agent")).unwrap();
        match data.prepare() {
            Err(PathsError::NotTraversable { path, mode }) => {
                assert_eq!(path, private.path());
                assert_eq!(mode, 0o700);
            }
            other => panic!("expected NotTraversable, got {other:?}"),
        }
        assert!(!data.root().exists());
    }
}
