//! Key choice: uniform, or YCSB's zipfian over `records` keys.
//!
//! The zipfian generator is YCSB's `ZipfianGenerator` (Gray et al., "Quickly generating
//! billion-record synthetic databases", SIGMOD 1994) with its constant 0.99, and by default
//! scrambled as YCSB's `ScrambledZipfianGenerator` does (FNV-1a of the rank, modulo the record
//! count), so that the hot keys are spread over the key space instead of all being the lowest
//! ones, which would put them all in the first range.

use bytes::Bytes;
use rand::Rng;

/// YCSB's zipfian constant.
pub const ZIPFIAN_THETA: f64 = 0.99;

/// How a client picks the key of its next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDist {
    /// Every record equally likely.
    Uniform,
    /// YCSB's scrambled zipfian, theta 0.99.
    Zipfian,
}

impl std::str::FromStr for KeyDist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "zipfian" => Ok(Self::Zipfian),
            other => Err(format!(
                "unknown key distribution {other:?} (uniform or zipfian)"
            )),
        }
    }
}

impl std::fmt::Display for KeyDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uniform => "uniform",
            Self::Zipfian => "zipfian",
        })
    }
}

/// Zipfian ranks in `0..n`: rank 0 is the most popular. Immutable once built, so one instance
/// is shared by every client.
#[derive(Debug, Clone)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    /// `1 + 0.5^theta`: the cumulative weight of ranks 0 and 1, normalised by rank 0's.
    half_pow_theta: f64,
}

/// `sum_{i=1..=n} 1 / i^theta`.
pub fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipfian {
    /// A generator over `n >= 1` ranks with constant `theta` in `(0, 1)`.
    ///
    /// # Panics
    /// If `n == 0` or `theta` is outside `(0, 1)`.
    pub fn new(n: u64, theta: f64) -> Self {
        assert!(n >= 1, "zipfian over zero records");
        assert!(
            theta > 0.0 && theta < 1.0,
            "zipfian theta must be in (0, 1)"
        );
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Self {
            n,
            theta,
            alpha,
            zetan,
            eta,
            half_pow_theta: 1.0 + 0.5f64.powf(theta),
        }
    }

    /// Probability of rank `r` (0-based): `1 / ((r+1)^theta * zeta(n))`.
    pub fn probability(&self, rank: u64) -> f64 {
        1.0 / ((rank + 1) as f64).powf(self.theta) / self.zetan
    }

    /// Next rank, from one uniform draw.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        self.rank_of(rng.gen::<f64>())
    }

    /// The rank for the uniform draw `u` in `[0, 1)` (YCSB `nextLong`).
    pub fn rank_of(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < self.half_pow_theta {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

/// FNV-1a, 64 bit, over the little-endian bytes of `v` (YCSB `Utils.fnvhash64` hashes the
/// octets of the value, lowest first).
pub fn fnv1a64(v: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Picks record indexes in `0..records` with a [`KeyDist`].
#[derive(Debug, Clone)]
pub struct KeyChooser {
    records: u64,
    zipf: Option<Zipfian>,
}

impl KeyChooser {
    /// A chooser over `records >= 1` records.
    pub fn new(dist: KeyDist, records: u64) -> Self {
        let records = records.max(1);
        let zipf = match dist {
            KeyDist::Uniform => None,
            KeyDist::Zipfian => Some(Zipfian::new(records, ZIPFIAN_THETA)),
        };
        Self { records, zipf }
    }

    /// Next record index.
    pub fn next<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match &self.zipf {
            None => rng.gen_range(0..self.records),
            Some(z) => fnv1a64(z.sample(rng)) % self.records,
        }
    }
}

/// The key of record `i`: `k` and 10 decimal digits, so keys sort like their indexes.
pub fn key_of(i: u64) -> Bytes {
    Bytes::from(format!("k{i:010}"))
}

/// All keys `0..records`, built once so that choosing a key costs a reference count.
pub fn keyspace(records: u64) -> Vec<Bytes> {
    (0..records).map(key_of).collect()
}

/// A value of `size` bytes (printable, not all equal, so compression does not flatter).
pub fn value_of(size: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let v: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect();
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn zipfian_rank_frequencies_follow_the_law() {
        let n = 100_000;
        let z = Zipfian::new(n, ZIPFIAN_THETA);
        let mut rng = SmallRng::seed_from_u64(7);
        let draws = 400_000u64;
        let mut counts = vec![0u64; n as usize];
        for _ in 0..draws {
            let r = z.sample(&mut rng);
            assert!(r < n);
            counts[r as usize] += 1;
        }
        // Ranks 0 and 1 are exact in Gray's algorithm (within sampling noise); further ranks
        // come from its closed-form approximation, which YCSB accepts (rank 2 gets ~18% more).
        for (rank, approx) in [(0u64, 0.0), (1, 0.0), (2, 0.25), (9, 0.25), (99, 0.25)] {
            let expected = z.probability(rank) * draws as f64;
            let got = counts[rank as usize] as f64;
            let tol = approx * expected + 4.0 * expected.sqrt();
            assert!(
                (got - expected).abs() < tol,
                "rank {rank}: got {got}, expected {expected:.0}"
            );
        }
        // Heavy head: the 1% most popular keys get a large share (about 55% for theta 0.99
        // over 100K), and the head is ordered.
        let head: u64 = counts[..1000].iter().sum();
        let share = head as f64 / draws as f64;
        assert!((0.45..0.65).contains(&share), "top 1% share {share}");
        assert!(counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > counts[50]);
        // And a long tail is still reached.
        let tail: u64 = counts[n as usize / 2..].iter().sum();
        assert!(tail > 0);
    }

    #[test]
    fn zipfian_probabilities_sum_to_one() {
        let z = Zipfian::new(1000, ZIPFIAN_THETA);
        let s: f64 = (0..1000).map(|r| z.probability(r)).sum();
        assert!((s - 1.0).abs() < 1e-9);
    }

    #[test]
    fn zipfian_edges() {
        let z = Zipfian::new(1, ZIPFIAN_THETA);
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(z.rank_of(u), 0);
        }
        let z = Zipfian::new(10, ZIPFIAN_THETA);
        assert_eq!(z.rank_of(0.0), 0);
        assert!(z.rank_of(0.999_999_999) <= 9);
    }

    #[test]
    fn scrambled_zipfian_spreads_the_hot_keys_and_stays_in_range() {
        let records = 10_000;
        let c = KeyChooser::new(KeyDist::Zipfian, records);
        let mut rng = SmallRng::seed_from_u64(11);
        let mut counts = vec![0u64; records as usize];
        for _ in 0..200_000 {
            let k = c.next(&mut rng);
            assert!(k < records);
            counts[k as usize] += 1;
        }
        let hottest = counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map(|(i, _)| i);
        // The hottest key is rank 0's image under the hash, not key 0.
        assert_eq!(hottest, Some((fnv1a64(0) % records) as usize));
        // Skewed: the hottest key alone gets far more than a uniform share.
        assert!(counts[hottest.unwrap_or(0)] > 200_000 / records * 50);
    }

    #[test]
    fn uniform_covers_the_space() {
        let c = KeyChooser::new(KeyDist::Uniform, 100);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut seen = [false; 100];
        for _ in 0..10_000 {
            seen[c.next(&mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn keys_sort_like_indexes_and_values_have_their_size() {
        assert!(key_of(9) < key_of(10));
        assert_eq!(key_of(42).as_ref(), b"k0000000042");
        assert_eq!(value_of(256, 1).len(), 256);
        assert_eq!(value_of(4096, 2).len(), 4096);
    }
}
