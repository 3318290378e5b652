//! The PostgreSQL store: the schema, the lease statements, and the fenced
//! writes of a partition's records.
//!
//! Tables (all prefixed `sagamq_`):
//! - `meta(key, value)`: the partition count and the callback signing key,
//!   fixed by the first instance that initialises the store.
//! - `leases(partition, owner, epoch, expires_at)`: one row per partition,
//!   judged by the database's clock (`now()`); every takeover raises `epoch`.
//! - `records(partition, epoch, lsn, frames)`: a partition's log. One row per
//!   group commit, keyed by the owner's epoch and the core's lsn (which
//!   restarts with each owner), holding whole frames exactly as the file log
//!   holds them; recovery reads them in key order.
//! - `instances(id, addr, heartbeat_at)`: where each instance takes forwarded
//!   requests, and whether it is alive (by the database's clock).
//!
//! **Invariants:** a write of partition `p` commits only if, in the same
//! transaction, `p`'s lease row still names this owner and epoch (read `FOR
//! SHARE`, so a takeover's `UPDATE` waits for the write or the write sees
//! the new epoch): a stale owner can never add or delete a row. A write is
//! idempotent (`ON CONFLICT DO NOTHING` on its key, and a compaction deletes
//! only rows before its own key), so a batch whose COMMIT had an unknown
//! outcome is simply written again.

use crate::cluster::{InstanceId, LeaseView, PartitionId, Partitions};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_postgres::NoTls;

/// How long one statement or transaction may take before it counts as failed.
pub const DB_OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per instance: the lease loop, one write per partition in
/// flight at a time, and loads at takeover share them.
pub const POOL_SIZE_DEFAULT: usize = 8;

const SCHEMA: &str = "
SET LOCAL client_min_messages = warning;
CREATE TABLE IF NOT EXISTS sagamq_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS sagamq_leases (
    partition int PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
CREATE TABLE IF NOT EXISTS sagamq_records (
    partition int NOT NULL,
    epoch bigint NOT NULL,
    lsn bigint NOT NULL,
    frames bytea NOT NULL,
    PRIMARY KEY (partition, epoch, lsn)
);
CREATE TABLE IF NOT EXISTS sagamq_instances (
    id text PRIMARY KEY,
    addr text NOT NULL,
    heartbeat_at timestamptz NOT NULL
);
";

/// Serialises concurrent initialisations (an arbitrary constant).
const INIT_LOCK_KEY: i64 = 0x5a6a_4d51_0001;

/// What the store was initialised with.
#[derive(Clone, Debug)]
pub struct StoreMeta {
    pub partitions: Partitions,
    /// Every instance signs callbacks with this key (subscribers verify one key).
    pub signing_key: String,
}

/// A lease and where its owner takes forwarded requests.
#[derive(Clone, Debug)]
pub struct OwnedLease {
    pub view: LeaseView,
    pub addr: Option<String>,
}

/// The lease table and the live instances, as the database saw them at one instant.
#[derive(Clone, Debug)]
pub struct ClusterView {
    pub leases: Vec<OwnedLease>,
    pub live: BTreeSet<InstanceId>,
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

pub use crate::cluster::RecordRow;

/// Why a write did not commit.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteError {
    /// The lease moved on (another epoch or owner): this owner must stop serving.
    Fenced { owner: Option<String>, epoch: u64 },
    /// The database could not be reached or failed; the outcome may be
    /// unknown. Writing the same batch again is safe.
    Db(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Fenced { owner, epoch } => write!(
                f,
                "fenced: the lease is now epoch {epoch} of {}",
                owner.as_deref().unwrap_or("nobody")
            ),
            WriteError::Db(e) => write!(f, "database: {e}"),
        }
    }
}

/// An error with its causes (tokio-postgres says only "db error" at the top).
fn db(e: impl std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Runs `f` with a bound on its time (a cut connection must not hang a caller).
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(DB_OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {DB_OP_TIMEOUT:?}")),
    }
}

impl Store {
    /// A pool on `url` (`postgres://user@host:port/db`); connects lazily.
    pub fn connect(url: &str, pool_size: usize) -> Result<Store, String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("--store {:?} is not a PostgreSQL URL: {e}", redact(url)))?;
        let mgr = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(DB_OP_TIMEOUT))
            .create_timeout(Some(DB_OP_TIMEOUT))
            .recycle_timeout(Some(DB_OP_TIMEOUT))
            .build()
            .map_err(db)?;
        Ok(Store { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        self.pool.get().await.map_err(|e| format!("connect to PostgreSQL: {e}"))
    }

    /// Creates the tables if missing and fixes the partition count and the
    /// signing key at the first initialisation. A later `partitions` that
    /// differs from the stored count is refused (messages would move).
    pub async fn init(&self, partitions: Option<u32>, signing_key: &str) -> Result<StoreMeta, String> {
        bounded("initialise the store", async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INIT_LOCK_KEY])
                .await
                .map_err(db)?;
            tx.batch_execute(SCHEMA).await.map_err(db)?;
            let wanted = partitions.unwrap_or(crate::cluster::PARTITIONS_DEFAULT);
            Partitions::new(wanted)?;
            tx.execute(
                "INSERT INTO sagamq_meta (key, value) VALUES ('partitions', $1) ON CONFLICT (key) DO NOTHING",
                &[&wanted.to_string()],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO sagamq_meta (key, value) VALUES ('signing_key', $1) ON CONFLICT (key) DO NOTHING",
                &[&signing_key],
            )
            .await
            .map_err(db)?;
            let stored: String = tx
                .query_one("SELECT value FROM sagamq_meta WHERE key = 'partitions'", &[])
                .await
                .map_err(db)?
                .get(0);
            let count: u32 = stored
                .parse()
                .map_err(|_| format!("the store's partition count {stored:?} is not a number"))?;
            let parts = Partitions::new(count).map_err(|e| format!("the store's partition count: {e}"))?;
            if let Some(p) = partitions
                && p != count
            {
                return Err(format!(
                    "the store was initialised with {count} partitions; --partitions {p} would move messages \
                     between partitions (omit it, or use a new database)"
                ));
            }
            let key: String = tx
                .query_one("SELECT value FROM sagamq_meta WHERE key = 'signing_key'", &[])
                .await
                .map_err(db)?
                .get(0);
            for p in parts.all() {
                tx.execute(
                    "INSERT INTO sagamq_leases (partition) VALUES ($1) ON CONFLICT (partition) DO NOTHING",
                    &[&(p.0 as i32)],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)?;
            Ok(StoreMeta {
                partitions: parts,
                signing_key: key,
            })
        })
        .await
    }

    /// Says `me` is alive and where it takes forwarded requests.
    pub async fn heartbeat(&self, me: &InstanceId, addr: &str) -> Result<(), String> {
        bounded("heartbeat", async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO sagamq_instances (id, addr, heartbeat_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, heartbeat_at = now()",
                &[&me.0, &addr],
            )
            .await
            .map_err(db)?;
            // Instances gone for an hour are forgotten (their leases expired long ago).
            c.execute(
                "DELETE FROM sagamq_instances WHERE heartbeat_at < now() - interval '1 hour'",
                &[],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// Every lease as the database judges it now, with its owner's address,
    /// and the instances alive within `ttl`.
    pub async fn view(&self, ttl: Duration) -> Result<ClusterView, String> {
        bounded("read the leases", async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT l.partition, l.owner, l.epoch, l.expires_at > now(), i.addr \
                     FROM sagamq_leases l LEFT JOIN sagamq_instances i ON i.id = l.owner ORDER BY l.partition",
                    &[],
                )
                .await
                .map_err(db)?;
            let mut leases = Vec::with_capacity(rows.len());
            for r in rows {
                let partition: i32 = r.get(0);
                let owner: Option<String> = r.get(1);
                let epoch: i64 = r.get(2);
                leases.push(OwnedLease {
                    view: LeaseView {
                        partition: PartitionId(partition as u32),
                        owner: owner.map(InstanceId),
                        epoch: epoch as u64,
                        live: r.get(3),
                    },
                    addr: r.get(4),
                });
            }
            let ms = ttl_ms(ttl);
            let live = c
                .query(
                    "SELECT id FROM sagamq_instances WHERE heartbeat_at > now() - ($1::bigint * interval '1 millisecond')",
                    &[&ms],
                )
                .await
                .map_err(db)?
                .into_iter()
                .map(|r| InstanceId(r.get(0)))
                .collect::<BTreeSet<_>>();
            Ok(ClusterView { leases, live })
        })
        .await
    }

    /// Takes partition `p` if its lease is free or expired: the new epoch.
    pub async fn acquire(&self, p: PartitionId, me: &InstanceId, ttl: Duration) -> Result<Option<u64>, String> {
        bounded("take a lease", async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "UPDATE sagamq_leases SET owner = $2, epoch = epoch + 1, \
                     expires_at = now() + ($3::bigint * interval '1 millisecond') \
                     WHERE partition = $1 AND expires_at <= now() RETURNING epoch",
                    &[&(p.0 as i32), &me.0, &ttl_ms(ttl)],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, i64>(0) as u64))
        })
        .await
    }

    /// Extends the leases `me` holds at these epochs; answers those it still holds.
    pub async fn renew(
        &self,
        me: &InstanceId,
        leases: &[(PartitionId, u64)],
        ttl: Duration,
    ) -> Result<BTreeSet<PartitionId>, String> {
        if leases.is_empty() {
            return Ok(BTreeSet::new());
        }
        let parts: Vec<i32> = leases.iter().map(|(p, _)| p.0 as i32).collect();
        let epochs: Vec<i64> = leases.iter().map(|(_, e)| *e as i64).collect();
        bounded("renew leases", async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "UPDATE sagamq_leases l SET expires_at = now() + ($4::bigint * interval '1 millisecond') \
                     FROM unnest($2::int[], $3::bigint[]) AS u(p, e) \
                     WHERE l.partition = u.p AND l.epoch = u.e AND l.owner = $1 RETURNING l.partition",
                    &[&me.0, &parts, &epochs, &ttl_ms(ttl)],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .into_iter()
                .map(|r| PartitionId(r.get::<_, i32>(0) as u32))
                .collect())
        })
        .await
    }

    /// Hands a lease back at once (after its partition stopped serving).
    pub async fn release(&self, p: PartitionId, me: &InstanceId, epoch: u64) -> Result<(), String> {
        bounded("release a lease", async {
            let c = self.client().await?;
            c.execute(
                "UPDATE sagamq_leases SET expires_at = now() WHERE partition = $1 AND owner = $2 AND epoch = $3",
                &[&(p.0 as i32), &me.0, &(epoch as i64)],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    /// A partition's log image as the file log would hold it (file header,
    /// then every row's frames in key order).
    pub async fn load(&self, p: PartitionId) -> Result<(Vec<u8>, u64), String> {
        bounded("load a partition", async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT frames FROM sagamq_records WHERE partition = $1 ORDER BY epoch, lsn",
                    &[&(p.0 as i32)],
                )
                .await
                .map_err(db)?;
            let mut image = crate::log::empty_log();
            let n = rows.len() as u64;
            for r in rows {
                image.extend_from_slice(r.get::<_, &[u8]>(0));
            }
            Ok((image, n))
        })
        .await
    }

    /// Writes one batch of partition `p`'s rows, fenced by `(me, epoch)`.
    pub async fn write(
        &self,
        p: PartitionId,
        me: &InstanceId,
        epoch: u64,
        rows: &[RecordRow],
    ) -> Result<(), WriteError> {
        let r = tokio::time::timeout(DB_OP_TIMEOUT, async {
            let mut c = self.client().await.map_err(WriteError::Db)?;
            let tx = c.transaction().await.map_err(|e| WriteError::Db(db(e)))?;
            let part = p.0 as i32;
            let lease = tx
                .query_one(
                    "SELECT owner, epoch FROM sagamq_leases WHERE partition = $1 FOR SHARE",
                    &[&part],
                )
                .await
                .map_err(|e| WriteError::Db(db(e)))?;
            let owner: Option<String> = lease.get(0);
            let current = lease.get::<_, i64>(1) as u64;
            if owner.as_deref() != Some(me.0.as_str()) || current != epoch {
                return Err(WriteError::Fenced { owner, epoch: current });
            }
            let e = epoch as i64;
            for row in rows {
                let lsn = row.lsn as i64;
                if row.replaces {
                    tx.execute(
                        "DELETE FROM sagamq_records WHERE partition = $1 \
                         AND (epoch < $2 OR (epoch = $2 AND lsn < $3))",
                        &[&part, &e, &lsn],
                    )
                    .await
                    .map_err(|e| WriteError::Db(db(e)))?;
                }
                tx.execute(
                    "INSERT INTO sagamq_records (partition, epoch, lsn, frames) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (partition, epoch, lsn) DO NOTHING",
                    &[&part, &e, &lsn, &row.frames],
                )
                .await
                .map_err(|e| WriteError::Db(db(e)))?;
            }
            tx.commit()
                .await
                .map_err(|e| WriteError::Db(format!("COMMIT (outcome unknown): {e}")))
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => Err(WriteError::Db(format!(
                "no answer within {DB_OP_TIMEOUT:?} (outcome unknown)"
            ))),
        }
    }

    /// Rows of a partition (tests and `stats`).
    pub async fn record_rows(&self, p: PartitionId) -> Result<u64, String> {
        bounded("count rows", async {
            let c = self.client().await?;
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM sagamq_records WHERE partition = $1",
                    &[&(p.0 as i32)],
                )
                .await
                .map_err(db)?
                .get(0);
            Ok(n as u64)
        })
        .await
    }
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// The URL without its password, for error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{decode_all, encode_frame};

    fn frames(payloads: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_frame(p.as_bytes(), &mut out);
        }
        out
    }

    fn row(lsn: u64, payloads: &[&str], replaces: bool) -> RecordRow {
        RecordRow {
            lsn,
            frames: frames(payloads),
            replaces,
        }
    }

    async fn payloads(s: &Store, p: PartitionId) -> Vec<String> {
        let (image, _) = s.load(p).await.unwrap();
        decode_all(&image)
            .unwrap()
            .records
            .iter()
            .map(|(_, r)| String::from_utf8(r.to_vec()).unwrap())
            .collect()
    }

    async fn store(test: &str) -> Option<Store> {
        let url = super::super::testdb::fresh(test).await?;
        let s = Store::connect(&url, 4).unwrap();
        let meta = s.init(Some(2), "key-1").await.unwrap();
        assert_eq!(meta.partitions.count(), 2);
        Some(s)
    }

    /// Forces partition `p`'s lease to have expired (as if its owner stopped renewing).
    async fn expire(s: &Store, p: PartitionId) {
        let c = s.client().await.unwrap();
        c.execute(
            "UPDATE sagamq_leases SET expires_at = now() - interval '1 second' WHERE partition = $1",
            &[&(p.0 as i32)],
        )
        .await
        .unwrap();
    }

    const TTL: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_stale_owner_s_write_is_fenced_and_stores_nothing() {
        let Some(s) = store("fenced").await else { return };
        let (a, b) = (InstanceId("a".into()), InstanceId("b".into()));
        let p = PartitionId(0);
        let ea = s.acquire(p, &a, TTL).await.unwrap().expect("free lease");
        assert_eq!(s.acquire(p, &b, TTL).await.unwrap(), None, "a live lease is not taken");
        s.write(p, &a, ea, &[row(1, &["a1"], false)]).await.unwrap();
        expire(&s, p).await;
        let eb = s.acquire(p, &b, TTL).await.unwrap().expect("an expired lease is taken");
        assert_eq!(eb, ea + 1, "a takeover raises the epoch");
        let err = s.write(p, &a, ea, &[row(2, &["a2"], false)]).await.unwrap_err();
        assert_eq!(
            err,
            WriteError::Fenced {
                owner: Some("b".into()),
                epoch: eb
            }
        );
        assert!(s.renew(&a, &[(p, ea)], TTL).await.unwrap().is_empty(), "a cannot renew");
        // A stale compaction cannot delete either.
        assert!(s.write(p, &a, ea, &[row(3, &["snap"], true)]).await.is_err());
        s.write(p, &b, eb, &[row(1, &["b1"], false)]).await.unwrap();
        assert_eq!(
            payloads(&s, p).await,
            ["a1", "b1"],
            "in (epoch, lsn) order; a2 never stored"
        );
        assert_eq!(s.renew(&b, &[(p, eb)], TTL).await.unwrap(), [p].into());
    }

    #[tokio::test]
    async fn a_batch_written_again_after_an_unknown_outcome_is_stored_once() {
        let Some(s) = store("retry").await else { return };
        let a = InstanceId("a".into());
        let p = PartitionId(1);
        let e = s.acquire(p, &a, TTL).await.unwrap().unwrap();
        let batch = [row(1, &["x", "y"], false), row(2, &["z"], false)];
        s.write(p, &a, e, &batch).await.unwrap();
        // The COMMIT's answer was lost: the driver writes the same rows again.
        s.write(p, &a, e, &batch).await.unwrap();
        assert_eq!(payloads(&s, p).await, ["x", "y", "z"]);
        assert_eq!(s.record_rows(p).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn compaction_replaces_a_partition_s_rows_in_one_transaction() {
        let Some(s) = store("compact").await else { return };
        let a = InstanceId("a".into());
        let p = PartitionId(0);
        let e1 = s.acquire(p, &a, TTL).await.unwrap().unwrap();
        s.write(p, &a, e1, &[row(1, &["old1"], false)]).await.unwrap();
        expire(&s, p).await;
        let e2 = s.acquire(p, &a, TTL).await.unwrap().unwrap();
        s.write(p, &a, e2, &[row(1, &["old2"], false), row(2, &["old3"], false)])
            .await
            .unwrap();
        let compaction = [row(3, &["snapshot"], true), row(4, &["after"], false)];
        s.write(p, &a, e2, &compaction).await.unwrap();
        assert_eq!(payloads(&s, p).await, ["snapshot", "after"]);
        // Written again (unknown outcome): the same result.
        s.write(p, &a, e2, &compaction).await.unwrap();
        assert_eq!(payloads(&s, p).await, ["snapshot", "after"]);
        // The other partition is untouched.
        assert_eq!(s.record_rows(PartitionId(1)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_partition_count_and_signing_key_are_fixed_at_the_first_start() {
        let Some(s) = store("meta").await else { return };
        let meta = s.init(None, "key-2").await.unwrap();
        assert_eq!(meta.partitions.count(), 2, "kept");
        assert_eq!(meta.signing_key, "key-1", "the first key stays");
        let err = s.init(Some(4), "key-3").await.unwrap_err();
        assert!(err.contains("initialised with 2 partitions"), "{err}");
        let view = s.view(TTL).await.unwrap();
        assert_eq!(view.leases.len(), 2);
        assert!(view.leases.iter().all(|l| l.view.owner.is_none() && !l.view.live));
    }
}
