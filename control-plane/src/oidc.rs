//! OIDC access tokens: verified against the issuer's JWKS.
//!
//! The JWKS address comes from the issuer's discovery document
//! (`<issuer>/.well-known/openid-configuration`, built without a doubled
//! slash whether or not the configured issuer ends in one). Tokens must be
//! signed with an asymmetric algorithm by a key from that set, carry `exp`,
//! `iss` (the issuer, with or without its trailing slash), `aud` (the
//! configured audience) and `sub`. Keys are cached; a token naming an unknown
//! `kid` triggers a refresh (at most one per `min_refresh`, so random kids
//! cannot make us hammer the issuer), and the whole set is refreshed when older
//! than `max_age`. When a refresh fails the cached keys keep working.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::clock::Clock;
use crate::config::OidcConfig;
use crate::error::{Error, Result};

/// Clock skew tolerated on `exp`/`nbf`, seconds.
const LEEWAY_SECS: u64 = 30;
/// Default minimum time between refreshes caused by unknown `kid`s.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(10);
/// Default maximum age of the cached key set.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

/// Claims the control plane uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    /// Subject: the user's id at the issuer.
    pub sub: String,
    /// E-mail, when the issuer includes it.
    #[serde(default)]
    pub email: Option<String>,
}

struct CachedKey {
    key: DecodingKey,
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
}

struct KeySet {
    keys: HashMap<String, CachedKey>,
    /// Keys without a `kid`, usable only when the set holds exactly one key.
    unnamed: Vec<CachedKey>,
    fetched_at_ms: i64,
}

impl KeySet {
    fn find(&self, kid: Option<&str>) -> Option<&CachedKey> {
        match kid {
            Some(k) => self.keys.get(k),
            None if self.keys.len() + self.unnamed.len() == 1 => {
                self.keys.values().next().or_else(|| self.unnamed.first())
            }
            None => None,
        }
    }
}

/// Verifies access tokens of one issuer for one audience.
pub struct OidcVerifier {
    issuer: String,
    audience: String,
    http: reqwest::Client,
    clock: Clock,
    min_refresh: Duration,
    max_age: Duration,
    cache: RwLock<Option<KeySet>>,
    refresh: Mutex<()>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

impl OidcVerifier {
    /// A verifier for `config`, fetching with `http` and timing with `clock`.
    pub fn new(config: &OidcConfig, http: reqwest::Client, clock: Clock) -> Self {
        OidcVerifier {
            issuer: config.issuer.trim_end_matches('/').to_string(),
            audience: config.audience.clone(),
            http,
            clock,
            min_refresh: DEFAULT_MIN_REFRESH,
            max_age: DEFAULT_MAX_AGE,
            cache: RwLock::new(None),
            refresh: Mutex::new(()),
        }
    }

    /// Change the refresh limits.
    pub fn with_refresh_limits(mut self, min_refresh: Duration, max_age: Duration) -> Self {
        self.min_refresh = min_refresh;
        self.max_age = max_age;
        self
    }

    /// The issuer without a trailing slash.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Verify `token` and return its claims. 401 for a bad token; 503 when the
    /// issuer cannot be reached and no cached key applies.
    pub async fn verify(&self, token: &str) -> Result<Claims> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::unauthorized("malformed token"))?;
        let alg = header.alg;
        if !matches!(
            alg.family(),
            AlgorithmFamily::Rsa | AlgorithmFamily::Ec | AlgorithmFamily::Ed
        ) {
            return Err(Error::unauthorized("token algorithm not accepted"));
        }
        let kid = header.kid.as_deref();

        let stale = {
            let cache = self.cache.read().await;
            match cache.as_ref() {
                None => true,
                Some(set) => {
                    self.clock.now_ms() - set.fetched_at_ms > self.max_age.as_millis() as i64
                }
            }
        };
        if stale {
            self.refresh(kid, true).await?;
        }
        let mut result = self.try_decode(token, kid, alg).await;
        if matches!(result, Err(KeyMissing)) {
            self.refresh(kid, false).await?;
            result = self.try_decode(token, kid, alg).await;
        }
        match result {
            Ok(r) => r,
            Err(KeyMissing) => Err(Error::unauthorized("token signed with an unknown key")),
        }
    }

    async fn try_decode(
        &self,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Result<Claims>, KeyMissing> {
        let cache = self.cache.read().await;
        let key = cache.as_ref().and_then(|s| s.find(kid)).ok_or(KeyMissing)?;
        if key.family != alg.family() || key.alg.is_some_and(|a| a != alg) {
            return Ok(Err(Error::unauthorized(
                "token algorithm does not match its key",
            )));
        }
        let mut v = Validation::new(alg);
        v.set_issuer(&[self.issuer.clone(), format!("{}/", self.issuer)]);
        v.set_audience(&[self.audience.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        Ok(jsonwebtoken::decode::<Claims>(token, &key.key, &v)
            .map(|d| d.claims)
            .map_err(|e| {
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not valid yet",
                    ErrorKind::InvalidIssuer => "token from another issuer",
                    ErrorKind::InvalidAudience => "token for another audience",
                    ErrorKind::InvalidSignature => "bad token signature",
                    ErrorKind::MissingRequiredClaim(_)
                    | ErrorKind::InvalidClaimFormat(_)
                    | ErrorKind::Json(_) => "token lacks a required claim or has a malformed one",
                    _ => "invalid token",
                };
                Error::unauthorized(why)
            }))
    }

    /// Fetch the key set again. `forced` refreshes (empty or stale cache)
    /// ignore the rate limit; refreshes for an unknown kid respect it.
    async fn refresh(&self, kid: Option<&str>, forced: bool) -> Result<()> {
        let _guard = self.refresh.lock().await;
        let now = self.clock.now_ms();
        {
            let cache = self.cache.read().await;
            if let Some(set) = cache.as_ref() {
                let age = now - set.fetched_at_ms;
                if forced && age <= self.max_age.as_millis() as i64 {
                    return Ok(()); // someone else refreshed while we waited
                }
                if !forced {
                    if set.find(kid).is_some() {
                        return Ok(());
                    }
                    if age < self.min_refresh.as_millis() as i64 {
                        return Ok(()); // rate limited: the kid stays unknown
                    }
                }
            }
        }
        match self.fetch().await {
            Ok(mut set) => {
                set.fetched_at_ms = now;
                tracing::info!(issuer = %self.issuer, keys = set.keys.len() + set.unnamed.len(), "fetched OIDC signing keys");
                *self.cache.write().await = Some(set);
                Ok(())
            }
            Err(e) => {
                let mut cache = self.cache.write().await;
                match cache.as_mut() {
                    Some(set) => {
                        // Keep serving with the keys we have; try again after min_refresh.
                        tracing::warn!(issuer = %self.issuer, error = %e, "refreshing OIDC keys failed; keeping cached keys");
                        set.fetched_at_ms = now - (self.max_age.as_millis() as i64)
                            + self.min_refresh.as_millis() as i64;
                        Ok(())
                    }
                    None => {
                        tracing::warn!(issuer = %self.issuer, error = %e, "fetching OIDC keys failed");
                        Err(Error::unavailable(
                            "oidc_unavailable",
                            "cannot reach the OIDC issuer to verify the token; retry later",
                        ))
                    }
                }
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<KeySet> {
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let disc: Discovery = self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if disc.issuer.trim_end_matches('/') != self.issuer {
            anyhow::bail!(
                "discovery document names issuer {:?}, expected {:?}",
                disc.issuer,
                self.issuer
            );
        }
        let jwks: RawJwks = self
            .http
            .get(&disc.jwks_uri)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut set = KeySet {
            keys: HashMap::new(),
            unnamed: Vec::new(),
            fetched_at_ms: 0,
        };
        for raw in jwks.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
                continue; // a key type we do not understand
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
                AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
                AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
                AlgorithmParameters::OctetKey(_) => continue, // symmetric: never from a JWKS
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::from_str(&a.to_string()).ok());
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let cached = CachedKey { key, alg, family };
            match jwk.common.key_id {
                Some(kid) => {
                    set.keys.insert(kid, cached);
                }
                None => set.unnamed.push(cached),
            }
        }
        Ok(set)
    }
}

struct KeyMissing;

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}
