//! TLS sessions that failed, told to the error log at DEBUG (as gunicorn tells its SSL
//! errors): a scanner or a misconfigured client is an everyday event, not a server fault.

use std::net::{IpAddr, SocketAddr};

use pyo3::prelude::*;

use crate::tls::TlsFailure;
use crate::wsgi::environ::{Peer, PeerHost};

/// The peer as the log line names it: `ip:port` (`[ip]:port` for IPv6, as SocketAddr
/// writes it), or `-` when it could not be read.
pub fn peer_text(peer: Option<(IpAddr, u16)>) -> String {
    peer.map_or_else(|| "-".to_owned(), |addr| SocketAddr::from(addr).to_string())
}

/// A session's peer as the log line names it.
pub fn peer_of(peer: &Peer) -> String {
    match &peer.host {
        PeerHost::Ip(ip) => peer_text(Some((*ip, peer.port))),
        PeerHost::Name(name) if name.is_empty() => "-".to_owned(),
        PeerHost::Name(name) if name.contains(':') => format!("[{name}]:{}", peer.port),
        PeerHost::Name(name) => format!("{name}:{}", peer.port),
    }
}

/// Logs one failure on `uringserve.error` at DEBUG. A logging error is reported through
/// `sys.unraisablehook`: it must not fail the loop, and must not vanish either.
pub fn log(py: Python<'_>, peer: &str, why: &TlsFailure) {
    let logged = py
        .import("logging")
        .and_then(|logging| logging.call_method1("getLogger", ("uringserve.error",)))
        .and_then(|logger| {
            logger.call_method1("debug", ("TLS with %s failed: %s", peer, why.to_string()))
        });
    if let Err(err) = logged {
        err.write_unraisable(py, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_named_ip_colon_port_with_ipv6_in_brackets() {
        let v4 = Some((IpAddr::from([127, 0, 0, 1]), 8443));
        let v6 = Some((IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]), 8443));
        assert_eq!(peer_text(v4), "127.0.0.1:8443");
        assert_eq!(peer_text(v6), "[::1]:8443");
        assert_eq!(peer_text(None), "-");
    }
}
