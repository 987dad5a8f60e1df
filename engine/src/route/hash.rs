//! PostgreSQL's hash functions, as hash partitioning uses them.
//!
//! In: a key value (an integer, the bytes of a string, the 16 bytes of a uuid). Out: the 64-bit
//! hash PostgreSQL's `PARTITION BY HASH` computes for it, and the partition remainder for a
//! modulus.
//!
//! Invariant kept here: for every supported type, [`partition_remainder`] of the row hash equals
//! the `REMAINDER` of the partition PostgreSQL itself routes the row to (the integration test
//! `tests/route.rs` checks this against a real server for 100k+ values per type).
//!
//! What PostgreSQL does (`src/backend/partitioning/partbounds.c`,
//! `compute_partition_hash_value`): for each non-NULL partition key column it calls the type's
//! *extended* hash support function with the seed [`HASH_PARTITION_SEED`] and folds the results
//! with [`hash_combine64`], starting from 0; the row goes to remainder `row_hash % modulus`.
//! The extended hash functions are Bob Jenkins' lookup3 (`src/common/hashfn.c`):
//! `hash_bytes_extended` for byte strings and `hash_bytes_uint32_extended` for 32-bit integers.
//! See <https://www.postgresql.org/docs/current/ddl-partitioning.html> and
//! <https://www.postgresql.org/docs/current/xindex.html#XINDEX-SUPPORT> (hash support function 2).
//!
//! lookup3 reads the key in 32-bit words in the host's byte order, so PostgreSQL's hashes differ
//! between little- and big-endian servers. This is the little-endian variant: the one every
//! x86-64 and (little-endian) ARM64 server computes.

/// The seed PostgreSQL passes to every extended hash function for hash partitioning
/// (`HASH_PARTITION_SEED` in `src/include/catalog/partition.h`).
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// lookup3's initial state before the length is added: `0x9e3779b9 + 3923095`.
const INIT: u32 = 0x9e37_79b9_u32.wrapping_add(3_923_095);

/// The constant `hash_combine64` adds: 64 bits of random data.
const COMBINE64: u64 = 0x49a0_f4dd_15e5_a8e3;

/// lookup3's `mix`: mixes three 32-bit values reversibly.
#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3's `final`: final mixing of three 32-bit values into `c` (and `b`).
#[inline(always)]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Perturbs the initial state with a non-zero seed, as if the seed were a 12-byte chunk of data
/// (high half, low half, four zero bytes).
#[inline(always)]
fn seed_state(a: &mut u32, b: &mut u32, c: &mut u32, seed: u64) {
    if seed != 0 {
        *a = a.wrapping_add((seed >> 32) as u32);
        *b = b.wrapping_add(seed as u32);
        mix(a, b, c);
    }
}

#[inline(always)]
fn le32(b0: u8, b1: u8, b2: u8, b3: u8) -> u32 {
    u32::from_le_bytes([b0, b1, b2, b3])
}

/// `hash_bytes_extended(k, len, seed)`: the 64-bit lookup3 hash of a byte string
/// (little-endian byte order), `(b << 32) | c`.
///
/// Byte strings longer than `u32::MAX` cannot be PostgreSQL values (a varlena is at most 1 GB);
/// their length is truncated like PostgreSQL's `int` length would be.
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let mut a = INIT.wrapping_add(k.len() as u32);
    let mut b = a;
    let mut c = a;
    seed_state(&mut a, &mut b, &mut c, seed);

    // PostgreSQL consumes whole 12-byte blocks while at least 12 bytes remain (`len >= 12`,
    // unlike the original lookup3's `> 12`), so an exact multiple of 12 leaves an empty tail.
    let mut blocks = k.chunks_exact(12);
    for blk in &mut blocks {
        if let [k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11] = *blk {
            a = a.wrapping_add(le32(k0, k1, k2, k3));
            b = b.wrapping_add(le32(k4, k5, k6, k7));
            c = c.wrapping_add(le32(k8, k9, k10, k11));
            mix(&mut a, &mut b, &mut c);
        }
    }

    // The last 0..=11 bytes: zero-padded words into a and b; c takes bytes 8..=10 shifted up
    // by one byte ("the lowest byte of c is reserved for the length").
    let tail = blocks.remainder();
    let mut t = [0u8; 12];
    if let Some(dst) = t.get_mut(..tail.len()) {
        dst.copy_from_slice(tail);
    }
    let [t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, _] = t;
    a = a.wrapping_add(le32(t0, t1, t2, t3));
    b = b.wrapping_add(le32(t4, t5, t6, t7));
    c = c.wrapping_add(le32(0, t8, t9, t10));

    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_bytes_uint32_extended(k, seed)`: the 64-bit lookup3 hash of one 32-bit value (equal to
/// [`hash_bytes_extended`] of its four little-endian bytes).
pub fn hash_bytes_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut a = INIT.wrapping_add(4);
    let mut b = a;
    let mut c = a;
    seed_state(&mut a, &mut b, &mut c, seed);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hashint2extended`: the value sign-extended to 32 bits.
pub fn hashint2extended(v: i16, seed: u64) -> u64 {
    hash_bytes_uint32_extended(i32::from(v) as u32, seed)
}

/// `hashint4extended`.
pub fn hashint4extended(v: i32, seed: u64) -> u64 {
    hash_bytes_uint32_extended(v as u32, seed)
}

/// `hashint8extended`: folds the high half into the low half (complemented for negative
/// values), so that every value in `int4` range hashes exactly like the same `int4` and `int2`
/// (PostgreSQL needs that for cross-type hash joins).
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
    hash_bytes_uint32_extended(folded, seed)
}

/// `hashtextextended` for a deterministic collation: lookup3 over the string's bytes in the
/// database encoding. (Nondeterministic ICU collations hash the sort key instead; they are not
/// supported.)
pub fn hashtextextended(bytes: &[u8], seed: u64) -> u64 {
    hash_bytes_extended(bytes, seed)
}

/// `bpchar`'s significant bytes: trailing spaces do not count (`bcTruelen`).
pub fn bpchar_significant(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    bytes.get(..end).unwrap_or(bytes)
}

/// `hashbpcharextended` for a deterministic collation: like text, without trailing spaces.
pub fn hashbpcharextended(bytes: &[u8], seed: u64) -> u64 {
    hash_bytes_extended(bpchar_significant(bytes), seed)
}

/// `uuid_hash_extended`: lookup3 over the 16 bytes.
pub fn uuid_hash_extended(uuid: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(uuid, seed)
}

/// `hash_combine64(a, b)`: folds hash `b` into running hash `a`.
#[inline]
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(COMBINE64)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// The row hash of a single-column partition key whose extended hash (with
/// [`HASH_PARTITION_SEED`]) is `key_hash`: `hash_combine64(0, key_hash)`. A NULL key is skipped
/// by PostgreSQL, leaving the row hash 0.
#[inline]
pub fn row_hash(key_hash: u64) -> u64 {
    hash_combine64(0, key_hash)
}

/// The remainder a row with `row_hash` gets for `modulus` (`row_hash % modulus`, unsigned).
/// `modulus` must be non-zero.
#[inline]
pub fn partition_remainder(row_hash: u64, modulus: std::num::NonZeroU64) -> u64 {
    row_hash % modulus
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every expected value below was obtained by asking PostgreSQL 15.18 (x86-64), e.g.
    // `SELECT hashint8extended(42, 8816678312871386365)` (8816678312871386365 is
    // HASH_PARTITION_SEED in decimal), and printed as PostgreSQL's signed bigint.

    fn s(v: i64) -> u64 {
        v as u64
    }

    #[test]
    fn seed_is_postgres_constant() {
        assert_eq!(HASH_PARTITION_SEED, 8_816_678_312_871_386_365);
    }

    #[test]
    fn int8_vectors_from_postgres() {
        let seed = HASH_PARTITION_SEED;
        let cases: &[(i64, i64)] = &[
            (0, -4403592609991167795),
            (1, 5968994663651403477),
            (-1, -5017072347659237694),
            (42, 7363975540656877951),
            (2147483647, -6050265599104649060),
            (-2147483648, 4938542303000433043),
            (2147483648, 4938542303000433043),
            (-2147483649, -6050265599104649060),
            (i64::MAX, 4938542303000433043),
            (i64::MIN, -6050265599104649060),
        ];
        for &(v, want) in cases {
            assert_eq!(hashint8extended(v, seed), s(want), "hashint8extended({v})");
        }
    }

    #[test]
    fn int4_and_int2_vectors_from_postgres() {
        let seed = HASH_PARTITION_SEED;
        let int4: &[(i32, i64)] = &[
            (0, -4403592609991167795),
            (1, 5968994663651403477),
            (-1, -5017072347659237694),
            (42, 7363975540656877951),
            (i32::MAX, -6050265599104649060),
            (i32::MIN, 4938542303000433043),
        ];
        for &(v, want) in int4 {
            assert_eq!(hashint4extended(v, seed), s(want), "hashint4extended({v})");
            assert_eq!(hashint8extended(i64::from(v), seed), s(want));
        }
        let int2: &[(i16, i64)] = &[
            (0, -4403592609991167795),
            (1, 5968994663651403477),
            (-1, -5017072347659237694),
            (42, 7363975540656877951),
            (i16::MAX, -6436696229286267413),
            (i16::MIN, 5885242512097991578),
        ];
        for &(v, want) in int2 {
            assert_eq!(hashint2extended(v, seed), s(want), "hashint2extended({v})");
        }
    }

    #[test]
    fn text_vectors_from_postgres_cover_every_tail_length() {
        // (value, hashtextextended(value, HASH_PARTITION_SEED), hashtextextended(value, 0))
        let cases: &[(&str, i64, i64)] = &[
            ("", -5700645584453517373, -6939563903564495251),
            ("a", -6705225459120232837, 3591986179850072241),
            ("ab", 596009030900183869, 2833316173711343549),
            ("abc", 3628778498291917250, -6747756470228489321),
            ("abcd", 4029384952263848046, -1038429303365892052),
            ("abcde", 4809259092934399961, 3076356108696143428),
            ("abcdefgh", -7754745184861941070, -8882191227074733005),
            ("abcdefghijk", -2046435308545367432, 3112909444737856467),
            ("abcdefghijkl", -7876791541613377658, -7556637188122330412),
            ("abcdefghijklm", -6785754114725280077, 8871624171452417744),
            (
                "hello world, this is a longer string of 40",
                -7837579257838610950,
                -2418483342005668084,
            ),
            ("Grüße, 世界 🎉", 3626508392569988592, -1084542638147976469),
        ];
        for &(v, seeded, unseeded) in cases {
            assert_eq!(
                hashtextextended(v.as_bytes(), HASH_PARTITION_SEED),
                s(seeded),
                "{v:?}"
            );
            assert_eq!(hashtextextended(v.as_bytes(), 0), s(unseeded), "{v:?}");
        }
    }

    #[test]
    fn bpchar_ignores_trailing_spaces() {
        let seed = HASH_PARTITION_SEED;
        assert_eq!(hashbpcharextended(b"abc", seed), s(3628778498291917250));
        assert_eq!(hashbpcharextended(b"abc   ", seed), s(3628778498291917250));
        assert_eq!(hashbpcharextended(b"", seed), s(-5700645584453517373));
        assert_eq!(hashbpcharextended(b"   ", seed), s(-5700645584453517373));
        assert_eq!(bpchar_significant(b" a b  "), b" a b");
    }

    #[test]
    fn uuid_vectors_from_postgres() {
        let seed = HASH_PARTITION_SEED;
        assert_eq!(uuid_hash_extended(&[0; 16], seed), s(-5281082146396728638));
        assert_eq!(
            uuid_hash_extended(&[0xff; 16], seed),
            s(-148986464341306210)
        );
        let u = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(uuid_hash_extended(&u, seed), s(424513190990560493));
    }

    #[test]
    fn uint32_variant_equals_bytes_variant() {
        for k in [0u32, 1, 42, 0xdead_beef, u32::MAX] {
            for seed in [0, HASH_PARTITION_SEED, 1] {
                assert_eq!(
                    hash_bytes_uint32_extended(k, seed),
                    hash_bytes_extended(&k.to_le_bytes(), seed)
                );
            }
        }
    }

    #[test]
    fn remainders_match_postgres_partitions() {
        // Partition PostgreSQL put each row in: `CREATE TABLE p8 (k bigint) PARTITION BY HASH (k)`
        // with MODULUS 8, then `SELECT k, tableoid::regclass FROM p8`.
        let m8 = std::num::NonZeroU64::new(8).unwrap();
        let int8: &[(i64, u64)] = &[
            (0, 0),
            (1, 0),
            (42, 2),
            (-1, 5),
            (i64::MAX, 6),
            (i64::MIN, 7),
            (123456789012, 7),
        ];
        for &(v, r) in int8 {
            let h = row_hash(hashint8extended(v, HASH_PARTITION_SEED));
            assert_eq!(partition_remainder(h, m8), r, "{v}");
        }
        // text, MODULUS 5.
        let m5 = std::num::NonZeroU64::new(5).unwrap();
        let text: &[(&str, u64)] = &[
            ("Grüße, 世界 🎉", 0),
            ("acct-1001", 0),
            ("", 1),
            ("abcdefghijkl", 1),
            ("a", 2),
        ];
        for &(v, r) in text {
            let h = row_hash(hashtextextended(v.as_bytes(), HASH_PARTITION_SEED));
            assert_eq!(partition_remainder(h, m5), r, "{v:?}");
        }
        // uuid, MODULUS 3.
        let m3 = std::num::NonZeroU64::new(3).unwrap();
        let h0 = row_hash(uuid_hash_extended(&[0; 16], HASH_PARTITION_SEED));
        let hf = row_hash(uuid_hash_extended(&[0xff; 16], HASH_PARTITION_SEED));
        assert_eq!(partition_remainder(h0, m3), 0);
        assert_eq!(partition_remainder(hf, m3), 1);
    }
}
