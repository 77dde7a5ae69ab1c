import pytest
import torch

from mmdit.data.order import ORDER_CHUNK, batch_indices, permute


def test_batch_indices_cover_each_epoch_and_split_across_ranks():
    n, bs = 20, 4
    epoch0 = torch.cat([batch_indices(s, n, bs, seed=0) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(n))
    epoch1 = torch.cat([batch_indices(s, n, bs, seed=0) for s in range(5, 10)])
    assert not torch.equal(epoch0, epoch1)  # reshuffled every epoch
    assert torch.equal(batch_indices(7, n, bs, seed=0), batch_indices(7, n, bs, seed=0))  # pure in step
    ranks = [batch_indices(3, n, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(ranks), batch_indices(3, n, 4, seed=0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(0, 3, 4, seed=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, ORDER_CHUNK + 3])
def test_permute_is_a_permutation_of_every_size_drawn_from_its_key(n):
    orders = [permute(torch.arange(n), n, key) for key in (0, 1)]
    assert all(sorted(o.tolist()) == list(range(n)) for o in orders)
    if n >= 64:  # another key, another order; no position stays in place more than chance allows
        assert not torch.equal(*orders)
        assert (orders[0] == torch.arange(n)).float().mean() < 0.05


def test_an_epoch_spanning_order_chunks_still_visits_every_row_once():
    n, bs = 3 * ORDER_CHUNK + 100, 1000  # batches straddle the chunk boundaries
    rows = torch.cat([batch_indices(s, n, bs, seed=4) for s in range(n // bs)])
    assert len(set(rows.tolist())) == len(rows) == n // bs * bs
    assert torch.equal(rows, permute(torch.arange(len(rows)), n, 4 * 1_000_003))
