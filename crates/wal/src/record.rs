//! Record framing and payload encoding (little-endian, fixed-width fields).

use crate::{EntryType, HardState, SnapshotMarker, WalEntry};

/// `len: u32` + `crc: u32`.
pub const HEADER_LEN: usize = 8;
/// Larger bodies are not something this wal writes; a bigger length field is damage.
const MAX_BODY: usize = 1 << 30;

const T_METADATA: u8 = 1;
const T_ENTRY: u8 = 2;
const T_HARD_STATE: u8 = 3;
const T_SNAPSHOT: u8 = 4;

/// One record as stored, for `oxcd dump-logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Metadata(Vec<u8>),
    Entry(WalEntry),
    HardState(HardState),
    Snapshot(SnapshotMarker),
}

/// Reserves the header, lets `body` append the body, then fills length and CRC in.
fn frame(buf: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    body(buf);
    let len = (buf.len() - start - HEADER_LEN) as u32;
    let crc = crc32fast::hash(&buf[start + HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub fn put_entry(buf: &mut Vec<u8>, e: &WalEntry) {
    frame(buf, |b| {
        b.push(T_ENTRY);
        b.extend_from_slice(&e.term.to_le_bytes());
        b.extend_from_slice(&e.index.to_le_bytes());
        b.push(match e.entry_type {
            EntryType::Normal => 0,
            EntryType::ConfChange => 1,
            EntryType::ConfChangeV2 => 2,
        });
        b.extend_from_slice(&(e.context.len() as u32).to_le_bytes());
        b.extend_from_slice(&e.context);
        b.extend_from_slice(&e.data);
    });
}

pub fn put_hard_state(buf: &mut Vec<u8>, h: &HardState) {
    frame(buf, |b| {
        b.push(T_HARD_STATE);
        b.extend_from_slice(&h.term.to_le_bytes());
        b.extend_from_slice(&h.vote.to_le_bytes());
        b.extend_from_slice(&h.commit.to_le_bytes());
    });
}

pub fn put_snapshot(buf: &mut Vec<u8>, s: &SnapshotMarker) {
    frame(buf, |b| {
        b.push(T_SNAPSHOT);
        b.extend_from_slice(&s.index.to_le_bytes());
        b.extend_from_slice(&s.term.to_le_bytes());
        b.extend_from_slice(&s.conf_state);
    });
}

pub fn put_metadata(buf: &mut Vec<u8>, m: &[u8]) {
    frame(buf, |b| {
        b.push(T_METADATA);
        b.extend_from_slice(m);
    });
}

/// Checks the frame at `off`: returns the body and the offset of the next record.
pub fn parse_at(data: &[u8], off: usize) -> Result<(&[u8], usize), String> {
    let rest = &data[off..];
    if rest.len() < HEADER_LEN {
        return Err(format!("incomplete header ({} bytes)", rest.len()));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_BODY {
        return Err(format!("implausible record length {len}"));
    }
    if rest.len() < HEADER_LEN + len {
        return Err(format!(
            "record of {len} bytes runs past the end of the file"
        ));
    }
    let body = &rest[HEADER_LEN..HEADER_LEN + len];
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".to_string());
    }
    Ok((body, off + HEADER_LEN + len))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| "record body too short".to_string())
}

/// Decodes a checksummed body. A failure here means a writer bug or a format mismatch.
pub fn decode_body(body: &[u8]) -> Result<Record, String> {
    let (&kind, p) = body.split_first().ok_or("empty record body")?;
    match kind {
        T_METADATA => Ok(Record::Metadata(p.to_vec())),
        T_HARD_STATE => Ok(Record::HardState(HardState {
            term: u64_at(p, 0)?,
            vote: u64_at(p, 8)?,
            commit: u64_at(p, 16)?,
        })),
        T_SNAPSHOT => Ok(Record::Snapshot(SnapshotMarker {
            index: u64_at(p, 0)?,
            term: u64_at(p, 8)?,
            conf_state: p.get(16..).ok_or("record body too short")?.to_vec(),
        })),
        T_ENTRY => {
            let term = u64_at(p, 0)?;
            let index = u64_at(p, 8)?;
            let entry_type = match p.get(16) {
                Some(0) => EntryType::Normal,
                Some(1) => EntryType::ConfChange,
                Some(2) => EntryType::ConfChangeV2,
                other => return Err(format!("unknown entry type {other:?}")),
            };
            let ctx_len = p
                .get(17..21)
                .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize)
                .ok_or("record body too short")?;
            let context = p
                .get(21..21 + ctx_len)
                .ok_or("context runs past the record")?;
            Ok(Record::Entry(WalEntry {
                term,
                index,
                entry_type,
                context: context.to_vec(),
                data: p[21 + ctx_len..].to_vec(),
            }))
        }
        other => Err(format!("unknown record type {other}")),
    }
}
