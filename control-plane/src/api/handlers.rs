//! Request handlers and the route table.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use protocol::*;
use serde::Deserialize;
use uuid::Uuid;

use super::extract::{Json, Path, Query};
use super::{Access, MAX_HEALTHCHECK_BYTES, Route};
use crate::auth::{Admin, Caller, RunnerCaller};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::{boxes, exec_proxy, migrate, orgs, runners};

async fn health(State(s): State<AppState>) -> Response {
    let db = s.db.ping().await;
    let body = ControlPlaneHealth {
        status: if db {
            HealthStatus::Ok
        } else {
            HealthStatus::Degraded
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: s.started.elapsed().as_secs(),
        database: db,
    };
    let status = if db {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn openapi(State(s): State<AppState>) -> Response {
    ([(CONTENT_TYPE, "application/json")], s.openapi.clone()).into_response()
}

async fn whoami(Caller(m): Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        organization_id: m.organization_id,
        organization_name: m.organization_name,
        admin: m.admin,
        auth: m.method,
        user_id: m.user_id,
        api_key_id: m.api_key_id,
    })
}

async fn create_box(
    State(s): State<AppState>,
    Caller(m): Caller,
    Json(req): Json<CreateBoxRequest>,
) -> Result<(StatusCode, Json<BoxInfo>)> {
    let info = boxes::create(&s, m.organization_id, &req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list_boxes(
    State(s): State<AppState>,
    Caller(m): Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<BoxPage>> {
    let filter = boxes::parse_list_query(q.as_deref())?;
    Ok(Json(boxes::list(&s, m.organization_id, &filter).await?))
}

async fn get_box(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<BoxInfo>> {
    Ok(Json(boxes::get(&s, m.organization_id, id).await?))
}

async fn start_box(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<BoxInfo>> {
    Ok(Json(
        boxes::set_desired(&s, m.organization_id, id, BoxState::Running).await?,
    ))
}

async fn stop_box(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<BoxInfo>> {
    Ok(Json(
        boxes::set_desired(&s, m.organization_id, id, BoxState::Stopped).await?,
    ))
}

async fn delete_box(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<BoxInfo>> {
    Ok(Json(boxes::delete(&s, m.organization_id, id).await?))
}

async fn exec_box(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
    Json(req): Json<ExecRequest>,
) -> Result<Json<ExecResponse>> {
    Ok(Json(exec_proxy::run(&s, &m, id, &req).await?))
}

async fn exec_ws(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let ep = exec_proxy::resolve(&s, m.organization_id, id).await?;
    let ws = ws.map_err(|r| Error::bad_request("websocket_required", r.body_text()))?;
    let runner = exec_proxy::connect_ws(&s, &ep, id).await?;
    let shutdown = s.shutdown.clone();
    Ok(ws
        .max_message_size(MAX_WS_MESSAGE_BYTES)
        .max_frame_size(MAX_WS_MESSAGE_BYTES)
        .on_upgrade(move |socket| exec_proxy::relay(socket, runner, shutdown, id)))
}

async fn list_keys(State(s): State<AppState>, Caller(m): Caller) -> Result<Json<Vec<ApiKeyInfo>>> {
    Ok(Json(orgs::list_keys(&s.db, m.organization_id).await?))
}

async fn create_key(
    State(s): State<AppState>,
    Caller(m): Caller,
    Json(req): Json<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<CreateApiKeyResponse>)> {
    let created = orgs::create_key(&s.db, &s.clock, m.organization_id, &req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn revoke_key(
    State(s): State<AppState>,
    Caller(m): Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<ApiKeyInfo>> {
    Ok(Json(
        orgs::revoke_key(&s.db, &s.clock, m.organization_id, id).await?,
    ))
}

async fn healthcheck(
    State(s): State<AppState>,
    RunnerCaller(r): RunnerCaller,
    Json(req): Json<HealthcheckRequest>,
) -> Result<Json<HealthcheckResponse>> {
    Ok(Json(runners::healthcheck(&s, &r, &req).await?))
}

async fn list_orgs(State(s): State<AppState>, _: Admin) -> Result<Json<Vec<OrganizationInfo>>> {
    Ok(Json(orgs::list_orgs(&s.db).await?))
}

async fn create_org(
    State(s): State<AppState>,
    _: Admin,
    Json(req): Json<CreateOrganizationRequest>,
) -> Result<(StatusCode, Json<CreateOrganizationResponse>)> {
    Ok((
        StatusCode::CREATED,
        Json(orgs::create_org(&s.db, &s.clock, &req).await?),
    ))
}

async fn list_users(
    State(s): State<AppState>,
    _: Admin,
    Path(id): Path<Uuid>,
) -> Result<Json<Vec<UserInfo>>> {
    Ok(Json(orgs::list_users(&s.db, id).await?))
}

async fn create_user(
    State(s): State<AppState>,
    _: Admin,
    Path(id): Path<Uuid>,
    Json(req): Json<CreateUserRequest>,
) -> Result<(StatusCode, Json<UserInfo>)> {
    Ok((
        StatusCode::CREATED,
        Json(orgs::create_user(&s.db, &s.clock, id, &req).await?),
    ))
}

async fn list_runners(State(s): State<AppState>, _: Admin) -> Result<Json<Vec<RunnerInfo>>> {
    Ok(Json(runners::list(&s).await?))
}

async fn register_runner(
    State(s): State<AppState>,
    _: Admin,
    Json(req): Json<RegisterRunnerRequest>,
) -> Result<(StatusCode, Json<RegisterRunnerResponse>)> {
    let r = runners::register(&s, &req).await?;
    let status = if r.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    if r.created {
        tracing::info!(runner = %req.name, "runner registered");
    }
    Ok((status, Json(r.response)))
}

async fn get_runner(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Json<RunnerInfo>> {
    Ok(Json(runners::get(&s, &name).await?))
}

async fn runner_boxes(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Json<Vec<BoxInfo>>> {
    let r = runners::get_row(&s, &name).await?;
    Ok(Json(boxes::list_on_runner(&s, r.id).await?))
}

async fn drain_runner(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Json<RunnerInfo>> {
    Ok(Json(runners::set_draining(&s, &name, true).await?))
}

async fn undrain_runner(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Json<RunnerInfo>> {
    Ok(Json(runners::set_draining(&s, &name, false).await?))
}

/// Query of the decommission endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecommissionQuery {
    /// Decommission even with boxes on it (they are marked deleted).
    #[serde(default)]
    pub force: bool,
}

async fn decommission_runner(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
    Query(q): Query<DecommissionQuery>,
) -> Result<Json<RunnerInfo>> {
    Ok(Json(runners::decommission(&s, &name, q.force).await?))
}

async fn admin_get_box(
    State(s): State<AppState>,
    _: Admin,
    Path(id): Path<Uuid>,
) -> Result<Json<BoxInfo>> {
    Ok(Json(boxes::get_any(&s, id).await?))
}

async fn move_box(
    State(s): State<AppState>,
    _: Admin,
    Path(id): Path<Uuid>,
    Json(req): Json<MoveBoxRequest>,
) -> Result<Json<BoxInfo>> {
    Ok(Json(migrate::move_box(&s, id, &req.runner).await?))
}

/// The route table.
pub fn routes() -> Vec<Route> {
    use Access::*;
    const BOX_ID: &str = "Box id.";
    const RUNNER: &str = "Runner name.";
    const ORG_ID: &str = "Organization id.";
    vec![
        // system
        Route::new(Method::GET, "/api/health", Public, health)
            .op("health", "system", "Health of the control plane and its database")
            .ok::<ControlPlaneHealth>(200, "Serving normally.")
            .ok::<ControlPlaneHealth>(503, "The database does not answer (status `degraded`)."),
        Route::new(Method::GET, "/api/openapi.json", Public, openapi)
            .op("openapi", "system", "This OpenAPI document")
            .status(200, "The document."),
        Route::new(Method::GET, "/api/me", Member, whoami)
            .op("whoami", "system", "Who the caller is")
            .ok::<WhoAmI>(200, "The caller."),
        // boxes
        Route::new(Method::POST, "/api/boxes", Member, create_box)
            .op("create_box", "boxes", "Create a box")
            .describe(
                "Places the box on a ready, non-draining runner with room (scored by free CPU, memory, disk \
                 and the boxes it runs) and pins it there. The runner creates and starts it on its next \
                 healthcheck; poll the box until `state` is `running`.",
            )
            .body::<CreateBoxRequest>()
            .ok::<BoxInfo>(201, "The box, pinned to a runner, `pending`.")
            .err(
                503,
                "No runner can take it: `no_runners_ready`, `all_runners_draining` or `no_capacity`; the message says why.",
            ),
        Route::new(Method::GET, "/api/boxes", Member, list_boxes)
            .op("list_boxes", "boxes", "List the organization's boxes")
            .describe("Oldest first, in pages. Deleted boxes are listed only when `state` asks for them.")
            .query_param::<String>("state", false, "Comma-separated states to list (default: every state but deleted).")
            .query_param::<String>("label", false, "`key=value`; repeat to require several labels.")
            .query_param::<u32>("limit", false, "Page size, 1-500 (default 50).")
            .query_param::<String>("cursor", false, "`next_cursor` of the previous page.")
            .ok::<BoxPage>(200, "One page."),
        Route::new(Method::GET, "/api/boxes/{id}", Member, get_box)
            .op("get_box", "boxes", "Get a box")
            .path_param::<Uuid>("id", BOX_ID)
            .ok::<BoxInfo>(200, "The box."),
        Route::new(Method::DELETE, "/api/boxes/{id}", Member, delete_box)
            .op("delete_box", "boxes", "Delete a box")
            .describe("Idempotent. The box is `deleting` until its runner confirms removal, then `deleted`.")
            .path_param::<Uuid>("id", BOX_ID)
            .ok::<BoxInfo>(200, "The box, `deleting`."),
        Route::new(Method::POST, "/api/boxes/{id}/start", Member, start_box)
            .op("start_box", "boxes", "Start a box")
            .path_param::<Uuid>("id", BOX_ID)
            .ok::<BoxInfo>(200, "The box, with `desired_state` running.")
            .err(409, "The box is deleted or being deleted (`box_deleted`)."),
        Route::new(Method::POST, "/api/boxes/{id}/stop", Member, stop_box)
            .op("stop_box", "boxes", "Stop a box")
            .path_param::<Uuid>("id", BOX_ID)
            .ok::<BoxInfo>(200, "The box, with `desired_state` stopped.")
            .err(409, "The box is deleted or being deleted (`box_deleted`)."),
        Route::new(Method::POST, "/api/boxes/{id}/exec", Member, exec_box)
            .op("exec_box", "boxes", "Run a command in a box and wait for it")
            .path_param::<Uuid>("id", BOX_ID)
            .body::<ExecRequest>()
            .describe(
                "Each of stdout and stderr holds at most `exec_max_output_bytes` of the control plane's \
                 configuration (1 MiB by default), or `max_output_bytes` when smaller: exactly the first bytes \
                 the process wrote, as text or base64 (`*_encoding`), `*_truncated` when it wrote more. \
                 An organization runs at most `exec_max_concurrent_per_org` of these at once.",
            )
            .ok::<ExecResponse>(200, "The command ended (or timed out).")
            .err(409, "The box is not running (`box_not_running`).")
            .err(429, "The organization already runs its limit of one-shot execs (`too_many_execs`); retry after `Retry-After` seconds.")
            .err(502, "The runner failed, cannot be reached, or answered more output than asked (`runner_error`, `runner_unreachable`, `runner_output_too_large`).")
            .err(503, "The box's runner is not responding (`runner_unavailable`).")
            .err(504, "The runner did not answer in time (`runner_timeout`)."),
        Route::new(Method::GET, "/api/boxes/{id}/exec/ws", Member, exec_ws)
            .op("exec_box_ws", "boxes", "Interactive exec over a WebSocket")
            .describe(
                "Upgrade to a WebSocket relayed to the box's runner. Send `ExecStart` as the first text frame; \
                 the server answers `ExecEvent` `started`. Then stdin goes in binary frames and `ExecControl` \
                 (resize, signal, stdin_eof) in text frames; output comes in binary frames whose first byte is \
                 the stream (1 stdout, 2 stderr); the session ends with `ExecEvent` `exit` or `error`. \
                 A message larger than 2 MiB, either way, ends the session.",
            )
            .path_param::<Uuid>("id", BOX_ID)
            .status(101, "Switching to the WebSocket protocol.")
            .err(400, "Not a WebSocket upgrade request (`websocket_required`).")
            .err(409, "The box is not running (`box_not_running`).")
            .err(502, "The runner failed or cannot be reached.")
            .err(503, "The box's runner is not responding (`runner_unavailable`)."),
        // keys
        Route::new(Method::GET, "/api/keys", Member, list_keys)
            .op("list_keys", "keys", "List the organization's API keys")
            .ok::<Vec<ApiKeyInfo>>(200, "The keys (never the secrets)."),
        Route::new(Method::POST, "/api/keys", Member, create_key)
            .op("create_key", "keys", "Create an API key")
            .body::<CreateApiKeyRequest>()
            .ok::<CreateApiKeyResponse>(201, "The key, shown this once."),
        Route::new(Method::DELETE, "/api/keys/{id}", Member, revoke_key)
            .op("revoke_key", "keys", "Revoke an API key")
            .describe("Idempotent. A revoked key no longer authenticates.")
            .path_param::<Uuid>("id", "Key id.")
            .ok::<ApiKeyInfo>(200, "The key, revoked."),
        // runners
        Route::new(Method::POST, "/api/runners/healthcheck", Runner, healthcheck)
            .op("runner_healthcheck", "runners", "Report a runner's state and get the actions that converge it")
            .describe(
                "Level-triggered: the answer lists every action still needed (create boxes the runner lacks, \
                 start/stop, delete boxes it should not have), so a runner that missed calls converges on the \
                 next one. Also returns the key the control plane uses to call the runner.",
            )
            .body::<HealthcheckRequest>()
            .body_limit(MAX_HEALTHCHECK_BYTES)
            .ok::<HealthcheckResponse>(200, "What to do now."),
        // admin
        Route::new(Method::GET, "/api/admin/organizations", Admin, list_orgs)
            .op("list_organizations", "admin", "List organizations")
            .ok::<Vec<OrganizationInfo>>(200, "Every organization."),
        Route::new(Method::POST, "/api/admin/organizations", Admin, create_org)
            .op("create_organization", "admin", "Create an organization with a first API key")
            .body::<CreateOrganizationRequest>()
            .ok::<CreateOrganizationResponse>(201, "The organization and its key, shown this once.")
            .err(409, "The name is taken (`name_taken`)."),
        Route::new(Method::GET, "/api/admin/organizations/{id}/users", Admin, list_users)
            .op("list_users", "admin", "List an organization's OIDC users")
            .path_param::<Uuid>("id", ORG_ID)
            .ok::<Vec<UserInfo>>(200, "The users."),
        Route::new(Method::POST, "/api/admin/organizations/{id}/users", Admin, create_user)
            .op("create_user", "admin", "Add an OIDC user (by subject) to an organization")
            .path_param::<Uuid>("id", ORG_ID)
            .body::<CreateUserRequest>()
            .ok::<UserInfo>(201, "The user.")
            .err(409, "A user with this subject exists (`subject_taken`)."),
        Route::new(Method::GET, "/api/admin/runners", Admin, list_runners)
            .op("list_runners", "admin", "List runners with state, version, capacity and box counts")
            .ok::<Vec<RunnerInfo>>(200, "Every runner, by name."),
        Route::new(Method::POST, "/api/admin/runners", Admin, register_runner)
            .op("register_runner", "admin", "Register a runner")
            .describe(
                "With `token_sha256` the caller keeps the token and only its hash is stored; without it a \
                 token is minted and returned once. Registering an existing runner again with the same hash \
                 is idempotent (200); with another hash it is refused (409) unless the runner is \
                 decommissioned, which brings it back fresh (201).",
            )
            .body::<RegisterRunnerRequest>()
            .ok::<RegisterRunnerResponse>(201, "Registered (or re-registered after decommissioning).")
            .ok::<RegisterRunnerResponse>(200, "Already registered with this token hash.")
            .err(409, "Registered with another token (`runner_exists`), or the token is another runner's (`token_in_use`)."),
        Route::new(Method::GET, "/api/admin/runners/{name}", Admin, get_runner)
            .op("get_runner", "admin", "Get a runner")
            .path_param::<String>("name", RUNNER)
            .ok::<RunnerInfo>(200, "The runner."),
        Route::new(Method::GET, "/api/admin/runners/{name}/boxes", Admin, runner_boxes)
            .op("list_runner_boxes", "admin", "List the boxes pinned to a runner")
            .describe("Every live (not deleted) box pinned to the runner, whatever its organization.")
            .path_param::<String>("name", RUNNER)
            .ok::<Vec<BoxInfo>>(200, "The boxes."),
        Route::new(Method::POST, "/api/admin/runners/{name}/drain", Admin, drain_runner)
            .op("drain_runner", "admin", "Stop placing new boxes on a runner")
            .path_param::<String>("name", RUNNER)
            .ok::<RunnerInfo>(200, "The runner, draining.")
            .err(409, "The runner is decommissioned (`runner_decommissioned`)."),
        Route::new(Method::POST, "/api/admin/runners/{name}/undrain", Admin, undrain_runner)
            .op("undrain_runner", "admin", "Place new boxes on a runner again")
            .path_param::<String>("name", RUNNER)
            .ok::<RunnerInfo>(200, "The runner.")
            .err(409, "The runner is decommissioned (`runner_decommissioned`)."),
        Route::new(Method::POST, "/api/admin/runners/{name}/decommission", Admin, decommission_runner)
            .op("decommission_runner", "admin", "Retire a runner")
            .describe(
                "Its token stops working. Refused while boxes are pinned to it, unless `force=true`, which \
                 marks them deleted (their data is lost with the host). Idempotent.",
            )
            .path_param::<String>("name", RUNNER)
            .query_param::<bool>("force", false, "Decommission even with boxes on it.")
            .ok::<RunnerInfo>(200, "The runner, decommissioned.")
            .err(409, "Boxes are still pinned to it (`runner_not_empty`)."),
        Route::new(Method::GET, "/api/admin/boxes/{id}", Admin, admin_get_box)
            .op("admin_get_box", "admin", "Get any box")
            .path_param::<Uuid>("id", BOX_ID)
            .ok::<BoxInfo>(200, "The box."),
        Route::new(Method::POST, "/api/admin/boxes/{id}/move", Admin, move_box)
            .op("move_box", "admin", "Move a box to another runner, keeping its id")
            .describe(
                "Reserves room on the target, streams the box's archive from its runner's export into the \
                 target's import (SHA-256 checked), then pins the box to the target (`stopped` there; it \
                 is started again if it should run). On failure the box stays where it was. Calling it \
                 again resumes an interrupted move.",
            )
            .path_param::<Uuid>("id", BOX_ID)
            .body::<MoveBoxRequest>()
            .ok::<BoxInfo>(200, "The box, pinned to the target.")
            .err(409, "The box is deleted (`box_deleted`), or the target cannot take boxes (`runner_unavailable`).")
            .err(502, "A runner failed during the copy (`runner_error`, `runner_unreachable`, `archive_corrupt`).")
            .err(503, "The target has no room (`no_capacity`), or a runner is not responding."),
    ]
}
