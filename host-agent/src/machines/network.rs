//! How the manager attaches machines' NICs (`--network`): the agent's configuration, not part
//! of a machine's spec.

use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::ports::PortRange;

/// How machines' NICs are attached (`--network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// QEMU user networking; guest port 22 forwarded from a port in `ports` on `address`.
    User {
        /// Host address forwards listen on.
        address: Ipv4Addr,
        /// Range forwarded ports are taken from.
        ports: PortRange,
    },
    /// A libvirt-managed network.
    Libvirt(String),
    /// A host bridge.
    Bridge(String),
}

impl FromStr for NetworkMode {
    type Err = String;

    /// `user`, `libvirt:NAME` or `bridge:NAME`; user networking gets the default address
    /// and range, which the agent's other flags then set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let named = |name: &str| {
            if name.is_empty() {
                Err(format!("{s:?}: the name after ':' is empty"))
            } else {
                Ok(name.to_owned())
            }
        };
        match s.split_once(':') {
            None if s == "user" => Ok(NetworkMode::User {
                address: Ipv4Addr::LOCALHOST,
                ports: PortRange::default(),
            }),
            Some(("libvirt", name)) => named(name).map(NetworkMode::Libvirt),
            Some(("bridge", name)) => named(name).map(NetworkMode::Bridge),
            _ => Err(format!("{s:?}: expected user, libvirt:NAME or bridge:NAME")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_modes_parse() {
        assert!(matches!("user".parse(), Ok(NetworkMode::User { .. })));
        assert_eq!("bridge:br0".parse(), Ok(NetworkMode::Bridge("br0".into())));
        assert_eq!(
            "libvirt:tenants".parse(),
            Ok(NetworkMode::Libvirt("tenants".into()))
        );
        assert!("bridge:".parse::<NetworkMode>().is_err());
        assert!("tap:x".parse::<NetworkMode>().is_err());
    }
}
