//! Where each member listens for peer traffic. Membership changes update it while the
//! per-peer tasks run, so they look it up on every (re)connect.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

#[derive(Clone, Default)]
pub struct AddressBook {
    inner: Arc<RwLock<HashMap<u64, Vec<String>>>>,
}

impl AddressBook {
    pub fn new() -> Self {
        Self::default()
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
