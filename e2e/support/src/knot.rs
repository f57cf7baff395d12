//! Knot DNS as the tests' authoritative server: its zone files and configuration, and the
//! check that it serves every zone. Starting and stopping the process is the harness's.
//!
//! [`prepare_signed`] also signs zones for DNSSEC tests, offline with Knot's own `kzonesign`
//! and `keymgr` (Debian package knot-dnssecutils): `test.` is signed and holds the DS records
//! of its signed children, so a validator that trusts `test.`'s key ([`Signed::trust_anchor`])
//! sees a chain of trust; knotd then serves the signed files as they are. Besides correctly
//! signed and unsigned (insecure) zones it makes the three ways a chain breaks (bogus).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

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
        std::fs::write(
            dir.join(format!("zones/{origin}.zone")),
            zone_text(origin, records),
        )
        .expect("zone file");
        config_template.push_str(&format!("  - domain: {origin}\n"));
        origins.push((*origin).to_owned());
    }
    Prepared {
        config_template,
        origins,
    }
}

/// A zone file: SOA, NS and the name server's address, then `records`.
fn zone_text(origin: &str, records: &str) -> String {
    format!(
        "$ORIGIN {origin}.\n$TTL 5\n@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 5\n\
         @ IN NS ns.{origin}.\nns IN A 127.0.0.1\n{records}\n"
    )
}

/// How [`prepare_signed`] signs a zone below `test.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dnssec {
    /// Not signed, delegated from `test.` without DS: insecure.
    Unsigned,
    /// Signed, its DS in `test.`: secure.
    Signed,
    /// Signed as of 30 days ago, so every signature has expired (14-day lifetime): bogus.
    Expired,
    /// Signed, then re-signed with a new key while `test.` keeps the first key's DS, as an
    /// attacker without the zone's key would have to: bogus.
    Resigned,
    /// Signed, with a DS in `test.` whose digest matches no DNSKEY of the zone: bogus.
    WrongDs,
}

/// What [`prepare_signed`] wrote.
pub struct Signed {
    pub prepared: Prepared,
    /// The DNSKEY of `test.` (zone-file syntax, class included), for the validator's trust
    /// anchor file.
    pub trust_anchor: String,
}

/// Like [`prepare`], with DNSSEC: every zone below `test.` signed as its [`Dnssec`] says and
/// delegated from a signed `test.` (with the DS records of the signed ones).
///
/// # Panics
/// When the files cannot be written or `kzonesign`/`keymgr` fail (they are missing without the
/// Debian package knot-dnssecutils).
pub fn prepare_signed(dir: &Path, zones: &[(&str, String, Dnssec)]) -> Signed {
    for d in ["zones", "signed", "kasp", "db"] {
        std::fs::create_dir_all(dir.join(d)).expect("knot dir");
    }
    let children: Vec<&(&str, String, Dnssec)> =
        zones.iter().filter(|(o, _, _)| *o != "test").collect();
    // One key per zone (a CSK, RFC 6781 3.1.1's single-type signing), ECDSA P-256, NSEC.
    let mut sign_conf = format!(
        "database:\n  kasp-db: {d}/kasp\npolicy:\n  - id: test\n    algorithm: ecdsap256sha256\n    \
         single-type-signing: on\n    nsec3: off\ntemplate:\n  - id: default\n    storage: {d}/zones\n    \
         file: \"%s.zone\"\n    dnssec-signing: on\n    dnssec-policy: test\nzone:\n  - domain: test\n",
        d = dir.display()
    );
    for (origin, _, _) in &children {
        sign_conf.push_str(&format!("  - domain: {origin}\n"));
    }
    let sign_conf_path = dir.join("sign.conf");
    std::fs::write(&sign_conf_path, sign_conf).expect("sign.conf");
    let tool = |name: &str, args: &[&str]| -> String {
        let out = Command::new(find_tool(name))
            .arg("-c")
            .arg(&sign_conf_path)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let signed_dir = dir.join("signed").display().to_string();
    let sign = |origin: &str, at: Option<SystemTime>| {
        let mut args = vec!["-o".to_owned(), signed_dir.clone()];
        if let Some(at) = at {
            let secs = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            args.extend(["-t".to_owned(), secs.to_string()]);
        }
        args.push(origin.to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool("kzonesign", &args);
    };
    // The SHA-256 DS record of a zone's current key.
    let ds = |origin: &str| -> String {
        tool("keymgr", &[origin, "ds"])
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("2"))
            .unwrap_or_else(|| panic!("no SHA-256 DS for {origin}"))
            .to_owned()
    };

    let mut parent_records = String::new();
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for (origin, records, dnssec) in &children {
        std::fs::write(
            dir.join(format!("zones/{origin}.zone")),
            zone_text(origin, records),
        )
        .expect("zone file");
        let label = origin
            .strip_suffix(".test")
            .unwrap_or_else(|| panic!("{origin}: signed test zones must be children of test."));
        parent_records.push_str(&format!("{label} IN NS ns.test.\n"));
        let signed_file = dir.join(format!("signed/{origin}.zone"));
        let parent_ds = match dnssec {
            Dnssec::Unsigned => {
                files.push((
                    (*origin).to_owned(),
                    dir.join(format!("zones/{origin}.zone")),
                ));
                continue;
            }
            Dnssec::Signed => {
                sign(origin, None);
                ds(origin)
            }
            Dnssec::Expired => {
                sign(
                    origin,
                    Some(SystemTime::now() - Duration::from_secs(30 * 86_400)),
                );
                ds(origin)
            }
            Dnssec::Resigned => {
                sign(origin, None);
                let first = ds(origin);
                for line in tool("keymgr", &[origin, "list"]).lines() {
                    if let Some(id) = line.split_whitespace().next() {
                        tool("keymgr", &[origin, "delete", id]);
                    }
                }
                sign(origin, None);
                assert_ne!(
                    first,
                    ds(origin),
                    "{origin} was re-signed with the same key"
                );
                first
            }
            Dnssec::WrongDs => {
                sign(origin, None);
                let right = ds(origin);
                let (head, digest) = right.rsplit_once(' ').expect("DS digest");
                // Every hex digit changed: a digest of no key at all.
                let wrong: String = digest
                    .chars()
                    .map(|c| if c == '0' { '1' } else { '0' })
                    .collect();
                format!("{head} {wrong}")
            }
        };
        parent_records.push_str(&parent_ds);
        parent_records.push('\n');
        files.push(((*origin).to_owned(), signed_file));
    }
    std::fs::write(
        dir.join("zones/test.zone"),
        zone_text("test", &parent_records),
    )
    .expect("test zone");
    sign("test", None);
    files.insert(0, ("test".to_owned(), dir.join("signed/test.zone")));
    let dnskey = tool("keymgr", &["test", "dnskey"]);
    let trust_anchor = dnskey
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (name, kind) = (parts.next()?, parts.next()?);
            (kind == "DNSKEY").then(|| {
                format!(
                    "{name} 3600 IN DNSKEY {}\n",
                    parts.collect::<Vec<_>>().join(" ")
                )
            })
        })
        .collect::<String>();
    assert!(!trust_anchor.is_empty(), "no DNSKEY of test.: {dnskey}");

    // knotd serves the files as they are (no signing of its own).
    let mut config_template = format!(
        "server:\n  listen: 127.0.0.1@PORT\n  rundir: {d}\ndatabase:\n  storage: {d}/db\n\
         template:\n  - id: default\n    zonefile-sync: -1\n    journal-content: none\n\
         log:\n  - target: stderr\n    any: warning\nzone:\n",
        d = dir.display()
    );
    let mut origins = Vec::new();
    for (origin, file) in files {
        config_template.push_str(&format!(
            "  - domain: {origin}\n    file: {}\n",
            file.display()
        ));
        origins.push(origin);
    }
    Signed {
        prepared: Prepared {
            config_template,
            origins,
        },
        trust_anchor,
    }
}

/// `name` from PATH or the directories Debian installs Knot's tools in.
fn find_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is missing: DNSSEC tests need Knot's tools (Debian package knot-dnssecutils)")
        })
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
