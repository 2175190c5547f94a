//! Child processes of the harness: signals sent from this process (no
//! external `kill`, which a minimal Debian root lacks) and waits that end:
//! a wedged child fails its test instead of hanging the suite.

use std::process::{Child, ExitStatus, Output};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// Sends `signal` to the child, from this process.
pub fn signal(child: &Child, signal: Signal) -> Result<(), String> {
    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw).ok_or("no such pid")?;
    kill_process(pid, signal).map_err(|e| format!("signal {signal:?} to {}: {e}", child.id()))
}

/// Waits at most `limit` for the child to exit; `Err` (with the child still
/// running) past it.
pub fn wait_within(child: &mut Child, limit: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => return Err(format!("process {} still running after {limit:?}", child.id())),
            Err(e) => return Err(format!("waiting for {}: {e}", child.id())),
        }
    }
}

/// SIGKILL and reap; a child that is gone already is fine.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    // SIGKILL cannot be ignored: this only fails for a zombie-reaping bug.
    if let Err(e) = wait_within(child, Duration::from_secs(10)) {
        eprintln!("kill: {e}");
    }
}

/// SIGTERM, then the exit code once the child is gone (`None`: it died of
/// a signal). A child still running after `limit` is killed and reported.
pub fn terminate(child: &mut Child, limit: Duration) -> Result<Option<i32>, String> {
    signal(child, Signal::TERM)?;
    match wait_within(child, limit) {
        Ok(status) => Ok(status.code()),
        Err(e) => {
            kill(child);
            Err(format!("SIGTERM did not stop it: {e}; killed"))
        }
    }
}

/// Runs a command to its end, at most `limit`; past it the process is
/// killed and the call panics with what it printed so far.
pub fn output_within(command: &mut std::process::Command, limit: Duration) -> Output {
    use std::process::Stdio;
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the command starts");
    collect_within(child, limit, &format!("{command:?}"))
}

/// Reads a spawned child's piped stdout and stderr and waits for it, at
/// most `limit`, as [`output_within`]. A pipe still held open by a
/// grandchild (a server a script started) is read for one more second after
/// the child exited, then left.
pub fn collect_within(mut child: Child, limit: Duration, what: &str) -> Output {
    use std::sync::{Arc, Mutex};
    type Buffer = Arc<Mutex<(Vec<u8>, bool)>>;
    fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> Buffer {
        let buffer: Buffer = Arc::new(Mutex::new((Vec::new(), pipe.is_none())));
        if let Some(mut pipe) = pipe {
            let shared = buffer.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    let n = pipe.read(&mut chunk).unwrap_or(0);
                    let mut guard = shared.lock().unwrap();
                    if n == 0 {
                        guard.1 = true;
                        return;
                    }
                    guard.0.extend_from_slice(&chunk[..n]);
                }
            });
        }
        buffer
    }
    let buffers = [drain(child.stdout.take()), drain(child.stderr.take())];
    let waited = wait_within(&mut child, limit);
    if waited.is_err() {
        kill(&mut child);
    }
    let eof_by = Instant::now() + Duration::from_secs(1);
    while Instant::now() < eof_by && !buffers.iter().all(|b| b.lock().unwrap().1) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let [stdout, stderr] = buffers.map(|b| std::mem::take(&mut b.lock().unwrap().0));
    match waited {
        Ok(status) => Output { status, stdout, stderr },
        Err(e) => panic!(
            "{what}: {e}; killed\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Runs a command with the stdio it was given, at most `limit`; past it
/// the process is killed and the call panics.
pub fn status_within(command: &mut std::process::Command, limit: Duration) -> ExitStatus {
    let mut child = command.spawn().expect("the command starts");
    wait_within(&mut child, limit).unwrap_or_else(|e| {
        kill(&mut child);
        panic!("{command:?}: {e}; killed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A shell that ignores SIGTERM (as a wedged daemon would).
    fn stubborn() -> Child {
        Command::new("sh").args(["-c", "trap '' TERM; sleep 5"]).stdin(Stdio::null()).spawn().unwrap()
    }

    /// Issue 11, item 14: `terminate` waited for ever on a child that did
    /// not exit (and sent the signal with an external `kill`).
    #[test]
    fn terminating_a_child_that_ignores_sigterm_ends_within_the_limit() {
        let mut child = stubborn();
        std::thread::sleep(Duration::from_millis(100)); // the trap is set
        let (done, finished) = std::sync::mpsc::channel();
        let started = Instant::now();
        std::thread::spawn(move || {
            let result = terminate(&mut child, Duration::from_millis(500));
            let _ = child.kill();
            let _ = child.wait();
            let _ = done.send(result);
        });
        let result = finished.recv_timeout(Duration::from_secs(10)).expect("terminate returns");
        assert!(result.is_err(), "a child still running after the limit is an error: {result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_command_past_its_limit_is_killed_and_reported() {
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            output_within(
                std::process::Command::new("sh").args(["-c", "echo partial; exec sleep 5"]),
                Duration::from_millis(300),
            )
        });
        let message = outcome.expect_err("past the limit it panics");
        let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("still running") && message.contains("partial"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}
