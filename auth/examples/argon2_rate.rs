//! The argon2 crate's own hashing rate on this machine, the reference `scripts/bench-api.sh`
//! holds login to: the crate called directly with SkyGate's parameters (argon2id, m=19456 KiB,
//! t=2, p=1), one thread per core, each with memory allocated once, nothing else in the loop.
//!
//!   cargo run --release -p auth --example argon2_rate -- [seconds] [threads]
//!
//! Prints one line: `argon2_raw_per_s <rate> threads <n>`.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(5, |s| s.parse().expect("seconds"));
    let threads: usize = args.next().map_or_else(
        || std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
        |s| s.parse().expect("threads"),
    );
    let params = Params::new(19_456, 2, 1, Some(32)).expect("params");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|n| {
            let (params, stop, done) = (params.clone(), Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
                let mut blocks = vec![Block::default(); params.block_count()];
                let salt = [n as u8; 16];
                let mut out = [0u8; 32];
                while !stop.load(Ordering::Relaxed) {
                    argon2
                        .hash_password_into_with_memory(
                            b"bench passphrase 1",
                            &salt,
                            &mut out,
                            &mut blocks,
                        )
                        .expect("hash");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("argon2_raw_per_s {rate:.1} threads {threads}");
}
