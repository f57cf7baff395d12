//! Value formats shared by every section: durations ([`HumanDuration`]: humantime strings such
//! as `"30s"`, `"5m"`, `"1h 30m"`, or integer seconds) and sizes ([`ByteSize`]: integer bytes,
//! or a binary `Ki`/`Mi`/`Gi` or decimal `K`/`M`/`G` suffix, as in Kubernetes quantities).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration written the human way (`"5m"`, `"30s"`) or as integer seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Self(Duration::from_secs(s))),
            Raw::Text(t) => humantime::parse_duration(t.trim())
                .map(Self)
                .map_err(|e| serde::de::Error::custom(format!("invalid duration {t:?}: {e}"))),
        }
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HumanDuration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration: a humantime string such as \"30s\", \"5m\", \"1h 30m\", or integer seconds.",
            "anyOf": [
                { "type": "string" },
                { "type": "integer", "minimum": 0 }
            ]
        })
    }
}

/// A size in bytes, written as an integer or with a suffix (`"25Mi"`, `"512Ki"`, `"1M"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, suffix) = s.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected digits then an optional unit"))?;
        let factor: u64 = match suffix.trim() {
            "" => 1,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use K, M, G, Ki, Mi or Gi)"
                ));
            }
        };
        number
            .checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Self(b)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A size in bytes: an integer, or a string with a unit K, M, G, Ki, Mi or Gi (\"25Mi\").",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]+(K|k|M|G|Ki|Mi|Gi)?$" }
            ]
        })
    }
}
