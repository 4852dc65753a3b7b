//! A tokio task owning the [`Lessor`], reached through [`LeaseHandle`]. The applier sends
//! the raft-ordered operations, the gRPC layer sends keep-alives and queries, and a
//! ticker turns expired leases and due checkpoints into proposals.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::lessor::{LeaseInfo, LeaseTimeToLive, Lessor};
use crate::LeaseError;

type Reply<T> = oneshot::Sender<T>;

/// One request to the lease task; every variant carries its responder.
#[derive(Debug)]
pub enum LeaseCommand {
    Grant {
        id: i64,
        ttl: i64,
        reply: Reply<Result<LeaseInfo, LeaseError>>,
    },
    Revoke {
        id: i64,
        reply: Reply<Result<Vec<Vec<u8>>, LeaseError>>,
    },
    Attach {
        id: i64,
        key: Vec<u8>,
        reply: Reply<Result<(), LeaseError>>,
    },
    Detach {
        id: i64,
        key: Vec<u8>,
        reply: Reply<Result<(), LeaseError>>,
    },
    LeaseOf {
        key: Vec<u8>,
        reply: Reply<Option<i64>>,
    },
    Lookup {
        id: i64,
        reply: Reply<Option<LeaseInfo>>,
    },
    Leases {
        reply: Reply<Vec<LeaseInfo>>,
    },
    TimeToLive {
        id: i64,
        reply: Reply<Result<LeaseTimeToLive, LeaseError>>,
    },
    Checkpoint {
        id: i64,
        remaining_ttl: i64,
        reply: Reply<Result<(), LeaseError>>,
    },
    Promote {
        extend: Duration,
        reply: Reply<()>,
    },
    Demote {
        reply: Reply<()>,
    },
    /// Answered when the lease is renewed; for a lease past its deadline, only once it
    /// is revoked (`NotFound`) or this member is demoted (`NotPrimary`).
    Renew {
        id: i64,
        reply: Reply<Result<i64, LeaseError>>,
    },
    Expired {
        max: usize,
        reply: Reply<Vec<i64>>,
    },
    CheckpointsDue {
        max: usize,
        reply: Reply<Vec<(i64, i64)>>,
    },
    IsPrimary {
        reply: Reply<bool>,
    },
    Reload {
        reply: Reply<Result<(), LeaseError>>,
    },
}

/// Cheap, cloneable access to the lease task. The task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    tx: mpsc::Sender<LeaseCommand>,
}

impl LeaseHandle {
    /// Moves `lessor` into a new task; `capacity` bounds the command queue.
    pub fn spawn(lessor: Lessor, capacity: usize) -> (LeaseHandle, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(run(lessor, rx));
        (LeaseHandle { tx }, task)
    }

    /// Sends a raw command (its responder is answered as usual).
    pub async fn send(&self, cmd: LeaseCommand) -> Result<(), LeaseError> {
        self.tx.send(cmd).await.map_err(|_| LeaseError::Stopped)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> LeaseCommand) -> Result<T, LeaseError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| LeaseError::Stopped)
    }

    pub async fn grant(&self, id: i64, ttl: i64) -> Result<LeaseInfo, LeaseError> {
        self.call(|reply| LeaseCommand::Grant { id, ttl, reply })
            .await?
    }

    pub async fn revoke(&self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        self.call(|reply| LeaseCommand::Revoke { id, reply })
            .await?
    }

    pub async fn attach(&self, id: i64, key: Vec<u8>) -> Result<(), LeaseError> {
        self.call(|reply| LeaseCommand::Attach { id, key, reply })
            .await?
    }

    pub async fn detach(&self, id: i64, key: Vec<u8>) -> Result<(), LeaseError> {
        self.call(|reply| LeaseCommand::Detach { id, key, reply })
            .await?
    }

    pub async fn lease_of(&self, key: Vec<u8>) -> Result<Option<i64>, LeaseError> {
        self.call(|reply| LeaseCommand::LeaseOf { key, reply })
            .await
    }

    pub async fn lookup(&self, id: i64) -> Result<Option<LeaseInfo>, LeaseError> {
        self.call(|reply| LeaseCommand::Lookup { id, reply }).await
    }

    pub async fn leases(&self) -> Result<Vec<LeaseInfo>, LeaseError> {
        self.call(|reply| LeaseCommand::Leases { reply }).await
    }

    pub async fn time_to_live(&self, id: i64) -> Result<LeaseTimeToLive, LeaseError> {
        self.call(|reply| LeaseCommand::TimeToLive { id, reply })
            .await?
    }

    pub async fn checkpoint(&self, id: i64, remaining_ttl: i64) -> Result<(), LeaseError> {
        self.call(|reply| LeaseCommand::Checkpoint {
            id,
            remaining_ttl,
            reply,
        })
        .await?
    }

    pub async fn promote(&self, extend: Duration) -> Result<(), LeaseError> {
        self.call(|reply| LeaseCommand::Promote { extend, reply })
            .await
    }

    pub async fn demote(&self) -> Result<(), LeaseError> {
        self.call(|reply| LeaseCommand::Demote { reply }).await
    }

    pub async fn renew(&self, id: i64) -> Result<i64, LeaseError> {
        self.call(|reply| LeaseCommand::Renew { id, reply }).await?
    }

    pub async fn expired(&self, max: usize) -> Result<Vec<i64>, LeaseError> {
        self.call(|reply| LeaseCommand::Expired { max, reply })
            .await
    }

    pub async fn checkpoints_due(&self, max: usize) -> Result<Vec<(i64, i64)>, LeaseError> {
        self.call(|reply| LeaseCommand::CheckpointsDue { max, reply })
            .await
    }

    pub async fn is_primary(&self) -> Result<bool, LeaseError> {
        self.call(|reply| LeaseCommand::IsPrimary { reply }).await
    }

    pub async fn reload(&self) -> Result<(), LeaseError> {
        self.call(|reply| LeaseCommand::Reload { reply }).await?
    }

    /// Starts a task that every `cfg.period` collects expired leases and due
    /// checkpoints and sends them on `out`, to be proposed through raft. It holds no
    /// strong handle, so it ends with the lease task, or when `out` is closed.
    pub fn spawn_ticker(&self, cfg: TickerConfig, out: mpsc::Sender<LeaseTick>) -> JoinHandle<()> {
        let weak = self.tx.downgrade();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(cfg.period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                let handle = LeaseHandle { tx };
                let Ok(expired) = handle.expired(cfg.revokes_per_tick).await else {
                    return;
                };
                if !expired.is_empty() && out.send(LeaseTick::Revoke(expired)).await.is_err() {
                    return;
                }
                for _ in 0..cfg.checkpoint_batches_per_tick {
                    let Ok(due) = handle.checkpoints_due(cfg.checkpoint_batch).await else {
                        return;
                    };
                    let full = due.len() >= cfg.checkpoint_batch;
                    if !due.is_empty() && out.send(LeaseTick::Checkpoint(due)).await.is_err() {
                        return;
                    }
                    if !full {
                        break;
                    }
                }
            }
        })
    }
}

/// Work the ticker found for raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTick {
    /// Propose a LeaseRevoke for each id.
    Revoke(Vec<i64>),
    /// Propose one LeaseCheckpoint request carrying these `(id, remaining_ttl)`.
    Checkpoint(Vec<(i64, i64)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickerConfig {
    pub period: Duration,
    /// Half the revoke rate per half-second tick keeps revocations at the rate.
    pub revokes_per_tick: usize,
    pub checkpoint_batch: usize,
    pub checkpoint_batches_per_tick: usize,
}

impl Default for TickerConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_millis(500),
            revokes_per_tick: crate::lessor::DEFAULT_REVOKE_RATE / 2,
            checkpoint_batch: 1000,
            checkpoint_batches_per_tick: 500,
        }
    }
}

/// Lessor plus the keep-alives parked on leases that are past their deadline.
struct Actor {
    lessor: Lessor,
    parked: HashMap<i64, Vec<Reply<Result<i64, LeaseError>>>>,
}

impl Actor {
    fn renew(&mut self, id: i64, reply: Reply<Result<i64, LeaseError>>) {
        if self.lessor.is_primary() && self.lessor.is_expired(id) {
            // The revoke is on its way; answering now could tell a client its lease
            // lives on just before its keys vanish.
            self.parked.entry(id).or_default().push(reply);
        } else {
            let _ = reply.send(self.lessor.renew(id));
        }
    }

    fn answer_parked(&mut self, id: i64, result: Result<i64, LeaseError>) {
        for reply in self.parked.remove(&id).unwrap_or_default() {
            let _ = reply.send(result.clone());
        }
    }

    fn answer_all_parked(&mut self, err: LeaseError) {
        for (_, replies) in self.parked.drain() {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }

    /// After a promotion deadlines moved, so parked keep-alives can be served again.
    fn retry_parked(&mut self) {
        let mut ids: Vec<i64> = self.parked.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(replies) = self.parked.remove(&id) {
                for reply in replies {
                    self.renew(id, reply);
                }
            }
        }
    }

    fn handle(&mut self, cmd: LeaseCommand) {
        let l = &mut self.lessor;
        match cmd {
            LeaseCommand::Grant { id, ttl, reply } => {
                let _ = reply.send(l.grant(id, ttl));
            }
            LeaseCommand::Revoke { id, reply } => {
                let result = l.revoke(id);
                if result.is_ok() {
                    self.answer_parked(id, Err(LeaseError::NotFound));
                }
                let _ = reply.send(result);
            }
            LeaseCommand::Attach { id, key, reply } => {
                let _ = reply.send(l.attach(id, &key));
            }
            LeaseCommand::Detach { id, key, reply } => {
                let _ = reply.send(l.detach(id, &key));
            }
            LeaseCommand::LeaseOf { key, reply } => {
                let _ = reply.send(l.lease_of(&key));
            }
            LeaseCommand::Lookup { id, reply } => {
                let _ = reply.send(l.lookup(id));
            }
            LeaseCommand::Leases { reply } => {
                let _ = reply.send(l.leases());
            }
            LeaseCommand::TimeToLive { id, reply } => {
                let _ = reply.send(l.time_to_live(id));
            }
            LeaseCommand::Checkpoint {
                id,
                remaining_ttl,
                reply,
            } => {
                let _ = reply.send(l.checkpoint(id, remaining_ttl));
            }
            LeaseCommand::Promote { extend, reply } => {
                l.promote(extend);
                self.retry_parked();
                let _ = reply.send(());
            }
            LeaseCommand::Demote { reply } => {
                l.demote();
                self.answer_all_parked(LeaseError::NotPrimary);
                let _ = reply.send(());
            }
            LeaseCommand::Renew { id, reply } => self.renew(id, reply),
            LeaseCommand::Expired { max, reply } => {
                let _ = reply.send(l.expired(max));
            }
            LeaseCommand::CheckpointsDue { max, reply } => {
                let _ = reply.send(l.checkpoints_due(max));
            }
            LeaseCommand::IsPrimary { reply } => {
                let _ = reply.send(l.is_primary());
            }
            LeaseCommand::Reload { reply } => {
                let result = l.reload();
                // Reloaded leases got fresh deadlines or are gone; renew decides which.
                self.retry_parked();
                let _ = reply.send(result);
            }
        }
    }
}

async fn run(lessor: Lessor, mut rx: mpsc::Receiver<LeaseCommand>) {
    let mut actor = Actor {
        lessor,
        parked: HashMap::new(),
    };
    while let Some(cmd) = rx.recv().await {
        actor.handle(cmd);
    }
    tracing::debug!("lease task stopped: all handles dropped");
}
