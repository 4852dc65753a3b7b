//! Key ranges as etcd's watch API spells them, and the structure that finds every watcher
//! interested in a key without looking at the others.
//!
//! Single-key watchers sit in a hash map. Range watchers (`[key, end)` and from-key `[key, ∞)`)
//! sit in an interval tree: a treap ordered by `(start, end)` where every node also knows the
//! largest end in its subtree, so a stabbing query skips whole subtrees that end before the key.
//! Watchers on the identical interval share one node (the common case: many clients watching
//! the same prefix), which keeps the tree as small as the number of distinct ranges.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use crate::WatchError;

/// Internal handle of one watcher, unique for the life of a hub (never reused).
pub(crate) type WatcherKey = u64;

/// What a watcher observes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRange {
    /// Exactly one key.
    Single(Vec<u8>),
    /// Every key `k` with `start <= k < end`.
    Range { start: Vec<u8>, end: Vec<u8> },
    /// Every key `k >= start` (etcd's range end `"\0"`).
    FromKey(Vec<u8>),
}

impl KeyRange {
    /// Interprets a watch request's `key` and `range_end` as etcd does: an empty key is the
    /// smallest key `"\0"`, an empty range end watches one key, `"\0"` watches every key from
    /// `key` on, and a range end not after the key is rejected.
    pub fn from_request(key: &[u8], range_end: &[u8]) -> Result<KeyRange, WatchError> {
        let key = if key.is_empty() {
            vec![0]
        } else {
            key.to_vec()
        };
        match range_end {
            [] => Ok(KeyRange::Single(key)),
            [0] => Ok(KeyRange::FromKey(key)),
            end if key.as_slice() >= end => Err(WatchError::EmptyRange),
            end => Ok(KeyRange::Range {
                start: key,
                end: end.to_vec(),
            }),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => k.as_slice() == key,
            KeyRange::Range { start, end } => start.as_slice() <= key && key < end.as_slice(),
            KeyRange::FromKey(start) => start.as_slice() <= key,
        }
    }
}

/// Upper bound of an interval; `Unbounded` sorts after every key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Unbounded,
}

impl End {
    /// Whether a point lies strictly before this end (the interval is half-open).
    fn after(&self, point: &[u8]) -> bool {
        match self {
            End::Key(e) => e.as_slice() > point,
            End::Unbounded => true,
        }
    }
}

struct Node {
    start: Vec<u8>,
    end: End,
    priority: u64,
    /// Largest `end` in this subtree, the pruning bound of stabbing queries.
    max_end: End,
    members: HashSet<WatcherKey>,
    left: Option<Box<Node>>,
    right: Option<Box<Node>>,
}

impl Node {
    fn cmp_key(&self, start: &[u8], end: &End) -> Ordering {
        (self.start.as_slice(), &self.end).cmp(&(start, end))
    }

    fn refresh(&mut self) {
        let mut max = &self.end;
        for child in [&self.left, &self.right].into_iter().flatten() {
            if child.max_end > *max {
                max = &child.max_end;
            }
        }
        if *max != self.max_end {
            self.max_end = max.clone();
        }
    }
}

/// Treap of distinct intervals, each with the set of watchers on it.
#[derive(Default)]
pub(crate) struct IntervalTree {
    root: Option<Box<Node>>,
    rng: u64,
    len: usize,
}

impl IntervalTree {
    /// Number of distinct intervals.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn next_priority(&mut self) -> u64 {
        // xorshift64*: only needs to be cheap and spread; balance does not depend on secrecy.
        if self.rng == 0 {
            self.rng = 0x9E37_79B9_7F4A_7C15;
        }
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn find_mut(&mut self, start: &[u8], end: &End) -> Option<&mut Node> {
        let mut cur = self.root.as_deref_mut();
        while let Some(node) = cur {
            match node.cmp_key(start, end) {
                Ordering::Equal => return Some(node),
                Ordering::Greater => cur = node.left.as_deref_mut(),
                Ordering::Less => cur = node.right.as_deref_mut(),
            }
        }
        None
    }

    fn insert(&mut self, start: &[u8], end: End, member: WatcherKey) {
        if let Some(node) = self.find_mut(start, &end) {
            node.members.insert(member);
            return;
        }
        let node = Box::new(Node {
            start: start.to_vec(),
            max_end: end.clone(),
            end,
            priority: self.next_priority(),
            members: HashSet::from([member]),
            left: None,
            right: None,
        });
        let root = self.root.take();
        self.root = Some(insert_node(root, node));
        self.len += 1;
    }

    /// Removes a watcher; drops the interval once no watcher is left on it.
    fn remove(&mut self, start: &[u8], end: &End, member: WatcherKey) -> bool {
        let Some(node) = self.find_mut(start, end) else {
            return false;
        };
        if !node.members.remove(&member) {
            return false;
        }
        if node.members.is_empty() {
            let root = self.root.take();
            self.root = remove_node(root, start, end);
            self.len -= 1;
        }
        true
    }

    /// Calls `f` for every watcher whose interval contains `point`.
    fn stab(&self, point: &[u8], f: &mut impl FnMut(WatcherKey)) {
        stab_node(self.root.as_deref(), point, f);
    }
}

/// Treap insertion by descending to the node's place and rotating it up by priority.
fn insert_node(root: Option<Box<Node>>, mut node: Box<Node>) -> Box<Node> {
    let Some(mut root) = root else {
        return node;
    };
    if node.priority > root.priority {
        let (l, r) = split(Some(root), &node.start, &node.end);
        node.left = l;
        node.right = r;
        node.refresh();
        return node;
    }
    if node.cmp_key(&root.start, &root.end) == Ordering::Less {
        root.left = Some(insert_node(root.left.take(), node));
    } else {
        root.right = Some(insert_node(root.right.take(), node));
    }
    root.refresh();
    root
}

/// Splits into keys `< (start, end)` and keys `>= (start, end)`.
fn split(
    root: Option<Box<Node>>,
    start: &[u8],
    end: &End,
) -> (Option<Box<Node>>, Option<Box<Node>>) {
    let Some(mut root) = root else {
        return (None, None);
    };
    if root.cmp_key(start, end) == Ordering::Less {
        let (l, r) = split(root.right.take(), start, end);
        root.right = l;
        root.refresh();
        (Some(root), r)
    } else {
        let (l, r) = split(root.left.take(), start, end);
        root.left = r;
        root.refresh();
        (l, Some(root))
    }
}

/// Joins two treaps where every key of `a` is below every key of `b`.
fn merge(a: Option<Box<Node>>, b: Option<Box<Node>>) -> Option<Box<Node>> {
    match (a, b) {
        (None, b) => b,
        (a, None) => a,
        (Some(mut a), Some(mut b)) => {
            if a.priority > b.priority {
                a.right = merge(a.right.take(), Some(b));
                a.refresh();
                Some(a)
            } else {
                b.left = merge(Some(a), b.left.take());
                b.refresh();
                Some(b)
            }
        }
    }
}

fn remove_node(root: Option<Box<Node>>, start: &[u8], end: &End) -> Option<Box<Node>> {
    let mut root = root?;
    match root.cmp_key(start, end) {
        Ordering::Equal => return merge(root.left.take(), root.right.take()),
        Ordering::Greater => root.left = remove_node(root.left.take(), start, end),
        Ordering::Less => root.right = remove_node(root.right.take(), start, end),
    }
    root.refresh();
    Some(root)
}

fn stab_node(node: Option<&Node>, point: &[u8], f: &mut impl FnMut(WatcherKey)) {
    let Some(node) = node else { return };
    if !node.max_end.after(point) {
        // Every interval below ends at or before the point.
        return;
    }
    stab_node(node.left.as_deref(), point, f);
    if node.start.as_slice() > point {
        // This node and its right subtree all start after the point.
        return;
    }
    if node.end.after(point) {
        node.members.iter().copied().for_each(&mut *f);
    }
    stab_node(node.right.as_deref(), point, f);
}

/// A set of watchers indexed by what they watch.
#[derive(Default)]
pub(crate) struct WatcherGroup {
    keys: HashMap<Vec<u8>, HashSet<WatcherKey>>,
    ranges: IntervalTree,
    len: usize,
}

impl WatcherGroup {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn add(&mut self, member: WatcherKey, range: &KeyRange) {
        match range {
            KeyRange::Single(k) => {
                self.keys.entry(k.clone()).or_default().insert(member);
            }
            KeyRange::Range { start, end } => {
                self.ranges.insert(start, End::Key(end.clone()), member)
            }
            KeyRange::FromKey(start) => self.ranges.insert(start, End::Unbounded, member),
        }
        self.len += 1;
    }

    pub(crate) fn remove(&mut self, member: WatcherKey, range: &KeyRange) -> bool {
        let removed = match range {
            KeyRange::Single(k) => match self.keys.get_mut(k) {
                Some(set) => {
                    let removed = set.remove(&member);
                    if set.is_empty() {
                        self.keys.remove(k);
                    }
                    removed
                }
                None => false,
            },
            KeyRange::Range { start, end } => {
                self.ranges.remove(start, &End::Key(end.clone()), member)
            }
            KeyRange::FromKey(start) => self.ranges.remove(start, &End::Unbounded, member),
        };
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` once for every watcher interested in `key`.
    pub(crate) fn for_each_matching(&self, key: &[u8], mut f: impl FnMut(WatcherKey)) {
        if let Some(set) = self.keys.get(key) {
            set.iter().copied().for_each(&mut f);
        }
        self.ranges.stab(key, &mut f);
    }

    /// Number of distinct intervals held by the tree (single keys excluded).
    #[cfg(test)]
    pub(crate) fn distinct_ranges(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching(g: &WatcherGroup, key: &[u8]) -> Vec<WatcherKey> {
        let mut v = Vec::new();
        g.for_each_matching(key, |w| v.push(w));
        v.sort_unstable();
        v
    }

    #[test]
    fn wire_ranges_follow_etcd() {
        assert_eq!(
            KeyRange::from_request(b"", b"").unwrap(),
            KeyRange::Single(vec![0])
        );
        assert_eq!(
            KeyRange::from_request(b"", b"\0").unwrap(),
            KeyRange::FromKey(vec![0])
        );
        assert_eq!(
            KeyRange::from_request(b"a", b"b").unwrap(),
            KeyRange::Range {
                start: b"a".to_vec(),
                end: b"b".to_vec()
            }
        );
        assert!(matches!(
            KeyRange::from_request(b"b", b"a"),
            Err(WatchError::EmptyRange)
        ));
        assert!(matches!(
            KeyRange::from_request(b"a", b"a"),
            Err(WatchError::EmptyRange)
        ));
    }

    #[test]
    fn single_prefix_and_from_key() {
        let mut g = WatcherGroup::default();
        g.add(1, &KeyRange::Single(b"foo".to_vec()));
        g.add(
            2,
            &KeyRange::Range {
                start: b"fo".to_vec(),
                end: b"fp".to_vec(),
            },
        );
        g.add(3, &KeyRange::FromKey(b"g".to_vec()));
        g.add(4, &KeyRange::FromKey(vec![0]));
        assert_eq!(matching(&g, b"foo"), vec![1, 2, 4]);
        assert_eq!(matching(&g, b"fo"), vec![2, 4]);
        assert_eq!(matching(&g, b"fp"), vec![4]);
        assert_eq!(matching(&g, b"zzz"), vec![3, 4]);
        assert_eq!(matching(&g, b"g"), vec![3, 4]);
        assert!(g.remove(4, &KeyRange::FromKey(vec![0])));
        assert!(!g.remove(4, &KeyRange::FromKey(vec![0])));
        assert_eq!(matching(&g, b"a"), Vec::<WatcherKey>::new());
        assert_eq!(g.len(), 3);
    }

    #[test]
    fn identical_intervals_share_a_node() {
        let mut g = WatcherGroup::default();
        let r = KeyRange::Range {
            start: b"/registry/".to_vec(),
            end: b"/registry0".to_vec(),
        };
        for w in 0..100 {
            g.add(w, &r);
        }
        assert_eq!(g.distinct_ranges(), 1);
        assert_eq!(matching(&g, b"/registry/pods/a").len(), 100);
        for w in 0..100 {
            assert!(g.remove(w, &r));
        }
        assert_eq!(g.distinct_ranges(), 0);
        assert_eq!(g.len(), 0);
    }

    /// Random intervals, inserts and removals against a brute-force list.
    #[test]
    fn tree_agrees_with_linear_scan() {
        let mut seed = 0x1234_5678_9abc_def1_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let key = |n: u64| vec![b'a' + (n % 20) as u8, b'a' + ((n / 20) % 5) as u8];
        let mut g = WatcherGroup::default();
        let mut live: Vec<(WatcherKey, KeyRange)> = Vec::new();
        for w in 0..3000u64 {
            if !live.is_empty() && next() % 3 == 0 {
                let i = (next() as usize) % live.len();
                let (m, r) = live.swap_remove(i);
                assert!(g.remove(m, &r));
            } else {
                let a = key(next());
                let b = key(next());
                let r = match next() % 3 {
                    0 => KeyRange::Single(a),
                    1 => KeyRange::FromKey(a),
                    _ if a < b => KeyRange::Range { start: a, end: b },
                    _ => KeyRange::FromKey(b),
                };
                g.add(w, &r);
                live.push((w, r));
            }
            if w % 50 == 0 {
                for probe in 0..100 {
                    let k = key(probe);
                    let mut want: Vec<_> = live
                        .iter()
                        .filter(|(_, r)| r.contains(&k))
                        .map(|(m, _)| *m)
                        .collect();
                    want.sort_unstable();
                    assert_eq!(matching(&g, &k), want, "key {k:?}");
                }
            }
        }
        assert_eq!(g.len(), live.len());
    }
}
