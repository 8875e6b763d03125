//! Stage secrets: names operators set with `boxctl secret set` and services
//! receive by reference. Only names live here; values never enter the graph.

/// Longest stage secret name.
pub const MAX_NAME_LEN: usize = 64;

/// Names boxctl generates itself under the stage's prefix; an operator's
/// secret may not take them.
pub const RESERVED: &[&str] = &["admin-api-key", "database-password"];

/// The Cloudflare API token of a stage with Cloudflare DNS.
pub const CLOUDFLARE_API_TOKEN: &str = "cloudflare-api-token";

/// The Cloudflare account id of a stage with Cloudflare DNS.
pub const CLOUDFLARE_ACCOUNT_ID: &str = "cloudflare-account-id";

/// Check a stage secret name: lowercase letters, digits and '-', not reserved.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "secret name {name:?} must be 1 to {MAX_NAME_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "secret name {name:?} may hold only lowercase letters, digits and '-' (not first or last)"
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!(
            "secret name {name:?} is reserved: boxctl generates it for the stage"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("sentry-dsn").is_ok());
        assert!(check_name(CLOUDFLARE_API_TOKEN).is_ok());
        for bad in [
            "",
            "Sentry",
            "a/b",
            "-x",
            "x-",
            "admin-api-key",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
