//! Request ids: the `x-request-id` that ties a request's log lines, its upstream call and its
//! answer together.

use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header that carries the id, both ways.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's id when it sent a sane one (1 to 128 characters of `[A-Za-z0-9._:-]`), or a
/// new one.
pub fn for_request(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(value) if is_sane(value.as_bytes()) => value.clone(),
        _ => generate(),
    }
}

fn is_sane(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new id: 32 hex digits, unique within the process (a counter) and unlikely to repeat across
/// processes (a random seed), scrambled so that ids do not reveal request counts.
pub fn generate() -> HeaderValue {
    static SEED: LazyLock<u64> = LazyLock::new(|| RandomState::new().hash_one(std::process::id()));
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let high = splitmix64(*SEED ^ n);
    let low = splitmix64(high ^ n.rotate_left(32));
    // Hex by hand into a stack buffer: this runs for nearly every request, and `format!` would
    // allocate a string only to copy it into the header value.
    let mut text = [0u8; 32];
    text[..16].copy_from_slice(&hex_digits(high));
    text[16..].copy_from_slice(&hex_digits(low));
    HeaderValue::from_bytes(&text).expect("hex digits are a valid header value")
}

/// `x` as 16 lowercase hex digits, eight at a time in a word rather than a table lookup per
/// digit.
fn hex_digits(x: u64) -> [u8; 16] {
    let spread = |half: u32| {
        // One nibble per byte, the most significant nibble in the lowest byte (so that the
        // little-endian bytes of the word read in order).
        let v = u64::from(half.swap_bytes());
        let v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
        let v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
        let v = ((v >> 4) | (v << 8)) & 0x0f0f_0f0f_0f0f_0f0f;
        // '0' + n, and 39 more for n >= 10 ('a' is '0' + 49).
        let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (v + 0x3030_3030_3030_3030 + letters * 39).to_le_bytes()
    };
    let mut digits = [0u8; 16];
    digits[..8].copy_from_slice(&spread((x >> 32) as u32));
    digits[8..].copy_from_slice(&spread(x as u32));
    digits
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_client_ids_and_replaces_others() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(for_request(&headers), "abc-123");
        headers.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(for_request(&headers), "has space");
        assert_eq!(for_request(&HeaderMap::new()).len(), 32);
    }

    #[test]
    fn hex_digits_are_those_format_writes() {
        for x in [
            0,
            1,
            9,
            10,
            15,
            16,
            0xfedc_ba98_7654_3210,
            u64::MAX,
            0x0a1b_2c3d_4e5f_6789,
        ]
        .into_iter()
        .chain((0..1000).map(splitmix64))
        {
            assert_eq!(hex_digits(x), format!("{x:016x}").as_bytes(), "{x:#x}");
        }
    }

    #[test]
    fn generated_ids_differ() {
        assert_ne!(generate(), generate());
    }

    #[test]
    fn generated_ids_are_the_two_words_in_hex() {
        let id = generate();
        let text = id.to_str().unwrap();
        assert_eq!(text.len(), 32);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        // Not all zeros or one repeated digit, as a broken encoder would give.
        assert!(
            text.bytes()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 4
        );
    }
}
