//! The application: shared state ([`AppState`]), the router with its tower
//! layers (request id, trace, timeout, body limit, compression, CORS, rate
//! limit) and the OpenAPI document served at `/openapi.json` and `/docs`.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, Method, StatusCode};
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
use crate::error::AppError;
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
    let cfg = &state.cfg;
    let request_id = HeaderName::from_static(REQUEST_ID);
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
        .layer(RequestBodyLimitLayer::new(cfg.body_bytes_max))
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
                ])
                .expose_headers([header::LINK, header::LOCATION, header::ETAG, header::RETRY_AFTER])
                .max_age(Duration::from_secs(600)),
        )
        .layer(CompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            cfg.request_timeout,
        ));
    Router::new()
        .merge(api)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(|| async { AppError::NotFound("route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::ratelimit::per_ip,
        ))
        .layer(DefaultBodyLimit::max(cfg.body_bytes_max))
        .layer(layers)
        .with_state(state)
}
