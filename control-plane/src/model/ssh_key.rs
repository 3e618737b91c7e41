//! OpenSSH public keys as tenants paste them: parsed, so garbage never reaches a guest; and
//! the keys they save by name.

use chrono::{DateTime, Utc};
use ssh_key::{HashAlg, PublicKey};
use uuid::Uuid;

/// A key a tenant saved under a name, which machines may reference.
#[derive(Debug, Clone)]
pub struct SavedSshKey {
    pub id: Uuid,
    pub name: String,
    pub public_key: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

/// A parsed OpenSSH public key, normalised to `algorithm base64 [comment]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshPublicKey {
    openssh: String,
    fingerprint: String,
}

/// Why the text is not a key we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSshKey {
    /// It does not parse as an OpenSSH public key.
    #[error("not an OpenSSH public key (expected e.g. 'ssh-ed25519 AAAA... comment')")]
    NotAKey,
    /// It parses, but breaks the rule agents apply before writing it into a guest.
    #[error(transparent)]
    Line(#[from] proto::ssh_key::KeyLineError),
}

impl SshPublicKey {
    /// Parses one `authorized_keys`-style line; options before the key are not accepted, and
    /// the line must pass the rule agents apply ([`proto::ssh_key::check_key_line`]: size,
    /// comment length, no control characters), so a saved key never fails a machine later.
    pub fn parse(text: &str) -> Result<Self, InvalidSshKey> {
        let text = text.trim();
        proto::ssh_key::check_key_line(text)?;
        let key = PublicKey::from_openssh(text).map_err(|_| InvalidSshKey::NotAKey)?;
        let openssh = key.to_openssh().map_err(|_| InvalidSshKey::NotAKey)?;
        // What we store and send is the normalised form: check that too.
        proto::ssh_key::check_key_line(&openssh)?;
        Ok(Self {
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            openssh,
        })
    }

    /// The key in OpenSSH text form.
    pub fn as_openssh(&self) -> &str {
        &self.openssh
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHHMwgk2GeZHV5tJNdEm1PU426kKnbe2RG0vww37WOHz alice@laptop";

    #[test]
    fn parses_an_ed25519_key_and_fingerprints_it() {
        let key = SshPublicKey::parse(&format!("  {ED25519}\n")).unwrap();
        assert_eq!(key.as_openssh(), ED25519);
        assert!(key.fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn rejects_garbage_and_injection() {
        use proto::ssh_key::KeyLineError;
        assert_eq!(
            SshPublicKey::parse(""),
            Err(InvalidSshKey::Line(KeyLineError::Empty))
        );
        assert_eq!(
            SshPublicKey::parse("ssh-ed25519 not-base64"),
            Err(InvalidSshKey::NotAKey)
        );
        assert_eq!(
            SshPublicKey::parse(&format!("{ED25519}\nssh-rsa AAAA evil")),
            Err(InvalidSshKey::Line(KeyLineError::ControlCharacter))
        );
        assert_eq!(
            SshPublicKey::parse(&format!("command=\"rm -rf /\" {ED25519}")),
            Err(InvalidSshKey::NotAKey)
        );
        // Comments with control characters or of any length parsed before (issue 10).
        assert_eq!(
            SshPublicKey::parse(&format!("{ED25519} ann\r\u{7}")),
            Err(InvalidSshKey::Line(KeyLineError::ControlCharacter))
        );
        assert_eq!(
            SshPublicKey::parse(&format!("{ED25519} {}", "c".repeat(2000))),
            Err(InvalidSshKey::Line(KeyLineError::CommentTooLong))
        );
    }
}
