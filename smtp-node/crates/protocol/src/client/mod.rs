//! The client side of the wire format: what an SMTP or LMTP client (the node's delivery
//! client, the operator's relay probe) reads from a server and writes to it. Sans-IO like the
//! server side: the caller owns the socket, the timeouts and the session logic (which command
//! when, what a reply means for a message); this module owns the syntax.
//!
//! * [`mod@reply`]: incremental reply parsing with enhanced status codes, bounded in line
//!   length and count;
//! * [`capabilities`]: the extensions announced in an EHLO/LHLO reply;
//! * [`command`]: command encoding, with the server side's parameter types;
//! * [`data`]: DATA encoding (line endings, dot-stuffing, the terminator).

pub mod capabilities;
pub mod command;
pub mod data;
pub mod reply;

pub use capabilities::Capabilities;
pub use command::{ClientCommand, EncodeError};
pub use data::encode_data;
pub use reply::{
    MAX_REPLY_BYTES, MAX_REPLY_LINE, MAX_REPLY_LINES, ReplyError, parse_enhanced, parse_reply,
    status_of,
};
