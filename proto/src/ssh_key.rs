//! What an SSH public key line may be when it travels from a tenant to a guest: one rule, kept
//! here because both ends check it — the API when a key is saved or given (422), and the agent
//! before it writes the key into a seed.
//!
//! Before (issue 10) the API accepted comments of any length with CR or BEL in them and the
//! agent then refused the key, failing the machine; 900 KiB comments bloated every listing.

/// Longest key line accepted, in bytes. A 16384-bit RSA key is about 2.8 KiB of base64; this
/// leaves room for any real key and a comment.
pub const MAX_KEY_LINE_BYTES: usize = 8 * 1024;
/// Longest comment (the text after the key data), in bytes.
pub const MAX_COMMENT_BYTES: usize = 1024;

/// Why a key line is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLineError {
    /// Nothing but white space.
    Empty,
    /// Longer than [`MAX_KEY_LINE_BYTES`].
    TooLong,
    /// The comment is longer than [`MAX_COMMENT_BYTES`].
    CommentTooLong,
    /// A control character (CR, LF, BEL, …) or a Unicode line or paragraph separator, which
    /// would end or corrupt the line in `authorized_keys`.
    ControlCharacter,
}

impl std::fmt::Display for KeyLineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => f.write_str("the key is empty"),
            Self::TooLong => write!(f, "the key is longer than {MAX_KEY_LINE_BYTES} bytes"),
            Self::CommentTooLong => {
                write!(
                    f,
                    "the key's comment is longer than {MAX_COMMENT_BYTES} bytes"
                )
            }
            Self::ControlCharacter => f.write_str("the key contains a control character"),
        }
    }
}

impl std::error::Error for KeyLineError {}

/// Checks one `algorithm base64 [comment]` line against the shared rule.
pub fn check_key_line(line: &str) -> Result<(), KeyLineError> {
    if line.trim().is_empty() {
        return Err(KeyLineError::Empty);
    }
    if line.len() > MAX_KEY_LINE_BYTES {
        return Err(KeyLineError::TooLong);
    }
    if line
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(KeyLineError::ControlCharacter);
    }
    let comment = line
        .split_whitespace()
        .skip(2)
        .collect::<Vec<_>>()
        .join(" ");
    if comment.len() > MAX_COMMENT_BYTES {
        return Err(KeyLineError::CommentTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHHMwgk2GeZHV5tJNdEm1PU426kKnbe2RG0vww37WOHz";

    #[test]
    fn real_keys_pass() {
        assert_eq!(check_key_line(KEY), Ok(()));
        assert_eq!(check_key_line(&format!("{KEY} alice@laptop")), Ok(()));
        let comment = "x".repeat(MAX_COMMENT_BYTES);
        assert_eq!(check_key_line(&format!("{KEY} {comment}")), Ok(()));
    }

    #[test]
    fn control_characters_anywhere_are_refused() {
        for bad in [
            "\r",
            "\u{7}",
            "\n",
            "\u{0}",
            "\u{85}",
            "\u{2028}",
            "\u{1b}[31m",
        ] {
            assert_eq!(
                check_key_line(&format!("{KEY} ann{bad}x")),
                Err(KeyLineError::ControlCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let comment = "x".repeat(MAX_COMMENT_BYTES + 1);
        assert_eq!(
            check_key_line(&format!("{KEY} {comment}")),
            Err(KeyLineError::CommentTooLong)
        );
        let huge = "y".repeat(MAX_KEY_LINE_BYTES);
        assert_eq!(
            check_key_line(&format!("{KEY} {huge}")),
            Err(KeyLineError::TooLong)
        );
        assert_eq!(check_key_line("  "), Err(KeyLineError::Empty));
    }
}
