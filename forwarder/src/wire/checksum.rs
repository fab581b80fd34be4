//! Internet checksums: full (RFC 1071) and incremental (RFC 1624).
//!
//! The incremental form is what address and port translation uses: when a 16-bit word of a
//! checksummed header changes from `old` to `new`, the checksum `hc` becomes
//! `~(~hc + ~old + new)` (RFC 1624 eqn. 3), which is correct even when the result is 0x0000
//! or 0xffff — the corner case eqn. 2 of RFC 1141 gets wrong. The eBPF fast path uses the
//! same arithmetic (`bpf_l4_csum_replace`), and the tests here pin it against the full sum.

/// The ones'-complement sum of `data` folded to 16 bits (not inverted).
///
/// Sums 64-bit big-endian words with end-around carry (valid because 2^64 ≡ 1 mod
/// 0xffff), which is what makes checksumming 64 KiB segments cheap.
#[must_use]
pub fn sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(8);
    for word in words.by_ref() {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let (s, carry) = acc.overflowing_add(u64::from_be_bytes(bytes));
        acc = s + u64::from(carry);
    }
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    if let Some(slot) = tail.get_mut(..rest.len()) {
        slot.copy_from_slice(rest);
    }
    let (s, carry) = acc.overflowing_add(u64::from_be_bytes(tail));
    acc = s + u64::from(carry);
    let folded = (acc & 0xffff_ffff) + (acc >> 32);
    fold64(folded)
}

/// Adds two ones'-complement partial sums.
#[must_use]
pub fn add(a: u16, b: u16) -> u16 {
    fold(u32::from(a) + u32::from(b))
}

/// The Internet checksum of `data`: the inverted ones'-complement sum.
#[must_use]
pub fn full(data: &[u8]) -> u16 {
    !sum(data)
}

/// Updates checksum `check` for one 16-bit word changing from `old` to `new` (RFC 1624 eqn. 3).
#[must_use]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

/// Updates checksum `check` for a run of bytes (an address) changing from `old` to `new`.
/// Both slices must have the same even length; otherwise `check` is returned unchanged.
#[must_use]
pub fn update_bytes(check: u16, old: &[u8], new: &[u8]) -> u16 {
    if old.len() != new.len() || !old.len().is_multiple_of(2) {
        return check;
    }
    old.chunks_exact(2)
        .zip(new.chunks_exact(2))
        .fold(check, |c, (o, n)| match (o, n) {
            ([o0, o1], [n0, n1]) => update16(
                c,
                u16::from_be_bytes([*o0, *o1]),
                u16::from_be_bytes([*n0, *n1]),
            ),
            _ => c,
        })
}

fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    u16::try_from(acc).unwrap_or(u16::MAX)
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 16 significant bits.
    u16::try_from(acc).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of 00 01 f2 03 f4 f5 f6 f7 is 0xddf2.
        assert_eq!(
            sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn wide_sum_equals_word_sum() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3).to_be_bytes()[3]).collect();
        for len in 0..data.len() {
            let slice = &data[..len];
            let mut acc: u32 = 0;
            for pair in slice.chunks(2) {
                acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
            assert_eq!(sum(slice), fold(acc), "length {len}");
        }
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12]), 0x1200);
    }

    #[test]
    fn rfc1624_corner_case() {
        // RFC 1624 §4: header sum 0xcd7a, a word 0x5555 becomes 0x3285, the new checksum
        // must be 0x0000 — eqn. 2 of RFC 1141 would give 0xffff.
        assert_eq!(update16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest! {
        #[test]
        fn incremental_equals_full(mut data in proptest::collection::vec(any::<u8>(), 2..200),
                                   index in any::<prop::sample::Index>(), new in any::<u16>()) {
            if data.len() % 2 == 1 { data.push(0); }
            let words = data.len() / 2;
            let at = index.index(words) * 2;
            let before = full(&data);
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
            let after = full(&data);
            let incremental = update16(before, old, new);
            // 0x0000 and 0xffff are the same value in ones' complement.
            prop_assert!(incremental == after || (incremental ^ after) == 0xffff && after.is_multiple_of(0xffff));
        }

        #[test]
        fn update_bytes_equals_full(mut data in proptest::collection::vec(any::<u8>(), 8..64),
                                    new in any::<[u8; 4]>()) {
            if data.len() % 2 == 1 { data.push(0); }
            let before = full(&data);
            let old: [u8; 4] = data[2..6].try_into().unwrap();
            data[2..6].copy_from_slice(&new);
            let after = full(&data);
            let incremental = update_bytes(before, &old, &new);
            prop_assert!(incremental == after || (incremental ^ after) == 0xffff && after.is_multiple_of(0xffff));
        }
    }
}
