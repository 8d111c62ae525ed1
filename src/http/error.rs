//! The single failure type of the HTTP core: the status to answer with and a detail for logs.

use std::fmt;

/// A request the server must refuse (or a response the app got wrong).
///
/// `status` is what to send (400, 413, 431 for peers; 500 for application mistakes);
/// `reason` is a fixed, human-oriented detail for logs and is never sent to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
}

impl HttpError {
    pub const fn bad_request(reason: &'static str) -> Self {
        HttpError {
            status: 400,
            reason,
        }
    }

    pub const fn too_large(reason: &'static str) -> Self {
        HttpError {
            status: 413,
            reason,
        }
    }

    pub const fn header_too_large(reason: &'static str) -> Self {
        HttpError {
            status: 431,
            reason,
        }
    }

    pub const fn internal(reason: &'static str) -> Self {
        HttpError {
            status: 500,
            reason,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.reason)
    }
}

impl std::error::Error for HttpError {}
