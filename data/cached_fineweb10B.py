"""
Download the GPT-2-tokenised FineWeb shards from the Hugging Face Hub (dataset kjj0/fineweb10B-gpt2):
the validation shard and the first N training shards (default: all 103), 10^8 tokens (~200 MB) each.

    python data/cached_fineweb10B.py        # all 103 training shards
    python data/cached_fineweb10B.py 25     # enough for the 4578-step record run

Shards already present and valid are skipped; a shard whose header disagrees with its size is fetched
again. Every shard's header is checked after download. HF_ENDPOINT points the download at a mirror.
"""
import argparse
import os
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train_gpt2 import ShardError, read_shard_header  # noqa: E402  (one shard check for loader and downloader)

REPO_ID = "kjj0/fineweb10B-gpt2"
NUM_TRAIN_SHARDS = 103
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")


class DownloadError(RuntimeError):
    """A shard that could not be fetched; the message names it and says why."""


def shard_names(num_train_shards: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def fetch(name: str, local_dir: str) -> bool:
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
        hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=local_dir)
    except Exception as e:  # network, HTTP and disk errors alike: say which file and why
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(f"{name}: download from {REPO_ID} failed: {type(e).__name__}: {reason}") from None
    try:
        read_shard_header(path)
    except ShardError as e:
        os.remove(path)
        raise DownloadError(f"downloaded a bad shard, removed it: {e}") from None
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", nargs="?", type=int, default=NUM_TRAIN_SHARDS,
                        help=f"training shards to fetch, 0 to {NUM_TRAIN_SHARDS} (default: all)")
    parser.add_argument("--dir", default=DEFAULT_DIR, help="where the shards go (default: data/fineweb10B)")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train_shards <= NUM_TRAIN_SHARDS:
        parser.error(f"num_train_shards must lie in [0, {NUM_TRAIN_SHARDS}], got {args.num_train_shards}")
    os.makedirs(args.dir, exist_ok=True)
    names = shard_names(args.num_train_shards)
    downloaded = 0
    progress = tqdm(names, desc="shards", unit="shard")
    for name in progress:
        progress.set_postfix_str(name)
        try:
            downloaded += fetch(name, args.dir)
        except DownloadError as e:
            progress.close()
            print(f"error: {e}; rerun to continue (valid shards are kept)", file=sys.stderr)
            sys.exit(1)
    print(f"{len(names)} shards in {args.dir}: {downloaded} downloaded, {len(names) - downloaded} already present")


if __name__ == "__main__":
    main()
