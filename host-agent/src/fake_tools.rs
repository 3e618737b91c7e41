//! Fakes of the agent's external tools for the simulated fleet (simulate.rs): [`FakeDiskTool`]
//! instead of qemu-img and [`FakeSeedWriter`] instead of genisoimage. They write files where
//! the real tools would, so the manager's directories, markers and deletes behave as on a
//! real host, but the files hold no disk or ISO: nothing can boot from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::disks::{DiskError, DiskTool, ImageInfo};
use crate::model::{DiskFormat, MAX_DISK_GIB};
use crate::seed::{SeedError, SeedSpec, SeedWriter};

const GIB: u64 = 1 << 30;

/// A [`DiskTool`] that runs no qemu-img: creating a disk writes an empty file and remembers
/// what qemu-img would have made, so `info` answers as qemu-img would for the disks it made.
/// Files it did not make (base images from the cache) read as raw images of their length.
///
/// Idempotent like the real tool: creating what already exists, as it was made, is a no-op;
/// a different disk at the same path is [`DiskError::Conflict`].
#[derive(Debug, Default)]
pub struct FakeDiskTool {
    made: Mutex<HashMap<PathBuf, ImageInfo>>,
}

impl FakeDiskTool {
    /// A fake that has made nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn create(&self, path: &Path, size_gib: u64, backing: Option<&Path>) -> Result<(), DiskError> {
        if !(1..=MAX_DISK_GIB).contains(&size_gib) {
            return Err(DiskError::BadSize(size_gib));
        }
        let want = ImageInfo {
            format: "qcow2".into(),
            virtual_size_bytes: size_gib * GIB,
            backing_file: backing.map(|b| b.display().to_string()),
            data_file: None,
        };
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if path.exists() {
            // The real tool keeps an existing overlay with the same backing file and does not
            // resize it; anything else there is not ours to overwrite.
            return match made.get(path) {
                Some(had) if had.backing_file == want.backing_file => Ok(()),
                Some(had) => Err(DiskError::Conflict {
                    path: path.to_path_buf(),
                    found: format!("backing file {:?}", had.backing_file),
                }),
                None => Err(DiskError::Conflict {
                    path: path.to_path_buf(),
                    found: "a file the fake did not make".into(),
                }),
            };
        }
        std::fs::write(path, b"").map_err(|source| DiskError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        made.insert(path.to_path_buf(), want);
        Ok(())
    }
}

#[async_trait::async_trait]
impl DiskTool for FakeDiskTool {
    async fn info(&self, path: &Path) -> Result<ImageInfo, DiskError> {
        if let Some(info) = self
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
        {
            return Ok(info.clone());
        }
        let len = std::fs::metadata(path)
            .map_err(|source| DiskError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(ImageInfo {
            format: "raw".into(),
            virtual_size_bytes: len,
            backing_file: None,
            data_file: None,
        })
    }

    async fn create_overlay(
        &self,
        base: &Path,
        _base_format: DiskFormat,
        overlay: &Path,
        size_gib: u64,
    ) -> Result<(), DiskError> {
        self.create(overlay, size_gib, Some(base))
    }

    async fn create_blank(&self, disk: &Path, size_gib: u64) -> Result<(), DiskError> {
        self.create(disk, size_gib, None)
    }

    async fn grow(&self, disk: &Path, size_gib: u64) -> Result<bool, DiskError> {
        if !(1..=MAX_DISK_GIB).contains(&size_gib) {
            return Err(DiskError::BadSize(size_gib));
        }
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let Some(info) = made.get_mut(disk) else {
            return Err(DiskError::Conflict {
                path: disk.to_path_buf(),
                found: "a file the fake did not make".into(),
            });
        };
        let grew = crate::disks::must_grow(info.virtual_size_bytes, size_gib * GIB)?;
        info.virtual_size_bytes = size_gib * GIB;
        Ok(grew)
    }

    async fn rebase(
        &self,
        disk: &Path,
        base: &Path,
        _base_format: DiskFormat,
    ) -> Result<(), DiskError> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        let info = made.entry(disk.to_path_buf()).or_insert_with(|| ImageInfo {
            format: "qcow2".into(),
            virtual_size_bytes: GIB,
            backing_file: None,
            data_file: None,
        });
        info.backing_file = Some(base.display().to_string());
        Ok(())
    }

    /// Trusts the declared format: the fake cannot detect one, and a simulated host only
    /// ever sees images its test or benchmark registered.
    async fn check_base(&self, path: &Path, declared: DiskFormat) -> Result<ImageInfo, DiskError> {
        let mut info = self.info(path).await?;
        info.format = match declared {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
        .into();
        Ok(info)
    }
}

/// A [`SeedWriter`] that runs no genisoimage: it renders the seed as the real writer does (so
/// a spec the real agent refuses is refused here too) and writes `meta-data` and `user-data`
/// one after the other as plain text where the ISO would be.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeSeedWriter;

#[async_trait::async_trait]
impl SeedWriter for FakeSeedWriter {
    async fn write(&self, spec: &SeedSpec, path: &Path) -> Result<(), SeedError> {
        let rendered = spec.render()?;
        let text = format!("{}\n{}", rendered.meta_data, rendered.user_data);
        tokio::fs::write(path, text)
            .await
            .map_err(|source| SeedError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_fake_disk_tool_answers_like_qemu_img_for_what_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let tool = FakeDiskTool::new();
        let base = tmp.path().join("base.img");
        std::fs::write(&base, [0u8; 512]).unwrap();
        let base_info = tool.check_base(&base, DiskFormat::Raw).await.unwrap();
        assert_eq!(
            (base_info.format.as_str(), base_info.virtual_size_bytes),
            ("raw", 512)
        );

        let overlay = tmp.path().join("overlay.qcow2");
        tool.create_overlay(&base, DiskFormat::Raw, &overlay, 3)
            .await
            .unwrap();
        let info = tool.info(&overlay).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size_bytes, 3 * GIB);
        assert_eq!(info.backing_file, Some(base.display().to_string()));
        // Again, as a retried creation does: kept as it is.
        tool.create_overlay(&base, DiskFormat::Raw, &overlay, 3)
            .await
            .unwrap();

        // A blank disk where the overlay is, or over a file the fake did not make: refused.
        assert!(matches!(
            tool.create_blank(&overlay, 3).await,
            Err(DiskError::Conflict { .. })
        ));
        assert!(matches!(
            tool.create_blank(&base, 3).await,
            Err(DiskError::Conflict { .. })
        ));
        assert!(matches!(
            tool.create_blank(&tmp.path().join("big"), MAX_DISK_GIB + 1)
                .await,
            Err(DiskError::BadSize(_))
        ));

        let blank = tmp.path().join("blank.qcow2");
        tool.create_blank(&blank, 1).await.unwrap();
        assert_eq!(tool.info(&blank).await.unwrap().backing_file, None);
    }

    #[tokio::test]
    async fn the_fake_seed_writer_refuses_what_the_real_one_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("seed.iso");
        let mut spec = SeedSpec {
            instance_id: "i-1".into(),
            hostname: "web-1".into(),
            ssh_keys: vec![],
            user_data: None,
        };
        FakeSeedWriter.write(&spec, &path).await.unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("web-1"));
        spec.hostname = "not a host name".into();
        assert!(matches!(
            FakeSeedWriter.write(&spec, &path).await,
            Err(SeedError::BadHostname(_))
        ));
    }
}
