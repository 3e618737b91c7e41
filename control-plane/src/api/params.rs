//! Request bodies and query strings of the public API (defined in `skygate-api-types`, shared
//! with the client). Unknown fields are refused, so a typo (`memory_mb`) is a 422 instead of a
//! silently ignored setting.

pub use skygate_api_types::{
    AddSshKeyParams, BootParams, CreateMachineParams, ForceQuery, ImageFormat, ListMachinesQuery,
    ListUsersQuery, LoginParams, MachinePatch, PageQuery, ProfilePatch, QuotaParams, RefreshParams,
    RegisterImageParams, RegisterParams, RoleName, UserPatch,
};

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
