//! Key-value scenarios: `put`, `range` and `txn-put`.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use oxcd_proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};

use super::{closed_loop, make_key, mix, status_kind, Common, Pool, Report};
use crate::error::{Error, Result};

/// Which keys the writes go to.
#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// Key size in bytes (ASCII digits, zero padded, after the prefix).
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys written.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Walk the key space in order instead of at random.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Prefix of every key.
    #[arg(long, default_value = "")]
    pub key_prefix: String,
}

impl KeyArgs {
    fn validate(&self) -> Result<()> {
        if self.key_space_size == 0 {
            return Err(Error::Usage("--key-space-size must be at least 1".into()));
        }
        if self.key_size == 0 && self.key_prefix.is_empty() {
            return Err(Error::Usage("--key-size must be at least 1".into()));
        }
        Ok(())
    }

    /// The key number operation `i` touches.
    fn key_number(&self, i: u64) -> u64 {
        if self.sequential_keys {
            i % self.key_space_size
        } else {
            mix(i ^ 0x5eed) % self.key_space_size
        }
    }

    fn key(&self, n: u64) -> Vec<u8> {
        make_key(self.key_prefix.as_bytes(), n, self.key_size)
    }
}

/// A value of `size` bytes of varied printable text, the same for every request.
fn value_bytes(size: usize) -> Vec<u8> {
    (0..size as u64)
        .map(|i| b'a' + (mix(i) % 26) as u8)
        .collect()
}

#[derive(Args, Debug, Clone)]
pub struct PutArgs {
    /// Total number of put requests.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// Puts `total` keys; one request per operation.
pub async fn put(common: &Common, args: &PutArgs) -> Result<Report> {
    args.keys.validate()?;
    let pool = Pool::connect(common).await?;
    let keys = Arc::new(args.keys.clone());
    let value = Arc::new(value_bytes(args.keys.val_size));
    let report = closed_loop("put", common, args.total, move |c, i| {
        let mut kv = pool.kv(c);
        let req = PutRequest {
            key: keys.key(keys.key_number(i)),
            value: value.as_ref().clone(),
            ..Default::default()
        };
        async move {
            kv.put(req)
                .await
                .map(|_| ())
                .map_err(|s| status_kind("", &s))
        }
    })
    .await;
    Ok(report)
}

/// Read consistency of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Linearizable: confirmed with the leader (a read index round).
    L,
    /// Serializable: served from the member's local state.
    S,
}

#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Total number of range requests.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Read consistency: l (linearizable) or s (serializable).
    #[arg(long, value_enum, default_value_t = Consistency::L)]
    pub consistency: Consistency,
    /// A fixed key to read; without it each request reads one random key of the key space.
    #[arg(long)]
    pub key: Option<String>,
    /// With --key: the end of the range (exclusive).
    #[arg(long)]
    pub range_end: Option<String>,
    /// Maximum number of keys returned per request (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Key size of the random keys read.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Number of distinct random keys read.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Prefix of the random keys.
    #[arg(long, default_value = "")]
    pub key_prefix: String,
}

pub async fn range(common: &Common, args: &RangeArgs) -> Result<Report> {
    if args.key.is_none() && args.key_space_size == 0 {
        return Err(Error::Usage("--key-space-size must be at least 1".into()));
    }
    let pool = Pool::connect(common).await?;
    let args = Arc::new(args.clone());
    let label = match args.consistency {
        Consistency::L => "range-linearizable",
        Consistency::S => "range-serializable",
    };
    let report = closed_loop(label, common, args.total, move |c, i| {
        let mut kv = pool.kv(c);
        let (key, range_end) = match &args.key {
            Some(k) => (
                k.clone().into_bytes(),
                args.range_end
                    .clone()
                    .map(String::into_bytes)
                    .unwrap_or_default(),
            ),
            None => (
                make_key(
                    args.key_prefix.as_bytes(),
                    mix(i ^ 0x4a4e) % args.key_space_size,
                    args.key_size,
                ),
                Vec::new(),
            ),
        };
        let req = RangeRequest {
            key,
            range_end,
            limit: args.limit,
            serializable: args.consistency == Consistency::S,
            ..Default::default()
        };
        async move {
            kv.range(req)
                .await
                .map(|_| ())
                .map_err(|s| status_kind("", &s))
        }
    })
    .await;
    Ok(report)
}

#[derive(Args, Debug, Clone)]
pub struct TxnPutArgs {
    /// Total number of transactions.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Puts per transaction (distinct keys).
    #[arg(long, default_value_t = 1)]
    pub txn_ops: u64,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// Transactions without compares whose success branch puts `txn_ops` distinct keys.
pub async fn txn_put(common: &Common, args: &TxnPutArgs) -> Result<Report> {
    args.keys.validate()?;
    if args.txn_ops == 0 || args.txn_ops > args.keys.key_space_size {
        return Err(Error::Usage(format!(
            "--txn-ops must be between 1 and --key-space-size ({})",
            args.keys.key_space_size
        )));
    }
    let pool = Pool::connect(common).await?;
    let keys = Arc::new(args.keys.clone());
    let value = Arc::new(value_bytes(args.keys.val_size));
    let ops = args.txn_ops;
    let report = closed_loop("txn-put", common, args.total, move |c, i| {
        let mut kv = pool.kv(c);
        // Consecutive key numbers from a per-transaction start: distinct as long as
        // txn_ops <= key space, which etcd requires (no duplicate keys in one txn).
        let first = keys.key_number(i);
        let success = (0..ops)
            .map(|j| RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: keys.key((first + j) % keys.key_space_size),
                    value: value.as_ref().clone(),
                    ..Default::default()
                })),
            })
            .collect();
        let req = TxnRequest {
            success,
            ..Default::default()
        };
        async move {
            kv.txn(req)
                .await
                .map(|_| ())
                .map_err(|s| status_kind("", &s))
        }
    })
    .await;
    Ok(report)
}
