//! A child process whose stderr lines are kept, so a test can wait for one; killed and reaped
//! when dropped, so a failing test leaves no process behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A spawned process and what it wrote to stderr so far.
#[derive(Debug)]
pub struct LoggedChild {
    child: Child,
    lines: Lines,
}

impl LoggedChild {
    /// Spawns `cmd` with stdin and stdout closed and stderr kept.
    pub fn spawn(mut cmd: Command) -> LoggedChild {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr");
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lock, cvar) = &*sink;
                lock.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                cvar.notify_all();
            }
        });
        LoggedChild { child, lines }
    }

    /// The first line containing `needle`, waiting up to `timeout` for it (then panics with
    /// everything logged).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let (lock, cvar) = &*self.lines;
        let deadline = Instant::now() + timeout;
        let mut lines = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "never logged {needle:?}; logged:\n{}",
                lines.join("\n")
            );
            lines = cvar
                .wait_timeout(lines, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        self.kill9();
    }
}
