//! The `Date` header value, formatted at most once per second per thread.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of an IMF-fixdate such as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub const HTTP_DATE_LEN: usize = 29;

thread_local! {
    // Per thread rather than shared: no locking on the response path, and each event loop
    // formats at most once per second anyway.
    static CACHE: Cell<(u64, [u8; HTTP_DATE_LEN])> = const { Cell::new((u64::MAX, [0; HTTP_DATE_LEN])) };
}

/// The current time as an HTTP date.
pub fn http_date_now() -> [u8; HTTP_DATE_LEN] {
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
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
}
