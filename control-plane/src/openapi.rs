//! The OpenAPI 3.1 document, generated from the code: paths from the route
//! table the router is built from (so every route is documented and nothing
//! else), schemas from [`ApiSchema`] implementations of the wire types.
//!
//! The schema implementations are written with macros that destructure each
//! type without `..` and match each enum without a wildcard, so adding,
//! removing or retyping a field or variant in `protocol` fails to compile
//! until its schema says the same; the unit tests check each schema against
//! serde's real output.

use std::collections::BTreeMap;

use protocol::*;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::{Access, Route};

/// Collects named schemas (`#/components/schemas/...`).
#[derive(Debug, Default)]
pub struct Registry {
    schemas: BTreeMap<String, Value>,
}

impl Registry {
    /// Register `name` (built by `build` the first time) and return a `$ref` to it.
    pub fn named(&mut self, name: &str, build: impl FnOnce(&mut Registry) -> Value) -> Value {
        if !self.schemas.contains_key(name) {
            self.schemas.insert(name.to_string(), Value::Null); // stops recursion
            let s = build(self);
            self.schemas.insert(name.to_string(), s);
        }
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    /// The named schemas collected so far.
    pub fn schemas(&self) -> &BTreeMap<String, Value> {
        &self.schemas
    }
}

/// A type with a JSON schema.
pub trait ApiSchema {
    /// Its schema, or a `$ref` to it after registering it.
    fn schema(reg: &mut Registry) -> Value;
}

/// Schema of `T` as a function pointer (for route tables).
pub type SchemaFn = fn(&mut Registry) -> Value;

/// `T::schema` as a [`SchemaFn`].
pub fn schema_of<T: ApiSchema>() -> SchemaFn {
    T::schema
}

impl ApiSchema for String {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "string" })
    }
}
impl ApiSchema for Ipv4Cidr {
    fn schema(_: &mut Registry) -> Value {
        json!({
            "type": "string",
            "description": "An IPv4 network `a.b.c.d/n` without host bits (a bare address is a /32).",
            "pattern": "^[0-9]{1,3}(\\.[0-9]{1,3}){3}(/[0-9]{1,2})?$",
        })
    }
}
impl ApiSchema for bool {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "boolean" })
    }
}
impl ApiSchema for u64 {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "integer", "format": "uint64", "minimum": 0 })
    }
}
impl ApiSchema for u32 {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "integer", "format": "uint32", "minimum": 0 })
    }
}
impl ApiSchema for u16 {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "integer", "format": "uint16", "minimum": 0, "maximum": 65535 })
    }
}
impl ApiSchema for i32 {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "integer", "format": "int32" })
    }
}
impl ApiSchema for Uuid {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "string", "format": "uuid" })
    }
}
impl ApiSchema for OffsetDateTime {
    fn schema(_: &mut Registry) -> Value {
        json!({ "type": "string", "format": "date-time" })
    }
}
impl<T: ApiSchema> ApiSchema for Option<T> {
    fn schema(reg: &mut Registry) -> Value {
        json!({ "anyOf": [T::schema(reg), { "type": "null" }] })
    }
}
impl<T: ApiSchema> ApiSchema for Vec<T> {
    fn schema(reg: &mut Registry) -> Value {
        json!({ "type": "array", "items": T::schema(reg) })
    }
}
impl<T: ApiSchema> ApiSchema for BTreeMap<String, T> {
    fn schema(reg: &mut Registry) -> Value {
        json!({ "type": "object", "additionalProperties": T::schema(reg) })
    }
}

/// Attach a description to a schema (beside a `$ref` too: allowed in 3.1).
fn described(mut s: Value, description: &str) -> Value {
    if let Value::Object(m) = &mut s {
        m.insert("description".into(), Value::String(description.into()));
    }
    s
}

/// Wire spellings of a string enum's variants (checked against serde in tests).
pub trait WireEnum: Sized {
    /// Every variant with its JSON spelling.
    fn wire_variants() -> Vec<(Self, &'static str)>;
}

/// One field of an object schema: name, required, schema, description.
type FieldSpec = (&'static str, bool, Value, &'static str);

fn object(description: &str, fields: Vec<FieldSpec>) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for (name, req, schema, desc) in fields {
        props.insert(name.into(), described(schema, desc));
        if req {
            required.push(Value::String(name.into()));
        }
    }
    let mut o = json!({ "type": "object", "description": description, "properties": props });
    if !required.is_empty() {
        o["required"] = Value::Array(required);
    }
    o
}

macro_rules! is_req {
    (req) => {
        true
    };
    (opt) => {
        false
    };
}

/// Schema for a struct: `req`/`opt` says whether the field is always present
/// (and needed on input).
macro_rules! api_object {
    ($ty:ident as $name:literal, $desc:literal {
        $( $req:ident $field:ident : $fty:ty => $fdesc:literal ),* $(,)?
    }) => {
        impl ApiSchema for $ty {
            fn schema(reg: &mut Registry) -> Value {
                #[allow(dead_code, unused_variables)]
                fn exhaustive(v: $ty) {
                    let $ty { $( $field ),* } = v;
                    $( let _: $fty = $field; )*
                }
                reg.named($name, |reg| {
                    object($desc, vec![
                        $( (stringify!($field), is_req!($req), <$fty as ApiSchema>::schema(reg), $fdesc) ),*
                    ])
                })
            }
        }
    };
}

/// Schema for a unit-only enum serialized as strings.
macro_rules! api_enum {
    ($ty:ident as $name:literal, $desc:literal { $( $variant:ident = $s:literal => $vdesc:literal ),* $(,)? }) => {
        impl ApiSchema for $ty {
            fn schema(reg: &mut Registry) -> Value {
                reg.named($name, |_| {
                    let doc: Vec<String> = vec![$( format!("`{}`: {}", $s, $vdesc) ),*];
                    json!({
                        "type": "string",
                        "description": format!("{} {}", $desc, doc.join("; ")),
                        "enum": [ $( $s ),* ],
                    })
                })
            }
        }
        impl WireEnum for $ty {
            fn wire_variants() -> Vec<(Self, &'static str)> {
                #[allow(dead_code)]
                fn exhaustive(v: $ty) -> &'static str {
                    match v { $( $ty::$variant => $s ),* }
                }
                vec![ $( ($ty::$variant, $s) ),* ]
            }
        }
    };
}

/// Schema for an internally tagged enum (`#[serde(tag = ...)]`).
macro_rules! api_tagged {
    ($ty:ident as $name:literal, tag $tag:literal, $desc:literal {
        $( $variant:ident = $vname:literal => $vdesc:literal {
            $( $req:ident $field:ident : $fty:ty => $fdesc:literal ),* $(,)?
        } ),* $(,)?
    }) => {
        impl ApiSchema for $ty {
            fn schema(reg: &mut Registry) -> Value {
                #[allow(dead_code, unused_variables)]
                fn exhaustive(v: $ty) {
                    match v {
                        $( $ty::$variant { $( $field ),* } => { $( let _: $fty = $field; )* } )*
                    }
                }
                reg.named($name, |reg| {
                    let variants = vec![ $( {
                        #[allow(unused_mut)]
                        let mut fields: Vec<FieldSpec> = vec![
                            ($tag, true, json!({ "type": "string", "const": $vname }), "Variant tag.")
                        ];
                        $( fields.push((stringify!($field), is_req!($req), <$fty as ApiSchema>::schema(reg), $fdesc)); )*
                        object($vdesc, fields)
                    } ),* ];
                    json!({
                        "description": $desc,
                        "oneOf": variants,
                        "discriminator": { "propertyName": $tag },
                    })
                })
            }
        }
    };
}

api_object!(ApiError as "ApiError", "Error body of every failed request." {
    req code: String => "Stable snake_case code (`unauthorized`, `not_found`, `no_capacity`, ...).",
    req message: String => "Human-readable explanation; never holds secrets.",
});

api_enum!(HealthStatus as "HealthStatus", "Overall health." {
    Ok = "ok" => "serving normally",
    Degraded = "degraded" => "serving, but a dependency (the database) is unreachable",
});

api_object!(ControlPlaneHealth as "ControlPlaneHealth", "Answer of GET /api/health." {
    req status: HealthStatus => "Overall status.",
    req version: String => "Control plane version.",
    req uptime_secs: u64 => "Seconds since start.",
    req database: bool => "Whether the database answered.",
});

api_enum!(NetworkMode as "NetworkMode", "How a box reaches the network; every box has a network namespace of its own, and nothing of the host is reachable from it." {
    None = "none" => "loopback only",
    Egress = "egress" => "outbound IPv4 through the runner's NAT, minus its deny list (host, link-local, private ranges, other boxes), plus the box's `egress_allow`",
});

api_enum!(BoxState as "BoxState", "Lifecycle state of a box." {
    Pending = "pending" => "placed on a runner, not yet created there",
    Stopped = "stopped" => "its root filesystem exists; not running",
    Running = "running" => "running",
    Migrating = "migrating" => "being moved to another runner",
    Deleting = "deleting" => "removal asked for; the runner has not confirmed yet",
    Deleted = "deleted" => "gone",
    Error = "error" => "the runner could not create or start it; see `error`",
});

api_object!(Resources as "Resources", "Resources a box may use, or a runner has." {
    req cpu_millicores: u64 => "CPU, thousandths of a core.",
    req memory_mib: u64 => "Memory, MiB.",
    req disk_mib: u64 => "Disk, MiB.",
});

api_object!(BoxSpec as "BoxSpec", "Everything a runner needs to create a box." {
    req id: Uuid => "Box id; stays the same across migration.",
    req image: String => "Image name in the runner's image store (`default` is always present).",
    req resources: Resources => "Limits.",
    opt env: BTreeMap<String, String> => "Environment of every process in the box.",
    opt network: NetworkMode => "Network mode (`none` by default: only a loopback interface).",
    opt egress_allow: Vec<Ipv4Cidr> => "Private destinations an `egress` box may reach, within the stage's allow-list.",
});

api_object!(CreateBoxRequest as "CreateBoxRequest", "Body of POST /api/boxes." {
    opt image: Option<String> => "Image; `default` when absent.",
    opt cpu_millicores: Option<u64> => "CPU, millicores (50-256000); 1000 when absent.",
    opt memory_mib: Option<u64> => "Memory, MiB (32-4194304); 1024 when absent.",
    opt disk_mib: Option<u64> => "Disk, MiB (64-67108864); 4096 when absent.",
    opt env: BTreeMap<String, String> => "Environment (names [A-Za-z_][A-Za-z0-9_]*).",
    opt labels: BTreeMap<String, String> => "Labels for filtering (keys: 1-63 of letters, digits, . _ - /).",
    opt network: NetworkMode => "Network mode; the booleans `true`/`false` are read as `egress`/`none`.",
    opt egress_allow: Vec<Ipv4Cidr> => "Private destinations (IPv4 CIDR blocks) an `egress` box may reach although the deny list covers them; each within the stage's allow-list (at most 64).",
});

api_object!(BoxInfo as "BoxInfo", "A box." {
    req id: Uuid => "Box id.",
    req organization_id: Uuid => "Owning organization.",
    req runner: Option<String> => "Runner it is pinned to.",
    req image: String => "Image.",
    req state: BoxState => "Current state as last reported.",
    req desired_state: BoxState => "State the control plane is driving it to (running, stopped or deleted).",
    req resources: Resources => "Limits.",
    req labels: BTreeMap<String, String> => "Labels.",
    req network: NetworkMode => "Network mode.",
    opt egress_allow: Vec<Ipv4Cidr> => "Private destinations the box may reach (egress).",
    opt error: Option<String> => "Last error reported by the runner.",
    req created_at: OffsetDateTime => "Creation time.",
    req updated_at: OffsetDateTime => "Last change.",
});

api_object!(BoxPage as "BoxPage", "One page of a box listing." {
    req boxes: Vec<BoxInfo> => "Boxes on this page, oldest first.",
    opt next_cursor: Option<String> => "Pass as `cursor` to get the next page; absent on the last page.",
});

api_object!(MoveBoxRequest as "MoveBoxRequest", "Body of POST /api/admin/boxes/{id}/move." {
    req runner: String => "Name of the target runner (ready, not draining, with room).",
});

api_object!(ExecRequest as "ExecRequest", "Body of POST /api/boxes/{id}/exec." {
    req command: Vec<String> => "Program and arguments (not through a shell).",
    opt env: BTreeMap<String, String> => "Extra environment.",
    opt cwd: Option<String> => "Working directory inside the box; `$HOME` when absent.",
    opt timeout_secs: Option<u64> => "Kill the process after this many seconds (1-86400; 3600 when absent).",
    opt stdin: Option<String> => "Bytes fed to stdin, then EOF.",
    opt max_output_bytes: Option<u64> => "Keep at most this many bytes of each of stdout and stderr (at least 1); the control plane's limit (1 MiB by default) applies when absent or larger.",
});

api_enum!(OutputEncoding as "OutputEncoding", "How an output stream's bytes are carried in its JSON string." {
    Utf8 = "utf8" => "the string is the bytes (they are UTF-8); the default when the field is absent",
    Base64 = "base64" => "the string is the standard, padded base64 of the bytes (output that is not UTF-8, or that JSON escaping would make more than 1 KiB longer than base64)",
});

api_object!(ExecResponse as "ExecResponse", "Answer of POST /api/boxes/{id}/exec. Each stream holds exactly the first bytes the process wrote, up to the limit; the process's further output was read and dropped." {
    req exit_code: i32 => "Exit code; 128 + signal number when killed by a signal.",
    req stdout: String => "Standard output, encoded as `stdout_encoding` says.",
    opt stdout_encoding: OutputEncoding => "How `stdout` is encoded.",
    opt stdout_truncated: bool => "True when the process wrote more to stdout than was kept.",
    req stderr: String => "Standard error, encoded as `stderr_encoding` says.",
    opt stderr_encoding: OutputEncoding => "How `stderr` is encoded.",
    opt stderr_truncated: bool => "True when the process wrote more to stderr than was kept.",
    opt timed_out: bool => "True when the timeout killed it.",
});

api_object!(ExecStart as "ExecStart", "First client message (text frame) of an interactive session on GET /api/boxes/{id}/exec/ws." {
    opt command: Vec<String> => "Program and arguments; the box's login shell when empty.",
    opt env: BTreeMap<String, String> => "Extra environment.",
    opt cwd: Option<String> => "Working directory; `$HOME` when absent.",
    opt tty: bool => "Allocate a pseudo-terminal.",
    opt rows: Option<u16> => "Terminal rows (with `tty`).",
    opt cols: Option<u16> => "Terminal columns (with `tty`).",
    opt attach: Option<String> => "Re-attach to a running session by id instead of starting a process.",
});

api_tagged!(ExecControl as "ExecControl", tag "type", "Client control messages (text frames) after the start; stdin goes in binary frames." {
    Resize = "resize" => "The terminal changed size." {
        req rows: u16 => "Rows.",
        req cols: u16 => "Columns.",
    },
    Signal = "signal" => "Deliver a signal." {
        req signal: String => "Signal name without SIG: INT, TERM, KILL, HUP, QUIT, USR1, USR2.",
    },
    StdinEof = "stdin_eof" => "No more stdin." {},
});

api_tagged!(ExecEvent as "ExecEvent", tag "type", "Server messages (text frames); output comes in binary frames whose first byte is the stream (1 stdout, 2 stderr)." {
    Started = "started" => "The process started." {
        req session: String => "Session id, for `attach`.",
    },
    Exit = "exit" => "The process ended." {
        req code: i32 => "Exit code; 128 + signal when killed.",
    },
    Error = "error" => "The session failed." {
        req message: String => "What went wrong.",
    },
});

api_enum!(RunnerState as "RunnerState", "Lifecycle state of a runner." {
    Initializing = "initializing" => "registered, no healthcheck yet",
    Ready = "ready" => "checking in and schedulable",
    Draining = "draining" => "checking in; gets no new boxes",
    Unresponsive = "unresponsive" => "no healthcheck within the configured window",
    Decommissioned = "decommissioned" => "retired; its token no longer works",
});

api_object!(RegisterRunnerRequest as "RegisterRunnerRequest", "Body of POST /api/admin/runners." {
    req name: String => "Unique runner name (1-63 of letters, digits, - _ .).",
    opt token_sha256: Option<String> => "SHA-256 (hex) of a token minted by the caller; when absent the control plane mints one and returns it once.",
});

api_object!(RunnerInfo as "RunnerInfo", "A runner." {
    req id: Uuid => "Runner id.",
    req name: String => "Unique name.",
    req state: RunnerState => "State.",
    opt version: Option<String> => "Reported version.",
    opt address: Option<String> => "Reported address.",
    opt binary_sha256: Option<String> => "Reported SHA-256 (hex) of its boxlite-runner binary.",
    req capacity: Resources => "Reported capacity.",
    req usage: Resources => "Reported usage.",
    req allocated: Resources => "Sum of the limits of the boxes pinned to it (what placement counts).",
    req draining: bool => "Marked draining by an operator.",
    req boxes: u32 => "Boxes pinned to it (not deleted).",
    opt last_seen_at: Option<OffsetDateTime> => "Last healthcheck.",
});

api_object!(RegisterRunnerResponse as "RegisterRunnerResponse", "Answer of POST /api/admin/runners." {
    req runner: RunnerInfo => "The runner.",
    opt token: Option<String> => "The minted token (`bxr_...`), shown this once; absent when the caller sent its hash.",
});

api_object!(BoxReport as "BoxReport", "One box as a runner reports it." {
    req id: Uuid => "Box id.",
    req state: BoxState => "Its state on the runner.",
    opt usage: Resources => "What it uses now, from its cgroup.",
    opt error: Option<String> => "Last error, if it failed.",
});

api_object!(HealthcheckRequest as "HealthcheckRequest", "Body of POST /api/runners/healthcheck." {
    req version: String => "boxlite-runner version.",
    req address: String => "Base URL where the control plane reaches this runner's API.",
    req capacity: Resources => "What the runner can give to boxes in total.",
    req usage: Resources => "What its boxes use now.",
    opt binary_sha256: Option<String> => "SHA-256 (hex) of the running boxlite-runner binary.",
    opt agent_instance: Option<String> => "Random id (1-64 of [A-Za-z0-9_-]) of the agent process, new at every start and re-exec; when it changes, the answer carries a new api_key and the previous key stops working.",
    req boxes: Vec<BoxReport> => "Every box the runner has, whatever its state.",
});

api_tagged!(RunnerAction as "RunnerAction", tag "action", "What the control plane wants a runner to do with one box." {
    Create = "create" => "Create (and start) a box the runner does not have." {
        req spec: BoxSpec => "The box.",
    },
    Start = "start" => "Start a stopped box." {
        req id: Uuid => "Box id.",
    },
    Stop = "stop" => "Stop a running box." {
        req id: Uuid => "Box id.",
    },
    Delete = "delete" => "Delete a box and its files." {
        req id: Uuid => "Box id.",
    },
});

api_object!(HealthcheckResponse as "HealthcheckResponse", "Answer of POST /api/runners/healthcheck: level-triggered, the same until the runner complies." {
    req state: RunnerState => "The runner's state as the control plane sees it.",
    req actions: Vec<RunnerAction> => "Actions to apply now.",
    req api_key: String => "Bearer key (`bxc_...`) the control plane presents when it calls this runner's API; replaced when a new agent process checks in (another agent_instance).",
    req interval_secs: u64 => "Seconds until the next healthcheck is expected.",
    opt imports: Vec<ImportGrant> => "Imports announced to this runner and not yet expired or withdrawn; an import request must present the matching one-time token.",
});

api_object!(ImportGrant as "ImportGrant", "An import of a box archive announced to a runner: the import request presents the token in x-boxlite-import-token, accepted once, for this box, until expires_at." {
    req box_id: Uuid => "The box the archive must hold.",
    req token_sha256: String => "SHA-256 (hex) of the one-time token.",
    req expires_at: OffsetDateTime => "When the token stops being accepted.",
});

api_object!(OrganizationInfo as "OrganizationInfo", "An organization." {
    req id: Uuid => "Organization id.",
    req name: String => "Unique name.",
    req admin: bool => "The operators' organization: its members may call the admin API.",
    req created_at: OffsetDateTime => "Creation time.",
});

api_object!(CreateOrganizationRequest as "CreateOrganizationRequest", "Body of POST /api/admin/organizations." {
    req name: String => "Unique name: 1-63 lowercase letters, digits and '-'.",
});

api_object!(ApiKeyInfo as "ApiKeyInfo", "An API key as listings show it (never the key itself)." {
    req id: Uuid => "Key id.",
    req organization_id: Uuid => "Owning organization.",
    req name: String => "Name given at creation.",
    req prefix: String => "The first characters of the key, to recognise it.",
    req created_at: OffsetDateTime => "Creation time.",
    opt revoked_at: Option<OffsetDateTime> => "When it was revoked.",
});

api_object!(CreateApiKeyResponse as "CreateApiKeyResponse", "A new API key, shown this once." {
    req info: ApiKeyInfo => "What listings show about it.",
    req key: String => "The key (`bxk_...`); only its SHA-256 is stored.",
});

api_object!(CreateOrganizationResponse as "CreateOrganizationResponse", "Answer of POST /api/admin/organizations." {
    req organization: OrganizationInfo => "The new organization.",
    req api_key: CreateApiKeyResponse => "Its first API key, shown this once.",
});

api_object!(CreateApiKeyRequest as "CreateApiKeyRequest", "Body of POST /api/keys." {
    req name: String => "A name to tell keys apart (1-100 characters).",
});

api_object!(UserInfo as "UserInfo", "A user: an OIDC subject who belongs to an organization." {
    req id: Uuid => "User id.",
    req organization_id: Uuid => "Organization.",
    req subject: String => "OIDC `sub` claim of the configured issuer.",
    opt email: Option<String> => "E-mail, informational.",
    req created_at: OffsetDateTime => "Creation time.",
});

api_object!(CreateUserRequest as "CreateUserRequest", "Body of POST /api/admin/organizations/{id}/users." {
    req subject: String => "OIDC `sub` claim (1-255 characters).",
    opt email: Option<String> => "E-mail, informational.",
});

api_enum!(AuthMethod as "AuthMethod", "How a caller authenticated." {
    ApiKey = "api_key" => "an API key",
    Oidc = "oidc" => "an OIDC access token",
});

api_object!(WhoAmI as "WhoAmI", "Answer of GET /api/me." {
    req organization_id: Uuid => "Organization acted for.",
    req organization_name: String => "Its name.",
    req admin: bool => "Whether the caller may use the admin API.",
    req auth: AuthMethod => "How the caller authenticated.",
    opt user_id: Option<Uuid> => "The user, for OIDC callers.",
    opt api_key_id: Option<Uuid> => "The key, for API-key callers.",
});

/// Build the OpenAPI document for `routes`.
pub fn document(routes: &[Route]) -> Value {
    let mut reg = Registry::default();
    let error_ref = ApiError::schema(&mut reg);
    // Documented for the WebSocket protocol, referenced from the exec/ws operation.
    for f in [ExecStart::schema, ExecControl::schema, ExecEvent::schema] {
        f(&mut reg);
    }
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for r in routes {
        let d = &r.doc;
        let mut op = Map::new();
        op.insert("operationId".into(), json!(d.operation_id));
        op.insert("summary".into(), json!(d.summary));
        if !d.description.is_empty() {
            op.insert("description".into(), json!(d.description));
        }
        op.insert("tags".into(), json!([d.tag]));
        op.insert("x-boxlite-access".into(), json!(r.access.as_str()));
        op.insert(
            "security".into(),
            match r.access {
                Access::Public => json!([]),
                Access::Member | Access::Admin => json!([{ "user": [] }]),
                Access::Runner => json!([{ "runner": [] }]),
            },
        );
        let params: Vec<Value> = d
            .params
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "in": if p.in_path { "path" } else { "query" },
                    "required": p.in_path || p.required,
                    "description": p.description,
                    "schema": (p.schema)(&mut reg),
                })
            })
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(body) = d.request {
            op.insert(
                "requestBody".into(),
                json!({ "required": true, "content": { "application/json": { "schema": body(&mut reg) } } }),
            );
        }
        let mut responses = Map::new();
        for resp in &d.responses {
            let mut o = json!({ "description": resp.description });
            if let Some(s) = resp.schema {
                o["content"] = json!({ "application/json": { "schema": s(&mut reg) } });
            }
            responses.insert(resp.status.to_string(), o);
        }
        let mut errors: Vec<(u16, &str)> = Vec::new();
        if d.request.is_some() || !d.params.is_empty() {
            errors.push((400, "Malformed request (`invalid_json`, `invalid_path`, `invalid_query`, or a field-specific code)."));
        }
        if d.request.is_some() {
            errors.push((413, "Body too large (`payload_too_large`)."));
        }
        match r.access {
            Access::Public => {}
            Access::Member => {
                errors.push((401, "No credentials, or an unknown, revoked or invalid key or token (`unauthorized`)."));
                errors.push((
                    403,
                    "A runner token, or an OIDC user in no organization (`forbidden`).",
                ));
            }
            Access::Admin => {
                errors.push((401, "No credentials, or an unknown, revoked or invalid key or token (`unauthorized`)."));
                errors.push((
                    403,
                    "Not a member of the admin organization, or a runner token (`forbidden`).",
                ));
            }
            Access::Runner => {
                errors.push((401, "No credentials, or an unknown or decommissioned runner token (`unauthorized`)."));
                errors.push((403, "A user key or token (`forbidden`)."));
            }
        }
        if d.params.iter().any(|p| p.in_path) {
            errors.push((
                404,
                "Not found, or not visible to the caller's organization (`not_found`).",
            ));
        }
        for (status, desc) in errors {
            responses
                .entry(status.to_string())
                .or_insert_with(|| json!({ "description": desc }));
        }
        for (status, o) in responses.iter_mut() {
            if status.starts_with('4') || status.starts_with('5') {
                o["content"] = json!({ "application/json": { "schema": error_ref.clone() } });
            }
        }
        op.insert("responses".into(), Value::Object(responses));
        let key = r.method.as_str().to_ascii_lowercase();
        let prev = paths
            .entry(r.path.to_string())
            .or_default()
            .insert(key, Value::Object(op));
        assert!(prev.is_none(), "route {} {} listed twice", r.method, r.path);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "BoxLite control plane API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Organizations, API keys and OIDC users; runners and their healthcheck loop; \
                boxes, their placement and exec. Every error is JSON `{code, message}`. \
                Authenticate with `Authorization: Bearer` and an API key (`bxk_...`), an OIDC access token, \
                or (runner endpoints only) a runner token (`bxr_...`).",
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
        },
        "tags": [
            { "name": "system", "description": "Health, this document, the caller." },
            { "name": "boxes", "description": "Boxes of the caller's organization." },
            { "name": "keys", "description": "API keys of the caller's organization." },
            { "name": "runners", "description": "The runner's own endpoints (runner token)." },
            { "name": "admin", "description": "Operators: organizations, users, runners, box placement." },
        ],
        "paths": paths,
        "components": {
            "schemas": reg.schemas(),
            "securitySchemes": {
                "user": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`bxk_...`) or an OIDC access token of the configured issuer. \
                        Admin endpoints need a member of the admin organization.",
                },
                "runner": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A runner token (`bxr_...`), registered by its SHA-256.",
                },
            },
        },
    })
}

#[cfg(test)]
mod tests;
