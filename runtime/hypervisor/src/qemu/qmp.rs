//! A QMP client for the one thing the door asks QEMU: save the VM to a file and load it back
//! (QEMU's migration to and from `file:`).
//!
//! QEMU runs jailed and its guest may have taken it over, so its answers are bounded: a line of
//! at most [`MAX_LINE`] bytes, every command within the caller's deadline.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP line read (QEMU's answers here are a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;
/// Pause between two looks at a migration's progress.
const POLL: Duration = Duration::from_millis(5);

/// A QMP connection in command mode.
#[derive(Debug)]
pub(crate) struct Qmp {
    stream: BufReader<UnixStream>,
    deadline: Instant,
}

impl Qmp {
    /// Takes QEMU's greeting and enters command mode; every later call must end before
    /// `deadline`.
    pub(crate) async fn handshake(stream: UnixStream, deadline: Instant) -> Result<Self, String> {
        let mut qmp = Self {
            stream: BufReader::new(stream),
            deadline,
        };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err("QEMU's monitor did not greet with QMP".into());
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value; events in between are skipped.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<Value, String> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
            .map_err(|e| e.to_string())?;
        line.push(b'\n');
        let write = self.stream.get_mut().write_all(&line);
        tokio::time::timeout_at(self.deadline.into(), write)
            .await
            .map_err(|_| self.late(command))?
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let answer = self.read().await?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            let why = answer
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("no answer");
            return Err(format!("QMP {command}: {}", printable(why)));
        }
    }

    /// Waits until the migration in progress (a save or a load) has completed.
    pub(crate) async fn migration_done(&mut self) -> Result<(), String> {
        loop {
            let status = self.execute("query-migrate", json!({})).await?;
            match status.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = status
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(format!("QEMU's migration failed: {}", printable(why)));
                }
                _ => {}
            }
            if Instant::now() >= self.deadline {
                return Err(self.late("query-migrate"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sets the migration capabilities both ends of a snapshot need: guest memory is the
    /// memory file itself, not part of the migration stream.
    pub(crate) async fn ignore_shared_memory(&mut self) -> Result<(), String> {
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        self.execute("migrate-set-capabilities", caps)
            .await
            .map(drop)
    }

    async fn read(&mut self) -> Result<Value, String> {
        let mut line = Vec::new();
        let read = async {
            let mut limited = (&mut self.stream).take(MAX_LINE as u64);
            limited.read_until(b'\n', &mut line).await
        };
        let n = tokio::time::timeout_at(self.deadline.into(), read)
            .await
            .map_err(|_| "QEMU's monitor did not answer in time".to_owned())?
            .map_err(|e| format!("QMP: {e}"))?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err("QEMU's monitor closed or sent an overlong line".into());
        }
        serde_json::from_slice(&line).map_err(|e| format!("QMP: {e}"))
    }

    fn late(&self, command: &str) -> String {
        format!("QEMU did not answer {command} in time")
    }
}

/// QEMU's text as one printable line of at most 200 characters.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}
