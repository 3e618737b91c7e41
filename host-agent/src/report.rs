//! How an error reads as text: its own message, then each source's, joined with ": ". No
//! error of the agent repeats its source's text in its own message, so each level is written
//! once, as it is. Shared by the gRPC edge (status.rs), the start-up line (preflight.rs) and
//! logs.

use std::error::Error as StdError;

/// `e` and all its sources.
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    chain_until(e, |_| false)
}

/// `e` and its sources, down to and including the first level for which `hides_cause` is
/// true: that level's sources stay out (their words are for the agent's log only).
pub fn chain_until(
    e: &(dyn StdError + 'static),
    hides_cause: impl Fn(&(dyn StdError + 'static)) -> bool,
) -> String {
    let mut out = e.to_string();
    let mut level = e;
    while !hides_cause(level) {
        let Some(next) = level.source() else {
            break;
        };
        out.push_str(": ");
        out.push_str(&next.to_string());
        level = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("fetch image failed")]
        Fetch(#[source] Middle),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading \"/srv/x\"")]
    struct Middle(#[source] std::io::Error);

    fn sample() -> Outer {
        Outer::Fetch(Middle(std::io::Error::other("permission denied")))
    }

    #[test]
    fn each_level_once_joined_with_colons() {
        assert_eq!(
            chain(&sample()),
            "fetch image failed: reading \"/srv/x\": permission denied"
        );
    }

    #[test]
    fn a_level_that_hides_its_cause_ends_the_text() {
        let text = chain_until(&sample(), |e| e.downcast_ref::<Middle>().is_some());
        assert_eq!(text, "fetch image failed: reading \"/srv/x\"");
    }
}
