//! The Cloudflare v4 DNS record endpoints boxctl uses, on the `cloudflare`
//! crate's client. The crate's own record types have no `comment` and fail a
//! whole page on record types they do not know (CAA…), so records are
//! decoded here, tolerantly; zones and token checks use the crate's endpoints.

use cloudflare::framework::endpoint::spec::EndpointSpec;
use cloudflare::framework::endpoint::{Method, RequestBody};
use cloudflare::framework::response::{ApiFailure, ApiResult, ApiSuccess};
use serde::{Deserialize, Serialize};

/// A DNS record as the API returns it; fields boxctl does not manage are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Record {
    /// Record id.
    pub id: String,
    /// Fully qualified name, lowercase.
    pub name: String,
    /// Record type (`CNAME`, `A`, `CAA`…).
    #[serde(rename = "type")]
    pub kind: String,
    /// Content (absent for structured types such as CAA).
    #[serde(default)]
    pub content: Option<String>,
    /// Proxied through Cloudflare.
    #[serde(default)]
    pub proxied: Option<bool>,
    /// TTL in seconds; 1 is automatic.
    #[serde(default)]
    pub ttl: Option<u32>,
    /// Free-text comment; boxctl's ownership marker lives here.
    #[serde(default)]
    pub comment: Option<String>,
}

impl ApiResult for Record {}

/// One page of records.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Records(pub Vec<Record>);

impl ApiResult for Records {}

/// What a delete returns.
#[derive(Debug, Deserialize)]
pub struct Deleted {
    /// Id of the deleted record.
    pub id: String,
}

impl ApiResult for Deleted {}

/// The body of a create or full update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordBody {
    /// Fully qualified name.
    pub name: String,
    /// Record type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Content.
    pub content: String,
    /// Proxied.
    pub proxied: bool,
    /// TTL (1 = automatic).
    pub ttl: u32,
    /// Comment (ownership marker).
    pub comment: String,
}

/// `GET zones/{zone}/dns_records`, one page, optionally only one name.
#[derive(Debug)]
pub struct ListRecords<'a> {
    /// Zone id.
    pub zone: &'a str,
    /// Page (from 1).
    pub page: u32,
    /// Records per page.
    pub per_page: u32,
    /// Only records with this exact name.
    pub name: Option<&'a str>,
}

impl EndpointSpec for ListRecords<'_> {
    type JsonResponse = Records;
    type ResponseType = ApiSuccess<Records>;

    fn method(&self) -> Method {
        Method::GET
    }
    fn path(&self) -> String {
        format!("zones/{}/dns_records", self.zone)
    }
    fn query(&self) -> Option<String> {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("page", &self.page.to_string());
        q.append_pair("per_page", &self.per_page.to_string());
        if let Some(n) = self.name {
            q.append_pair("name", n);
        }
        Some(q.finish())
    }
}

/// `POST zones/{zone}/dns_records`.
#[derive(Debug)]
pub struct CreateRecord<'a> {
    /// Zone id.
    pub zone: &'a str,
    /// The record.
    pub body: &'a RecordBody,
}

impl EndpointSpec for CreateRecord<'_> {
    type JsonResponse = Record;
    type ResponseType = ApiSuccess<Record>;

    fn method(&self) -> Method {
        Method::POST
    }
    fn path(&self) -> String {
        format!("zones/{}/dns_records", self.zone)
    }
    fn body(&self) -> Option<RequestBody<'_>> {
        Some(RequestBody::Json(
            serde_json::to_string(self.body).expect("a record body serializes"),
        ))
    }
}

/// `PUT zones/{zone}/dns_records/{id}`: overwrite every field.
#[derive(Debug)]
pub struct OverwriteRecord<'a> {
    /// Zone id.
    pub zone: &'a str,
    /// Record id.
    pub id: &'a str,
    /// The record.
    pub body: &'a RecordBody,
}

impl EndpointSpec for OverwriteRecord<'_> {
    type JsonResponse = Record;
    type ResponseType = ApiSuccess<Record>;

    fn method(&self) -> Method {
        Method::PUT
    }
    fn path(&self) -> String {
        format!("zones/{}/dns_records/{}", self.zone, self.id)
    }
    fn body(&self) -> Option<RequestBody<'_>> {
        Some(RequestBody::Json(
            serde_json::to_string(self.body).expect("a record body serializes"),
        ))
    }
}

/// `DELETE zones/{zone}/dns_records/{id}`.
#[derive(Debug)]
pub struct DeleteRecord<'a> {
    /// Zone id.
    pub zone: &'a str,
    /// Record id.
    pub id: &'a str,
}

impl EndpointSpec for DeleteRecord<'_> {
    type JsonResponse = Deleted;
    type ResponseType = ApiSuccess<Deleted>;

    fn method(&self) -> Method {
        Method::DELETE
    }
    fn path(&self) -> String {
        format!("zones/{}/dns_records/{}", self.zone, self.id)
    }
}

/// HTTP status and Cloudflare error codes of a failed call.
pub fn failure_codes(e: &ApiFailure) -> (Option<u16>, Vec<u16>) {
    match e {
        ApiFailure::Error(status, errors) => (
            Some(status.as_u16()),
            errors.errors.iter().map(|e| e.code).collect(),
        ),
        ApiFailure::Invalid(_) => (None, Vec::new()),
    }
}

/// A failed call in one line: status, codes and messages (never headers).
pub fn describe_failure(e: &ApiFailure) -> String {
    match e {
        ApiFailure::Error(status, errors) => {
            let detail: Vec<String> = errors
                .errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.message))
                .collect();
            if detail.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {}", detail.join("; "))
            }
        }
        ApiFailure::Invalid(e) => format!("invalid answer or no connection: {e}"),
    }
}
