//! The public API's vocabulary: the request and response bodies of `/api/v1` (API.md), shared
//! by the server (which also derives the OpenAPI document from them), the typed client and
//! the CLI, so a renamed field breaks the build instead of a user's script.

pub mod admin;
pub mod hosts;
pub mod images;
pub mod machines;
pub mod users;

pub use admin::{AuditEventPage, AuditEventView, PassView, ReconcilerView};
pub use hosts::{CapacityView, EvacuationView, HostList, HostView};
pub use images::{BootParams, ImageFormat, ImageList, ImageView, RegisterImageParams};
pub use machines::{
    CreateMachineParams, DesiredState, EventPage, EventView, ListMachinesQuery, LostEventsView,
    MachinePage, MachinePatch, MachineStatus, MachineView, NetworkView, PortView, RebuildParams,
    ResizeParams, RestartPolicy, StreamEventView, UnknownState, WaitQuery,
};
pub use users::{
    AddSshKeyParams, CreateTokenParams, CreatedTokenView, ListUsersQuery, LoginParams,
    ProfilePatch, ProfileView, QuotaParams, QuotaView, RefreshParams, RegisterParams, RoleName,
    SshKeyList, SshKeyView, TokenList, TokenPairView, TokenScope, TokenView, UsageView, UserList,
    UserPatch, UserView,
};

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page. Opaque and signed: anything else is 400.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

/// `DELETE /machines/{id}` and `DELETE /hosts/{id}` query.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ForceQuery {
    /// Administrators: forget what a lost host held, without its word. A machine is stamped
    /// deleted at once and its capacity released; a host is removed with every machine on it.
    /// If the host comes back, its agent removes the leftovers.
    pub force: Option<bool>,
}

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, fixed summary of the kind.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The request's `x-request-id`, to quote when asking for help.
    #[serde(default)]
    pub request_id: String,
    /// For a hostname conflict: the machine that already has the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing_machine_id: Option<String>,
}

impl Problem {
    pub fn new(status: http::StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:skygate:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            request_id: String::new(),
            existing_machine_id: None,
        }
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for Problem {
    fn into_response(self) -> axum_core::response::Response {
        let status = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (status, [(http::header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response()
    }
}
