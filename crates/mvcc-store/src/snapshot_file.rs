//! The snapshot file: a whole store, as [`MvccStore::export`](crate::MvccStore::export) gives
//! it, in one self-checking byte stream. Maintenance.Snapshot sends it (what `etcdctl snapshot
//! save` writes to disk) and `oxcd snapshot restore` reads it back. The format is oxcd's own;
//! etcd's snapshot is its bolt database file, which oxcd cannot read (and etcd cannot read this).
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! magic    8 bytes  "OXCDSNP1"
//! record*           [key len: u32][key][value len: u32][value], one per engine record, in
//!                   engine key order (key-value history, meta, leases, members)
//! end      4 bytes  0xFFFF_FFFF where the next key length would be
//! padding           zero bytes up to a multiple of 512 bytes from the start of the file
//! sha256  32 bytes  digest of every byte before it
//! ```
//!
//! The padding is there for etcdctl: `etcdctl snapshot save` keeps only a stream whose size is
//! 32 more than a multiple of 512 (that is how it recognizes a sha256 trailer behind a bolt file,
//! whose size is a multiple of its page size), and `etcdctl snapshot restore` decides the same
//! way whether a file carries the trailer.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"OXCDSNP1";
/// The body (everything before the digest) is padded to a multiple of this.
pub const ALIGN: u64 = 512;
pub const HASH_LEN: usize = 32;
/// Stands where the next record's key length would; no key is that long.
const END_OF_RECORDS: u32 = u32::MAX;

/// One engine record: key, value.
pub type Record = (Vec<u8>, Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// etcdctl's wording, for a file without the trailer.
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    /// etcdctl's wording (Go prints a byte slice as `[1 2 3]`).
    #[error("expected sha256 {}, got {}", go_bytes(.expected), go_bytes(.got))]
    HashMismatch {
        expected: [u8; HASH_LEN],
        got: [u8; HASH_LEN],
    },
    #[error(
        "the file is an etcd snapshot (a bolt database), which oxcd cannot restore; \
         move etcd's data with a client-level copy instead"
    )]
    EtcdSnapshot,
    #[error("not an oxcd snapshot file (it does not start with \"OXCDSNP1\")")]
    BadMagic,
    #[error("snapshot file is truncated ({0})")]
    Truncated(&'static str),
    #[error("snapshot file is malformed: {0}")]
    Malformed(String),
}

fn go_bytes(b: &[u8]) -> String {
    let parts: Vec<String> = b.iter().map(u8::to_string).collect();
    format!("[{}]", parts.join(" "))
}

/// Whether a file (or stream) of `len` bytes ends in the sha256 trailer, judged as etcdctl does.
pub fn has_hash_trailer(len: u64) -> bool {
    len % ALIGN == HASH_LEN as u64
}

/// Writes a snapshot body to `out` and keeps its digest. Usage: `new`, `record` for every
/// engine record, `finish`, then append (or send) the returned digest.
pub struct Writer<W: Write> {
    out: W,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Writer<W> {
    /// Starts the body: writes the magic.
    pub fn new(out: W) -> io::Result<Self> {
        let mut w = Writer {
            out,
            sha: Sha256::new(),
            len: 0,
        };
        w.put(&MAGIC)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.sha.update(b);
        self.len += b.len() as u64;
        Ok(())
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let len = |b: &[u8]| {
            u32::try_from(b.len())
                .ok()
                .filter(|&n| n != END_OF_RECORDS)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "record of 4 GiB or more")
                })
        };
        let (kl, vl) = (len(key)?, len(value)?);
        self.put(&kl.to_be_bytes())?;
        self.put(key)?;
        self.put(&vl.to_be_bytes())?;
        self.put(value)
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the records and pads the body. Returns the writer, the body's length (a multiple of
    /// [`ALIGN`]) and the digest, which the caller writes (or sends) last.
    pub fn finish(mut self) -> io::Result<(W, u64, [u8; HASH_LEN])> {
        self.put(&END_OF_RECORDS.to_be_bytes())?;
        let pad = (ALIGN - self.len % ALIGN) % ALIGN;
        self.put(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok((self.out, self.len, self.sha.finalize().into()))
    }
}

/// Reads the records of a snapshot body back, in order.
pub struct Reader<R: Read> {
    r: R,
    /// Body bytes not read yet.
    left: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// `r` is positioned at the start of the file; `body_len` is the file's length without the
    /// digest (or the whole length of a file that has none).
    pub fn new(mut r: R, body_len: u64) -> Result<Self, SnapshotFileError> {
        check_magic(&mut r, body_len)?;
        Ok(Reader {
            r,
            left: body_len - MAGIC.len() as u64,
            done: false,
        })
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<Vec<u8>, SnapshotFileError> {
        if n > self.left {
            return Err(SnapshotFileError::Truncated(what));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => SnapshotFileError::Truncated(what),
            _ => e.into(),
        })?;
        self.left -= n;
        Ok(buf)
    }

    fn take_u32(&mut self, what: &'static str) -> Result<u32, SnapshotFileError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes(b[..].try_into().expect("4 bytes")))
    }

    /// The next `(key, value)`, or `None` after the last one (the padding is checked then).
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapshotFileError> {
        if self.done {
            return Ok(None);
        }
        let kl = self.take_u32("no end-of-records mark")?;
        if kl == END_OF_RECORDS {
            self.done = true;
            let mut rest = Vec::new();
            (&mut self.r).take(self.left).read_to_end(&mut rest)?;
            if (rest.len() as u64) < self.left {
                return Err(SnapshotFileError::Truncated("padding"));
            }
            if rest.iter().any(|&b| b != 0) {
                return Err(SnapshotFileError::Malformed(
                    "bytes after the end-of-records mark".into(),
                ));
            }
            self.left = 0;
            return Ok(None);
        }
        let key = self.take(kl.into(), "inside a key")?;
        let vl = self.take_u32("inside a record")?;
        let value = self.take(vl.into(), "inside a value")?;
        Ok(Some((key, value)))
    }
}

fn check_magic(r: &mut impl Read, body_len: u64) -> Result<(), SnapshotFileError> {
    if body_len < MAGIC.len() as u64 {
        return Err(SnapshotFileError::BadMagic);
    }
    let mut m = [0u8; MAGIC.len()];
    r.read_exact(&mut m)?;
    if m != MAGIC {
        return Err(SnapshotFileError::BadMagic);
    }
    Ok(())
}

/// A bolt database (an etcd snapshot) starts with a meta page holding 0xED0CDAED at offset 16.
fn is_bolt(head: &[u8]) -> bool {
    head.len() >= 20 && head[16..20] == 0xED0C_DAEDu32.to_le_bytes()
}

/// sha256 of the first `len` bytes of `r` (read from its start).
fn digest_prefix<R: Read + Seek>(r: &mut R, len: u64) -> io::Result<[u8; HASH_LEN]> {
    r.seek(SeekFrom::Start(0))?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        r.read_exact(&mut buf[..n])?;
        sha.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(sha.finalize().into())
}

/// Opens a snapshot file for reading as etcdctl's restore does: a file whose size says it has
/// the sha256 trailer is checked against it (unless `skip_hash_check`), a file without one is
/// refused unless `skip_hash_check`. Nothing but the file is read.
pub fn open(
    path: &Path,
    skip_hash_check: bool,
) -> Result<Reader<io::BufReader<std::fs::File>>, SnapshotFileError> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let has_hash = has_hash_trailer(len);
    let body_len = if has_hash { len - HASH_LEN as u64 } else { len };
    let mut head = Vec::with_capacity(20);
    (&mut f).take(20).read_to_end(&mut head)?;
    if !head.starts_with(&MAGIC) {
        return Err(if is_bolt(&head) {
            SnapshotFileError::EtcdSnapshot
        } else {
            SnapshotFileError::BadMagic
        });
    }
    if !has_hash && !skip_hash_check {
        return Err(SnapshotFileError::MissingHash);
    }
    if has_hash && !skip_hash_check {
        let got = digest_prefix(&mut f, body_len)?;
        let mut expected = [0u8; HASH_LEN];
        f.seek(SeekFrom::Start(body_len))?;
        f.read_exact(&mut expected)?;
        if got != expected {
            return Err(SnapshotFileError::HashMismatch { expected, got });
        }
    }
    f.seek(SeekFrom::Start(0))?;
    Reader::new(io::BufReader::with_capacity(1 << 20, f), body_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Record> {
        vec![
            (b"k\x00\x01".to_vec(), b"value one".to_vec()),
            (b"l\x00".to_vec(), Vec::new()),
            (Vec::new(), b"empty key".to_vec()),
            (b"m/applied".to_vec(), vec![7u8; 3000]),
        ]
    }

    /// A whole snapshot file as etcdctl would store it: body, then the digest.
    fn file_bytes(recs: &[Record]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        for (k, v) in recs {
            w.record(k, v).unwrap();
        }
        let (mut out, body_len, hash) = w.finish().unwrap();
        assert_eq!(body_len, out.len() as u64);
        assert_eq!(body_len % ALIGN, 0);
        out.extend_from_slice(&hash);
        out
    }

    fn write_tmp(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("snap.db");
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    fn read_all<R: Read>(mut r: Reader<R>) -> Result<Vec<Record>, SnapshotFileError> {
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    #[test]
    fn round_trip_through_a_file() {
        for recs in [records(), Vec::new()] {
            let bytes = file_bytes(&recs);
            assert!(
                has_hash_trailer(bytes.len() as u64),
                "{} bytes",
                bytes.len()
            );
            assert_eq!(&bytes[..8], b"OXCDSNP1");
            let (_d, p) = write_tmp(&bytes);
            assert_eq!(read_all(open(&p, false).unwrap()).unwrap(), recs);
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_fails_the_hash_check() {
        let bytes = file_bytes(&records());
        for at in [9, 40, bytes.len() - 40, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let (_d, p) = write_tmp(&bad);
            let err = open(&p, false).err().expect("corruption must be refused");
            assert!(
                matches!(err, SnapshotFileError::HashMismatch { .. }),
                "byte {at}: {err}"
            );
            let text = err.to_string();
            assert!(text.starts_with("expected sha256 ["), "{text}");
            assert!(text.contains("], got ["), "{text}");
        }
    }

    #[test]
    fn skip_hash_check_reads_without_the_digest() {
        let mut bytes = file_bytes(&records());
        // A wrong digest is ignored when asked to...
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        let (_d, p) = write_tmp(&bytes);
        assert_eq!(read_all(open(&p, true).unwrap()).unwrap(), records());
        // ...and a file without one needs the flag, as with etcdctl.
        let (_d2, p2) = write_tmp(&bytes[..n - HASH_LEN]);
        let err = open(&p2, false).err().unwrap();
        assert_eq!(
            err.to_string(),
            "snapshot missing hash but --skip-hash-check=false"
        );
        assert_eq!(read_all(open(&p2, true).unwrap()).unwrap(), records());
    }

    #[test]
    fn foreign_files_are_named_for_what_they_are() {
        let (_d, p) = write_tmp(b"hello");
        assert!(matches!(open(&p, true), Err(SnapshotFileError::BadMagic)));
        let mut other = file_bytes(&records());
        other[..8].copy_from_slice(b"OXCDSNP9");
        let (_d2, p2) = write_tmp(&other);
        // The magic is checked before the digest, whatever the flag.
        assert!(matches!(open(&p2, false), Err(SnapshotFileError::BadMagic)));
        // A bolt file (etcd's snapshot) with its trailer.
        let mut bolt = vec![0u8; 4096 + 32];
        bolt[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
        let (_d3, p3) = write_tmp(&bolt);
        assert!(matches!(
            open(&p3, false),
            Err(SnapshotFileError::EtcdSnapshot)
        ));
    }

    #[test]
    fn damage_inside_the_body_is_found_without_the_hash() {
        let bytes = file_bytes(&records());
        let body = &bytes[..bytes.len() - HASH_LEN];
        // A key length running past the end.
        let mut long = body.to_vec();
        long[8..12].copy_from_slice(&0x00FF_0000u32.to_be_bytes());
        assert!(matches!(
            read_all(Reader::new(&long[..], long.len() as u64).unwrap()),
            Err(SnapshotFileError::Truncated(_))
        ));
        // Cut before the end-of-records mark.
        assert!(matches!(
            read_all(Reader::new(&body[..30], 30).unwrap()),
            Err(SnapshotFileError::Truncated(_))
        ));
        // Garbage in the padding.
        let mut pad = body.to_vec();
        let last = pad.len() - 1;
        pad[last] = 1;
        assert!(matches!(
            read_all(Reader::new(&pad[..], pad.len() as u64).unwrap()),
            Err(SnapshotFileError::Malformed(_))
        ));
    }
}
