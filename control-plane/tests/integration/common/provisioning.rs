//! What the tests that run agents against the control plane share (provisioning.rs,
//! fleet.rs): the provisioning configuration, a bounded wait, and a fake kernel image.

use super::{Session, TestApp};
use control_plane::server::ProvisioningConfig;
use control_plane::timing::WorkflowSettings;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};

/// Provisioning on a free port, agents admitted with `agent_token`, and workflow timings
/// short enough for tests (heartbeats every second).
pub fn provisioning_config(agent_token: &str) -> ProvisioningConfig {
    ProvisioningConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        agent_token: agent_token.into(),
        agent_tls: None,
        registry_tls: None,
        workflows: WorkflowSettings {
            workers: 2,
            lease: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(1),
            ..WorkflowSettings::default()
        },
    }
}

/// Polls `check` until it is Ok, at most 30 s; on timeout the panic names what it waited for
/// and what `check` saw last.
pub async fn wait_for(what: &str, check: impl AsyncFnMut() -> Result<(), String>) {
    wait_for_at_most(what, Duration::from_secs(30), check).await
}

/// [`wait_for`] with its own bound.
pub async fn wait_for_at_most(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ok when `seen` is `want`; else what was seen.
pub fn is<T: PartialEq<W> + std::fmt::Debug, W: std::fmt::Debug>(
    seen: T,
    want: W,
) -> Result<(), String> {
    if seen == want {
        Ok(())
    } else {
        Err(format!("{seen:?}, not {want:?}"))
    }
}

/// Writes a small file into `dir` (a directory the agents accept `file://` sources from) and
/// registers it, as `admin`, as the kernel-boot image `fake`: the fake hypervisor boots
/// nothing, but the agents' image caches fetch and check it as any image.
pub async fn register_fake_kernel_image(app: &TestApp, admin: &Session, dir: &Path) {
    let kernel = b"a kernel for the fake hypervisor";
    let kernel_path = dir.join("vmlinuz");
    std::fs::write(&kernel_path, kernel).unwrap();
    let url = format!("file://{}", kernel_path.display());
    let image = json!({"name": "fake", "source": url, "format": "kernel",
        "boot": {"kernel": url, "kernel_sha256": hex::encode(Sha256::digest(kernel))}});
    let res = app
        .as_user(admin, Method::POST, "/images")
        .json(&image)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}
