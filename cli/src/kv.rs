//! `quiver create-collection` and `quiver kv get|put|del|cas|scan` (table or `--json`), and
//! `quiver kv watch` (one line per change until Ctrl-C or `--count`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use client::{Client, Expect};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use proto::kvpb;
use proto::metapb::{CollectionDescriptor, CollectionKind, Persistence, ReplicationMode};
use serde::Serialize;

use crate::CliError;

/// Seeds and output flags shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Client-port addresses of seed nodes, comma separated.
    #[arg(
        long,
        env = "QUIVER_CLIENT_SEEDS",
        value_delimiter = ',',
        required = true
    )]
    pub seeds: Vec<SocketAddr>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

impl ClientArgs {
    fn client(&self) -> Result<Client, CliError> {
        Ok(Client::new(
            self.seeds.clone(),
            Duration::from_secs(self.timeout_secs),
        )?)
    }
}

/// `quiver create-collection` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateCollectionArgs {
    /// The collection's name: 1 to 64 characters of [a-z0-9_-].
    pub name: String,
    /// Collection type (only `kv` exists yet).
    #[arg(long = "type", default_value = "kv")]
    pub kind: String,
    /// memory | logged | persistent.
    #[arg(long, default_value = "logged")]
    pub persistence: String,
    /// consensus | async.
    #[arg(long, default_value = "consensus")]
    pub replication: String,
    /// Replicas per range (1 to 15).
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Split a range past this size (e.g. 64MiB, 512KB, 1048576).
    #[arg(long, default_value = "64MiB")]
    pub split_size: String,
    /// Keep watch history this long (e.g. 7d, 12h, 30m, 90s; 0 = keep everything).
    #[arg(long, default_value = "0")]
    pub retention: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Parse `s` (of flag `--{flag}`) as a number with an optional unit from `units` (matched
/// case-insensitively, surrounding spaces ignored), times the unit's multiplier.
fn parse_with_units(
    s: &str,
    flag: &str,
    example: &str,
    units: &[(&str, u64)],
) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid --{flag} {s:?}: expected e.g. {example}"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let mult = units
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, m)| *m)
        .ok_or_else(|| format!("invalid --{flag} {s:?}: unknown unit {unit:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid --{flag} {s:?}: too large"))
}

/// Parse a size: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB; any case).
pub fn parse_size(s: &str) -> Result<u64, String> {
    const UNITS: &[(&str, u64)] = &[
        ("", 1),
        ("b", 1),
        ("k", 1000),
        ("kb", 1000),
        ("m", 1000 * 1000),
        ("mb", 1000 * 1000),
        ("g", 1000 * 1000 * 1000),
        ("gb", 1000 * 1000 * 1000),
        ("kib", 1 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
    ];
    let v = parse_with_units(s, "split-size", "64MiB", UNITS)?;
    if v == 0 {
        return Err("invalid --split-size: must be positive".into());
    }
    Ok(v)
}

/// Parse a duration in seconds: a number with an optional unit (s, m, h, d; any case).
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    const UNITS: &[(&str, u64)] = &[("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)];
    parse_with_units(s, "retention", "7d, 12h, 0", UNITS)
}

/// The descriptor `create-collection` asks for.
///
/// # Errors
/// A bad value, as one line.
pub fn spec(a: &CreateCollectionArgs) -> Result<CollectionDescriptor, String> {
    let mut d = CollectionDescriptor::new();
    d.name = a.name.clone();
    d.kind = match a.kind.as_str() {
        "kv" => CollectionKind::KV,
        k => return Err(format!("invalid --type {k:?}: only kv exists yet")),
    };
    d.persistence = match a.persistence.as_str() {
        "memory" => Persistence::MEMORY,
        "logged" => Persistence::LOGGED,
        "persistent" => Persistence::PERSISTENT,
        p => {
            return Err(format!(
                "invalid --persistence {p:?}: memory, logged or persistent"
            ))
        }
    };
    d.replication = match a.replication.as_str() {
        "consensus" => ReplicationMode::CONSENSUS,
        "async" => ReplicationMode::ASYNC,
        r => return Err(format!("invalid --replication {r:?}: consensus or async")),
    };
    if !(1..=15).contains(&a.replicas) {
        return Err(format!(
            "invalid --replicas {}: must be between 1 and 15",
            a.replicas
        ));
    }
    d.replication_factor = a.replicas;
    d.split_size = parse_size(&a.split_size)?;
    d.retention_secs = parse_duration_secs(&a.retention)?;
    Ok(d)
}

fn persistence_name(p: Persistence) -> &'static str {
    match p {
        Persistence::MEMORY => "memory",
        Persistence::LOGGED => "logged",
        Persistence::PERSISTENT => "persistent",
    }
}

/// How long `create-collection` waits for the new ranges' replicas before reporting.
const PLACEMENT_WAIT: Duration = Duration::from_secs(2);

/// `quiver create-collection`.
///
/// # Errors
/// Bad values, a duplicate name, unreachable seeds.
pub async fn create_collection(a: &CreateCollectionArgs) -> Result<(), CliError> {
    let d = spec(a).map_err(CliError::Msg)?;
    let c = a.client.client()?;
    let made = c.create_collection(d).await?;
    // Report the placement once every range has its replicas (members arrive by
    // self-assignment), or as it stands after a short wait.
    let placed = |st: &proto::clientpb::StatusReply| {
        st.ranges
            .iter()
            .filter(|r| r.collection == made.id)
            .map(|r| r.members.len())
            .min()
            .unwrap_or(0)
    };
    let full = made.replication_factor as usize;
    let settled = crate::demo::wait_for(PLACEMENT_WAIT, || async {
        let n = placed(&c.status().await.ok()?);
        (n >= full).then_some(n)
    })
    .await;
    let members = match settled {
        Some(n) => n,
        None => placed(&c.status().await?),
    };
    if a.client.json {
        let v = serde_json::json!({
            "name": made.name,
            "id": made.id,
            "persistence": persistence_name(made.persistence),
            "replication": if made.replication == ReplicationMode::ASYNC { "async" } else { "consensus" },
            "replicas": made.replication_factor,
            "split_size": made.split_size,
            "retention_secs": made.retention_secs,
            "members": members,
        });
        println!("{v}");
    } else {
        let under = if (members as u32) < made.replication_factor {
            format!(
                " (under-replicated so far: {members} of {} replicas placed)",
                made.replication_factor
            )
        } else {
            String::new()
        };
        println!(
            "collection {} created (id {}, {}, {} replicas){under}",
            made.name,
            made.id,
            persistence_name(made.persistence),
            made.replication_factor
        );
    }
    Ok(())
}

/// `quiver kv` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KvCommand {
    /// Read a key.
    Get {
        collection: String,
        key: String,
        /// Serve from any replica (may lag) instead of the leader.
        #[arg(long)]
        follower: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a key.
    Put {
        collection: String,
        key: String,
        value: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a key.
    Del {
        collection: String,
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Compare-and-swap: write VALUE if the key's value is --expect, its version is
    /// --expect-version, or it is absent (--expect-absent).
    Cas {
        collection: String,
        key: String,
        value: String,
        #[arg(long, conflicts_with_all = ["expect_version", "expect_absent"])]
        expect: Option<String>,
        #[arg(long, conflicts_with = "expect_absent")]
        expect_version: Option<u64>,
        #[arg(long)]
        expect_absent: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List keys in [START, END) (END omitted: to the end), or with --prefix.
    Scan {
        collection: String,
        #[arg(default_value = "")]
        start: String,
        #[arg(default_value = "")]
        end: String,
        #[arg(long, conflicts_with_all = ["start", "end"])]
        prefix: Option<String>,
        /// At most this many keys (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        follower: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the changes of KEY (or of every key starting with KEY, with --prefix), one line
    /// per change: type, key, value, mod revision. Runs until Ctrl-C or --count changes.
    /// Revisions are counted per range; within a range (so for each key) changes come in
    /// order, across ranges in arrival order.
    #[command(after_help = "Text lines: `PUT <key> <value> (revision N)`, \
`DELETE <key> (revision N)`; when the history from --from-revision is compacted: \
`RESYNC [start, end): K keys, continuing at revision N` followed by one \
`CURRENT <key> <value> (revision N)` line per key. With --json, one JSON object per line \
(\"type\": put | delete | resync). --timeout-secs bounds each request; the watch gives \
up with a one-line error when no replica of a range answers for three times that.")]
    Watch {
        /// The collection's name.
        collection: String,
        /// The key (with --prefix: the prefix; may be empty for the whole collection).
        key: String,
        /// Watch every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision (inclusive), replaying the history from there; 0: only
        /// changes from now on.
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Stop after this many changes (0: run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        count: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// One key as printed.
#[derive(Debug, Serialize)]
pub struct KvOut {
    pub key: String,
    pub value: String,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
}

fn out(kv: &kvpb::KeyValue) -> KvOut {
    KvOut {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: String::from_utf8_lossy(&kv.value).into_owned(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

fn table(kvs: &[KvOut]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["key", "value", "version", "mod rev", "create rev"]);
    for k in kvs {
        t.add_row([
            k.key.clone(),
            k.value.clone(),
            k.version.to_string(),
            k.mod_revision.to_string(),
            k.create_revision.to_string(),
        ]);
    }
    t.to_string()
}

/// Run one `quiver kv` subcommand.
///
/// # Errors
/// As one line: not found, bad input, unreachable cluster.
pub async fn run(cmd: &KvCommand) -> Result<(), CliError> {
    match cmd {
        KvCommand::Get {
            collection,
            key,
            follower,
            client,
        } => {
            let mut kv = client.client()?.kv(collection);
            if *follower {
                kv = kv.with_reads(client::ReadMode::Follower);
            }
            match kv.get(key.as_bytes()).await? {
                Some(v) => {
                    let o = out(&v);
                    if client.json {
                        println!("{}", serde_json::to_string(&o).unwrap_or_default());
                    } else {
                        println!("{}", o.value);
                    }
                    Ok(())
                }
                None => {
                    if client.json {
                        println!("null");
                        Ok(())
                    } else {
                        Err(CliError::Msg(format!("key {key:?} not found")))
                    }
                }
            }
        }
        KvCommand::Put {
            collection,
            key,
            value,
            client,
        } => {
            let rev = client
                .client()?
                .kv(collection)
                .put(key.as_bytes(), value.as_bytes())
                .await?;
            if client.json {
                println!("{}", serde_json::json!({ "revision": rev }));
            } else {
                println!("OK (revision {rev})");
            }
            Ok(())
        }
        KvCommand::Del {
            collection,
            key,
            client,
        } => {
            let existed = client
                .client()?
                .kv(collection)
                .delete(key.as_bytes())
                .await?;
            if client.json {
                println!("{}", serde_json::json!({ "deleted": existed }));
            } else if existed {
                println!("deleted");
            } else {
                println!("not found");
            }
            Ok(())
        }
        KvCommand::Cas {
            collection,
            key,
            value,
            expect,
            expect_version,
            expect_absent,
            client,
        } => {
            let e = match (expect, expect_version, expect_absent) {
                (Some(v), _, _) => Expect::Value(v.clone().into_bytes()),
                (_, Some(n), _) => Expect::Version(*n),
                (_, _, true) => Expect::Absent,
                _ => {
                    return Err(CliError::Msg(
                        "cas needs --expect VALUE, --expect-version N or --expect-absent".into(),
                    ))
                }
            };
            let r = client
                .client()?
                .kv(collection)
                .cas(key.as_bytes(), e, Some(value.as_bytes()))
                .await?;
            if client.json {
                let cur = r.current.as_ref().map(out);
                println!(
                    "{}",
                    serde_json::json!({ "succeeded": r.succeeded, "revision": r.revision, "current": cur })
                );
            } else if r.succeeded {
                println!("OK (revision {})", r.revision);
            } else {
                let cur = r
                    .current
                    .as_ref()
                    .map(|c| {
                        format!(
                            "{:?} (version {})",
                            String::from_utf8_lossy(&c.value),
                            c.version
                        )
                    })
                    .unwrap_or_else(|| "absent".into());
                return Err(CliError::Msg(format!(
                    "compare failed: current value is {cur}"
                )));
            }
            Ok(())
        }
        KvCommand::Scan {
            collection,
            start,
            end,
            prefix,
            limit,
            follower,
            client,
        } => {
            let (s, e) = match prefix {
                Some(p) => (
                    p.clone().into_bytes(),
                    meta::keys::prefix_end(p.as_bytes()).unwrap_or_default(),
                ),
                None => (start.clone().into_bytes(), end.clone().into_bytes()),
            };
            let mut kv = client.client()?.kv(collection);
            if *follower {
                kv = kv.with_reads(client::ReadMode::Follower);
            }
            let kvs: Vec<KvOut> = kv.scan(&s, &e, *limit).await?.iter().map(out).collect();
            if client.json {
                println!("{}", serde_json::to_string(&kvs).unwrap_or_default());
            } else if kvs.is_empty() {
                println!("(no keys)");
            } else {
                println!("{}", table(&kvs));
            }
            Ok(())
        }
        KvCommand::Watch {
            collection,
            key,
            prefix,
            from_revision,
            count,
            client,
        } => {
            tokio::select! {
                r = watch(collection, key, *prefix, *from_revision, *count, client) => r,
                _ = crate::stop_signal() => Ok(()),
            }
        }
    }
}

/// One watched change as printed with `--json`: its type and the key as [`KvOut`] prints it.
#[derive(Debug, Serialize)]
pub struct EventOut {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub kv: KvOut,
}

/// A text line of one change.
pub fn event_line(e: &client::WatchEvent) -> String {
    let key = String::from_utf8_lossy(&e.kv.key);
    if e.kind == kvpb::EventType::DELETE {
        format!("DELETE {key} (revision {})", e.kv.mod_revision)
    } else {
        format!(
            "PUT {key} {} (revision {})",
            String::from_utf8_lossy(&e.kv.value),
            e.kv.mod_revision
        )
    }
}

fn event_json(e: &client::WatchEvent) -> String {
    let o = EventOut {
        kind: if e.kind == kvpb::EventType::DELETE {
            "delete"
        } else {
            "put"
        },
        kv: out(&e.kv),
    };
    serde_json::to_string(&o).unwrap_or_default()
}

/// `quiver kv watch`: prints changes until `count` (0: forever).
async fn watch(
    collection: &str,
    key: &str,
    prefix: bool,
    from_revision: u64,
    count: u64,
    args: &ClientArgs,
) -> Result<(), CliError> {
    let kv = args.client()?.kv(collection);
    let mut w = if prefix {
        kv.watch_prefix(key.as_bytes(), from_revision).await?
    } else {
        if key.is_empty() {
            return Err(CliError::Msg(
                "watch needs a non-empty KEY (or --prefix)".into(),
            ));
        }
        kv.watch(key.as_bytes(), from_revision).await?
    };
    let mut seen = 0u64;
    let mut stdout = std::io::stdout();
    while count == 0 || seen < count {
        let update = w.next().await?;
        for (line, change) in render(&update, args.json) {
            if let Err(e) = writeln!(stdout, "{line}").and_then(|_| stdout.flush()) {
                // The reader went away (`| head`): stop quietly.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(CliError::Msg(format!("cannot write to stdout: {e}")));
            }
            seen += u64::from(change);
            if count != 0 && seen >= count {
                break;
            }
        }
    }
    Ok(())
}

/// The lines printed for one watch update, each with whether it is a change (counted by
/// `--count`; a resync's lines are not).
pub fn render(u: &client::WatchUpdate, json: bool) -> Vec<(String, bool)> {
    match u {
        client::WatchUpdate::Events(events) => events
            .iter()
            .map(|e| {
                let line = if json { event_json(e) } else { event_line(e) };
                (line, true)
            })
            .collect(),
        client::WatchUpdate::Resync {
            start,
            end,
            current,
            next_revision,
        } => {
            let (s, e) = (
                String::from_utf8_lossy(start).into_owned(),
                String::from_utf8_lossy(end).into_owned(),
            );
            if json {
                let cur: Vec<KvOut> = current.iter().map(out).collect();
                let v = serde_json::json!({
                    "type": "resync", "start": s, "end": e,
                    "next_revision": next_revision, "current": cur,
                });
                return vec![(v.to_string(), false)];
            }
            let mut lines = vec![(
                format!(
                    "RESYNC [{s:?}, {e:?}): {} keys, continuing at revision {next_revision}",
                    current.len()
                ),
                false,
            )];
            for kv in current {
                lines.push((
                    format!(
                        "CURRENT {} {} (revision {})",
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(&kv.value),
                        kv.mod_revision
                    ),
                    false,
                ));
            }
            lines
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_lines() {
        let mut kv = kvpb::KeyValue::new();
        kv.key = "k".into();
        kv.value = "v".into();
        kv.mod_revision = 7;
        kv.create_revision = 3;
        kv.version = 2;
        let put = client::WatchEvent {
            kind: kvpb::EventType::PUT,
            kv: kv.clone(),
        };
        let mut dk = kvpb::KeyValue::new();
        dk.key = "k".into();
        dk.mod_revision = 8;
        let del = client::WatchEvent {
            kind: kvpb::EventType::DELETE,
            kv: dk,
        };
        let u = client::WatchUpdate::Events(vec![put, del]);
        assert_eq!(
            render(&u, false),
            vec![
                ("PUT k v (revision 7)".to_string(), true),
                ("DELETE k (revision 8)".to_string(), true)
            ]
        );
        let j = render(&u, true);
        let v: serde_json::Value = serde_json::from_str(&j[0].0).unwrap();
        assert_eq!(v["type"], "put");
        assert_eq!(v["mod_revision"], 7);
        assert_eq!(v["version"], 2);
        let v: serde_json::Value = serde_json::from_str(&j[1].0).unwrap();
        assert_eq!(v["type"], "delete");
        let r = client::WatchUpdate::Resync {
            start: b"p/".to_vec(),
            end: Vec::new(),
            current: vec![kv],
            next_revision: 9,
        };
        assert_eq!(
            render(&r, false),
            vec![
                (
                    "RESYNC [\"p/\", \"\"): 1 keys, continuing at revision 9".to_string(),
                    false
                ),
                ("CURRENT k v (revision 7)".to_string(), false)
            ]
        );
        let j = render(&r, true);
        assert_eq!(j.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&j[0].0).unwrap();
        assert_eq!(v["type"], "resync");
        assert_eq!(v["next_revision"], 9);
        assert_eq!(v["current"][0]["key"], "k");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KB"), Ok(512_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration_secs("7d"), Ok(7 * 86400));
        assert_eq!(parse_duration_secs("0"), Ok(0));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert!(parse_duration_secs("3w").is_err());
        // Both take units in any case, with spaces around.
        assert_eq!(parse_duration_secs(" 2H "), Ok(7200));
        assert_eq!(parse_duration_secs("1 d"), Ok(86400));
        assert_eq!(parse_size(" 2 KiB "), Ok(2048));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert!(parse_size("5XB")
            .unwrap_err()
            .contains("invalid --split-size"));
        assert!(parse_duration_secs("x")
            .unwrap_err()
            .contains("invalid --retention"));
        assert!(parse_duration_secs(&format!("{}d", u64::MAX))
            .unwrap_err()
            .contains("too large"));
    }
}
