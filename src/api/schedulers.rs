//! `GET /v1/schedulers`: the sampler names a request may use, their aliases, and what each is good for.

use serde::Serialize;
use utoipa::ToSchema;

use super::error::AppJson;
use crate::engine::scheduler::SchedulerKind;

/// The scheduler list.
#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulerList {
    /// Always `list`.
    pub object: &'static str,
    /// Every scheduler.
    pub data: Vec<SchedulerCard>,
}

/// One scheduler.
#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulerCard {
    /// The name to send as `scheduler`.
    pub id: String,
    /// Other accepted spellings (A1111 display names), matched case-insensitively.
    pub aliases: Vec<String>,
    /// The diffusers class it reproduces.
    pub diffusers_class: String,
    /// What it is good for, in one line.
    pub description: String,
}

/// List the schedulers.
#[utoipa::path(get, path = "/v1/schedulers", tag = "models", responses((status = 200, description = "The schedulers", body = SchedulerList)))]
pub async fn list_schedulers() -> AppJson<SchedulerList> {
    let data = SchedulerKind::all()
        .iter()
        .map(|k| SchedulerCard {
            id: k.name().to_string(),
            aliases: k.aliases().iter().map(|a| a.to_string()).collect(),
            diffusers_class: k.class_name().to_string(),
            description: k.description().to_string(),
        })
        .collect();
    AppJson(SchedulerList { object: "list", data })
}
