//! DNS records in a Cloudflare zone: the stage's public names and its
//! certificates' validation records.
//!
//! Ownership lives in the record's comment, `boxctl:<stack>/<stage>/<id>`.
//! The zone is read in one paginated list per run; a record boxctl does not
//! own is never overwritten: a wanted name held by one fails the plan, unless
//! the operator adopts it deliberately (`--adopt dns/<name>`).

pub mod api;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use cloudflare::endpoints::account::user::GetUserTokenStatus;
use cloudflare::endpoints::zones::zone::{ListZones, ListZonesParams};
use cloudflare::framework::Environment;
use cloudflare::framework::auth::Credentials;
use cloudflare::framework::client::ClientConfig;
use cloudflare::framework::client::async_api::Client;
use cloudflare::framework::response::ApiFailure;
use stack::{DesiredGraph, Props, Resource, ResourceId, Value, kinds};

use crate::engine::provider::{
    Claim, Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx,
};
use crate::secrets::SecretValue;
use api::{Record, RecordBody};

/// The API base used unless `BOXCTL_CLOUDFLARE_API_URL` says otherwise.
pub const DEFAULT_API_URL: &str = "https://api.cloudflare.com/client/v4/";

/// Environment variable pointing boxctl at another API base (an emulator).
pub const API_URL_ENV: &str = "BOXCTL_CLOUDFLARE_API_URL";

/// Records asked for per page when listing a zone.
const PAGE_SIZE: u32 = 1000;

/// Kinds this provider manages. Records are deleted before the load
/// balancers they point at.
pub const KINDS: &[KindSpec] = &[KindSpec {
    kind: kinds::CLOUDFLARE_DNS_RECORD,
    replace_on: &[],
    order: 70,
    create_before_delete: false,
    volatile_outputs: &[],
}];

/// How to reach Cloudflare for one stage.
pub struct CloudflareCredentials {
    /// API token (DNS edit and zone read on the zone).
    pub token: SecretValue,
    /// Account the zone must belong to.
    pub account_id: String,
}

/// What one run learnt about the zone.
#[derive(Default)]
struct Seen {
    /// Declared records with a literal name: id → name.
    wanted: BTreeMap<ResourceId, String>,
    /// Records of the zone boxctl does not own (for this stage).
    foreign: Vec<Record>,
}

/// The Cloudflare DNS provider of one stage and zone.
pub struct CloudflareProvider {
    stack: String,
    stage: String,
    zone_name: String,
    zone_id: String,
    client: Client,
    adopt: BTreeSet<ResourceId>,
    seen: Mutex<Seen>,
}

/// The API base URL, checked (the crate panics on a malformed one) and
/// ending with '/'.
pub fn api_url(configured: Option<&str>) -> anyhow::Result<String> {
    let raw = configured.unwrap_or(DEFAULT_API_URL).trim();
    let url = url::Url::parse(raw).map_err(|e| {
        anyhow::anyhow!("{API_URL_ENV}={raw:?} is not a URL ({e}); e.g. {DEFAULT_API_URL}")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        anyhow::bail!("{API_URL_ENV}={raw:?} must be an http(s) URL with a host");
    }
    let mut s = url.to_string();
    if !s.ends_with('/') {
        s.push('/');
    }
    Ok(s)
}

impl CloudflareProvider {
    /// Check the token and find the zone; one clear error when the token is
    /// missing, rejected or cannot see the zone, before anything changes.
    pub async fn connect(
        stack: &str,
        stage: &str,
        zone: &str,
        creds: CloudflareCredentials,
        base_url: &str,
    ) -> anyhow::Result<CloudflareProvider> {
        let client = Client::new(
            Credentials::UserAuthToken {
                token: creds.token.expose().to_string(),
            },
            ClientConfig::default(),
            Environment::Custom(base_url.to_string()),
        )
        .map_err(|e| anyhow::anyhow!("building the Cloudflare client: {e}"))?;
        let hint = format!(
            "set a valid token with `boxctl secret set cloudflare-api-token --stage {stage}` (or CLOUDFLARE_API_TOKEN)"
        );
        match client.request(&GetUserTokenStatus {}).await {
            Ok(s) if s.result.status == "active" => {}
            Ok(s) => anyhow::bail!(
                "the Cloudflare API token is {}, not active; {hint}",
                s.result.status
            ),
            Err(e) => anyhow::bail!(
                "the Cloudflare API token was rejected ({}); {hint}",
                api::describe_failure(&e)
            ),
        }
        let zones = client
            .request(&ListZones {
                params: ListZonesParams {
                    name: Some(zone.to_string()),
                    ..Default::default()
                },
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "listing Cloudflare zones named {zone} failed ({})",
                    api::describe_failure(&e)
                )
            })?;
        let Some(z) = zones
            .result
            .iter()
            .find(|z| z.name.eq_ignore_ascii_case(zone))
        else {
            anyhow::bail!(
                "the Cloudflare token cannot see zone {zone}; give it Zone:Read and DNS:Edit on {zone}, or fix [dns] zone in stack.toml"
            );
        };
        if z.account.id != creds.account_id {
            anyhow::bail!(
                "Cloudflare zone {zone} belongs to account {}, not to the stage's account {}; fix cloudflare-account-id (`boxctl secret set cloudflare-account-id --stage {stage}`)",
                z.account.id,
                creds.account_id
            );
        }
        Ok(CloudflareProvider {
            stack: stack.to_string(),
            stage: stage.to_string(),
            zone_name: z.name.to_ascii_lowercase(),
            zone_id: z.id.clone(),
            client,
            adopt: BTreeSet::new(),
            seen: Mutex::new(Seen::default()),
        })
    }

    /// Take over these records even where boxctl does not own them.
    pub fn adopt(&mut self, ids: impl IntoIterator<Item = ResourceId>) {
        self.adopt.extend(ids);
    }

    /// The zone's name.
    pub fn zone(&self) -> &str {
        &self.zone_name
    }

    fn marker_prefix(&self) -> String {
        format!("boxctl:{}/{}/", self.stack, self.stage)
    }

    fn marker(&self, id: &ResourceId) -> String {
        format!("{}{id}", self.marker_prefix())
    }

    /// Every record of the zone (or with `name`), page by page.
    async fn list(&self, name: Option<&str>) -> Result<Vec<Record>, ProviderError> {
        let mut all = Vec::new();
        let mut page = 1;
        loop {
            let r = self
                .client
                .request(&api::ListRecords {
                    zone: &self.zone_id,
                    page,
                    per_page: PAGE_SIZE,
                    name,
                })
                .await
                .map_err(|e| error("ListDnsRecords", &self.zone_name, &e))?;
            let got = r.result.0.len();
            all.extend(r.result.0);
            let total_pages = r
                .result_info
                .as_ref()
                .and_then(|i| i.get("total_pages"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(1);
            if got == 0 || u64::from(page) >= total_pages {
                return Ok(all);
            }
            page += 1;
        }
    }

    fn observed(&self, id: ResourceId, r: &Record) -> Observed {
        let mut o = Observed::new(
            id,
            kinds::CLOUDFLARE_DNS_RECORD,
            Props::from([
                ("zone".into(), Value::str(self.zone_name.as_str())),
                ("name".into(), Value::str(r.name.to_ascii_lowercase())),
                ("type".into(), Value::str(r.kind.as_str())),
                (
                    "content".into(),
                    Value::str(r.content.clone().unwrap_or_default()),
                ),
                ("proxied".into(), Value::from(r.proxied.unwrap_or(false))),
                ("ttl".into(), Value::from(r.ttl.unwrap_or(1))),
                (
                    "comment".into(),
                    Value::str(r.comment.clone().unwrap_or_default()),
                ),
            ]),
        );
        o.outputs = BTreeMap::from([
            ("id".to_string(), Value::str(r.id.as_str())),
            ("name".to_string(), Value::str(r.name.to_ascii_lowercase())),
        ]);
        o.handle = Some(r.id.clone());
        o
    }

    fn body(&self, d: &Resource) -> Result<RecordBody, ProviderError> {
        let s = |k: &str| {
            d.props.get(k).and_then(Value::as_str).ok_or_else(|| {
                ProviderError::hard("read properties", format!("{} has no `{k}`", d.id))
            })
        };
        if !s("zone")?.eq_ignore_ascii_case(&self.zone_name) {
            return Err(ProviderError::hard(
                "plan",
                format!(
                    "{} is in zone {}, but this stage's zone is {}",
                    d.id,
                    s("zone")?,
                    self.zone_name
                ),
            ));
        }
        let name = s("name")?.trim_end_matches('.').to_ascii_lowercase();
        if name != self.zone_name && !name.ends_with(&format!(".{}", self.zone_name)) {
            return Err(ProviderError::hard(
                "plan",
                format!("{}: {name} is not inside zone {}", d.id, self.zone_name),
            ));
        }
        Ok(RecordBody {
            name,
            kind: s("type")?.to_string(),
            content: s("content")?.trim_end_matches('.').to_string(),
            proxied: matches!(d.props.get("proxied"), Some(Value::Bool(true))),
            ttl: match d.props.get("ttl") {
                Some(Value::Int(n)) => u32::try_from(*n).unwrap_or(1),
                _ => 1,
            },
            comment: self.marker(&d.id),
        })
    }

    /// The records holding a name, described for an operator.
    fn describe_holders(holders: &[&Record]) -> String {
        let held: Vec<String> = holders
            .iter()
            .map(|r| {
                format!(
                    "{} record{} (id {}{})",
                    r.kind,
                    r.content
                        .as_deref()
                        .map(|c| format!(" → {c}"))
                        .unwrap_or_default(),
                    r.id,
                    r.comment
                        .as_deref()
                        .filter(|c| !c.is_empty())
                        .map(|c| format!(", comment {c:?}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        held.join(" and ")
    }

    /// How to take a name over deliberately; `{id}` is the declared record.
    fn adopt_hint(&self) -> String {
        format!(
            "to take it over deliberately, run deploy with `--adopt {{id}}` (boxctl then rewrites it and owns it); or remove it from zone {} in Cloudflare",
            self.zone_name
        )
    }

    /// The create-time refusal for a name held by records boxctl does not own.
    fn held(&self, id: &ResourceId, name: &str, holders: &[&Record]) -> ProviderError {
        ProviderError::hard(
            "CreateDnsRecord",
            format!(
                "{id}: name {name} is held by {}, which this stage does not own",
                Self::describe_holders(holders)
            ),
        )
        .with_hint(self.adopt_hint().replace("{id}", id.as_str()))
    }
}

/// A provider error for a failed call: throttling, 5xx and transport
/// failures are retried; the rest are the operator's to fix.
fn error(call: &str, what: &str, e: &ApiFailure) -> ProviderError {
    let (status, codes) = api::failure_codes(e);
    let message = format!("{what}: {}", api::describe_failure(e));
    match status {
        None => ProviderError::retryable(call, message),
        Some(s) if s == 429 || s >= 500 => ProviderError::retryable(call, message),
        Some(401 | 403) => ProviderError::hard(call, message).with_hint(
            "the Cloudflare token was refused: it needs Zone:Read and DNS:Edit on the stage's zone",
        ),
        Some(_) if codes.is_empty() => ProviderError::hard(call, message).with_hint(
            "the cloudflare crate drops error codes above 65535 (81xxx DNS codes); the message above is all it kept",
        ),
        Some(_) => ProviderError::hard(call, message),
    }
}

fn is_not_found(e: &ApiFailure) -> bool {
    // DNS codes (81044 "record not found") overflow the crate's u16 codes:
    // the status is what is left.
    api::failure_codes(e).0 == Some(404)
}

impl Provider for CloudflareProvider {
    fn kinds(&self) -> &[KindSpec] {
        KINDS
    }

    async fn prepare(&self, graph: &mut DesiredGraph) -> Result<(), ProviderError> {
        let mut wanted = BTreeMap::new();
        for r in graph
            .resources
            .values_mut()
            .filter(|r| r.kind == kinds::CLOUDFLARE_DNS_RECORD)
        {
            r.props
                .insert("comment".into(), Value::str(self.marker(&r.id)));
            if let Some(name) = r.props.get("name").and_then(Value::as_str) {
                wanted.insert(
                    r.id.clone(),
                    name.trim_end_matches('.').to_ascii_lowercase(),
                );
            }
        }
        for id in &self.adopt {
            if graph
                .resources
                .get(id)
                .is_none_or(|r| r.kind != kinds::CLOUDFLARE_DNS_RECORD)
            {
                return Err(ProviderError::hard(
                    "plan",
                    format!("--adopt {id}: the stage declares no DNS record with that id"),
                )
                .with_hint("`boxctl graph --stage <stage>` lists the dns/* records"));
            }
        }
        self.seen.lock().expect("not poisoned").wanted = wanted;
        Ok(())
    }

    async fn observe(&self) -> Result<Inventory, ProviderError> {
        let records = self.list(None).await?;
        let prefix = self.marker_prefix();
        let mut inv = Inventory::default();
        let mut foreign = Vec::new();
        for r in records {
            match r.comment.as_deref().and_then(|c| c.strip_prefix(&prefix)) {
                Some(id) if !id.is_empty() => {
                    let o = self.observed(ResourceId::new(id), &r);
                    inv.add(o);
                }
                _ => foreign.push(r),
            }
        }
        let mut seen = self.seen.lock().expect("not poisoned");
        // Names adopted deliberately are observed as the declared record.
        for (id, name) in &seen.wanted {
            if inv.resources.contains_key(id) || !self.adopt.contains(id) {
                continue;
            }
            if let Some(r) = foreign.iter().find(|r| r.name.eq_ignore_ascii_case(name)) {
                inv.add(self.observed(id.clone(), r));
            }
        }
        // Every other name held by a record boxctl does not own blocks a
        // create (the plan checks names known only from other resources too).
        let mut by_name: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        for r in &foreign {
            by_name
                .entry(r.name.to_ascii_lowercase())
                .or_default()
                .push(r);
        }
        for (name, holders) in by_name {
            inv.claims.push(Claim {
                kind: kinds::CLOUDFLARE_DNS_RECORD.to_string(),
                prop: "name".into(),
                value: name,
                holder: Self::describe_holders(&holders),
                hint: self.adopt_hint(),
                except: self.adopt.clone(),
            });
        }
        seen.foreign = foreign;
        Ok(inv)
    }

    async fn create(&self, _ctx: &StepCtx, d: &Resource) -> Result<Observed, ProviderError> {
        let body = self.body(d)?;
        // Names only known now (validation records) are checked against the
        // zone as observed; a record added since makes the create fail below.
        let holders: Vec<Record> = self
            .seen
            .lock()
            .expect("not poisoned")
            .foreign
            .iter()
            .filter(|r| r.name.eq_ignore_ascii_case(&body.name))
            .cloned()
            .collect();
        let existing = holders.first().filter(|_| self.adopt.contains(&d.id));
        let record = match existing {
            Some(r) => {
                self.client
                    .request(&api::OverwriteRecord {
                        zone: &self.zone_id,
                        id: &r.id,
                        body: &body,
                    })
                    .await
                    .map_err(|e| error("UpdateDnsRecord", &d.id.to_string(), &e))?
                    .result
            }
            None if !holders.is_empty() => {
                let refs: Vec<&Record> = holders.iter().collect();
                return Err(self.held(&d.id, &body.name, &refs));
            }
            None => match self
                .client
                .request(&api::CreateRecord {
                    zone: &self.zone_id,
                    body: &body,
                })
                .await
            {
                Ok(r) => r.result,
                Err(e) => {
                    // A record created meanwhile (81053/81057) is named as a conflict.
                    if api::failure_codes(&e).0 == Some(400) {
                        let holders = self.list(Some(&body.name)).await?;
                        if !holders.is_empty() {
                            let refs: Vec<&Record> = holders.iter().collect();
                            return Err(self.held(&d.id, &body.name, &refs));
                        }
                    }
                    return Err(error("CreateDnsRecord", &d.id.to_string(), &e));
                }
            },
        };
        let mut o = self.observed(d.id.clone(), &record);
        o.policy = d.policy.clone();
        Ok(o)
    }

    async fn update(
        &self,
        _ctx: &StepCtx,
        d: &Resource,
        current: &Observed,
        _changed: &[String],
    ) -> Result<Observed, ProviderError> {
        let body = self.body(d)?;
        let id = current.handle.as_deref().ok_or_else(|| {
            ProviderError::hard("UpdateDnsRecord", format!("{} has no record id", d.id))
        })?;
        let record = self
            .client
            .request(&api::OverwriteRecord {
                zone: &self.zone_id,
                id,
                body: &body,
            })
            .await
            .map_err(|e| error("UpdateDnsRecord", &d.id.to_string(), &e))?
            .result;
        let mut o = self.observed(d.id.clone(), &record);
        o.policy = d.policy.clone();
        Ok(o)
    }

    async fn delete(&self, _ctx: &StepCtx, current: &Observed) -> Result<(), ProviderError> {
        let Some(id) = current.handle.as_deref() else {
            return Ok(());
        };
        match self
            .client
            .request(&api::DeleteRecord {
                zone: &self.zone_id,
                id,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(error("DeleteDnsRecord", &current.id.to_string(), &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_are_checked_and_end_with_a_slash() {
        assert_eq!(api_url(None).unwrap(), DEFAULT_API_URL);
        assert_eq!(
            api_url(Some("http://127.0.0.1:9/client/v4")).unwrap(),
            "http://127.0.0.1:9/client/v4/"
        );
        for bad in ["not a url", "ftp://x/", "http://"] {
            assert!(api_url(Some(bad)).is_err(), "{bad} accepted");
        }
    }
}
