//! Requests only the leader can answer (lease keep-alives and remaining TTLs: only the leader
//! tracks deadlines; promotions: only the leader knows whether a learner is in sync) are
//! forwarded from a follower to the leader's peer URL, which serves the
//! Lease service beside raft traffic, as etcd forwards them over its peer connections. Peer
//! URLs are known from the start (client URLs only once the leader has published them), and
//! the member-to-member TLS settings apply.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::errors::{GatewayError, StatusError};
use crate::gateway::Gateway;

/// A channel to the current leader's Lease service. Fails with "no leader" when there is none
/// or it cannot be reached.
pub async fn leader_channel(gw: &Gateway) -> Result<Channel, StatusError> {
    let status = gw.raft_status().await?;
    if status.leader_id == 0 {
        return Err(GatewayError::NoLeader.into());
    }
    let urls = gw
        .membership()
        .get(status.leader_id)
        .map(|m| m.peer_ur_ls)
        .unwrap_or_default();
    for url in urls {
        let Ok(ep) = Endpoint::from_shared(url) else {
            continue;
        };
        let ep = ep
            .connect_timeout(Duration::from_secs(1))
            .timeout(gw.limits().request_timeout)
            .tcp_nodelay(true);
        if let Ok(ch) = ep.connect_with_connector(gw.leader_dialer()).await {
            return Ok(ch);
        }
    }
    Err(GatewayError::NoLeader.into())
}
