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
}
