//! In-memory key index: for every user key, its changes in revision order. A read at revision R
//! takes, per key, the last change at or before R; a tombstone there means "absent".

use std::collections::BTreeMap;
use std::ops::Bound;

use oxcd_proto::mvccpb::KeyValue;

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

/// The changes of one key, and what its latest value's create revision and version are.
/// Those two follow from the changes alone (a put after a tombstone, or as the first change,
/// starts a generation; each further put adds a version), and keeping them here lets a put
/// compute its own without reading the previous value.
#[derive(Default)]
struct KeyHistory {
    changes: Vec<Change>,
    /// Of the latest change; 0 when it is a tombstone.
    create: i64,
    version: i64,
}

/// Create revision and version of a key's live value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub create: i64,
    pub version: i64,
}

impl Generation {
    /// The generation a stored value states.
    pub fn of(kv: &KeyValue) -> Self {
        Generation {
            create: kv.create_revision,
            version: kv.version,
        }
    }
}

#[derive(Default)]
pub struct Index {
    keys: BTreeMap<Vec<u8>, KeyHistory>,
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
        self.keys.get(key).and_then(|h| visible(&h.changes, at))
    }

    /// Create revision and version of the key's latest value; None when it has none.
    pub fn latest(&self, key: &[u8]) -> Option<Generation> {
        let h = self.keys.get(key)?;
        (h.version > 0).then_some(Generation {
            create: h.create,
            version: h.version,
        })
    }

    /// Keys in `range` visible at `at`, in key order, with the revision holding their value.
    pub fn range(&self, range: KeyRange<'_>, at: i64, mut f: impl FnMut(&[u8], Rev) -> bool) {
        let Some(bounds) = range.bounds() else {
            return;
        };
        for (k, h) in self.keys.range::<[u8], _>(bounds) {
            if let Some(rev) = visible(&h.changes, at) {
                if !f(k, rev) {
                    return;
                }
            }
        }
    }

    /// Records a change made after every other change of the key.
    pub fn insert(&mut self, key: &[u8], change: Change) {
        let h = self.keys.entry(key.to_vec()).or_default();
        let generation = match (change.tombstone, h.version) {
            (true, _) => None,
            (false, 0) => Some(Generation {
                create: change.rev.main,
                version: 1,
            }),
            (false, v) => Some(Generation {
                create: h.create,
                version: v + 1,
            }),
        };
        Self::push(h, &mut self.live, change, generation);
    }

    /// Records a change read back from the engine, whose value states its generation: older
    /// changes of the key may be compacted away, so counting them would come out short.
    pub fn insert_loaded(&mut self, key: &[u8], change: Change, generation: Option<Generation>) {
        let h = self.keys.entry(key.to_vec()).or_default();
        Self::push(h, &mut self.live, change, generation);
    }

    fn push(h: &mut KeyHistory, live: &mut usize, change: Change, generation: Option<Generation>) {
        let was_live = h.changes.last().is_some_and(|c| !c.tombstone);
        debug_assert!(h.changes.last().is_none_or(|c| c.rev < change.rev));
        debug_assert!(!(change.tombstone && generation.is_some()));
        h.changes.push(change);
        h.create = generation.map_or(0, |g| g.create);
        h.version = generation.map_or(0, |g| g.version);
        match (was_live, change.tombstone) {
            (false, false) => *live += 1,
            (true, true) => *live -= 1,
            _ => {}
        }
    }

    /// Drops every change at or below `at` that no read at `at` or later can see: all but the
    /// last one per key, and that one too if it is a tombstone. Returns what was dropped.
    pub fn compact(&mut self, at: i64) -> Vec<Rev> {
        let mut dropped = Vec::new();
        self.keys.retain(|_, h| {
            let changes = &mut h.changes;
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
            .is_some_and(|h| h.changes.binary_search_by(|x| x.rev.cmp(&rev)).is_ok())
    }

    /// Every change at or below `at` still indexed: after compacting at `at`, exactly the
    /// revisions that compaction keeps.
    pub fn held_up_to(&self, at: i64) -> std::collections::HashSet<Rev> {
        self.keys
            .values()
            .flat_map(|h| {
                h.changes
                    .iter()
                    .take_while(|x| x.rev.main <= at)
                    .map(|x| x.rev)
            })
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
    fn generations_follow_the_changes_and_survive_compaction() {
        let mut ix = Index::default();
        let gen = |create, version| Some(Generation { create, version });
        ix.insert(b"a", put(2));
        assert_eq!(ix.latest(b"a"), gen(2, 1));
        ix.insert(b"a", put(3));
        ix.insert(b"a", put(5));
        assert_eq!(ix.latest(b"a"), gen(2, 3));
        ix.compact(5);
        ix.insert(b"a", put(6));
        assert_eq!(ix.latest(b"a"), gen(2, 4));
        ix.insert(b"a", del(7));
        assert_eq!(ix.latest(b"a"), None);
        ix.insert(b"a", put(8));
        assert_eq!(ix.latest(b"a"), gen(8, 1));
        assert_eq!(ix.latest(b"b"), None);
        // Read back after a restart: the stored values, not a count of what is left.
        let mut loaded = Index::default();
        loaded.insert_loaded(b"a", put(6), gen(2, 4));
        loaded.insert(b"a", put(9));
        assert_eq!(loaded.latest(b"a"), gen(2, 5));
        loaded.insert_loaded(b"b", del(10), None);
        assert_eq!(loaded.latest(b"b"), None);
        assert_eq!(loaded.live_keys(), 1);
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
