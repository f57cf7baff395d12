//! Where log lines go: stderr, written in batches by a thread of their own.
//!
//! A node logs a line for every message it queues. Written one by one, each line is a
//! `write(2)` on the thread that runs the sessions, and with a slow reader of the pipe
//! (the container runtime) each one can stall every session of that thread. Here a line is
//! appended to a shared buffer (a lock and a copy); the writer thread wakes on the first
//! line of a batch, waits [`GATHER`] for more, and writes the batch with one call.
//!
//! * **Order** is kept: lines are appended in the order they were logged.
//! * **Bounded**: past [`LIMIT`] bytes waiting, a line waits until the writer has taken
//!   the batch (as a full pipe made it wait before), so memory never grows without bound.
//! * **Nothing is lost at exit**: [`LogSink::close`] (from `Telemetry::shutdown`, or when
//!   the handle is dropped) writes what is buffered and stops the thread; a line logged
//!   after that goes straight to stderr. A panic writes what is buffered before the panic
//!   message, so the lines that led to it come first.
//! * Only a kill (`SIGKILL`, OOM) can lose lines: at most the last [`GATHER`] of them.

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer waits for more lines after the first line of a batch.
pub const GATHER: Duration = Duration::from_millis(10);

/// Bytes that may wait for the writer before a new line waits too.
pub const LIMIT: usize = 1 << 20;

#[derive(Default)]
struct State {
    /// Lines not yet written.
    buf: Vec<u8>,
    /// Set by `close`: write what is left, then stop.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The writer waits here for the first line of a batch (and for `close`).
    filled: Condvar,
    /// Loggers wait here while [`LIMIT`] bytes are waiting.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held leaves a buffer of whole lines: keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what is buffered and writes it to `out` (errors are ignored: there is nowhere
    /// to report a failing stderr).
    fn write_out(&self, out: &mut dyn std::io::Write, spare: &mut Vec<u8>) {
        {
            let mut state = self.lock();
            std::mem::swap(&mut state.buf, spare);
        }
        self.drained.notify_all();
        if !spare.is_empty() {
            let _ = out.write_all(spare);
            let _ = out.flush();
            spare.clear();
        }
    }
}

/// The `MakeWriter` of the log layer: cheap to clone, every clone feeds the same thread.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl LogSink {
    /// Starts the writer thread, writing to stderr. Falls back to writing each line at once
    /// when the thread cannot be started.
    pub fn stderr() -> Self {
        Self::start(|| Box::new(std::io::stderr()))
    }

    /// Makes a panic write what is buffered before its message (the process's panic hook
    /// runs this first, then the hook it had).
    pub fn flush_before_panics(&self) {
        let sink = self.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            sink.flush_now();
            previous(info);
        }));
    }

    /// Starts the writer thread; `out` makes the destination on that thread.
    pub fn start<F>(out: F) -> Self
    where
        F: FnOnce() -> Box<dyn std::io::Write + Send> + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("log-writer".to_owned())
            .spawn(move || run(&thread_shared, out()));
        let writer = match writer {
            Ok(handle) => Some(handle),
            Err(_) => {
                // No thread: every line is written by its logger.
                shared.lock().closed = true;
                None
            }
        };
        Self {
            shared,
            writer: Arc::new(Mutex::new(writer)),
        }
    }

    /// Writes what is buffered and stops the writer thread. Later lines go straight to
    /// stderr. Idempotent.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.filled.notify_all();
        self.shared.drained.notify_all();
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Writes what is buffered now, on the calling thread (before a panic message).
    fn flush_now(&self) {
        self.shared
            .write_out(&mut std::io::stderr().lock(), &mut Vec::new());
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let mut state = self.shared.lock();
        while state.buf.len() >= LIMIT && !state.closed {
            state = self
                .shared
                .drained
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            drop(state);
            return std::io::stderr().write_all(line);
        }
        let first = state.buf.is_empty();
        state.buf.extend_from_slice(line);
        drop(state);
        if first {
            self.shared.filled.notify_one();
        }
        Ok(())
    }
}

/// The writer thread: waits for a first line, gathers for [`GATHER`], writes the batch.
fn run(shared: &Shared, mut out: Box<dyn std::io::Write + Send>) {
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut state = shared.lock();
            while state.buf.is_empty() && !state.closed {
                state = shared
                    .filled
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.closed
        };
        if !closed {
            std::thread::sleep(GATHER);
        }
        shared.write_out(&mut out, &mut spare);
        if closed {
            // `closed` is never unset and no logger appends once it is set: the write above
            // took the last of the buffer.
            return;
        }
    }
}

impl std::io::Write for &LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.append(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = &'a LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    /// A destination the test can read, shared with the writer thread.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().concat()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    fn sink(capture: &Capture) -> LogSink {
        let out = capture.clone();
        LogSink::start(move || Box::new(out))
    }

    #[test]
    fn lines_logged_together_are_written_in_order_with_one_write() {
        let capture = Capture::default();
        let sink = sink(&capture);
        for i in 0..100 {
            (&sink).write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        sink.close();
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(capture.text(), expected);
        // Logged within a gathering pause or a few (a busy machine may pause this thread):
        // a handful of batches, not a write per line.
        assert!(capture.writes() <= 10, "{} writes", capture.writes());
    }

    #[test]
    fn a_lone_line_is_written_without_waiting_for_more() {
        let capture = Capture::default();
        let sink = sink(&capture);
        (&sink).write_all(b"alone\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while capture.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(capture.text(), "alone\n");
        sink.close();
    }

    #[test]
    fn close_writes_everything_buffered_and_later_lines_still_go_out() {
        let capture = Capture::default();
        let sink = sink(&capture);
        (&sink).write_all(b"before\n").unwrap();
        sink.close();
        assert_eq!(capture.text(), "before\n");
        // After close a line goes to stderr (not the capture), and close again is harmless.
        (&sink).write_all(b"after close, to stderr\n").unwrap();
        sink.close();
        assert_eq!(capture.text(), "before\n");
    }

    #[test]
    fn many_threads_over_the_limit_lose_no_line() {
        let capture = Capture::default();
        let sink = sink(&capture);
        let line = vec![b'x'; 4096];
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                let mut line = line.clone();
                line[0] = b'0' + t;
                line.push(b'\n');
                std::thread::spawn(move || {
                    // 4 x 400 lines of 4 KiB: over six times LIMIT in all.
                    for _ in 0..400 {
                        (&sink).write_all(&line).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sink.close();
        let text = capture.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1600);
        for t in 0..4u8 {
            let first = char::from(b'0' + t);
            assert_eq!(lines.iter().filter(|l| l.starts_with(first)).count(), 400);
        }
        assert!(lines.iter().all(|l| l.len() == 4096));
    }
}
