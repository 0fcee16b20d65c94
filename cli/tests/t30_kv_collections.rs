//! KV collections end to end on three real nodes: create-collection (validated, duplicate
//! refused), members placed by self-assignment, put/get/cas/scan/del through every seed
//! (redirects to the range leader), follower reads, a restarted node reads back a `logged`
//! and a `persistent` collection, typed one-line errors for bad input.

mod common;

use std::time::Duration;

use client::{ClientError, Expect, ReadMode};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_collection_on_three_nodes_with_restart_and_bad_input() {
    let t0 = std::time::Instant::now();
    let (mut c, _dir, cl, seeds) = ready_cluster(3).await;

    // create-collection through the CLI, both persistent modes that survive restarts.
    let (ok, out, err) = quiver(&[
        "create-collection",
        "users",
        "--persistence",
        "logged",
        "--replicas",
        "3",
        "--split-size",
        "64MiB",
        "--retention",
        "1d",
        "--seeds",
        &seeds,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("collection users created"), "{out}");
    let (ok, out, err) = quiver(&[
        "create-collection",
        "blobs",
        "--persistence",
        "persistent",
        "--replicas",
        "3",
        "--json",
        "--seeds",
        &seeds,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["name"], "blobs", "{out}");
    assert!(
        v["id"].as_u64().unwrap_or(0) > 1,
        "the stored id is reported: {out}"
    );
    // Errors: duplicate, bad values; one line each.
    for (args, want) in [
        (vec!["create-collection", "users"], "already exists"),
        (
            vec!["create-collection", "x", "--persistence", "disk"],
            "invalid --persistence",
        ),
        (
            vec!["create-collection", "x", "--replicas", "0"],
            "invalid --replicas",
        ),
        (
            vec!["create-collection", "x", "--split-size", "12XB"],
            "invalid --split-size",
        ),
        (vec!["create-collection", "Bad Name"], "invalid name"),
    ] {
        let mut a = args.clone();
        a.extend(["--seeds", &seeds]);
        let (ok, _, err) = quiver(&a);
        assert!(!ok, "{a:?} should fail");
        assert!(err.contains(want), "{a:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    let users = cl.kv("users");
    // Wait for the range to be placed and led, then check placement in meta.
    first_put(&users, b"k0", b"v0").await;
    let uid = cl
        .status()
        .await
        .unwrap()
        .ranges
        .iter()
        .filter(|r| r.collection != meta::META_COLLECTION)
        .map(|r| r.collection)
        .min()
        .unwrap();
    wait_placed(&cl, uid, 3).await;

    // Through every seed: a client that knows only that seed follows redirects.
    for i in 0..3 {
        let one = client_of(&c, &[i]).kv("users");
        let key = format!("seed{i}");
        one.put(key.as_bytes(), b"x").await.unwrap();
        let got = one.get(key.as_bytes()).await.unwrap().unwrap();
        assert_eq!(got.value.as_ref(), b"x");
        assert_eq!(got.version, 1);
        let f = one.clone().with_reads(ReadMode::Follower);
        let _ = f.get(b"k0").await.unwrap();
    }
    // cas on value and on version.
    let r = users
        .cas(b"k0", Expect::Value(b"v0".to_vec()), Some(b"v1"))
        .await
        .unwrap();
    assert!(r.succeeded);
    let r = users
        .cas(b"k0", Expect::Value(b"v0".to_vec()), Some(b"v2"))
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.current.unwrap().value.as_ref(), b"v1");
    let r = users
        .cas(b"k0", Expect::Version(2), Some(b"v3"))
        .await
        .unwrap();
    assert!(r.succeeded);
    let r = users.cas(b"new", Expect::Absent, Some(b"n")).await.unwrap();
    assert!(r.succeeded);
    // scan equals the model.
    for i in 0..30 {
        users
            .put(format!("p/{i:02}").as_bytes(), format!("{i}").as_bytes())
            .await
            .unwrap();
    }
    let all = users.scan(b"p/", b"p0", 0).await.unwrap();
    assert_eq!(all.len(), 30);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(users.scan(b"p/", b"p0", 7).await.unwrap().len(), 7);
    assert!(users.delete(b"new").await.unwrap());
    assert!(users.get(b"new").await.unwrap().is_none());
    // A memory collection: served while a member restarts (the restarted member's replica
    // is lost and not served there; the others keep the range).
    let (ok, _, err) = quiver(&[
        "create-collection",
        "cache",
        "--persistence",
        "memory",
        "--replicas",
        "3",
        "--seeds",
        &seeds,
    ]);
    assert!(ok, "{err}");
    // More replicas than nodes: created, and reported under-replicated.
    let (ok, out, err) = quiver(&[
        "create-collection",
        "wide",
        "--replicas",
        "5",
        "--seeds",
        &seeds,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("under-replicated so far"), "{out}");
    let table = cli::demo::wait_for(LONG, || async {
        let (_, t, _) = quiver(&["status", "--seeds", &seeds]);
        t.contains("under-replicated (3/5)").then_some(t)
    })
    .await;
    let table = table.expect("status never showed the wide collection at 3/5");
    // The ranges table names each range's collection (meta's own as `meta`).
    let row = |label: &str| {
        table
            .lines()
            .find(|l| l.split(['│', '┆']).nth(2).map(str::trim) == Some(label))
    };
    let wide = row("wide").unwrap_or_else(|| panic!("no range of `wide`:\n{table}"));
    assert!(wide.contains("under-replicated (3/5)"), "{wide}");
    assert!(row("users").is_some(), "no range of `users`:\n{table}");
    assert!(row("meta").is_some(), "no range of `meta`:\n{table}");
    let cache = cl.kv("cache");
    first_put(&cache, b"m", b"mem").await;
    first_put(&cl.kv("blobs"), b"b", b"big").await;

    // CLI: put/get/cas/scan/del, table and JSON, one-line errors.
    let (ok, out, err) = quiver(&["kv", "put", "users", "cli", "hello", "--seeds", &seeds]);
    assert!(ok && out.starts_with("OK"), "{out}{err}");
    let (ok, out, err) = quiver(&["kv", "get", "users", "cli", "--seeds", &seeds]);
    assert!(ok && out.trim() == "hello", "{out}{err}");
    let (ok, out, _) = quiver(&["kv", "get", "users", "cli", "--json", "--seeds", &seeds]);
    assert!(ok && out.contains("\"version\":1"), "{out}");
    let (ok, _, err) = quiver(&[
        "kv", "cas", "users", "cli", "x", "--expect", "nope", "--seeds", &seeds,
    ]);
    assert!(!ok && err.contains("compare failed"), "{err}");
    let (ok, out, err) = quiver(&[
        "kv", "scan", "users", "--prefix", "p/", "--limit", "3", "--seeds", &seeds,
    ]);
    assert!(
        ok && out.contains("p/02") && !out.contains("p/03"),
        "{out}{err}"
    );
    let (ok, out, _) = quiver(&["kv", "del", "users", "cli", "--seeds", &seeds]);
    assert!(ok && out.contains("deleted"), "{out}");
    let (ok, _, err) = quiver(&["kv", "get", "users", "cli", "--seeds", &seeds]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, err) = quiver(&["kv", "get", "nosuch", "k", "--seeds", &seeds]);
    assert!(!ok && err.contains("no collection"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Limits: typed errors.
    let big = vec![b'k'; 5000];
    match users.put(&big, b"v").await {
        Err(ClientError::TooLarge(_)) => {}
        other => panic!("oversized key: {other:?}"),
    }
    match users.put(b"", b"v").await {
        Err(ClientError::InvalidArgument { .. }) => {}
        other => panic!("empty key: {other:?}"),
    }

    // quiver bench drives the Quiver backend through the client.
    let (ok, out, err) = quiver(&[
        "bench",
        "--seeds",
        &seeds,
        "--collection",
        "blobs",
        "-w",
        "W1",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--records",
        "100",
        "--connections",
        "1",
        "--clients",
        "2",
        "--no-progress",
        "--format",
        "json",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("\"backend\":\"quiver\"") && out.contains("\"errors\":0"),
        "{out}"
    );

    // Restart a node: it reads back both collections from its data dir.
    let victim = 2;
    assert!(c.terminate(victim, Duration::from_secs(10)));
    users.put(b"during", b"down").await.unwrap();
    c.start(victim).unwrap();
    // Only reads the restarted node served count (follower reads go round robin).
    let f = client_of(&c, &[victim]);
    let node = c.clients([victim])[0];
    for (coll, key, want) in [
        ("users", &b"during"[..], &b"down"[..]),
        ("users", b"k0", b"v3"),
        ("blobs", b"b", b"big"),
    ] {
        if !served_by(&f.kv(coll), key, node, want).await {
            let st = cl.status().await.map(|s| s.ranges.into_vec());
            panic!("restarted node never served {coll}/{key:?}; ranges in meta: {st:?}");
        }
    }
    let m = cli::demo::wait_for(LONG, || async { cache.get(b"m").await.ok()? }).await;
    assert_eq!(m.unwrap().value.as_ref(), b"mem");
    // Crash (SIGKILL) another node: it replays its raft log over the last persisted state.
    c.kill(0);
    // The client resends a write whose answer the kill cut (same request id); if its budget
    // runs out while the survivors elect a leader it answers UnknownOutcome, Timeout or
    // Unavailable. A put of the same value is safe to repeat here; anything else is a bug.
    let put = cli::demo::wait_for(LONG, || async {
        match users.put(b"crash", b"after").await {
            Ok(_) => Some(()),
            Err(
                e @ (ClientError::UnknownOutcome(_)
                | ClientError::Timeout
                | ClientError::Unavailable(_)
                | ClientError::NotLeader(_)
                | ClientError::ConnectionLost(_)
                | ClientError::Connect { .. }),
            ) => {
                eprintln!("put after kill: {e}; repeating");
                None
            }
            Err(e) => panic!("put after kill: {e}"),
        }
    })
    .await;
    assert!(put.is_some());
    c.start(0).unwrap();
    let f = client_of(&c, &[0]);
    let node = c.clients([0])[0];
    for (coll, key, want) in [
        ("users", &b"crash"[..], &b"after"[..]),
        ("users", b"p/29", b"29"),
        ("blobs", b"b", b"big"),
    ] {
        assert!(
            served_by(&f.kv(coll), key, node, want).await,
            "node killed with SIGKILL never served {coll}/{key:?} again"
        );
    }
    eprintln!("t30 took {:?}", t0.elapsed());
}
