//! The REST API under `/v1`: JSON in and out, errors as [`ErrorBody`],
//! and an OpenAPI document generated from these handlers.
//!
//! Handlers only translate HTTP to [`ControlPlane`] calls; they hold no
//! logic of their own.

mod access;
mod billing;
mod cluster;
mod contract;
mod dns;
mod events;
mod extract;
mod failovers;
mod groups;
mod hosts;
mod images;
mod instances;
mod keypairs;
mod lbs;
mod metrics;
mod migrations;
mod networks;
mod page;
mod snapshots;
mod validate;
mod volumes;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use skyvisor_core::InstanceType;
use skyvisor_core::api::{ErrorBody, ServerInfo};
use skyvisor_core::resources::builtin_types;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ControlPlane;
use crate::error::ApiError;
use crate::metrics::{RequestLabels, RouteLabels};

pub use extract::{ApiJson, ApiQuery};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Skyvisor API",
        description = "A private cloud: VMs on a pool of hosts.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Declares the bearer token every operation needs.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`skyvisor token create`); the project is chosen with the X-Skyvisor-Project header",
                    ))
                    .build(),
            ),
        );
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
    }
}

/// The OpenAPI document as it is served and committed: [`openapi`] with
/// the rules the types cannot carry (patterns, ranges, which fields go
/// together).
pub fn openapi_json() -> serde_json::Value {
    let mut doc = serde_json::to_value(openapi()).unwrap_or_default();
    contract::constrain(&mut doc);
    doc
}

/// The OpenAPI document of the API, as types: every route and operation
/// with its answers (see [`openapi_json`] for the document clients get).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut api) = api_router().split_for_parts();
    contract::complete(&mut api);
    api
}

fn api_router() -> OpenApiRouter<ControlPlane> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(info))
        .routes(routes!(access::whoami))
        .routes(routes!(access::list_projects, access::create_project))
        .routes(routes!(
            access::show_project,
            access::update_project,
            access::delete_project
        ))
        .routes(routes!(access::grant, access::revoke_role))
        .routes(routes!(access::list_identities, access::create_identity))
        .routes(routes!(access::show_identity, access::delete_identity))
        .routes(routes!(access::list_tokens, access::create_token))
        .routes(routes!(access::revoke_token))
        .routes(routes!(access::audit))
        .routes(routes!(events::list))
        .routes(routes!(events::stream))
        .routes(routes!(metrics::top_instances))
        .routes(routes!(metrics::top_hosts))
        .routes(routes!(metrics::instance_history))
        .routes(routes!(metrics::host_history))
        .routes(routes!(billing::usage))
        .routes(routes!(billing::invoice))
        .routes(routes!(billing::price_sheet, billing::set_price_sheet))
        .routes(routes!(list_types))
        .routes(routes!(instances::list, instances::create))
        .routes(routes!(instances::show, instances::delete))
        .routes(routes!(instances::start))
        .routes(routes!(instances::stop))
        .routes(routes!(instances::reboot))
        .routes(routes!(instances::resize))
        .routes(routes!(instances::console))
        .routes(routes!(instances::console_ws))
        .routes(routes!(instances::exec))
        .routes(routes!(instances::exec_tty))
        .routes(routes!(instances::set_security_groups))
        .routes(routes!(instances::set_labels))
        .routes(routes!(snapshots::list, snapshots::create))
        .routes(routes!(snapshots::show, snapshots::delete))
        .routes(routes!(snapshots::list_all))
        .routes(routes!(snapshots::restore))
        .routes(routes!(snapshots::schedule))
        .routes(routes!(images::list))
        .routes(routes!(images::build))
        .routes({
            // Uploads are large; every other route keeps axum's 2 MB limit.
            let (schemas, paths, method) = routes!(images::import);
            (
                schemas,
                paths,
                method.layer(axum::extract::DefaultBodyLimit::disable()),
            )
        })
        .routes(routes!(images::list_recipes))
        .routes(routes!(images::show, images::delete))
        .routes(routes!(images::file))
        .routes(routes!(hosts::list))
        .routes(routes!(hosts::show))
        .routes(routes!(hosts::cordon))
        .routes(routes!(hosts::uncordon))
        .routes(routes!(migrations::drain))
        .routes(routes!(migrations::undrain))
        .routes(routes!(migrations::rebalance))
        .routes(routes!(migrations::migrate))
        .routes(routes!(migrations::cancel))
        .routes(routes!(migrations::list))
        .routes(routes!(migrations::show))
        .routes(routes!(failovers::list))
        .routes(routes!(cluster::servers))
        .routes(routes!(metrics::targets))
        .routes(routes!(cluster::join))
        .routes(routes!(cluster::create_join_token))
        .routes(routes!(networks::list, networks::create))
        .routes(routes!(networks::show, networks::delete))
        .routes(routes!(networks::list_groups, networks::create_group))
        .routes(routes!(networks::show_group, networks::delete_group))
        .routes(routes!(networks::set_rules))
        .routes(routes!(groups::list, groups::create))
        .routes(routes!(groups::show, groups::update, groups::delete))
        .routes(routes!(groups::scale))
        .routes(routes!(groups::set_autoscale, groups::remove_autoscale))
        .routes(routes!(lbs::list, lbs::create))
        .routes(routes!(lbs::show, lbs::delete))
        .routes(routes!(dns::zone))
        .routes(routes!(keypairs::list, keypairs::create))
        .routes(routes!(keypairs::show, keypairs::delete))
        .routes(routes!(volumes::list, volumes::create))
        .routes(routes!(volumes::show, volumes::delete))
        .routes(routes!(volumes::grow))
        .routes(routes!(volumes::change_replicas))
        .routes(routes!(volumes::list_snapshots, volumes::create_snapshot))
        .routes(routes!(volumes::delete_snapshot))
        .routes(routes!(volumes::attach))
        .routes(routes!(volumes::detach))
}

/// The whole HTTP service: `/v1/...`, `/v1/openapi.json`, `/metrics`, `/healthz`.
pub fn router(cp: ControlPlane) -> Router {
    let (api, _) = api_router().split_for_parts();
    let doc = openapi_json();
    let bodies = std::sync::Arc::new(validate::BodySchemas::from_doc(&doc));
    let doc_json = serde_json::to_string_pretty(&doc).unwrap_or_default();
    // Every route above is authorized; the document, metrics and health
    // below are not.
    // Layers added later run first: authorization, then the body check.
    api.route_layer(middleware::from_fn_with_state(bodies, validate::check_body))
        .route_layer(middleware::from_fn_with_state(
            cp.clone(),
            crate::access::authorize,
        ))
        .route_layer(middleware::from_fn_with_state(cp.clone(), count_requests))
        .route(
            "/v1/openapi.json",
            axum::routing::get(move || {
                let body = doc_json.clone();
                async move { ([("content-type", "application/json")], body) }
            }),
        )
        .route("/metrics", axum::routing::get(metrics::metrics))
        .route("/healthz", axum::routing::get(cluster::healthz))
        .fallback(|| async { ApiError::not_found("no such endpoint; see /v1/openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                code: "method_not_allowed",
                message: "method not allowed on this endpoint; see /v1/openapi.json".into(),
                field: None,
            }
        })
        .layer(middleware::from_fn_with_state(
            cp.clone(),
            cluster::require_store,
        ))
        .layer(compression())
        .layer(cors())
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(cp)
}

/// Gzips JSON answers for clients that accept it (a list of 1,000
/// instances is 1 MiB of JSON, 60 KiB gzipped), and nothing else: image
/// files are large and already packed, and the event stream must flow.
fn compression()
-> tower_http::compression::CompressionLayer<impl tower_http::compression::Predicate> {
    use tower_http::compression::Predicate;
    use tower_http::compression::predicate::SizeAbove;
    let json_only = |_: axum::http::StatusCode,
                     _: axum::http::Version,
                     headers: &axum::http::HeaderMap,
                     _: &axum::http::Extensions| {
        headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
    };
    tower_http::compression::CompressionLayer::new()
        .compress_when(SizeAbove::new(1024).and(json_only))
}

/// Lets pages of other origins call the API: the web console, when the
/// server that served it is gone, goes on with another server of the
/// cluster. Safe for any origin because the API trusts only bearer tokens,
/// never cookies or other ambient credentials (`credentials` stay off).
fn cors() -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method, header};
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-skyvisor-project"),
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Counts and times each routed request by its route's template.
async fn count_requests(State(cp): State<ControlPlane>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    cp.metrics
        .request_seconds
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    cp.metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// What this server is.
#[utoipa::path(get, path = "/v1/info", tag = "system",
    responses((status = 200, body = ServerInfo)))]
async fn info(State(cp): State<ControlPlane>) -> Json<ServerInfo> {
    let store_ok = cp.store_unavailable().is_none();
    let (server, leader) = match cp.cluster_view() {
        Some(v) => (
            Some(v.me.name.to_string()),
            v.leadership
                .borrow()
                .leader
                .as_ref()
                .map(|l| l.name.to_string()),
        ),
        None => (None, None),
    };
    // The list of servers needs the store; from memory, the info still says
    // who this server is while the store is away.
    let servers = if store_ok {
        cluster::live_servers(&cp).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    Json(ServerInfo {
        version: skyvisor_core::VERSION.to_string(),
        store: cp.store.backend().to_string(),
        hosts: cp.inventory.hosts().await.len() as u32,
        server,
        leader,
        servers,
        store_ok,
    })
}

/// The instance types.
#[utoipa::path(get, path = "/v1/types", tag = "instances",
    responses((status = 200, body = Vec<InstanceType>)))]
async fn list_types() -> Json<Vec<InstanceType>> {
    Json(builtin_types())
}
