//! Write-once load and read-back for the node-level crash tests (`tests/crash_all_nodes.rs`,
//! `tests/storage_damage.rs`).
//!
//! Every key is written once, with a value unique to it, so the check needs no model: after the
//! crash every acknowledged key must hold exactly its value; a key whose write's outcome was
//! unknown may hold its value or nothing, never anything else.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::ClientError;
use parking_lot::Mutex;

/// One write: collection, key, value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub collection: String,
    pub key: String,
    pub value: String,
}

/// What the load wrote, by outcome.
#[derive(Debug, Default, Clone)]
pub struct Writes {
    pub acked: Vec<Write>,
    pub unknown: Vec<Write>,
    /// Writes that definitely failed (not checked).
    pub failed: usize,
}

/// A failed write whose outcome is unknown (it may have applied).
pub fn outcome_unknown(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::UnknownOutcome(_)
            | ClientError::Timeout
            | ClientError::ConnectionLost(_)
            | ClientError::Protocol(_)
    )
}

/// Start `clients` writers of fresh keys (`<tag>-w<client>-<n>`, spread over `collections`)
/// through clients of `seeds`, until `stop` is set; they record into `out`. Await the returned
/// set to wait for them.
pub fn write_once(
    seeds: Vec<SocketAddr>,
    collections: Vec<String>,
    clients: usize,
    tag: &str,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Writes>>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..clients {
        let cl = client::Client::new(seeds.clone(), Duration::from_secs(2)).expect("client");
        let (collections, stop, out, tag) = (
            collections.clone(),
            stop.clone(),
            out.clone(),
            tag.to_string(),
        );
        set.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let coll = &collections[n % collections.len()];
                let key = format!("{tag}-w{w}-{n}");
                let value = format!("{key}-v");
                let r = cl.kv(coll).put(key.as_bytes(), value.as_bytes()).await;
                let write = Write {
                    collection: coll.clone(),
                    key,
                    value,
                };
                match r {
                    Ok(_) => out.lock().acked.push(write),
                    Err(e) => {
                        if outcome_unknown(&e) {
                            out.lock().unknown.push(write);
                        } else {
                            out.lock().failed += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    set
}

/// A running [`write_once`] load.
pub struct Load {
    stop: Arc<AtomicBool>,
    writers: tokio::task::JoinSet<()>,
}

impl Load {
    /// Start [`write_once`] and wait until at least `min_new` more writes are acknowledged in
    /// `out` than when it started (up to 60 s).
    ///
    /// # Panics
    /// Fewer acknowledged within 60 s.
    pub async fn start_until_acked(
        seeds: Vec<SocketAddr>,
        collections: Vec<String>,
        clients: usize,
        tag: &str,
        out: &Arc<Mutex<Writes>>,
        min_new: usize,
    ) -> Load {
        let before = out.lock().acked.len();
        let stop = Arc::new(AtomicBool::new(false));
        let writers = write_once(seeds, collections, clients, tag, stop.clone(), out.clone());
        let loaded = crate::cluster::wait_for(Duration::from_secs(60), || {
            let w = out.clone();
            async move { (w.lock().acked.len() >= before + min_new).then_some(()) }
        })
        .await;
        assert!(loaded.is_some(), "{tag}: too few writes acknowledged");
        Load { stop, writers }
    }

    /// Stop the writers and wait for them.
    ///
    /// # Panics
    /// A writer panicked (its panic goes on).
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        crate::join_all(&mut self.writers).await;
    }
}

/// What reading back found.
#[derive(Debug, Default, Clone)]
pub struct ReadBack {
    /// Acknowledged keys read back.
    pub acked_checked: usize,
    /// Acknowledged keys found absent.
    pub missing: Vec<Write>,
    /// Keys holding a value no write of that key wrote.
    pub wrong: Vec<(Write, Option<String>)>,
    /// Unknown-outcome writes found applied.
    pub unknown_applied: usize,
    /// Keys that could not be read within the deadline.
    pub unread: Vec<Write>,
}

impl ReadBack {
    /// Nothing missing, nothing wrong, everything read.
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.wrong.is_empty() && self.unread.is_empty()
    }
}

async fn read_one(cl: &client::Client, w: &Write, within: Duration) -> Option<Option<String>> {
    let deadline = Instant::now() + within;
    loop {
        match cl.kv(&w.collection).get(w.key.as_bytes()).await {
            Ok(v) => return Some(v.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return None,
        }
    }
}

/// Read back every write of `w` with linearizable reads (8 readers), each key retried for up
/// to 20 s.
pub async fn read_back(seeds: Vec<SocketAddr>, w: &Writes) -> ReadBack {
    let mut work: Vec<(Write, bool)> = w.acked.iter().map(|x| (x.clone(), true)).collect();
    work.extend(w.unknown.iter().map(|x| (x.clone(), false)));
    let work = Arc::new(Mutex::new(work));
    let result = Arc::new(Mutex::new(ReadBack::default()));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let cl = client::Client::new(seeds.clone(), Duration::from_secs(2)).expect("client");
        let (work, result) = (work.clone(), result.clone());
        set.spawn(async move {
            loop {
                let Some((w, acked)) = work.lock().pop() else {
                    return;
                };
                let got = read_one(&cl, &w, Duration::from_secs(20)).await;
                let mut r = result.lock();
                match got {
                    None => r.unread.push(w),
                    Some(Some(v)) if v == w.value => {
                        if acked {
                            r.acked_checked += 1;
                        } else {
                            r.unknown_applied += 1;
                        }
                    }
                    Some(None) if acked => {
                        r.acked_checked += 1;
                        r.missing.push(w);
                    }
                    Some(None) => {}
                    Some(other) => {
                        if acked {
                            r.acked_checked += 1;
                        }
                        r.wrong.push((w, other));
                    }
                }
            }
        });
    }
    crate::join_all(&mut set).await;
    let r = result.lock().clone();
    r
}
