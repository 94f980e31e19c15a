//! Human-readable sizes ("64MiB") and durations ("20h") for the config file, so an operator never
//! has to count zeros, and a bad value is rejected while the YAML is read (with its line).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A byte count. Accepts a bare integer (bytes) or a string with a unit: "64MiB", "1.5 GiB",
/// "500MB" (decimal units are decimal, binary are binary — parsing is bytesize's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(format!("{s:?} is negative: sizes are 0 or more"));
        }
        t.parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|_| format!("{s:?} is not a size: use bytes or a unit, e.g. 16MiB, 1GiB"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, n) in [
            ("TiB", Self::GIB * 1024),
            ("GiB", Self::GIB),
            ("MiB", Self::MIB),
            ("KiB", Self::KIB),
        ] {
            if b >= n && b.is_multiple_of(n) {
                return write!(f, "{}{unit}", b / n);
            }
        }
        write!(f, "{b}")
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 16MiB, or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} is negative: sizes are 0 or more")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration: "20h", "90min", "1d 2h" (humantime's syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "{s:?} is not a duration ({e}): use e.g. 20h, 90min"
                ))
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_human_forms() {
        for (text, want) in [
            ("0", Some(0)),
            ("5MiB", Some(5 * Size::MIB)),
            ("64 MiB", Some(64 * Size::MIB)),
            ("1GiB", Some(Size::GIB)),
            ("1KiB", Some(1024)),
            ("500MB", Some(500_000_000)),
            ("-1MiB", None),
            ("lots", None),
            ("", None),
        ] {
            assert_eq!(text.parse::<Size>().ok().map(|s| s.0), want, "{text:?}");
        }
    }

    #[test]
    fn size_display_round_trips() {
        for b in [0, 1, 1024, 5 * Size::MIB, 3 * Size::GIB, 1536] {
            let s = Size(b).to_string();
            assert_eq!(s.parse::<Size>().unwrap(), Size(b), "{s}");
        }
    }
}
