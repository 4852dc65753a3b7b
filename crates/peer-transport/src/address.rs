//! Where each member listens for peer traffic. Membership changes update it while the
//! per-peer tasks run, so they look it up on every (re)connect. It also carries how to dial
//! them: in the clear, or with TLS for `https://` peer URLs.

use std::collections::HashMap;
use std::sync::Arc;

use oxcd_tls::Connector;
use parking_lot::RwLock;

#[derive(Clone, Default)]
pub struct AddressBook {
    inner: Arc<RwLock<HashMap<u64, Vec<String>>>>,
    connector: Connector,
}

impl AddressBook {
    /// A book whose peers are dialed in the clear (`https://` URLs are refused).
    pub fn new() -> Self {
        Self::default()
    }

    /// A book whose peers are dialed with `connector` (TLS for `https://` URLs).
    pub fn with_connector(connector: Connector) -> Self {
        AddressBook {
            inner: Arc::default(),
            connector,
        }
    }

    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    pub fn set(&self, id: u64, peer_urls: Vec<String>) {
        self.inner.write().insert(id, peer_urls);
    }

    pub fn remove(&self, id: u64) {
        self.inner.write().remove(&id);
    }

    pub fn get(&self, id: u64) -> Option<Vec<String>> {
        self.inner.read().get(&id).cloned()
    }
}
