//! Password policy, argon2id hashing and verification (with transparent-rehash detection).

use std::collections::HashSet;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::rngs::OsRng;

use crate::AuthError;

/// Fewest characters (Unicode scalar values) a new password may have.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Most characters (Unicode scalar values) a new password may have. Bounds the work a single
/// request can make us do; long passphrases still fit comfortably.
pub const MAX_PASSWORD_CHARS: usize = 128;

/// OWASP's recommended argon2id settings: 19 MiB memory, 2 passes, 1 lane.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;
/// Length of the stored digest, in bytes (argon2's default).
const OUTPUT_LEN: usize = 32;
/// Our 16-byte salts are 22 characters of unpadded base64; a stored hash with a shorter salt
/// came from elsewhere and is rehashed.
const MIN_SALT_B64_LEN: usize = 22;

/// The common-password list, one lowercase entry per line; lines starting with `#` are comments.
const COMMON_PASSWORDS_TXT: &str = include_str!("../data/common-passwords.txt");

/// Checks a *new* password against the policy: length in characters (never bytes, and never
/// truncated) and absence from the common-password list, compared case-insensitively.
///
/// Apply this when a password is set or changed, not at login: tightening the policy must not
/// lock out users whose existing passwords predate it.
pub fn check_policy(password: &str) -> Result<(), AuthError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(AuthError::PasswordTooShort {
            min: MIN_PASSWORD_CHARS,
        });
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(AuthError::PasswordTooLong {
            max: MAX_PASSWORD_CHARS,
        });
    }
    if common_passwords().contains(password.to_lowercase().as_str()) {
        return Err(AuthError::PasswordTooCommon);
    }
    Ok(())
}

/// The common-password set, parsed once on first use.
fn common_passwords() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_PASSWORDS_TXT
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect()
    })
}

/// The hasher with the current parameters. Verification of older hashes does not use these
/// parameters (the stored PHC string carries its own); they only decide `needs_rehash`.
fn current_hasher() -> Result<Argon2<'static>, AuthError> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, Some(OUTPUT_LEN))
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password with argon2id (m=19456 KiB, t=2, p=1) and a random 16-byte salt, returning
/// the PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) to store.
///
/// This does not apply [`check_policy`]; callers setting a new password do that first.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    current_hasher()?
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    /// The password matches. When `needs_rehash` is true the stored hash uses outdated
    /// parameters: the caller should store [`hash_password`] of the same password now, while it
    /// has the plaintext.
    Valid {
        /// Whether the stored hash should be replaced by one with the current parameters.
        needs_rehash: bool,
    },
    /// The password does not match.
    Invalid,
}

/// Verifies a password against a stored argon2 PHC string (argon2id, argon2i or argon2d, any
/// version and parameters), comparing digests in constant time.
///
/// A stored string that is not a well-formed argon2 hash is `Err(Hash)`, never `Invalid`: a
/// corrupt row is an internal fault to surface, not a wrong password.
pub fn verify_password(password: &str, phc: &str) -> Result<PasswordCheck, AuthError> {
    let parsed = PasswordHash::new(phc).map_err(|e| AuthError::Hash(e.to_string()))?;
    // Reject what the argon2 verifier would otherwise report as a mere mismatch: a hash of
    // another algorithm, or one missing its salt or digest.
    let algorithm =
        Algorithm::try_from(parsed.algorithm).map_err(|e| AuthError::Hash(e.to_string()))?;
    let Some(digest) = parsed.hash else {
        return Err(AuthError::Hash("stored hash has no digest".to_owned()));
    };
    if parsed.salt.is_none() {
        return Err(AuthError::Hash("stored hash has no salt".to_owned()));
    }
    let stored_params = Params::try_from(&parsed).map_err(|e| AuthError::Hash(e.to_string()))?;

    // `Argon2`'s verifier re-hashes with the algorithm, version and parameters of the stored
    // string, whatever the instance was built with.
    match Argon2::default().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => {}
        Err(argon2::password_hash::Error::Password) => return Ok(PasswordCheck::Invalid),
        Err(e) => return Err(AuthError::Hash(e.to_string())),
    }

    let current = parsed.version == Some(Version::V0x13.into())
        && algorithm == Algorithm::Argon2id
        && stored_params.m_cost() == M_COST_KIB
        && stored_params.t_cost() == T_COST
        && stored_params.p_cost() == P_COST
        && stored_params.keyid().is_empty()
        && stored_params.data().is_empty()
        && digest.len() == OUTPUT_LEN
        && parsed
            .salt
            .is_some_and(|s| s.as_str().len() >= MIN_SALT_B64_LEN);
    Ok(PasswordCheck::Valid {
        needs_rehash: !current,
    })
}

/// Runs one full verification against a fixed dummy hash, discarding the result.
///
/// Call it when a login names an unknown user, so that the response takes as long as for a
/// known user with a wrong password and timing does not reveal which accounts exist. The dummy
/// hash is made with the current parameters (so it costs the same) once, on first use.
pub fn verify_dummy(password: &str) {
    if let Some(phc) = dummy_hash() {
        // black_box: the result is unused, and this call must never be optimised away.
        std::hint::black_box(verify_password(password, phc).ok());
    }
}

/// The dummy hash, computed on first use. `None` only if argon2 cannot hash at all, in which
/// case every real login fails too and timing is the least of our problems.
fn dummy_hash() -> Option<&'static str> {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    DUMMY
        .get_or_init(|| hash_password("skygate-dummy-password").ok())
        .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries checked by hand to be in data/common-passwords.txt.
    const LISTED: [&str; 4] = ["password123", "iloveyou", "qwerty123", "passw0rd"];

    fn hash_with(algorithm: Algorithm, params: Params, password: &str) -> String {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(algorithm, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn length_bounds_are_inclusive() {
        let ok = |n: usize| check_policy(&"x7Kq".repeat(40)[..n]);
        assert!(matches!(ok(7), Err(AuthError::PasswordTooShort { min: 8 })));
        assert!(ok(8).is_ok());
        assert!(ok(128).is_ok());
        assert!(matches!(
            check_policy(&"x7Kq".repeat(40)[..129]),
            Err(AuthError::PasswordTooLong { max: 128 })
        ));
        assert!(matches!(
            check_policy(""),
            Err(AuthError::PasswordTooShort { .. })
        ));
    }

    #[test]
    fn length_counts_chars_not_bytes() {
        // 8 'é' are 16 bytes: must pass on characters, though 7 must still fail.
        assert!(check_policy(&"é".repeat(8)).is_ok());
        assert!(matches!(
            check_policy(&"é".repeat(7)),
            Err(AuthError::PasswordTooShort { .. })
        ));
        // 128 four-byte chars (512 bytes) are allowed; 129 are not.
        assert!(check_policy(&"🦀".repeat(128)).is_ok());
        assert!(matches!(
            check_policy(&"🦀".repeat(129)),
            Err(AuthError::PasswordTooLong { .. })
        ));
    }

    #[test]
    fn common_passwords_rejected_in_any_case() {
        for pw in LISTED {
            for variant in [pw.to_owned(), pw.to_uppercase(), capitalise(pw)] {
                assert!(
                    matches!(check_policy(&variant), Err(AuthError::PasswordTooCommon)),
                    "{variant:?} should be rejected as common"
                );
            }
        }
        assert!(check_policy("Password123").is_err());
        // A near miss is accepted: the check is exact membership, not similarity.
        assert!(check_policy("password123-skygate-vm").is_ok());
    }

    fn capitalise(s: &str) -> String {
        let mut chars = s.chars();
        chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    }

    #[test]
    fn common_list_is_loaded_and_well_formed() {
        let set = common_passwords();
        assert!(set.len() >= 9_000, "only {} entries", set.len());
        assert!(!set.iter().any(|e| e.starts_with('#')), "header leaked in");
        for entry in set {
            let n = entry.chars().count();
            assert!(
                (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&n),
                "{entry:?}"
            );
            assert_eq!(*entry, entry.to_lowercase(), "{entry:?} is not lowercase");
        }
        assert!(COMMON_PASSWORDS_TXT.starts_with("# "));
    }

    #[test]
    fn hash_verify_round_trip_with_current_params() {
        let phc = hash_password("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!(
            verify_password("correct horse battery", &phc).unwrap(),
            PasswordCheck::Valid {
                needs_rehash: false
            }
        );
        assert_eq!(
            verify_password("correct horse batterY", &phc).unwrap(),
            PasswordCheck::Invalid
        );
        assert_eq!(verify_password("", &phc).unwrap(), PasswordCheck::Invalid);
    }

    #[test]
    fn salts_are_random() {
        let a = hash_password("same password").unwrap();
        let b = hash_password("same password").unwrap();
        assert_ne!(a, b);
        // 16 salt bytes are 22 characters of unpadded base64.
        let salt = PasswordHash::new(&a).unwrap().salt.unwrap();
        assert_eq!(salt.len(), 22);
    }

    #[test]
    fn no_truncation_of_long_passwords() {
        let base = "k".repeat(99);
        let a = format!("{base}a");
        let b = format!("{base}b");
        assert_eq!(a.chars().count(), 100);
        let phc = hash_password(&a).unwrap();
        assert_eq!(verify_password(&b, &phc).unwrap(), PasswordCheck::Invalid);
        assert!(matches!(
            verify_password(&a, &phc).unwrap(),
            PasswordCheck::Valid { .. }
        ));
    }

    #[test]
    fn weaker_params_verify_but_need_rehash() {
        let weak = Params::new(8192, 1, 1, None).unwrap();
        let phc = hash_with(Algorithm::Argon2id, weak, "hunter2hunter2");
        assert!(phc.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"), "{phc}");
        assert_eq!(
            verify_password("hunter2hunter2", &phc).unwrap(),
            PasswordCheck::Valid { needs_rehash: true }
        );
        assert_eq!(
            verify_password("hunter2hunter3", &phc).unwrap(),
            PasswordCheck::Invalid
        );
    }

    #[test]
    fn other_argon2_variant_needs_rehash() {
        // Same costs, but argon2i: still a valid credential, but not what we write today.
        let params = Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap();
        let phc = hash_with(Algorithm::Argon2i, params, "hunter2hunter2");
        assert!(phc.starts_with("$argon2i$"), "{phc}");
        assert_eq!(
            verify_password("hunter2hunter2", &phc).unwrap(),
            PasswordCheck::Valid { needs_rehash: true }
        );
    }

    #[test]
    fn malformed_stored_hashes_are_errors() {
        let good = hash_password("whatever-pass").unwrap();
        let no_digest = good.rsplit_once('$').unwrap().0.to_owned();
        for bad in [
            "",
            "not a hash",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=2,p=1$!!!$!!!",
            no_digest.as_str(),
        ] {
            assert!(
                matches!(
                    verify_password("whatever-pass", bad),
                    Err(AuthError::Hash(_))
                ),
                "{bad:?} should be Err(Hash)"
            );
        }
    }

    #[test]
    fn dummy_hash_costs_the_same_as_a_real_one() {
        verify_dummy("anything at all");
        let phc = dummy_hash().unwrap();
        // Same parameters as real hashes, or unknown-user logins would be measurably faster.
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!(
            verify_password("anything at all", phc).unwrap(),
            PasswordCheck::Invalid
        );
        // Computed once: later calls see the very same string.
        assert!(std::ptr::eq(phc, dummy_hash().unwrap()));
    }
}
