"""Writing shards in the format the trainer's loader reads (train_gpt2.py's data section): 256 int32 header
words [magic, version, num_tokens, 0, ...], then num_tokens uint16 token ids."""
import os
import sys

import numpy as np

# data/'s one sys.path edit: the repository root, for the trainer's shard format (one format, one reader)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train_gpt2 import (HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION, ShardError, load_shard,  # noqa: E402,F401
                        read_shard_header)


def write_shard(path: str, tokens) -> None:
    """Write tokens (ints < 65536) as a shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError("shard tokens must lie in [0, 65536)")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)
