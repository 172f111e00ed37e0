//! Liveness (`/healthz`: the process serves HTTP) and readiness (`/readyz`:
//! lmskv answers a linearizable read within a short deadline).

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use lmskv_client::ReadConsistency;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::{AppError, AppResult};
use crate::keys;

/// How long `/readyz` waits for lmskv.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// A probe's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The process can serve requests: lmskv has a leader that answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = crate::error::Problem)))]
pub async fn readyz(State(st): State<AppState>) -> AppResult<Json<Health>> {
    // STRONG: only a leader that holds its lease (or confirms it) answers, so a
    // 200 means writes can succeed too.
    let probe = st
        .db
        .client()
        .get(keys::seq("user"), ReadConsistency::Strong);
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(Json(Health { status: "ready" })),
        Ok(Err(e)) => Err(AppError::Unavailable(e)),
        Err(_) => Err(AppError::Busy("lmskv did not answer in time".into())),
    }
}
