//! `/api/v1/admin`: operations for admins.

use axum::extract::State;
use axum::Json;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{AppResult, Problem};
use crate::model::Role;
use crate::repair::{repair_once, RepairReport};

/// Runs one pass of the index repair task now.
#[utoipa::path(post, path = "/api/v1/admin/repair", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = RepairReport), (status = 403, body = Problem)))]
pub async fn repair(State(st): State<AppState>, caller: Caller) -> AppResult<Json<RepairReport>> {
    caller.require(&[Role::Admin], "run repairs")?;
    Ok(Json(repair_once(&st.db).await?))
}
