//! The `uringserve._uringserve` extension module: wiring only.

pub mod bufring;
mod deadline;
mod direct;
pub mod errors;
mod fdmap;
mod handover;
mod heartbeat;
pub mod hotpath;
mod hotpath_py;
pub mod http;
pub mod metrics;
mod metrics_py;
mod owner;
mod pool;
pub mod probe;
mod probe_py;
mod protocol;
mod pyargs;
mod ring;
mod serve;
mod session;
mod shm;
mod slab;
mod tls;
mod tls_config;
mod tls_failures;
pub mod transport;
pub mod uring;
mod working;
pub mod wsgi;

use pyo3::prelude::*;

/// Bumped whenever the Python layer must change with the native module.
pub const ABI_VERSION: u32 = 1;

#[pymodule]
fn _uringserve(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ABI_VERSION", ABI_VERSION)?;
    m.add_class::<ring::Ring>()?;
    m.add_class::<hotpath_py::HotpathRing>()?;
    m.add_class::<hotpath_py::Completion>()?;
    m.add_class::<protocol::PyWsgiApp>()?;
    m.add_class::<protocol::HttpProtocol>()?;
    m.add_class::<serve::UringServer>()?;
    m.add_class::<handover::Handover>()?;
    m.add_class::<handover::HandedOver>()?;
    m.add_class::<wsgi::file_wrapper::FileWrapper>()?;
    m.add_class::<tls_config::TlsConfig>()?;
    m.add_class::<metrics_py::MetricsBlock>()?;
    m.add_class::<metrics_py::MetricsSlot>()?;
    m.add_class::<heartbeat::Heartbeats>()?;
    m.add_class::<heartbeat::Pulse>()?;
    m.add_function(wrap_pyfunction!(wsgi::observe::check_access_log_format, m)?)?;
    m.add_function(wrap_pyfunction!(probe_py::probe, m)?)?;
    m.add("UringError", py.get_type::<errors::UringError>())?;
    m.add("RingSetupError", py.get_type::<errors::RingSetupError>())?;
    m.add("RingClosedError", py.get_type::<errors::RingClosedError>())?;
    m.add(
        "WrongThreadError",
        py.get_type::<errors::WrongThreadError>(),
    )?;
    m.add("ForkedRingError", py.get_type::<errors::ForkedRingError>())?;
    m.add(
        "RingUnhealthyError",
        py.get_type::<errors::RingUnhealthyError>(),
    )?;
    m.add(
        "ClientDisconnected",
        py.get_type::<errors::ClientDisconnected>(),
    )?;
    m.add(
        "InvalidRequestBody",
        py.get_type::<errors::InvalidRequestBody>(),
    )?;
    m.add(
        "InvalidBufferError",
        py.get_type::<errors::InvalidBufferError>(),
    )?;
    m.add("TlsConfigError", py.get_type::<errors::TlsConfigError>())?;
    Ok(())
}
