//! Sizes as people write them (`500M`, `20G`, `1.5T`): the server's quotas and netcp's
//! `--bwlimit`, one parser for both.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A size in bytes, written with binary units: `500M`, `20G`, `1.5T`, or plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Why a size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?} (write e.g. 500M, 20G, 1.5T or a number of bytes)")]
pub struct ByteSizeError(String);

const UNITS: [(char, u32); 6] = [('K', 10), ('M', 20), ('G', 30), ('T', 40), ('P', 50), ('E', 60)];

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// A short form for people, rounded to one decimal (`1.2G`); not for round trips.
    pub fn human(self) -> String {
        let Some(&(unit, shift)) = UNITS.iter().rev().find(|(_, s)| self.0 >> s > 0) else {
            return self.0.to_string();
        };
        let v = self.0 as f64 / (1u64 << shift) as f64;
        if v >= 100.0 {
            format!("{v:.0}{unit}")
        } else {
            format!("{v:.1}{unit}")
        }
    }
}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<ByteSize, ByteSizeError> {
        let err = || ByteSizeError(s.to_string());
        let t = s.trim();
        // Optional suffixes: B, iB (20G, 20GB, 20GiB all mean 20 * 2^30).
        let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
        let t = t.strip_suffix('i').unwrap_or(t);
        let (number, shift) = match t.chars().last() {
            Some(c) if c.is_ascii_alphabetic() => {
                let c = c.to_ascii_uppercase();
                let &(_, shift) = UNITS.iter().find(|(u, _)| *u == c).ok_or_else(err)?;
                (&t[..t.len() - 1], shift)
            }
            _ => (t, 0),
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        if frac.len() > 9 || (shift == 0 && !frac.is_empty()) {
            return Err(err());
        }
        let int: u128 = int.parse().map_err(|_| err())?;
        let frac_value: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| err())? };
        let unit = 1u128 << shift;
        let bytes = int.checked_mul(unit).ok_or_else(err)? + frac_value * unit / 10u128.pow(frac.len() as u32);
        u64::try_from(bytes).map(ByteSize).map_err(|_| err())
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact form: `10G`, `1.5T`, or plain bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &(unit, shift) in UNITS.iter().rev() {
            let u = 1u64 << shift;
            if self.0 >= u && self.0 % u == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
            // One decimal when exact (1.5T), as people write it.
            if self.0 >= u && (self.0 as u128 * 10) % u as u128 == 0 {
                let tenths = self.0 as u128 * 10 / u as u128;
                return write!(f, "{}.{}{unit}", tenths / 10, tenths % 10);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_size_parses() {
        for (s, n) in [
            ("0", 0u64),
            ("4096", 4096),
            ("1K", 1024),
            ("500M", 500 << 20),
            ("20G", 20 << 30),
            ("20g", 20 << 30),
            ("20GiB", 20 << 30),
            ("20GB", 20 << 30),
            ("1.5T", 3 << 39),
            ("0.5K", 512),
            (" 10G ", 10 << 30),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        for bad in ["", "G", "1.5", "-1G", "1X", "1..5G", "99999999999E", "1 G G", "abc"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn byte_size_prints_and_round_trips() {
        for (n, s) in
            [(0u64, "0"), (1000, "1000"), (1024, "1K"), (500 << 20, "500M"), (3 << 39, "1.5T"), (1536, "1.5K")]
        {
            assert_eq!(ByteSize(n).to_string(), s);
        }
        for n in [0u64, 1, 1023, 1025, 10 << 30, (10 << 30) + 1, 3 << 39, u64::MAX] {
            let s = ByteSize(n).to_string();
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        assert_eq!(ByteSize(1288490189).human(), "1.2G");
    }
}
