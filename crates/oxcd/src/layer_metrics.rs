//! oxcd's own per-layer figures, beside etcd's metric families: how full each bounded channel
//! between the layers is, and how far applying trails committing.
//!
//! A full channel says which layer is the bottleneck (a full `committed` channel means the
//! applier is behind; a full `events` channel means the watch hub is), which etcd's families
//! cannot tell because etcd's layers are not joined by channels.

use tokio::sync::mpsc;

/// Gauge of items queued in a channel, labelled `channel`.
pub const CHANNEL_DEPTH: &str = "oxcd_channel_depth";
/// Gauge of a channel's bound, labelled `channel`.
pub const CHANNEL_CAPACITY: &str = "oxcd_channel_capacity";
/// Gauge of committed raft entries not yet applied to the store.
pub const APPLY_LAG: &str = "oxcd_apply_lag_entries";

/// Depth probes over the layers' channels. Probes hold weak senders: sampling must not keep a
/// channel open after its layer has shut down.
pub struct LayerGauges {
    channels: Vec<ChannelProbe>,
}

struct ChannelProbe {
    name: &'static str,
    depth: Box<dyn Fn() -> Option<usize> + Send + Sync>,
}

impl LayerGauges {
    pub fn new() -> Self {
        describe();
        LayerGauges {
            channels: Vec::new(),
        }
    }

    /// Adds the channel `tx` sends into, under the label `name`.
    pub fn channel<T: Send + 'static>(mut self, name: &'static str, tx: &mpsc::Sender<T>) -> Self {
        let weak = tx.downgrade();
        metrics::gauge!(CHANNEL_CAPACITY, "channel" => name).set(tx.max_capacity() as f64);
        metrics::gauge!(CHANNEL_DEPTH, "channel" => name).set(0.0);
        self.channels.push(ChannelProbe {
            name,
            depth: Box::new(move || weak.upgrade().map(|tx| tx.max_capacity() - tx.capacity())),
        });
        self
    }

    /// Samples every channel and the apply lag (`committed` − `applied`, raft's commit index and
    /// the store's applied index) into their gauges.
    pub fn sample(&self, committed: u64, applied: u64) {
        for (name, depth) in self.depths() {
            metrics::gauge!(CHANNEL_DEPTH, "channel" => name).set(depth as f64);
        }
        metrics::gauge!(APPLY_LAG).set(committed.saturating_sub(applied) as f64);
    }

    /// The current depth of each channel still open, by label.
    pub fn depths(&self) -> Vec<(&'static str, usize)> {
        self.channels
            .iter()
            .filter_map(|ch| (ch.depth)().map(|d| (ch.name, d)))
            .collect()
    }
}

fn describe() {
    metrics::describe_gauge!(
        CHANNEL_DEPTH,
        "Items queued in a bounded channel between two of oxcd's layers."
    );
    metrics::describe_gauge!(CHANNEL_CAPACITY, "The bound of that channel.");
    metrics::describe_gauge!(
        APPLY_LAG,
        "Raft entries committed but not yet applied to the key-value store."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn depth_follows_what_is_queued_and_closed_channels_drop_out() {
        let (a_tx, mut a_rx) = mpsc::channel::<u32>(8);
        let (b_tx, b_rx) = mpsc::channel::<u32>(2);
        let gauges = LayerGauges::new().channel("a", &a_tx).channel("b", &b_tx);
        assert_eq!(gauges.depths(), vec![("a", 0), ("b", 0)]);

        a_tx.send(1).await.unwrap();
        a_tx.send(2).await.unwrap();
        b_tx.send(3).await.unwrap();
        assert_eq!(gauges.depths(), vec![("a", 2), ("b", 1)]);

        a_rx.recv().await.unwrap();
        assert_eq!(gauges.depths(), vec![("a", 1), ("b", 1)]);

        // A probe must not keep its channel alive: once every real sender is gone the
        // receiver sees the end of the stream.
        drop(b_tx);
        assert_eq!(gauges.depths(), vec![("a", 1)]);
        let mut b_rx = b_rx;
        assert_eq!(b_rx.recv().await, Some(3));
        assert_eq!(b_rx.recv().await, None);
    }
}
