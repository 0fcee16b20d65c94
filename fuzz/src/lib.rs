//! Helpers shared by the fuzz targets (generators of structured inputs and checks).

pub mod kv {
    //! KV commands generated from fuzzer bytes, and read-side invariants of a store.

    use arbitrary::Arbitrary;
    use bytes::Bytes;
    use collections::kv::{KeyRange, KvStore, ScanRequest};
    use proto::kvpb::{self, Command, CompareTarget};

    #[derive(Debug, Arbitrary)]
    pub enum Key {
        A,
        B,
        C,
        Ab,
        Empty,
        High,
        /// Around the 4 KiB key limit.
        Long(u8),
        Raw(Vec<u8>),
    }

    impl Key {
        pub fn bytes(&self) -> Bytes {
            match self {
                Key::A => Bytes::from_static(b"a"),
                Key::B => Bytes::from_static(b"b"),
                Key::C => Bytes::from_static(b"c"),
                Key::Ab => Bytes::from_static(b"ab"),
                Key::Empty => Bytes::new(),
                Key::High => Bytes::from_static(b"\xff\xff"),
                Key::Long(n) => Bytes::from(vec![b'k'; (4 << 10) - 2 + (*n as usize % 5)]),
                Key::Raw(v) => Bytes::from(v.clone()),
            }
        }
    }

    #[derive(Debug, Arbitrary)]
    pub enum Val {
        Small(u8),
        Raw(Vec<u8>),
        /// Around the 1.5 MiB value limit.
        Big(u8),
    }

    impl Val {
        pub fn bytes(&self) -> Bytes {
            match self {
                Val::Small(b) => Bytes::from(vec![*b]),
                Val::Raw(v) => Bytes::from(v.clone()),
                Val::Big(n) => Bytes::from(vec![b'v'; (3 << 19) - 2 + (*n as usize % 5)]),
            }
        }
    }

    #[derive(Debug, Arbitrary)]
    pub enum Op {
        Put {
            key: Key,
            value: Val,
            ttl_ms: u8,
            prev_kv: bool,
        },
        Delete {
            key: Key,
            range_end: Option<Key>,
            prev_kv: bool,
        },
        Cas {
            key: Key,
            target: u8,
            value: Val,
            number: u8,
            new_value: Val,
            delete: bool,
            ttl_ms: u8,
        },
        Batch(Vec<Op>),
        Expire {
            now_ms: u16,
        },
        Compact {
            revision: u8,
        },
        Get {
            key: Key,
        },
        Scan {
            start: Key,
            end: Option<Key>,
            limit: u8,
            max_bytes: u16,
            revision: u8,
            keys_only: bool,
        },
        Empty,
    }

    pub fn command(op: &Op) -> Command {
        let mut c = Command::new();
        match op {
            Op::Put {
                key,
                value,
                ttl_ms,
                prev_kv,
            } => {
                let mut p = kvpb::Put::new();
                p.key = key.bytes();
                p.value = value.bytes();
                p.ttl_ms = u64::from(*ttl_ms);
                p.prev_kv = *prev_kv;
                c.set_put(p);
            }
            Op::Delete {
                key,
                range_end,
                prev_kv,
            } => {
                let mut d = kvpb::Delete::new();
                d.key = key.bytes();
                d.range_end = range_end.as_ref().map(Key::bytes).unwrap_or_default();
                d.prev_kv = *prev_kv;
                c.set_delete(d);
            }
            Op::Cas {
                key,
                target,
                value,
                number,
                new_value,
                delete,
                ttl_ms,
            } => {
                let mut x = kvpb::Cas::new();
                x.key = key.bytes();
                x.target = match target % 4 {
                    0 => CompareTarget::VALUE,
                    1 => CompareTarget::VERSION,
                    2 => CompareTarget::MOD_REVISION,
                    _ => CompareTarget::ABSENT,
                };
                x.value = value.bytes();
                x.number = u64::from(*number);
                x.new_value = new_value.bytes();
                x.delete = *delete;
                x.ttl_ms = u64::from(*ttl_ms);
                c.set_cas(x);
            }
            Op::Batch(ops) => {
                let mut b = kvpb::Batch::new();
                for o in ops.iter().take(64) {
                    b.ops.push(command(o));
                }
                c.set_batch(b);
            }
            Op::Expire { now_ms } => {
                let mut e = kvpb::Expire::new();
                e.now_ms = u64::from(*now_ms);
                c.set_expire(e);
            }
            Op::Compact { revision } => {
                let mut x = kvpb::Compact::new();
                x.revision = u64::from(*revision);
                c.set_compact(x);
            }
            Op::Get { key } => {
                let mut g = kvpb::Get::new();
                g.key = key.bytes();
                c.set_get(g);
            }
            Op::Scan {
                start,
                end,
                limit,
                max_bytes,
                revision,
                keys_only,
            } => {
                let mut s = kvpb::Scan::new();
                s.start = start.bytes();
                s.end = end.as_ref().map(Key::bytes).unwrap_or_default();
                s.limit = u64::from(*limit);
                s.max_bytes = u64::from(*max_bytes);
                s.revision = u64::from(*revision);
                s.keys_only = *keys_only;
                c.set_scan(s);
            }
            Op::Empty => {}
        }
        c
    }

    /// Read-side invariants: keys ascending, create <= mod <= revision, version >= 1, get = scan.
    pub fn check_reads(store: &KvStore, now_ms: u64) {
        let r = store.reader();
        let rev = r.revision();
        let all = r
            .scan_all(ScanRequest::range(KeyRange::all()), now_ms)
            .expect("memory scan");
        for w in all.windows(2) {
            assert!(w[0].key < w[1].key, "scan keys not ascending");
        }
        for kv in all.iter().take(16) {
            assert!(kv.create_revision <= kv.mod_revision, "{kv:?}");
            assert!(kv.mod_revision <= rev, "{kv:?} above revision {rev}");
            assert!(kv.version >= 1, "{kv:?}");
            let (got, _) = r.get(&kv.key, now_ms).expect("memory get");
            assert_eq!(got.as_ref(), Some(kv), "get disagrees with scan");
        }
    }
}

/// Whether the known bug `name` is tolerated in this run: `QUIVER_FUZZ_ALLOW=name1,name2`.
///
/// A target checks each property that a known, reported bug breaks through this switch, so the
/// bug fails the target by default (it doubles as a regression check) while a long run can
/// still look for other bugs. Names are listed in docs/fuzzing.md.
pub fn allowed(name: &str) -> bool {
    static ALLOW: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ALLOW
        .get_or_init(|| {
            std::env::var("QUIVER_FUZZ_ALLOW")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|a| a == name)
}
