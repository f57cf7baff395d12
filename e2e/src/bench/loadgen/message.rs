//! The messages the load generator sends: RFC 5322 headers (unique Message-ID per message) and
//! a body of 76-character lines padded to the requested size. No body line starts with a dot,
//! so no dot-stuffing is needed, and every line ends in CRLF.

/// Body line length before CRLF; RFC 5322 recommends at most 78.
const LINE: usize = 76;

/// A message shape: size in bytes (headers and body, not counting the final `.CRLF`).
#[derive(Debug, Clone)]
pub struct MessageTemplate {
    size: usize,
    from: String,
    run_id: String,
}

impl MessageTemplate {
    pub fn new(size: usize, from: &str, run_id: &str) -> Self {
        Self {
            size,
            from: from.to_owned(),
            run_id: run_id.to_owned(),
        }
    }

    /// Writes message number `seq` for recipient `to` into `out` (cleared first), ending with
    /// the end-of-data marker `CRLF.CRLF`.
    pub fn render(&self, seq: u64, to: &str, out: &mut Vec<u8>) {
        out.clear();
        let headers = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: kubemail benchmark message {seq}\r\n\
             Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <{run}.{seq}@bench.localhost>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
            from = self.from,
            run = self.run_id,
        );
        out.extend_from_slice(headers.as_bytes());
        // At least one body line, then lines until the size is reached.
        let mut remaining = self.size.saturating_sub(out.len()).max(3);
        let mut n = 0usize;
        while remaining > 0 {
            let len = remaining.clamp(3, LINE + 2) - 2;
            out.extend((0..len).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i + n) % 36]));
            out.extend_from_slice(b"\r\n");
            remaining = remaining.saturating_sub(len + 2);
            n += 1;
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_requested_size_and_clean_lines() {
        let template = MessageTemplate::new(5120, "s@bench.test", "run1");
        let mut out = Vec::new();
        template.render(7, "r7@bench.test", &mut out);
        assert_eq!(out.len(), 5120 + 3);
        assert!(out.ends_with(b"\r\n.\r\n"));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains("Message-ID: <run1.7@bench.localhost>"));
        for line in text.split("\r\n") {
            assert!(!line.contains('\n') && !line.contains('\r'));
            assert!(line.len() <= 78);
        }
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert!(!body.starts_with('.') && !body.contains("\r\n.."));
        // Tiny sizes still make a valid message.
        MessageTemplate::new(10, "s@bench.test", "r").render(1, "r@x", &mut out);
        assert!(out.ends_with(b"\r\n.\r\n"));
    }
}
