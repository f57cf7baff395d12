//! The queue's time format: RFC 3339 in UTC, with the fraction of a second only when there
//! is one (`2026-11-27T23:59:01Z`, `2026-11-27T23:59:01.25Z`), so a time read back is the
//! time written, to the nanosecond.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Formats a time as RFC 3339 in UTC. A time outside the years 0000-9999 (which RFC 3339
/// cannot express) comes out as Unix seconds, which [`parse_rfc3339`] refuses.
pub fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses an RFC 3339 time (any offset).
pub fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(value.trim(), &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn whole_and_fractional_seconds_read_back_exactly() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch), "1970-01-01T00:00:00Z");
        let t = epoch + Duration::new(1_795_823_941, 250_000_000);
        assert_eq!(rfc3339(t), "2026-11-27T23:59:01.25Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(
            parse_rfc3339("2026-11-28T00:59:01.25+01:00"),
            Some(t),
            "an offset is honoured"
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
