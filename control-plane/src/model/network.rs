//! A machine's network as its host reports it: addresses and the ports forwarded to it. Stored
//! as JSON in `machines.network` with these field names, shown by the API as they are.

use serde::{Deserialize, Serialize};

/// What a tenant uses to reach a machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineNetwork {
    /// Guest addresses the host knows of (none with user-mode networking).
    pub addresses: Vec<String>,
    /// Host ports forwarded to the guest.
    pub ports: Vec<PortForward>,
}

/// One host port forwarded to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// The guest's port.
    pub guest: u16,
    /// The host address the port listens on.
    pub host_ip: String,
    /// The host's port.
    pub host_port: u16,
    /// `tcp`.
    pub proto: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_before_the_type_existed_still_read() {
        let stored = r#"{"addresses":[],"ports":[{"guest":22,"host_ip":"127.0.0.1","host_port":42022,"proto":"tcp"}]}"#;
        let net: MachineNetwork = serde_json::from_str(stored).unwrap();
        assert_eq!(net.ports[0].host_port, 42022);
        assert_eq!(serde_json::to_string(&net).unwrap(), stored);
    }
}
