//! MetricsBlock and MetricsSlot: the Python handles on the shared metrics counters.

use pyo3::prelude::*;

use crate::metrics::{Backend, Block, Slot};

/// The shared counters of every worker: made before forking, scraped by the master.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct MetricsBlock {
    block: Block,
}

#[pymethods]
impl MetricsBlock {
    #[new]
    fn new(capacity: usize) -> PyResult<Self> {
        Ok(MetricsBlock {
            block: Block::new(capacity)?,
        })
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.block.capacity()
    }

    /// A free slot for worker number `worker`, zeroed; None when every slot is taken.
    fn claim(&self, worker: u64) -> Option<usize> {
        self.block.claim(worker)
    }

    /// The handle on slot `index`; takes no lock, so it is safe in a freshly forked child.
    fn slot(&self, index: usize) -> PyResult<MetricsSlot> {
        Ok(MetricsSlot {
            slot: self.block.slot(index)?,
        })
    }

    /// Folds the counters of slot `index`, whose worker exited, into the total, and frees it.
    fn retire(&self, index: usize) -> PyResult<()> {
        Ok(self.block.retire(index)?)
    }

    /// Every metric in the Prometheus text format.
    fn render(&self, py: Python<'_>) -> String {
        py.detach(|| self.block.render())
    }
}

/// One worker's counters. The serve loops update it from Rust; Python sets what the loops
/// cannot know.
#[pyclass(module = "uringserve._uringserve", frozen)]
pub struct MetricsSlot {
    pub(crate) slot: Slot,
}

#[pymethods]
impl MetricsSlot {
    #[getter]
    fn index(&self) -> usize {
        self.slot.index()
    }

    #[getter]
    fn worker(&self) -> u64 {
        self.slot.worker()
    }

    /// The backend, "io_uring" or "epoll", that serves this worker's connections now.
    fn set_backend(&self, backend: &str) -> PyResult<()> {
        self.slot.set_backend(Backend::parse(backend)?);
        Ok(())
    }

    /// Counts a sick ring handing this worker over to epoll.
    fn fallback_engaged(&self) {
        self.slot.fallback_engaged();
    }

    /// The open-connections gauge, for the epoll loop (the io_uring loop sets its own).
    fn set_connections(&self, open: u64) {
        self.slot.set_connections(open);
    }
}
