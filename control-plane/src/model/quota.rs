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

/// The limits an administrator gave one tenant; `None` is the server-wide default for that
/// limit, so a changed default still reaches everyone nobody gave a limit of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaOverride {
    pub max_machines: Option<i64>,
    pub max_vcpus: Option<i64>,
    pub max_memory_mib: Option<i64>,
}

impl QuotaOverride {
    /// The limits in force: each given one, else the default.
    pub fn over(self, defaults: Quota) -> Quota {
        Quota {
            max_machines: self.max_machines.unwrap_or(defaults.max_machines),
            max_vcpus: self.max_vcpus.unwrap_or(defaults.max_vcpus),
            max_memory_mib: self.max_memory_mib.unwrap_or(defaults.max_memory_mib),
        }
    }

    /// Whether every limit is the default.
    pub fn is_default(self) -> bool {
        self == Self::default()
    }

    /// Refuses a negative limit (zero is allowed: a tenant that may hold nothing).
    pub fn validate(self) -> Result<Self, String> {
        let limits = [
            ("max_machines", self.max_machines),
            ("max_vcpus", self.max_vcpus),
            ("max_memory_mib", self.max_memory_mib),
        ];
        for (name, limit) in limits {
            if limit.is_some_and(|n| n < 0) {
                return Err(format!(
                    "{name} must be 0 or more, or null for the server default"
                ));
            }
        }
        Ok(self)
    }
}

impl Quota {
    /// Whether `current + request` stays within the limits, for each part `request` adds to;
    /// the error says which limit and by how much, so the tenant knows what to free.
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
            // Only what grows is checked: a tenant over a lowered limit may still shrink.
            if asked > 0 && used.saturating_add(asked) > limit {
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

    #[test]
    fn an_override_replaces_only_the_limits_it_gives() {
        let some = QuotaOverride {
            max_machines: Some(0),
            max_vcpus: None,
            max_memory_mib: Some(4096),
        };
        let q = some.over(Q);
        assert_eq!(
            (q.max_machines, q.max_vcpus, q.max_memory_mib),
            (0, 4, 4096)
        );
        assert_eq!(QuotaOverride::default().over(Q), Q);
        assert!(QuotaOverride::default().is_default() && !some.is_default());
    }

    #[test]
    fn negative_limits_are_refused_and_zero_is_not() {
        let zero = QuotaOverride {
            max_machines: Some(0),
            ..QuotaOverride::default()
        };
        assert!(zero.validate().is_ok());
        let negative = QuotaOverride {
            max_vcpus: Some(-1),
            ..QuotaOverride::default()
        };
        assert!(negative.validate().unwrap_err().contains("max_vcpus"));
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
            /// every total that grows stays within its limit.
            #[test]
            fn admits_exactly_what_fits(current in usage(), request in usage()) {
                let fits =
                    |used: i64, asked: i64, limit: i64| asked <= 0 || used.saturating_add(asked) <= limit;
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

    #[test]
    fn only_what_grows_is_checked() {
        let over = Usage {
            machines: 3,
            vcpus: 6,
            memory_mib: 2048,
        };
        // Already over every limit: a change that adds nothing (or gives back) is admitted.
        let shrink = Usage {
            machines: 0,
            vcpus: -1,
            memory_mib: 0,
        };
        assert_eq!(Q.admits(over, shrink), Ok(()));
        let grow = Usage {
            memory_mib: 1,
            ..shrink
        };
        assert!(Q.admits(over, grow).unwrap_err().contains("memory MiB"));
    }
}
