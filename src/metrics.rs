//! Prometheus metrics: one slot of shared counters per worker, updated with relaxed atomics
//! on the request path, summed and written out in the text exposition format on a scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::errors::MetricsError;
use crate::hotpath::Hotpath;
use crate::shm::SharedCounters;

/// Upper bounds of the request-duration histogram (Prometheus' defaults): the label as
/// exposed, in seconds, beside the same bound in nanoseconds, so the two cannot disagree.
const BUCKETS: [(&str, u64); 14] = [
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.075", 75_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("0.75", 750_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("7.5", 7_500_000_000),
    ("10", 10_000_000_000),
];

/// Where each value lives in a slot. Words from REQUESTS to LAST_COUNTER are counters,
/// folded into the retired total when a worker dies; the others describe the live worker.
mod word {
    pub const LIVE: usize = 0;
    pub const WORKER: usize = 1;
    pub const BACKEND: usize = 2;
    pub const CONNECTIONS: usize = 3;
    /// 1xx to 5xx.
    pub const REQUESTS: usize = 4;
    /// One word per bucket and one for +Inf, not cumulative.
    pub const BUCKETS: usize = REQUESTS + 5;
    pub const DURATION_NS: usize = BUCKETS + super::BUCKETS.len() + 1;
    pub const RING: usize = DURATION_NS + 1;
    pub const FALLBACK: usize = RING + super::RING_COUNTERS.len();
    pub const TLS_FAILURES: usize = FALLBACK + 1;
    pub const LAST_COUNTER: usize = TLS_FAILURES;
}
/// 384 bytes: a whole number of cache lines, so no two workers write the same line.
const SLOT_WORDS: usize = 48;
const _: () = assert!(word::LAST_COUNTER < SLOT_WORDS);

/// The io_uring counters, as metric names (after `uringserve_io_uring_`) with their help.
const RING_COUNTERS: [(&str, &str); 7] = [
    ("enters", "io_uring_enter calls"),
    ("submissions", "submission queue entries submitted"),
    ("completions", "completion queue entries reaped"),
    (
        "enobufs",
        "multishot receives stopped by an empty provided-buffer ring",
    ),
    (
        "recv_rearms",
        "multishot receives armed again after they ended",
    ),
    (
        "accept_rearms",
        "multishot accepts armed again after they ended",
    ),
    (
        "short_sends",
        "sends that wrote less than asked and were resubmitted",
    ),
];

/// What serves a worker's connections; `set_backend` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Backend {
    IoUring = 1,
    Epoll = 2,
}

impl Backend {
    pub fn parse(name: &str) -> Result<Self, MetricsError> {
        match name {
            "io_uring" => Ok(Backend::IoUring),
            "epoll" => Ok(Backend::Epoll),
            other => Err(MetricsError::UnknownBackend(other.to_owned())),
        }
    }

    fn name(code: u64) -> Option<&'static str> {
        match code {
            1 => Some("io_uring"),
            2 => Some("epoll"),
            _ => None,
        }
    }
}

/// One worker's counters. Cloned freely (into the app, the loop); writes are relaxed
/// atomic adds: no syscall, no lock, and no GIL needed.
#[derive(Clone)]
pub struct Slot {
    block: Arc<SharedCounters>,
    base: usize,
    index: usize,
}

impl Slot {
    fn cell(&self, w: usize) -> &AtomicU64 {
        &self.block.cells()[self.base + w]
    }

    fn add(&self, w: usize, n: u64) {
        self.cell(w).fetch_add(n, Ordering::Relaxed);
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn worker(&self) -> u64 {
        self.cell(word::WORKER).load(Ordering::Relaxed)
    }

    /// One answered request: its status class and how long it took.
    pub fn record(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.add(word::REQUESTS + class, 1);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKETS
            .iter()
            .position(|&(_, bound)| ns <= bound)
            .unwrap_or(BUCKETS.len());
        self.add(word::BUCKETS + bucket, 1);
        self.add(word::DURATION_NS, ns);
    }

    pub fn set_connections(&self, open: u64) {
        self.cell(word::CONNECTIONS).store(open, Ordering::Relaxed);
    }

    pub fn set_backend(&self, backend: Backend) {
        self.cell(word::BACKEND)
            .store(backend as u64, Ordering::Relaxed);
    }

    /// A sick ring handed this worker over to epoll.
    pub fn fallback_engaged(&self) {
        self.add(word::FALLBACK, 1);
    }

    /// A TLS session failed (a bad handshake, a bad record) and its connection was closed.
    pub fn tls_failed(&self) {
        self.add(word::TLS_FAILURES, 1);
    }
}

/// Copies a ring's counters into a slot after each pass of its loop, as increments, so a
/// worker that opens a new ring keeps counting up.
pub struct RingPublisher {
    slot: Slot,
    last: [u64; RING_COUNTERS.len()],
}

impl RingPublisher {
    pub fn new(slot: Slot) -> Self {
        RingPublisher {
            slot,
            last: [0; RING_COUNTERS.len()],
        }
    }

    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    pub fn publish(&mut self, hp: &Hotpath, connections: usize) {
        let e = hp.uring.stats;
        let c = hp.counters;
        let now = [
            e.enters,
            e.submissions,
            e.completions,
            c.enobufs,
            c.recv_rearms,
            c.accept_rearms,
            c.short_sends,
        ];
        for (i, (&value, last)) in now.iter().zip(self.last.iter_mut()).enumerate() {
            if value != *last {
                self.slot.add(word::RING + i, value.saturating_sub(*last));
                *last = value;
            }
        }
        self.slot.set_connections(connections as u64);
    }
}

/// Every worker's slot plus slot 0, the total of the workers that are gone. Made before the
/// fork; the master claims a slot per worker, reads them all on a scrape, and folds a dead
/// worker's counters into the total, so no counter ever goes backwards.
pub struct Block {
    counters: Arc<SharedCounters>,
    capacity: usize,
    /// Claiming, retiring and reading all slots happen in one process (the master); this
    /// keeps a scrape from seeing a slot both folded and still live.
    lock: Mutex<()>,
}

impl Block {
    /// A block for up to `capacity` live workers at a time.
    pub fn new(capacity: usize) -> Result<Self, MetricsError> {
        if capacity == 0 {
            return Err(MetricsError::NoCapacity);
        }
        let words = (capacity + 1) * SLOT_WORDS;
        let counters = SharedCounters::new(words).map_err(MetricsError::Map)?;
        Ok(Block {
            counters: Arc::new(counters),
            capacity,
            lock: Mutex::new(()),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cells(&self, index: usize) -> &[AtomicU64] {
        &self.counters.cells()[index * SLOT_WORDS..(index + 1) * SLOT_WORDS]
    }

    /// The slot of live worker `index` (1 to capacity); it takes no lock, so a forked child
    /// may call it whatever another thread of its parent held.
    pub fn slot(&self, index: usize) -> Result<Slot, MetricsError> {
        if index == 0 || index > self.capacity {
            return Err(MetricsError::NoSuchSlot(index, self.capacity));
        }
        Ok(Slot {
            block: self.counters.clone(),
            base: index * SLOT_WORDS,
            index,
        })
    }

    /// A free slot, zeroed and marked live for worker number `worker`; None when all are taken.
    pub fn claim(&self, worker: u64) -> Option<usize> {
        let _g = self.guard();
        let index = (1..=self.capacity)
            .find(|&i| self.cells(i)[word::LIVE].load(Ordering::Relaxed) == 0)?;
        let cells = self.cells(index);
        for c in cells {
            c.store(0, Ordering::Relaxed);
        }
        cells[word::WORKER].store(worker, Ordering::Relaxed);
        cells[word::LIVE].store(1, Ordering::Relaxed);
        Some(index)
    }

    /// Folds the counters of slot `index` (its worker has exited) into the retired total and
    /// frees the slot.
    pub fn retire(&self, index: usize) -> Result<(), MetricsError> {
        self.slot(index)?;
        let _g = self.guard();
        let cells = self.cells(index);
        if cells[word::LIVE].load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let retired = self.cells(0);
        for w in word::REQUESTS..=word::LAST_COUNTER {
            retired[w].fetch_add(cells[w].swap(0, Ordering::Relaxed), Ordering::Relaxed);
        }
        for c in cells {
            c.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let _g = self.guard();
        let live: Vec<&[AtomicU64]> = (1..=self.capacity)
            .map(|i| self.cells(i))
            .filter(|c| c[word::LIVE].load(Ordering::Relaxed) != 0)
            .collect();
        let retired = self.cells(0);
        let total = |w: usize| -> u64 {
            live.iter()
                .map(|c| c[w].load(Ordering::Relaxed))
                .fold(retired[w].load(Ordering::Relaxed), u64::wrapping_add)
        };
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "uringserve_requests_total",
            "Requests answered, by status class.",
            "counter",
        );
        for class in 0..5 {
            let n = total(word::REQUESTS + class);
            let _ = writeln!(
                out,
                "uringserve_requests_total{{status=\"{}xx\"}} {n}",
                class + 1
            );
        }
        let name = "uringserve_request_duration_seconds";
        header(
            &mut out,
            name,
            "Time from a request's head to the end of its response, in seconds.",
            "histogram",
        );
        let mut seen = 0u64;
        for (i, (bound, _)) in BUCKETS.iter().enumerate() {
            seen += total(word::BUCKETS + i);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {seen}");
        }
        seen += total(word::BUCKETS + BUCKETS.len());
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {seen}");
        let sum = total(word::DURATION_NS) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {seen}");
        let open: u64 = live
            .iter()
            .map(|c| c[word::CONNECTIONS].load(Ordering::Relaxed))
            .sum();
        gauge(
            &mut out,
            "uringserve_open_connections",
            "Client connections open now.",
            open,
        );
        for (i, (what, help)) in RING_COUNTERS.iter().enumerate() {
            counter(
                &mut out,
                &format!("uringserve_io_uring_{what}_total"),
                &format!("io_uring: {help}."),
                total(word::RING + i),
            );
        }
        counter(
            &mut out,
            "uringserve_fallback_engaged_total",
            "Workers whose io_uring ring turned unhealthy and handed over to epoll.",
            total(word::FALLBACK),
        );
        counter(
            &mut out,
            "uringserve_tls_failures_total",
            "TLS sessions that failed (a bad handshake or record); their connections closed.",
            total(word::TLS_FAILURES),
        );
        gauge(
            &mut out,
            "uringserve_workers",
            "Worker processes running (the serving process itself without workers).",
            live.len() as u64,
        );
        let name = "uringserve_worker_backend";
        header(
            &mut out,
            name,
            "The backend each worker serves on (1 for its current one).",
            "gauge",
        );
        for c in &live {
            if let Some(backend) = Backend::name(c[word::BACKEND].load(Ordering::Relaxed)) {
                let worker = c[word::WORKER].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{worker=\"{worker}\",backend=\"{backend}\"}} 1");
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric of one unlabelled series.
fn single(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    single(out, name, help, "gauge", value);
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    single(out, name, help, "counter", value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn requests_are_counted_by_class_and_bucket() {
        let block = Block::new(2).unwrap();
        let slot = block.slot(block.claim(1).unwrap()).unwrap();
        slot.set_backend(Backend::IoUring);
        slot.record(200, Duration::from_millis(3));
        slot.record(204, Duration::from_millis(30));
        slot.record(404, Duration::from_secs(20));
        slot.record(503, Duration::from_millis(5));
        let text = block.render();
        assert_eq!(
            value(&text, "uringserve_requests_total{status=\"2xx\"}"),
            2.0
        );
        assert_eq!(
            value(&text, "uringserve_requests_total{status=\"4xx\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "uringserve_requests_total{status=\"5xx\"}"),
            1.0
        );
        let b = |le: &str| {
            value(
                &text,
                &format!("uringserve_request_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        // 5 ms falls in the 0.005 bucket: le means "less than or equal".
        assert_eq!(b("0.005"), 2.0);
        assert_eq!(b("0.05"), 3.0);
        assert_eq!(b("10"), 3.0);
        assert_eq!(b("+Inf"), 4.0);
        assert_eq!(
            value(&text, "uringserve_request_duration_seconds_count"),
            4.0
        );
        let sum = value(&text, "uringserve_request_duration_seconds_sum");
        assert!((sum - 20.038).abs() < 1e-9, "{sum}");
        assert!(text.contains("uringserve_worker_backend{worker=\"1\",backend=\"io_uring\"} 1"));
    }

    #[test]
    fn a_retired_worker_still_counts_and_its_slot_is_reused() {
        let block = Block::new(1).unwrap();
        let first = block.claim(1).unwrap();
        let slot = block.slot(first).unwrap();
        slot.record(200, Duration::from_millis(1));
        slot.set_connections(3);
        slot.fallback_engaged();
        assert_eq!(block.claim(2), None, "the only slot is taken");
        block.retire(first).unwrap();
        let text = block.render();
        assert_eq!(
            value(&text, "uringserve_requests_total{status=\"2xx\"}"),
            1.0
        );
        assert_eq!(value(&text, "uringserve_fallback_engaged_total"), 1.0);
        assert_eq!(value(&text, "uringserve_open_connections"), 0.0);
        assert_eq!(value(&text, "uringserve_workers"), 0.0);
        let again = block.slot(block.claim(2).unwrap()).unwrap();
        assert_eq!(again.worker(), 2);
        again.record(200, Duration::from_millis(1));
        let text = block.render();
        assert_eq!(
            value(&text, "uringserve_requests_total{status=\"2xx\"}"),
            2.0
        );
        assert!(!text.contains("worker=\"1\""));
    }

    #[test]
    fn bad_slots_and_backends_are_refused() {
        let block = Block::new(1).unwrap();
        assert!(block.slot(0).is_err());
        assert!(block.slot(2).is_err());
        assert!(Backend::parse("kqueue").is_err());
        assert!(Block::new(0).is_err());
    }
}
