//! A scripted SMTP sink on loopback for delivery tests that need to see what a remote MX
//! sees: how many connections are open at once (the most ever), every accepted message with
//! its arrival time, and answers a test can change while mail flows (`421 4.7.0` throttling
//! for the next N transactions, `451` temporary refusal). Plain SMTP, no extensions but
//! PIPELINING-free EHLO; one thread per connection; every read is bounded by a timeout.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A message the sink accepted.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the MAIL command came.
    pub started: Instant,
    /// When the final dot was answered.
    pub at: Instant,
    pub mail_from: String,
    pub recipients: Vec<String>,
    pub data: String,
}

#[derive(Default)]
struct State {
    open: AtomicUsize,
    max_open: AtomicUsize,
    connections: AtomicUsize,
    /// Transactions still to throttle with `421 4.7.0`.
    throttle: AtomicUsize,
    /// Transactions answered `421` so far.
    throttled: AtomicUsize,
    /// Refuse every MAIL with `451 4.3.0` while set.
    refuse: AtomicBool,
    received: Mutex<Vec<Received>>,
    stop: AtomicBool,
}

/// The running sink; stops when dropped.
pub struct ScriptedSink {
    pub port: u16,
    state: Arc<State>,
    delay: Arc<Mutex<Duration>>,
}

/// How long a connection may stay silent before the sink closes it.
const IDLE: Duration = Duration::from_secs(60);

impl ScriptedSink {
    /// Starts a sink that waits `delay` before answering the final dot (so transactions
    /// overlap).
    pub fn start(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the scripted sink");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(State::default());
        let delay = Arc::new(Mutex::new(delay));
        let (s, d) = (state.clone(), delay.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (s, d) = (s.clone(), d.clone());
                std::thread::spawn(move || serve(stream, &s, &d));
            }
        });
        Self { port, state, delay }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The most connections that were ever open at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Answers the next `n` MAIL commands with `421 4.7.0` and closes those connections.
    pub fn throttle_next(&self, n: usize) {
        self.state.throttle.store(n, Ordering::SeqCst);
    }

    /// MAIL commands answered `421` so far.
    pub fn throttled(&self) -> usize {
        self.state.throttled.load(Ordering::SeqCst)
    }

    /// Refuses (`451 4.3.0`) or accepts every MAIL from now on.
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Every message accepted so far.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many accepted messages contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.data.contains(needle))
            .count()
    }
}

impl Drop for ScriptedSink {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200));
    }
}

struct Open<'a>(&'a State);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream, state: &State, delay: &Mutex<Duration>) {
    let now = state.open.fetch_add(1, Ordering::SeqCst) + 1;
    let _open = Open(state);
    state.connections.fetch_add(1, Ordering::SeqCst);
    state.max_open.fetch_max(now, Ordering::SeqCst);
    let _ = stream.set_read_timeout(Some(IDLE));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(stream);
    let mut say = |text: &str| out.write_all(format!("{text}\r\n").as_bytes()).is_ok();
    if !say("220 sink.test ESMTP scripted") {
        return;
    }
    let mut mail_from = String::new();
    let mut started = Instant::now();
    let mut recipients = Vec::new();
    loop {
        let mut line = String::new();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let command = line.trim_end().to_owned();
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let ok = match verb.as_str() {
            "EHLO" => say("250-sink.test\r\n250 8BITMIME"),
            "HELO" => say("250 sink.test"),
            "MAIL" => {
                if state
                    .throttle
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    state.throttled.fetch_add(1, Ordering::SeqCst);
                    let _ = say("421 4.7.0 Too many messages, slow down");
                    let _ = lines.get_ref().shutdown(Shutdown::Both);
                    return;
                }
                if state.refuse.load(Ordering::SeqCst) {
                    say("451 4.3.0 Try again later")
                } else {
                    mail_from = command.clone();
                    started = Instant::now();
                    recipients.clear();
                    say("250 2.1.0 Ok")
                }
            }
            "RCPT" => {
                recipients.push(command.clone());
                say("250 2.1.5 Ok")
            }
            "DATA" => {
                if !say("354 End data with <CR><LF>.<CR><LF>") {
                    return;
                }
                let mut data = String::new();
                loop {
                    let mut l = String::new();
                    match lines.read_line(&mut l) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if l == ".\r\n" {
                        break;
                    }
                    data.push_str(&l);
                }
                let wait = *delay.lock().unwrap_or_else(|e| e.into_inner());
                std::thread::sleep(wait);
                state
                    .received
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Received {
                        started,
                        at: Instant::now(),
                        mail_from: std::mem::take(&mut mail_from),
                        recipients: std::mem::take(&mut recipients),
                        data,
                    });
                say("250 2.0.0 Ok: queued")
            }
            "RSET" => {
                mail_from.clear();
                recipients.clear();
                say("250 2.0.0 Ok")
            }
            "NOOP" => say("250 2.0.0 Ok"),
            "QUIT" => {
                let _ = say("221 2.0.0 Bye");
                return;
            }
            _ => say("502 5.5.2 Command not recognized"),
        };
        if !ok {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn talk(addr: SocketAddr, lines: &[&str]) -> Vec<String> {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut out = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        let mut replies = Vec::new();
        let read = |r: &mut BufReader<TcpStream>| {
            let mut all = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).unwrap_or(0) == 0 {
                    break;
                }
                all.push_str(&l);
                if l.len() < 4 || l.as_bytes()[3] == b' ' {
                    break;
                }
            }
            all
        };
        replies.push(read(&mut r));
        for line in lines {
            out.write_all(format!("{line}\r\n").as_bytes())
                .expect("write");
            if *line != "." && line.starts_with("Subject") {
                continue;
            }
            replies.push(read(&mut r));
        }
        replies
    }

    #[test]
    fn accepts_counts_and_throttles() {
        let sink = ScriptedSink::start(Duration::ZERO);
        let r = talk(
            sink.addr(),
            &[
                "EHLO t",
                "MAIL FROM:<a@x>",
                "RCPT TO:<b@y>",
                "DATA",
                "Subject: hi",
                ".",
                "QUIT",
            ],
        );
        assert!(r[5].starts_with("250"), "{r:?}");
        assert_eq!(sink.count("Subject: hi"), 1);
        sink.throttle_next(1);
        let r = talk(sink.addr(), &["EHLO t", "MAIL FROM:<a@x>"]);
        assert!(r[2].starts_with("421 4.7.0"), "{r:?}");
        assert_eq!(sink.throttled(), 1);
        sink.refuse(true);
        let r = talk(sink.addr(), &["EHLO t", "MAIL FROM:<a@x>", "QUIT"]);
        assert!(r[2].starts_with("451"), "{r:?}");
        assert!(sink.max_concurrent() >= 1);
    }
}
