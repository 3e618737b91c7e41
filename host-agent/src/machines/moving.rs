//! Moving a machine's disk to another host (issue 14, evacuate): the source exports its
//! overlay while the domain is off, the target imports it, checks its SHA-256, and points it at
//! its own copy of the image's base. The control plane relays the bytes between the two and
//! then defines the machine on the target with EnsureMachine, which finds the disk in place.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{write_marker, FetchedImage, FileOp, MachineManager, ManagerError};
use crate::hypervisor::{blocking, DomainPhase};
use crate::model::{ImagePlan, MachinePhase};

/// Bytes per exported chunk (gRPC's default message limit is 4 MiB).
const CHUNK: usize = 1 << 20;

/// What an export yields: the disk's bytes, then their digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportPart {
    Data(Vec<u8>),
    /// Lowercase hex SHA-256 of every byte before it.
    Done {
        sha256: String,
    },
}

/// Why an import was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The machine has a domain here: its disk is in use, and not to be overwritten.
    #[error("machine {0} is already defined on this host")]
    AlreadyDefined(Uuid),
    /// What arrived is not what was sent.
    #[error("the disk's SHA-256 is {got}, the sender's is {expected}")]
    Digest { expected: String, got: String },
    /// The stream ended before the digest.
    #[error("the disk ended without its digest")]
    Truncated,
    /// What arrived is not a disk this machine can use.
    #[error("not a disk of this machine: {0}")]
    NotADisk(String),
    /// qemu-img could not read it or point it at the base.
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
}

/// An import under way: the bytes so far, in a temporary file in the machine's directory.
/// Dropped unfinished, the file goes with it (the directory's marker lets the start-up sweep
/// remove the directory).
#[derive(Debug)]
pub struct DiskImport {
    id: Uuid,
    file: tokio::fs::File,
    temp: tempfile::TempPath,
    hasher: Sha256,
    bytes: u64,
    base: Option<(PathBuf, crate::model::DiskFormat)>,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

impl DiskImport {
    /// Appends a chunk.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ManagerError> {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        self.file
            .write_all(data)
            .await
            .map_err(|e| ManagerError::files(FileOp::Writing, self.temp.to_path_buf(), e))
    }
}

impl MachineManager {
    /// Undefines machine `id`'s domain (forced off first, should it run) and keeps its files;
    /// whether there was a domain. See ReleaseMachine.
    pub async fn release(&self, id: Uuid) -> Result<bool, ManagerError> {
        let _lock = self.machine_lock(id).lock_owned().await;
        let name = self.domain_name(id);
        let Some(domain) = self.get_status(&name).await? else {
            return Ok(false);
        };
        let running = !matches!(domain.phase, DomainPhase::Stopped | DomainPhase::Crashed);
        let n = name.clone();
        blocking(&self.hv, move |hv| {
            if running {
                hv.destroy(&n)?;
            }
            hv.undefine(&n)
        })
        .await
        .map_err(ManagerError::Delete)?;
        // Without a domain, a marker left by an earlier crash would let the start-up sweep
        // take the directory for an unfinished creation and remove the disk.
        let dir = self.data.machine_dir(id);
        super::remove_marker(&dir)?;
        super::sync_dir(&dir).map_err(|e| ManagerError::files(FileOp::Writing, &dir, e))?;
        self.events.observe(
            id,
            MachinePhase::Absent,
            "released: its disk stays here for its move",
        );
        Ok(true)
    }

    /// Streams machine `id`'s overlay, then its digest, from its shut-off or released domain.
    /// Refused while the domain runs; the machine's lock is held until the stream is read to
    /// the end or dropped, so nothing starts it meanwhile.
    pub async fn export_disk(
        &self,
        id: Uuid,
    ) -> Result<mpsc::Receiver<Result<ExportPart, ManagerError>>, ManagerError> {
        let lock = self.machine_lock(id).lock_owned().await;
        let name = self.domain_name(id);
        let defined = self.get_status(&name).await?;
        if defined
            .as_ref()
            .is_some_and(|d| !matches!(d.phase, DomainPhase::Stopped | DomainPhase::Crashed))
        {
            return Err(ManagerError::StillRunning(id));
        }
        let path = self.data.overlay(id);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            // Neither a domain nor a disk: nothing of this machine here.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && defined.is_none() => {
                return Err(ManagerError::NotFound(id))
            }
            Err(e) => return Err(ManagerError::files(FileOp::Reading, &path, e)),
        };
        // Two chunks in flight: the sender keeps ahead of a slow link without buffering the
        // disk.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _lock = lock;
            let mut hasher = Sha256::new();
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match read_full(&mut file, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(ManagerError::files(FileOp::Reading, &path, e)))
                            .await;
                        return;
                    }
                };
                if n == 0 {
                    let sha256 = hex::encode(hasher.finalize());
                    let _ = tx.send(Ok(ExportPart::Done { sha256 })).await;
                    return;
                }
                buf.truncate(n);
                hasher.update(&buf);
                if tx.send(Ok(ExportPart::Data(buf))).await.is_err() {
                    // The reader went away: the lock goes with this task.
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Starts importing machine `id`'s disk, made from `image`: refused if the machine is
    /// defined here; fetches the image's base into the cache first (so a bad image fails
    /// before any byte is sent).
    pub async fn import_begin(
        &self,
        id: Uuid,
        image: &ImagePlan,
    ) -> Result<DiskImport, ManagerError> {
        let lock = self.machine_lock(id).lock_owned().await;
        if self.get_status(&self.domain_name(id)).await?.is_some() {
            return Err(ManagerError::ImportDisk(ImportError::AlreadyDefined(id)));
        }
        let base = match self
            .fetch_image(image)
            .await
            .map_err(ManagerError::FetchImage)?
        {
            FetchedImage::Disk { base, format } => Some((base, format)),
            FetchedImage::Kernel(_) => None,
        };
        let dir = self
            .data
            .prepare_machine(id)
            .map_err(|e| ManagerError::CreateDisk(e.into()))?;
        // Until EnsureMachine defines the domain: a crash leaves a directory the sweep removes.
        write_marker(&dir, "import")
            .map_err(|(path, e)| ManagerError::files(FileOp::Writing, path, e))?;
        let temp = tempfile::Builder::new()
            .prefix(".import-")
            .suffix(".partial")
            .tempfile_in(&dir)
            .map_err(|e| ManagerError::files(FileOp::Writing, &dir, e))?
            .into_temp_path();
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&temp)
            .await
            .map_err(|e| ManagerError::files(FileOp::Writing, temp.to_path_buf(), e))?;
        Ok(DiskImport {
            id,
            file,
            temp,
            hasher: Sha256::new(),
            bytes: 0,
            base,
            _lock: lock,
        })
    }

    /// Finishes an import whose sender's digest is `sha256`: checks it, checks the file is a
    /// qcow2 overlay (of a base for a disk image, of nothing for a kernel boot), points it at
    /// this host's copy of the base and puts it in place. Returns the bytes written.
    pub async fn import_finish(
        &self,
        mut import: DiskImport,
        sha256: &str,
    ) -> Result<u64, ManagerError> {
        let temp_path = import.temp.to_path_buf();
        import
            .file
            .sync_all()
            .await
            .map_err(|e| ManagerError::files(FileOp::Writing, &temp_path, e))?;
        let got = hex::encode(std::mem::take(&mut import.hasher).finalize());
        if got != sha256 {
            return Err(ManagerError::ImportDisk(ImportError::Digest {
                expected: sha256.to_owned(),
                got,
            }));
        }
        let info = self
            .disks
            .info(&temp_path)
            .await
            .map_err(|e| ManagerError::ImportDisk(e.into()))?;
        let not_a_disk = |why: String| ManagerError::ImportDisk(ImportError::NotADisk(why));
        if info.format != "qcow2" || info.data_file.is_some() {
            return Err(not_a_disk(format!(
                "format {}, data file {:?}",
                info.format, info.data_file
            )));
        }
        match (&import.base, &info.backing_file) {
            (Some((base, format)), Some(_)) => self
                .disks
                .rebase(&temp_path, base, *format)
                .await
                .map_err(|e| ManagerError::ImportDisk(e.into()))?,
            (None, None) => {}
            (Some(_), None) => return Err(not_a_disk("it has no base".into())),
            (None, Some(b)) => return Err(not_a_disk(format!("it has a base ({b})"))),
        }
        let overlay = self.data.overlay(import.id);
        import
            .temp
            .persist(&overlay)
            .map_err(|e| ManagerError::files(FileOp::Writing, &overlay, e.error))?;
        let dir = self.data.machine_dir(import.id);
        super::sync_dir(&dir).map_err(|e| ManagerError::files(FileOp::Writing, &dir, e))?;
        Ok(import.bytes)
    }
}

/// Reads until `buf` is full or the file ends; the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
