//! Tokens: generated from the OS's randomness, stored only as SHA-256 hashes, compared in
//! constant time.
//!
//! Node tokens are looked up by their hash. Timing of that lookup can at most reveal something
//! about a hash, never about a token whose hash is not already known, so it leaks nothing usable.

use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bytes of randomness in a token: 256 bits, above SPEC §4's 128-bit floor.
const TOKEN_BYTES: usize = 32;

/// A new random token, hex-encoded.
pub(crate) fn new_token() -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::io(
            "the OS random number generator failed",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(hex(&bytes))
}

/// A short random id (for deployment ids): 64 bits, hex.
pub(crate) fn new_id() -> Result<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::io(
            "the OS random number generator failed",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(hex(&bytes))
}

/// SHA-256 of a token, the only form in which tokens are kept.
pub(crate) fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What a node keeps once an agent registered with `provision_token` and `nonce`: SHA-256 of
/// both, so only that agent (the one that knows the nonce) can resend its registration.
pub(crate) fn registration_key(provision_token: &str, nonce: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"taskfly registration\0");
    hasher.update(provision_token.as_bytes());
    hasher.update(b"\0");
    hasher.update(nonce.as_bytes());
    hasher.finalize().into()
}

/// Compares two hashes without an early exit, so timing says nothing about where they differ.
pub(crate) fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bytes_equal(a, b)
}

/// Compares two byte strings of equal length without an early exit (only a length that
/// differs answers sooner: every token has the same length).
fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hashes the keys of maps whose keys the engine drew from the OS's randomness: hashes of its
/// tokens ([`new_token`]), and its deployment ids (`dep-` and [`new_id`]), alone or with a node
/// index. Such keys are uniform already and no client can choose them to collide, so a fold of
/// their 8-byte words (as rustc's FxHash) does, at a tenth of the cost of SipHash (`HashMap`'s
/// default, which guards maps of keys that clients choose). The maps every node request looks
/// up use it: the stores' auth token indexes, `MemoryStore`'s deployments and the engine's
/// last-seen times.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DrawnKeys;

impl std::hash::BuildHasher for DrawnKeys {
    type Hasher = DrawnKeyHasher;

    fn build_hasher(&self) -> DrawnKeyHasher {
        DrawnKeyHasher(0)
    }
}

/// The [`std::hash::Hasher`] of [`DrawnKeys`].
#[derive(Debug)]
pub(crate) struct DrawnKeyHasher(u64);

impl DrawnKeyHasher {
    fn fold(&mut self, word: u64) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl std::hash::Hasher for DrawnKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            self.fold(u64::from_le_bytes(eight));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut eight = [0u8; 8];
            eight[..rest.len()].copy_from_slice(rest);
            self.fold(u64::from_le_bytes(eight));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.fold(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.fold(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.fold(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The SHA-256 of the bearer token in the last `Authorization` header it read, kept with that
/// header: a keep-alive connection sends the same header with every request, and parsing and
/// hashing it once is enough. Headers are compared in constant time, so a connection several
/// clients share (a proxy's) tells none of them anything of another's token. Holds the header
/// as long as it lives (a connection's life); its `Debug` shows none of it.
#[derive(Default)]
pub(crate) struct LastTokenHash {
    last: Mutex<Option<HashedHeader>>,
}

/// An `Authorization` header value and the SHA-256 of its bearer token.
type HashedHeader = (Box<[u8]>, [u8; 32]);

impl LastTokenHash {
    /// [`hash_token`] of the token in an `Authorization: Bearer <token>` header value
    /// ([`bearer`]); `None` when the value is not such a header (or not visible ASCII).
    /// Hashes only when the header differs from the last one asked about.
    pub(crate) fn bearer_hash(&self, header: &[u8]) -> Option<[u8; 32]> {
        let mut last = crate::sync::lock(&self.last);
        if let Some((known, hash)) = &*last {
            if bytes_equal(known, header) {
                return Some(*hash);
            }
        }
        // As `HeaderValue::to_str` takes them: visible ASCII, spaces and tabs.
        let visible = |byte: &u8| *byte == b'\t' || (0x20..0x7f).contains(byte);
        if !header.iter().all(visible) {
            return None;
        }
        let token = bearer(std::str::from_utf8(header).ok())?;
        let hash = hash_token(token);
        *last = Some((header.into(), hash));
        Some(hash)
    }
}

impl std::fmt::Debug for LastTokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastTokenHash").finish_non_exhaustive()
    }
}

/// The token in an `Authorization: Bearer <token>` header value.
pub(crate) fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
        Some(token.trim())
    } else {
        None
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_distinct() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn drawn_keys_spread_over_a_maps_buckets_and_tags() {
        use std::hash::BuildHasher;
        let spread = |hashes: Vec<u64>| {
            // hashbrown takes a bucket from the low bits and a tag from the top 7.
            let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 0xff).collect();
            let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
            assert!(buckets.len() > 200, "{} of 256 buckets", buckets.len());
            assert!(tags.len() > 100, "{} of 128 tags", tags.len());
        };
        spread(
            (0..1000)
                .map(|_| DrawnKeys.hash_one(hash_token(&new_token().unwrap())))
                .collect(),
        );
        let deployment: std::sync::Arc<str> = format!("dep-{}", new_id().unwrap()).into();
        spread(
            (0..1000u32)
                .map(|index| DrawnKeys.hash_one((std::sync::Arc::clone(&deployment), index)))
                .collect(),
        );
        spread(
            (0..1000)
                .map(|_| DrawnKeys.hash_one((format!("dep-{}", new_id().unwrap()), 0u32)))
                .collect(),
        );
    }

    #[test]
    fn hashes_compare() {
        let h = hash_token("abc");
        assert!(hashes_equal(&h, &hash_token("abc")));
        assert!(!hashes_equal(&h, &hash_token("abd")));
    }

    #[test]
    fn the_last_token_hash_is_the_hash_of_the_bearer_token_sent() {
        let last = LastTokenHash::default();
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        for token in [&a, &a, &b, &a, &b, &b] {
            let header = format!("Bearer {token}");
            assert_eq!(last.bearer_hash(header.as_bytes()), Some(hash_token(token)));
        }
        let shown = format!("{last:?}");
        assert!(!shown.contains(&b), "{shown}");
        assert_eq!(
            last.bearer_hash(b"bearer  short "),
            Some(hash_token("short"))
        );
        assert_eq!(last.bearer_hash(b"Basic short"), None);
        assert_eq!(last.bearer_hash(b"Bearer "), None);
        assert_eq!(last.bearer_hash("Bearer caf\u{e9}".as_bytes()), None);
        assert_eq!(
            last.bearer_hash(b"bearer  short "),
            Some(hash_token("short")),
            "a refused header leaves the last one known"
        );
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer xyz")), Some("xyz"));
        assert_eq!(bearer(Some("bearer  xyz ")), Some("xyz"));
        assert_eq!(bearer(Some("Basic xyz")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
