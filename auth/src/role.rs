//! User roles: what an authenticated principal may do.

use std::fmt;
use std::str::FromStr;

use crate::AuthError;

/// The role of a user account. Serialized (in JWT claims and the database) as lowercase text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An ordinary user: manages only their own resources.
    User,
    /// An operator: may manage every user's resources and the fleet.
    Admin,
}

impl Role {
    /// The canonical text form, as stored and as carried in tokens.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;

    /// Parses the canonical form only (`"user"` or `"admin"`). Matching is exact so that the
    /// database and the tokens cannot drift into several spellings of one role.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::UnknownRole(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        for role in [Role::User, Role::Admin] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(role.to_string(), role.as_str());
        }
        assert_eq!(Role::User.as_str(), "user");
        assert_eq!(Role::Admin.as_str(), "admin");
    }

    #[test]
    fn unknown_or_miscased_roles_are_rejected() {
        for bad in ["", "Admin", "ADMIN", "root", " user", "user "] {
            match bad.parse::<Role>() {
                Err(AuthError::UnknownRole(s)) => assert_eq!(s, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn serde_form_matches_as_str() {
        for role in [Role::User, Role::Admin] {
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
        assert!(serde_json::from_str::<Role>("\"superuser\"").is_err());
    }
}
