//! The one error type of the `auth` crate.

use std::path::PathBuf;

/// Everything that can go wrong in credential handling.
///
/// The password-policy variants have messages fit to show an end user; every other variant is
/// internal or deliberately vague towards clients and carries its detail for logs only.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password has fewer than `min` characters (Unicode scalar values).
    #[error("password must be at least {min} characters")]
    PasswordTooShort {
        /// The minimum number of characters.
        min: usize,
    },
    /// The password has more than `max` characters (Unicode scalar values).
    #[error("password must be at most {max} characters")]
    PasswordTooLong {
        /// The maximum number of characters.
        max: usize,
    },
    /// The password is on the list of commonly used (leaked) passwords.
    #[error("password is too common")]
    PasswordTooCommon,
    /// Argon2 failed, or a stored password hash is malformed. Internal: never shown to clients.
    #[error("password hash error: {0}")]
    Hash(String),
    /// An access token failed to decode or validate. The text says why, for logs only: clients
    /// must only ever learn that the token was not accepted.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The JWT signing secret is shorter than [`crate::token::MIN_SECRET_BYTES`].
    #[error("JWT secret is {len} bytes long; at least {min} are required", min = crate::token::MIN_SECRET_BYTES)]
    WeakSecret {
        /// The length of the rejected secret, in bytes.
        len: usize,
    },
    /// The JWT secret file could not be read or created.
    #[error("cannot read or create JWT secret file {}", path.display())]
    SecretFile {
        /// The secret file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A role name that is neither `user` nor `admin`.
    #[error("unknown role {0:?}")]
    UnknownRole(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_messages_are_fit_for_users() {
        assert_eq!(
            AuthError::PasswordTooShort { min: 8 }.to_string(),
            "password must be at least 8 characters"
        );
        assert_eq!(
            AuthError::PasswordTooLong { max: 128 }.to_string(),
            "password must be at most 128 characters"
        );
        assert_eq!(
            AuthError::PasswordTooCommon.to_string(),
            "password is too common"
        );
    }

    #[test]
    fn secret_file_error_exposes_io_error_as_source() {
        use std::error::Error as _;
        let err = AuthError::SecretFile {
            path: PathBuf::from("/nonexistent/jwt.key"),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert!(err.to_string().contains("/nonexistent/jwt.key"));
        let source = err.source().map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("denied"));
    }

    #[test]
    fn weak_secret_message_names_both_lengths() {
        let msg = AuthError::WeakSecret { len: 10 }.to_string();
        assert!(msg.contains("10 bytes"), "{msg}");
        assert!(msg.contains("32"), "{msg}");
    }
}
