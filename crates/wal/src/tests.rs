use super::*;
use proptest::prelude::*;

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

#[test]
fn torn_tail_is_truncated_at_every_cut_point() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    wal.append(&entries(1..=3, 1), None).unwrap();
    let path = only_segment(tmp.path());
    let good = fs::metadata(&path).unwrap().len();
    wal.append(&entries(4..=4, 1), None).unwrap();
    drop(wal);
    let full = fs::read(&path).unwrap();
    for cut in good..full.len() as u64 {
        fs::write(&path, &full[..cut as usize]).unwrap();
        let (_, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        assert_eq!(rec.entries, entries(1..=3, 1), "cut at {cut}");
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            good,
            "truncated to last good record"
        );
    }
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        wal.append(&entries(1..=2, 1), None).unwrap();
    }
    let path = only_segment(tmp.path());
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&[0xde, 0xad, 0xbe, 0xef, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7])
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
    {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        for i in 1..=10 {
            wal.append(&entries(i..=i, 1), None).unwrap();
        }
    }
    let path = only_segment(tmp.path());
    let mut data = fs::read(&path).unwrap();
    let record_len = data.len() / 10;
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
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    wal.append(&entries(1..=3, 1), Some(&hs1)).unwrap();
    let path = only_segment(tmp.path());
    let good = fs::metadata(&path).unwrap().len();
    let batch = entries(4..=8, 2);
    wal.append(&batch, Some(&hs2)).unwrap();
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
    assert_eq!(at, full.len() as u64);
    for cut in good..full.len() as u64 {
        fs::write(&path, &full[..cut as usize]).unwrap();
        let (_, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        let whole = ends.iter().filter(|&&end| end <= cut).count() as u64;
        let mut want = entries(1..=3, 1);
        want.extend(entries(4..=3 + whole, 2));
        assert_eq!(rec.entries, want, "cut at {cut}");
        assert_eq!(rec.hard_state, hs1, "cut at {cut}");
        let kept = ends.iter().rev().find(|&&end| end <= cut).copied();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            kept.unwrap_or(good),
            "cut at {cut}: truncated to the last whole record"
        );
    }
}

#[test]
fn read_records_tolerates_a_torn_tail_without_repairing_it() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        wal.save_metadata(b"m").unwrap();
        wal.append(&entries(1..=2, 1), None).unwrap();
    }
    let path = only_segment(tmp.path());
    let mut data = fs::read(&path).unwrap();
    data.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
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
    let size = fs::metadata(only_segment(tmp.path())).unwrap().len();
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
    assert_eq!(fs::metadata(only_segment(tmp.path())).unwrap().len(), size);
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
    let good = fs::metadata(&path).unwrap().len();
    wal.fail_next_write_after = Some(10);
    assert!(matches!(
        wal.append(&entries(4..=6, 1), None),
        Err(WalError::Io { .. })
    ));
    // Writing on after a partial record would bury it mid-log, where reopen must refuse it.
    assert!(wal.append(&entries(4..=6, 1), None).is_err());
    assert!(wal.save_metadata(b"m").is_err());
    assert!(wal.save_snapshot(&SnapshotMarker::default()).is_err());
    assert_eq!(fs::metadata(&path).unwrap().len(), good + 10);
    drop(wal);
    let (mut wal, rec) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.entries, entries(1..=3, 1));
    assert_eq!(fs::metadata(&path).unwrap().len(), good);
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
                    drop(wal);
                    let tail = list_segments(tmp.path()).unwrap().pop().unwrap().1;
                    let mut rec = Vec::new();
                    put_entry(&mut rec, &entry(m.last() + 1, term, "lost in the crash"));
                    let keep = keep.min(rec.len() - 1);
                    let mut f = OpenOptions::new().append(true).open(&tail).unwrap();
                    f.write_all(&rec[..keep]).unwrap();
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
