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

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` entries starting at `last + 1 - back` (back > 0 overwrites a suffix).
    Append {
        back: u64,
        n: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4, 1u64..6).prop_map(|(back, n)| Op::Append { back, n }),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn matches_a_model_across_overwrites_and_reopens(ops in prop::collection::vec(op(), 1..25)) {
        let tmp = tempfile::tempdir().unwrap();
        let opts = WalOptions { segment_bytes: 300 };
        let (mut wal, _) = Wal::open(tmp.path(), opts.clone()).unwrap();
        let mut model: Vec<WalEntry> = Vec::new();
        let mut term = 1;
        for op in ops {
            match op {
                Op::Append { back, n } => {
                    term += 1;
                    let last = model.last().map_or(0, |e| e.index);
                    let start = (last + 1).saturating_sub(back).max(1);
                    let new = entries(start..=start + n - 1, term);
                    model.truncate((start - 1) as usize);
                    model.extend(new.clone());
                    wal.append(&new, None).unwrap();
                }
                Op::Reopen => {
                    drop(wal);
                    let (w, rec) = Wal::open(tmp.path(), opts.clone()).unwrap();
                    prop_assert_eq!(&rec.entries, &model);
                    wal = w;
                }
            }
        }
        drop(wal);
        let (_, rec) = Wal::open(tmp.path(), opts).unwrap();
        prop_assert_eq!(rec.entries, model);
    }
}
