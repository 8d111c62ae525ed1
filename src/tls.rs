//! TlsFilter: one connection's TLS session as a sans-I/O filter between the wire and the HTTP
//! core. Ciphertext goes in and its plaintext lands in the connection; plaintext goes in and
//! records come out for the loop to send. Both loops use it the same way.

use std::fmt;
use std::io::{self, BufRead, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use crate::http::Connection;
use crate::transport::ConnIo;

/// Per-record overhead allowance when sizing a sealed buffer (header, tag, content type).
const RECORD_OVERHEAD: usize = 64;
const MAX_RECORD: usize = 16 * 1024;

/// Why a TLS session failed, as rustls (or the read feeding it) said.
#[derive(Debug)]
pub enum TlsFailure {
    Read(io::Error),
    Session(rustls::Error),
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFailure::Read(e) => write!(f, "reading TLS records: {e}"),
            TlsFailure::Session(e) => write!(f, "{e}"),
        }
    }
}

pub struct TlsFilter {
    tls: ServerConnection,
    /// The session failed (an alert has been produced) or the peer sent close_notify:
    /// nothing more is read, and after a failure nothing more is sealed.
    read_done: bool,
    failed: bool,
    /// Why it failed, until the loop takes it to log and count (`take_failure`).
    failure: Option<TlsFailure>,
}

impl TlsFilter {
    pub fn new(config: &Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(TlsFilter {
            tls: ServerConnection::new(config.clone())?,
            read_done: false,
            failed: false,
            failure: None,
        })
    }

    /// Decrypts `data` into `http`. Returns the records the peer must get back (handshake
    /// messages, session tickets, an alert), usually none. A TLS failure or the peer's
    /// close_notify ends `http`'s input, so the session closes the connection after sending
    /// what is pending.
    pub fn receive(&mut self, mut data: &[u8], http: &mut Connection) -> Vec<u8> {
        // An empty read would count as the transport's EOF; only the loop reports that.
        while !data.is_empty() && !self.read_done {
            match self.tls.read_tls(&mut data) {
                Ok(0) => self.read_done = true,
                Ok(_) => {}
                // Only a full plaintext buffer refuses input, and it is drained after each
                // read; treat it like any other failure rather than spin.
                Err(e) => self.fail(TlsFailure::Read(e)),
            }
            if self.read_done {
                break;
            }
            let processed = self.tls.process_new_packets();
            self.drain_plaintext(http);
            if let Err(e) = processed {
                self.fail(TlsFailure::Session(e));
            }
        }
        if self.read_done {
            http.receive_eof();
        }
        let mut wire = Vec::new();
        self.flush(&mut wire);
        wire
    }

    /// Appends `plain` to `wire` as records, then a close_notify when `closing`.
    pub fn seal(&mut self, mut plain: &[u8], closing: bool, wire: &mut Vec<u8>) {
        if self.failed {
            return;
        }
        wire.reserve(plain.len() + (plain.len() / MAX_RECORD + 1) * RECORD_OVERHEAD);
        while !plain.is_empty() {
            match self.tls.writer().write(plain) {
                Ok(n) if n > 0 => plain = &plain[n..],
                // Nothing is answered before the handshake completes, so plaintext is never
                // held back for it; a refusal means the session is unusable.
                _ => {
                    self.failed = true;
                    break;
                }
            }
            // rustls caps what it holds sealed: move it out before sealing more.
            self.flush(wire);
        }
        if closing {
            self.tls.send_close_notify();
        }
        self.flush(wire);
    }

    fn fail(&mut self, why: TlsFailure) {
        self.read_done = true;
        self.failed = true;
        self.failure.get_or_insert(why);
    }

    fn drain_plaintext(&mut self, http: &mut Connection) {
        let mut reader = self.tls.reader();
        loop {
            match reader.fill_buf() {
                // Ok(empty) is rustls reporting close_notify, after every byte before it.
                Ok([]) => {
                    self.read_done = true;
                    return;
                }
                Ok(chunk) => {
                    let n = chunk.len();
                    http.receive(chunk);
                    reader.consume(n);
                }
                // WouldBlock: everything decrypted so far has been handed over.
                Err(_) => return,
            }
        }
    }

    fn flush(&mut self, wire: &mut Vec<u8>) {
        while self.tls.wants_write() {
            // Writing into a Vec cannot fail.
            if self.tls.write_tls(wire).is_err() {
                return;
            }
        }
    }
}

/// Bytes from the peer into the connection, decrypted first under TLS. Returns records to
/// send back (handshake, alerts): always empty without TLS.
pub fn receive_wire(io: &mut ConnIo, data: &[u8]) -> Vec<u8> {
    match io.tls.as_deref_mut() {
        None => {
            io.conn.receive(data);
            Vec::new()
        }
        Some(tls) => tls.receive(data, &mut io.conn),
    }
}

/// Why the connection's TLS session failed, once: the next call returns None.
pub fn take_failure(io: &mut ConnIo) -> Option<TlsFailure> {
    io.tls.as_deref_mut()?.failure.take()
}

/// Plaintext for the peer as it goes on the wire: itself without TLS, else its records.
pub fn sealed(io: &mut ConnIo, plain: Vec<u8>) -> Vec<u8> {
    match io.tls.as_deref_mut() {
        None => plain,
        Some(tls) => {
            let mut wire = Vec::new();
            tls.seal(&plain, false, &mut wire);
            wire
        }
    }
}

/// What ends a TLS session cleanly (close_notify), for a connection closed with nothing
/// else to send (a timeout, a graceful stop). Empty without TLS, after a TLS failure, and
/// before the handshake is done (a peer that never finished it is simply cut off).
pub fn farewell(io: &mut ConnIo) -> Vec<u8> {
    let mut wire = Vec::new();
    if let Some(tls) = io.tls.as_deref_mut() {
        if !tls.tls.is_handshaking() {
            tls.seal(&[], true, &mut wire);
        }
    }
    wire
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::ring::default_provider;
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore};

    use super::*;
    use crate::http::Limits;

    /// A server without a certificate: every handshake fails, which is what these tests
    /// drive (successful handshakes are covered end to end by tests/test_tls.py).
    #[derive(Debug)]
    struct NoCert;

    impl ResolvesServerCert for NoCert {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }

    fn filter() -> TlsFilter {
        let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCert));
        TlsFilter::new(&Arc::new(config)).unwrap()
    }

    fn connection() -> Connection {
        Connection::new(Limits::default())
    }

    #[test]
    fn plain_http_to_tls_gets_an_alert_and_never_reaches_http() {
        let mut tls = filter();
        let mut http = connection();
        let wire = tls.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut http);
        assert_eq!(wire.first(), Some(&21), "a TLS alert record");
        assert!(http.input_ended());
        assert_eq!(http.buffered(), 0);
        // Nothing is sealed after the failure, not even a close_notify.
        let mut out = Vec::new();
        tls.seal(b"HTTP/1.1 400 Bad Request\r\n\r\n", true, &mut out);
        assert!(out.is_empty());
        // Later bytes are ignored.
        assert!(tls.receive(b"more", &mut http).is_empty());
    }

    #[test]
    fn a_failed_handshake_alerts_the_client() {
        let client_config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = "localhost".try_into().unwrap();
        let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();

        let mut tls = filter();
        let mut http = connection();
        // Byte by byte: records split across receives are reassembled.
        let mut wire = Vec::new();
        for byte in hello.chunks(1) {
            wire.extend(tls.receive(byte, &mut http));
        }
        assert!(http.input_ended());
        // The reason is kept for the loop to log and count, once.
        let kept = tls.failure.take().map(|f| f.to_string());
        assert!(
            kept.as_deref()
                .is_some_and(|why| why.contains("certificate")),
            "{kept:?}"
        );
        client.read_tls(&mut wire.as_slice()).unwrap();
        // rustls refuses a handshake it has no certificate for with access_denied.
        assert_eq!(
            client.process_new_packets().unwrap_err(),
            rustls::Error::AlertReceived(AlertDescription::AccessDenied)
        );
    }

    #[test]
    fn without_tls_bytes_pass_through_untouched() {
        let io = ConnIo::shared(Limits::default(), -1);
        let mut io = io.lock().unwrap();
        assert!(receive_wire(&mut io, b"GET / HTTP/1.1\r\n").is_empty());
        assert_eq!(io.conn.buffered(), 16);
        let plain = b"HTTP/1.1 200 OK\r\n".to_vec();
        let ptr = plain.as_ptr();
        let wire = sealed(&mut io, plain);
        assert_eq!(wire.as_ptr(), ptr, "the same buffer, not a copy");
    }
}
