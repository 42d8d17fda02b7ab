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
    (dict(truncate_to=10), "10 bytes, shorter than the header"),
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
    with pytest.raises(ShardError, match=r"shard_001.bin: 40 tokens, fewer than a batch needs \(2 x 8 x 3 \+ 1\)"):
        DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 0, 3)
    loader = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 0, 2)  # 2 x 8 x 2 + 1 = 33: 40 tokens suffice
    assert loader.files == [str(p) for p in paths]


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


def test_data_seed_0_is_the_record_order(tmp_path):
    arange_shards(tmp_path, [1000, 700])
    loaders = [DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, r, 3) for r in range(3)]
    assert global_chunks(loaders, 25) == [48 * i for i in range(20)] + [1000 + 48 * i for i in range(5)]


def sampled_starts(tmp_path, sizes, B, T, world, seed, micro_batches):
    """The first token of every sequence the ranks read, in the order of the global batch (micro-batch, rank,
    row), checking that each row is T+1 consecutive tokens of one shard that start on its grid of T."""
    arange_shards(tmp_path, sizes)
    loaders = [DistributedDataLoader(str(tmp_path / "*.bin"), B, T, r, world, data_seed=seed) for r in range(world)]
    bounds = np.cumsum([0] + sizes)
    starts = []
    for _ in range(micro_batches):
        for x, y in (loader.next_batch() for loader in loaders):
            assert x.shape == y.shape == (B, T) and x.is_contiguous() and y.is_contiguous()
            torch.testing.assert_close(y, x + 1)
            for row in x:
                first = int(row[0])
                shard = int(np.searchsorted(bounds, first, side="right")) - 1
                assert (first - bounds[shard]) % T == 0 and first + T + 1 <= bounds[shard + 1]
                starts.append(first)
    return starts


def test_a_data_seed_samples_the_corpus_without_replacement(tmp_path):
    sizes, T = [1000, 700, 900, 800], 8
    total = sum((n - 1) // T for n in sizes)  # 124 + 87 + 112 + 99 sequences
    per_pass = total // (2 * 3)  # micro-batches of B=2 x 3 ranks
    starts = sampled_starts(tmp_path, sizes, 2, T, 3, seed=1, micro_batches=2 * per_pass + 1)
    first_pass, second_pass = starts[:total], starts[total:2 * total]
    assert len(set(first_pass)) == total  # every sequence of every shard once per pass...
    assert sorted(first_pass) == sorted(second_pass) and first_pass != second_pass  # ...in a new order each pass
    bounds = np.cumsum([0] + sizes)
    early = {int(np.searchsorted(bounds, s, side="right")) - 1 for s in first_pass[:24]}
    assert early == {0, 1, 2, 3}  # the first 24 sequences already sample all four shards
    assert sum(b - a == T for a, b in zip(first_pass, first_pass[1:])) < 10  # not a contiguous window
    same = sampled_starts(tmp_path, sizes, 2, T, 3, seed=1, micro_batches=4)
    other = sampled_starts(tmp_path, sizes, 2, T, 3, seed=2, micro_batches=4)
    assert same == starts[:24] and other != same


def test_a_global_batch_reads_the_same_sequences_on_any_number_of_ranks(tmp_path):
    one_rank = sampled_starts(tmp_path, [1000, 700], 2, 8, 1, seed=3, micro_batches=12)  # 4 micro-batches a step
    two_ranks = sampled_starts(tmp_path, [1000, 700], 2, 8, 2, seed=3, micro_batches=6)  # 2
    four_ranks = sampled_starts(tmp_path, [1000, 700], 2, 8, 4, seed=3, micro_batches=3)  # 1
    assert one_rank == two_ranks == four_ranks


def test_a_data_seed_resumes_exactly_and_refuses_other_shards(tmp_path):
    paths = arange_shards(tmp_path, [300, 250, 400])
    a = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3, data_seed=7)
    for _ in range(20):  # past the end of the first pass (117 sequences, 6 a micro-batch)
        a.next_batch()
    b = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3, data_seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(12):
        torch.testing.assert_close(a.next_batch(), b.next_batch())
    write_shard(tmp_path / "shard_003.bin", np.arange(500))  # a shard added since: another corpus, another order
    c = DistributedDataLoader(str(tmp_path / "*.bin"), 2, 8, 1, 3, data_seed=7)
    with pytest.raises(ShardError, match="hold 179 sequences, not the 117 of the saved data order; resume with its shards"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(ShardError, match="not the windows of the saved data order"):
        c.load_state_dict(dict(shard=1, position=40))
