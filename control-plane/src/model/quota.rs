//! Per-user quotas: how much a tenant may hold at once, checked when a machine is created.

/// Limits for one user. Generous defaults; operators tune them with flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_machines: i64,
    pub max_vcpus: i64,
    pub max_memory_mib: i64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_machines: 50,
            max_vcpus: 200,
            max_memory_mib: 512 * 1024,
        }
    }
}

/// What a user holds now (machines not deleted), or what one more machine adds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub machines: i64,
    pub vcpus: i64,
    pub memory_mib: i64,
}

impl Usage {
    /// Both held together.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            machines: self.machines.saturating_add(other.machines),
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
        }
    }
}

impl Quota {
    /// Whether `current + request` stays within the limits; the error says which limit and by
    /// how much, so the tenant knows what to free.
    pub fn admits(&self, current: Usage, request: Usage) -> Result<(), String> {
        let checks = [
            (
                "machines",
                current.machines,
                request.machines,
                self.max_machines,
            ),
            ("vCPUs", current.vcpus, request.vcpus, self.max_vcpus),
            (
                "memory MiB",
                current.memory_mib,
                request.memory_mib,
                self.max_memory_mib,
            ),
        ];
        for (what, used, asked, limit) in checks {
            if used.saturating_add(asked) > limit {
                return Err(format!(
                    "quota exceeded: {what} limit is {limit}, you use {used} and asked for {asked} more"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        max_machines: 2,
        max_vcpus: 4,
        max_memory_mib: 1024,
    };
    const ONE: Usage = Usage {
        machines: 1,
        vcpus: 2,
        memory_mib: 512,
    };

    #[test]
    fn admits_up_to_the_limit_exactly() {
        assert!(Q.admits(Usage::default(), ONE).is_ok());
        assert!(Q.admits(ONE, ONE).is_ok());
    }

    #[test]
    fn names_the_limit_that_is_exceeded() {
        let two = Usage {
            machines: 2,
            vcpus: 2,
            memory_mib: 512,
        };
        assert!(Q
            .admits(two, ONE)
            .unwrap_err()
            .contains("machines limit is 2"));
        let big = Usage {
            machines: 1,
            vcpus: 3,
            memory_mib: 1,
        };
        assert!(Q.admits(ONE, big).unwrap_err().contains("vCPUs limit is 4"));
        let fat = Usage {
            machines: 1,
            vcpus: 1,
            memory_mib: 513,
        };
        assert!(Q
            .admits(ONE, fat)
            .unwrap_err()
            .contains("memory MiB limit is 1024"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn usage() -> impl Strategy<Value = Usage> {
            (any::<i64>(), any::<i64>(), any::<i64>()).prop_map(|(machines, vcpus, memory_mib)| {
                Usage {
                    machines,
                    vcpus,
                    memory_mib,
                }
            })
        }

        fn small_usage() -> impl Strategy<Value = Usage> {
            (0..100_i64, 0..400_i64, 0..1_000_000_i64).prop_map(|(machines, vcpus, memory_mib)| {
                Usage {
                    machines,
                    vcpus,
                    memory_mib,
                }
            })
        }

        proptest! {
            /// Never panics, whatever the numbers (overflow saturates), and admits exactly when
            /// every total stays within its limit.
            #[test]
            fn admits_exactly_what_fits(current in usage(), request in usage()) {
                let fits = |used: i64, asked: i64, limit: i64| used.saturating_add(asked) <= limit;
                let expected = fits(current.machines, request.machines, Q.max_machines)
                    && fits(current.vcpus, request.vcpus, Q.max_vcpus)
                    && fits(current.memory_mib, request.memory_mib, Q.max_memory_mib);
                prop_assert_eq!(Q.admits(current, request).is_ok(), expected);
            }

            /// Asking for less never turns an admitted request into a refusal.
            #[test]
            fn a_smaller_request_is_admitted_when_a_larger_one_is(
                current in small_usage(), request in small_usage(), shrink in 0..100_i64
            ) {
                let smaller = Usage {
                    machines: request.machines - request.machines.min(shrink),
                    vcpus: request.vcpus - request.vcpus.min(shrink),
                    memory_mib: request.memory_mib - request.memory_mib.min(shrink),
                };
                if Q.admits(current, request).is_ok() {
                    prop_assert!(Q.admits(current, smaller).is_ok());
                }
            }
        }
    }
}
