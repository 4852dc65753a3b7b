//! In-memory key index: for every user key, its changes in revision order. A read at revision R
//! takes, per key, the last change at or before R; a tombstone there means "absent".

use std::collections::BTreeMap;
use std::ops::Bound;

/// A store revision: `main` counts committed write requests, `sub` orders changes within one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Rev {
    pub main: i64,
    pub sub: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub rev: Rev,
    pub tombstone: bool,
}

/// Start and end bounds of a key range, as `BTreeMap::range` takes them.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// Which user keys a request names, decoded from etcd's `key` / `range_end` convention.
#[derive(Debug, Clone, Copy)]
pub enum KeyRange<'a> {
    /// `range_end` empty: exactly `key`.
    Single(&'a [u8]),
    /// `range_end` "\0": every key >= `key`.
    From(&'a [u8]),
    /// `[key, range_end)`.
    Between(&'a [u8], &'a [u8]),
}

impl<'a> KeyRange<'a> {
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::From(key),
            end => KeyRange::Between(key, end),
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match *self {
            KeyRange::Single(s) => s == k,
            KeyRange::From(s) => k >= s,
            KeyRange::Between(s, e) => k >= s && k < e,
        }
    }

    fn bounds(&self) -> Option<KeyBounds<'a>> {
        match *self {
            KeyRange::Single(s) => Some((Bound::Included(s), Bound::Included(s))),
            KeyRange::From(s) => Some((Bound::Included(s), Bound::Unbounded)),
            KeyRange::Between(s, e) if s < e => Some((Bound::Included(s), Bound::Excluded(e))),
            KeyRange::Between(..) => None,
        }
    }
}

#[derive(Default)]
pub struct Index {
    keys: BTreeMap<Vec<u8>, Vec<Change>>,
    /// Number of keys whose latest change is not a tombstone.
    live: usize,
}

fn visible(changes: &[Change], at: i64) -> Option<Rev> {
    let pos = changes.partition_point(|c| c.rev.main <= at);
    let c = changes[..pos].last()?;
    (!c.tombstone).then_some(c.rev)
}

impl Index {
    pub fn get(&self, key: &[u8], at: i64) -> Option<Rev> {
        self.keys.get(key).and_then(|c| visible(c, at))
    }

    /// Keys in `range` visible at `at`, in key order, with the revision holding their value.
    pub fn range(&self, range: KeyRange<'_>, at: i64, mut f: impl FnMut(&[u8], Rev) -> bool) {
        let Some(bounds) = range.bounds() else {
            return;
        };
        for (k, changes) in self.keys.range::<[u8], _>(bounds) {
            if let Some(rev) = visible(changes, at) {
                if !f(k, rev) {
                    return;
                }
            }
        }
    }

    pub fn insert(&mut self, key: &[u8], change: Change) {
        let changes = self.keys.entry(key.to_vec()).or_default();
        let was_live = changes.last().is_some_and(|c| !c.tombstone);
        debug_assert!(changes.last().is_none_or(|c| c.rev < change.rev));
        changes.push(change);
        match (was_live, change.tombstone) {
            (false, false) => self.live += 1,
            (true, true) => self.live -= 1,
            _ => {}
        }
    }

    /// Drops every change at or below `at` that no read at `at` or later can see: all but the
    /// last one per key, and that one too if it is a tombstone. Returns what was dropped.
    pub fn compact(&mut self, at: i64) -> Vec<Rev> {
        let mut dropped = Vec::new();
        self.keys.retain(|_, changes| {
            let pos = changes.partition_point(|c| c.rev.main <= at);
            if pos == 0 {
                return true;
            }
            let keep_last = !changes[pos - 1].tombstone;
            let cut = if keep_last { pos - 1 } else { pos };
            dropped.extend(changes.drain(..cut).map(|c| c.rev));
            !changes.is_empty()
        });
        dropped
    }

    pub fn live_keys(&self) -> usize {
        self.live
    }

    /// Whether `rev` is still a change of `key` (not dropped by compaction).
    pub fn holds(&self, key: &[u8], rev: Rev) -> bool {
        self.keys
            .get(key)
            .is_some_and(|c| c.binary_search_by(|x| x.rev.cmp(&rev)).is_ok())
    }

    /// Every change at or below `at` still indexed: after compacting at `at`, exactly the
    /// revisions that compaction keeps.
    pub fn held_up_to(&self, at: i64) -> std::collections::HashSet<Rev> {
        self.keys
            .values()
            .flat_map(|c| c.iter().take_while(|x| x.rev.main <= at).map(|x| x.rev))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(main: i64) -> Change {
        Change {
            rev: Rev { main, sub: 0 },
            tombstone: false,
        }
    }
    fn del(main: i64) -> Change {
        Change {
            rev: Rev { main, sub: 0 },
            tombstone: true,
        }
    }

    #[test]
    fn reads_see_the_last_change_at_or_before_the_revision() {
        let mut ix = Index::default();
        ix.insert(b"a", put(2));
        ix.insert(b"a", put(4));
        ix.insert(b"a", del(6));
        ix.insert(b"a", put(8));
        assert_eq!(ix.get(b"a", 1), None);
        assert_eq!(ix.get(b"a", 3).unwrap().main, 2);
        assert_eq!(ix.get(b"a", 5).unwrap().main, 4);
        assert_eq!(ix.get(b"a", 7), None);
        assert_eq!(ix.get(b"a", 9).unwrap().main, 8);
        assert_eq!(ix.live_keys(), 1);
    }

    #[test]
    fn compaction_keeps_the_latest_live_change() {
        let mut ix = Index::default();
        ix.insert(b"a", put(2));
        ix.insert(b"a", put(3));
        ix.insert(b"b", put(4));
        ix.insert(b"b", del(5));
        let mut dropped = ix.compact(5);
        dropped.sort();
        let mains: Vec<i64> = dropped.iter().map(|r| r.main).collect();
        assert_eq!(mains, vec![2, 4, 5]);
        assert_eq!(ix.get(b"a", 5).unwrap().main, 3);
        assert_eq!(ix.get(b"b", 5), None);
        assert!(!ix.keys.contains_key(&b"b"[..]));
    }

    #[test]
    fn key_ranges() {
        let mut ix = Index::default();
        for k in [&b"a"[..], b"b", b"c"] {
            ix.insert(k, put(2));
        }
        let collect = |r: KeyRange| {
            let mut out = Vec::new();
            ix.range(r, 10, |k, _| {
                out.push(k.to_vec());
                true
            });
            out
        };
        assert_eq!(collect(KeyRange::new(b"b", b"")), vec![b"b".to_vec()]);
        assert_eq!(collect(KeyRange::new(b"b", b"\0")).len(), 2);
        assert_eq!(collect(KeyRange::new(b"a", b"c")).len(), 2);
        assert!(collect(KeyRange::new(b"c", b"a")).is_empty());
    }
}
