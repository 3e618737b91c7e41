//! Pure domain types and rules: ids, hostnames, machines with their states, networks and
//! tasks, images, SSH keys. No I/O in here.

pub mod hostname;
pub mod ids;
pub mod image;
pub mod labels;
pub mod machine;
pub mod machine_on_host;
pub mod machine_state;
pub mod network;
pub mod quota;
pub mod restart;
pub mod scheduler;
pub mod ssh_key;
pub mod tasks;

pub use hostname::Hostname;
pub use ids::{ImageId, MachineId, UserId};
pub use image::{Image, KernelBoot};
pub use machine::{Machine, MachineEvent};
pub use machine_on_host::{MachineChange, MachineOnHost, PhaseOnHost};
pub use machine_state::{Action, DesiredState, MachineSnapshot, MachineStatus, Transition};
pub use network::{MachineNetwork, PortForward};
pub use quota::{Quota, QuotaOverride, Usage};
pub use restart::{RestartLimits, RestartPolicy};
pub use ssh_key::SavedSshKey;
pub use tasks::{FollowUp, TaskKind};
