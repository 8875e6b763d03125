//! The journal: each apply's plan and every step's outcome, kept in the
//! stage's state store next to the lock, so `boxctl status` can say what the
//! last deploy did and a rerun knows what was in flight when one died.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stack::Value;
use time::OffsetDateTime;

use super::lock::Holder;
use super::plan::{Action, FieldChange, Mode, Plan, Summary};
use super::store::{Condition, StateStore, StoreError};

/// Key prefix of journal objects.
pub const PREFIX: &str = "journal/";
/// Journals kept per stage; older ones are pruned.
pub const KEEP: usize = 20;

/// How an apply ended (or that it has not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyStatus {
    /// Still going, or died without a word.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// A step failed.
    Failed,
    /// Stopped by the operator or a lost lock.
    Interrupted,
}

/// How one step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Started, no outcome yet.
    Running,
    /// Done.
    Succeeded,
    /// Gave up.
    Failed,
    /// Never started because the apply stopped.
    Skipped,
}

/// One resource's planned change, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// Resource.
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Action.
    pub action: Action,
    /// Field-level changes (never secret values: the graph holds none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldRecord>,
}

/// One field change, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldRecord {
    /// Field.
    pub name: String,
    /// Old value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    /// New value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

impl From<&FieldChange> for FieldRecord {
    fn from(f: &FieldChange) -> Self {
        FieldRecord {
            name: f.name.clone(),
            old: f.old.clone(),
            new: f.new.clone(),
        }
    }
}

/// One step's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Resource.
    pub id: String,
    /// Action.
    pub action: Action,
    /// Outcome.
    pub status: StepStatus,
    /// Attempts made.
    pub attempts: u32,
    /// Start.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<OffsetDateTime>,
    /// End.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One apply, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalDoc {
    /// Unique id.
    pub apply_id: String,
    /// Stack.
    pub stack: String,
    /// Stage.
    pub stage: String,
    /// `deploy`, `destroy`, `decommission runner-2`, …
    pub command: String,
    /// Deploy or destroy.
    pub mode: Mode,
    /// Who ran it.
    pub holder: Holder,
    /// Start.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// End.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// Outcome.
    pub status: ApplyStatus,
    /// Counts of the plan.
    pub summary: Summary,
    /// The plan's changes (unchanged resources left out).
    pub changes: Vec<ChangeRecord>,
    /// Steps, in the order they started.
    pub steps: Vec<StepRecord>,
    /// Stage outputs at the end.
    #[serde(default)]
    pub outputs: BTreeMap<String, Value>,
    /// Notes (e.g. "resumed after an interrupted apply").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Writes one apply's journal, at most once per `min_interval` while steps
/// progress, and always at the start and the end.
pub struct Journal {
    store: Arc<dyn StateStore>,
    key: String,
    doc: Mutex<JournalDoc>,
    last_flush: Mutex<Instant>,
    min_interval: Duration,
}

impl Journal {
    /// Start a journal for `plan` and write it.
    pub async fn start(
        store: Arc<dyn StateStore>,
        plan: &Plan,
        command: &str,
        holder: Holder,
        notes: Vec<String>,
    ) -> Result<Arc<Journal>, StoreError> {
        let started_at = OffsetDateTime::now_utc();
        let apply_id = uuid::Uuid::now_v7().to_string();
        let stamp = started_at
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .expect("timestamp formats");
        let key = format!("{PREFIX}{stamp}-{}.json", &apply_id[apply_id.len() - 8..]);
        let doc = JournalDoc {
            apply_id,
            stack: plan.stack.clone(),
            stage: plan.stage.clone(),
            command: command.to_string(),
            mode: plan.mode,
            holder,
            started_at,
            finished_at: None,
            status: ApplyStatus::Running,
            summary: plan.summary.clone(),
            changes: plan
                .changes
                .iter()
                .filter(|c| c.action != Action::Unchanged)
                .map(|c| ChangeRecord {
                    id: c.id.to_string(),
                    kind: c.kind.clone(),
                    action: c.action,
                    fields: c.fields.iter().map(FieldRecord::from).collect(),
                })
                .collect(),
            steps: Vec::new(),
            outputs: BTreeMap::new(),
            notes,
        };
        let journal = Arc::new(Journal {
            store,
            key,
            doc: Mutex::new(doc),
            last_flush: Mutex::new(Instant::now()),
            min_interval: Duration::from_millis(500),
        });
        journal.flush().await?;
        prune(journal.store.as_ref()).await;
        Ok(journal)
    }

    /// Object key of this journal.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Record a step's start.
    pub async fn step_started(&self, id: &str, action: Action) {
        self.doc
            .lock()
            .expect("journal mutex")
            .steps
            .push(StepRecord {
                id: id.to_string(),
                action,
                status: StepStatus::Running,
                attempts: 1,
                started_at: Some(OffsetDateTime::now_utc()),
                finished_at: None,
                error: None,
            });
        self.flush_throttled().await;
    }

    /// Record a step's outcome.
    pub async fn step_finished(
        &self,
        id: &str,
        status: StepStatus,
        attempts: u32,
        error: Option<String>,
    ) {
        {
            let mut doc = self.doc.lock().expect("journal mutex");
            if let Some(s) = doc
                .steps
                .iter_mut()
                .rev()
                .find(|s| s.id == id && s.status == StepStatus::Running)
            {
                s.status = status;
                s.attempts = attempts;
                s.finished_at = Some(OffsetDateTime::now_utc());
                s.error = error;
            }
        }
        self.flush_throttled().await;
    }

    /// Record steps that never ran.
    pub fn steps_skipped(&self, skipped: &[(String, Action)]) {
        let mut doc = self.doc.lock().expect("journal mutex");
        for (id, action) in skipped {
            doc.steps.push(StepRecord {
                id: id.clone(),
                action: *action,
                status: StepStatus::Skipped,
                attempts: 0,
                started_at: None,
                finished_at: None,
                error: None,
            });
        }
    }

    /// Record the end and write.
    pub async fn finish(
        &self,
        status: ApplyStatus,
        outputs: BTreeMap<String, Value>,
    ) -> Result<(), StoreError> {
        {
            let mut doc = self.doc.lock().expect("journal mutex");
            doc.status = status;
            doc.finished_at = Some(OffsetDateTime::now_utc());
            doc.outputs = outputs;
        }
        self.flush().await
    }

    /// A copy of the document as it stands.
    pub fn snapshot(&self) -> JournalDoc {
        self.doc.lock().expect("journal mutex").clone()
    }

    async fn flush_throttled(&self) {
        let due = self.last_flush.lock().expect("journal mutex").elapsed() >= self.min_interval;
        if due && let Err(e) = self.flush().await {
            tracing::warn!("could not write the journal {}: {e}", self.key);
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(&*self.doc.lock().expect("journal mutex"))
            .expect("journal serializes");
        *self.last_flush.lock().expect("journal mutex") = Instant::now();
        self.store
            .put(&self.key, body, Condition::None)
            .await
            .map(|_| ())
    }
}

/// Key of the stage's outputs, written by every successful deploy.
pub const OUTPUTS_KEY: &str = "outputs.json";

/// The most recent journal of the stage, if any.
pub async fn latest(store: &dyn StateStore) -> Result<Option<JournalDoc>, StoreError> {
    latest_matching(store, |_| true).await
}

/// The most recent journal (of the ones kept) that `wanted` accepts.
pub async fn latest_matching(
    store: &dyn StateStore,
    wanted: impl Fn(&JournalDoc) -> bool,
) -> Result<Option<JournalDoc>, StoreError> {
    let keys = store.list(PREFIX).await?;
    for key in keys.iter().rev() {
        let Some((body, _)) = store.get(key).await? else {
            continue;
        };
        let doc: JournalDoc = serde_json::from_slice(&body)
            .map_err(|e| StoreError::Other(format!("journal {key} is unreadable: {e}")))?;
        if wanted(&doc) {
            return Ok(Some(doc));
        }
    }
    Ok(None)
}

/// Record the stage's outputs after a successful deploy.
pub async fn save_outputs(
    store: &dyn StateStore,
    outputs: &BTreeMap<String, Value>,
) -> Result<(), StoreError> {
    let body = serde_json::to_vec_pretty(outputs).expect("outputs serialize");
    store
        .put(OUTPUTS_KEY, body, Condition::None)
        .await
        .map(|_| ())
}

/// The outputs of the last successful deploy.
pub async fn outputs(store: &dyn StateStore) -> Result<BTreeMap<String, Value>, StoreError> {
    match store.get(OUTPUTS_KEY).await? {
        None => Ok(BTreeMap::new()),
        Some((body, _)) => serde_json::from_slice(&body)
            .map_err(|e| StoreError::Other(format!("{OUTPUTS_KEY} is unreadable: {e}"))),
    }
}

/// True for a journal of `deploy` or `destroy` (not of an operation such as an upgrade).
pub fn is_deploy(doc: &JournalDoc) -> bool {
    doc.command.starts_with("boxctl deploy") || doc.command.starts_with("boxctl destroy")
}

async fn prune(store: &dyn StateStore) {
    let Ok(keys) = store.list(PREFIX).await else {
        return;
    };
    if keys.len() > KEEP {
        for key in &keys[..keys.len() - KEEP] {
            let _ = store.delete(key, Condition::None).await;
        }
    }
}
