"""
Download GPT-2-tokenised FineWeb shards from the Hugging Face Hub: the validation shard and the first N
training shards of one of the datasets the seed offers, 10^8 tokens (~200 MB) a shard.

    python data/cached_fineweb.py 25                              # FineWeb 10B: enough for the record's 4578 steps
    python data/cached_fineweb.py --dataset finewebedu10B 25      # FineWeb-Edu 10B
    python data/cached_fineweb.py --dataset fineweb100B           # all 1030 shards of FineWeb 100B
    python data/cached_fineweb10B.py 24                           # the seed's command, still working

Shards already present and valid are skipped; a shard whose header disagrees with its size is fetched
again; every shard's header is checked after its download, and an interrupted run continues where it
stopped. HF_ENDPOINT points the download at a mirror. At the end it prints the trainer flags that read them.
"""
import argparse
import os
import sys
from dataclasses import dataclass

from tqdm import tqdm

from shards import ShardError, read_shard_header  # (one shard check for loader and downloader)

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Dataset:
    repo_id: str  # a dataset repo on the Hub
    prefix: str  # shard names: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...
    num_train_shards: int


DATASETS = {
    "fineweb10B": Dataset("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": Dataset("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": Dataset("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}


class DownloadError(RuntimeError):
    """A shard that could not be fetched; the message names it and says why."""


def shard_names(dataset: Dataset, num_train_shards: int) -> list[str]:
    return [f"{dataset.prefix}_val_000000.bin"] + [f"{dataset.prefix}_train_{i:06d}.bin"
                                                   for i in range(1, num_train_shards + 1)]


def fetch(dataset: Dataset, name: str, local_dir: str) -> bool:
    """Make local_dir/name a valid shard; return whether it had to be downloaded."""
    path = os.path.join(local_dir, name)
    if os.path.exists(path):
        try:
            read_shard_header(path)
            return False
        except ShardError as e:
            tqdm.write(f"{e}: fetching it again")
            os.remove(path)
    from huggingface_hub import hf_hub_download  # imported late: it reads HF_ENDPOINT when imported
    try:
        hf_hub_download(repo_id=dataset.repo_id, filename=name, repo_type="dataset", local_dir=local_dir)
    except Exception as e:  # network, HTTP and disk errors alike: say which file and why
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(f"{name}: download from {dataset.repo_id} failed: {type(e).__name__}: {reason}") from None
    try:
        read_shard_header(path)
    except ShardError as e:
        os.remove(path)
        raise DownloadError(f"downloaded a bad shard, removed it: {e}") from None
    return True


def main(argv=None, default_dataset: str = "fineweb10B"):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", nargs="?", type=int, help="training shards to fetch (default: all)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=default_dataset,
                        help=f"which shards (default: {default_dataset})")
    parser.add_argument("--dir", help="where the shards go (default: data/<dataset>)")
    args = parser.parse_args(argv)
    dataset = DATASETS[args.dataset]
    count = dataset.num_train_shards if args.num_train_shards is None else args.num_train_shards
    if not 0 <= count <= dataset.num_train_shards:
        parser.error(f"num_train_shards must lie in [0, {dataset.num_train_shards}] for {args.dataset}, got {count}")
    local_dir = args.dir or os.path.join(HERE, args.dataset)
    os.makedirs(local_dir, exist_ok=True)
    names = shard_names(dataset, count)
    downloaded = 0
    progress = tqdm(names, desc="shards", unit="shard")
    for name in progress:
        progress.set_postfix_str(name)
        try:
            downloaded += fetch(dataset, name, local_dir)
        except DownloadError as e:
            progress.close()
            print(f"error: {e}; rerun to continue (valid shards are kept)", file=sys.stderr)
            sys.exit(1)
    print(f"{len(names)} shards in {local_dir}: {downloaded} downloaded, {len(names) - downloaded} already present")
    if args.dataset != "fineweb10B" or args.dir:  # the trainer's defaults read data/fineweb10B
        rel = os.path.relpath(local_dir)
        print(f"train on them with: --input_bin '{rel}/{dataset.prefix}_train_*.bin' "
              f"--input_val_bin '{rel}/{dataset.prefix}_val_*.bin'")


if __name__ == "__main__":
    main()
