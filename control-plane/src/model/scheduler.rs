//! Placement: a pure function from a machine's size and the hosts' capacities and allocations
//! to a host, or the reasons no host fits. Filters first (reachable, not cordoned, fits vCPU,
//! memory and disk), then a spreading weigher: the host left with the most headroom on its
//! tightest resource wins, so machines spread out instead of packing the first host.

use std::fmt;

/// vCPU, memory and disk of a machine, or of what a host offers or has allocated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

impl Resources {
    /// Both together.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus + other.vcpus,
            memory_mib: self.memory_mib + other.memory_mib,
            disk_gib: self.disk_gib + other.disk_gib,
        }
    }

    /// What is left of `self` once `other` is taken (negative where `other` is larger).
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus - other.vcpus,
            memory_mib: self.memory_mib - other.memory_mib,
            disk_gib: self.disk_gib - other.disk_gib,
        }
    }
}

/// A host as the scheduler sees it. `capacity` already includes overcommit (the agent
/// advertises it so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCandidate {
    pub id: String,
    pub name: String,
    pub reachable: bool,
    pub cordoned: bool,
    /// Its agent reports problems (a tool that does not run): machines would fail there.
    pub degraded: bool,
    pub capacity: Resources,
    pub allocated: Resources,
}

/// Why one host was passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Unreachable,
    Cordoned,
    Degraded,
    NotEnoughVcpus,
    NotEnoughMemory,
    NotEnoughDisk,
    /// It fitted when read, but a concurrent placement spent the room first.
    TakenMeanwhile,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Unreachable => "unreachable",
            Rejection::Cordoned => "cordoned",
            Rejection::Degraded => "its agent reports problems",
            Rejection::NotEnoughVcpus => "not enough free vCPUs",
            Rejection::NotEnoughMemory => "not enough free memory",
            Rejection::NotEnoughDisk => "not enough free disk",
            Rejection::TakenMeanwhile => "its room was taken by another placement meanwhile",
        })
    }
}

/// The chosen host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementDecision {
    pub host_id: String,
    pub host_name: String,
}

/// No host fits; says why, host by host, for the machine's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPlacement {
    pub rejections: Vec<(String, Rejection)>,
}

impl fmt::Display for NoPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rejections.is_empty() {
            return f.write_str("no hosts are registered");
        }
        f.write_str("no host has room: ")?;
        for (i, (host, why)) in self.rejections.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{host}: {why}")?;
        }
        Ok(())
    }
}

fn reject(host: &HostCandidate, need: Resources) -> Option<Rejection> {
    let free = host.capacity.minus(host.allocated);
    if !host.reachable {
        Some(Rejection::Unreachable)
    } else if host.cordoned {
        Some(Rejection::Cordoned)
    } else if host.degraded {
        Some(Rejection::Degraded)
    } else if free.vcpus < need.vcpus {
        Some(Rejection::NotEnoughVcpus)
    } else if free.memory_mib < need.memory_mib {
        Some(Rejection::NotEnoughMemory)
    } else if free.disk_gib < need.disk_gib {
        Some(Rejection::NotEnoughDisk)
    } else {
        None
    }
}

/// The fraction of the tightest resource left free after placing `need`, in parts per
/// million (integers keep the choice exact and deterministic).
fn headroom_ppm(host: &HostCandidate, need: Resources) -> i64 {
    let left = host.capacity.minus(host.allocated).minus(need);
    let ppm = |left: i64, cap: i64| {
        if cap <= 0 {
            0
        } else {
            left.saturating_mul(1_000_000) / cap
        }
    };
    ppm(left.vcpus, host.capacity.vcpus)
        .min(ppm(left.memory_mib, host.capacity.memory_mib))
        .min(ppm(left.disk_gib, host.capacity.disk_gib))
}

/// Places a machine of size `need` on one of `hosts`. Ties go to the host whose name sorts
/// first, so the same inputs always give the same answer.
pub fn place(need: Resources, hosts: &[HostCandidate]) -> Result<PlacementDecision, NoPlacement> {
    let mut rejections = Vec::new();
    let mut best: Option<(&HostCandidate, i64)> = None;
    for host in hosts {
        if let Some(why) = reject(host, need) {
            rejections.push((host.name.clone(), why));
            continue;
        }
        let score = headroom_ppm(host, need);
        let better = match best {
            None => true,
            Some((b, s)) => score > s || (score == s && host.name < b.name),
        };
        if better {
            best = Some((host, score));
        }
    }
    match best {
        Some((h, _)) => Ok(PlacementDecision {
            host_id: h.id.clone(),
            host_name: h.name.clone(),
        }),
        None => {
            rejections.sort_by(|a, b| a.0.cmp(&b.0));
            Err(NoPlacement { rejections })
        }
    }
}

/// Places machines of sizes `needs`, in order, as [`place`] would one after another: each
/// choice counts what the ones before it took. The answers are in the order of `needs`.
pub fn place_batch(
    needs: &[Resources],
    hosts: &[HostCandidate],
) -> Vec<Result<PlacementDecision, NoPlacement>> {
    let mut hosts = hosts.to_vec();
    needs
        .iter()
        .map(|&need| {
            let decision = place(need, &hosts)?;
            if let Some(h) = hosts.iter_mut().find(|h| h.id == decision.host_id) {
                h.allocated = h.allocated.plus(need);
            }
            Ok(decision)
        })
        .collect()
}

/// Whether a machine can grow by `delta` on its host (a resize stays on its host), which
/// offers `capacity` and has `allocated` to its machines. A part that shrinks always fits; a
/// cordoned host still lets its machines change size (cordoning only keeps new ones away).
/// The error names what is short, for the tenant: not the host, nor how loaded it is.
pub fn resize_fits(
    capacity: Resources,
    allocated: Resources,
    delta: Resources,
) -> Result<(), String> {
    let free = capacity.minus(allocated);
    let checks = [
        ("vCPUs", free.vcpus, delta.vcpus),
        ("MiB of memory", free.memory_mib, delta.memory_mib),
        ("GiB of disk", free.disk_gib, delta.disk_gib),
    ];
    for (what, free, more) in checks {
        if more > 0 && more > free {
            return Err(format!(
                "the machine's host has no room for {more} more {what}; try a smaller size"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn res(vcpus: i64, memory_mib: i64, disk_gib: i64) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }

    fn host(name: &str, cap: Resources, used: Resources) -> HostCandidate {
        HostCandidate {
            id: format!("id-{name}"),
            name: name.into(),
            reachable: true,
            cordoned: false,
            degraded: false,
            capacity: cap,
            allocated: used,
        }
    }

    #[test]
    fn spreads_to_the_host_with_most_headroom() {
        let hosts = [
            host("a", res(4, 1024, 10), res(2, 512, 2)),
            host("b", res(4, 1024, 10), res(0, 0, 0)),
            host("c", res(8, 512, 10), res(0, 0, 0)),
        ];
        // b keeps 3/4 of vCPUs and memory; c keeps only half its memory.
        assert_eq!(place(res(1, 256, 1), &hosts).unwrap().host_name, "b");
    }

    #[test]
    fn filters_say_why_each_host_was_passed_over() {
        let mut down = host("a", res(8, 8192, 100), res(0, 0, 0));
        down.reachable = false;
        let mut cordoned = host("b", res(8, 8192, 100), res(0, 0, 0));
        cordoned.cordoned = true;
        let mut degraded = host("b2", res(8, 8192, 100), res(0, 0, 0));
        degraded.degraded = true;
        let hosts = [
            down,
            cordoned,
            degraded,
            host("c", res(1, 8192, 100), res(1, 0, 0)),
            host("d", res(8, 256, 100), res(0, 0, 0)),
            host("e", res(8, 8192, 1), res(0, 0, 0)),
        ];
        let err = place(res(1, 512, 2), &hosts).unwrap_err();
        assert_eq!(
            err.rejections,
            vec![
                ("a".into(), Rejection::Unreachable),
                ("b".into(), Rejection::Cordoned),
                ("b2".into(), Rejection::Degraded),
                ("c".into(), Rejection::NotEnoughVcpus),
                ("d".into(), Rejection::NotEnoughMemory),
                ("e".into(), Rejection::NotEnoughDisk),
            ]
        );
        assert!(err.to_string().contains("c: not enough free vCPUs"));
        assert_eq!(
            place(res(1, 1, 1), &[]).unwrap_err().to_string(),
            "no hosts are registered"
        );
    }

    #[test]
    fn an_exact_fit_is_a_fit_and_ties_go_by_name() {
        let hosts = [
            host("z", res(2, 512, 2), res(1, 256, 1)),
            host("y", res(2, 512, 2), res(1, 256, 1)),
        ];
        assert_eq!(place(res(1, 256, 1), &hosts).unwrap().host_name, "y");
    }

    proptest! {
        /// Whatever the inputs, a placement never oversubscribes the chosen host and never
        /// picks a host that a filter rejects.
        #[test]
        fn never_oversubscribes(
            need in (1i64..8, 1i64..4096, 1i64..50),
            hosts in proptest::collection::vec(
                ((1i64..16, 1i64..16384, 1i64..200), (0i64..16, 0i64..16384, 0i64..200), any::<bool>(), any::<bool>()),
                0..6,
            ),
        ) {
            let need = res(need.0, need.1, need.2);
            let hosts: Vec<HostCandidate> = hosts
                .into_iter()
                .enumerate()
                .map(|(i, (cap, used, reachable, cordoned))| HostCandidate {
                    reachable,
                    cordoned,
                    ..host(&format!("h{i}"), res(cap.0, cap.1, cap.2), res(used.0, used.1, used.2))
                })
                .collect();
            match place(need, &hosts) {
                Ok(d) => {
                    let h = hosts.iter().find(|h| h.id == d.host_id).unwrap();
                    prop_assert!(h.reachable && !h.cordoned);
                    prop_assert!(h.allocated.vcpus + need.vcpus <= h.capacity.vcpus);
                    prop_assert!(h.allocated.memory_mib + need.memory_mib <= h.capacity.memory_mib);
                    prop_assert!(h.allocated.disk_gib + need.disk_gib <= h.capacity.disk_gib);
                }
                Err(e) => prop_assert_eq!(e.rejections.len(), hosts.len()),
            }
        }

        /// A batch is placed exactly as the same machines one after another, each seeing
        /// what the ones before it took, and together never oversubscribes a host.
        #[test]
        fn a_batch_places_as_one_after_another(
            needs in proptest::collection::vec((1i64..4, 1i64..2048, 1i64..20), 0..40),
            caps in proptest::collection::vec((1i64..16, 1i64..16384, 1i64..200), 0..5),
        ) {
            let needs: Vec<Resources> = needs.into_iter().map(|n| res(n.0, n.1, n.2)).collect();
            let hosts: Vec<HostCandidate> = caps
                .into_iter()
                .enumerate()
                .map(|(i, c)| host(&format!("h{i}"), res(c.0, c.1, c.2), res(0, 0, 0)))
                .collect();
            let batch = place_batch(&needs, &hosts);
            let mut one_by_one = hosts.clone();
            for (need, got) in needs.iter().zip(&batch) {
                let alone = place(*need, &one_by_one);
                prop_assert_eq!(&alone, got);
                if let Ok(d) = alone {
                    let h = one_by_one.iter_mut().find(|h| h.id == d.host_id).unwrap();
                    h.allocated = h.allocated.plus(*need);
                }
            }
            for h in &one_by_one {
                prop_assert!(h.allocated.vcpus <= h.capacity.vcpus);
                prop_assert!(h.allocated.memory_mib <= h.capacity.memory_mib);
                prop_assert!(h.allocated.disk_gib <= h.capacity.disk_gib);
            }
        }
    }

    #[test]
    fn a_resize_fits_when_each_growing_part_has_room_and_a_shrinking_part_always() {
        let capacity = Resources {
            vcpus: 8,
            memory_mib: 8192,
            disk_gib: 100,
        };
        let allocated = Resources {
            vcpus: 6,
            memory_mib: 8192,
            disk_gib: 40,
        };
        let delta = |vcpus, memory_mib, disk_gib| Resources {
            vcpus,
            memory_mib,
            disk_gib,
        };
        assert_eq!(resize_fits(capacity, allocated, delta(2, 0, 60)), Ok(()));
        assert_eq!(
            resize_fits(capacity, allocated, delta(3, 0, 0)),
            Err("the machine's host has no room for 3 more vCPUs; try a smaller size".into())
        );
        assert_eq!(
            resize_fits(capacity, allocated, delta(-2, 1, 0)),
            Err(
                "the machine's host has no room for 1 more MiB of memory; try a smaller size"
                    .into()
            )
        );
        // Fewer vCPUs and less memory on a full host: always.
        assert_eq!(resize_fits(capacity, allocated, delta(-1, -512, 0)), Ok(()));
        // A host already over (its capacity shrank): a shrinking resize still goes through.
        let over = Resources {
            vcpus: 12,
            ..allocated
        };
        assert_eq!(resize_fits(capacity, over, delta(-2, 0, 0)), Ok(()));
    }
}
