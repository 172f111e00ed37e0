//! The application: shared state ([`AppState`]), the router with its tower
//! layers (request id, trace, timeout, body limit, compression, CORS, rate
//! limit) and the OpenAPI document served at `/openapi.json` and `/docs`.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use lmskv_client::Client;
use tokio::sync::Notify;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{Any, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::password::Passwords;
use crate::auth::token::Tokens;
use crate::config::Config;
use crate::db::Db;
use crate::error::{AppError, PROBLEM_JSON};
use crate::ratelimit::RateLimits;
use crate::routes;

/// The header carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// What every handler shares.
pub struct Inner {
    pub cfg: Config,
    pub db: Db,
    pub tokens: Tokens,
    pub passwords: Passwords,
    pub limits: RateLimits,
    /// The job queue's settings and this process's lease scan position.
    pub jobs: crate::jobs::Queue,
    /// Wakes the local job worker when a job is enqueued.
    pub jobs_enqueued: Notify,
}

/// Cheaply clonable shared state.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Connects the lmskv client (lazily) and prepares the shared parts.
    pub fn new(cfg: Config) -> anyhow::Result<AppState> {
        let client = Client::builder()
            .endpoints(cfg.lmskv_endpoints.clone())
            .deadline(cfg.lmskv_deadline)
            .build()?;
        Ok(AppState(Arc::new(Inner {
            db: Db::new(client),
            tokens: Tokens::new(cfg.jwt_secret.as_bytes(), cfg.access_token_ttl),
            passwords: Passwords::new(),
            limits: RateLimits::new(&cfg),
            jobs: crate::jobs::Queue::new(cfg.jobs.clone()),
            jobs_enqueued: Notify::new(),
            cfg,
        })))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "LMS API",
        description = "Students, courses, enrollments, assignments, submissions and grades on lmskv. \
Errors are RFC 9457 problem+json. Lists are cursor-paginated with `Link` headers.",
        version = "1"
    ),
    modifiers(&BearerAuth),
    components(schemas(crate::error::Problem, crate::error::FieldError)),
    tags(
        (name = "health"), (name = "auth"), (name = "users"), (name = "courses"),
        (name = "enrollments"), (name = "assignments"), (name = "submissions"),
        (name = "grades"), (name = "jobs"), (name = "admin")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The API routes with their OpenAPI description.
pub fn api_router() -> OpenApiRouter<AppState> {
    use routes::*;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::me))
        .routes(routes!(users::list_users))
        .routes(routes!(users::get_user, users::update_user))
        .routes(routes!(users::user_courses))
        .routes(routes!(courses::create_course, courses::list_courses))
        .routes(routes!(courses::get_course, courses::update_course))
        .routes(routes!(enrollments::enroll, enrollments::list_enrollments))
        .routes(routes!(enrollments::unenroll))
        .routes(routes!(
            assignments::create_assignment,
            assignments::list_assignments
        ))
        .routes(routes!(assignments::get_assignment))
        .routes(routes!(assignments::publish_grades))
        .routes(routes!(submissions::submit, submissions::list_submissions))
        .routes(routes!(submissions::get_submission))
        .routes(routes!(submissions::grade_submission))
        .routes(routes!(grades::student_grades))
        .routes(routes!(grades::gradebook))
        .routes(routes!(grades::export_gradebook))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::job_result))
        .routes(routes!(notifications::list_notifications))
        .routes(routes!(admin::repair))
}

/// The whole service: API, OpenAPI document, Swagger UI and the layers.
pub fn router(state: AppState) -> Router {
    let (api, openapi) = api_router().split_for_parts();
    let routes = Router::new()
        .merge(api)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(|| async { AppError::NotFound("route") });
    with_layers(routes, state)
}

/// Gives the answers tower layers make on their own the problem+json body
/// of every other error: the body limit's 413 (also the one the JSON
/// extractor gives for a body without `Content-Length`, so that both name the
/// configured limit) and the request timeout's bare 503.
async fn layer_errors_as_problems(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let resp = next.run(req).await;
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == PROBLEM_JSON);
    match resp.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            AppError::PayloadTooLarge(state.cfg.body_bytes_max).into_response()
        }
        StatusCode::SERVICE_UNAVAILABLE if !is_problem => {
            AppError::Timeout(state.cfg.request_timeout).into_response()
        }
        _ => resp,
    }
}

/// `routes` with the service's layers: request id, trace, CORS, problem+json
/// for layer errors, body limit, compression, timeout and the per-IP limit.
pub fn with_layers(routes: Router<AppState>, state: AppState) -> Router {
    let cfg = &state.cfg;
    let request_id = HeaderName::from_static(REQUEST_ID);
    let session_token = HeaderName::from_static(crate::routes::SESSION_TOKEN);
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
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
                    header::IF_MATCH,
                    header::CACHE_CONTROL,
                    session_token.clone(),
                ])
                // The session token too: a browser reads it from a write's
                // answer and sends it back for read-your-writes.
                .expose_headers([
                    header::LINK,
                    header::LOCATION,
                    header::ETAG,
                    header::RETRY_AFTER,
                    session_token,
                ])
                .max_age(Duration::from_secs(600)),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            layer_errors_as_problems,
        ))
        .layer(RequestBodyLimitLayer::new(cfg.body_bytes_max))
        .layer(CompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            cfg.request_timeout,
        ));
    routes
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::ratelimit::per_ip,
        ))
        .layer(DefaultBodyLimit::max(cfg.body_bytes_max))
        .layer(layers)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    async fn call(app: Router, req: axum::http::Request<Body>) -> (StatusCode, Response, String) {
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            status,
            Response::from_parts(parts, Body::empty()),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn state(timeout: Duration, body_max: usize) -> AppState {
        let mut cfg = Config::new(vec!["127.0.0.1:1".into()], "x".repeat(32));
        cfg.request_timeout = timeout;
        cfg.body_bytes_max = body_max;
        AppState::new(cfg).unwrap()
    }

    fn problem(resp: &Response, body: &str, status: u16) -> serde_json::Value {
        assert_eq!(resp.headers()[header::CONTENT_TYPE], PROBLEM_JSON, "{body}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], status, "{body}");
        assert!(v["title"].is_string() && v["type"].is_string(), "{body}");
        v
    }

    #[tokio::test]
    async fn a_timeout_is_a_503_problem_with_retry_after() {
        let st = state(Duration::from_millis(100), 1024);
        let routes = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
        let app = with_layers(routes, st);
        let req = axum::http::Request::get("/slow")
            .header(header::ACCEPT_ENCODING, "gzip")
            .body(Body::empty())
            .unwrap();
        let (status, resp, body) = call(app, req).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v = problem(&resp, &body, 503);
        assert_eq!(v["type"], "https://lms.example/problems/timeout");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert!(resp.headers().contains_key(REQUEST_ID));
    }

    #[tokio::test]
    async fn an_oversized_body_is_a_413_problem_naming_the_limit() {
        let st = state(Duration::from_secs(5), 1024);
        let routes = Router::new().route("/echo", post(|b: String| async move { b }));
        let app = with_layers(routes, st);
        // With Content-Length: refused by the body limit layer before the handler.
        let req = axum::http::Request::post("/echo")
            .header(header::CONTENT_LENGTH, "2000")
            .body(Body::from(vec![b'x'; 2000]))
            .unwrap();
        let (status, resp, body) = call(app.clone(), req).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let v = problem(&resp, &body, 413);
        assert!(v["detail"].as_str().unwrap().contains("1024"), "{body}");
        // A smaller body passes.
        let req = axum::http::Request::post("/echo")
            .body(Body::from("hello"))
            .unwrap();
        let (status, _, body) = call(app, req).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
    }
}
