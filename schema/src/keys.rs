//! Subscription keys: how they are made and how they are stored.
//!
//! The gateway hashes a presented key and compares digests; the portal generates keys and stores
//! only their digests. Both use these functions, so a key the portal issues is one the gateway
//! accepts.

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::config::KeyHash;

/// The prefix of every key Gatehouse issues, so that secret scanners can recognise leaked keys.
pub const KEY_PREFIX: &str = "ghk_";

/// SHA-256 of a key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The stored form of a key.
pub fn hash_key(key: &str) -> KeyHash {
    KeyHash(digest(key))
}

/// A new random subscription key: the prefix and 40 base-62 characters (238 bits).
pub fn generate_key() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let body: String = (0..40)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("{KEY_PREFIX}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_random_and_hash_to_their_digest() {
        let a = generate_key();
        let b = generate_key();
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 40);
        assert_ne!(a, b);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
    }
}
