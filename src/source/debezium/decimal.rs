//! Binary to decimal for Debezium's unscaled decimals, in subquadratic time.
//!
//! Converting digit by digit (repeated division of the whole number by 10)
//! costs bytes × digits: a 100,000-digit value took seconds, and a message
//! could hold many. Here the binary number is split in halves recursively,
//! each half converted to base 10⁹, and the halves joined as
//! `high × 2^(32k) + low`, with the powers `2^(32·2^j)` precomputed in base
//! 10⁹ by squaring and products by Karatsuba: O(n^1.59) in all. The input
//! is bounded by the caller ([`super::MAX_DECIMAL_BYTES`]).
//!
//! Invariant: every base-10⁹ number here is little-endian, each limb below
//! 10⁹, with no zero limb at the top (zero is the empty vector).

use std::fmt::Write as _;

/// One decimal limb: nine digits.
const BASE: u64 = 1_000_000_000;
/// Below this many limbs, products are schoolbook and conversions Horner.
const SMALL: usize = 32;

/// The decimal digits of a big-endian magnitude without leading zero bytes
/// (`"0"` for none).
pub(super) fn to_decimal_string(magnitude: &[u8]) -> String {
    // Little-endian base-2³² limbs.
    let limbs: Vec<u32> =
        magnitude.rchunks(4).map(|chunk| chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))).collect();
    let mut powers = vec![vec![294_967_296, 4]]; // 2^32 in base 10⁹
    let decimal = convert(&limbs, &mut powers);
    let Some((top, rest)) = decimal.split_last() else { return "0".to_owned() };
    let mut out = String::with_capacity(decimal.len() * 9);
    let _ = write!(out, "{top}");
    for limb in rest.iter().rev() {
        let _ = write!(out, "{limb:09}");
    }
    out
}

/// `limbs` (base 2³², little-endian) in base 10⁹. `powers[j]` is
/// `2^(32·2^j)` in base 10⁹, extended as needed.
fn convert(limbs: &[u32], powers: &mut Vec<Vec<u32>>) -> Vec<u32> {
    let limbs = trim_u32(limbs);
    if limbs.len() <= SMALL {
        let mut out: Vec<u32> = Vec::new();
        for &limb in limbs.iter().rev() {
            // out = out × 2³² + limb
            let mut carry = u64::from(limb);
            for digit in &mut out {
                let acc = (u64::from(*digit) << 32) + carry;
                *digit = (acc % BASE) as u32;
                carry = acc / BASE;
            }
            while carry > 0 {
                out.push((carry % BASE) as u32);
                carry /= BASE;
            }
        }
        return out;
    }
    // Split at the largest power of two below the length.
    let j = (usize::BITS - 1 - (limbs.len() - 1).leading_zeros()) as usize;
    let half = 1usize << j;
    while powers.len() <= j {
        let last = &powers[powers.len() - 1];
        let square = mul(last, last);
        powers.push(square);
    }
    let low = convert(&limbs[..half], powers);
    let high = convert(&limbs[half..], powers);
    let mut out = mul(&high, &powers[j]);
    add_at(&mut out, &low, 0);
    out
}

fn trim_u32(limbs: &[u32]) -> &[u32] {
    let end = limbs.iter().rposition(|l| *l != 0).map_or(0, |i| i + 1);
    &limbs[..end]
}

fn trim(limbs: &mut Vec<u32>) {
    while limbs.last() == Some(&0) {
        limbs.pop();
    }
}

/// `acc += x × BASE^shift`.
fn add_at(acc: &mut Vec<u32>, x: &[u32], shift: usize) {
    if acc.len() < shift + x.len() {
        acc.resize(shift + x.len(), 0);
    }
    let mut carry = 0u64;
    let mut i = shift;
    for &limb in x {
        let sum = u64::from(acc[i]) + u64::from(limb) + carry;
        acc[i] = (sum % BASE) as u32;
        carry = sum / BASE;
        i += 1;
    }
    while carry > 0 {
        if i == acc.len() {
            acc.push(0);
        }
        let sum = u64::from(acc[i]) + carry;
        acc[i] = (sum % BASE) as u32;
        carry = sum / BASE;
        i += 1;
    }
}

/// `acc -= x`, where `acc >= x`.
fn sub_in_place(acc: &mut Vec<u32>, x: &[u32]) {
    let mut borrow = 0i64;
    for (i, digit) in acc.iter_mut().enumerate() {
        if i >= x.len() && borrow == 0 {
            break;
        }
        let mut d = i64::from(*digit) - borrow - x.get(i).map_or(0, |l| i64::from(*l));
        borrow = 0;
        if d < 0 {
            d += BASE as i64;
            borrow = 1;
        }
        *digit = d as u32;
    }
    trim(acc);
}

fn add(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = a.to_vec();
    add_at(&mut out, b, 0);
    out
}

/// `a × b`, Karatsuba above [`SMALL`] limbs.
fn mul(a: &[u32], b: &[u32]) -> Vec<u32> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    if a.len().min(b.len()) <= SMALL {
        return schoolbook(a, b);
    }
    let (a, b) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let m = a.len() / 2;
    if b.len() <= m {
        // Unbalanced: split the longer one only.
        let (a0, a1) = a.split_at(m);
        let mut out = mul(trim_u32(a0), b);
        add_at(&mut out, &mul(a1, b), m);
        trim(&mut out);
        return out;
    }
    let (a0, a1) = a.split_at(m);
    let (b0, b1) = b.split_at(m);
    let (a0, b0) = (trim_u32(a0), trim_u32(b0));
    let z0 = mul(a0, b0);
    let z2 = mul(a1, b1);
    let mut z1 = mul(&add(a0, a1), &add(b0, b1));
    sub_in_place(&mut z1, &z0);
    sub_in_place(&mut z1, &z2);
    let mut out = z0;
    add_at(&mut out, &z1, m);
    add_at(&mut out, &z2, 2 * m);
    trim(&mut out);
    out
}

fn schoolbook(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = vec![0u32; a.len() + b.len()];
    for (i, &x) in a.iter().enumerate() {
        let mut carry = 0u64;
        for (j, &y) in b.iter().enumerate() {
            let acc = u64::from(out[i + j]) + u64::from(x) * u64::from(y) + carry;
            out[i + j] = (acc % BASE) as u32;
            carry = acc / BASE;
        }
        let mut k = i + b.len();
        while carry > 0 {
            let acc = u64::from(out[k]) + carry;
            out[k] = (acc % BASE) as u32;
            carry = acc / BASE;
            k += 1;
        }
    }
    trim(&mut out);
    out
}
