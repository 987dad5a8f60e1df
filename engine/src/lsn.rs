//! The typed log sequence number used everywhere in reshard.
//!
//! A PostgreSQL LSN is a 64-bit byte position in the WAL, printed as two hex halves `X/X`
//! (see <https://www.postgresql.org/docs/current/datatype-pg-lsn.html>). APIs take and return
//! [`Lsn`], never a raw integer; conversion happens only at the wire.

use std::fmt;
use std::str::FromStr;

/// A WAL position. Ordered, copyable, printed as `X/X` (upper-case hex, like PostgreSQL).
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

impl Lsn {
    /// `0/0`, the invalid LSN (`InvalidXLogRecPtr`).
    pub const ZERO: Lsn = Lsn(0);
    /// The largest LSN.
    pub const MAX: Lsn = Lsn(u64::MAX);

    /// From the 64-bit wire value.
    pub const fn from_u64(v: u64) -> Lsn {
        Lsn(v)
    }

    /// The 64-bit wire value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether this is `0/0`.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Bytes from `earlier` to `self` (0 if `earlier` is ahead).
    pub const fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `self + bytes`, saturating.
    pub const fn add_bytes(self, bytes: u64) -> Lsn {
        Lsn(self.0.saturating_add(bytes))
    }

    /// Read as a shard's progress ("every commit whose record starts at or below `self` is
    /// applied"): whether it holds every commit that starts before `end`, an end-of-record or
    /// insert position. A commit record may start exactly at `end`, so `end - 1` is enough and
    /// `end` itself is not needed (see `spill`'s heartbeats).
    pub const fn covers(self, end: Lsn) -> bool {
        self.0.saturating_add(1) >= end.0
    }

    /// The smallest progress that [`covers`](Lsn::covers) `end`: the position of an idle
    /// shard's heartbeat when everything before `end` is durable (`0/0` for `0/0`).
    pub const fn covering(end: Lsn) -> Lsn {
        Lsn(end.0.saturating_sub(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// An LSN that is not of the form `X/X` with 1–8 hex digits on each side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', e.g. 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let bad = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX, 0xFFFF_FFFF, 1 << 32] {
            let l = Lsn::from_u64(v);
            assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
        }
        assert_eq!(Lsn::from_u64(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!(
            "16/b374d848".parse::<Lsn>().unwrap(),
            Lsn::from_u64(0x16_B374_D848)
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "/", "1/", "/1", "x/1", "1/2/3", "123456789/0", "1-2"] {
            assert!(s.parse::<Lsn>().is_err(), "{s}");
        }
    }

    #[test]
    fn progress_covers_every_commit_starting_before_an_end() {
        let end = Lsn::from_u64(100);
        assert_eq!(Lsn::covering(end), Lsn::from_u64(99));
        assert!(Lsn::covering(end).covers(end));
        assert!(!Lsn::from_u64(98).covers(end));
        assert!(end.covers(end));
        assert_eq!(Lsn::covering(Lsn::ZERO), Lsn::ZERO);
        assert!(Lsn::MAX.covers(Lsn::MAX));
    }

    #[test]
    fn orders_like_the_wal() {
        assert!("1/0".parse::<Lsn>().unwrap() > "0/FFFFFFFF".parse::<Lsn>().unwrap());
        assert_eq!(Lsn::from_u64(10).bytes_since(Lsn::from_u64(4)), 6);
        assert_eq!(Lsn::from_u64(4).bytes_since(Lsn::from_u64(10)), 0);
    }
}
