use super::*;
use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;

fn entry(index: u64, term: u64, data: &str) -> WalEntry {
    WalEntry {
        term,
        index,
        entry_type: EntryType::Normal,
        data: data.as_bytes().to_vec(),
        context: index.to_le_bytes().to_vec(),
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<WalEntry> {
    range.map(|i| entry(i, term, &format!("v{i}"))).collect()
}

fn only_segment(dir: &Path) -> PathBuf {
    let segs = list_segments(dir).unwrap();
    assert_eq!(segs.len(), 1);
    segs[0].1.clone()
}

#[test]
fn empty_dir_opens_empty_and_creates_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let (wal, rec) = Wal::open(&dir, WalOptions::default()).unwrap();
    assert!(rec.entries.is_empty() && rec.snapshot.is_none() && rec.metadata.is_none());
    assert_eq!(rec.hard_state, HardState::default());
    assert_eq!(wal.last_index(), 0);
    assert!(dir.is_dir());
}

#[test]
fn round_trip_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        wal.save_metadata(b"member=1").unwrap();
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 3,
        };
        wal.append(&entries(1..=3, 2), Some(&hs)).unwrap();
        assert_eq!(wal.sync_count(), 2, "one fsync per call");
    }
    let (wal, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.metadata.as_deref(), Some(&b"member=1"[..]));
    assert_eq!(rec.hard_state.commit, 3);
    assert_eq!(rec.entries, entries(1..=3, 2));
    assert_eq!(wal.last_index(), 3);
}

#[test]
fn overwriting_a_suffix_truncates_it() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        wal.append(&entries(1..=5, 1), None).unwrap();
        wal.append(&entries(3..=4, 2), None).unwrap();
    }
    let (_, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    let mut want = entries(1..=2, 1);
    want.extend(entries(3..=4, 2));
    assert_eq!(rec.entries, want);
}

/// Small enough that rewriting a whole segment per crash point stays cheap.
const SMALL: WalOptions = WalOptions {
    segment_bytes: 64 * 1024,
};

/// `full[..cut]` followed by zeros up to `full.len()`: what a crash leaves when only the
/// first `cut` bytes of the last write reached a preallocated segment.
fn cut_into_zeros(full: &[u8], cut: usize) -> Vec<u8> {
    let mut d = full[..cut].to_vec();
    d.resize(full.len(), 0);
    d
}

#[test]
fn torn_tail_is_zeroed_at_every_cut_point() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), SMALL).unwrap();
    wal.append(&entries(1..=3, 1), None).unwrap();
    let path = only_segment(tmp.path());
    let good = wal.size as usize;
    wal.append(&entries(4..=4, 1), None).unwrap();
    let end = wal.size as usize;
    drop(wal);
    let full = fs::read(&path).unwrap();
    assert_eq!(full.len() as u64, SMALL.segment_bytes);
    let clean = cut_into_zeros(&full, good);
    for cut in good..end {
        fs::write(&path, cut_into_zeros(&full, cut)).unwrap();
        let (_, rec) = Wal::open(tmp.path(), SMALL).unwrap();
        assert_eq!(rec.entries, entries(1..=3, 1), "cut at {cut}");
        assert!(
            fs::read(&path).unwrap() == clean,
            "cut at {cut}: torn bytes zeroed, length kept"
        );
    }
    // A segment written before preallocation simply ends at the cut; it is repaired the same
    // way, without changing its length.
    for cut in good..end {
        fs::write(&path, &full[..cut]).unwrap();
        let (_, rec) = Wal::open(tmp.path(), SMALL).unwrap();
        assert_eq!(rec.entries, entries(1..=3, 1), "cut at {cut}");
        assert!(
            fs::read(&path).unwrap() == clean[..cut],
            "cut at {cut}: torn bytes zeroed"
        );
    }
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let written = {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        wal.append(&entries(1..=2, 1), None).unwrap();
        wal.size
    };
    let path = only_segment(tmp.path());
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(
        &[0xde, 0xad, 0xbe, 0xef, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        written,
    )
    .unwrap();
    drop(f);
    let (mut wal, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.entries, entries(1..=2, 1));
    // Appending after recovery works and survives another reopen.
    wal.append(&entries(3..=3, 1), None).unwrap();
    drop(wal);
    let (_, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.entries, entries(1..=3, 1));
}

#[test]
fn bit_flip_in_the_middle_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let written = {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        for i in 1..=10 {
            wal.append(&entries(i..=i, 1), None).unwrap();
        }
        wal.size as usize
    };
    let path = only_segment(tmp.path());
    let mut data = fs::read(&path).unwrap();
    let record_len = written / 10;
    let offset = 4 * record_len; // start of the fifth record
    data[offset + RECORD_HEADER_LEN + 3] ^= 0x10;
    fs::write(&path, &data).unwrap();
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Corrupt {
            path: p, offset: o, ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(o, offset as u64);
        }
        Err(other) => panic!("wrong error {other}"),
        Ok(_) => panic!("corruption accepted"),
    }
    assert_eq!(
        fs::read(&path).unwrap(),
        data,
        "file must be left as it was"
    );
    assert!(read_records(tmp.path()).is_err());
}

#[test]
fn rotation_release_and_recovery_from_a_suffix() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes: 512 };
    {
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        wal.save_metadata(b"m").unwrap();
        for i in 1..=60 {
            let hs = HardState {
                term: 1,
                vote: 1,
                commit: i,
            };
            wal.append(&entries(i..=i, 1), Some(&hs)).unwrap();
        }
        assert!(wal.segment_count() > 3);
        wal.save_snapshot(&SnapshotMarker {
            index: 40,
            term: 1,
            conf_state: vec![1, 2, 3],
        })
        .unwrap();
        let before = wal.segment_count();
        wal.release_to(40).unwrap();
        assert!(wal.segment_count() < before);
    }
    let (_, rec) = Wal::open(tmp.path(), opts).unwrap();
    assert_eq!(rec.metadata.as_deref(), Some(&b"m"[..]));
    assert_eq!(rec.snapshot.as_ref().unwrap().index, 40);
    assert_eq!(rec.hard_state.commit, 60);
    assert_eq!(rec.entries, entries(41..=60, 1));
    let records = read_records(tmp.path()).unwrap();
    assert!(records.iter().any(|r| matches!(r, Record::Snapshot(_))));
}

fn segment_names(dir: &Path) -> Vec<String> {
    list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn encoded_len(f: impl FnOnce(&mut Vec<u8>)) -> u64 {
    let mut b = Vec::new();
    f(&mut b);
    b.len() as u64
}

/// Appends `1..=n` one per call with a hard state each, so small segments rotate often.
fn fill(wal: &mut Wal, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: i,
        };
        wal.append(&entries(i..=i, 1), Some(&hs)).unwrap();
    }
}

#[test]
fn crash_at_every_byte_of_a_group_commit_keeps_whole_records_only() {
    let tmp = tempfile::tempdir().unwrap();
    let hs1 = HardState {
        term: 1,
        vote: 1,
        commit: 3,
    };
    let hs2 = HardState {
        term: 2,
        vote: 1,
        commit: 8,
    };
    let (mut wal, _) = Wal::open(tmp.path(), SMALL).unwrap();
    wal.append(&entries(1..=3, 1), Some(&hs1)).unwrap();
    let path = only_segment(tmp.path());
    let good = wal.size;
    let batch = entries(4..=8, 2);
    wal.append(&batch, Some(&hs2)).unwrap();
    let end = wal.size;
    drop(wal);
    let full = fs::read(&path).unwrap();
    // Byte offset at which each record of the second append ends.
    let mut ends = Vec::new();
    let mut at = good;
    for e in &batch {
        at += encoded_len(|b| put_entry(b, e));
        ends.push(at);
    }
    at += encoded_len(|b| put_hard_state(b, &hs2));
    assert_eq!(at, end);
    ends.push(end);
    for cut in good..end {
        fs::write(&path, cut_into_zeros(&full, cut as usize)).unwrap();
        let (_, rec) = Wal::open(tmp.path(), SMALL).unwrap();
        // A record whose missing bytes were zeros anyway (the hard state ends in the high
        // bytes of `commit`) is whole as far as anyone can tell.
        let landed = |e: u64| e <= cut || prealloc::is_zero(&full[cut as usize..e as usize]);
        let whole = ends[..batch.len()].iter().filter(|&&e| landed(e)).count() as u64;
        let mut want = entries(1..=3, 1);
        want.extend(entries(4..=3 + whole, 2));
        assert_eq!(rec.entries, want, "cut at {cut}");
        let want_hs = if landed(end) { hs2 } else { hs1 };
        assert_eq!(rec.hard_state, want_hs, "cut at {cut}");
        let kept = ends.iter().rev().find(|&&e| landed(e)).copied();
        assert!(
            fs::read(&path).unwrap() == cut_into_zeros(&full, kept.unwrap_or(good) as usize),
            "cut at {cut}: zeroed from the last whole record on, length kept"
        );
    }
}

#[test]
fn read_records_tolerates_a_torn_tail_without_repairing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let written = {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        wal.save_metadata(b"m").unwrap();
        wal.append(&entries(1..=2, 1), None).unwrap();
        wal.size as usize
    };
    let path = only_segment(tmp.path());
    let mut data = fs::read(&path).unwrap();
    data[written..written + 6].copy_from_slice(&[9, 0, 0, 0, 1, 2]);
    fs::write(&path, &data).unwrap();
    let records = read_records(tmp.path()).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0], Record::Metadata(b"m".to_vec()));
    assert_eq!(
        fs::read(&path).unwrap(),
        data,
        "dump must not modify the log"
    );
}

#[test]
fn damage_in_a_non_last_segment_is_refused_even_at_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes: 256 };
    {
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        fill(&mut wal, 1..=20);
        assert!(wal.segment_count() >= 3);
    }
    let segs = list_segments(tmp.path()).unwrap();
    let first = &segs[0].1;
    let mut data = fs::read(first).unwrap();
    let len = data.len();
    data[len - 1] ^= 0x01; // last byte of the last record: would look torn in a last segment
    fs::write(first, &data).unwrap();
    let hs_len = encoded_len(|b| put_hard_state(b, &HardState::default()));
    match Wal::open(tmp.path(), opts) {
        Err(WalError::Corrupt { path, offset, .. }) => {
            assert_eq!(&path, first);
            assert_eq!(offset, len as u64 - hs_len);
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("damage accepted"),
    }
    assert_eq!(&fs::read(first).unwrap(), &data);
}

#[test]
fn non_contiguous_entries_on_disk_are_refused_with_their_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let path = segment_path(tmp.path(), 1, 1);
    let mut data = Vec::new();
    for e in [entry(1, 1, "a"), entry(2, 1, "b")] {
        put_entry(&mut data, &e);
    }
    let bad_at = data.len() as u64;
    put_entry(&mut data, &entry(4, 1, "d"));
    fs::write(&path, &data).unwrap();
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Corrupt {
            path: p, offset, ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(offset, bad_at);
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("gap accepted"),
    }
    assert_eq!(fs::read(&path).unwrap(), data);
}

#[test]
fn an_append_that_would_leave_a_gap_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    wal.append(&entries(1..=3, 1), None).unwrap();
    let syncs = wal.sync_count();
    let size = wal.size;
    let data = fs::read(only_segment(tmp.path())).unwrap();
    assert!(matches!(
        wal.append(&entries(5..=5, 1), None),
        Err(WalError::Gap { index: 5, last: 3 })
    ));
    let holey = vec![entry(4, 1, "x"), entry(6, 1, "y")];
    assert!(matches!(
        wal.append(&holey, None),
        Err(WalError::Gap { index: 6, last: 4 })
    ));
    assert_eq!(wal.sync_count(), syncs);
    assert_eq!(wal.size, size);
    assert!(fs::read(only_segment(tmp.path())).unwrap() == data);
    assert_eq!(wal.last_index(), 3);
    // A snapshot beyond the log moves the point new entries must follow.
    wal.save_snapshot(&SnapshotMarker {
        index: 10,
        term: 2,
        conf_state: vec![],
    })
    .unwrap();
    wal.append(&entries(11..=12, 2), None).unwrap();
    drop(wal);
    let (wal, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.entries, entries(11..=12, 2));
    assert_eq!(wal.last_index(), 12);
}

#[test]
fn a_failed_write_stops_the_wal_and_reopen_recovers_the_durable_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    wal.append(&entries(1..=3, 1), None).unwrap();
    let path = only_segment(tmp.path());
    let good = wal.size as usize;
    let before = fs::read(&path).unwrap();
    wal.fail_next_write_after = Some(10);
    assert!(matches!(
        wal.append(&entries(4..=6, 1), None),
        Err(WalError::Io { .. })
    ));
    // Writing on after a partial record would bury it mid-log, where reopen must refuse it.
    assert!(wal.append(&entries(4..=6, 1), None).is_err());
    assert!(wal.save_metadata(b"m").is_err());
    assert!(wal.save_snapshot(&SnapshotMarker::default()).is_err());
    let after = fs::read(&path).unwrap();
    assert_eq!(after.len(), before.len());
    let mut partial = Vec::new();
    for e in entries(4..=6, 1) {
        put_entry(&mut partial, &e);
    }
    let mut want = before.clone();
    want[good..good + 10].copy_from_slice(&partial[..10]);
    assert!(after == want, "10 bytes written in place, length kept");
    drop(wal);
    let (mut wal, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.entries, entries(1..=3, 1));
    assert!(
        fs::read(&path).unwrap() == before,
        "partial record zeroed again"
    );
    wal.append(&entries(4..=4, 1), None).unwrap();
}

#[test]
fn release_never_drops_entries_after_the_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes: 512 };
    {
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        fill(&mut wal, 1..=60);
        wal.save_snapshot(&SnapshotMarker {
            index: 20,
            term: 1,
            conf_state: vec![7],
        })
        .unwrap();
        let before = wal.segment_count();
        wal.release_to(50).unwrap();
        assert!(wal.segment_count() < before, "segments up to 20 go");
        // Without any snapshot marker nothing is covered, so nothing may go.
    }
    let (_, rec) = Wal::open(tmp.path(), opts.clone()).unwrap();
    assert_eq!(rec.snapshot.unwrap().index, 20);
    assert_eq!(rec.entries, entries(21..=60, 1));

    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), opts).unwrap();
    fill(&mut wal, 1..=30);
    let before = wal.segment_count();
    wal.release_to(u64::MAX).unwrap();
    assert_eq!(wal.segment_count(), before);
}

#[test]
fn segment_names_give_order_and_first_index() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes: 300 };
    let (mut wal, _) = Wal::open(tmp.path(), opts).unwrap();
    fill(&mut wal, 1..=40);
    drop(wal);
    let names = segment_names(tmp.path());
    assert!(names.len() > 3);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, names);
    for (i, name) in names.iter().enumerate() {
        let (seq, first) = name.strip_suffix(".wal").unwrap().split_once('-').unwrap();
        assert_eq!(seq.parse::<u64>().unwrap(), i as u64 + 1);
        let data = fs::read(tmp.path().join(name)).unwrap();
        let s = scan(Path::new(name), &data, false).unwrap();
        let lowest = s
            .records
            .iter()
            .find_map(|(_, r)| match r {
                Record::Entry(e) => Some(e.index),
                _ => None,
            })
            .unwrap();
        assert_eq!(first.parse::<u64>().unwrap(), lowest, "{name}");
    }
}

#[test]
fn an_interrupted_rotation_leaves_a_self_sufficient_log() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes: 400 };
    {
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        wal.save_metadata(b"cluster").unwrap();
        wal.save_snapshot(&SnapshotMarker {
            index: 0,
            term: 0,
            conf_state: vec![1],
        })
        .unwrap();
        fill(&mut wal, 1..=10);
        assert!(wal.segment_count() >= 2);
    }
    let next_seq = list_segments(tmp.path()).unwrap().last().unwrap().0 + 1;
    // A crash while building the next segment leaves a partial temp file ...
    let partial = tmp
        .path()
        .join(format!("{next_seq:016}-0000000000000011.wal.tmp"));
    fs::write(&partial, [5u8, 0, 0]).unwrap();
    {
        let (mut wal, rec) = Wal::open(tmp.path(), opts.clone()).unwrap();
        assert_eq!(rec.entries, entries(1..=10, 1));
        assert!(!partial.exists(), "unfinished segment removed");
        fill(&mut wal, 11..=12);
    }
    // ... and an empty segment file (however it came to be) must not stay headerless: once
    // everything before it is released it is all that carries metadata and membership.
    let next_seq = list_segments(tmp.path()).unwrap().last().unwrap().0 + 1;
    fs::write(segment_path(tmp.path(), next_seq, 13), []).unwrap();
    {
        let (mut wal, rec) = Wal::open(tmp.path(), opts.clone()).unwrap();
        assert_eq!(rec.entries, entries(1..=12, 1));
        wal.save_snapshot(&SnapshotMarker {
            index: 12,
            term: 1,
            conf_state: vec![1],
        })
        .unwrap();
        wal.release_to(12).unwrap();
        assert_eq!(wal.segment_count(), 1);
    }
    let (_, rec) = Wal::open(tmp.path(), opts).unwrap();
    assert_eq!(rec.metadata.as_deref(), Some(&b"cluster"[..]));
    assert_eq!(rec.snapshot.unwrap().conf_state, vec![1]);
    assert_eq!(rec.hard_state.commit, 12);
    assert!(rec.entries.is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` entries starting at `last + 1 - back` (back > 0 overwrites a suffix),
    /// optionally with a hard state in the same call.
    Append {
        back: u64,
        n: u64,
        hs: bool,
    },
    /// Snapshot marker at `last - back` (never below the previous one).
    Snapshot {
        back: u64,
    },
    /// `release_to(snapshot + extra)`: must never lose what recovery needs.
    Release {
        extra: u64,
    },
    /// Crash mid-write: the first `keep` bytes of one more record reach the tail, then reopen.
    Torn {
        keep: usize,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..4, 1u64..6, any::<bool>()).prop_map(|(back, n, hs)| Op::Append { back, n, hs }),
        1 => (0u64..6).prop_map(|back| Op::Snapshot { back }),
        1 => (0u64..20).prop_map(|extra| Op::Release { extra }),
        1 => (1usize..40).prop_map(|keep| Op::Torn { keep }),
        2 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    /// The whole logical log from index 1.
    log: Vec<WalEntry>,
    hs: HardState,
    snap: Option<SnapshotMarker>,
}

impl Model {
    fn snap_index(&self) -> u64 {
        self.snap.as_ref().map_or(0, |s| s.index)
    }
    fn last(&self) -> u64 {
        self.log
            .last()
            .map_or(0, |e| e.index)
            .max(self.snap_index())
    }
    fn check(&self, wal: &Wal, rec: &Recovered) -> Result<(), TestCaseError> {
        let want: Vec<WalEntry> = self
            .log
            .iter()
            .filter(|e| e.index > self.snap_index())
            .cloned()
            .collect();
        prop_assert_eq!(&rec.entries, &want);
        prop_assert_eq!(rec.hard_state, self.hs);
        prop_assert_eq!(&rec.snapshot, &self.snap);
        prop_assert_eq!(rec.metadata.as_deref(), Some(&b"meta"[..]));
        prop_assert_eq!(wal.last_index(), self.last());
        Ok(())
    }
}

fn reopen(dir: &Path, opts: &WalOptions, m: &Model) -> Result<Wal, TestCaseError> {
    let (wal, rec) = Wal::open(dir, opts.clone()).unwrap();
    m.check(&wal, &rec)?;
    Ok(wal)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn matches_a_model_across_overwrites_snapshots_releases_and_crashes(
        ops in prop::collection::vec(op(), 1..30)
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let opts = WalOptions { segment_bytes: 300 };
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        wal.save_metadata(b"meta").unwrap();
        let mut m = Model::default();
        let mut term = 1;
        for op in ops {
            match op {
                Op::Append { back, n, hs } => {
                    term += 1;
                    // Raft never rewrites what a snapshot already covers.
                    let start = (m.last() + 1).saturating_sub(back).max(m.snap_index() + 1);
                    let new = entries(start..=start + n - 1, term);
                    let hs = hs.then_some(HardState { term, vote: 1, commit: start - 1 });
                    m.log.truncate((start - 1) as usize);
                    m.log.extend(new.clone());
                    if let Some(h) = hs {
                        m.hs = h;
                    }
                    wal.append(&new, hs.as_ref()).unwrap();
                }
                Op::Snapshot { back } => {
                    let index = m.last().saturating_sub(back).max(m.snap_index());
                    let marker = SnapshotMarker {
                        index,
                        term,
                        conf_state: index.to_le_bytes().to_vec(),
                    };
                    wal.save_snapshot(&marker).unwrap();
                    m.snap = Some(marker);
                }
                Op::Release { extra } => {
                    wal.release_to(m.snap_index() + extra).unwrap();
                }
                Op::Torn { keep } => {
                    let at = wal.size;
                    drop(wal);
                    let tail = list_segments(tmp.path()).unwrap().pop().unwrap().1;
                    let mut rec = Vec::new();
                    put_entry(&mut rec, &entry(m.last() + 1, term, "lost in the crash"));
                    let keep = keep.min(rec.len() - 1);
                    let f = OpenOptions::new().write(true).open(&tail).unwrap();
                    f.write_all_at(&rec[..keep], at).unwrap();
                    drop(f);
                    wal = reopen(tmp.path(), &opts, &m)?;
                }
                Op::Reopen => {
                    drop(wal);
                    wal = reopen(tmp.path(), &opts, &m)?;
                }
            }
        }
        drop(wal);
        reopen(tmp.path(), &opts, &m)?;
    }
}

/// Waits (bounded) until the background zero-fill of the next segment has finished.
fn wait_prepared(wal: &Wal) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !wal.next.as_ref().expect("a preparation").is_ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "zero-fill never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn all_records(m: Option<&[u8]>, batches: &[(Vec<WalEntry>, HardState)]) -> Vec<Record> {
    let mut want = Vec::new();
    if let Some(m) = m {
        want.push(Record::Metadata(m.to_vec()));
    }
    for (es, hs) in batches {
        want.extend(es.iter().cloned().map(Record::Entry));
        want.push(Record::HardState(*hs));
    }
    want
}

#[test]
fn appends_within_a_segment_change_neither_length_nor_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes: 1 << 20,
    };
    let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
    let path = only_segment(tmp.path());
    let at_open = fs::metadata(&path).unwrap();
    assert_eq!(at_open.len(), opts.segment_bytes, "created at full length");
    assert!(
        at_open.blocks() * 512 >= opts.segment_bytes,
        "blocks really allocated, not a sparse file"
    );
    assert!(prealloc::is_zero(&fs::read(&path).unwrap()));
    wal.save_metadata(b"meta").unwrap();
    let mut batches = Vec::new();
    for i in 0..200u64 {
        let es = entries(i * 3 + 1..=i * 3 + 3, 1);
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: i * 3 + 3,
        };
        wal.append(&es, Some(&hs)).unwrap();
        batches.push((es, hs));
        let m = fs::metadata(&path).unwrap();
        assert_eq!(m.len(), opts.segment_bytes, "length after append {i}");
        assert_eq!(m.blocks(), at_open.blocks(), "allocation after append {i}");
    }
    assert_eq!(wal.segment_count(), 1);
    let written = wal.size;
    assert!(written < opts.segment_bytes);
    drop(wal);
    let data = fs::read(&path).unwrap();
    assert!(
        prealloc::is_zero(&data[written as usize..]),
        "zero tail intact"
    );

    let (wal, rec) = Wal::open(tmp.path(), opts).unwrap();
    assert_eq!(
        wal.size, written,
        "next append goes right after the last record"
    );
    assert_eq!(rec.metadata.as_deref(), Some(&b"meta"[..]));
    assert_eq!(rec.entries, entries(1..=600, 1));
    assert_eq!(rec.hard_state.commit, 600);
    assert_eq!(
        read_records(tmp.path()).unwrap(),
        all_records(Some(b"meta"), &batches),
        "exactly the records, nothing read from the zeros"
    );
}

#[test]
fn a_batch_larger_than_the_room_left_extends_the_segment_then_rotates() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes: 4096,
    };
    let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
    let big: Vec<WalEntry> = (1..=3).map(|i| entry(i, 1, &"x".repeat(2000))).collect();
    wal.append(&big, None).unwrap();
    assert_eq!(wal.segment_count(), 2);
    let segs = list_segments(tmp.path()).unwrap();
    let first_len = fs::metadata(&segs[0].1).unwrap().len();
    assert!(first_len > opts.segment_bytes, "grew to {first_len}");
    assert_eq!(fs::metadata(&segs[1].1).unwrap().len(), opts.segment_bytes);
    wal.append(&entries(4..=4, 1), None).unwrap();
    drop(wal);
    let (_, rec) = Wal::open(tmp.path(), opts).unwrap();
    let mut want = big;
    want.extend(entries(4..=4, 1));
    assert_eq!(rec.entries, want);
}

#[test]
fn a_partial_record_in_the_zero_region_is_a_torn_tail_and_appends_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    wal.append(&entries(1..=3, 1), None).unwrap();
    let good = wal.size;
    drop(wal);
    let path = only_segment(tmp.path());
    let before = fs::read(&path).unwrap();
    // The crash: the header and half the body of the next record reached the disk.
    let mut rec = Vec::new();
    put_entry(&mut rec, &entry(4, 1, "never acknowledged"));
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&rec[..rec.len() / 2], good).unwrap();
    drop(f);

    let (mut wal, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.entries, entries(1..=3, 1));
    assert_eq!(wal.size, good);
    assert!(
        fs::read(&path).unwrap() == before,
        "partial record zeroed, preallocation kept"
    );
    wal.append(&entries(4..=5, 2), None).unwrap();
    drop(wal);
    let (_, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    let mut want = entries(1..=3, 1);
    want.extend(entries(4..=5, 2));
    assert_eq!(rec.entries, want);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        WalOptions::default().segment_bytes
    );
}

/// A write into preallocated space can persist later sectors but not earlier ones: the
/// records after the hole belong to the same unacknowledged write and must go with it.
#[test]
fn a_lost_sector_inside_the_last_write_is_a_torn_tail_but_corruption_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SMALL;
    let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
    wal.append(&entries(1..=2, 1), None).unwrap();
    let good = wal.size as usize;
    let batch: Vec<WalEntry> = (3..=40).map(|i| entry(i, 2, &"y".repeat(100))).collect();
    wal.append(&batch, None).unwrap();
    let end = wal.size as usize;
    drop(wal);
    let path = only_segment(tmp.path());
    let full = fs::read(&path).unwrap();
    // Record boundaries of the batch, to know what survives a hole.
    let mut starts = Vec::new();
    let mut at = good;
    for e in &batch {
        starts.push(at);
        at += encoded_len(|b| put_entry(b, e)) as usize;
    }
    assert_eq!(at, end);
    let hole = (good / prealloc::SECTOR + 2) * prealloc::SECTOR;
    assert!(
        hole + prealloc::SECTOR < end - 200,
        "valid records follow the hole"
    );
    let mut holed = full.clone();
    holed[hole..hole + prealloc::SECTOR].fill(0);
    fs::write(&path, &holed).unwrap();

    let (mut wal, rec) = Wal::open(tmp.path(), opts.clone()).unwrap();
    let kept = starts.iter().filter(|&&s| s < hole).count() - 1; // the one the hole cuts
    let mut want = entries(1..=2, 1);
    want.extend(batch[..kept].iter().cloned());
    assert_eq!(rec.entries, want);
    let cut = starts[kept];
    assert!(
        fs::read(&path).unwrap() == cut_into_zeros(&full, cut),
        "everything from the damaged record on zeroed"
    );
    wal.append(&entries(3 + kept as u64..=3 + kept as u64, 3), None)
        .unwrap();
    // The same hole in a segment that is no longer the last is damage to synced data.
    let mut i = 4 + kept as u64;
    while wal.segment_count() == 1 {
        fill(&mut wal, i..=i);
        i += 1;
    }
    drop(wal);
    let first = list_segments(tmp.path()).unwrap()[0].1.clone();
    let mut data = fs::read(&first).unwrap();
    data[hole..hole + prealloc::SECTOR].fill(0);
    fs::write(&first, &data).unwrap();
    match Wal::open(tmp.path(), opts) {
        Err(WalError::Corrupt { path, .. }) => assert_eq!(path, first),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("hole in a synced segment accepted"),
    }
    assert!(
        fs::read(&first).unwrap() == data,
        "refused log left untouched"
    );
}

#[test]
fn an_earlier_segment_may_end_in_zeros_but_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let big = WalOptions {
        segment_bytes: 8192,
    };
    let small = WalOptions { segment_bytes: 256 };
    let written = {
        let (mut wal, _) = Wal::open(tmp.path(), big).unwrap();
        wal.save_metadata(b"m").unwrap();
        fill(&mut wal, 1..=3);
        wal.size
    };
    {
        // A smaller limit rotates at the next append, leaving the first segment with a
        // zero tail behind it, which must read as a clean end like in the last segment.
        let (mut wal, _) = Wal::open(tmp.path(), small.clone()).unwrap();
        fill(&mut wal, 4..=4);
        assert_eq!(wal.segment_count(), 2);
        fill(&mut wal, 5..=6);
    }
    let first = list_segments(tmp.path()).unwrap()[0].1.clone();
    let (_, rec) = Wal::open(tmp.path(), small.clone()).unwrap();
    assert_eq!(rec.entries, entries(1..=6, 1));
    // Metadata and 4 (entry, hard state) pairs, then the second segment's header (metadata,
    // hard state) and 2 more pairs.
    assert_eq!(
        read_records(tmp.path()).unwrap().len(),
        1 + 4 * 2 + 2 + 2 * 2
    );

    let mut data = fs::read(&first).unwrap();
    let end_marker = written as usize
        + encoded_len(|b| {
            put_entry(b, &entries(4..=4, 1)[0]);
            put_hard_state(b, &HardState::default());
        }) as usize;
    assert!(prealloc::is_zero(&data[end_marker..]));
    let stray = data.len() - 100;
    data[stray] = 1;
    fs::write(&first, &data).unwrap();
    match Wal::open(tmp.path(), small) {
        Err(WalError::Corrupt {
            path,
            offset,
            reason,
        }) => {
            assert_eq!(path, first);
            assert_eq!(offset, end_marker as u64);
            assert!(reason.contains(&stray.to_string()), "{reason}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a non-zero byte after the end marker accepted"),
    }
    assert!(
        fs::read(&first).unwrap() == data,
        "refused log left untouched"
    );
    assert!(read_records(tmp.path()).is_err());
}

#[test]
fn rotation_takes_the_prepared_file_when_it_is_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SMALL;
    {
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        wal.save_metadata(b"m").unwrap();
    }
    // Junk left where the next segment is prepared is removed at open, not reused.
    let prepared = prepared_path(tmp.path(), 2);
    fs::write(&prepared, b"junk that must not end up in a segment").unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
    assert!(
        wal.next.is_none(),
        "nothing is prepared while the tail is mostly empty"
    );
    let mut i = 1;
    while wal.next.is_none() {
        fill(&mut wal, i..=i);
        i += 1;
    }
    assert!(
        wal.size >= opts.segment_bytes / 2,
        "prepared once half full"
    );
    wait_prepared(&wal);
    let ready = fs::read(&prepared).unwrap();
    assert_eq!(ready.len() as u64, opts.segment_bytes);
    assert!(prealloc::is_zero(&ready));
    let ino = fs::metadata(&prepared).unwrap().ino();
    while wal.segment_count() == 1 {
        fill(&mut wal, i..=i);
        i += 1;
    }
    let second = list_segments(tmp.path()).unwrap()[1].1.clone();
    let m = fs::metadata(&second).unwrap();
    assert_eq!(m.ino(), ino, "the prepared file became the segment");
    assert_eq!(m.len(), opts.segment_bytes);
    assert!(!prepared.exists(), "renamed, not copied");
    while wal.next.is_none() {
        fill(&mut wal, i..=i);
        i += 1;
    }
    wait_prepared(&wal);
    assert_eq!(
        fs::metadata(prepared_path(tmp.path(), 3)).unwrap().len(),
        opts.segment_bytes,
        "the one after is prepared next"
    );
    still_appends_after_rotation(wal, tmp.path(), opts, i);
}

/// Appends entries `i..=i+3` after a rotation, reopens, and finds the whole log (metadata "m",
/// entries from 1) in order.
fn still_appends_after_rotation(mut wal: Wal, dir: &Path, opts: WalOptions, i: u64) {
    fill(&mut wal, i..=i + 3);
    drop(wal);
    let (_, rec) = Wal::open(dir, opts).unwrap();
    assert_eq!(rec.metadata.as_deref(), Some(&b"m"[..]));
    assert_eq!(rec.entries, entries(1..=i + 3, 1));
}

#[test]
fn rotation_without_a_prepared_file_makes_one_in_line() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SMALL;
    let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
    wal.save_metadata(b"m").unwrap();
    let mut i = 1;
    while wal.next.is_none() {
        fill(&mut wal, i..=i);
        i += 1;
    }
    // Cancelled part-way or not, what is left must not be taken for a ready file, and it is
    // not started again for the same segment.
    wal.next.take().unwrap().cancel();
    while wal.segment_count() == 1 {
        assert!(wal.next.is_none());
        fill(&mut wal, i..=i);
        i += 1;
    }
    let second = list_segments(tmp.path()).unwrap()[1].1.clone();
    let data = fs::read(&second).unwrap();
    assert_eq!(data.len() as u64, opts.segment_bytes);
    assert!(prealloc::is_zero(&data[wal.size as usize..]));
    while wal.next.is_none() {
        fill(&mut wal, i..=i);
        i += 1;
    }
    assert!(
        wal.segment_count() == 2,
        "background preparation resumes for the next one"
    );
    still_appends_after_rotation(wal, tmp.path(), opts, i);
}

/// Opening must not probe every offset of a 64 MiB zero tail (that took seconds) nor be
/// slowed by a torn record in front of it; the bound holds in unoptimized test builds.
#[test]
fn opening_a_64_mib_segment_stays_well_under_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions::default();
    let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
    wal.append(&entries(1..=3, 1), None).unwrap();
    let good = wal.size;
    drop(wal);
    let path = only_segment(tmp.path());
    let mut rec = Vec::new();
    put_entry(&mut rec, &entry(4, 1, "torn"));
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&rec[..rec.len() - 1], good).unwrap();
    drop(f);
    let t = std::time::Instant::now();
    let (wal, rec) = Wal::open(tmp.path(), opts.clone()).unwrap();
    let nearly_empty = t.elapsed();
    assert_eq!(rec.entries, entries(1..=3, 1));

    // Now nearly full: about 63 MiB of entries, then a torn one.
    let mut wal = wal;
    let data = "z".repeat(63 * 1024);
    for chunk in 0..32u64 {
        let es: Vec<WalEntry> = (4 + chunk * 32..4 + (chunk + 1) * 32)
            .map(|i| entry(i, 1, &data))
            .collect();
        wal.append(&es, None).unwrap();
    }
    assert_eq!(wal.segment_count(), 1);
    let good = wal.size;
    drop(wal);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x55; 100], good).unwrap();
    drop(f);
    let t = std::time::Instant::now();
    let (_, rec) = Wal::open(tmp.path(), opts).unwrap();
    let nearly_full = t.elapsed();
    assert_eq!(rec.entries.len(), 3 + 32 * 32);
    eprintln!("open: nearly empty 64 MiB segment {nearly_empty:?}, nearly full {nearly_full:?}");
    assert!(
        nearly_empty < std::time::Duration::from_secs(1),
        "{nearly_empty:?}"
    );
    assert!(
        nearly_full < std::time::Duration::from_secs(1),
        "{nearly_full:?}"
    );
}

/// The background zero-fill handle must not cost the writer its thread-safety.
#[test]
fn wal_stays_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Wal>();
}
