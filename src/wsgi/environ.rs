//! Building the WSGI environ: a template of per-server keys, copied and filled per request.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::http::{Request, Version};

use super::file_wrapper::FileWrapper;

/// Keys that are the same for every request on one server.
pub struct ServerInfo {
    pub server_name: String,
    pub server_port: u16,
    pub url_scheme: &'static str,
    pub software: String,
    pub multiprocess: bool,
    /// The app may run on several threads at once (a pool of more than one).
    pub multithread: bool,
}

/// The environ dict every request starts from (copied, never shared with an app).
/// `empty_input` is the wsgi.input of every request without a body.
pub fn template<'py>(
    py: Python<'py>,
    info: &ServerInfo,
    empty_input: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("wsgi.version", PyTuple::new(py, [1, 0])?)?;
    d.set_item("wsgi.url_scheme", info.url_scheme)?;
    d.set_item("wsgi.errors", py.import("sys")?.getattr("stderr")?)?;
    d.set_item("wsgi.multithread", info.multithread)?;
    d.set_item("wsgi.multiprocess", info.multiprocess)?;
    d.set_item("wsgi.run_once", false)?;
    d.set_item("wsgi.input_terminated", true)?;
    d.set_item("wsgi.file_wrapper", py.get_type::<FileWrapper>())?;
    d.set_item("SCRIPT_NAME", "")?;
    d.set_item("SERVER_NAME", &info.server_name)?;
    d.set_item("SERVER_PORT", info.server_port.to_string())?;
    d.set_item("SERVER_SOFTWARE", &info.software)?;
    // Every request has these: placeholders make each copy big enough up front that filling
    // it in does not resize it. Where there is a usual value the template holds it, so a GET
    // without a query or body sets fewer keys; build() sets every one whose value differs.
    let keys = RequestKeys::get(py);
    for key in keys.all() {
        d.set_item(key, py.None())?;
    }
    d.set_item(&keys.method, intern!(py, "GET"))?;
    d.set_item(&keys.query, intern!(py, ""))?;
    d.set_item(&keys.protocol, intern!(py, "HTTP/1.1"))?;
    d.set_item(&keys.input, empty_input)?;
    // Those keys fill the dict's table exactly, so the first header of every request would
    // make each copy resize. One more key grows the template's table instead, and removing
    // it again keeps the size: copies are made at that size, with room for the headers.
    let spare = PyString::new(py, "uringserve.spare");
    d.set_item(&spare, py.None())?;
    d.del_item(&spare)?;
    Ok(d)
}

/// The keys build() sets for every request, as interned str. Listed once for both build() and
/// the template, which must hold every one of them (see template()).
struct RequestKeys {
    method: Py<PyString>,
    query: Py<PyString>,
    protocol: Py<PyString>,
    input: Py<PyString>,
    path: Py<PyString>,
    raw_uri: Py<PyString>,
    request_uri: Py<PyString>,
    remote_addr: Py<PyString>,
    remote_port: Py<PyString>,
}

impl RequestKeys {
    fn get(py: Python<'_>) -> &'static RequestKeys {
        static KEYS: PyOnceLock<RequestKeys> = PyOnceLock::new();
        KEYS.get_or_init(py, || {
            let key = |name| PyString::intern(py, name).unbind();
            RequestKeys {
                method: key("REQUEST_METHOD"),
                query: key("QUERY_STRING"),
                protocol: key("SERVER_PROTOCOL"),
                input: key("wsgi.input"),
                path: key("PATH_INFO"),
                raw_uri: key("RAW_URI"),
                request_uri: key("REQUEST_URI"),
                remote_addr: key("REMOTE_ADDR"),
                remote_port: key("REMOTE_PORT"),
            }
        })
    }

    /// Every key, for the template. Taken apart without `..`: a key added to the struct does
    /// not compile until it is listed here too.
    fn all(&self) -> [&Py<PyString>; 9] {
        let RequestKeys {
            method,
            query,
            protocol,
            input,
            path,
            raw_uri,
            request_uri,
            remote_addr,
            remote_port,
        } = self;
        [
            method,
            query,
            protocol,
            input,
            path,
            raw_uri,
            request_uri,
            remote_addr,
            remote_port,
        ]
    }
}

/// Bytes as a latin-1 str: PEP 3333's rule for everything taken from the wire.
pub fn latin1_str<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    if bytes.is_ascii() {
        // ASCII is already valid UTF-8: no per-byte conversion needed.
        return PyString::new(py, std::str::from_utf8(bytes).unwrap_or_default());
    }
    let text: String = bytes.iter().map(|&b| b as char).collect();
    PyString::new(py, &text)
}

/// CGI name of a header: HTTP_ + upper case, '-' as '_'. None for names carrying '_', which a
/// client could use to forge a header that a proxy in front believed it had removed.
fn cgi_name(name: &str) -> Option<String> {
    if name.eq_ignore_ascii_case("content-type") {
        return Some("CONTENT_TYPE".to_owned());
    }
    if name.eq_ignore_ascii_case("content-length") {
        return Some("CONTENT_LENGTH".to_owned());
    }
    if name.contains('_') {
        return None;
    }
    let mut key = String::with_capacity(5 + name.len());
    key.push_str("HTTP_");
    key.extend(name.chars().map(|c| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        }
    }));
    Some(key)
}

/// Strings the environ needs again and again, made once per server instead of per request:
/// header names as interned keys (a dict insert with one skips hashing a new str), peer
/// addresses, and recently seen short values (Host, paths, common header values). Bounded,
/// so odd input from clients cannot grow it.
#[derive(Default)]
pub struct KeyCache {
    strings: Mutex<Strings>,
}

#[derive(Default)]
struct Strings {
    keys: HashMap<String, Option<Py<PyString>>>,
    /// Peer addresses as str, shared by their connections instead of one copy each.
    addrs: HashMap<IpAddr, Py<PyString>>,
    /// Direct-mapped: a value evicts whatever shared its slot, so lookups stay one compare
    /// whatever clients send.
    recent: [Option<(Vec<u8>, Py<PyString>)>; RECENT_SLOTS],
    /// In front of `keys` and `addrs`, the same way: a request's names and peer mostly
    /// repeat the previous ones', found without hashing.
    recent_keys: [Option<(String, Option<Py<PyString>>)>; RECENT_SLOTS],
    last_addr: Option<(IpAddr, Py<PyString>)>,
}

const KEY_CACHE_MAX: usize = 512;
const ADDR_CACHE_MAX: usize = 4096;
const RECENT_SLOTS: usize = 32;
/// Longer values (cookies, tokens) rarely repeat exactly; they are made afresh.
const RECENT_MAX_LEN: usize = 64;

impl KeyCache {
    /// The cache for one request, or None while another thread holds it (that thread may be
    /// waiting for the GIL this one holds, so waiting here could deadlock): the request then
    /// makes its strings afresh.
    fn strings(&self) -> Option<MutexGuard<'_, Strings>> {
        match self.strings.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

impl Strings {
    fn addr<'py>(&mut self, py: Python<'py>, host: &PeerHost) -> Bound<'py, PyString> {
        let ip = match host {
            PeerHost::Ip(ip) => ip,
            // The epoll loop's peers come as text: shared like any other short value.
            PeerHost::Name(name) => return self.value(py, name.as_bytes()),
        };
        if let Some((last, s)) = &self.last_addr {
            if last == ip {
                return s.bind(py).clone();
            }
        }
        let s = match self.addrs.get(ip) {
            Some(s) => s.bind(py).clone(),
            None => {
                let s = PyString::new(py, &ip.to_string());
                if self.addrs.len() < ADDR_CACHE_MAX {
                    self.addrs.insert(*ip, s.clone().unbind());
                }
                s
            }
        };
        self.last_addr = Some((*ip, s.clone().unbind()));
        s
    }

    fn key<'py>(&mut self, py: Python<'py>, name: &str) -> Option<Bound<'py, PyString>> {
        let slot = &mut self.recent_keys[recent_slot(name.as_bytes())];
        if let Some((cached, key)) = slot {
            if cached == name {
                return key.as_ref().map(|k| k.bind(py).clone());
            }
        }
        let key = match self.keys.get(name) {
            Some(key) => key.as_ref().map(|k| k.bind(py).clone()),
            None => {
                let key = cgi_name(name).map(|k| PyString::intern(py, &k));
                if self.keys.len() < KEY_CACHE_MAX {
                    self.keys
                        .insert(name.to_owned(), key.as_ref().map(|k| k.clone().unbind()));
                }
                key
            }
        };
        let unbound = key.as_ref().map(|k| k.clone().unbind());
        match slot {
            Some((cached, old)) => {
                cached.clear();
                cached.push_str(name);
                *old = unbound;
            }
            None => *slot = Some((name.to_owned(), unbound)),
        }
        key
    }

    /// `bytes` as a str, shared with earlier requests that had the same short ASCII value
    /// (for ASCII, latin-1 and UTF-8 agree, so every caller's conversion gives that str).
    fn value<'py>(&mut self, py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
        if bytes.len() > RECENT_MAX_LEN || !bytes.is_ascii() {
            return latin1_str(py, bytes);
        }
        let slot = &mut self.recent[recent_slot(bytes)];
        if let Some((cached, s)) = slot {
            if cached.as_slice() == bytes {
                return s.bind(py).clone();
            }
        }
        let s = latin1_str(py, bytes);
        match slot {
            // The old buffer is reused: steady traffic settles without allocating here.
            Some((cached, old)) => {
                cached.clear();
                cached.extend_from_slice(bytes);
                *old = s.clone().unbind();
            }
            None => *slot = Some((bytes.to_vec(), s.clone().unbind())),
        }
        s
    }
}

fn recent_slot(bytes: &[u8]) -> usize {
    let (first, last) = (bytes.first(), bytes.last());
    let mix = bytes.len()
        ^ usize::from(first.copied().unwrap_or(0)) << 2
        ^ usize::from(last.copied().unwrap_or(0)) << 1
        ^ usize::from(bytes.get(bytes.len() / 2).copied().unwrap_or(0));
    mix % RECENT_SLOTS
}

/// A value through the cache when there is one.
fn cached_value<'py>(
    py: Python<'py>,
    cache: &mut Option<MutexGuard<'_, Strings>>,
    bytes: &[u8],
) -> Bound<'py, PyString> {
    match cache {
        Some(strings) => strings.value(py, bytes),
        None => latin1_str(py, bytes),
    }
}

/// A peer's address: kept as an IP where there is one, since an idle connection should
/// cost as little memory as possible.
pub enum PeerHost {
    Ip(IpAddr),
    Name(Box<str>),
}

impl fmt::Display for PeerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerHost::Ip(ip) => ip.fmt(f),
            PeerHost::Name(name) => f.write_str(name),
        }
    }
}

/// The peer of a connection; its port string is made once per connection (a loop may keep it
/// aside while the connection idles), its address string comes from the server-wide
/// [`KeyCache`] (most connections share a few addresses).
pub struct Peer {
    pub host: PeerHost,
    pub port: u16,
    port_str: OnceLock<Py<PyString>>,
}

impl Peer {
    pub fn new(host: PeerHost, port: u16) -> Self {
        Peer {
            host,
            port,
            port_str: OnceLock::new(),
        }
    }

    /// A peer whose address could not be read (it was gone before getpeername).
    pub fn unknown() -> Self {
        // An empty Box<str> allocates nothing.
        Peer::new(PeerHost::Name("".into()), 0)
    }

    /// Takes the port string out, for a cache that outlives this connection's turn.
    pub fn take_port_str(&mut self) -> Option<Py<PyString>> {
        self.port_str.take()
    }

    /// Hands back a port string made earlier for this port.
    pub fn restore_port_str(&mut self, s: Py<PyString>) {
        // Only an unset cell is filled: a string already there is the same text.
        let _ = self.port_str.set(s);
    }

    fn port_str<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        self.port_str
            .get_or_init(|| PyString::new(py, &self.port.to_string()).unbind())
            .bind(py)
            .clone()
    }
}

fn method_str<'py>(py: Python<'py>, method: &str) -> Bound<'py, PyString> {
    match method {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "HEAD" => intern!(py, "HEAD").clone(),
        "PUT" => intern!(py, "PUT").clone(),
        "DELETE" => intern!(py, "DELETE").clone(),
        "OPTIONS" => intern!(py, "OPTIONS").clone(),
        "PATCH" => intern!(py, "PATCH").clone(),
        other => PyString::new(py, other),
    }
}

/// Fills a copy of the template with one request's keys.
pub fn build<'py>(
    py: Python<'py>,
    template: &Bound<'py, PyDict>,
    keys: &KeyCache,
    req: &Request,
    peer: &Peer,
    input: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let env = template.copy()?;
    let k = RequestKeys::get(py);
    let mut cache = keys.strings();
    let method = req.method();
    if method != "GET" {
        env.set_item(&k.method, method_str(py, method))?;
    }
    let path = cached_value(py, &mut cache, req.path());
    let query = match req.query() {
        "" => None,
        q if q.is_ascii() => Some(cached_value(py, &mut cache, q.as_bytes())),
        q => Some(PyString::new(py, q)),
    };
    if let Some(query) = query {
        env.set_item(&k.query, query)?;
    }
    let target = match req.target() {
        // Most targets are just the path: one str serves both (when ASCII, where the path's
        // latin-1 and the target's UTF-8 decoding agree).
        t if t.is_ascii() && t.as_bytes() == req.path() => path.clone(),
        t if t.is_ascii() => cached_value(py, &mut cache, t.as_bytes()),
        t => PyString::new(py, t),
    };
    env.set_item(&k.path, path)?;
    env.set_item(&k.raw_uri, &target)?;
    env.set_item(&k.request_uri, target)?;
    if req.version == Version::Http10 {
        env.set_item(&k.protocol, intern!(py, "HTTP/1.0"))?;
    }
    let addr = match &mut cache {
        Some(strings) => strings.addr(py, &peer.host),
        None => PyString::new(py, &peer.host.to_string()),
    };
    env.set_item(&k.remote_addr, addr)?;
    env.set_item(&k.remote_port, peer.port_str(py))?;
    if let Some(input) = input {
        env.set_item(&k.input, input)?;
    }
    for (i, (name, value)) in req.headers().enumerate() {
        let key = match &mut cache {
            Some(strings) => strings.key(py, name),
            None => cgi_name(name).map(|k| PyString::intern(py, &k)),
        };
        let Some(key) = key else {
            continue;
        };
        // Names equal but for case give the same key, and no other two do ('_' is refused,
        // '-' is the only byte mapped to '_'), so repeats are found without asking the dict.
        let repeated = req
            .headers()
            .take(i)
            .any(|(earlier, _)| earlier.eq_ignore_ascii_case(name));
        let value = cached_value(py, &mut cache, value);
        if !repeated {
            env.set_item(&key, value)?;
            continue;
        }
        // Repeated fields are one field with a comma-separated list (RFC 9110, 5.3).
        if key.to_str()? != "CONTENT_LENGTH" {
            if let Some(prev) = env.get_item(&key)? {
                let joined = format!("{},{}", prev.extract::<String>()?, value.to_str()?);
                env.set_item(&key, joined)?;
            }
        }
    }
    Ok(env)
}
