//! Postfix's `smtp-sink` as the destination of the relay benchmark: it accepts everything,
//! stores nothing and prints running counters (`-c`, updated when a message's final dot
//! arrives), from which the benchmark reads how many messages it got. Its `-M count` exit is
//! set one past what is expected as a safety bound only: smtp-sink exits on the count-th
//! dot before answering it, which would leave that message deferred in the relay's queue.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ManagedChild, PeerError, START_TIMEOUT, free_port, log_file, wait_for_port};

/// Simultaneous connections the sink accepts (smtp-sink `-m`; its default of 256 is enough
/// for 20 delivery connections, this leaves room).
const MAX_CONNECTIONS: u32 = 1000;
/// Listen backlog.
const BACKLOG: u32 = 1024;
/// Bytes read from the end of the counter output.
const TAIL_BYTES: u64 = 256;

/// A running smtp-sink.
pub struct Sink {
    child: ManagedChild,
    pub port: u16,
    counters: PathBuf,
}

impl Sink {
    /// Starts `smtp-sink` on a free loopback port for `expected` messages.
    pub fn start(binary: &Path, dir: &Path, expected: u64) -> Result<Self, PeerError> {
        let port = free_port()?;
        let counters = dir.join(format!("smtp-sink-{port}.out"));
        let out = log_file(&counters)?;
        let mut cmd = Command::new(binary);
        if nix::unistd::geteuid().is_root() {
            // smtp-sink refuses to run as root without a user to switch to.
            cmd.args(["-u", "postfix"]);
        }
        let spawn_error = |source| PeerError::Spawn {
            what: "smtp-sink".to_owned(),
            source,
        };
        let mut child = cmd
            .args([
                "-c",
                "-m",
                &MAX_CONNECTIONS.to_string(),
                "-M",
                &expected.saturating_add(1).to_string(),
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg(BACKLOG.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(spawn_error)?)
            .stderr(out)
            .spawn()
            .map_err(spawn_error)?;
        wait_for_port(port, "smtp-sink", Some(&mut child), START_TIMEOUT)?;
        Ok(Self {
            child: ManagedChild::new(child, "smtp-sink"),
            port,
            counters,
        })
    }

    /// Whether the sink has exited (it should not before it is stopped).
    pub fn exited(&mut self) -> bool {
        self.child.wait_exit(Duration::ZERO)
    }

    /// Messages received so far: the last `mesg=` counter the sink printed (only the end of
    /// the file is read, so polling it stays cheap).
    pub fn received(&self) -> u64 {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.counters) else {
            return 0;
        };
        let len = f.metadata().map_or(0, |m| m.len());
        // One counter line is about 30 bytes; read a few.
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
        let mut tail = String::new();
        let _ = f.read_to_string(&mut tail);
        last_counter(&tail, "mesg=").unwrap_or(0)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn stop(&mut self) {
        self.child.stop();
    }
}

/// The last value of `key<n>` in smtp-sink's `-c` output (`sess=3 quit=3 mesg=3\r...`).
fn last_counter(text: &str, key: &str) -> Option<u64> {
    let at = text.rfind(key)? + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        assert_eq!(
            last_counter("sess=1 quit=1 mesg=1\rsess=2 quit=2 mesg=20\r", "mesg="),
            Some(20)
        );
        assert_eq!(last_counter("", "mesg="), None);
    }
}
