//! `oxcd dump-logs DATA_DIR`: the replicated log as text, one line per entry, in the spirit of
//! etcd-dump-logs (term, index, type, decoded request).

use std::fmt::Write as _;
use std::path::Path;

use oxcd_proto::etcdserverpb::{request_op::Request, InternalRaftRequest, RequestOp};
use wal::{EntryType, Record};

use crate::datadir::DataDir;

pub fn run(
    data_dir: &Path,
    out: &mut impl std::io::Write,
) -> Result<(), Box<dyn std::error::Error>> {
    let dd = DataDir::open_existing(data_dir)?;
    let records = wal::read_records(&dd.wal_dir())?;
    let entries = records
        .iter()
        .filter(|r| matches!(r, Record::Entry(_)))
        .count();
    writeln!(out, "WAL: {} ({} entries)", dd.wal_dir().display(), entries)?;
    writeln!(out, "{:>6}\t{:>10}\t{:<5}\tdata", "term", "index", "type")?;
    for rec in records {
        match rec {
            Record::Metadata(m) => writeln!(out, "# metadata {} bytes", m.len())?,
            Record::HardState(h) => writeln!(
                out,
                "# hardstate term={} vote={:x} commit={}",
                h.term, h.vote, h.commit
            )?,
            Record::Snapshot(s) => writeln!(out, "# snapshot index={} term={}", s.index, s.term)?,
            Record::Entry(e) => {
                let (kind, text) = match e.entry_type {
                    EntryType::Normal if e.data.is_empty() => ("norm", String::new()),
                    EntryType::Normal => ("norm", describe(&e.data)),
                    EntryType::ConfChange | EntryType::ConfChangeV2 => {
                        ("conf", format!("{} bytes", e.data.len()))
                    }
                };
                writeln!(out, "{:>6}\t{:>10}\t{:<5}\t{}", e.term, e.index, kind, text)?
            }
        }
    }
    Ok(())
}

/// One request in a compact, readable form.
pub fn describe(data: &[u8]) -> String {
    match applier::decode_request(data) {
        Ok(req) => describe_request(&req),
        Err(e) => format!("<undecodable: {e}>"),
    }
}

fn q(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

fn describe_request(r: &InternalRaftRequest) -> String {
    let mut s = format!("id={:x} ", r.id);
    if let Some(p) = &r.put {
        let _ = write!(s, "put key={} value={}", q(&p.key), q(&p.value));
        if p.lease != 0 {
            let _ = write!(s, " lease={:x}", p.lease);
        }
    } else if let Some(d) = &r.delete_range {
        let _ = write!(
            s,
            "delete_range key={} range_end={}",
            q(&d.key),
            q(&d.range_end)
        );
    } else if let Some(t) = &r.txn {
        let _ = write!(
            s,
            "txn compare={} success=[{}] failure=[{}]",
            t.compare.len(),
            ops(&t.success),
            ops(&t.failure)
        );
    } else if let Some(c) = &r.compaction {
        let _ = write!(
            s,
            "compaction revision={} physical={}",
            c.revision, c.physical
        );
    } else if let Some(r) = &r.range {
        let _ = write!(s, "range key={} range_end={}", q(&r.key), q(&r.range_end));
    } else if let Some(g) = &r.lease_grant {
        let _ = write!(s, "lease_grant id={:x} ttl={}", g.id, g.ttl);
    } else if let Some(g) = &r.lease_revoke {
        let _ = write!(s, "lease_revoke id={:x}", g.id);
    } else {
        let _ = write!(s, "{r:?}");
    }
    s
}

fn ops(ops: &[RequestOp]) -> String {
    ops.iter()
        .map(|op| match &op.request {
            Some(Request::RequestPut(p)) => format!("put {}={}", q(&p.key), q(&p.value)),
            Some(Request::RequestRange(r)) => format!("range {}", q(&r.key)),
            Some(Request::RequestDeleteRange(d)) => format!("delete {}", q(&d.key)),
            Some(Request::RequestTxn(_)) => "txn".to_string(),
            None => "empty".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxcd_proto::etcdserverpb::PutRequest;

    #[test]
    fn describes_a_put() {
        let req = InternalRaftRequest {
            id: 0x10,
            put: Some(PutRequest {
                key: b"foo".to_vec(),
                value: b"bar".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = describe(&applier::encode_request(&req));
        assert_eq!(text, "id=10 put key=\"foo\" value=\"bar\"");
    }
}
