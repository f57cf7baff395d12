//! Knot DNS as the tests' authoritative server: its zone files and configuration, and the
//! check that it serves every zone. Starting and stopping the process is the harness's.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// What [`prepare`] wrote: the configuration to start knotd with, and the zones it serves.
pub struct Prepared {
    config_template: String,
    origins: Vec<String>,
}

/// Writes, below `dir`, one zone file per `(origin, records)` (records relative to the
/// origin; SOA and NS are added) plus the parent zone `test.`, always served: resolvers walk
/// up the tree (DMARC asks for `_dmarc.test`), and an authoritative server refuses names
/// outside its zones, which would turn every DMARC result into a temporary error.
///
/// # Panics
/// When the files cannot be written.
pub fn prepare(dir: &Path, zones: &[(&str, String)]) -> Prepared {
    std::fs::create_dir_all(dir.join("zones")).expect("zones dir");
    std::fs::create_dir_all(dir.join("db")).expect("db dir");
    let mut config_template = format!(
        "server:\n  listen: 127.0.0.1@PORT\n  rundir: {d}\ndatabase:\n  storage: {d}/db\n\
         template:\n  - id: default\n    storage: {d}/zones\n    file: \"%s.zone\"\n    \
         zonefile-sync: -1\n    journal-content: none\nlog:\n  - target: stderr\n    any: warning\nzone:\n",
        d = dir.display()
    );
    let parent = [("test", String::new())];
    let mut origins = Vec::new();
    for (origin, records) in parent
        .iter()
        .chain(zones.iter().filter(|(o, _)| *o != "test"))
    {
        let text = format!(
            "$ORIGIN {origin}.\n$TTL 5\n@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 5\n\
             @ IN NS ns.{origin}.\nns IN A 127.0.0.1\n{records}\n"
        );
        std::fs::write(dir.join(format!("zones/{origin}.zone")), text).expect("zone file");
        config_template.push_str(&format!("  - domain: {origin}\n"));
        origins.push((*origin).to_owned());
    }
    Prepared {
        config_template,
        origins,
    }
}

impl Prepared {
    /// The knot.conf text for a server on 127.0.0.1:`port`.
    pub fn config(&self, port: u16) -> String {
        self.config_template.replace("PORT", &port.to_string())
    }

    /// Whether the server on `port` answers for every zone (listening does not mean the
    /// zones are loaded).
    pub fn serves_all(&self, port: u16) -> bool {
        self.origins.iter().all(|origin| query_soa(port, origin))
    }
}

/// Whether the server on 127.0.0.1:`port` answers an SOA query for `zone` (over TCP, a
/// minimal DNS message) with RCODE 0 and at least one answer.
pub fn query_soa(port: u16, zone: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in zone.split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 6, 0, 1]);
    let mut msg = u16::try_from(q.len()).unwrap_or(0).to_be_bytes().to_vec();
    msg.extend(q);
    if s.write_all(&msg).is_err() {
        return false;
    }
    let mut reply = [0u8; 512];
    let n = s.read(&mut reply).unwrap_or(0);
    // After the 2-byte length: flags at 4..6 (RCODE in the low bits), ANCOUNT at 8..10.
    n > 12 && reply[5] & 0x0f == 0 && u16::from_be_bytes([reply[8], reply[9]]) > 0
}
