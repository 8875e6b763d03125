//! Where a stage keeps its deploy lock and journal: a small object store with
//! conditional writes. The local directory and S3 implement the same contract,
//! so the lock and journal logic is written once.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

/// Opaque version of an object, changed by every write.
pub type Etag = String;

/// When a write may happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Always.
    None,
    /// Only if the object does not exist (`If-None-Match: *`).
    IfAbsent,
    /// Only if the object is at this version (`If-Match: <etag>`).
    IfMatch(Etag),
}

/// A failed store operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The condition did not hold: someone else wrote first.
    #[error("precondition failed: the object changed or exists")]
    PreconditionFailed,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// An object's bytes and its version.
pub type Versioned = (Vec<u8>, Etag);

/// A conditional object store.
pub trait StateStore: Send + Sync {
    /// Where it is, for messages (`/var/lib/...`, `s3://bucket/prefix`).
    fn location(&self) -> String;
    /// An object and its version.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>, StoreError>>;
    /// Write an object if the condition holds; the new version.
    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        cond: Condition,
    ) -> BoxFuture<'a, Result<Etag, StoreError>>;
    /// Delete an object if it is at this version (or unconditionally); deleting
    /// a missing object succeeds when unconditional.
    fn delete<'a>(&'a self, key: &'a str, cond: Condition)
    -> BoxFuture<'a, Result<(), StoreError>>;
    /// Keys under a prefix, sorted.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
}

fn etag_of(body: &[u8]) -> Etag {
    hex::encode(&Sha256::digest(body)[..12])
}

/// A store in a local directory; conditions are checked under an exclusive
/// `flock`, so concurrent boxctl processes on one machine are serialised.
pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    /// A store rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalStore { dir: dir.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        if key.is_empty()
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(StoreError::Other(format!("invalid store key {key:?}")));
        }
        Ok(self.dir.join(key))
    }

    fn locked<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let io = |e: std::io::Error| StoreError::Other(format!("{}: {e}", self.dir.display()));
        fs::create_dir_all(&self.dir).map_err(io)?;
        let guard = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(".store.lock"))
            .map_err(io)?;
        let lock = nix::fcntl::Flock::lock(guard, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::Other(format!("flock {}: {e}", self.dir.display())))?;
        let out = f();
        drop(lock);
        out
    }

    fn read(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Other(format!("read {}: {e}", path.display()))),
        }
    }
}

/// Write a file atomically (temp file + rename) with the given mode.
pub fn write_atomic(path: &Path, body: &[u8], mode: u32) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    fs::rename(&tmp, path)
}

impl StateStore for LocalStore {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<(Vec<u8>, Etag)>, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            Ok(Self::read(&path)?.map(|b| {
                let e = etag_of(&b);
                (b, e)
            }))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        cond: Condition,
    ) -> BoxFuture<'a, Result<Etag, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            self.locked(|| {
                let current = Self::read(&path)?;
                match (&cond, &current) {
                    (Condition::IfAbsent, Some(_)) => return Err(StoreError::PreconditionFailed),
                    (Condition::IfMatch(_), None) => return Err(StoreError::PreconditionFailed),
                    (Condition::IfMatch(e), Some(b)) if &etag_of(b) != e => {
                        return Err(StoreError::PreconditionFailed);
                    }
                    _ => {}
                }
                write_atomic(&path, &body, 0o600)
                    .map_err(|e| StoreError::Other(format!("write {}: {e}", path.display())))?;
                Ok(etag_of(&body))
            })
        })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        cond: Condition,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            self.locked(|| {
                let current = Self::read(&path)?;
                match (&cond, &current) {
                    (Condition::IfMatch(_), None) => return Err(StoreError::PreconditionFailed),
                    (Condition::IfMatch(e), Some(b)) if &etag_of(b) != e => {
                        return Err(StoreError::PreconditionFailed);
                    }
                    (_, None) => return Ok(()),
                    _ => {}
                }
                fs::remove_file(&path)
                    .map_err(|e| StoreError::Other(format!("remove {}: {e}", path.display())))
            })
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut stack = vec![self.dir.clone()];
            while let Some(dir) = stack.pop() {
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(StoreError::Other(format!("list {}: {e}", dir.display())));
                    }
                };
                for entry in entries.flatten() {
                    let p = entry.path();
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('.') {
                        continue;
                    }
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(rel) = p.strip_prefix(&self.dir) {
                        let key = rel.to_string_lossy().to_string();
                        if key.starts_with(prefix) {
                            out.push(key);
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
    }
}

/// An in-memory store, for unit tests of the engine.
#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl StateStore for MemoryStore {
    fn location(&self) -> String {
        "memory".into()
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<(Vec<u8>, Etag)>, StoreError>> {
        let v = self.objects.lock().expect("store mutex").get(key).cloned();
        Box::pin(async move {
            Ok(v.map(|b| {
                let e = etag_of(&b);
                (b, e)
            }))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Vec<u8>,
        cond: Condition,
    ) -> BoxFuture<'a, Result<Etag, StoreError>> {
        let mut objects = self.objects.lock().expect("store mutex");
        let result = match (&cond, objects.get(key)) {
            (Condition::IfAbsent, Some(_)) | (Condition::IfMatch(_), None) => {
                Err(StoreError::PreconditionFailed)
            }
            (Condition::IfMatch(e), Some(b)) if &etag_of(b) != e => {
                Err(StoreError::PreconditionFailed)
            }
            _ => {
                let e = etag_of(&body);
                objects.insert(key.to_string(), body);
                Ok(e)
            }
        };
        Box::pin(async move { result })
    }

    fn delete<'a>(
        &'a self,
        key: &'a str,
        cond: Condition,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut objects = self.objects.lock().expect("store mutex");
        let result = match (&cond, objects.get(key)) {
            (Condition::IfMatch(_), None) => Err(StoreError::PreconditionFailed),
            (Condition::IfMatch(e), Some(b)) if &etag_of(b) != e => {
                Err(StoreError::PreconditionFailed)
            }
            _ => {
                objects.remove(key);
                Ok(())
            }
        };
        Box::pin(async move { result })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        let keys = self
            .objects
            .lock()
            .expect("store mutex")
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        Box::pin(async move { Ok(keys) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn contract(store: &dyn StateStore) {
        assert_eq!(store.get("lock.json").await.unwrap(), None);
        let e1 = store
            .put("lock.json", b"a".to_vec(), Condition::IfAbsent)
            .await
            .unwrap();
        assert_eq!(
            store
                .put("lock.json", b"b".to_vec(), Condition::IfAbsent)
                .await,
            Err(StoreError::PreconditionFailed)
        );
        let e2 = store
            .put("lock.json", b"b".to_vec(), Condition::IfMatch(e1.clone()))
            .await
            .unwrap();
        assert_eq!(
            store
                .put("lock.json", b"c".to_vec(), Condition::IfMatch(e1.clone()))
                .await,
            Err(StoreError::PreconditionFailed)
        );
        assert_eq!(
            store.get("lock.json").await.unwrap(),
            Some((b"b".to_vec(), e2.clone()))
        );
        assert_eq!(
            store.delete("lock.json", Condition::IfMatch(e1)).await,
            Err(StoreError::PreconditionFailed)
        );
        store
            .delete("lock.json", Condition::IfMatch(e2))
            .await
            .unwrap();
        assert_eq!(store.get("lock.json").await.unwrap(), None);
        store
            .put("journal/2", b"x".to_vec(), Condition::None)
            .await
            .unwrap();
        store
            .put("journal/1", b"x".to_vec(), Condition::None)
            .await
            .unwrap();
        store
            .put("other", b"x".to_vec(), Condition::None)
            .await
            .unwrap();
        assert_eq!(
            store.list("journal/").await.unwrap(),
            ["journal/1", "journal/2"]
        );
    }

    #[tokio::test]
    async fn local_store_honours_conditions() {
        let dir = tempfile::tempdir().unwrap();
        contract(&LocalStore::new(dir.path())).await;
        assert!(LocalStore::new(dir.path()).get("../escape").await.is_err());
    }

    #[tokio::test]
    async fn memory_store_honours_conditions() {
        contract(&MemoryStore::default()).await;
    }
}
