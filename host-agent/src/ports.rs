//! Host ports for user-mode networking: each machine's guest port 22 is forwarded from a port
//! in the agent's range on the forward address (127.0.0.1 by default). A port is free when no
//! domain of ours claims it and nothing on the host listens on it right now.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::ops::RangeInclusive;
use std::str::FromStr;

/// The range ports are taken from (`--forward-ports 20000-29999`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange(RangeInclusive<u16>);

impl Default for PortRange {
    /// Below Linux's ephemeral range (32768-60999), so outgoing connections never hold them.
    fn default() -> Self {
        PortRange(20000..=29999)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 20000-29999"))?;
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{p:?} is not a port between 1 and 65535"))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi {
            return Err(format!("{s:?}: the first port is above the last"));
        }
        Ok(PortRange(lo..=hi))
    }
}

/// No port in the range is free.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free port in {first}-{last} on {address}")]
pub struct PortsExhausted {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range.
    pub last: u16,
    /// The forward address.
    pub address: Ipv4Addr,
}

/// Picks a port in `range` on `address` that is not in `claimed` and can be bound now.
/// `start_hint` spreads concurrent pickers (e.g. several agents on one host) over the range.
pub fn pick_port(
    range: &PortRange,
    address: Ipv4Addr,
    claimed: &HashSet<u16>,
    start_hint: u64,
) -> Result<u16, PortsExhausted> {
    let (first, last) = (*range.0.start(), *range.0.end());
    let len = u64::from(last - first) + 1;
    (0..len)
        .map(|i| first + ((start_hint + i) % len) as u16)
        .find(|p| !claimed.contains(p) && is_bindable(address, *p))
        .ok_or(PortsExhausted {
            first,
            last,
            address,
        })
}

/// Whether a TCP listener could bind `address:port` right now (the probe closes at once).
pub fn is_bindable(address: Ipv4Addr, port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(address, port)).is_ok()
}

/// Lowest port user-mode forwards may use. QEMU, not the agent, binds forwarded ports, and it
/// runs as `libvirt-qemu` without capabilities, so a port below the kernel's default
/// `net.ipv4.ip_unprivileged_port_start` (1024) fails at the first machine start whatever user
/// the agent runs as. (Reading the sysctl instead was rejected: it would put I/O into flag
/// parsing for hosts that almost never change it.)
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

/// `--forward-ports FIRST-LAST` (clap value parser): the range syntax of [`PortRange`], and no
/// port below [`FIRST_UNPRIVILEGED_PORT`].
pub fn parse_forward_ports(s: &str) -> Result<PortRange, String> {
    let range: PortRange = s.parse()?;
    let first = s
        .split_once('-')
        .and_then(|(lo, _)| lo.trim().parse::<u16>().ok())
        .unwrap_or(0);
    if first < FIRST_UNPRIVILEGED_PORT {
        return Err(format!(
            "{s:?}: ports below {FIRST_UNPRIVILEGED_PORT} are privileged, and QEMU binds \
             forwarded ports as libvirt-qemu without privileges"
        ));
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_refuses_nonsense() {
        assert_eq!("100-200".parse(), Ok(PortRange(100..=200)));
        assert!("200-100".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("80".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn skips_claimed_and_listening_ports() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let range = PortRange(port..=port);
        assert!(pick_port(&range, Ipv4Addr::LOCALHOST, &HashSet::new(), 0).is_err());
        drop(busy);
        assert_eq!(
            pick_port(&range, Ipv4Addr::LOCALHOST, &HashSet::new(), 7),
            Ok(port)
        );
        assert!(pick_port(&range, Ipv4Addr::LOCALHOST, &HashSet::from([port]), 0).is_err());
    }
}
