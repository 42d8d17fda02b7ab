import numpy as np
import pytest
import torch

from shards import write_shard
from train_gpt2 import HEADER_WORDS, SHARD_MAGIC, DistributedDataLoader, ShardError, load_shard, read_shard_header


def arange_shards(tmp_path, sizes, start=0):
    """Shards whose tokens are consecutive integers, so a batch reveals exactly where it came from."""
    paths = []
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"shard_{i:03d}.bin")
        write_shard(paths[-1], np.arange(start, start + n) % 60000)
        start += n
    return paths


def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "s.bin"
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    write_shard(path, tokens)
    assert read_shard_header(str(path)) == 1000
    np.testing.assert_array_equal(load_shard(str(path)), tokens)
    assert path.stat().st_size == HEADER_WORDS * 4 + 2 * 1000


def corrupt(path, word=None, value=None, truncate_to=None):
    if word is not None:
        header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
        header[word] = value
        data = path.read_bytes()
        path.write_bytes(header.tobytes() + data[HEADER_WORDS * 4:])
    if truncate_to is not None:
        path.write_bytes(path.read_bytes()[:truncate_to])


@pytest.mark.parametrize("damage, message", [
    (dict(word=0, value=12345), "magic number 12345 is not 20240520"),
    (dict(word=1, value=7), "shard version 7 is not 1"),
    (dict(word=2, value=999), "header says 999 tokens"),
    (dict(truncate_to=HEADER_WORDS * 4 + 100), "but the file has 1124 bytes"),
    (dict(truncate_to=10), "shorter than the 1024-byte header"),
])
def test_each_header_error_names_the_file_in_one_line(tmp_path, damage, message):
    (path,) = arange_shards(tmp_path, [500])
    corrupt(path, **damage)
    with pytest.raises(ShardError) as e:
        read_shard_header(str(path))
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ShardError, match="magic|version|header|bytes"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 0, 1)


def test_missing_shard_says_how_to_download(tmp_path):
    with pytest.raises(ShardError, match="cached_fineweb10B.py") as e:
        read_shard_header(str(tmp_path / "nope.bin"))
    assert "nope.bin" in str(e.value)
    with pytest.raises(ShardError, match="no shard matches.*cached_fineweb10B.py"):
        DistributedDataLoader(str(tmp_path / "fineweb_train_*.bin"), 2, 8, 0, 1)


def test_a_shard_too_small_for_one_batch_is_named(tmp_path):
    paths = arange_shards(tmp_path, [1000, 40])
    with pytest.raises(ShardError, match=r"shard_001.bin: 40 tokens are fewer than one batch needs \(2 x 8 x 3 ranks \+ 1 = 49\)"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 0, 3)
    assert paths


def test_ranks_read_disjoint_contiguous_slices_and_targets_shift_by_one(tmp_path):
    arange_shards(tmp_path, [10_000])
    B, T, world = 2, 8, 3
    loaders = [DistributedDataLoader(str(tmp_path / "*.bin"), B, T, r, world) for r in range(world)]
    for step in range(4):
        xs, ys = zip(*(loader.next_batch() for loader in loaders))
        tokens = torch.cat([x.flatten() for x in xs])
        chunk_start = step * B * T * world
        torch.testing.assert_close(tokens, torch.arange(chunk_start, chunk_start + B * T * world))
        for x, y in zip(xs, ys):
            assert x.shape == y.shape == (B, T) and x.dtype == torch.long
            torch.testing.assert_close(y, x + 1)


def test_all_ranks_advance_to_the_next_shard_together_and_wrap(tmp_path):
    # 100 tokens hold 2 global chunks of 2*8*3 = 48 (+1) tokens; the third chunk comes from the next shard
    arange_shards(tmp_path, [100, 60])
    B, T, world = 2, 8, 3
    loaders = [DistributedDataLoader(str(tmp_path / "*.bin"), B, T, r, world) for r in range(world)]
    assert loaders[0].batches_per_pass() == 2 + 1
    firsts = []
    for step in range(5):
        batches = [loader.next_batch()[0] for loader in loaders]
        firsts.append(int(batches[0][0, 0]))
        assert len({loader.current_shard for loader in loaders}) == 1  # ranks in lockstep
    # shard 0: chunks at 0 and 48; shard 1 (tokens 100..159): chunk at 100; then back to shard 0
    assert firsts == [0, 48, 100, 0, 48]


def test_loader_state_round_trips(tmp_path):
    arange_shards(tmp_path, [100, 60])
    a = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3)
    for _ in range(2):
        a.next_batch()
    b = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        torch.testing.assert_close(a.next_batch(), b.next_batch())


def global_chunks(loaders, steps):
    """The first token of each global chunk the ranks read together, checking they read one contiguous chunk."""
    firsts = []
    for _ in range(steps):
        tokens = torch.cat([loader.next_batch()[0].flatten() for loader in loaders])
        torch.testing.assert_close(tokens, torch.arange(int(tokens[0]), int(tokens[0]) + len(tokens)))
        assert len({(loader.current_shard, loader.current_position) for loader in loaders}) == 1  # lockstep
        firsts.append(int(tokens[0]))
    return firsts


def test_a_data_seed_shuffles_the_shards_and_their_start_the_same_on_every_rank(tmp_path):
    sizes = [1000, 700, 900, 800]
    arange_shards(tmp_path, sizes)
    B, T, world = 2, 8, 3  # a global chunk is 48 tokens
    pattern = str(tmp_path / "*.bin")

    def loaders(seed):
        return [DistributedDataLoader(pattern, B, T, r, world, data_seed=seed) for r in range(world)]

    record = global_chunks(loaders(0), 10)
    assert record == [48 * i for i in range(10)]  # data_seed 0: the record's order, from the first token
    passes, orders = {}, {}
    for seed in (1, 2, 3):
        ranks = loaders(seed)
        per_pass = ranks[0].batches_per_pass()
        firsts = global_chunks(ranks, 2 * per_pass)
        assert firsts[:per_pass] == firsts[per_pass:]  # a pass, then the same pass again
        passes[seed] = firsts[:per_pass]
        # each shard is read from a random start to its end, then from its first token back to that start:
        # every chunk lies inside one shard, no token is read twice in a pass, and at most two chunks' worth
        # of tokens per shard are left out
        bounds = np.cumsum([0] + sizes)
        shard_of = [int(np.searchsorted(bounds, f, side="right")) - 1 for f in firsts[:per_pass]]
        assert all(f + 49 <= bounds[s + 1] for f, s in zip(firsts, shard_of))
        read = sorted(firsts[:per_pass])
        assert all(b - a >= 48 for a, b in zip(read, read[1:]))
        assert sum(sizes) - 48 * per_pass < 2 * 49 * len(sizes)
        visits = [s for i, s in enumerate(shard_of) if i == 0 or s != shard_of[i - 1]]
        assert sorted(set(visits)) == [0, 1, 2, 3]
        orders[seed] = list(dict.fromkeys(visits))
    assert len({tuple(p) for p in passes.values()}) == 3  # each seed its own order
    assert any(order != [0, 1, 2, 3] for order in orders.values())  # shards shuffled
    assert passes[1] == global_chunks(loaders(1), len(passes[1]))  # the same seed, the same order
    assert any(p[0] % 48 for p in passes.values())  # starts that are not on the record's chunk grid


def test_a_data_seed_resumes_exactly_from_the_loader_state(tmp_path):
    arange_shards(tmp_path, [300, 250, 400])
    a = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3, data_seed=7)
    for _ in range(9):  # across shard boundaries and the wrap inside a shard
        a.next_batch()
    b = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3, data_seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(12):
        torch.testing.assert_close(a.next_batch(), b.next_batch())
