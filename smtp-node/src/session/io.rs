//! Session I/O: replies are collected and flushed just before the session would block on a
//! read (RFC 2920: a pipelined batch gets its replies together), reads run under a deadline
//! and watch the shutdown signals, and DATA/BDAT reads are held to the minimum data rate.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{End, Session};
use crate::protocol::{EnhancedCode, LineEvent, MAX_AUTH_LINE, Reply};

/// Free buffer space requested before a read of message data (DATA, BDAT): large reads keep
/// the reads per message few.
const DATA_READ_CHUNK: usize = 16 * 1024;
/// Free buffer space requested before a read of commands. A command line is at most 512
/// octets (RFC 5321 4.5.3.1.4) and a pipelined MAIL/RCPT/DATA group is usually smaller; longer
/// input (ESMTP parameters, SASL responses, many pipelined RCPTs) grows the buffer read by
/// read. This is what an idle session holds, so it is kept small: with 10,000 idle
/// connections every KiB here is 10 MiB.
const COMMAND_READ_CHUNK: usize = 512;
/// Longest time to spend closing a connection (TLS close_notify, FIN).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A line of the SASL exchange, or why there is none.
pub(super) enum SaslLine {
    Line(Bytes),
    TooLong,
    Bad,
}

/// The time a DATA/BDAT transfer may still take (Postfix `smtpd_min_data_rate` scheme):
/// each read spends the time it waited and earns `bytes / rate` seconds, never more than
/// `cap` in total. With rate 0 every read simply gets `cap`.
pub(super) struct DataBudget {
    remaining: Duration,
    cap: Duration,
    rate: u64,
}

impl DataBudget {
    pub(super) fn new(first: Duration, cap: Duration, rate: u64) -> Self {
        Self {
            remaining: first,
            cap,
            rate,
        }
    }

    fn spend(&mut self, waited: Duration, bytes: usize) {
        if self.rate == 0 {
            self.remaining = self.cap;
            return;
        }
        let earned = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.remaining = (self.remaining.saturating_sub(waited) + earned).min(self.cap);
    }
}

/// What a read is for: decides the buffer space requested and whether a shutdown ends the
/// wait at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFor {
    /// A command between transactions, or a SASL response: shutdown ends the wait.
    IdleCommand,
    /// A command inside a mail transaction: shutdown lets it finish (until the drain deadline).
    Command,
    /// Message data (DATA, BDAT), inside a transaction.
    Data,
}

/// What ended a wait for input.
enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Shutdown,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Queues a reply (sent at the next flush).
    pub(super) fn reply(&mut self, reply: Reply) {
        self.ctx.metrics.reply(&self.conn.listener.name, reply.code);
        if reply.code >= 400 {
            tracing::debug!(code = reply.code, text = %reply.text(), "refused");
        }
        // A closing 421 always names its reason code (`4.4.2` timeout, `4.3.0` shutdown,
        // `4.7.0` limits), even before EHLO: it is the last thing the client hears and
        // operators grep logs for it.
        let enhanced = self.esmtp() || reply.code == 421;
        reply.write_to(&mut self.wbuf, enhanced);
    }

    /// Queues a 5xx answer to a failed command and counts it; past `maxErrorsPerSession` the
    /// session is closed with `421 4.7.0`.
    pub(super) fn error_reply(&mut self, reply: Reply) -> Result<(), End> {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.ctx.config.max_errors_per_session {
            tracing::info!(errors = self.errors, "too many errors; closing");
            self.reply(Reply::too_many_errors());
            return Err(End::Closed);
        }
        Ok(())
    }

    /// Counts a command that does not move a transaction forward (before it is answered);
    /// past `maxJunkCommands` since the last accepted message the session is closed with
    /// `421 4.7.0` instead of the answer.
    pub(super) fn junk_command(&mut self) -> Result<(), End> {
        self.junk += 1;
        if self.junk > self.ctx.config.max_junk_commands {
            tracing::info!(junk = self.junk, "too many junk commands; closing");
            self.reply(Reply::new(
                421,
                EnhancedCode(4, 7, 0),
                format!(
                    "{} Too many commands without a message, closing connection",
                    self.ctx.config.hostname
                ),
            ));
            return Err(End::Closed);
        }
        Ok(())
    }

    /// Writes queued replies.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // A client that never reads must not hold the session forever.
        let limit = self.ctx.config.timeouts.command.0;
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => Err(End::Closed),
        }
    }

    /// Closes the stream after the last reply.
    pub(super) async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
    }

    /// Reads the next command line. `None`: the line was invalid (too long, bare CR/LF) and
    /// has been answered; read the next one.
    pub(super) async fn read_command(&mut self) -> Result<Option<Bytes>, End> {
        let timeouts = &self.ctx.config.timeouts;
        let limit = if self.commands_seen {
            timeouts.command.0
        } else {
            timeouts.greeting.0
        };
        let deadline = Instant::now() + limit;
        loop {
            if self.ctx.shutdown.is_stopping() && self.tx.is_none() {
                self.reply(Reply::shutting_down());
                return Err(End::Closed);
            }
            // Any command is read with the AUTH limit; the per-verb limit is applied after
            // parsing, so one long line costs at most MAX_AUTH_LINE of memory.
            if let Some(event) = self.lines.next_line(&mut self.rbuf, MAX_AUTH_LINE) {
                self.commands_seen = true;
                return match event {
                    LineEvent::Line(line) => Ok(Some(line)),
                    LineEvent::TooLong => {
                        self.error_reply(Reply::line_too_long())?;
                        Ok(None)
                    }
                    LineEvent::BareLf | LineEvent::BareCr => {
                        self.error_reply(Reply::bare_line_ending())?;
                        Ok(None)
                    }
                };
            }
            let purpose = if self.tx.is_none() {
                ReadFor::IdleCommand
            } else {
                ReadFor::Command
            };
            self.fill(deadline, purpose).await?;
        }
    }

    /// Reads one line of a SASL exchange (a response to `334`).
    pub(super) async fn read_sasl_line(&mut self) -> Result<SaslLine, End> {
        let deadline = Instant::now() + self.ctx.config.timeouts.command.0;
        loop {
            if let Some(event) = self.lines.next_line(&mut self.rbuf, MAX_AUTH_LINE) {
                return Ok(match event {
                    LineEvent::Line(line) => SaslLine::Line(line),
                    LineEvent::TooLong => SaslLine::TooLong,
                    LineEvent::BareLf | LineEvent::BareCr => SaslLine::Bad,
                });
            }
            self.fill(deadline, ReadFor::IdleCommand).await?;
        }
    }

    /// Reads more message bytes under the data-rate budget.
    pub(super) async fn fill_data(&mut self, budget: &mut DataBudget) -> Result<usize, End> {
        let started = Instant::now();
        let n = self.fill(started + budget.remaining, ReadFor::Data).await?;
        budget.spend(started.elapsed(), n);
        Ok(n)
    }

    /// A budget for one DATA or BDAT transfer.
    pub(super) fn data_budget(&self, first_wait: Duration) -> DataBudget {
        let config = &self.ctx.config;
        DataBudget::new(
            first_wait,
            config.timeouts.data_block.0,
            config.min_data_rate,
        )
    }

    /// Gives back the buffers a finished exchange made grow, before a session waits for its
    /// next command with nothing buffered: a message transfer leaves a 16 KiB read buffer and
    /// an EHLO reply a few hundred bytes of write buffer, and an idle session should hold
    /// neither (memory per idle connection). Both are allocated again on demand.
    pub(super) fn release_buffers(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() {
            self.wbuf = Vec::new();
        }
    }

    /// Flushes replies, then reads more bytes into the buffer. On the deadline the client gets
    /// `421 4.4.2`; on shutdown `421 4.3.0` (between transactions already on the first signal,
    /// else only when the drain deadline aborts open sessions).
    async fn fill(&mut self, deadline: Instant, purpose: ReadFor) -> Result<usize, End> {
        self.flush().await?;
        let chunk = match purpose {
            ReadFor::Data => DATA_READ_CHUNK,
            ReadFor::IdleCommand | ReadFor::Command => {
                self.release_buffers();
                COMMAND_READ_CHUNK
            }
        };
        self.rbuf.reserve(chunk);
        let idle = purpose == ReadFor::IdleCommand;
        let stop = self.ctx.shutdown.stop_token().clone();
        let abort = self.ctx.shutdown.abort_token().clone();
        let wake = tokio::select! {
            biased;
            _ = abort.cancelled() => Wake::Shutdown,
            _ = stop.cancelled(), if idle => Wake::Shutdown,
            _ = tokio::time::sleep_until(deadline) => Wake::Timeout,
            r = self.stream.read_buf(&mut self.rbuf) => Wake::Read(r),
        };
        match wake {
            Wake::Read(Ok(0)) => Err(End::PeerClosed),
            Wake::Read(Ok(n)) => Ok(n),
            Wake::Read(Err(e)) => Err(End::Io(e)),
            Wake::Timeout => {
                tracing::info!("timeout waiting for the client");
                self.reply(Reply::timeout());
                Err(End::Closed)
            }
            Wake::Shutdown => {
                self.reply(Reply::shutting_down());
                Err(End::Closed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_earns_time_for_bytes_and_is_capped() {
        let cap = Duration::from_secs(10);
        let mut b = DataBudget::new(Duration::from_secs(5), cap, 100);
        b.spend(Duration::from_secs(2), 100);
        assert_eq!(b.remaining, Duration::from_secs(4));
        b.spend(Duration::ZERO, 1_000_000);
        assert_eq!(b.remaining, cap);
        // A trickle of 10 B/s against 100 B/s: each second costs 0.9 s of budget.
        let mut b = DataBudget::new(cap, cap, 100);
        for _ in 0..5 {
            b.spend(Duration::from_secs(1), 10);
        }
        assert!(b.remaining < Duration::from_secs(6));
        let mut b = DataBudget::new(Duration::from_secs(1), cap, 0);
        b.spend(Duration::from_secs(1), 0);
        assert_eq!(b.remaining, cap);
    }
}
