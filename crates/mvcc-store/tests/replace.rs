//! `KvEngine::replace`: what a member far behind installs another member's state with. The
//! new content streams into a staging area and one commit swaps it in; until then, and if it
//! is dropped, the old content stays.

use std::path::Path;

use mvcc_store::{EngineError, KvEngine, MemEngine, RocksEngine, WriteBatch, KEY_SPACE_END};

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn content(e: &dyn KvEngine) -> Pairs {
    let mut all = Vec::new();
    e.scan_all(&mut |k, v| {
        all.push((k.to_vec(), v.to_vec()));
        true
    })
    .unwrap();
    all
}

fn pairs(list: &[(&[u8], &[u8])]) -> Pairs {
    list.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

fn replace_with(e: &dyn KvEngine, new: &Pairs) -> Result<(), EngineError> {
    let mut r = e.replace()?;
    for (k, v) in new {
        r.put(k, v)?;
    }
    r.commit()
}

/// Old content spread over what RocksDB keeps in files and in its memtable, with keys of
/// every layer's prefix and the extremes of the key space.
fn fill_old(e: &dyn KvEngine) {
    let mut b = WriteBatch::default();
    for (k, v) in [
        (&b""[..], &b"empty key"[..]),
        (b"\x00", b"lowest"),
        (b"a/1", b"alarm"),
        (b"c/1", b"member"),
        (b"k1", b"old"),
        (b"k2", b"old"),
    ] {
        b.put(k, v);
    }
    e.write(b).unwrap();
    e.flush().unwrap();
    let mut b = WriteBatch::default();
    for (k, v) in [
        (&b"k3"[..], &b"old"[..]),
        (b"l/1", b"lease"),
        (b"m/applied", b"7"),
        (b"\xfe\xff\xff", b"highest below the end"),
        // Beyond the key space: no layer writes such keys, but the old content must still
        // go whole.
        (b"\xff", b"beyond"),
        (b"\xff\xff\x01", b"beyond"),
    ] {
        b.put(k, v);
    }
    e.write(b).unwrap();
}

fn new_content() -> Pairs {
    pairs(&[
        (b"\x00", b"lowest, new"),
        (b"k2", b"new"),
        (b"k4", b"new"),
        (b"m/applied", b"9"),
        (b"\xfe\xff\xff", b"highest, new"),
    ])
}

/// Keys only in the old content go, keys in both take the new value, new keys appear.
fn replaces_everything(e: &dyn KvEngine) {
    fill_old(e);
    replace_with(e, &new_content()).unwrap();
    assert_eq!(content(e), new_content());
    for gone in [&b""[..], b"a/1", b"k1", b"k3", b"\xff", b"\xff\xff\x01"] {
        assert_eq!(e.get(gone).unwrap(), None, "{gone:?} survived");
    }
    assert_eq!(e.get(b"k2").unwrap().as_deref(), Some(&b"new"[..]));
    // Later writes land on top of the new content as usual.
    let mut b = WriteBatch::default();
    b.put(b"k1".to_vec(), b"again".to_vec());
    b.delete(b"k4".to_vec());
    e.write(b).unwrap();
    assert_eq!(e.get(b"k1").unwrap().as_deref(), Some(&b"again"[..]));
    assert_eq!(e.get(b"k4").unwrap(), None);
}

fn empty_replacement_empties(e: &dyn KvEngine) {
    fill_old(e);
    replace_with(e, &Vec::new()).unwrap();
    assert_eq!(content(e), Pairs::new());
    // Twice in a row: the second one replaces an empty engine.
    replace_with(e, &new_content()).unwrap();
    assert_eq!(content(e), new_content());
}

fn order_and_key_space_are_enforced(e: &dyn KvEngine) {
    fill_old(e);
    let old = content(e);
    for bad in [
        pairs(&[(b"k2", b"v"), (b"k1", b"v")]),
        pairs(&[(b"k1", b"v"), (b"k1", b"w")]),
        pairs(&[(b"k1", b"v"), (KEY_SPACE_END, b"v")]),
    ] {
        let mut r = e.replace().unwrap();
        let (last, first) = bad.split_last().unwrap();
        for (k, v) in first {
            r.put(k, v).unwrap();
        }
        let err = r.put(&last.0, &last.1).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::OutOfOrder { .. } | EngineError::BeyondKeySpace(_)
            ),
            "{err}"
        );
        drop(r);
        assert_eq!(content(e), old);
    }
}

fn dropped_replacement_changes_nothing(e: &dyn KvEngine) {
    fill_old(e);
    let old = content(e);
    let mut r = e.replace().unwrap();
    for (k, v) in new_content() {
        r.put(&k, &v).unwrap();
    }
    // The old content stays readable while a replacement is being written.
    assert_eq!(content(e), old);
    drop(r);
    assert_eq!(content(e), old);
    // Nor does one that received nothing.
    drop(e.replace().unwrap());
    assert_eq!(content(e), old);
}

#[test]
fn mem_replaces_everything() {
    replaces_everything(&MemEngine::default());
}

#[test]
fn mem_empty_replacement_empties() {
    empty_replacement_empties(&MemEngine::default());
}

#[test]
fn mem_order_and_key_space_are_enforced() {
    order_and_key_space_are_enforced(&MemEngine::default());
}

#[test]
fn mem_dropped_replacement_changes_nothing() {
    dropped_replacement_changes_nothing(&MemEngine::default());
}

/// Files in the DB directory that a replacement stages.
fn staging_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("oxcd-install-"))
        .collect()
}

fn rocks(dir: &Path) -> RocksEngine {
    RocksEngine::open(dir).unwrap()
}

#[test]
fn rocks_replaces_everything_and_keeps_it_after_reopen() {
    let d = tempfile::tempdir().unwrap();
    let e = rocks(d.path());
    replaces_everything(&e);
    let expected = content(&e);
    drop(e);
    let e = rocks(d.path());
    assert_eq!(content(&e), expected);
    assert!(staging_files(d.path()).is_empty());
}

#[test]
fn rocks_empty_replacement_empties() {
    let d = tempfile::tempdir().unwrap();
    let e = rocks(d.path());
    empty_replacement_empties(&e);
    replace_with(&e, &Vec::new()).unwrap();
    drop(e);
    assert_eq!(content(&rocks(d.path())), Pairs::new());
}

#[test]
fn rocks_order_and_key_space_are_enforced() {
    let d = tempfile::tempdir().unwrap();
    let e = rocks(d.path());
    order_and_key_space_are_enforced(&e);
    assert!(staging_files(d.path()).is_empty());
}

#[test]
fn rocks_dropped_replacement_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let e = rocks(d.path());
    fill_old(&e);
    let old = content(&e);
    let mut r = e.replace().unwrap();
    r.put(b"k9", b"staged").unwrap();
    assert_eq!(
        staging_files(d.path()).len(),
        1,
        "staged on disk, not in memory"
    );
    drop(r);
    assert!(staging_files(d.path()).is_empty());
    dropped_replacement_changes_nothing(&e);
    e.flush().unwrap();
    drop(e);
    assert_eq!(content(&rocks(d.path())), old);
}

/// A crash after RocksDB linked the staged file into its own but before it removed the
/// staging name leaves two names for one live table. Reopening unlinks the staging name, and
/// the next replacement (whose counter starts over) must not write through it.
#[test]
fn rocks_staging_name_left_by_a_crash_is_harmless() {
    let d = tempfile::tempdir().unwrap();
    let e = rocks(d.path());
    replace_with(&e, &new_content()).unwrap();
    drop(e);
    let tables: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .collect();
    assert!(!tables.is_empty());
    for (n, t) in tables.iter().enumerate() {
        std::fs::hard_link(t, d.path().join(format!("oxcd-install-{n}.sst"))).unwrap();
    }
    let e = rocks(d.path());
    assert!(staging_files(d.path()).is_empty());
    assert_eq!(content(&e), new_content());
    // Without the unlink at open, this would truncate a live table through the old name.
    for (n, t) in tables.iter().enumerate() {
        std::fs::hard_link(t, d.path().join(format!("oxcd-install-{n}.sst"))).unwrap();
    }
    let mut r = e.replace().unwrap();
    r.put(b"k1", b"v").unwrap();
    drop(r);
    drop(e);
    assert_eq!(content(&rocks(d.path())), new_content());
}
