//! One client connection as the listeners hand it to a session: its addresses
//! ([`ConnectionInfo`]), the per-node and per-client caps it counts against ([`limits`]), and
//! the stream wrapper that replays bytes read ahead of the session ([`prefixed`]).

pub mod limits;
pub mod prefixed;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::ListenerConfig;

/// The addresses of one connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub session_id: u64,
    /// The client: from the PROXY header when the listener uses it, else the socket peer.
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub listener: Arc<ListenerConfig>,
}
