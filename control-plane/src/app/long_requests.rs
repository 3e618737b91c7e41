//! Requests that stay open (`GET /machines/{id}/wait`, `GET /events`), counted per account on
//! this replica: each holds a connection, a task and a database wake-up for as long as it
//! lasts, so one account may hold only so many at once (issue 15: waits had no bound).

use crate::error::{Error, Result};
use crate::model::UserId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Most long requests one account holds open on one replica.
pub const PER_ACCOUNT: usize = 16;

/// The open long requests of each account.
#[derive(Debug, Default)]
pub struct LongRequests {
    open: Mutex<HashMap<UserId, usize>>,
}

/// One open long request; closing it (dropping this) frees its place.
#[derive(Debug)]
pub struct Slot {
    of: Arc<LongRequests>,
    user: UserId,
}

impl LongRequests {
    /// A place for one more of `user`'s long requests, or 429 when it holds
    /// [`PER_ACCOUNT`] already.
    pub fn open(self: &Arc<Self>, user: UserId) -> Result<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let held = open.entry(user).or_default();
        if *held >= PER_ACCOUNT {
            return Err(Error::TooManyOpen(format!(
                "you have {PER_ACCOUNT} waits or event streams open on this server already; \
                 close one first"
            )));
        }
        *held += 1;
        Ok(Slot {
            of: Arc::clone(self),
            user,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = open.get_mut(&self.user) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_holds_at_most_its_share_and_a_closed_one_frees_its_place() {
        let requests = Arc::new(LongRequests::default());
        let (a, b) = (UserId::new(), UserId::new());
        let held: Vec<Slot> = (0..PER_ACCOUNT)
            .map(|_| requests.open(a).unwrap())
            .collect();
        assert!(matches!(requests.open(a), Err(Error::TooManyOpen(_))));
        // Another account is not held back by this one.
        let other = requests.open(b).unwrap();
        drop(held);
        assert!(requests.open(a).is_ok());
        drop(other);
        assert!(requests.open.lock().unwrap().is_empty());
    }
}
