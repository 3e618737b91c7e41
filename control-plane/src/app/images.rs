//! The image catalogue: administrators register images, everyone lists them.

use super::{App, Principal};
use crate::error::{Error, Result};
use crate::model::{Image, KernelBoot};

/// Disk formats an image may have; `kernel` boots a kernel and initrd directly.
pub const IMAGE_FORMATS: [&str; 3] = ["qcow2", "raw", "kernel"];

/// A registration request, as received.
#[derive(Debug, Clone)]
pub struct RegisterImage {
    pub name: String,
    pub source: String,
    pub format: String,
    pub sha256: Option<String>,
    pub boot: Option<KernelBoot>,
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a source URL is refused, said to the administrator who gave it.
fn check_image_url(s: &str) -> std::result::Result<(), &'static str> {
    const SCHEMES: &str = "must be a file:///, http:// or https:// URL";
    let shaped = ["file:///", "http://", "https://"]
        .iter()
        .any(|p| s.starts_with(p) && s.len() > p.len())
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && s.len() <= 2048;
    if !shaped {
        return Err(SCHEMES);
    }
    let url = url::Url::parse(s).map_err(|_| SCHEMES)?;
    if url.scheme() == "file" {
        return Ok(());
    }
    // Agents would send these to whatever server is named, and echo them in listings.
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (user:password@); serve the image without them");
    }
    // The cloud-metadata and link-local range, and addresses that are no host at all, are
    // never an image server. (Names are resolved and checked again by the agent.)
    let forbidden = match url.host() {
        Some(url::Host::Ipv4(ip)) => {
            ip.is_link_local() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()
        }
        Some(url::Host::Ipv6(ip)) => {
            ip.is_unicast_link_local() || ip.is_unspecified() || ip.is_multicast()
        }
        Some(url::Host::Domain(_)) => false,
        None => true,
    };
    if forbidden {
        return Err("must not name a link-local, unspecified or multicast address");
    }
    Ok(())
}

fn is_image_url(s: &str) -> bool {
    check_image_url(s).is_ok()
}

/// Image names: 1–63 of `[a-z0-9._-]`, starting with a letter or digit.
pub fn is_image_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Checks a registration; the agents fetch from `source`, so only file and HTTP(S) URLs pass.
pub fn validate(req: &RegisterImage) -> Result<()> {
    let name_ok = is_image_name(&req.name);
    if !name_ok {
        return Err(Error::Invalid(
            "name must be 1 to 63 characters of a-z, 0-9, '-', '.', '_', starting with a letter or digit"
                .into(),
        ));
    }
    if let Err(why) = check_image_url(&req.source) {
        return Err(Error::Invalid(format!("source {why}")));
    }
    if !IMAGE_FORMATS.contains(&req.format.as_str()) {
        return Err(Error::Invalid(format!(
            "format must be one of {}",
            IMAGE_FORMATS.join(", ")
        )));
    }
    if let Some(sum) = &req.sha256 {
        if !is_sha256_hex(sum) {
            return Err(Error::Invalid(
                "sha256 must be 64 lowercase hex digits".into(),
            ));
        }
    }
    match (&req.boot, req.format.as_str()) {
        (None, "kernel") => Err(Error::Invalid(
            "format kernel needs boot: {kernel, initrd, cmdline}".into(),
        )),
        (Some(boot), _) => validate_boot(boot),
        (None, _) => Ok(()),
    }
}

/// The kernel and initrd are image URLs, their digests hex, the command line bounded.
fn validate_boot(boot: &KernelBoot) -> Result<()> {
    let invalid = |m: &str| Err(Error::Invalid(format!("boot: {m}")));
    for (k, url) in [
        ("kernel", Some(&boot.kernel)),
        ("initrd", boot.initrd.as_ref()),
    ] {
        if let Some(url) = url.filter(|u| !is_image_url(u)) {
            let why = check_image_url(url).err().unwrap_or_default();
            return invalid(&format!("{k} {why}"));
        }
    }
    for (k, sum) in [
        ("kernel_sha256", &boot.kernel_sha256),
        ("initrd_sha256", &boot.initrd_sha256),
    ] {
        if sum.as_deref().is_some_and(|s| !is_sha256_hex(s)) {
            return invalid(&format!("{k} must be 64 lowercase hex digits"));
        }
    }
    if boot.cmdline.as_ref().is_some_and(|c| c.len() > 4096) {
        return invalid("cmdline is too long");
    }
    Ok(())
}

impl App {
    pub async fn image_register(&self, who: Principal, req: RegisterImage) -> Result<Image> {
        who.require_admin()?;
        validate(&req)?;
        self.store
            .image_create(
                &req.name,
                &req.source,
                &req.format,
                req.sha256.as_deref(),
                req.boot.as_ref(),
            )
            .await
    }

    pub async fn image_list(&self) -> Result<Vec<Image>> {
        self.store.image_list().await
    }

    /// Deprecates an image (administrators): new machines are refused it; machines made from
    /// it keep working. `false` restores it.
    pub async fn image_deprecate(
        &self,
        who: Principal,
        id: crate::model::ImageId,
        deprecated: bool,
    ) -> Result<Image> {
        who.require_admin()?;
        self.store
            .image_set_deprecated(id, deprecated)
            .await?
            .ok_or(Error::NotFound("image"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(kernel: &str) -> KernelBoot {
        KernelBoot {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            kernel_sha256: None,
            initrd_sha256: None,
        }
    }

    fn req() -> RegisterImage {
        RegisterImage {
            name: "debian-12".into(),
            source: "https://images.example/debian-12.qcow2".into(),
            format: "qcow2".into(),
            sha256: Some("a".repeat(64)),
            boot: None,
        }
    }

    #[test]
    fn a_plain_qcow2_image_is_valid() {
        assert!(validate(&req()).is_ok());
    }

    #[test]
    fn bad_fields_are_refused() {
        let bad = [
            RegisterImage {
                name: "Debian".into(),
                ..req()
            },
            RegisterImage {
                name: "-x".into(),
                ..req()
            },
            RegisterImage {
                source: "ftp://x/y".into(),
                ..req()
            },
            RegisterImage {
                source: "file:///a b".into(),
                ..req()
            },
            RegisterImage {
                format: "vmdk".into(),
                ..req()
            },
            RegisterImage {
                sha256: Some("A".repeat(64)),
                ..req()
            },
            RegisterImage {
                format: "kernel".into(),
                ..req()
            },
            RegisterImage {
                boot: Some(boot("x")),
                ..req()
            },
            RegisterImage {
                boot: Some(KernelBoot {
                    initrd: Some("ftp://i".into()),
                    ..boot("file:///k")
                }),
                ..req()
            },
            RegisterImage {
                boot: Some(KernelBoot {
                    kernel_sha256: Some("B".repeat(64)),
                    ..boot("file:///k")
                }),
                ..req()
            },
            RegisterImage {
                boot: Some(KernelBoot {
                    cmdline: Some("x".repeat(4097)),
                    ..boot("file:///k")
                }),
                ..req()
            },
        ];
        for b in bad {
            assert!(validate(&b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn sources_with_credentials_or_link_local_hosts_are_refused() {
        for (source, why) in [
            ("https://user:pw@images.example/x.qcow2", "credentials"),
            ("http://user@images.example/x.qcow2", "credentials"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://[fe80::1]/x.qcow2", "link-local"),
            ("http://0.0.0.0:8080/x", "link-local"),
            ("http://224.0.0.1/x", "link-local"),
        ] {
            let err = validate(&RegisterImage {
                source: source.into(),
                ..req()
            })
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("source must") && err.contains(why),
                "{source}: {err}"
            );
        }
        let err = validate(&RegisterImage {
            format: "kernel".into(),
            boot: Some(boot("http://a:b@k.example/vmlinuz")),
            ..req()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("kernel must not carry credentials"), "{err}");
        for fine in [
            "http://127.0.0.1:8000/x.qcow2",
            "https://images.example:8443/x",
        ] {
            let ok = RegisterImage {
                source: fine.into(),
                ..req()
            };
            assert!(validate(&ok).is_ok(), "{fine}");
        }
    }

    #[test]
    fn a_kernel_image_needs_boot_details() {
        let ok = RegisterImage {
            format: "kernel".into(),
            sha256: None,
            boot: Some(KernelBoot {
                initrd: Some("file:///var/lib/images/initrd.img".into()),
                cmdline: Some("console=ttyS0".into()),
                kernel_sha256: Some("b".repeat(64)),
                ..boot("file:///var/lib/images/vmlinuz")
            }),
            ..req()
        };
        assert!(validate(&ok).is_ok());
    }
}
