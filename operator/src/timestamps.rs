//! Time as the reconcilers see it: whole Unix seconds, written as RFC 3339 in annotations and
//! status. The pure steps take `now` as an argument (the clock seam); only the driver reads
//! the system clock, through [`now`].

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// Seconds since the Unix epoch.
pub type UnixSeconds = i64;

/// The current time, in whole seconds.
pub fn now() -> UnixSeconds {
    Timestamp::now().as_second()
}

/// RFC 3339 in UTC, e.g. `2026-11-27T23:56:41Z`.
pub fn rfc3339(t: UnixSeconds) -> String {
    Timestamp::from_second(t).map_or_else(|_| t.to_string(), |ts| ts.to_string())
}

/// Parses RFC 3339; `None` when the text is not a timestamp.
pub fn parse_rfc3339(text: &str) -> Option<UnixSeconds> {
    text.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// Parses a duration with units (`90d`, `48h`, `1h30m`), as the CRDs write them.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e}"))
}

/// A duration in whole seconds, saturating.
pub fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339("2026-11-27T23:56:41Z"), Some(1_795_823_801));
        assert_eq!(parse_rfc3339(&rfc3339(1_795_823_801)), Some(1_795_823_801));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    }
}

/// Serde for [`UnixSeconds`] as RFC 3339 text.
pub mod as_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{UnixSeconds, parse_rfc3339, rfc3339};

    pub fn serialize<S: Serializer>(t: &UnixSeconds, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UnixSeconds, D::Error> {
        let text = String::deserialize(d)?;
        parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid timestamp {text:?}")))
    }
}

/// Serde for `Option<UnixSeconds>` as RFC 3339 text.
pub mod as_rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{UnixSeconds, parse_rfc3339, rfc3339};

    pub fn serialize<S: Serializer>(t: &Option<UnixSeconds>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UnixSeconds>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| {
                parse_rfc3339(&text)
                    .ok_or_else(|| serde::de::Error::custom(format!("invalid timestamp {text:?}")))
            })
            .transpose()
    }
}
