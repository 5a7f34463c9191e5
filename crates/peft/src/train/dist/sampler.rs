//! Each rank's share of an epoch's order, as torch's `DistributedSampler` cuts it: the order
//! (the same permutation on every rank: one generator seeded alike) padded by wrapping around
//! to a multiple of the world size, then rank `r` takes positions `r, r + world, r + 2·world, …`.
//! So micro-batch `j` of every rank together is positions `j·b·world .. (j+1)·b·world` of the
//! order: the batch a single process with a `world` times larger batch would take.

/// Rank `rank`'s indices of `order` among `world` ranks (`world` = 1: `order` itself).
pub fn shard(order: &[usize], rank: usize, world: usize) -> Vec<usize> {
    if world <= 1 {
        return order.to_vec();
    }
    let per_rank = order.len().div_ceil(world);
    (0..per_rank)
        .map(|i| i * world + rank)
        .map(|p| order[p % order.len()])
        .collect()
}

/// How many examples each rank sees per epoch of `n` (with the wrap-around padding).
pub fn per_rank_len(n: usize, world: usize) -> usize {
    n.div_ceil(world.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_interleave_and_wrap_like_distributed_sampler() {
        let order: Vec<usize> = vec![7, 3, 9, 0, 5];
        assert_eq!(shard(&order, 0, 1), order);
        // torch: indices += indices[:pad]; indices[rank:total:world]
        assert_eq!(shard(&order, 0, 2), vec![7, 9, 5]);
        assert_eq!(shard(&order, 1, 2), vec![3, 0, 7]);
        assert_eq!(shard(&order, 2, 4), vec![9, 3]);
        assert_eq!(shard(&order, 3, 4), vec![0, 9]);
        // A world larger than the data wraps more than once, as torch's repeat does.
        assert_eq!(shard(&[1, 2], 2, 5), vec![1]);
        assert_eq!(per_rank_len(5, 2), 3);
        // Batch j of all ranks together is the slice of the order a world-times-larger batch takes.
        let order: Vec<usize> = (0..16).rev().collect();
        let (a, b) = (shard(&order, 0, 2), shard(&order, 1, 2));
        let mut first: Vec<usize> = a[..4].iter().chain(&b[..4]).copied().collect();
        first.sort();
        let mut single = order[..8].to_vec();
        single.sort();
        assert_eq!(first, single);
    }
}
