//! Lease metrics under etcd's names, so existing dashboards keep working.

pub const GRANTED_TOTAL: &str = "etcd_debugging_lease_granted_total";
pub const REVOKED_TOTAL: &str = "etcd_debugging_lease_revoked_total";
pub const RENEWED_TOTAL: &str = "etcd_debugging_lease_renewed_total";
pub const TTL_TOTAL: &str = "etcd_debugging_lease_ttl_total";

/// Bucket bounds for [`TTL_TOTAL`]: 1 s doubling up to about three months, as etcd uses.
/// The binary hands these to its exporter for that metric.
pub const TTL_BUCKETS: [f64; 24] = {
    let mut b = [0.0; 24];
    let mut i = 0;
    let mut v = 1.0;
    while i < 24 {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
};

/// Registers help texts with whatever recorder is installed.
pub fn describe() {
    metrics::describe_counter!(GRANTED_TOTAL, "The total number of granted leases.");
    metrics::describe_counter!(REVOKED_TOTAL, "The total number of revoked leases.");
    metrics::describe_counter!(
        RENEWED_TOTAL,
        "The number of renewed leases seen by the leader."
    );
    metrics::describe_histogram!(TTL_TOTAL, "Bucketed histogram of lease TTLs.");
}

pub(crate) fn granted(ttl: i64) {
    metrics::counter!(GRANTED_TOTAL).increment(1);
    metrics::histogram!(TTL_TOTAL).record(ttl as f64);
}

pub(crate) fn revoked() {
    metrics::counter!(REVOKED_TOTAL).increment(1);
}

pub(crate) fn renewed() {
    metrics::counter!(RENEWED_TOTAL).increment(1);
}
