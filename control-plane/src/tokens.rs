//! Secrets the control plane mints (API keys, runner tokens, runner API keys)
//! and how they are stored: only as SHA-256 hex.

use rand::Rng;
use sha2::{Digest, Sha256};

/// Random characters after the prefix (alphanumeric: ~238 bits).
const SECRET_CHARS: usize = 40;
/// Characters of a key kept for display after its prefix.
const DISPLAY_CHARS: usize = 8;

/// A fresh secret: `prefix` followed by 40 random alphanumeric characters.
pub fn generate(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + SECRET_CHARS);
    s.push_str(prefix);
    s.extend(
        rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(SECRET_CHARS)
            .map(char::from),
    );
    s
}

/// SHA-256 of `secret`, lowercase hex: what the database stores.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The part of a key shown in listings (`bxk_AbCd1234`).
pub fn display_prefix(key: &str, prefix: &str) -> String {
    let rest: String = key
        .strip_prefix(prefix)
        .unwrap_or(key)
        .chars()
        .take(DISPLAY_CHARS)
        .collect();
    format!("{prefix}{rest}")
}

/// True for 64 hex characters (a SHA-256 digest), either case.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_prefixed_random_and_hash_to_hex() {
        let a = generate("bxk_");
        let b = generate("bxk_");
        assert!(a.starts_with("bxk_") && a.len() == 44);
        assert_ne!(a, b);
        assert!(a[4..].chars().all(|c| c.is_ascii_alphanumeric()));
        let h = sha256_hex(&a);
        assert!(is_sha256_hex(&h));
        assert_eq!(h, sha256_hex(&a));
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(display_prefix(&a, "bxk_").len(), 12);
        assert!(!is_sha256_hex("zz"));
    }
}
