//! Watch end to end on three real nodes.
//!
//! - Failures: a library watcher and a `quiver kv watch --json` process watch a prefix from
//!   revision 1 while a writer makes puts and deletes (and writes outside the prefix) and
//!   each node in turn, the range's leader first, is killed (SIGKILL) and restarted.
//! - Splits: a library watcher of the whole collection and a CLI watcher of `k/`, started
//!   while the collection is one range, follow it while writes of 1 KiB values split it into
//!   at least three ranges (64 KiB split size), and as many changes again after.
//!
//! Both watchers must see every acknowledged change exactly once, with its acknowledged
//! revision, in order per key; writes whose outcome is unknown may appear, never twice;
//! nothing outside the watched keys appears. Also: `--count`, Ctrl-C, `--help`, one-line
//! errors.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::{Conn, WatchUpdate};
use common::*;
use proto::clientpb::{ClientRequest, ClientResponse_oneof_kind, WatchRequest};
use proto::kvpb;
use proto::metapb::Persistence;

/// One change as a watcher saw it: (type, key, value, mod revision).
type Seen = (String, String, String, u64);

/// One write of the writer.
#[derive(Debug, Clone)]
enum Op {
    Put {
        key: String,
        value: String,
        revision: u64,
    },
    /// `existed`: the acknowledged delete removed the key (so it made an event).
    Delete { key: String, existed: bool },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// The CLI watcher: a child process and the lines it printed so far.
struct CliWatcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl CliWatcher {
    fn start(args: &[&str]) -> CliWatcher {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start quiver kv watch");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        CliWatcher { child, lines }
    }

    fn seen(&self) -> Vec<Seen> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
                let s = |f: &str| v[f].as_str().unwrap_or_default().to_string();
                (
                    s("type").to_uppercase(),
                    s("key"),
                    s("value"),
                    v["mod_revision"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Ctrl-C: the process stops by itself with success.
    fn interrupt(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
        let deadline = std::time::Instant::now() + LONG;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(st.success(), "watcher exited with {st} after Ctrl-C");
                return;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("watcher did not stop on Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CliWatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails `verify` with a message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Checks what a watcher saw against the writer's log: every acknowledged change exactly
/// once with its revision, in order per key; unacknowledged writes at most once; nothing
/// else. `one_range`: the watched keys lie in one range, whose revisions order every change.
fn verify(
    who: &str,
    seen: &[Seen],
    acked: &[Op],
    unknown: &[Op],
    prefix: &str,
    one_range: bool,
) -> Result<(), String> {
    if one_range {
        ensure!(
            seen.windows(2).all(|w| w[0].3 < w[1].3),
            "{who}: revisions not strictly increasing (a change seen twice or out of order): {seen:?}"
        );
    }
    let mut by_key: HashMap<&str, Vec<&Seen>> = HashMap::new();
    for s in seen {
        ensure!(
            s.1.starts_with(prefix),
            "{who}: key outside the prefix: {s:?}"
        );
        by_key.entry(s.1.as_str()).or_default().push(s);
    }
    for (k, v) in &by_key {
        ensure!(
            v.windows(2).all(|w| w[0].3 < w[1].3),
            "{who}: changes of {k} repeated or out of order: {v:?}"
        );
    }
    let mut keys: Vec<&str> = acked.iter().chain(unknown).map(Op::key).collect();
    keys.sort_unstable();
    keys.dedup();
    for s in seen {
        ensure!(keys.contains(&s.1.as_str()), "{who}: never written: {s:?}");
    }
    for k in keys {
        let got = by_key.get(k).cloned().unwrap_or_default();
        let want: Vec<&Op> = acked
            .iter()
            .filter(|o| o.key() == k)
            .filter(|o| !matches!(o, Op::Delete { existed: false, .. }))
            .collect();
        let maybe: Vec<&Op> = unknown.iter().filter(|o| o.key() == k).collect();
        // The acknowledged changes are a subsequence of what was seen, in order.
        let mut it = got.iter();
        for w in &want {
            let found = it.by_ref().any(|s| match w {
                Op::Put {
                    value, revision, ..
                } => s.0 == "PUT" && &s.2 == value && s.3 == *revision,
                Op::Delete { .. } => s.0 == "DELETE",
            });
            ensure!(
                found,
                "{who}: acknowledged {w:?} missing, out of order or at another revision; seen for {k}: {got:?}"
            );
        }
        // What else was seen must be unacknowledged writes, each at most once.
        let puts_seen = got.iter().filter(|s| s.0 == "PUT").count();
        let dels_seen = got.iter().filter(|s| s.0 == "DELETE").count();
        let puts_want = want.iter().filter(|o| matches!(o, Op::Put { .. })).count();
        let dels_want = want.len() - puts_want;
        let puts_maybe = maybe.iter().filter(|o| matches!(o, Op::Put { .. })).count();
        let dels_maybe = maybe.len() - puts_maybe;
        ensure!(
            puts_seen <= puts_want + puts_maybe && dels_seen <= dels_want + dels_maybe,
            "{who}: more changes of {k} than written: {got:?}"
        );
        for s in got.iter().filter(|s| s.0 == "PUT") {
            let known = acked
                .iter()
                .chain(unknown)
                .any(|o| matches!(o, Op::Put { key, value, .. } if key == k && value == &s.2));
            ensure!(known, "{who}: a value never written: {s:?}");
        }
        let mut values: Vec<&str> = got
            .iter()
            .filter(|s| s.0 == "PUT")
            .map(|s| s.2.as_str())
            .collect();
        let n = values.len();
        values.sort_unstable();
        values.dedup();
        ensure!(values.len() == n, "{who}: a put of {k} seen twice: {got:?}");
    }
    Ok(())
}

/// Waits until both watchers' views pass [`verify`] (changes may still be on their way);
/// fails with the last complaint.
async fn check_watchers(
    lib: &Mutex<Vec<Seen>>,
    cli_w: &CliWatcher,
    acked: &[Op],
    unknown: &[Op],
    prefix: &str,
    one_range: bool,
) {
    let last = Mutex::new(String::new());
    let ok = cli::demo::wait_for(LONG, || async {
        let r = verify(
            "library watcher",
            &lib.lock().unwrap(),
            acked,
            unknown,
            prefix,
            one_range,
        )
        .and_then(|_| {
            verify(
                "quiver kv watch",
                &cli_w.seen(),
                acked,
                unknown,
                prefix,
                one_range,
            )
        });
        match r {
            Ok(()) => Some(()),
            Err(e) => {
                *last.lock().unwrap() = e;
                None
            }
        }
    })
    .await;
    assert!(ok.is_some(), "{}", last.lock().unwrap());
}

/// One write of the writer (op `i`): a put or a delete of `p/<i mod 7>`, and every tenth
/// op a put outside the watched prefix.
async fn write(feed: &client::Kv, i: usize, acked: &mut Vec<Op>, unknown: &mut Vec<Op>) {
    if i % 10 == 5 {
        let _ = feed.put(format!("q/{i}").as_bytes(), b"not watched").await;
    }
    let key = format!("p/{}", i % 7);
    if i % 4 == 3 {
        match feed.delete(key.as_bytes()).await {
            Ok(existed) => acked.push(Op::Delete { key, existed }),
            Err(e) => {
                eprintln!("delete {key}: {e}");
                unknown.push(Op::Delete { key, existed: true });
            }
        }
    } else {
        let value = format!("v{i}");
        match feed.put(key.as_bytes(), value.as_bytes()).await {
            Ok(revision) => acked.push(Op::Put {
                key,
                value,
                revision,
            }),
            Err(e) => {
                eprintln!("put {key}={value}: {e}");
                unknown.push(Op::Put {
                    key,
                    value,
                    revision: 0,
                });
            }
        }
    }
}

/// The revision node `i`'s replica of `range` has applied (a watch poll that does not wait).
async fn served_revision(
    c: &cli::demo::LocalCluster,
    i: usize,
    range: &proto::metapb::RangeDescriptor,
) -> Option<u64> {
    let conn = Conn::connect(c.clients([i])[0], Duration::from_secs(2))
        .await
        .ok()?;
    let mut w = WatchRequest::new();
    w.range = range.id;
    w.epoch = range.epoch;
    w.key = range.lo.clone();
    w.range_end = range.hi.clone();
    w.start_revision = 1;
    w.max_events = 1;
    let mut req = ClientRequest::new();
    req.set_watch(w);
    match tokio::time::timeout(Duration::from_secs(5), conn.call(req)).await {
        Ok(Ok(ClientResponse_oneof_kind::watch(r))) => Some(r.get_response().get_header().revision),
        _ => None,
    }
}

/// A library watcher on `prefix` from revision 1, collecting what it sees.
async fn lib_watcher(
    kv: &client::Kv,
    prefix: &[u8],
) -> (Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let mut w = kv.watch_prefix(prefix, 1).await.expect("watch");
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            match w.next().await {
                Ok(WatchUpdate::Events(evs)) => {
                    let mut l = s2.lock().unwrap();
                    for e in evs {
                        let t = if e.kind == kvpb::EventType::DELETE {
                            "DELETE"
                        } else {
                            "PUT"
                        };
                        l.push((
                            t.to_string(),
                            String::from_utf8_lossy(&e.kv.key).into_owned(),
                            String::from_utf8_lossy(&e.kv.value).into_owned(),
                            e.kv.mod_revision,
                        ));
                    }
                }
                Ok(u @ WatchUpdate::Resync { .. }) => panic!("no compaction here: {u:?}"),
                Err(e) => panic!("library watcher: {e}"),
            }
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_every_change_once_across_a_leader_kill() {
    let t0 = std::time::Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;

    let made = cl
        .create_collection(kv_spec("feed", Persistence::LOGGED, 64 << 20, 0))
        .await
        .expect("create feed");
    let feed = cl.kv("feed");
    first_put(&feed, b"outside", b"x").await;
    let range = wait_placed(&cl, made.id, 3)
        .await
        .into_iter()
        .next()
        .expect("the feed range");

    // Bad input and help, one line each.
    let (ok, _, err) = quiver(&["kv", "watch", "nosuch", "k", "--seeds", &seeds]);
    assert!(!ok && err.contains("no collection"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, _, err) = quiver(&["kv", "watch", "feed", "", "--seeds", &seeds]);
    assert!(!ok && err.contains("non-empty KEY"), "{err}");
    let (ok, out, _) = quiver(&["kv", "watch", "--help"]);
    for flag in [
        "--prefix",
        "--from-revision",
        "--count",
        "--json",
        "--seeds",
    ] {
        assert!(ok && out.contains(flag), "--help lacks {flag}: {out}");
    }

    // Both watchers from revision 1: they replay the history, then follow.
    let (lib_seen, lib_task) = lib_watcher(&feed, b"p/").await;
    let cli_w = CliWatcher::start(&[
        "kv",
        "watch",
        "feed",
        "p/",
        "--prefix",
        "--from-revision",
        "1",
        "--json",
        "--seeds",
        &seeds,
    ]);

    // The writer: puts and deletes on a few keys and writes outside the prefix, while each
    // node in turn, the range's leader first, is killed (SIGKILL) and restarted: whichever
    // replica a watcher polls is killed under it at least once.
    let leader = leader_index(&c, &feed, b"outside").await;
    let mut order = vec![leader];
    order.extend((0..3).filter(|i| *i != leader));
    let mut acked: Vec<Op> = Vec::new();
    let mut unknown: Vec<Op> = Vec::new();
    const PER_PHASE: usize = 40;
    for (phase, victim) in order.into_iter().enumerate() {
        eprintln!("killing node {victim}");
        c.kill(victim);
        for i in phase * PER_PHASE..(phase + 1) * PER_PHASE {
            write(&feed, i, &mut acked, &mut unknown).await;
        }
        eprintln!("restarting node {victim}");
        c.start(victim).expect("restart");
        let rev = acked
            .iter()
            .filter_map(|o| match o {
                Op::Put { revision, .. } => Some(*revision),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let back = cli::demo::wait_for(LONG, || async {
            (served_revision(&c, victim, &range).await? >= rev).then_some(())
        })
        .await;
        assert!(
            back.is_some(),
            "node {victim} never caught up to revision {rev}"
        );
    }
    // A last acknowledged put: both watchers must reach its revision.
    let mut attempt = 0;
    let last = loop {
        attempt += 1;
        let (key, value) = ("p/end".to_string(), format!("end{attempt}"));
        match feed.put(key.as_bytes(), value.as_bytes()).await {
            Ok(revision) => {
                acked.push(Op::Put {
                    key,
                    value,
                    revision,
                });
                break revision;
            }
            Err(e) => {
                assert!(attempt < 20, "the last put never succeeded: {e}");
                unknown.push(Op::Put {
                    key,
                    value,
                    revision: 0,
                });
            }
        }
    };
    eprintln!(
        "{} acknowledged, {} unknown outcomes, last revision {last}",
        acked.len(),
        unknown.len()
    );
    check_watchers(&lib_seen, &cli_w, &acked, &unknown, "p/", true).await;
    lib_task.abort();
    cli_w.interrupt();

    // --count: the first two changes of one key, as text (as the library watcher saw
    // them), then exit.
    let want: Vec<String> = lib_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.1 == "p/1")
        .take(2)
        .map(|(t, k, v, r)| {
            if t == "PUT" {
                format!("PUT {k} {v} (revision {r})")
            } else {
                format!("DELETE {k} (revision {r})")
            }
        })
        .collect();
    assert_eq!(want.len(), 2);
    let (ok, out, err) = quiver(&[
        "kv",
        "watch",
        "feed",
        "p/1",
        "--from-revision",
        "1",
        "--count",
        "2",
        "--seeds",
        &seeds,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "{out}");
    // A reader that goes away (`| head -1`): at its next change the watcher stops quietly,
    // no panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "kv",
            "watch",
            "feed",
            "p/",
            "--prefix",
            "--from-revision",
            "1",
            "--seeds",
            &seeds,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start quiver kv watch");
    {
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("a first line");
        assert!(first.starts_with("PUT p/"), "{first}");
    }
    // The next change it prints finds the pipe closed.
    feed.put(b"p/after", b"closed").await.expect("put");
    let child = Mutex::new(child);
    let exited = cli::demo::wait_for(LONG, || async {
        child.lock().unwrap().try_wait().ok().flatten()
    })
    .await;
    let mut child = child.into_inner().unwrap();
    let Some(status) = exited else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the watcher kept running after its reader went away");
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success() && err.is_empty(), "{status}: {err}");
    eprintln!("t60 took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_continues_across_range_splits() {
    let t0 = std::time::Instant::now();
    let (_c, _dir, cl, seeds) = ready_cluster(3).await;
    let made = cl
        .create_collection(kv_spec("grow", Persistence::LOGGED, 64 << 10, 0))
        .await
        .expect("create grow");
    let grow = cl.kv("grow");
    let first = first_put(&grow, b"k/first", b"x").await;

    // Watchers of the whole collection (library) and of k/ (CLI), from revision 1, started
    // while the collection is one range.
    let (lib_seen, lib_task) = lib_watcher(&grow, b"").await;
    let cli_w = CliWatcher::start(&[
        "kv",
        "watch",
        "grow",
        "k/",
        "--prefix",
        "--from-revision",
        "1",
        "--json",
        "--seeds",
        &seeds,
    ]);
    let ranges = || async {
        let s = cl.status().await.ok()?;
        Some(s.ranges.iter().filter(|r| r.collection == made.id).count())
    };
    // Puts of 1 KiB values and deletes until the collection split into at least 3 ranges,
    // then as many changes again on the daughters.
    let mut acked = vec![Op::Put {
        key: "k/first".into(),
        value: "x".into(),
        revision: first,
    }];
    let mut unknown: Vec<Op> = Vec::new();
    let pad = "p".repeat(1024);
    let mut i = 0;
    let mut split_at = None;
    while i < 3000 {
        if split_at.is_none() && i % 50 == 0 && ranges().await.unwrap_or(0) >= 3 {
            split_at = Some(i);
            eprintln!("{} ranges after {i} changes", ranges().await.unwrap_or(0));
        }
        if split_at.is_some_and(|s| i >= 2 * s) {
            break;
        }
        let key = format!("k/{:03}", (i * 37) % 251);
        if i % 5 == 4 {
            match grow.delete(key.as_bytes()).await {
                Ok(existed) => acked.push(Op::Delete { key, existed }),
                Err(e) => {
                    eprintln!("delete {key}: {e}");
                    unknown.push(Op::Delete { key, existed: true });
                }
            }
        } else {
            let value = format!("v{i}-{pad}");
            match grow.put(key.as_bytes(), value.as_bytes()).await {
                Ok(revision) => acked.push(Op::Put {
                    key,
                    value,
                    revision,
                }),
                Err(e) => {
                    eprintln!("put {key}: {e}");
                    unknown.push(Op::Put {
                        key,
                        value,
                        revision: 0,
                    });
                }
            }
        }
        i += 1;
    }
    assert!(
        split_at.is_some(),
        "the collection never split into 3 ranges"
    );
    eprintln!(
        "{} acknowledged, {} unknown outcomes, {} ranges",
        acked.len(),
        unknown.len(),
        ranges().await.unwrap_or(0)
    );
    check_watchers(&lib_seen, &cli_w, &acked, &unknown, "k/", false).await;
    lib_task.abort();
    cli_w.interrupt();
    eprintln!("t60 splits took {:?}", t0.elapsed());
}
