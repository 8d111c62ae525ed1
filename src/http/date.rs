//! The clock as text: the `Date` header value and the access log's `%(t)s`, each formatted
//! at most once per second per thread.

use std::cell::{Cell, RefCell};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of an IMF-fixdate such as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub const HTTP_DATE_LEN: usize = 29;

thread_local! {
    // Per thread rather than shared: no locking on the response path, and each event loop
    // formats at most once per second anyway.
    static CACHE: Cell<(u64, [u8; HTTP_DATE_LEN])> = const { Cell::new((u64::MAX, [0; HTTP_DATE_LEN])) };
    // The same for the access log: app threads log concurrently, and a shared cache would
    // put a lock on every logged request.
    static LOG_TIME: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn unix_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The current time as an HTTP date.
pub fn http_date_now() -> [u8; HTTP_DATE_LEN] {
    let second = unix_second();
    CACHE.with(|cache| {
        let (cached_second, text) = cache.get();
        if cached_second == second {
            return text;
        }
        let text = http_date_at(second);
        cache.set((second, text));
        text
    })
}

/// Appends the local time as the common log format shows it: `[21/Nov/2026:09:13:24 +0000]`.
pub fn push_log_time_now(out: &mut String) {
    let second = unix_second();
    LOG_TIME.with_borrow_mut(|(cached_second, text)| {
        if *cached_second != second {
            text.clear();
            push_log_time_at(second, text);
            *cached_second = second;
        }
        out.push_str(text);
    });
}

fn push_log_time_at(unix_second: u64, out: &mut String) {
    use std::fmt::Write as _;
    let utc = i64::try_from(unix_second)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .unwrap_or_default();
    let local = utc.with_timezone(&chrono::Local);
    // Writing to a String cannot fail.
    let _ = write!(out, "{}", local.format("[%d/%b/%Y:%H:%M:%S %z]"));
}

fn http_date_at(unix_second: u64) -> [u8; HTTP_DATE_LEN] {
    let formatted = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix_second));
    // httpdate only formats years 1970..=9999, which always gives exactly 29 bytes.
    <[u8; HTTP_DATE_LEN]>::try_from(formatted.as_bytes())
        .unwrap_or(*b"Thu, 01 Jan 1970 00:00:00 GMT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_imf_fixdate() {
        assert_eq!(&http_date_at(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date_at(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn now_is_cached_and_parses_back() {
        let a = http_date_now();
        let b = http_date_now();
        let parsed = |d: &[u8]| httpdate::parse_http_date(std::str::from_utf8(d).unwrap()).unwrap();
        let (ta, tb) = (parsed(&a), parsed(&b));
        assert!(tb >= ta && tb.duration_since(ta).unwrap() <= Duration::from_secs(1));
        let now = SystemTime::now();
        assert!(now.duration_since(tb).unwrap_or_default() <= Duration::from_secs(2));
    }

    #[test]
    fn log_time_has_the_common_log_shape() {
        let mut t = String::new();
        push_log_time_now(&mut t);
        // [21/Nov/2026:09:13:24 +0000]
        assert_eq!(t.len(), 28, "{t}");
        assert!(
            t.starts_with('[') && t.ends_with(']') && t.as_bytes()[21] == b' ',
            "{t}"
        );
        // Cached text is appended as it is, after what `out` held.
        let mut again = String::from("x");
        push_log_time_now(&mut again);
        assert!(again.starts_with('x') && again.len() == 29, "{again}");
    }
}
