//! Every error of the native core, and the one place where each maps onto a Python exception.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyOSError, PyTimeoutError, PyValueError};
use pyo3::PyErr;

use crate::http::HttpError;

create_exception!(
    _uringserve,
    UringError,
    PyOSError,
    "Base class of every error raised by the native core; errno keeps the kernel's errno."
);
create_exception!(
    _uringserve,
    RingSetupError,
    UringError,
    "io_uring_setup or a buffer-ring registration failed."
);
create_exception!(
    _uringserve,
    RingClosedError,
    UringError,
    "The ring was used after close()."
);
create_exception!(
    _uringserve,
    WrongThreadError,
    UringError,
    "The ring was used from a thread other than the one that created it."
);
create_exception!(
    _uringserve,
    ForkedRingError,
    UringError,
    "The ring was used in a process forked after it was created."
);
create_exception!(
    _uringserve,
    RingUnhealthyError,
    UringError,
    "The hot-path ring turned unhealthy; new submissions are refused."
);
create_exception!(
    _uringserve,
    InvalidBufferError,
    UringError,
    "A provided-buffer id was out of range or not held by the caller."
);

create_exception!(
    _uringserve,
    ClientDisconnected,
    PyOSError,
    "wsgi.input: the client closed or reset the connection before its request body was complete."
);
create_exception!(
    _uringserve,
    InvalidRequestBody,
    PyValueError,
    "wsgi.input: the request body broke HTTP framing (for instance a bad chunk size)."
);

create_exception!(
    _uringserve,
    TlsConfigError,
    PyOSError,
    "The TLS certificate, key or CA file could not be loaded; the message names the file."
);

/// Why a ring operation failed. Each variant keeps the original OS error where there is one.
#[derive(Debug)]
pub enum RingError {
    /// io_uring_setup, or registering the provided-buffer ring, failed.
    Setup {
        what: &'static str,
        source: io::Error,
    },
    /// An io_uring_enter (submit or wait) failed unexpectedly.
    Enter(io::Error),
    /// A completed operation reported an error, e.g. accept() returned -EMFILE.
    Op {
        what: &'static str,
        errno: i32,
    },
    Closed,
    WrongThread,
    Forked {
        owner_pid: u32,
    },
    Unhealthy(String),
    InvalidArgument(String),
    InvalidBuffer(String),
    AlreadyArmed {
        fd: i32,
        what: &'static str,
    },
    TimedOut(&'static str),
}

pub type RingResult<T> = Result<T, RingError>;

/// The symbolic name of an errno, for messages a user can search for.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::EPIPE => "EPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::ETIME => "ETIME",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOBUFS => "ENOBUFS",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EALREADY => "EALREADY",
        libc::ECANCELED => "ECANCELED",
        libc::EOVERFLOW => "EOVERFLOW",
        _ => "E?",
    }
}

/// "ENOMEM (Cannot allocate memory)": the name to search for, then the words.
fn describe(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(errno) => {
            let text = err.to_string();
            let words = text.split(" (os error").next().unwrap_or(&text);
            format!("{} ({words})", errno_name(errno))
        }
        None => err.to_string(),
    }
}

/// What an errno from ring setup most likely means, for the user who has to fix it.
fn setup_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::ENOMEM) => {
            "; ring memory is charged to RLIMIT_MEMLOCK: raise `ulimit -l`, \
             grant CAP_IPC_LOCK, or use smaller sizes"
        }
        Some(libc::EPERM) => {
            "; blocked by a seccomp profile (such as Docker's default) or \
             kernel.io_uring_disabled"
        }
        Some(libc::ENOSYS) => "; this kernel has no io_uring, or a seccomp profile hides it",
        _ => "",
    }
}

impl RingError {
    /// The errno carried to Python's OSError.errno.
    pub fn errno(&self) -> i32 {
        match self {
            RingError::Setup { source, .. } | RingError::Enter(source) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            RingError::Op { errno, .. } => *errno,
            RingError::Closed => libc::EBADF,
            RingError::WrongThread => libc::EEXIST,
            RingError::Forked { .. } => libc::EPERM,
            RingError::Unhealthy(_) => libc::EIO,
            RingError::InvalidArgument(_) | RingError::InvalidBuffer(_) => libc::EINVAL,
            RingError::AlreadyArmed { .. } => libc::EALREADY,
            RingError::TimedOut(_) => libc::ETIMEDOUT,
        }
    }
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Setup { what, source } => {
                write!(
                    f,
                    "{what} failed: {}{}",
                    describe(source),
                    setup_hint(source)
                )
            }
            RingError::Enter(source) => write!(f, "io_uring_enter failed: {}", describe(source)),
            RingError::Op { what, errno } => write!(
                f,
                "{what} failed: {} ({})",
                errno_name(*errno),
                io::Error::from_raw_os_error(*errno)
            ),
            RingError::Closed => write!(f, "the ring is closed"),
            RingError::WrongThread => write!(
                f,
                "this ring belongs to the thread that created it; create one ring per thread"
            ),
            RingError::Forked { owner_pid } => write!(
                f,
                "this ring was created by process {owner_pid} before fork(); \
                 create rings after fork, in each worker"
            ),
            RingError::Unhealthy(reason) => write!(f, "the ring is unhealthy: {reason}"),
            RingError::InvalidArgument(msg) | RingError::InvalidBuffer(msg) => f.write_str(msg),
            RingError::AlreadyArmed { fd, what } => write!(
                f,
                "fd {fd} already has a {what} armed; cancel_fd() it before arming another"
            ),
            RingError::TimedOut(what) => write!(f, "{what} timed out"),
        }
    }
}

impl std::error::Error for RingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RingError::Setup { source, .. } | RingError::Enter(source) => Some(source),
            _ => None,
        }
    }
}

impl From<RingError> for PyErr {
    fn from(err: RingError) -> PyErr {
        let args = (err.errno(), err.to_string());
        match err {
            RingError::Setup { .. } => PyErr::new::<RingSetupError, _>(args),
            RingError::Enter(_) | RingError::Op { .. } | RingError::AlreadyArmed { .. } => {
                PyErr::new::<UringError, _>(args)
            }
            RingError::Closed => PyErr::new::<RingClosedError, _>(args),
            RingError::WrongThread => PyErr::new::<WrongThreadError, _>(args),
            RingError::Forked { .. } => PyErr::new::<ForkedRingError, _>(args),
            RingError::Unhealthy(_) => PyErr::new::<RingUnhealthyError, _>(args),
            RingError::InvalidBuffer(_) => PyErr::new::<InvalidBufferError, _>(args),
            RingError::InvalidArgument(msg) => PyValueError::new_err(msg),
            RingError::TimedOut(_) => PyTimeoutError::new_err(args),
        }
    }
}

/// Why reading a request body for the app failed.
#[derive(Debug)]
pub enum BodyError {
    /// The peer closed or reset the connection mid-body; the errno, when the OS gave one.
    Disconnected(Option<i32>),
    /// The body broke its framing; the status is what the peer is answered with.
    Malformed(HttpError),
    /// Nothing more of the body arrived within this long.
    TimedOut(Duration),
    /// The loop's ring failed while waiting.
    Ring(RingError),
    /// The Python loop's transport raised.
    Python(PyErr),
}

impl From<RingError> for BodyError {
    fn from(err: RingError) -> Self {
        BodyError::Ring(err)
    }
}

impl From<PyErr> for BodyError {
    fn from(err: PyErr) -> Self {
        BodyError::Python(err)
    }
}

impl From<BodyError> for PyErr {
    fn from(err: BodyError) -> PyErr {
        match err {
            BodyError::Disconnected(errno) => {
                let errno = errno.unwrap_or(libc::ECONNRESET);
                PyErr::new::<ClientDisconnected, _>((
                    errno,
                    format!(
                        "the client went away before sending the whole request body ({})",
                        errno_name(errno)
                    ),
                ))
            }
            BodyError::Malformed(e) => InvalidRequestBody::new_err(format!("request body: {e}")),
            BodyError::TimedOut(after) => PyTimeoutError::new_err(format!(
                "no request body bytes arrived for {:.1} s",
                after.as_secs_f64()
            )),
            BodyError::Ring(e) => e.into(),
            BodyError::Python(e) => e,
        }
    }
}

/// Why the TLS settings could not be loaded. Each variant names the file it is about.
#[derive(Debug)]
pub enum TlsLoadError {
    /// The file could not be read or held no valid PEM of the kind wanted.
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused what the files held (a key that does not match the certificate...).
    Rejected {
        context: String,
        source: rustls::Error,
    },
    /// No CA certificate in the file could be used to verify client certificates.
    NoUsableCa { path: PathBuf, ignored: usize },
    /// The client-certificate verifier could not be built from the CAs.
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    /// The loaded settings could not start a connection's session.
    Session(rustls::Error),
}

impl TlsLoadError {
    fn io_source(&self) -> Option<&io::Error> {
        match self {
            TlsLoadError::Pem {
                source: rustls::pki_types::pem::Error::Io(e),
                ..
            } => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for TlsLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use rustls::pki_types::pem::Error as Pem;
        match self {
            TlsLoadError::Pem { what, path, source } => {
                let path = path.display();
                match source {
                    Pem::Io(e) => write!(f, "cannot read the {what} {path}: {}", describe(e)),
                    Pem::NoItemsFound => {
                        write!(f, "the {what} {path} holds no PEM {}", kind(what))
                    }
                    other => write!(f, "the {what} {path} is not valid PEM: {other}"),
                }
            }
            TlsLoadError::Rejected { context, source } => write!(f, "{context}: {source}"),
            TlsLoadError::NoUsableCa { path, ignored } => write!(
                f,
                "the CA file {} holds no usable CA certificate ({ignored} could not be parsed)",
                path.display()
            ),
            TlsLoadError::Verifier { path, source } => write!(
                f,
                "cannot verify client certificates with the CAs in {}: {source}",
                path.display()
            ),
            TlsLoadError::Session(source) => {
                write!(f, "the TLS settings cannot start a session: {source}")
            }
        }
    }
}

/// What a PEM file of each role must hold, for "holds no ..." messages.
fn kind(what: &str) -> &'static str {
    match what {
        "key file" => "private key",
        _ => "certificate",
    }
}

impl std::error::Error for TlsLoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsLoadError::Pem { source, .. } => Some(source),
            TlsLoadError::Rejected { source, .. } => Some(source),
            TlsLoadError::Verifier { source, .. } => Some(source),
            TlsLoadError::Session(source) => Some(source),
            TlsLoadError::NoUsableCa { .. } => None,
        }
    }
}

impl From<TlsLoadError> for PyErr {
    fn from(err: TlsLoadError) -> PyErr {
        let errno = err
            .io_source()
            .and_then(io::Error::raw_os_error)
            .unwrap_or(libc::EINVAL);
        let py_err = PyErr::new::<TlsConfigError, _>((errno, err.to_string()));
        // The OS error itself (FileNotFoundError...) stays reachable as __cause__.
        if let Some(source) = err.io_source() {
            let cause = PyErr::from(match source.raw_os_error() {
                Some(errno) => io::Error::from_raw_os_error(errno),
                None => io::Error::new(source.kind(), source.to_string()),
            });
            pyo3::Python::attach(|py| py_err.set_cause(py, Some(cause)));
        }
        py_err
    }
}

/// A shared block (metrics, heartbeats) that could not be mapped: OSError(errno, message),
/// so Python picks the subclass of the errno.
fn shared_map_error(source: &io::Error, message: String) -> PyErr {
    let errno = source.raw_os_error().unwrap_or(libc::EINVAL);
    PyOSError::new_err((errno, message))
}

/// Why the metrics block or one of its slots could not be used.
#[derive(Debug)]
pub enum MetricsError {
    /// The shared mapping could not be made.
    Map(io::Error),
    NoCapacity,
    /// A slot index outside 1..=capacity.
    NoSuchSlot(usize, usize),
    UnknownBackend(String),
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsError::Map(e) => write!(f, "cannot map the shared metrics block: {e}"),
            MetricsError::NoCapacity => write!(f, "a metrics block needs room for one worker"),
            MetricsError::NoSuchSlot(i, cap) => {
                write!(f, "metrics slot {i} does not exist (slots are 1 to {cap})")
            }
            MetricsError::UnknownBackend(name) => {
                write!(
                    f,
                    "unknown backend {name:?}: expected 'io_uring' or 'epoll'"
                )
            }
        }
    }
}

impl std::error::Error for MetricsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MetricsError::Map(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MetricsError> for PyErr {
    fn from(err: MetricsError) -> PyErr {
        match err {
            MetricsError::Map(ref e) => shared_map_error(e, err.to_string()),
            MetricsError::NoSuchSlot(..) => PyIndexError::new_err(err.to_string()),
            MetricsError::NoCapacity | MetricsError::UnknownBackend(_) => {
                PyValueError::new_err(err.to_string())
            }
        }
    }
}

/// Why the workers' heartbeat block (`--timeout`) or one of its slots could not be used.
#[derive(Debug)]
pub enum HeartbeatError {
    /// The shared mapping could not be made.
    Map(io::Error),
    NoCapacity,
    /// A slot index outside 0..capacity.
    NoSuchSlot(usize, usize),
    /// An interval that is not a positive, finite number of seconds.
    BadInterval(f64),
}

impl fmt::Display for HeartbeatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeartbeatError::Map(e) => write!(f, "cannot map the shared heartbeat block: {e}"),
            HeartbeatError::NoCapacity => {
                write!(f, "a heartbeat block needs room for one worker")
            }
            HeartbeatError::NoSuchSlot(i, cap) => {
                write!(
                    f,
                    "heartbeat slot {i} does not exist (slots are 0 to {cap} - 1)"
                )
            }
            HeartbeatError::BadInterval(s) => write!(
                f,
                "a heartbeat interval must be a positive number of seconds, not {s}"
            ),
        }
    }
}

impl std::error::Error for HeartbeatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HeartbeatError::Map(e) => Some(e),
            _ => None,
        }
    }
}

impl From<HeartbeatError> for PyErr {
    fn from(err: HeartbeatError) -> PyErr {
        match err {
            HeartbeatError::Map(ref e) => shared_map_error(e, err.to_string()),
            HeartbeatError::NoSuchSlot(..) => PyIndexError::new_err(err.to_string()),
            HeartbeatError::NoCapacity | HeartbeatError::BadInterval(_) => {
                PyValueError::new_err(err.to_string())
            }
        }
    }
}

/// A refused `--access-log-format`: the message says what is wrong with it.
impl From<crate::wsgi::access_log::FormatError> for PyErr {
    fn from(err: crate::wsgi::access_log::FormatError) -> PyErr {
        PyValueError::new_err(err.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_error_keeps_errno_and_name() {
        let err = RingError::Setup {
            what: "io_uring_setup",
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(err.errno(), libc::EPERM);
        assert!(err.to_string().starts_with("io_uring_setup failed: EPERM"));
        assert!(err.to_string().contains("seccomp"));
        let nomem = RingError::Setup {
            what: "io_uring_setup",
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert!(nomem.to_string().contains("RLIMIT_MEMLOCK"));
        assert!(!nomem.to_string().contains("os error"));
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn op_error_names_errno() {
        let err = RingError::Op {
            what: "accept",
            errno: libc::EMFILE,
        };
        assert!(err.to_string().contains("EMFILE"));
    }
}
