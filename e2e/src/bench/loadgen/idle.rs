//! Idle connections: open many connections that each get through the greeting and EHLO (and
//! STARTTLS when asked), then hold them without sending anything, so the server's memory per
//! idle connection can be measured. Opening is bounded in count, concurrency and time.

use std::time::{Duration, Instant};

use futures::StreamExt as _;

use super::client::{ConnectSpec, Connection};
use super::{LoadError, check_loopback};

/// How many idle connections to open and how.
#[derive(Clone)]
pub struct IdleSpec {
    pub connect: ConnectSpec,
    /// Connections to open.
    pub count: usize,
    /// Connections being opened at the same time (the server's accept backlog and, for
    /// Postfix, its process spawning are the limits).
    pub concurrency: usize,
    /// Give up opening after this long.
    pub max_duration: Duration,
}

/// Connections held open.
pub struct IdleSet {
    conns: Vec<Connection>,
    /// Connections that could not be opened.
    pub failed: u64,
    pub first_error: Option<String>,
    /// Time it took to open them.
    pub open_secs: f64,
}

impl IdleSet {
    /// Connections currently held.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Sends NOOP on every held connection (a few at a time) and returns how many answered
    /// 250: the server kept them all.
    pub async fn count_alive(&mut self, concurrency: usize) -> u64 {
        let results: Vec<bool> = futures::stream::iter(self.conns.iter_mut())
            .map(|c| async move { c.noop().await.is_ok_and(|r| r.code == 250) })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().filter(|ok| *ok).count() as u64
    }

    /// Closes every connection (QUIT, a few at a time).
    pub async fn close(self, concurrency: usize) {
        futures::stream::iter(self.conns)
            .for_each_concurrent(concurrency.max(1), |c| c.quit())
            .await;
    }
}

/// Opens `spec.count` connections and returns them held open.
pub async fn open(spec: &IdleSpec) -> Result<IdleSet, LoadError> {
    check_loopback(spec.connect.target)?;
    if spec.count == 0 || spec.concurrency == 0 {
        return Err(LoadError::InvalidSpec(
            "idle count and concurrency must be at least 1".to_owned(),
        ));
    }
    let start = Instant::now();
    let deadline = start + spec.max_duration;
    let results: Vec<Result<Connection, String>> = futures::stream::iter(0..spec.count)
        .map(|_| async {
            if Instant::now() >= deadline {
                return Err("time limit for opening reached".to_owned());
            }
            Connection::open(&spec.connect)
                .await
                .map_err(|e| e.to_string())
        })
        .buffer_unordered(spec.concurrency)
        .collect()
        .await;
    let mut set = IdleSet {
        conns: Vec::with_capacity(spec.count),
        failed: 0,
        first_error: None,
        open_secs: start.elapsed().as_secs_f64(),
    };
    for r in results {
        match r {
            Ok(c) => set.conns.push(c),
            Err(e) => {
                set.failed += 1;
                set.first_error.get_or_insert(e);
            }
        }
    }
    Ok(set)
}
