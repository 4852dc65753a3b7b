//! Whole-state transfer for a member the leader can no longer catch up from its log: the
//! serving side streams a point-in-time export of its store in chunks, the receiving side
//! hands the records on as they arrive and checks their count. What a record means is the store's business; here they are bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxcd_proto::oxcdpeerpb::{PeerHeader, SnapshotChunk, SnapshotRequest};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{AddressBook, TransportError};

/// Bytes of records per chunk: big enough to amortize framing, small enough for the default
/// frame limits.
const CHUNK_BYTES: usize = 1 << 20;
/// How long a request for a state newer than ours waits for this member to apply it.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// The store a member serves snapshots from.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Index of the last raft entry the store reflects.
    fn applied(&self) -> u64;
    /// Every record from one point in time, in order; `f` returns false to stop early.
    fn export(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), String>;
}

/// Takes one received record; its error stops the transfer.
pub type RecordSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), String> + 'a;

/// Appends one record in the wire layout.
pub fn put_record(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
    buf.extend_from_slice(value);
}

/// Hands a chunk's records to `sink` in order; returns how many there were. A sink's error
/// stops the parsing.
pub fn parse_records(mut buf: &[u8], sink: &mut RecordSink<'_>) -> Result<usize, TransportError> {
    let bad = || TransportError::Snapshot("truncated snapshot record".into());
    let mut n = 0;
    while !buf.is_empty() {
        let mut field = || -> Result<&[u8], TransportError> {
            let len = u32::from_be_bytes(buf.get(..4).ok_or_else(bad)?.try_into().expect("4"));
            let body = buf.get(4..4 + len as usize).ok_or_else(bad)?;
            buf = &buf[4 + len as usize..];
            Ok(body)
        };
        let k = field()?;
        let v = field()?;
        sink(k, v).map_err(|e| TransportError::Snapshot(format!("storing a record: {e}")))?;
        n += 1;
    }
    Ok(n)
}

/// Serves one request: waits until this member applied `min_applied`, then streams the export
/// from a blocking thread (the store read may be long) through a small bounded channel, so a
/// slow receiver holds back the reader instead of growing memory.
pub(crate) fn serve(
    source: Arc<dyn SnapshotSource>,
    min_applied: u64,
) -> mpsc::Receiver<Result<SnapshotChunk, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + APPLY_WAIT;
        while source.applied() < min_applied {
            if Instant::now() >= deadline {
                let _ = tx.blocking_send(Err(Status::unavailable(format!(
                    "snapshot: applied index {} below the requested {min_applied}",
                    source.applied()
                ))));
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 4096);
        let mut total = 0u64;
        let mut gone = false;
        let result = source.export(&mut |k, v| {
            put_record(&mut buf, k, v);
            total += 1;
            if buf.len() >= CHUNK_BYTES {
                let chunk = SnapshotChunk {
                    records: std::mem::take(&mut buf),
                    last: false,
                    total_records: 0,
                };
                gone = tx.blocking_send(Ok(chunk)).is_err();
            }
            !gone
        });
        if gone {
            return;
        }
        let last = match result {
            Ok(()) => Ok(SnapshotChunk {
                records: buf,
                last: true,
                total_records: total,
            }),
            Err(e) => Err(Status::internal(format!("snapshot: {e}"))),
        };
        if tx.blocking_send(last).is_ok() {
            metrics::counter!("etcd_network_snapshot_send_success").increment(1);
            tracing::info!(
                records = total,
                took_ms = started.elapsed().as_millis() as u64,
                "sent snapshot"
            );
        }
    });
    rx
}

/// Fetches the state of member `header.to` (the leader that sent raft's snapshot message, or
/// another member), at least as new as `min_applied`, handing each record to `sink` as its
/// chunk arrives: only a chunk is held at a time. Returns the number of records. On an error
/// the records already handed on are an incomplete state, for the caller to discard.
pub async fn fetch_snapshot(
    book: &AddressBook,
    header: PeerHeader,
    min_applied: u64,
    sink: &mut RecordSink<'_>,
) -> Result<u64, TransportError> {
    let mut client = crate::connect(book, header.to).await?;
    let started = Instant::now();
    let mut stream = client
        .snapshot(SnapshotRequest {
            header: Some(header),
            min_applied,
        })
        .await
        .map_err(|s| TransportError::Snapshot(s.message().to_string()))?
        .into_inner();
    let mut got = 0u64;
    loop {
        let chunk = stream
            .message()
            .await
            .map_err(|s| TransportError::Snapshot(s.message().to_string()))?
            .ok_or_else(|| TransportError::Snapshot("snapshot stream ended early".into()))?;
        got += parse_records(&chunk.records, sink)? as u64;
        if chunk.last {
            if got != chunk.total_records {
                return Err(TransportError::Snapshot(format!(
                    "snapshot has {got} records, sender counted {}",
                    chunk.total_records
                )));
            }
            break;
        }
    }
    metrics::counter!("etcd_network_snapshot_receive_success").increment(1);
    tracing::info!(
        records = got,
        took_ms = started.elapsed().as_millis() as u64,
        "received snapshot"
    );
    Ok(got)
}
