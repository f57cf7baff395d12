//! Reading what Postfix's `smtp-sink` wrote with `-d <dir>/msg.`: one dump file per completed
//! transaction (the envelope as `X-` lines, then the message). The harnesses that start the
//! sink differ; what it leaves behind is read the same way.

use std::path::Path;

/// The transactions dumped into `dumps` so far (unreadable or vanished files are skipped).
pub fn transactions(dumps: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dumps) {
        for e in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                out.push(text);
            }
        }
    }
    out
}

/// How many of the transactions dumped into `dumps` contain `needle`.
pub fn count(dumps: &Path, needle: &str) -> usize {
    transactions(dumps)
        .iter()
        .filter(|t| t.contains(needle))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_dump_and_counts_matches() {
        let dir = std::env::temp_dir().join(format!("kubemail-sink-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("msg.1"), "X-RCPT: a\r\n\r\nSubject: one\r\n").expect("dump");
        std::fs::write(dir.join("msg.2"), "X-RCPT: b\r\n\r\nSubject: two\r\n").expect("dump");
        assert_eq!(transactions(&dir).len(), 2);
        assert_eq!(count(&dir, "Subject: two"), 1);
        assert_eq!(count(&dir, "X-RCPT"), 2);
        assert!(transactions(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
