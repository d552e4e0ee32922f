//! What the store's own structures really cost in memory, so that `stats()["bytes"]` and
//! `MAX_BYTES` follow the process's resident memory rather than the payload alone.
//!
//! The figures are those of glibc's malloc and of the collections the shards use; the Python layer
//! adds the sizes of the Python objects it holds (`python/value/sizes.rs`).

/// The chunk glibc's malloc hands out for a request of `n` bytes: an 8-byte header, rounded up to
/// 16 bytes, never less than 32. A request of 0 bytes allocates nothing (Rust never asks for it).
#[inline]
pub const fn malloc_chunk(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let c = (n + 8 + 15) & !15;
    if c < 32 {
        32
    } else {
        c
    }
}

/// A hash-table cell: the slot number (4 bytes) and hashbrown's control byte, over the buckets
/// per entry at its average load (it fills to 7/8, then doubles: 1.14 to 2.29 buckets an entry).
/// While a shard's table grows (`shard.rs`), the full table it replaces lives on for at most one
/// write per 64 of its slots (hashbrown's own resize held both for one insert); it is not charged.
pub const TABLE_CELL: usize = 8;

/// A record of S3-FIFO's ghost (`ghost::Ghost`): a `(hash, seq)` element of its FIFO (16 bytes,
/// a `VecDeque` that doubles: ~1.5 slots a record) and a cell of its `HashMap<u64, u64>` (16
/// bytes and a control byte, ~1.6 buckets a record as for `TABLE_CELL`). The ghost holds at most
/// as many records as its shard holds entries, so it is charged to the store like entries are.
pub const GHOST_RECORD: usize = 16 * 3 / 2 + 17 * 8 / 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malloc_chunks_follow_glibc() {
        assert_eq!(malloc_chunk(0), 0);
        assert_eq!(malloc_chunk(1), 32);
        assert_eq!(malloc_chunk(24), 32);
        assert_eq!(malloc_chunk(25), 48);
        assert_eq!(malloc_chunk(40), 48);
        assert_eq!(malloc_chunk(41), 64);
        assert_eq!(malloc_chunk(1000), 1008);
    }
}
