//! Request bodies and query strings of the public API (defined in `skygate-api-types`, shared
//! with the client). Unknown fields are refused, so a typo (`memory_mb`) is a 422 instead of a
//! silently ignored setting.

pub use skygate_api_types::{
    AddSshKeyParams, BootParams, CreateMachineParams, ForceQuery, ImageFormat, ListMachinesQuery,
    ListUsersQuery, LoginParams, MachinePatch, PageQuery, ProfilePatch, QuotaParams, RebuildParams,
    RefreshParams, RegisterImageParams, RegisterParams, ResizeParams, RoleName, UserPatch,
    WaitQuery,
};

/// The longest a `GET /machines/{id}/wait` waits, and how long without `timeout`.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
pub const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A wait's `timeout`: `45`, `45s` or `2m`; at most [`MAX_WAIT`].
pub fn wait_timeout(text: Option<&str>) -> crate::error::Result<std::time::Duration> {
    let Some(text) = text else {
        return Ok(DEFAULT_WAIT);
    };
    let bad = || {
        crate::error::Error::BadRequest(format!(
            "timeout must be seconds (45, 45s) or minutes (2m), at most {} s",
            MAX_WAIT.as_secs()
        ))
    };
    let (digits, unit) = match text.strip_suffix('m') {
        Some(d) => (d, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let wait = std::time::Duration::from_secs(n.checked_mul(unit).ok_or_else(bad)?);
    if wait > MAX_WAIT {
        return Err(bad());
    }
    Ok(wait)
}

/// Page size: 1–200, default 50.
pub fn page_limit(limit: Option<i64>) -> crate::error::Result<i64> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=200).contains(&n) => Ok(n),
        Some(_) => Err(crate::error::Error::BadRequest(
            "limit must be between 1 and 200".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wait_timeouts_read_seconds_and_minutes_up_to_the_cap() {
        assert_eq!(wait_timeout(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(wait_timeout(Some("45")).unwrap(), Duration::from_secs(45));
        assert_eq!(wait_timeout(Some("45s")).unwrap(), Duration::from_secs(45));
        assert_eq!(wait_timeout(Some("2m")).unwrap(), Duration::from_secs(120));
        assert_eq!(wait_timeout(Some("0")).unwrap(), Duration::ZERO);
        for bad in [
            "5m1",
            "6m",
            "301",
            "-1",
            "1h",
            "",
            "s",
            "99999999999999999999m",
        ] {
            assert!(wait_timeout(Some(bad)).is_err(), "{bad}");
        }
    }
}
