//! Crash tests on copies of the segment files (FAULTS.md 4, TESTING.md layer 3):
//!
//! (a) cut files (truncate, or zero to the end) at every byte offset across the last records of a
//!     small log, and at random offsets of random files of bigger logs;
//! (b) flip random bits and bytes;
//! (c) a power-loss model: durable image at the last sync, plus a random subset of the pages
//!     written since, some torn at 512-byte sector boundaries, and durable marks that may lag one
//!     sync behind;
//! plus a control showing the power-loss checker is not vacuous.
//!
//! Oracle for (a) and (b), on images of a cleanly closed log (exact durable marks). A successful
//! open must always return exactly the records before the first changed record: every synced record
//! the damage did not reach, nothing corrupt, nothing reordered. If no synced record and no segment
//! header changed, open must succeed. If one did, open must fail with `Error::Corrupt`, unless the
//! damage also destroyed the durable marks that vouch for it (zeros over the mark slot and the
//! records after it): then a clean cut at the first damaged record is also accepted, as the brief
//! allows ("a typed Corrupt error for mid-log damage, or a clean tail cut"). Seeds are printed on
//! failure; `SEED=n` reruns one.

mod common;

use common::{records, restore, scratch, snapshot, Image};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use seglog::{Config, Error, Position, SegLog, SyncMode};

const SEGMENT: u64 = 8192;
const HEADER: u64 = 1024;
const PAGE: usize = 4096;
const SECTOR: usize = 512;

fn config() -> Config {
    Config {
        segment_size: SEGMENT,
        max_record_size: 2048,
        sync: SyncMode::Data,
    }
}

fn seeds(default_count: u64, base: u64) -> Vec<u64> {
    match std::env::var("SEED") {
        Ok(s) => vec![s.parse().expect("SEED is a number")],
        Err(_) => (0..default_count).map(|i| base + i).collect(),
    }
}

fn seg_name(segment: u64) -> String {
    format!("{segment:020}.seg")
}

/// A cleanly closed log: `synced` records made durable, then `unsynced` more appended.
struct Built {
    image: Image,
    original: Vec<(Position, Vec<u8>)>,
    synced: usize,
}

fn random_payload(rng: &mut SmallRng, i: usize, big: bool) -> Vec<u8> {
    let len = if big && rng.gen_bool(0.15) {
        rng.gen_range(500..2000)
    } else {
        rng.gen_range(0..120)
    };
    common::payload(i, len)
}

fn build(rng: &mut SmallRng, synced: usize, unsynced: usize, big: bool) -> Built {
    let dir = scratch();
    let (log, _) = SegLog::open(dir.path(), config()).unwrap();
    let mut original = Vec::new();
    for i in 0..synced + unsynced {
        if i == synced {
            log.sync().unwrap();
        }
        let p = random_payload(rng, i, big);
        original.push((log.append(&p).unwrap(), p));
    }
    if unsynced == 0 {
        log.sync().unwrap();
    }
    drop(log);
    Built {
        image: snapshot(dir.path()),
        original,
        synced,
    }
}

/// Damage description for the oracle: (a synced record or a header changed, the durable marks
/// are intact, index of the first changed record).
fn damage_hits(built: &Built, damaged: &Image) -> (bool, bool, usize) {
    let mut header_hit = false;
    let mut marks_intact = true;
    for (name, old) in &built.image {
        match damaged.get(name) {
            None => header_hit = true,
            Some(new) => {
                if (new.len() as u64) < HEADER || new[..64] != old[..64] {
                    header_hit = true;
                }
                if new.len() < 528 || new[512..528] != old[512..528] {
                    marks_intact = false;
                }
            }
        }
    }
    let changed = |(pos, payload): &(Position, Vec<u8>)| {
        let name = seg_name(pos.segment);
        let (old, new) = (&built.image[&name], &damaged[&name]);
        let (a, b) = (pos.offset as usize, pos.offset as usize + 8 + payload.len());
        b > new.len() || old[a..b] != new[a..b]
    };
    let first_changed = built
        .original
        .iter()
        .position(changed)
        .unwrap_or(built.original.len());
    let synced_hit = first_changed < built.synced;
    (header_hit || synced_hit, marks_intact, first_changed)
}

/// Opens `damaged` and applies the oracle. Returns whether recovery cut a tail.
fn check_damaged(built: &Built, damaged: &Image, what: &str) -> Outcome {
    let (durable_hit, marks_intact, first_changed) = damage_hits(built, damaged);
    let must_fail = durable_hit && marks_intact;
    if std::env::var("DEBUG_IMG").is_ok() {
        for (n, b) in damaged {
            eprintln!("{n}: {} bytes (orig {})", b.len(), built.image[n].len());
        }
    }
    let dir = scratch();
    restore(dir.path(), damaged);
    match SegLog::open(dir.path(), config()) {
        Ok((log, rec)) => {
            assert!(!must_fail, "{what}: durable data or a header was damaged, but open succeeded: {rec:?}, {} records, {} synced, segments {:?}", records(&log).len(), built.synced, log.segments().iter().map(|s| s.number).collect::<Vec<_>>());
            let got = records(&log);
            assert!(
                got == built.original[..first_changed],
                "{what}: recovered {} records, expected the {first_changed} before the first damaged one",
                got.len()
            );
            // The repaired log is writable and stays consistent across another reopen.
            let p = log.append(b"after recovery").unwrap();
            log.sync().unwrap();
            drop(log);
            let (log, rec2) = SegLog::open(dir.path(), config()).unwrap();
            assert_eq!(
                rec2.torn_tail_bytes, 0,
                "{what}: second open found a torn tail"
            );
            assert_eq!(log.read(p).unwrap(), b"after recovery");
            assert_eq!(records(&log).len(), first_changed + 1);
            if rec.torn_tail_bytes > 0 || rec.removed_segments > 0 {
                Outcome::Cut
            } else {
                Outcome::Clean
            }
        }
        Err(Error::Corrupt { .. }) => {
            assert!(
                durable_hit,
                "{what}: Corrupt although no durable data or header was damaged"
            );
            Outcome::Corrupt
        }
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Outcome {
    Clean,
    Cut,
    Corrupt,
}

#[derive(Default, Debug)]
struct Tally {
    clean: usize,
    cut: usize,
    corrupt: usize,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Clean => self.clean += 1,
            Outcome::Cut => self.cut += 1,
            Outcome::Corrupt => self.corrupt += 1,
        }
    }
    fn total(&self) -> usize {
        self.clean + self.cut + self.corrupt
    }
}

fn truncate_file(img: &Image, name: &str, at: usize) -> Image {
    let mut d = img.clone();
    d.get_mut(name).unwrap().truncate(at);
    d
}

fn zero_from(img: &Image, name: &str, at: usize) -> Image {
    let mut d = img.clone();
    d.get_mut(name).unwrap()[at..].fill(0);
    d
}

/// (a) Every byte offset across the last 25 records (5 synced, 20 not) and a little beyond,
/// both as a truncated file and as zeros to the end of the file.
#[test]
fn cut_at_every_offset_of_the_last_records() {
    let mut rng = SmallRng::seed_from_u64(1);
    let built = build(&mut rng, 45, 20, false);
    let mut tally = Tally::default();
    let from = built.original.len() - 25;
    let mut cuts = Vec::new();
    for (pos, payload) in &built.original[from..] {
        for b in 0..8 + payload.len() as u64 {
            cuts.push((pos.segment, pos.offset + b));
        }
    }
    let (last, lp) = built.original.last().unwrap();
    for extra in 0..16 {
        cuts.push((last.segment, last.offset + 8 + lp.len() as u64 + extra));
    }
    for (segment, at) in cuts {
        let name = seg_name(segment);
        let at = at as usize;
        tally.add(check_damaged(
            &built,
            &truncate_file(&built.image, &name, at),
            &format!("truncate {name} at {at}"),
        ));
        tally.add(check_damaged(
            &built,
            &zero_from(&built.image, &name, at),
            &format!("zero {name} from {at}"),
        ));
    }
    println!("every-offset cuts: {tally:?}");
    assert!(
        tally.corrupt > 0 && tally.cut > 0,
        "both kinds of damage were exercised"
    );
}

/// (a) Random cuts in random files of multi-segment logs.
#[test]
fn cut_at_random_offsets() {
    let mut tally = Tally::default();
    for seed in seeds(40, 100) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let synced = rng.gen_range(0..60);
        let unsynced = rng.gen_range(0..60);
        let built = build(&mut rng, synced, unsynced, true);
        let names: Vec<String> = built.image.keys().cloned().collect();
        for _ in 0..10 {
            let name = &names[rng.gen_range(0..names.len())];
            let len = built.image[name].len();
            let at = rng.gen_range(0..=len);
            let d = if rng.gen_bool(0.5) {
                truncate_file(&built.image, name, at)
            } else {
                zero_from(&built.image, name, at)
            };
            tally.add(check_damaged(
                &built,
                &d,
                &format!("seed {seed}: cut {name} at {at}"),
            ));
        }
    }
    println!("random cuts: {tally:?}");
}

/// (b) Random bit flips and byte overwrites anywhere in the files (biased towards the used part).
#[test]
fn flip_random_bits_and_bytes() {
    let mut tally = Tally::default();
    for seed in seeds(60, 1000) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let synced = rng.gen_range(0..50);
        let unsynced = rng.gen_range(0..50);
        let built = build(&mut rng, synced, unsynced, true);
        let names: Vec<String> = built.image.keys().cloned().collect();
        for _ in 0..100 {
            let name = &names[rng.gen_range(0..names.len())];
            let file = &built.image[name];
            let used = file.iter().rposition(|&b| b != 0).unwrap_or(0) + 64;
            let at = rng.gen_range(0..used.min(file.len()));
            let mut d = built.image.clone();
            let f = d.get_mut(name).unwrap();
            if rng.gen_bool(0.8) {
                f[at] ^= 1 << rng.gen_range(0..8);
            } else {
                f[at] = rng.gen();
            }
            tally.add(check_damaged(
                &built,
                &d,
                &format!("seed {seed}: flip {name} byte {at}"),
            ));
        }
    }
    println!("flips: {tally:?}");
    assert!(tally.total() >= 6000 || std::env::var("SEED").is_ok());
}

/// One power loss: `base` is what is durable, `current` what the page cache holds. Every 4 KiB
/// page that differs reaches disk, or not, or torn at 512-byte sectors. Files absent from `base`
/// were created (header durable) after it.
fn crash_image(rng: &mut SmallRng, base: &Image, current: &Image) -> Image {
    let mut out = Image::new();
    for (name, cur) in current {
        let mut img = match base.get(name) {
            Some(b) => b.clone(),
            None => {
                let mut fresh = vec![0u8; cur.len()];
                fresh[..SECTOR].copy_from_slice(&cur[..SECTOR]); // header, fsynced at creation
                fresh
            }
        };
        img.resize(cur.len(), 0);
        for page in (0..cur.len()).step_by(PAGE) {
            let end = (page + PAGE).min(cur.len());
            if img[page..end] == cur[page..end] {
                continue;
            }
            match rng.gen_range(0..5) {
                0 | 1 => {}
                2 | 3 => img[page..end].copy_from_slice(&cur[page..end]),
                _ => {
                    for s in (page..end).step_by(SECTOR) {
                        if rng.gen_bool(0.5) {
                            let e = (s + SECTOR).min(end);
                            img[s..e].copy_from_slice(&cur[s..e]);
                        }
                    }
                }
            }
        }
        out.insert(name.clone(), img);
    }
    out
}

/// The mark slot (bytes 512..1024) of every file, taken from `older` with probability 1/2: the
/// marks written after the last sync may not have reached disk.
fn lag_marks(rng: &mut SmallRng, img: &mut Image, older: &Image) {
    for (name, bytes) in img.iter_mut() {
        if rng.gen_bool(0.5) {
            let old = older
                .get(name)
                .map(|o| o[512..1024].to_vec())
                .unwrap_or(vec![0; 512]);
            bytes[512..1024].copy_from_slice(&old);
        }
    }
}

/// Power-loss checker: open must succeed, every synced record must be back, and the log must be a
/// prefix of what was appended (unsynced records whole or gone, never corrupt, never reordered).
fn check_power_loss(
    img: &Image,
    original: &[(Position, Vec<u8>)],
    synced: usize,
) -> Result<usize, String> {
    let dir = scratch();
    restore(dir.path(), img);
    let (log, _) = SegLog::open(dir.path(), config()).map_err(|e| format!("open failed: {e}"))?;
    let got = records(&log);
    if got.len() < synced {
        return Err(format!(
            "lost synced records: {} of {synced} back",
            got.len()
        ));
    }
    if got.len() > original.len() || got[..] != original[..got.len()] {
        return Err("recovered records are not a prefix of the appended ones".into());
    }
    Ok(got.len() - synced)
}

struct PowerRun {
    /// Durable after the second-to-last sync.
    older: Image,
    /// Durable after the last sync.
    durable: Image,
    /// Page cache at the crash.
    current: Image,
    original: Vec<(Position, Vec<u8>)>,
    synced: usize,
}

fn power_run(rng: &mut SmallRng) -> PowerRun {
    let dir = scratch();
    let (log, _) = SegLog::open(dir.path(), config()).unwrap();
    let mut original = Vec::new();
    let mut append = |log: &SegLog, rng: &mut SmallRng, n: usize| {
        for _ in 0..n {
            let i = original.len();
            let p = random_payload(rng, i, true);
            original.push((log.append(&p).unwrap(), p));
        }
    };
    let a = rng.gen_range(0..30);
    append(&log, rng, a);
    log.sync().unwrap();
    let older = snapshot(dir.path());
    let b = rng.gen_range(1..30);
    append(&log, rng, b);
    log.sync().unwrap();
    let durable = snapshot(dir.path());
    let c = rng.gen_range(1..40);
    append(&log, rng, c);
    let current = snapshot(dir.path());
    drop(log);
    PowerRun {
        older,
        durable,
        current,
        synced: a + b,
        original,
    }
}

/// (c) 1,000 simulated power losses.
#[test]
fn power_loss_keeps_synced_records_and_a_clean_prefix() {
    let (mut partial, mut none, mut all) = (0, 0, 0);
    for seed in seeds(250, 50_000) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let run = power_run(&mut rng);
        let unsynced = run.original.len() - run.synced;
        for k in 0..4 {
            let mut img = crash_image(&mut rng, &run.durable, &run.current);
            lag_marks(&mut rng, &mut img, &run.older);
            match check_power_loss(&img, &run.original, run.synced) {
                Ok(0) => none += 1,
                Ok(n) if n == unsynced => all += 1,
                Ok(_) => partial += 1,
                Err(e) => panic!("seed {seed} crash {k}: {e}"),
            }
        }
    }
    println!("power losses: unsynced records kept: none {none}, some {partial}, all {all}");
    if std::env::var("SEED").is_err() {
        assert!(
            none > 0 && partial > 0 && all > 0,
            "the model produced every kind of outcome"
        );
    }
}

/// Control: the same checker on images that lack the last sync's pages (as if its msync never
/// happened) must notice lost records; otherwise the test above would prove nothing.
#[test]
fn power_loss_checker_catches_a_missing_sync() {
    let (mut caught, mut runs) = (0, 0);
    for seed in seeds(40, 90_000) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let run = power_run(&mut rng);
        for _ in 0..2 {
            runs += 1;
            let img = crash_image(&mut rng, &run.older, &run.current);
            if check_power_loss(&img, &run.original, run.synced).is_err() {
                caught += 1;
            }
        }
    }
    println!("missing-sync control: {caught} of {runs} crashes flagged");
    assert!(caught * 2 > runs, "checker flagged only {caught} of {runs}");
}
