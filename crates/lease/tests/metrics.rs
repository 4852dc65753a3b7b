//! The lessor reports etcd's lease metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lease::{FakeClock, InMemoryLeaseStore, Lessor, LessorConfig};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

#[derive(Default)]
struct Count(AtomicU64);
impl CounterFn for Count {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::SeqCst);
    }
    fn absolute(&self, v: u64) {
        self.0.store(v, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);
impl HistogramFn for Samples {
    fn record(&self, v: f64) {
        self.0.lock().unwrap().push(v);
    }
}

#[derive(Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<Count>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = self
            .counters
            .lock()
            .unwrap()
            .entry(key.name().to_string())
            .or_default()
            .clone();
        Counter::from_arc(c)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let h = self
            .histograms
            .lock()
            .unwrap()
            .entry(key.name().to_string())
            .or_default()
            .clone();
        Histogram::from_arc(h)
    }
}

impl TestRecorder {
    fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

#[test]
fn grant_revoke_and_renew_are_counted() {
    let recorder = TestRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        lease::metrics::describe();
        let clock = FakeClock::new();
        let mut l = Lessor::new(
            LessorConfig::new(5),
            Arc::new(clock.clone()),
            Box::new(InMemoryLeaseStore::new()),
        )
        .unwrap();
        l.promote(Duration::ZERO);
        l.grant(1, 1).unwrap();
        l.grant(2, 100).unwrap();
        l.grant(2, 100).unwrap_err();
        l.renew(1).unwrap();
        l.renew(1).unwrap();
        l.renew(3).unwrap_err();
        l.revoke(1).unwrap();
        l.revoke(1).unwrap_err();
    });
    assert_eq!(recorder.counter(lease::metrics::GRANTED_TOTAL), 2);
    assert_eq!(recorder.counter(lease::metrics::RENEWED_TOTAL), 2);
    assert_eq!(recorder.counter(lease::metrics::REVOKED_TOTAL), 1);
    let ttls = recorder.histograms.lock().unwrap()[lease::metrics::TTL_TOTAL]
        .0
        .lock()
        .unwrap()
        .clone();
    // The recorded TTL is the granted one, after the minimum was applied.
    assert_eq!(ttls, vec![5.0, 100.0]);
    assert_eq!(lease::metrics::TTL_BUCKETS[0], 1.0);
    assert_eq!(lease::metrics::TTL_BUCKETS[23], 8_388_608.0);
}
