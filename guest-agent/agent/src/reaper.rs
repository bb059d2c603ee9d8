//! PID 1's duty: reap every child, and hand the exit codes of the ones someone waits for.
//!
//! Only this module calls `waitpid`; nothing in the agent may use `std::process` or
//! `tokio::process`, which would race with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Exit code of a process killed by signal N, as shells and runc report it.
const SIGNAL_EXIT_BASE: i32 = 128;

/// Processes whose exit someone waits for: pid -> where to publish the exit code.
#[derive(Debug, Clone, Default)]
pub struct Exits {
    watched: Arc<Mutex<HashMap<i32, watch::Sender<Option<i32>>>>>,
}

impl Exits {
    /// Registers `pid`; call it right after the child is created, before the next `.await`, so
    /// that the reaper (same thread) cannot reap it unobserved.
    pub fn watch(&self, pid: Pid) -> watch::Receiver<Option<i32>> {
        let (tx, rx) = watch::channel(None);
        self.lock().insert(pid.as_raw(), tx);
        rx
    }

    fn publish(&self, pid: Pid, code: i32) {
        if let Some(tx) = self.lock().remove(&pid.as_raw()) {
            let _ = tx.send(Some(code));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, watch::Sender<Option<i32>>>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reaps children on every SIGCHLD, forever.
pub async fn run(exits: Exits) -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    loop {
        reap_all(&exits);
        sigchld.recv().await;
    }
}

fn reap_all(exits: &Exits) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exits.publish(pid, code),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                exits.publish(pid, SIGNAL_EXIT_BASE + sig as i32)
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("husk-agent: waitpid: {e}");
                return;
            }
        }
    }
}
