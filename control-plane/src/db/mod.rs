//! The database: one code path for PostgreSQL and SQLite through sqlx's `Any`
//! driver, portable SQL (`$N` placeholders, TEXT ids, BIGINT milliseconds),
//! embedded migrations run at start, and write transactions that serialize
//! where they must (`BEGIN IMMEDIATE` on SQLite; row locks on PostgreSQL).

use std::borrow::Cow;
use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyConnection, AnyPool, Executor, Row};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use crate::error::{Error, Result};

/// A write transaction. Dereferences to the connection (`&mut *tx` is an
/// executor); on SQLite it also holds this process's writer turn.
pub struct Tx {
    tx: sqlx::Transaction<'static, Any>,
    _turn: Option<OwnedMutexGuard<()>>,
}

impl Tx {
    /// Commit (and give up the writer turn).
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl std::ops::Deref for Tx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

/// Which database the URL named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// Embedded migrations: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "runner binary",
        include_str!("../../migrations/0002_runner_binary.sql"),
    ),
    (
        3,
        "agent instance",
        include_str!("../../migrations/0003_agent_instance.sql"),
    ),
    (
        4,
        "box imports",
        include_str!("../../migrations/0004_box_imports.sql"),
    ),
    (
        5,
        "box egress allow-list",
        include_str!("../../migrations/0005_box_egress.sql"),
    ),
    (
        6,
        "exec slots",
        include_str!("../../migrations/0006_exec_slots.sql"),
    ),
];

/// Attempts of an operation that hit a serialization failure, deadlock or busy database.
const MAX_ATTEMPTS: u32 = 6;

/// Connection pool plus dialect.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
    /// SQLite has one writer: writers of this process queue here (first come,
    /// first served) rather than in SQLite's sleeping busy handler.
    writer: Option<Arc<Mutex<()>>>,
}

impl Db {
    /// Connect to `url` (`postgres://…` or `sqlite://…`) with a pool of `max_connections`.
    /// For SQLite the parent directory is created and the database put in WAL mode.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            bail!("unsupported database URL scheme (use postgres:// or sqlite:)");
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10));
        if dialect == Dialect::Sqlite {
            prepare_sqlite(url).await?;
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // Writers wait for the lock instead of failing; WAL makes NORMAL durable
                    // against crashes of this process (not of the machine).
                    conn.execute("PRAGMA busy_timeout = 30000; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
                        .await?;
                    Ok(())
                })
            });
        }
        // The URL may hold a password: never put it in the error.
        let pool = options
            .connect(url)
            .await
            .context("connect to the database")?;
        let writer = (dialect == Dialect::Sqlite).then(|| Arc::new(Mutex::new(())));
        Ok(Db {
            pool,
            dialect,
            writer,
        })
    }

    /// Apply the embedded migrations (idempotent; PostgreSQL takes an advisory
    /// lock so replicas starting together do not race).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrations: Vec<Migration> = MIGRATIONS
            .iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    Cow::Borrowed(d),
                    MigrationType::Simple,
                    Cow::Borrowed(sql),
                    false,
                )
            })
            .collect();
        let migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        };
        migrator
            .run(&self.pool)
            .await
            .context("run database migrations")?;
        Ok(())
    }

    /// The pool, for reads outside a transaction.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Begin a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`, after this process's writer queue), so
    /// read-then-write transactions cannot deadlock or see stale data, even
    /// with other processes on the file; on PostgreSQL conflicting writers
    /// meet on row locks.
    pub async fn begin(&self) -> Result<Tx> {
        match &self.writer {
            Some(turn) => {
                let turn = turn.clone().lock_owned().await;
                let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
                Ok(Tx {
                    tx,
                    _turn: Some(turn),
                })
            }
            None => Ok(Tx {
                tx: self.pool.begin().await?,
                _turn: None,
            }),
        }
    }

    /// True when the database answers `SELECT 1`.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Close every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Run `op` again (with backoff) while it fails with a transient database
/// error: PostgreSQL serialization failure or deadlock, SQLite busy/locked.
pub async fn retry<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < MAX_ATTEMPTS && is_transient(&e) => {
                tracing::debug!(attempt, error = %e, "transient database error; retrying");
                let jitter = rand::random_range(0..10u64);
                tokio::time::sleep(Duration::from_millis(5 * (1 << attempt) + jitter)).await;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Serialization failure, deadlock, or a busy SQLite database.
pub fn is_transient(e: &Error) -> bool {
    let Some(sqlx::Error::Database(d)) = e.sqlx() else {
        return false;
    };
    matches!(
        d.code().as_deref(),
        Some("40001" | "40P01" | "5" | "6" | "261" | "262" | "517")
    )
}

async fn prepare_sqlite(url: &str) -> anyhow::Result<()> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or("");
    if path.is_empty() || path.contains(":memory:") || url.contains("mode=memory") {
        bail!(
            "in-memory SQLite is not supported: the control plane uses a connection pool; name a file"
        );
    }
    if let Some(parent) = Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create the database directory {}", parent.display()))?;
    }
    // WAL is a property of the file: set it once with a plain connection.
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .context("parse the SQLite URL")?
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let conn = sqlx::ConnectOptions::connect(&opts)
        .await
        .context("open the SQLite database")?;
    sqlx::Connection::close(conn).await.ok();
    Ok(())
}

/// Read a UUID stored as text.
pub fn get_uuid(row: &AnyRow, col: &str) -> Result<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s)
        .map_err(|e| Error::internal(anyhow::anyhow!("column {col} holds a bad UUID {s:?}: {e}")))
}

/// Read an optional UUID stored as text.
pub fn get_opt_uuid(row: &AnyRow, col: &str) -> Result<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| Uuid::parse_str(&s))
        .transpose()
        .map_err(|e| Error::internal(anyhow::anyhow!("column {col} holds a bad UUID: {e}")))
}

/// Read a non-negative count or amount stored as BIGINT.
pub fn get_u64(row: &AnyRow, col: &str) -> Result<u64> {
    let v: i64 = row.try_get(col)?;
    Ok(v.max(0) as u64)
}

/// Read a flag stored as BIGINT 0/1.
pub fn get_flag(row: &AnyRow, col: &str) -> Result<bool> {
    let v: i64 = row.try_get(col)?;
    Ok(v != 0)
}

/// Clamp a `u64` from the API into a BIGINT.
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
