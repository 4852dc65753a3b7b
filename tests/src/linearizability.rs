//! Linearizability checker for histories of puts, gets and compare-and-swaps recorded by
//! concurrent clients, typically while cluster members are killed and restarted.
//!
//! Comparing final states after a fault run misses stale reads, lost acknowledged writes and
//! writes applied twice. What etcd promises is stronger: every request takes effect at one
//! instant between its invocation and its response. A history satisfies that (is
//! *linearizable*) when its ops can be put in one total order that respects real time (an op
//! whose response came before another's invocation goes first) and that, replayed on a
//! sequential model, produces every observed output.
//!
//! The model is one register per key holding `Option<String>` (`None` = absent, the initial
//! state): a put sets it, a get returns it, and `Cas { expected, new }` sets `new` only when the
//! value equals `expected` (`None` meaning "absent", as a txn comparing `create_revision == 0`)
//! and reports whether it did. Linearizability is local (Herlihy & Wing): a history is
//! linearizable iff each key's sub-history is, so keys are checked one at a time, which
//! keeps the exponential part of the search small.
//!
//! The search is Wing & Gong's backtracking over the list of call and return events, with
//! Lowe's memoization of (set of linearized ops, register value): a state reached once and
//! explored never needs exploring again. Unknown ops (below) would make it exponential in
//! their number, since each may or may not have happened; sound reductions keep that in check
//! (a state with fewer unknown ops placed dominates, identical unknown ops go in call order, a
//! put never directly follows an unknown op, values nothing left compares against are merged),
//! and the unit tests hold the search to a brute-force enumeration. It is bounded in time and
//! memory and answers [`CheckResult::Timeout`] rather than hang.
//!
//! Outcomes: an op is either [`Outcome::Ok`] (the client saw the response) or
//! [`Outcome::Unknown`] (timeout or connection error: it may or may not have taken effect).
//! An unknown op responds at +inf: it may take effect at any instant after its invocation, or
//! never, so the search is done once every ok op is placed. An unknown get constrains nothing
//! and is ignored; an unknown CAS that took effect found the expected value. Ops that
//! definitely did not happen (refused before being applied) are left out of the history. A CAS
//! whose comparison failed did happen: it is an ok op with `Output::Cas(false)`, and the checker
//! verifies the value really differed at that point.
//!
//! Times are nanoseconds from one common base. Two ops whose intervals touch (one's response
//! time equals the other's invocation time) count as concurrent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long [`History::check`] may search before answering [`CheckResult::Timeout`].
pub const DEFAULT_CHECK_BUDGET: Duration = Duration::from_secs(30);

/// Memoized search states (two bitsets each) kept per key before giving up: bounds memory.
const MAX_CACHE_ENTRIES: usize = 4_000_000;

/// What a client asked for, on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Put(String),
    Get,
    /// Put `new` if the value is `expected` (`None`: the key is absent).
    Cas {
        expected: Option<String>,
        new: String,
    },
}

/// What the client was told. Must match the [`Input`] variant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    PutOk,
    /// The value read (`None`: absent).
    Get(Option<String>),
    /// Whether the swap happened (a txn's `succeeded`).
    Cas(bool),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Completed at `ret` (nanoseconds, same base as `call`) with `output`.
    Ok { ret: u64, output: Output },
    /// No response (timeout, connection error): may or may not have taken effect, at any
    /// time after `call`.
    Unknown,
}

/// One operation of one client on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    pub client: usize,
    pub key: String,
    /// Invocation time, nanoseconds from the history's base.
    pub call: u64,
    pub input: Input,
    pub outcome: Outcome,
}

impl Op {
    pub fn ok(
        client: usize,
        key: impl Into<String>,
        call: u64,
        ret: u64,
        input: Input,
        output: Output,
    ) -> Op {
        Op {
            client,
            key: key.into(),
            call,
            input,
            outcome: Outcome::Ok { ret, output },
        }
    }

    pub fn unknown(client: usize, key: impl Into<String>, call: u64, input: Input) -> Op {
        Op {
            client,
            key: key.into(),
            call,
            input,
            outcome: Outcome::Unknown,
        }
    }

    /// Response time; `None` (+inf) when unknown.
    pub fn ret(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Ok { ret, .. } => Some(ret),
            Outcome::Unknown => None,
        }
    }

    /// Panics on a malformed op: a harness bug, not a server bug.
    fn validate(&self) {
        if let Outcome::Ok { ret, output } = &self.outcome {
            let matches = matches!(
                (&self.input, output),
                (Input::Put(_), Output::PutOk)
                    | (Input::Get, Output::Get(_))
                    | (Input::Cas { .. }, Output::Cas(_))
            );
            assert!(matches, "output does not match input in {self}");
            assert!(*ret >= self.call, "response before invocation in {self}");
        }
    }
}

/// `Some("x")` as `"x"`, `None` as `absent`.
struct Value<'a>(Option<&'a str>);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => f.write_str("absent"),
        }
    }
}

/// Nanoseconds as milliseconds, exactly.
fn millis(ns: u64) -> String {
    format!("{}.{:06}ms", ns / 1_000_000, ns % 1_000_000)
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} {:?}: ", self.client, self.key)?;
        match &self.input {
            Input::Put(v) => write!(f, "put {v:?}")?,
            Input::Get => f.write_str("get")?,
            Input::Cas { expected, new } => {
                write!(f, "cas {} -> {new:?}", Value(expected.as_deref()))?
            }
        }
        match &self.outcome {
            Outcome::Ok { ret, output } => {
                match output {
                    Output::PutOk => f.write_str(" = ok")?,
                    Output::Get(v) => write!(f, " = {}", Value(v.as_deref()))?,
                    Output::Cas(true) => f.write_str(" = swapped")?,
                    Output::Cas(false) => f.write_str(" = not swapped")?,
                }
                write!(f, " [{}, {}]", millis(self.call), millis(*ret))
            }
            Outcome::Unknown => write!(f, " = unknown [{}, inf)", millis(self.call)),
        }
    }
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    /// The ops on `key` have no valid order; `explanation` shows where the search got stuck.
    NotLinearizable {
        key: String,
        explanation: String,
    },
    /// The search on `key` ran out of budget (and no other key was found non-linearizable).
    Timeout {
        key: String,
    },
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        *self == CheckResult::Linearizable
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Linearizable => f.write_str("linearizable"),
            CheckResult::NotLinearizable { key, explanation } => {
                write!(f, "not linearizable on key {key:?}:\n{explanation}")
            }
            CheckResult::Timeout { key } => {
                write!(f, "linearizability check timed out on key {key:?}")
            }
        }
    }
}

/// A recorded history: ops of all clients on all keys, in any order.
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// [`History::check_within`] the [`DEFAULT_CHECK_BUDGET`].
    pub fn check(&self) -> CheckResult {
        self.check_within(DEFAULT_CHECK_BUDGET)
    }

    /// Checks every key, searching for at most `budget` in all. A violation on any key wins
    /// over a timeout on another. Panics on a malformed op (output not matching input, or
    /// response before invocation).
    pub fn check_within(&self, budget: Duration) -> CheckResult {
        let deadline = Instant::now() + budget;
        let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            op.validate();
            by_key.entry(&op.key).or_default().push(op);
        }
        let mut timed_out = None;
        for (key, ops) in by_key {
            match check_key(&ops, deadline) {
                KeyVerdict::Linearizable => {}
                KeyVerdict::Violation(explanation) => {
                    return CheckResult::NotLinearizable {
                        key: key.to_string(),
                        explanation,
                    }
                }
                KeyVerdict::Timeout => {
                    timed_out.get_or_insert_with(|| key.to_string());
                }
            }
        }
        match timed_out {
            Some(key) => CheckResult::Timeout { key },
            None => CheckResult::Linearizable,
        }
    }
}

impl From<Vec<Op>> for History {
    fn from(ops: Vec<Op>) -> History {
        History { ops }
    }
}

impl FromIterator<Op> for History {
    fn from_iter<I: IntoIterator<Item = Op>>(iter: I) -> History {
        History {
            ops: iter.into_iter().collect(),
        }
    }
}

/// Records ops from concurrent tasks or threads, timed from one shared base. Clones share the
/// same history.
///
/// Call [`Recorder::invoke`] right before sending a request and one of [`Recorder::complete`],
/// [`Recorder::unknown`] or [`Recorder::fail`] once its fate is known. An op whose token is
/// dropped unresolved (say, the task panicked) stays unknown, which is always safe.
#[derive(Clone, Debug)]
pub struct Recorder {
    base: Instant,
    ops: Arc<Mutex<Vec<Option<Op>>>>,
}

/// An invoked op awaiting its outcome.
#[must_use = "resolve the op with complete, unknown or fail"]
#[derive(Debug)]
pub struct Token(usize);

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    /// Times from now.
    pub fn new() -> Recorder {
        Recorder::with_base(Instant::now())
    }

    /// Times from `base`, which must not be later than any invocation.
    pub fn with_base(base: Instant) -> Recorder {
        Recorder {
            base,
            ops: Arc::default(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<Op>>> {
        // A panicking recorder thread leaves the ops intact.
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the invocation of `input` on `key` by `client`, now.
    pub fn invoke(&self, client: usize, key: impl Into<String>, input: Input) -> Token {
        let op = Op::unknown(client, key, self.now(), input);
        let mut ops = self.lock();
        ops.push(Some(op));
        Token(ops.len() - 1)
    }

    /// The op responded with `output`, now.
    pub fn complete(&self, token: Token, output: Output) {
        let ret = self.now();
        if let Some(op) = &mut self.lock()[token.0] {
            op.outcome = Outcome::Ok { ret, output };
        }
    }

    /// The op may or may not have taken effect (timeout, connection error).
    pub fn unknown(&self, _token: Token) {}

    /// The op definitely did not take effect: it is left out of the history. (A CAS whose
    /// comparison failed did take effect: complete it with `Output::Cas(false)`.)
    pub fn fail(&self, token: Token) {
        self.lock()[token.0] = None;
    }

    /// Everything recorded so far; ops not yet resolved are unknown.
    pub fn history(&self) -> History {
        self.lock().iter().flatten().cloned().collect()
    }
}

enum KeyVerdict {
    Linearizable,
    Violation(String),
    Timeout,
}

/// Register values, interned. A value that no op left to place compares against (as a get
/// result or a CAS's expected value) behaves like any other such value in every step to come,
/// so they all share one id: the memo then merges states that differ only in which unread
/// value was written last. Values nothing ever compares against get it from the start; the
/// others when their last comparing op is placed.
const ABSENT: u32 = 0;
const UNREAD: u32 = 1;

/// One op of a key's history as a step of the register model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    Put(u32),
    Get(u32),
    Cas {
        expected: u32,
        new: u32,
        swapped: bool,
    },
    MaybePut(u32),
    MaybeCas {
        expected: u32,
        new: u32,
    },
}

impl Step {
    /// The value after this step from `state`, or `None` if the step cannot happen there.
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Step::Put(v) | Step::MaybePut(v) => Some(v),
            Step::Get(v) => (state == v).then_some(state),
            Step::Cas {
                expected,
                new,
                swapped: true,
            }
            | Step::MaybeCas { expected, new } => (state == expected).then_some(new),
            Step::Cas {
                expected,
                swapped: false,
                ..
            } => (state != expected).then_some(state),
        }
    }

    /// The value this step compares the register against, if any.
    fn compares(self) -> Option<u32> {
        match self {
            Step::Put(_) | Step::MaybePut(_) => None,
            Step::Get(v) | Step::Cas { expected: v, .. } | Step::MaybeCas { expected: v, .. } => {
                Some(v)
            }
        }
    }
}

fn set_bit(words: &mut [u64], i: usize) {
    words[i / 64] |= 1 << (i % 64);
}

fn clear_bit(words: &mut [u64], i: usize) {
    words[i / 64] &= !(1 << (i % 64));
}

fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(a, b)| a & !b == 0)
}

/// Lowe's memo of explored search states, with dominance for unknown ops.
///
/// A state is (ok ops placed, register value, unknown ops placed). Its future depends on the
/// ok ops left (which also fix what real time allows next), the value and which unknown ops
/// are still available; since unknown ops are optional, having *more* of them left can only
/// help. So once a state failed, any state with the same ok ops and value and a superset of
/// its unknown ops placed fails too, and is pruned: without that, every subset of the
/// pending unknown ops would be a separate state, exponential in their number.
struct Memo {
    /// Bits of the ok ops placed, then one word holding the value: the lookup key.
    key: Vec<u64>,
    /// Bits of the unknown ops placed.
    unknown: Vec<u64>,
    /// Key → minimal sets of unknown ops placed, among the states entered with that key.
    seen: HashMap<Box<[u64]>, Vec<Box<[u64]>>>,
    entries: usize,
}

impl Memo {
    fn new(ok_ops: usize, unknown_ops: usize) -> Memo {
        Memo {
            key: vec![0; ok_ops.div_ceil(64) + 1],
            unknown: vec![0; unknown_ops.div_ceil(64)],
            seen: HashMap::new(),
            entries: 0,
        }
    }

    /// Marks op `bit` (of its kind) placed, reaching `value`; false (and unmarked) if that
    /// state, or one dominating it, was entered before.
    fn enter(&mut self, ok: bool, bit: usize, value: u32) -> bool {
        self.mark(ok, bit, true);
        *self.key.last_mut().expect("value word") = u64::from(value);
        let new = match self.seen.get_mut(&self.key[..]) {
            Some(sets) => {
                let dominated = sets.iter().any(|s| is_subset(s, &self.unknown));
                if !dominated {
                    sets.retain(|s| !is_subset(&self.unknown, s));
                    sets.push(self.unknown.clone().into());
                }
                !dominated
            }
            None => {
                let sets = vec![self.unknown.clone().into_boxed_slice()];
                self.seen.insert(self.key.clone().into(), sets);
                true
            }
        };
        if new {
            self.entries += 1;
        } else {
            self.mark(ok, bit, false);
        }
        new
    }

    fn mark(&mut self, ok: bool, bit: usize, placed: bool) {
        let words = if ok {
            &mut self.key[..]
        } else {
            &mut self.unknown[..]
        };
        if placed {
            set_bit(words, bit);
        } else {
            clear_bit(words, bit);
        }
    }
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// Wing & Gong's event list: node 0 is the head, then one call and one return node per op in
/// time order. Linearizing an op unlinks both its nodes; backtracking relinks them.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The op of each node.
    op: Vec<usize>,
    /// For a call node, its return node; `NIL` for return nodes (and the head).
    ret: Vec<usize>,
}

impl EventList {
    /// `times[i]` is op i's (call, return); `None` returns are +inf.
    fn new(times: &[(u64, Option<u64>)]) -> EventList {
        // (time, rank, op): at equal times calls come first, so touching intervals overlap;
        // +inf returns come after every finite one.
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * times.len());
        for (i, &(call, ret)) in times.iter().enumerate() {
            events.push((call, 0, i));
            events.push(match ret {
                Some(t) => (t, 1, i),
                None => (u64::MAX, 2, i),
            });
        }
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut list = EventList {
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            op: vec![NIL; nodes],
            ret: vec![NIL; nodes],
        };
        let mut call_node = vec![NIL; times.len()];
        for (k, &(_, rank, i)) in events.iter().enumerate() {
            let node = k + 1;
            list.op[node] = i;
            if rank == 0 {
                call_node[i] = node;
            } else {
                list.ret[call_node[i]] = node;
            }
        }
        list.prev[HEAD] = NIL;
        list
    }

    fn is_call(&self, node: usize) -> bool {
        self.ret[node] != NIL
    }

    fn lift(&mut self, call: usize) {
        let ret = self.ret[call];
        let (p, n) = (self.prev[call], self.next[call]);
        self.next[p] = n;
        self.prev[n] = p; // a call node is always followed by (at least) its return
        let (p, n) = (self.prev[ret], self.next[ret]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.ret[call];
        let (p, n) = (self.prev[ret], self.next[ret]);
        self.next[p] = ret;
        if n != NIL {
            self.prev[n] = ret;
        }
        let (p, n) = (self.prev[call], self.next[call]);
        self.next[p] = call;
        self.prev[n] = call;
    }
}

/// Searches for a linearization of one key's ops.
fn check_key(all: &[&Op], deadline: Instant) -> KeyVerdict {
    // An unknown get neither changes nor reveals anything.
    let ops: Vec<&Op> = all
        .iter()
        .copied()
        .filter(|op| !(op.input == Input::Get && op.outcome == Outcome::Unknown))
        .collect();

    let mut ids: HashMap<&str, u32> = HashMap::new();
    let mut next_id = UNREAD + 1;
    for op in &ops {
        let read = match (&op.input, &op.outcome) {
            (Input::Cas { expected, .. }, _) => expected.as_deref(),
            (
                _,
                Outcome::Ok {
                    output: Output::Get(v),
                    ..
                },
            ) => v.as_deref(),
            _ => None,
        };
        if let Some(v) = read {
            ids.entry(v).or_insert_with(|| {
                next_id += 1;
                next_id - 1
            });
        }
    }
    let id = |v: Option<&str>| match v {
        None => ABSENT,
        Some(v) => ids.get(v).copied().unwrap_or(UNREAD),
    };
    let steps: Vec<Step> = ops
        .iter()
        .map(|op| match (&op.input, &op.outcome) {
            (Input::Put(v), Outcome::Ok { .. }) => Step::Put(id(Some(v))),
            (Input::Put(v), Outcome::Unknown) => Step::MaybePut(id(Some(v))),
            (Input::Get, Outcome::Ok { output, .. }) => match output {
                Output::Get(v) => Step::Get(id(v.as_deref())),
                _ => unreachable!("validated"),
            },
            (Input::Cas { expected, new }, Outcome::Ok { output, .. }) => Step::Cas {
                expected: id(expected.as_deref()),
                new: id(Some(new)),
                swapped: *output == Output::Cas(true),
            },
            (Input::Cas { expected, new }, Outcome::Unknown) => Step::MaybeCas {
                expected: id(expected.as_deref()),
                new: id(Some(new)),
            },
            (Input::Get, Outcome::Unknown) => unreachable!("filtered out"),
        })
        .collect();
    let is_ok: Vec<bool> = ops.iter().map(|op| op.ret().is_some()).collect();
    // Each op's bit in the memo, numbered separately among ok and among unknown ops.
    let mut counts = [0, 0];
    let bit: Vec<usize> = is_ok
        .iter()
        .map(|&ok| {
            counts[usize::from(ok)] += 1;
            counts[usize::from(ok)] - 1
        })
        .collect();
    let [unknown_count, ok_count] = counts;
    let times: Vec<(u64, Option<u64>)> = ops.iter().map(|op| (op.call, op.ret())).collect();
    // Unknown ops with the same step are interchangeable, except that the one called first is
    // available for longer: any valid order using a later one can use the earlier one instead.
    // So each may be placed only once its previous twin is, which collapses the k! orders
    // and 2^k subsets of k twins into k + 1 choices.
    let mut twin = vec![None; ops.len()];
    let mut by_call: Vec<usize> = (0..ops.len()).filter(|&i| !is_ok[i]).collect();
    by_call.sort_by_key(|&i| ops[i].call);
    let mut last_with_step: HashMap<Step, usize> = HashMap::new();
    for i in by_call {
        twin[i] = last_with_step.insert(steps[i], i);
    }
    let mut is_placed = vec![false; ops.len()];
    // How many ops left to place compare against each value.
    let mut comparers = vec![0u32; next_id as usize];
    for step in &steps {
        if let Some(v) = step.compares() {
            comparers[v as usize] += 1;
        }
    }

    let mut list = EventList::new(&times);
    let mut memo = Memo::new(ok_count, unknown_count);
    let mut remaining_ok = ok_count;
    // (call node, value before it) of each op placed so far, in order.
    let mut placed: Vec<(usize, u32)> = Vec::new();
    let mut state = ABSENT;
    // The longest prefix placed, for the explanation.
    let mut best: Vec<usize> = Vec::new();
    // The candidates for the next op are the call nodes before the first return node. They
    // are scanned twice: ok ops first, then unknown ones, so that states with fewer unknown
    // ops placed tend to be explored first and dominate the rest.
    let mut node = list.next[HEAD];
    let mut unknown_pass = false;
    let mut iterations: u64 = 0;

    while remaining_ok > 0 {
        iterations += 1;
        if iterations.is_multiple_of(1024)
            && (Instant::now() > deadline || memo.entries > MAX_CACHE_ENTRIES)
        {
            return KeyVerdict::Timeout;
        }
        // Each remaining ok op's return node precedes every unknown op's (+inf), and a call
        // node precedes its return, so the scan meets a return node before the list ends.
        debug_assert_ne!(node, NIL);
        if list.is_call(node) {
            let i = list.op[node];
            // An op that ignores the value (a put) directly after an unknown op would erase
            // its effect: placing the put without it reaches the same value with fewer
            // unknown ops placed, which is at least as good and is tried anyway.
            let after_unknown = placed.last().is_some_and(|&(n, _)| !is_ok[list.op[n]]);
            let eligible = is_ok[i] != unknown_pass
                && twin[i].is_none_or(|t| is_placed[t])
                && !(after_unknown && steps[i].compares().is_none());
            if eligible {
                if let Some(after) = steps[i].apply(state) {
                    let compared = steps[i].compares();
                    if let Some(v) = compared {
                        comparers[v as usize] -= 1;
                    }
                    let after = match after {
                        ABSENT | UNREAD => after,
                        v if comparers[v as usize] == 0 => UNREAD,
                        v => v,
                    };
                    // An unknown op that changes nothing is left out: leaving it for later
                    // (or never) is at least as good.
                    let enter = (is_ok[i] || after != state) && memo.enter(is_ok[i], bit[i], after);
                    if !enter {
                        if let Some(v) = compared {
                            comparers[v as usize] += 1;
                        }
                    } else {
                        placed.push((node, state));
                        state = after;
                        if is_ok[i] {
                            remaining_ok -= 1;
                        }
                        list.lift(node);
                        is_placed[i] = true;
                        if placed.len() > best.len() {
                            best = placed.iter().map(|&(n, _)| list.op[n]).collect();
                        }
                        node = list.next[HEAD];
                        unknown_pass = false;
                        continue;
                    }
                }
            }
            node = list.next[node];
        } else if !unknown_pass {
            unknown_pass = true;
            node = list.next[HEAD];
        } else {
            // No candidate fits: undo the last placement and try the candidates after it.
            let Some((call, before)) = placed.pop() else {
                return KeyVerdict::Violation(explain(&ops, &best));
            };
            let i = list.op[call];
            state = before;
            if let Some(v) = steps[i].compares() {
                comparers[v as usize] += 1;
            }
            memo.mark(is_ok[i], bit[i], false);
            if is_ok[i] {
                remaining_ok += 1;
            }
            list.unlift(call);
            is_placed[i] = false;
            node = list.next[call];
            unknown_pass = !is_ok[i];
        }
    }
    KeyVerdict::Linearizable
}

/// Most ops listed in an explanation, per list.
const EXPLAIN_LINES: usize = 12;

/// Describes the longest valid prefix found and the ops that could not follow it.
fn explain(ops: &[&Op], best: &[usize]) -> String {
    let mut value: Option<&str> = None;
    for &i in best {
        match (&ops[i].input, &ops[i].outcome) {
            (Input::Put(v), _) => value = Some(v),
            (Input::Cas { expected, new }, outcome) => {
                let swapped = match outcome {
                    Outcome::Ok { output, .. } => *output == Output::Cas(true),
                    Outcome::Unknown => value == expected.as_deref(),
                };
                if swapped {
                    value = Some(new);
                }
            }
            (Input::Get, _) => {}
        }
    }
    let mut out = format!(
        "{} ops (unknown gets left out) admit no valid order. The longest valid prefix found \
         places {} of them and leaves the value {}",
        ops.len(),
        best.len(),
        Value(value)
    );
    if best.is_empty() {
        out.push_str(".\n");
    } else {
        let shown = best.len().min(EXPLAIN_LINES);
        out.push_str(&format!("; its last {shown}:\n"));
        for &i in &best[best.len() - shown..] {
            out.push_str(&format!("  {}\n", ops[i]));
        }
    }
    let placed: HashSet<usize> = best.iter().copied().collect();
    let rest: Vec<usize> = (0..ops.len()).filter(|i| !placed.contains(i)).collect();
    let first_ret = rest.iter().filter_map(|&i| ops[i].ret()).min();
    let mut next: Vec<usize> = rest
        .into_iter()
        .filter(|&i| first_ret.is_none_or(|r| ops[i].call <= r))
        .collect();
    next.sort_by_key(|&i| ops[i].call);
    out.push_str("None of the ops that real time allows next can follow it:\n");
    for &i in next.iter().take(EXPLAIN_LINES) {
        out.push_str(&format!("  {}\n", ops[i]));
    }
    if next.len() > EXPLAIN_LINES {
        out.push_str(&format!("  ... and {} more\n", next.len() - EXPLAIN_LINES));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "k";

    fn put(client: usize, call: u64, ret: u64, v: &str) -> Op {
        Op::ok(client, K, call, ret, Input::Put(v.into()), Output::PutOk)
    }

    fn get(client: usize, call: u64, ret: u64, v: Option<&str>) -> Op {
        Op::ok(
            client,
            K,
            call,
            ret,
            Input::Get,
            Output::Get(v.map(Into::into)),
        )
    }

    fn cas(client: usize, call: u64, ret: u64, exp: Option<&str>, new: &str, ok: bool) -> Op {
        let input = Input::Cas {
            expected: exp.map(Into::into),
            new: new.into(),
        };
        Op::ok(client, K, call, ret, input, Output::Cas(ok))
    }

    /// The same op, but its response never arrived.
    fn lost(op: Op) -> Op {
        Op {
            outcome: Outcome::Unknown,
            ..op
        }
    }

    fn on(key: &str, op: Op) -> Op {
        Op {
            key: key.into(),
            ..op
        }
    }

    fn check(ops: Vec<Op>) -> CheckResult {
        History::from(ops).check_within(Duration::from_secs(10))
    }

    fn assert_linearizable(ops: Vec<Op>) {
        let r = check(ops);
        assert!(r.is_linearizable(), "{r}");
    }

    fn assert_violation(ops: Vec<Op>) -> String {
        match check(ops) {
            CheckResult::NotLinearizable { explanation, .. } => explanation,
            r => panic!("expected a violation, got {r}"),
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_linearizable(vec![]);
    }

    #[test]
    fn sequential_history_is_linearizable() {
        assert_linearizable(vec![
            get(0, 0, 1, None),
            put(0, 2, 3, "a"),
            get(1, 4, 5, Some("a")),
            cas(1, 6, 7, Some("a"), "b", true),
            cas(0, 8, 9, Some("a"), "c", false),
            cas(0, 10, 11, None, "d", false),
            get(1, 12, 13, Some("b")),
            put(0, 14, 15, "a"),
            get(0, 16, 17, Some("a")),
        ]);
    }

    #[test]
    fn sequential_history_with_a_wrong_read_is_rejected() {
        assert_violation(vec![put(0, 0, 1, "a"), get(0, 2, 3, None)]);
    }

    #[test]
    fn read_overlapping_two_writes_may_see_any_of_them() {
        for seen in [None, Some("1"), Some("2")] {
            assert_linearizable(vec![
                put(0, 0, 10, "1"),
                put(1, 2, 12, "2"),
                get(2, 1, 11, seen),
            ]);
        }
        // Both reads after both writes must agree on which write went last, either way.
        for last in ["1", "2"] {
            assert_linearizable(vec![
                put(0, 0, 10, "1"),
                put(1, 2, 12, "2"),
                get(2, 13, 14, Some(last)),
                get(3, 15, 16, Some(last)),
            ]);
        }
        assert_violation(vec![
            put(0, 0, 10, "1"),
            put(1, 2, 12, "2"),
            get(2, 13, 14, Some("2")),
            get(3, 15, 16, Some("1")),
        ]);
    }

    #[test]
    fn touching_intervals_count_as_concurrent() {
        assert_linearizable(vec![put(0, 0, 5, "a"), get(1, 5, 6, None)]);
        assert_violation(vec![put(0, 0, 5, "a"), get(1, 6, 7, None)]);
    }

    #[test]
    fn read_of_the_old_value_after_a_completed_write_is_rejected() {
        let why = assert_violation(vec![
            put(0, 0, 1, "old"),
            put(0, 2, 3, "new"),
            get(1, 4, 5, Some("old")),
        ]);
        assert!(why.contains("client 1 \"k\": get = \"old\""), "{why}");
        // While the write is still running, the old value is fine.
        assert_linearizable(vec![
            put(0, 0, 1, "old"),
            put(0, 2, 6, "new"),
            get(1, 4, 5, Some("old")),
        ]);
    }

    #[test]
    fn stale_read_after_a_successful_cas_is_rejected() {
        assert_violation(vec![
            put(0, 0, 1, "a"),
            cas(0, 2, 3, Some("a"), "b", true),
            get(1, 4, 5, Some("a")),
        ]);
    }

    #[test]
    fn cas_that_failed_although_the_value_matched_is_rejected() {
        assert_violation(vec![put(0, 0, 1, "a"), cas(1, 2, 3, Some("a"), "b", false)]);
        assert_violation(vec![cas(0, 0, 1, None, "a", false)]);
        // A concurrent write explains the failure.
        assert_linearizable(vec![
            put(0, 0, 1, "a"),
            cas(1, 2, 5, Some("a"), "b", false),
            put(2, 3, 4, "c"),
        ]);
    }

    #[test]
    fn two_cas_on_the_same_expected_value_cannot_both_succeed() {
        assert_violation(vec![
            put(0, 0, 1, "a"),
            cas(1, 2, 10, Some("a"), "b", true),
            cas(2, 3, 11, Some("a"), "c", true),
        ]);
        assert_violation(vec![
            cas(1, 0, 10, None, "b", true),
            cas(2, 1, 11, None, "c", true),
        ]);
        // One wins, the other sees the winner's value.
        assert_linearizable(vec![
            put(0, 0, 1, "a"),
            cas(1, 2, 10, Some("a"), "b", true),
            cas(2, 3, 11, Some("a"), "c", false),
        ]);
    }

    #[test]
    fn unknown_put_that_a_later_read_sees_is_accepted() {
        assert_linearizable(vec![
            put(0, 0, 1, "a"),
            lost(put(1, 2, 3, "b")),
            get(2, 100, 101, Some("b")),
            get(2, 102, 103, Some("b")),
        ]);
    }

    #[test]
    fn unknown_put_that_never_appears_is_accepted() {
        assert_linearizable(vec![
            put(0, 0, 1, "a"),
            lost(put(1, 2, 3, "b")),
            get(2, 100, 101, Some("a")),
            get(2, 102, 103, Some("a")),
        ]);
    }

    #[test]
    fn unknown_put_takes_effect_at_most_once_and_not_before_its_call() {
        // Seen before it was even invoked.
        assert_violation(vec![get(0, 0, 1, Some("b")), lost(put(1, 2, 3, "b"))]);
        // Seen, overwritten, then seen again.
        assert_violation(vec![
            lost(put(1, 0, 1, "b")),
            get(0, 2, 3, Some("b")),
            put(0, 4, 5, "c"),
            get(0, 6, 7, Some("b")),
        ]);
    }

    #[test]
    fn unknown_cas_only_takes_effect_when_the_value_matched() {
        let swap = |exp: &str| lost(cas(1, 2, 3, Some(exp), "b", true));
        assert_linearizable(vec![put(0, 0, 1, "a"), swap("a"), get(0, 4, 5, Some("b"))]);
        assert_linearizable(vec![put(0, 0, 1, "a"), swap("a"), get(0, 4, 5, Some("a"))]);
        assert_violation(vec![put(0, 0, 1, "a"), swap("x"), get(0, 4, 5, Some("b"))]);
        // Its recorded output is not trusted: a lost CAS "not swapped" may still have swapped.
        assert_linearizable(vec![
            put(0, 0, 1, "a"),
            lost(cas(1, 2, 3, Some("a"), "b", false)),
            get(0, 4, 5, Some("b")),
        ]);
    }

    #[test]
    fn unknown_get_is_ignored() {
        assert_linearizable(vec![put(0, 0, 1, "a"), lost(get(1, 2, 3, Some("zz")))]);
    }

    #[test]
    fn keys_are_independent_registers() {
        assert_linearizable(vec![
            on("x", put(0, 0, 1, "a")),
            on("y", get(1, 2, 3, None)),
            on("y", put(1, 4, 5, "b")),
            on("x", get(0, 6, 7, Some("a"))),
        ]);
        match check(vec![
            on("x", put(0, 0, 1, "a")),
            on("y", get(1, 2, 3, Some("a"))),
        ]) {
            CheckResult::NotLinearizable { key, .. } => assert_eq!(key, "y"),
            r => panic!("expected a violation on y, got {r}"),
        }
    }

    #[test]
    #[should_panic(expected = "output does not match input")]
    fn mismatched_output_is_a_harness_bug() {
        check(vec![Op::ok(0, K, 0, 1, Input::Get, Output::PutOk)]);
    }

    #[test]
    fn exhausted_budget_answers_timeout() {
        // A read of a value nobody wrote, concurrent with 40 reads that fit anywhere: to reject
        // it the search tries every subset of those 40 before it.
        let mut ops: Vec<Op> = (0..40).map(|c| get(c, 0, 100, None)).collect();
        ops.push(get(99, 0, 100, Some("nobody wrote this")));
        let start = Instant::now();
        let r = History::from(ops).check_within(Duration::from_millis(200));
        assert_eq!(r, CheckResult::Timeout { key: K.into() });
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn recorder_records_from_threads() {
        let rec = Recorder::new();
        let register = Arc::new(Mutex::new(None::<String>));
        let threads: Vec<_> = (0..4)
            .map(|c| {
                let (rec, register) = (rec.clone(), register.clone());
                std::thread::spawn(move || {
                    for n in 0..50 {
                        let v = format!("{c}-{n}");
                        let t = rec.invoke(c, K, Input::Put(v.clone()));
                        *register.lock().unwrap() = Some(v);
                        rec.complete(t, Output::PutOk);
                        let t = rec.invoke(c, K, Input::Get);
                        let seen = register.lock().unwrap().clone();
                        rec.complete(t, Output::Get(seen));
                    }
                    let t = rec.invoke(c, K, Input::Put("lost".into()));
                    rec.unknown(t);
                    let t = rec.invoke(c, K, Input::Put("refused".into()));
                    rec.fail(t);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let h = rec.history();
        assert_eq!(h.len(), 4 * 101);
        assert_eq!(h.ops().iter().filter(|op| op.ret().is_none()).count(), 4);
        let r = h.check();
        assert!(r.is_linearizable(), "{r}");

        // The same recorder catches a register that serves a stale value.
        let t = rec.invoke(0, K, Input::Put("last".into()));
        rec.complete(t, Output::PutOk);
        let t = rec.invoke(1, K, Input::Get);
        rec.complete(t, Output::Get(Some("0-0".into())));
        assert!(!rec.history().check().is_linearizable());
    }

    /// splitmix64: deterministic, good enough for test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
    }

    /// A history of a real sequential store: each client invokes an op, later it takes effect
    /// atomically on the store, later still the client gets the response, with the steps of
    /// all clients interleaved at random, so intervals overlap. `lost_percent` of the ops lose
    /// their response, half of those without ever taking effect. Values are mostly unique,
    /// sometimes reused so that CAS has something to confuse.
    fn simulate(
        seed: u64,
        clients: usize,
        ops_per_client: usize,
        keys: usize,
        lost_percent: u64,
    ) -> Vec<Op> {
        struct InFlight {
            op: Op,
            effect: Option<Output>,
        }
        let mut rng = Rng(seed);
        let mut store: HashMap<String, String> = HashMap::new();
        let mut left = vec![ops_per_client; clients];
        let mut flight: Vec<Option<InFlight>> = (0..clients).map(|_| None).collect();
        let mut ops = Vec::new();
        let mut now = 0;
        let mut fresh = 0;
        loop {
            let active: Vec<usize> = (0..clients)
                .filter(|&c| left[c] > 0 || flight[c].is_some())
                .collect();
            if active.is_empty() {
                return ops;
            }
            let c = active[rng.below(active.len() as u64) as usize];
            now += 1 + rng.below(10);
            let Some(mut f) = flight[c].take() else {
                left[c] -= 1;
                let key = format!("k{}", rng.below(keys as u64));
                let mut value = |rng: &mut Rng| {
                    fresh += 1;
                    if rng.percent(20) {
                        format!("v{}", rng.below(4))
                    } else {
                        format!("u{fresh}")
                    }
                };
                let input = match rng.below(10) {
                    0..=3 => Input::Put(value(&mut rng)),
                    4..=6 => Input::Get,
                    _ => {
                        let new = value(&mut rng);
                        let expected = match rng.below(4) {
                            0 | 1 => store.get(&key).cloned(),
                            2 => None,
                            _ => Some(format!("v{}", rng.below(4))),
                        };
                        Input::Cas { expected, new }
                    }
                };
                let op = Op::unknown(c, key, now, input);
                flight[c] = Some(InFlight { op, effect: None });
                continue;
            };
            let lost = rng.percent(lost_percent / 2);
            match f.effect.take() {
                None if lost => ops.push(f.op),
                None => {
                    let cur = store.get(&f.op.key).cloned();
                    let output = match &f.op.input {
                        Input::Put(v) => {
                            store.insert(f.op.key.clone(), v.clone());
                            Output::PutOk
                        }
                        Input::Get => Output::Get(cur),
                        Input::Cas { expected, new } => {
                            let swap = cur == *expected;
                            if swap {
                                store.insert(f.op.key.clone(), new.clone());
                            }
                            Output::Cas(swap)
                        }
                    };
                    f.effect = Some(output);
                    flight[c] = Some(f);
                }
                Some(_) if lost => ops.push(f.op),
                Some(output) => {
                    f.op.outcome = Outcome::Ok { ret: now, output };
                    ops.push(f.op);
                }
            }
        }
    }

    /// Replaces the value seen by one ok read with one nobody wrote.
    fn corrupt_a_read(ops: &mut [Op], rng: &mut Rng) -> bool {
        let reads: Vec<usize> = (0..ops.len())
            .filter(|&i| {
                matches!(
                    ops[i].outcome,
                    Outcome::Ok {
                        output: Output::Get(_),
                        ..
                    }
                )
            })
            .collect();
        if reads.is_empty() {
            return false;
        }
        let i = reads[rng.below(reads.len() as u64) as usize];
        if let Outcome::Ok { output, .. } = &mut ops[i].outcome {
            *output = Output::Get(Some("never written".into()));
        }
        true
    }

    #[test]
    fn random_real_executions_are_accepted_and_a_corrupted_read_is_rejected() {
        let mut rng = Rng(7);
        let mut corrupted = 0;
        for seed in 0..300 {
            let clients = 2 + (seed % 5) as usize;
            let keys = 1 + (seed % 3) as usize;
            let mut ops = simulate(seed, clients, 15, keys, 10);
            let r = History::from(ops.clone()).check_within(Duration::from_secs(10));
            assert!(r.is_linearizable(), "seed {seed}: {r}");
            if corrupt_a_read(&mut ops, &mut rng) {
                corrupted += 1;
                let r = History::from(ops).check_within(Duration::from_secs(10));
                assert!(
                    matches!(r, CheckResult::NotLinearizable { .. }),
                    "seed {seed}: corrupted history was {r}"
                );
            }
        }
        assert!(corrupted > 250, "only {corrupted} histories had a read");
    }

    /// Linearizability by definition: try every next op that real time allows, with unknown
    /// ops optional. Exponential; for tiny histories only.
    fn brute_force(ops: &[Op]) -> bool {
        fn go(ops: &[Op], left: &mut Vec<usize>, state: Option<String>) -> bool {
            if left.iter().all(|&i| ops[i].ret().is_none()) {
                return true;
            }
            for k in 0..left.len() {
                let op = &ops[left[k]];
                let blocked = left
                    .iter()
                    .any(|&j| ops[j].ret().is_some_and(|r| r < op.call));
                if blocked {
                    continue;
                }
                let out = match &op.input {
                    Input::Put(v) => Some((Some(v.clone()), Output::PutOk)),
                    Input::Get => Some((state.clone(), Output::Get(state.clone()))),
                    Input::Cas { expected, new } if *expected == state => {
                        Some((Some(new.clone()), Output::Cas(true)))
                    }
                    Input::Cas { .. } => Some((state.clone(), Output::Cas(false))),
                };
                let Some((after, output)) = out else { continue };
                let fits = match &op.outcome {
                    Outcome::Ok { output: seen, .. } => *seen == output,
                    Outcome::Unknown => true,
                };
                if fits {
                    let i = left.remove(k);
                    let found = go(ops, left, after);
                    left.insert(k, i);
                    if found {
                        return true;
                    }
                }
            }
            false
        }
        go(ops, &mut (0..ops.len()).collect(), None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        // Few values, so that reads, CAS and lost ops interfere: this is what exercises the
        // search's pruning (memo dominance, twins, puts after unknown ops, retired values).
        let mut rng = Rng(11);
        let value = |rng: &mut Rng| match rng.below(4) {
            0 => None,
            1 => Some("a".to_string()),
            2 => Some("b".to_string()),
            _ => Some("c".to_string()),
        };
        let (mut yes, mut no) = (0, 0);
        for round in 0..5000 {
            let n = 1 + rng.below(8) as usize;
            let span = 4 + rng.below(20);
            let lost_percent = rng.below(60);
            let ops: Vec<Op> = (0..n)
                .map(|c| {
                    let call = rng.below(span);
                    let ret = call + rng.below(span / 2 + 1);
                    let op = match rng.below(3) {
                        0 => put(c, call, ret, value(&mut rng).as_deref().unwrap_or("a")),
                        1 => get(c, call, ret, value(&mut rng).as_deref()),
                        _ => cas(
                            c,
                            call,
                            ret,
                            value(&mut rng).as_deref(),
                            value(&mut rng).as_deref().unwrap_or("b"),
                            rng.percent(50),
                        ),
                    };
                    if rng.percent(lost_percent) {
                        lost(op)
                    } else {
                        op
                    }
                })
                .collect();
            let expected = brute_force(&ops);
            let got = History::from(ops.clone()).check_within(Duration::from_secs(10));
            assert_eq!(
                got.is_linearizable(),
                expected,
                "round {round}: {got}\n{}",
                ops.iter().map(|op| format!("  {op}\n")).collect::<String>()
            );
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 1000 && no > 1000, "{yes} linearizable, {no} not");
    }

    #[test]
    fn checks_a_thousand_concurrent_ops_quickly() {
        for (keys, lost_percent) in [(3, 0), (3, 4), (3, 10), (1, 2)] {
            let ops = simulate(42, 5, 200, keys, lost_percent);
            assert_eq!(ops.len(), 1000);
            let start = Instant::now();
            let r = History::from(ops.clone()).check_within(Duration::from_secs(20));
            let took = start.elapsed();
            eprintln!("5 clients x 200 ops, {keys} keys, {lost_percent}% lost: {r} in {took:?}");
            assert!(r.is_linearizable(), "{r}");
            assert!(took < Duration::from_secs(3), "took {took:?}");

            let mut bad = ops;
            assert!(corrupt_a_read(&mut bad, &mut Rng(1)));
            let start = Instant::now();
            let r = History::from(bad).check_within(Duration::from_secs(20));
            let took = start.elapsed();
            eprintln!("  corrupted: rejected in {took:?}");
            assert!(matches!(r, CheckResult::NotLinearizable { .. }), "{r}");
            assert!(took < Duration::from_secs(3), "took {took:?}");
        }
    }
}
