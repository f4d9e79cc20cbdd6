//! [`Stamp`]: the head of every stored entry, which says whose it is and how long it serves.
//!
//! The parker writes each entry as an ASCII head and the encoded value:
//!
//! ```text
//! TP2 <fence> <fresh until> <keep until> <stale until> <error until> <stored at> <took ms> <V|P>\n<value bytes>
//! ```
//!
//! Times are microseconds since the Unix epoch. The head is text so that a backend's server-side
//! scripts (Redis Lua) can read the freshness and the writer's fence without decoding the value.

use bytes::Bytes;

use crate::clock::Micros;

const TAG: &str = "TP2";

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryKind {
    /// A value, served while fresh.
    Value,
    /// A mark that the key's responses cannot be shared: while it is fresh, callers run the work
    /// themselves instead of waiting for a leader (hit-for-pass).
    Pass,
}

/// The head of a stored entry: who wrote it and until when it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The fence of the lease that wrote it.
    pub fence: u64,
    /// Until when it is fresh (microseconds since the Unix epoch).
    pub fresh_until: Micros,
    /// Until when it is kept at all (for revalidation and stale serving), at least `fresh_until`.
    pub keep_until: Micros,
    /// Until when it may be served stale while one refresh runs (stale-while-revalidate).
    pub stale_until: Micros,
    /// Until when it may be served in place of a run that failed (stale-if-error).
    pub error_until: Micros,
    /// When it was stored.
    pub stored_at: Micros,
    /// How long the run that produced it took, in milliseconds.
    pub took_ms: u64,
    /// What it holds.
    pub kind: EntryKind,
}

impl Stamp {
    /// Whether the entry is fresh at `now`.
    pub fn is_fresh(&self, now: Micros) -> bool {
        self.fresh_until > now
    }

    /// Whether the entry, no longer fresh, may still be served while one refresh runs.
    pub fn serves_stale(&self, now: Micros) -> bool {
        self.kind == EntryKind::Value && self.stale_until > now
    }

    /// Whether the entry may be served in place of a run that failed at `now`.
    pub fn serves_on_error(&self, now: Micros) -> bool {
        self.kind == EntryKind::Value && self.error_until > now
    }

    /// The entry: this head followed by `value`.
    pub fn seal(&self, value: &[u8]) -> Bytes {
        let kind = match self.kind {
            EntryKind::Value => 'V',
            EntryKind::Pass => 'P',
        };
        let head = format!(
            "{TAG} {} {} {} {} {} {} {} {kind}\n",
            self.fence,
            self.fresh_until,
            self.keep_until,
            self.stale_until,
            self.error_until,
            self.stored_at,
            self.took_ms
        );
        let mut out = Vec::with_capacity(head.len() + value.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(value);
        out.into()
    }

    /// Reads an entry's head and returns it with the value's bytes; `None` for anything that is
    /// not an entry of this format.
    pub fn open(entry: &Bytes) -> Option<(Self, Bytes)> {
        // Read on every hit: one pass over the head's bytes, no allocation.
        let bytes = entry.as_ref();
        let mut at = TAG.len() + 1;
        if bytes.get(..at)? != b"TP2 " {
            return None;
        }
        let mut number = || {
            let start = at;
            let mut value: u64 = 0;
            while let Some(digit) = bytes.get(at).filter(|byte| byte.is_ascii_digit()) {
                value = value
                    .checked_mul(10)?
                    .checked_add(u64::from(digit - b'0'))?;
                at += 1;
            }
            (at > start && bytes.get(at) == Some(&b' ')).then(|| {
                at += 1;
                value
            })
        };
        let (fence, fresh_until, keep_until) = (number()?, number()?, number()?);
        let (stale_until, error_until, stored_at, took_ms) =
            (number()?, number()?, number()?, number()?);
        let kind = match bytes.get(at..at + 2)? {
            b"V\n" => EntryKind::Value,
            b"P\n" => EntryKind::Pass,
            _ => return None,
        };
        let stamp = Self {
            fence,
            fresh_until,
            keep_until,
            stale_until,
            error_until,
            stored_at,
            took_ms,
            kind,
        };
        Some((stamp, entry.slice(at + 2..)))
    }
}

/// The Lua pattern that reads the fence and the fresh-until time of an entry's head.
#[cfg(all(test, feature = "redis"))]
pub(crate) const LUA_HEAD_PATTERN: &str = "^TP2 (%d+) (%d+) ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_entry_opens_to_its_head_and_value() {
        let stamp = Stamp {
            fence: 1_700_000_000_000_001,
            fresh_until: 1_800_000_000_000_000,
            keep_until: 1_800_000_060_000_000,
            stale_until: 1_800_000_030_000_000,
            error_until: 1_800_000_040_000_000,
            stored_at: 1_799_999_990_000_000,
            took_ms: 250,
            kind: EntryKind::Value,
        };
        let entry = stamp.seal(b"body\nwith newline");
        let (opened, value) = Stamp::open(&entry).unwrap();
        assert_eq!(opened, stamp);
        assert_eq!(&value[..], b"body\nwith newline");
        assert!(stamp.is_fresh(stamp.fresh_until - 1));
        assert!(!stamp.is_fresh(stamp.fresh_until));
    }

    #[test]
    fn anything_else_does_not_open() {
        for bad in [
            &b""[..],
            b"TP1 1 2 3 4 5 6 7 V\nx",
            b"TP2 1 2 3 4 5 6 V\nx",
            b"TP2 1 2 3 4 5 6 7 X\nx",
            b"TP2 a 2 3 4 5 6 7 V\nx",
            b"TP2 1 2 3 4 5 6 7 V",
        ] {
            assert!(Stamp::open(&Bytes::from_static(bad)).is_none(), "{bad:?}");
        }
    }
}
