//! The order in which queued jobs will be claimed, computed the way claims choose (highest priority; then
//! the owner furthest behind in the fair-share rotation, moving on by 1/weight per job; then the oldest job,
//! which breaks ties between owners too), for queue positions and wait estimates.

use std::collections::{BTreeMap, HashMap, VecDeque};

use uuid::Uuid;

use super::super::error::StoreError;
use super::rows::{non_negative, parse_uuid};
use super::{Backend, JobStore};

/// A queued job as the order needs it: id, owner (`''` for none), priority, created_at.
type Waiting = (String, String, i64, i64);

/// What the order is computed from: the waiting jobs, the owners' passes and the keys' weights.
type QueueState = (Vec<Waiting>, Vec<(String, f64)>, Vec<(String, i64)>);

impl JobStore {
    /// Every queued job's id in claim order, for [`QueuePositions`](super::super::QueuePositions).
    pub async fn queued_order(&self) -> Result<Vec<Uuid>, StoreError> {
        let (waiting, passes, weights): QueueState = on_read!(self, pool, _d => {
            let waiting = sqlx::query_as(
                "SELECT id, COALESCE(owner, ''), priority, created_at FROM jobs WHERE status = 'queued' \
                 ORDER BY created_at, id",
            )
            .fetch_all(pool)
            .await?;
            let passes = sqlx::query_as("SELECT owner, pass FROM fair_share").fetch_all(pool).await?;
            let weights = sqlx::query_as("SELECT id, weight FROM api_keys").fetch_all(pool).await?;
            (waiting, passes, weights)
        });
        let order = claim_order(waiting, passes.into_iter().collect(), weights.into_iter().collect());
        order.iter().map(|id| parse_uuid("jobs", id)).collect()
    }

    /// Where the job `id` stands when no other owner has queued jobs at its priority (the usual case: one
    /// key, or none): behind every queued job of higher priority and its owner's older jobs, with no turns
    /// to simulate, counted by the database without reading the queue. `Ok(None)` when another owner has
    /// queued jobs at its priority (the rotation decides: see [`JobStore::queued_order`]); `Ok(Some(None))`
    /// when the job is not queued.
    pub async fn position_among_own(&self, id: Uuid) -> Result<Option<Option<u64>>, StoreError> {
        let id = id.to_string();
        match &self.backend {
            // One statement, so one snapshot (a job claimed meanwhile is counted by every part or by none) and
            // one round trip to the connection's thread. `others`: another owner (NULL and '' are one owner)
            // has queued jobs at this priority, each probe one seek in the claim index, which orders a level's
            // jobs by owner. `ahead`: everything queued at higher priorities and at this one (kept per level
            // by triggers), less this job and the owner's jobs queued after it (a short range of that index:
            // the `created_at >=` bound lets the planner seek it, which the `OR` alone does not).
            Backend::Sqlite(pools) => {
                let row: Option<(String, bool, i64)> = sqlx::query_as(
                    "WITH me AS (SELECT status, COALESCE(owner, '') AS owner, priority, created_at, id \
                                 FROM jobs WHERE id = $1) \
                     SELECT me.status, \
                         EXISTS (SELECT 1 FROM jobs j WHERE j.status = 'queued' AND j.priority = me.priority \
                                 AND j.owner < me.owner) \
                         OR EXISTS (SELECT 1 FROM jobs j WHERE j.status = 'queued' AND j.priority = me.priority \
                                 AND j.owner > me.owner) \
                         OR (me.owner <> '' AND EXISTS (SELECT 1 FROM jobs j WHERE j.status = 'queued' \
                                 AND j.priority = me.priority AND j.owner IS NULL)), \
                         (SELECT COALESCE(SUM(queued), 0) FROM queue_levels WHERE priority >= me.priority) - 1 \
                         - (SELECT COUNT(*) FROM jobs j WHERE j.status = 'queued' AND j.priority = me.priority \
                            AND j.owner = me.owner \
                            AND j.created_at >= me.created_at AND (j.created_at > me.created_at OR j.id > me.id)) \
                         - (SELECT COUNT(*) FROM jobs j WHERE j.status = 'queued' AND j.priority = me.priority \
                            AND j.owner IS NULL AND me.owner = '' \
                            AND j.created_at >= me.created_at AND (j.created_at > me.created_at OR j.id > me.id)) \
                     FROM me",
                )
                .bind(&id)
                .fetch_optional(&pools.read)
                .await?;
                match row {
                    None => Ok(Some(None)),
                    Some((status, _, _)) if status != "queued" => Ok(Some(None)),
                    Some((_, true, _)) => Ok(None),
                    Some((_, false, ahead)) => Ok(Some(Some(non_negative("jobs", "count", ahead)?))),
                }
            }
            Backend::Postgres(pool) => {
                // One snapshot for every read: a job claimed between two of them must not be counted by one
                // and not the other.
                let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
                let job: Option<(String, String, i64, i64)> =
                    sqlx::query_as("SELECT status, COALESCE(owner, ''), priority, created_at FROM jobs WHERE id = $1")
                        .bind(&id)
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some((status, owner, priority, created_at)) = job else { return Ok(Some(None)) };
                if status != "queued" {
                    return Ok(Some(None));
                }
                // Another owner (NULL and '' are one owner) at this priority.
                let others: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND priority = $1 AND owner < $2) \
                         OR EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND priority = $1 AND owner > $2) \
                         OR ($2 <> '' AND EXISTS (SELECT 1 FROM jobs \
                             WHERE status = 'queued' AND priority = $1 AND owner IS NULL))",
                )
                .bind(priority)
                .bind(&owner)
                .fetch_one(&mut *tx)
                .await?;
                if others {
                    return Ok(None);
                }
                let ahead: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > $1 OR (priority = $1 AND \
                     (created_at < $2 OR (created_at = $2 AND id < $3))))",
                )
                .bind(priority)
                .bind(created_at)
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
                Ok(Some(Some(non_negative("jobs", "count", ahead)?)))
            }
        }
    }

    /// How many queued jobs will be claimed before this one (0 = next), in claim order; `None` if the job
    /// does not exist or is no longer queued.
    pub async fn queue_position(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        Ok(self.queued_order().await?.iter().position(|queued| *queued == id).map(|p| p as u64))
    }
}

/// Simulates claims over `waiting` (ordered oldest first) from the owners' current `passes` (absent: 0)
/// and `weights` (absent: 1).
fn claim_order(waiting: Vec<Waiting>, mut passes: HashMap<String, f64>, weights: HashMap<String, i64>) -> Vec<String> {
    // Per priority, highest first; per owner, oldest first.
    let mut levels: BTreeMap<i64, BTreeMap<String, VecDeque<(String, i64)>>> = BTreeMap::new();
    for (id, owner, priority, created_at) in waiting {
        levels.entry(-priority).or_default().entry(owner).or_default().push_back((id, created_at));
    }
    let mut order = Vec::new();
    for (_, mut owners) in levels {
        loop {
            // One owner left at this level: the rest of its jobs go in order, with no turns to take.
            if owners.values().filter(|jobs| !jobs.is_empty()).count() <= 1 {
                for (owner, jobs) in owners {
                    let weight = weights.get(&owner).copied().unwrap_or(1).max(1) as f64;
                    *passes.entry(owner).or_insert(0.0) += jobs.len() as f64 / weight;
                    order.extend(jobs.into_iter().map(|(id, _)| id));
                }
                break;
            }
            let next = owners
                .iter()
                .filter_map(|(owner, jobs)| jobs.front().map(|(id, first)| (owner, *first, id)))
                .min_by(|(a, first_a, id_a), (b, first_b, id_b)| {
                    let (pass_a, pass_b) =
                        (passes.get(*a).copied().unwrap_or(0.0), passes.get(*b).copied().unwrap_or(0.0));
                    pass_a.total_cmp(&pass_b).then(first_a.cmp(first_b)).then(id_a.cmp(id_b))
                })
                .map(|(owner, _, _)| owner.clone());
            let Some(owner) = next else { break };
            if let Some((id, _)) = owners.get_mut(&owner).and_then(VecDeque::pop_front) {
                order.push(id);
            }
            let weight = weights.get(&owner).copied().unwrap_or(1).max(1) as f64;
            *passes.entry(owner).or_insert(0.0) += 1.0 / weight;
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, owner: &str, priority: i64, created_at: i64) -> Waiting {
        (id.into(), owner.into(), priority, created_at)
    }

    #[test]
    fn owners_take_turns_by_weight_within_a_priority() {
        let mut waiting: Vec<Waiting> = (0..6).map(|i| job(&format!("a{i}"), "a", 0, i)).collect();
        waiting.push(job("b0", "b", 0, 10));
        waiting.push(job("b1", "b", 0, 11));
        waiting.push(job("h0", "b", 1, 12));
        let order = claim_order(waiting, HashMap::new(), HashMap::from([("b".to_string(), 2)]));
        // High priority first; then a and b alternate by weight (b's weight 2 gives it two turns per a turn).
        assert_eq!(order, ["h0", "a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]);
    }

    #[test]
    fn a_key_behind_in_the_rotation_goes_first() {
        let waiting = vec![job("a0", "a", 0, 0), job("a1", "a", 0, 1), job("b0", "b", 0, 5)];
        let passes = HashMap::from([("a".to_string(), 10.0), ("b".to_string(), 10.0)]);
        assert_eq!(claim_order(waiting.clone(), passes, HashMap::new()), ["a0", "b0", "a1"]);
        let passes = HashMap::from([("a".to_string(), 10.5)]);
        assert_eq!(claim_order(waiting, passes, HashMap::new()), ["b0", "a0", "a1"]);
    }
}
