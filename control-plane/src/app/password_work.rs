//! The password workers: a fixed set of threads, each keeping its own argon2 memory, fed from a
//! bounded queue.
//!
//! Why not the blocking pool: tokio starts and retires blocking threads as load comes and goes,
//! and each argon2 hash allocates 19 MiB. glibc keeps memory freed on a thread in that thread's
//! arena, so a burst of logins left hundreds of MiB resident for good (issue 10: 30 logins took
//! the process from 14 to 585 MiB). Here the threads and their memory are made once: the
//! process holds `threads × 19 MiB` for hashing whatever the load. Work beyond the queue is
//! refused at once, so an overload costs the caller a fast 503, not seconds in a queue.

use auth::password::HashMemory;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Why password work was not done.
#[derive(Debug, thiserror::Error)]
pub enum PasswordWorkError {
    /// Every worker is busy and the queue is full.
    #[error("every password worker is busy and the queue is full")]
    Busy,
    /// The workers are gone (a panic in a hash, or shutdown).
    #[error("the password workers have stopped")]
    Stopped,
    /// The threads could not be started.
    #[error("starting the password workers")]
    Start(#[source] std::io::Error),
}

/// How many threads hash and how much work may wait for them.
#[derive(Debug, Clone, Copy)]
pub struct PasswordWorkSettings {
    /// Threads, each holding 19 MiB once it has hashed.
    pub threads: usize,
    /// Requests that may wait for a thread; more are refused.
    pub queue: usize,
}

/// Checks that may wait per thread by default. A queued login waits at most about this many
/// hash times (some 250 ms); longer waits are refused. Sixteen lets a pool of 32 client
/// connections on two cores keep every core hashing without a 503 (issue 12: at eight, a third
/// of such a load was refused, and the refusals took CPU from the hashes).
pub const QUEUE_PER_THREAD: usize = 16;

impl Default for PasswordWorkSettings {
    /// One thread per core, [`QUEUE_PER_THREAD`] waiting checks per thread.
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Self {
            threads,
            queue: threads * QUEUE_PER_THREAD,
        }
    }
}

type Job = Box<dyn FnOnce(&mut HashMemory) + Send>;

/// The running workers; dropping this ends the threads once the queue is empty.
#[derive(Debug)]
pub struct PasswordWorkers {
    queue: SyncSender<Job>,
}

impl PasswordWorkers {
    /// Starts `settings.threads` threads (at least one). Memory is allocated by each thread's
    /// first hash, so an idle control plane does not hold it.
    pub fn start(settings: PasswordWorkSettings) -> Result<Self, PasswordWorkError> {
        let (queue, jobs) = sync_channel::<Job>(settings.queue);
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..settings.threads.max(1) {
            let jobs = Arc::clone(&jobs);
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || work(&jobs))
                .map_err(PasswordWorkError::Start)?;
        }
        Ok(Self { queue })
    }

    /// Runs `job` on a worker with that worker's memory; `Busy` at once when the queue is full.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PasswordWorkError>
    where
        T: Send + 'static,
        F: FnOnce(&mut HashMemory) -> T + Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |memory| {
            // The caller may have gone (a closed connection); the work is done regardless.
            let _ = done.send(job(memory));
        });
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => PasswordWorkError::Busy,
            TrySendError::Disconnected(_) => PasswordWorkError::Stopped,
        })?;
        result.await.map_err(|_| PasswordWorkError::Stopped)
    }
}

/// One worker: takes jobs until the sender is dropped. A panicking job loses its answer (the
/// caller sees `Stopped`) but not the thread or its memory.
fn work(jobs: &Mutex<Receiver<Job>>) {
    let mut memory = HashMemory::new();
    loop {
        let job = {
            let Ok(jobs) = jobs.lock() else { return };
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut memory)));
        if ran.is_err() {
            tracing::error!("a password job panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn work_beyond_the_queue_is_refused_at_once() {
        let workers = Arc::new(
            PasswordWorkers::start(PasswordWorkSettings {
                threads: 1,
                queue: 1,
            })
            .unwrap(),
        );
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        // One job holds the thread, one waits in the queue...
        let mut held = Vec::new();
        for _ in 0..2 {
            let (workers, gate) = (Arc::clone(&workers), Arc::clone(&gate));
            held.push(tokio::spawn(async move {
                workers
                    .run(move |_| {
                        let _ = gate.lock().unwrap().recv();
                    })
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...so the third is refused without waiting.
        let refused = tokio::time::timeout(Duration::from_millis(200), workers.run(|_| ())).await;
        assert!(
            matches!(refused, Ok(Err(PasswordWorkError::Busy))),
            "{refused:?}"
        );
        release.send(()).unwrap();
        release.send(()).unwrap();
        for h in held {
            h.await.unwrap().unwrap();
        }
        // Capacity is back.
        workers.run(|_| ()).await.unwrap();
    }

    #[tokio::test]
    async fn a_worker_keeps_one_memory_for_every_hash() {
        let workers = PasswordWorkers::start(PasswordWorkSettings {
            threads: 1,
            queue: 4,
        })
        .unwrap();
        let phc = workers
            .run(|m| auth::password::hash_password_in(m, "pool-held-pass"))
            .await
            .unwrap()
            .unwrap();
        let held = workers.run(|m| m.held_bytes()).await.unwrap();
        assert_eq!(held, 19_456 * 1024);
        for _ in 0..3 {
            let phc = phc.clone();
            workers
                .run(move |m| auth::password::verify_password_in(m, "wrong-pass", &phc))
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(workers.run(|m| m.held_bytes()).await.unwrap(), held);
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_take_the_worker_down() {
        let workers = PasswordWorkers::start(PasswordWorkSettings {
            threads: 1,
            queue: 1,
        })
        .unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let failed = workers.run(|_| -> () { panic!("boom") }).await;
        assert!(matches!(failed, Err(PasswordWorkError::Stopped)));
        let counter = Arc::clone(&ran);
        workers
            .run(move |_| counter.fetch_add(1, Ordering::SeqCst))
            .await
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
