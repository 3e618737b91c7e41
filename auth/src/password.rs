//! Password policy, argon2id hashing and verification (with transparent-rehash detection).

use std::collections::HashSet;
use std::sync::OnceLock;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

/// Most memory a stored hash may ask of a verification, in KiB (four times today's cost). A
/// row asking for more is refused as malformed rather than allowed to take gigabytes.
const MAX_STORED_M_COST_KIB: u32 = 4 * M_COST_KIB;

/// The current parameters. Verification of older hashes does not use them (the stored PHC
/// string carries its own); they only decide `needs_rehash`.
fn current_params() -> Result<Params, AuthError> {
    Params::new(M_COST_KIB, T_COST, P_COST, Some(OUTPUT_LEN))
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Argon2's working memory, kept between hashes.
///
/// Each hash needs 19 MiB. Allocating it per hash on short-lived threads is what made the
/// process keep hundreds of MiB after a burst of logins (glibc keeps freed blocks in per-thread
/// arenas). A worker thread that owns one `HashMemory` and passes it to every hash it computes
/// holds exactly that much, however many hashes it runs.
#[derive(Debug, Default)]
pub struct HashMemory {
    blocks: Vec<Block>,
}

impl HashMemory {
    /// No memory yet: the first hash allocates it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.blocks.len() * Block::SIZE
    }

    /// After a hash with `params`: gives back memory grown for an older hash's larger cost,
    /// so a thread holds today's 19 MiB at most, and clears what a single-pass hash left.
    ///
    /// Blocks of two or more passes are not cleared: clearing 19 MiB cost some 10 % of every
    /// login (issue 12), for nothing. Each block left behind was rewritten by the last pass
    /// from the whole pass before, so testing a guess against it costs the same memory-hard
    /// work as testing it against the stored hash, and the stored hashes are in this
    /// process's memory anyway (read for every login). A single pass (only ever a stored
    /// hash from elsewhere) leaves its first blocks one cheap step from the password.
    fn after_hash(&mut self, params: &Params) {
        // One block is one KiB.
        let current = M_COST_KIB as usize;
        if self.blocks.len() > current {
            self.blocks.truncate(current);
            self.blocks.shrink_to_fit();
        }
        if params.t_cost() < 2 {
            for block in &mut self.blocks {
                *block = Block::default();
            }
        }
    }

    /// The first `params.block_count()` blocks, growing (once) when the parameters need more.
    fn for_params(&mut self, params: &Params) -> &mut [Block] {
        let needed = params.block_count();
        if self.blocks.len() < needed {
            self.blocks.resize(needed, Block::default());
        }
        &mut self.blocks[..needed]
    }
}

/// Computes an argon2 digest of `password` into a fresh output of `len` bytes.
fn digest(
    memory: &mut HashMemory,
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &str,
    salt: &[u8],
    len: usize,
) -> Result<Output, AuthError> {
    let argon2 = Argon2::new(algorithm, version, params.clone());
    let blocks = memory.for_params(&params);
    let output = Output::init_with(len, |out| {
        argon2
            .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut *blocks)
            .map_err(argon2::password_hash::Error::from)
    });
    memory.after_hash(&params);
    output.map_err(|e| AuthError::Hash(e.to_string()))
}

/// Hashes a password with argon2id (m=19456 KiB, t=2, p=1) and a random 16-byte salt, returning
/// the PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) to store.
///
/// This does not apply [`check_policy`]; callers setting a new password do that first.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    hash_password_in(&mut HashMemory::new(), password)
}

/// [`hash_password`] in memory the caller keeps between hashes.
pub fn hash_password_in(memory: &mut HashMemory, password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt
        .as_salt()
        .decode_b64(&mut salt_bytes)
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    let params = current_params()?;
    let hash = digest(
        memory,
        Algorithm::Argon2id,
        Version::V0x13,
        params.clone(),
        password,
        salt_raw,
        OUTPUT_LEN,
    )?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| AuthError::Hash(e.to_string()))?,
        salt: Some(salt.as_salt()),
        hash: Some(hash),
    };
    Ok(phc.to_string())
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
/// version and parameters up to four times today's memory), comparing digests in constant time.
///
/// A stored string that is not a well-formed argon2 hash is `Err(Hash)`, never `Invalid`: a
/// corrupt row is an internal fault to surface, not a wrong password.
pub fn verify_password(password: &str, phc: &str) -> Result<PasswordCheck, AuthError> {
    verify_password_in(&mut HashMemory::new(), password, phc)
}

/// [`verify_password`] in memory the caller keeps between hashes.
pub fn verify_password_in(
    memory: &mut HashMemory,
    password: &str,
    phc: &str,
) -> Result<PasswordCheck, AuthError> {
    let bad = |e: &dyn std::fmt::Display| AuthError::Hash(e.to_string());
    let parsed = PasswordHash::new(phc).map_err(|e| bad(&e))?;
    // Reject what a verifier would otherwise report as a mere mismatch: a hash of another
    // algorithm, or one missing its salt or digest.
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(|e| bad(&e))?;
    let Some(stored) = parsed.hash else {
        return Err(AuthError::Hash("stored hash has no digest".to_owned()));
    };
    let Some(salt) = parsed.salt else {
        return Err(AuthError::Hash("stored hash has no salt".to_owned()));
    };
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| bad(&e))?,
        None => Version::default(),
    };
    let stored_params = Params::try_from(&parsed).map_err(|e| bad(&e))?;
    if stored_params.m_cost() > MAX_STORED_M_COST_KIB {
        return Err(AuthError::Hash(format!(
            "stored hash asks for {} KiB, more than {MAX_STORED_M_COST_KIB}",
            stored_params.m_cost()
        )));
    }
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt.decode_b64(&mut salt_bytes).map_err(|e| bad(&e))?;
    let computed = digest(
        memory,
        algorithm,
        version,
        stored_params.clone(),
        password,
        salt_raw,
        stored.len(),
    )?;
    // `Output`'s equality is constant-time.
    if computed != stored {
        return Ok(PasswordCheck::Invalid);
    }

    let current = version == Version::V0x13
        && algorithm == Algorithm::Argon2id
        && stored_params.m_cost() == M_COST_KIB
        && stored_params.t_cost() == T_COST
        && stored_params.p_cost() == P_COST
        && stored_params.keyid().is_empty()
        && stored_params.data().is_empty()
        && stored.len() == OUTPUT_LEN
        && salt.as_str().len() >= MIN_SALT_B64_LEN;
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
    verify_dummy_in(&mut HashMemory::new(), password);
}

/// [`verify_dummy`] in memory the caller keeps between hashes.
pub fn verify_dummy_in(memory: &mut HashMemory, password: &str) {
    if let Some(phc) = dummy_hash() {
        // black_box: the result is unused, and this call must never be optimised away.
        std::hint::black_box(verify_password_in(memory, password, phc).ok());
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
    use argon2::password_hash::PasswordHasher;

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

    #[test]
    fn memory_is_kept_and_reused_across_hashes() {
        let mut memory = HashMemory::new();
        assert_eq!(memory.held_bytes(), 0);
        let phc = hash_password_in(&mut memory, "reused memory pass").unwrap();
        let held = memory.held_bytes();
        assert_eq!(held, M_COST_KIB as usize * 1024);
        for attempt in ["reused memory pass", "wrong pass", "another wrong one"] {
            verify_password_in(&mut memory, attempt, &phc).unwrap();
            verify_dummy_in(&mut memory, attempt);
        }
        assert_eq!(
            memory.held_bytes(),
            held,
            "a verify must not grow the memory"
        );
        // Weaker stored parameters use a prefix of the same memory.
        let weak = hash_with(
            Algorithm::Argon2id,
            Params::new(8192, 1, 1, None).unwrap(),
            "pw-pw-pw-pw",
        );
        assert!(matches!(
            verify_password_in(&mut memory, "pw-pw-pw-pw", &weak).unwrap(),
            PasswordCheck::Valid { needs_rehash: true }
        ));
        assert_eq!(memory.held_bytes(), held);
    }

    #[test]
    fn memory_grown_for_a_costlier_stored_hash_is_given_back() {
        let mut memory = HashMemory::new();
        let costly = hash_with(
            Algorithm::Argon2id,
            Params::new(2 * M_COST_KIB, 1, 1, None).unwrap(),
            "costly-pass",
        );
        assert!(matches!(
            verify_password_in(&mut memory, "costly-pass", &costly).unwrap(),
            PasswordCheck::Valid { needs_rehash: true }
        ));
        assert_eq!(memory.held_bytes(), M_COST_KIB as usize * 1024);
    }

    #[test]
    fn our_hashes_verify_with_the_reference_verifier() {
        use argon2::password_hash::PasswordVerifier;
        let phc = hash_password("interop check pass").unwrap();
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(Argon2::default()
            .verify_password(b"interop check pass", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"interop check pasS", &parsed)
            .is_err());
    }

    #[test]
    fn stored_hash_asking_for_too_much_memory_is_refused() {
        let good = hash_password("whatever-pass").unwrap();
        let greedy = good.replace("m=19456", "m=4000000");
        let mut memory = HashMemory::new();
        assert!(matches!(
            verify_password_in(&mut memory, "whatever-pass", &greedy),
            Err(AuthError::Hash(_))
        ));
        assert_eq!(
            memory.held_bytes(),
            0,
            "nothing allocated for a refused row"
        );
    }
}
