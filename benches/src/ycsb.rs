//! The YCSB core workloads: key choice distributions, operation mixes and
//! record layout, as the Yahoo! Cloud Serving Benchmark defines them.
//!
//! - Keys are `user` followed by the FNV-1a hash of the record number, so
//!   records inserted in order land all over the key space (YCSB's default
//!   `insertorder=hashed`).
//! - [`Zipfian`] draws popular items with the algorithm of Gray et al.
//!   ("Quickly generating billion-record synthetic databases"), constant 0.99;
//!   [`ScrambledZipfian`] spreads the popular items over the key space by
//!   hashing; [`Latest`] favours the most recently inserted records.
//! - A record holds `field_count` fields of `field_length` bytes, stored as
//!   one value (neither lmskv nor etcd has columns), so a read returns all
//!   fields and an update writes the whole record.

use bytes::Bytes;
use rand::Rng;

/// YCSB's Zipfian constant.
pub const ZIPFIAN_CONSTANT: f64 = 0.99;
/// Size of the item space the scrambled Zipfian draws from before hashing
/// into the record count (YCSB uses ten billion).
pub const SCRAMBLED_ITEM_COUNT: u64 = 10_000_000_000;
/// zeta(SCRAMBLED_ITEM_COUNT, 0.99): the sum over i = 1..10^10 of 1/i^0.99,
/// too long to compute at start-up, so it is a constant as in YCSB.
pub const SCRAMBLED_ZETAN: f64 = 26.469_028_201_783_02;
/// Longest scan of workload E.
pub const SCAN_LENGTH_MAX: u64 = 100;
/// Fields per record by default.
pub const FIELD_COUNT_DEFAULT: usize = 10;
/// Bytes per field by default.
pub const FIELD_LENGTH_DEFAULT: usize = 100;
/// The key prefix of every record.
pub const KEY_PREFIX: &str = "user";

/// 64-bit FNV-1a over the little-endian bytes of `v`.
pub fn fnv1a64(v: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in v.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// The key of record number `n`: fixed width, so keys sort like strings.
pub fn record_key(n: u64) -> Bytes {
    Bytes::from(format!("{KEY_PREFIX}{:020}", fnv1a64(n)))
}

/// The first key after every record key (the end of a scan over all records).
pub fn records_end_key() -> Bytes {
    // `user` + 0x7f... sorts after `user` + any digit.
    Bytes::from(format!("{KEY_PREFIX}\x7f"))
}

fn zeta(from: u64, to: u64, theta: f64, start: f64) -> f64 {
    (from + 1..=to).fold(start, |acc, i| acc + 1.0 / (i as f64).powf(theta))
}

/// Zipfian over `[0, items)`: item 0 is the most popular. The item count may
/// grow (for [`Latest`]); zeta is then extended incrementally.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta2: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    /// A Zipfian over `items` items with constant `theta` (< 1).
    pub fn new(items: u64, theta: f64) -> Zipfian {
        Self::with_zetan(items, theta, zeta(0, items, theta, 0.0))
    }

    /// A Zipfian whose zeta(items) is already known.
    pub fn with_zetan(items: u64, theta: f64, zetan: f64) -> Zipfian {
        assert!(items >= 1, "a Zipfian needs at least one item");
        let zeta2 = zeta(0, 2, theta, 0.0);
        let mut z = Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta2,
            zetan,
            eta: 0.0,
        };
        z.eta = z.eta_for(items);
        z
    }

    fn eta_for(&self, items: u64) -> f64 {
        (1.0 - (2.0 / items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan)
    }

    /// The current item count.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Grows the item space to `items` (never shrinks it).
    pub fn grow_to(&mut self, items: u64) {
        if items > self.items {
            self.zetan = zeta(self.items, items, self.theta, self.zetan);
            self.items = items;
            self.eta = self.eta_for(items);
        }
    }

    /// Draws an item in `[0, items)`.
    pub fn next<R: Rng>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let v = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        v.min(self.items - 1)
    }
}

/// Zipfian popularity with the popular items scattered over `[0, items)`.
#[derive(Debug, Clone)]
pub struct ScrambledZipfian {
    items: u64,
    inner: Zipfian,
}

impl ScrambledZipfian {
    /// Over `[0, items)`, constant [`ZIPFIAN_CONSTANT`].
    pub fn new(items: u64) -> ScrambledZipfian {
        ScrambledZipfian {
            items,
            inner: Zipfian::with_zetan(SCRAMBLED_ITEM_COUNT, ZIPFIAN_CONSTANT, SCRAMBLED_ZETAN),
        }
    }

    /// Draws an item in `[0, items)`.
    pub fn next<R: Rng>(&self, rng: &mut R) -> u64 {
        fnv1a64(self.inner.next(rng)) % self.items
    }
}

/// Recent records are popular: `newest - zipfian(count)`.
#[derive(Debug, Clone)]
pub struct Latest {
    inner: Zipfian,
}

impl Latest {
    /// Over the `items` records inserted so far.
    pub fn new(items: u64) -> Latest {
        Latest {
            inner: Zipfian::new(items, ZIPFIAN_CONSTANT),
        }
    }

    /// Draws a record in `[0, items)`, growing the space to `items` first.
    pub fn next<R: Rng>(&mut self, rng: &mut R, items: u64) -> u64 {
        self.inner.grow_to(items);
        let n = self.inner.items();
        n - 1 - self.inner.next(rng)
    }
}

/// How a workload picks the record of a read, update or scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    Uniform,
    Zipfian,
    Latest,
}

/// The workloads `lmskv-bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    A,
    B,
    C,
    D,
    E,
    F,
    /// Blind writes of `--value-size` bytes to uniformly chosen records.
    Put,
    /// Reads of uniformly chosen records of `--value-size` bytes.
    Get,
}

impl WorkloadKind {
    /// Every workload, in report order.
    pub const ALL: [WorkloadKind; 8] = [
        WorkloadKind::Put,
        WorkloadKind::Get,
        WorkloadKind::A,
        WorkloadKind::B,
        WorkloadKind::C,
        WorkloadKind::D,
        WorkloadKind::E,
        WorkloadKind::F,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::A => "a",
            WorkloadKind::B => "b",
            WorkloadKind::C => "c",
            WorkloadKind::D => "d",
            WorkloadKind::E => "e",
            WorkloadKind::F => "f",
            WorkloadKind::Put => "put",
            WorkloadKind::Get => "get",
        }
    }

    /// Parses a name from [`WorkloadKind::name`].
    pub fn parse(s: &str) -> Option<WorkloadKind> {
        WorkloadKind::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s))
    }

    /// A one-line description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            WorkloadKind::A => "YCSB A: 50% read, 50% update, zipfian",
            WorkloadKind::B => "YCSB B: 95% read, 5% update, zipfian",
            WorkloadKind::C => "YCSB C: 100% read, zipfian",
            WorkloadKind::D => "YCSB D: 95% read, 5% insert, latest",
            WorkloadKind::E => "YCSB E: 95% scan (1-100 records), 5% insert, zipfian",
            WorkloadKind::F => "YCSB F: 50% read, 50% read-modify-write, zipfian",
            WorkloadKind::Put => "put: 100% blind write, uniform",
            WorkloadKind::Get => "get: 100% read, uniform",
        }
    }

    /// Whether records use `--value-size` (put/get) or the YCSB field layout.
    pub fn uses_value_size(self) -> bool {
        matches!(self, WorkloadKind::Put | WorkloadKind::Get)
    }

    /// Whether the records must exist before the run.
    pub fn needs_load(self) -> bool {
        !matches!(self, WorkloadKind::Put)
    }

    /// The operation mix.
    pub fn mix(self) -> Mix {
        let m = Mix::default();
        match self {
            WorkloadKind::A => Mix {
                read: 0.5,
                update: 0.5,
                ..m
            },
            WorkloadKind::B => Mix {
                read: 0.95,
                update: 0.05,
                ..m
            },
            WorkloadKind::C => Mix { read: 1.0, ..m },
            WorkloadKind::D => Mix {
                read: 0.95,
                insert: 0.05,
                choice: KeyChoice::Latest,
                ..m
            },
            WorkloadKind::E => Mix {
                scan: 0.95,
                insert: 0.05,
                ..m
            },
            WorkloadKind::F => Mix {
                read: 0.5,
                read_modify_write: 0.5,
                ..m
            },
            WorkloadKind::Put => Mix {
                update: 1.0,
                choice: KeyChoice::Uniform,
                ..m
            },
            WorkloadKind::Get => Mix {
                read: 1.0,
                choice: KeyChoice::Uniform,
                ..m
            },
        }
    }
}

/// Operation proportions (summing to 1) and the key distribution.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub read: f64,
    pub update: f64,
    pub insert: f64,
    pub scan: f64,
    pub read_modify_write: f64,
    pub choice: KeyChoice,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            read: 0.0,
            update: 0.0,
            insert: 0.0,
            scan: 0.0,
            read_modify_write: 0.0,
            choice: KeyChoice::Zipfian,
        }
    }
}

/// One operation to run, on record numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read(u64),
    Update(u64),
    Insert(u64),
    Scan { start: u64, len: u64 },
    ReadModifyWrite(u64),
}

/// Draws operations for one client. Inserts take record numbers from a
/// shared counter; reads only pick records below the shared count of
/// records known to exist.
#[derive(Debug)]
pub struct OpChooser {
    mix: Mix,
    uniform_items: u64,
    zipf: ScrambledZipfian,
    latest: Latest,
}

impl OpChooser {
    /// For a workload over `records` loaded records.
    pub fn new(kind: WorkloadKind, records: u64) -> OpChooser {
        OpChooser {
            mix: kind.mix(),
            uniform_items: records,
            zipf: ScrambledZipfian::new(records),
            latest: Latest::new(records),
        }
    }

    /// The next operation. `inserted` is how many records exist (loaded plus
    /// inserted so far); `next_insert` hands out the number of a new record.
    pub fn next<R: Rng>(
        &mut self,
        rng: &mut R,
        inserted: u64,
        next_insert: impl FnOnce() -> u64,
    ) -> Op {
        let m = self.mix;
        let mut x: f64 = rng.gen();
        let pick = |s: &mut Self, rng: &mut R| match s.mix.choice {
            KeyChoice::Uniform => rng.gen_range(0..s.uniform_items),
            KeyChoice::Zipfian => s.zipf.next(rng),
            KeyChoice::Latest => s.latest.next(rng, inserted),
        };
        if x < m.read {
            return Op::Read(pick(self, rng));
        }
        x -= m.read;
        if x < m.update {
            return Op::Update(pick(self, rng));
        }
        x -= m.update;
        if x < m.insert {
            return Op::Insert(next_insert());
        }
        x -= m.insert;
        if x < m.scan {
            let start = pick(self, rng);
            return Op::Scan {
                start,
                len: rng.gen_range(1..=SCAN_LENGTH_MAX),
            };
        }
        Op::ReadModifyWrite(pick(self, rng))
    }
}

/// Random record contents: slices of one random buffer, so building a value
/// costs no copy and no random number generation per byte.
#[derive(Debug, Clone)]
pub struct ValuePool {
    pool: Bytes,
    len: usize,
}

impl ValuePool {
    /// Bytes of random printable data the values are cut from.
    const POOL_BYTES: usize = 1 << 20;

    /// Values of `len` bytes.
    pub fn new(len: usize, seed: u64) -> ValuePool {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let size = Self::POOL_BYTES.max(len * 2);
        let pool: Vec<u8> = (0..size).map(|_| rng.gen_range(b' '..=b'~')).collect();
        ValuePool {
            pool: Bytes::from(pool),
            len,
        }
    }

    /// The value length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether values are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A value of `len` random bytes.
    pub fn value<R: Rng>(&self, rng: &mut R) -> Bytes {
        let off = rng.gen_range(0..=self.pool.len() - self.len);
        self.pool.slice(off..off + self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipfian_favours_low_items_and_stays_in_range() {
        let z = Zipfian::new(1000, ZIPFIAN_CONSTANT);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0u64; 1000];
        for _ in 0..100_000 {
            counts[z.next(&mut rng) as usize] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[500]);
        // Item 0 has probability 1/zeta(1000) ≈ 13%.
        assert!((10_000..16_000).contains(&counts[0]), "{}", counts[0]);
    }

    #[test]
    fn grown_zipfian_matches_a_fresh_one() {
        let mut z = Zipfian::new(100, ZIPFIAN_CONSTANT);
        z.grow_to(5000);
        let fresh = Zipfian::new(5000, ZIPFIAN_CONSTANT);
        assert!((z.zetan - fresh.zetan).abs() < 1e-9);
        assert!((z.eta - fresh.eta).abs() < 1e-12);
    }

    #[test]
    fn scrambled_zipfian_spreads_hot_items() {
        let z = ScrambledZipfian::new(10_000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut counts = std::collections::HashMap::<u64, u64>::new();
        for _ in 0..50_000 {
            let v = z.next(&mut rng);
            assert!(v < 10_000);
            *counts.entry(v).or_default() += 1;
        }
        let hottest = counts.iter().max_by_key(|(_, c)| **c).map(|(k, _)| *k);
        assert_ne!(hottest, Some(0), "hashing moves the hot item away from 0");
        assert!(counts.len() > 2_000);
    }

    #[test]
    fn latest_prefers_newest_records() {
        let mut l = Latest::new(1000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let newest = (0..10_000)
            .filter(|_| l.next(&mut rng, 2000) >= 1990)
            .count();
        assert!(newest > 2_000, "{newest}");
        assert!((0..1000).all(|_| l.next(&mut rng, 2000) < 2000));
    }

    #[test]
    fn mixes_sum_to_one_and_choose_as_defined() {
        for w in WorkloadKind::ALL {
            let m = w.mix();
            let sum = m.read + m.update + m.insert + m.scan + m.read_modify_write;
            assert!((sum - 1.0).abs() < 1e-9, "{w:?}");
            assert_eq!(WorkloadKind::parse(w.name()), Some(w));
        }
        let mut c = OpChooser::new(WorkloadKind::E, 1000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut next = 1000;
        let (mut scans, mut inserts) = (0, 0);
        for _ in 0..10_000 {
            match c.next(&mut rng, next, || {
                next += 1;
                next - 1
            }) {
                Op::Scan { start, len } => {
                    assert!(start < 1000 && (1..=SCAN_LENGTH_MAX).contains(&len));
                    scans += 1;
                }
                Op::Insert(n) => {
                    assert!(n >= 1000);
                    inserts += 1;
                }
                other => panic!("E does not do {other:?}"),
            }
        }
        assert!((9_300..9_700).contains(&scans), "{scans}");
        assert_eq!(scans + inserts, 10_000);
    }

    #[test]
    fn record_keys_are_fixed_width_and_inside_the_scan_span() {
        let end = records_end_key();
        for n in [0, 1, u64::MAX] {
            let k = record_key(n);
            assert_eq!(k.len(), KEY_PREFIX.len() + 20);
            assert!(k < end);
        }
        assert_ne!(record_key(1), record_key(2));
    }
}
