//! Boot timing of the tiny image through the agent versus by hand with virsh, for the README.
//!
//! Starts `skygate-host-agent` (the binary next to this example) on 127.0.0.1 with its own
//! data dir and domain prefix, then per run: EnsureMachine (desired RUNNING) → time until the call
//! returns running, and until `ssh hostname` answers through the forwarded port; StopMachine;
//! `virsh start` of that very domain → time until virsh returns and until ssh answers;
//! DeleteMachine. Prints each run and the medians. Needs root, libvirtd, ssh and the tiny image.
//!
//! cargo run --release -p host-agent --example boot_timing -- [RUNS]

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent::v1 as pb;
use proto::agent::v1::host_agent_client::HostAgentClient;
use skygate_test_support::ssh::{ssh_key, ssh_run};
use skygate_test_support::{tiny_image_dir, tiny_image_source};

const TOKEN: &str = "boot-timing-agent-token";

/// When `ssh hostname` first answers (polled as the tests do).
fn ssh_until_answers(key: &std::path::Path, port: u32) -> Instant {
    let port = u16::try_from(port).expect("a port");
    ssh_run(key, port, "hostname", Duration::from_secs(120));
    Instant::now()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map_or(3, |r| r.parse().expect("RUNS"));
    let source = tiny_image_source();

    let tmp = tempfile::Builder::new()
        .prefix("skygate-boot-timing-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (key, public) = ssh_key(tmp.path());

    // The example runs from target/<profile>/examples/: the agent is one level up.
    let agent_bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("skygate-host-agent");
    let mut agent = Command::new(&agent_bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-json",
            "--domain-prefix",
            "skygate-timing-",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--image-dir")
        .arg(tiny_image_dir())
        .env("SKYGATE_AGENT_TOKEN", TOKEN)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{agent_bin:?}: {e} (cargo build --release -p host-agent first)")
        });
    let mut addr = None;
    for line in BufReader::new(agent.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("skygate-host-agent listening") {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            addr = json["fields"]["listen"].as_str().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("agent exited before listening");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        HostAgentClient::with_interceptor(channel, proto::bearer::BearerToken::new(TOKEN).unwrap());

    let (mut agent_running, mut agent_ssh, mut virsh_running, mut virsh_ssh) =
        (vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        let id = uuid::Uuid::new_v4();
        let spec = pb::MachineSpec {
            machine_id: id.to_string(),
            generation: 1,
            hostname: format!("timing-{run}"),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: Some(source.clone()),
            ssh_authorized_keys: vec![public.trim().to_owned()],
            user_data: None,
            desired_power: pb::PowerState::Running as i32,
            disk_generation: 0,
            disk_must_exist: false,
        };
        let t0 = Instant::now();
        let state = client
            .ensure_machine(pb::EnsureMachineRequest { spec: Some(spec) })
            .await
            .unwrap()
            .into_inner();
        let running = t0.elapsed().as_secs_f64();
        let port = state.network.as_ref().unwrap().ports[0].host_port;
        let ssh = ssh_until_answers(&key, port)
            .duration_since(t0)
            .as_secs_f64();
        client
            .stop_machine(pb::StopMachineRequest {
                machine_id: id.to_string(),
                graceful_timeout_secs: 30,
            })
            .await
            .unwrap();
        let t1 = Instant::now();
        let started = Command::new("virsh")
            .args(["-c", "qemu:///system", "start", &state.domain_name])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(started.success());
        let by_hand = t1.elapsed().as_secs_f64();
        let by_hand_ssh = ssh_until_answers(&key, port)
            .duration_since(t1)
            .as_secs_f64();
        client
            .delete_machine(pb::MachineRef {
                machine_id: id.to_string(),
            })
            .await
            .unwrap();
        println!(
            "run {run}: EnsureMachine→running {running:.2} s, →ssh {ssh:.2} s | virsh start→running {by_hand:.2} s, →ssh {by_hand_ssh:.2} s"
        );
        agent_running.push(running);
        agent_ssh.push(ssh);
        virsh_running.push(by_hand);
        virsh_ssh.push(by_hand_ssh);
    }
    let (a, b) = (median(agent_ssh), median(virsh_ssh));
    println!(
        "median of {runs}: EnsureMachine→running {:.2} s, EnsureMachine→ssh {a:.2} s; virsh start→running {:.2} s, virsh start→ssh {b:.2} s; ratio (ssh) {:.2}",
        median(agent_running),
        median(virsh_running),
        a / b
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
