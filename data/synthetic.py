"""
Shards of a learnable synthetic language, in the FineWeb shard format, for smoke runs, tests and benchmarks.

The language is a sparse random Markov chain: each token has `--branching` possible successors with random
probabilities, and documents start with an end-of-text token. A model that learns the transition table
reaches the chain's entropy rate, far below the ln(vocab_size) it starts at.

    python data/synthetic.py --out data/smoke --vocab_size 512
"""
import argparse
import os

import numpy as np

from shards import write_shard


class MarkovLanguage:
    def __init__(self, vocab_size: int, branching: int, seed: int):
        rng = np.random.default_rng(seed)
        self.vocab_size, self.eot = vocab_size, min(50256, vocab_size - 1)
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, branching))
        self.cumprobs = np.cumsum(rng.dirichlet(np.ones(branching), size=vocab_size), axis=1)
        self.cumprobs[:, -1] = 1.0

    def entropy_rate(self) -> float:
        """Nats per token of the chain, at its stationary distribution (estimated by power iteration)."""
        V = self.vocab_size
        probs = np.diff(self.cumprobs, axis=1, prepend=0.0)
        # sparse transition matrix, merging a successor drawn twice for the same token
        edges, inverse = np.unique(np.arange(V)[:, None] * V + self.successors, return_inverse=True)
        p = np.bincount(inverse.ravel(), weights=probs.ravel())
        rows, cols = edges // V, edges % V
        stationary = np.full(V, 1.0 / V)
        for _ in range(200):
            stationary = np.bincount(cols, weights=stationary[rows] * p, minlength=V)
        row_entropy = np.bincount(rows, weights=-p * np.log(np.maximum(p, 1e-300)), minlength=V)
        return float(stationary @ row_entropy)

    def sample(self, num_tokens: int, rng: np.random.Generator, doc_len: int = 512) -> np.ndarray:
        """num_tokens tokens: documents of doc_len tokens, each beginning with end-of-text, sampled in parallel."""
        num_docs = -(-num_tokens // doc_len)
        docs = np.empty((num_docs, doc_len), dtype=np.int64)
        docs[:, 0] = self.eot
        docs[:, 1] = rng.integers(0, self.vocab_size, size=num_docs)
        for t in range(2, doc_len):
            prev = docs[:, t - 1]
            choice = (rng.random(num_docs)[:, None] > self.cumprobs[prev]).sum(axis=1)
            docs[:, t] = self.successors[prev, choice]
        return docs.reshape(-1)[:num_tokens]


def generate(out_dir: str, vocab_size: int = 512, train_shards: int = 2, shard_tokens: int = 1_000_000,
             val_tokens: int = 262_144, branching: int = 4, seed: int = 0, prefix: str = "synthetic") -> list[str]:
    """Write {prefix}_val_000000.bin and {prefix}_train_000001.bin ... into out_dir; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    language = MarkovLanguage(vocab_size, branching, seed)
    rng = np.random.default_rng(seed + 1)
    paths = [os.path.join(out_dir, f"{prefix}_val_{0:06d}.bin")]
    write_shard(paths[0], language.sample(val_tokens, rng))
    for i in range(1, train_shards + 1):
        paths.append(os.path.join(out_dir, f"{prefix}_train_{i:06d}.bin"))
        write_shard(paths[-1], language.sample(shard_tokens, rng))
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab_size", type=int, default=512, help="tokens are drawn from [0, vocab_size)")
    parser.add_argument("--train_shards", type=int, default=2)
    parser.add_argument("--shard_tokens", type=int, default=1_000_000, help="tokens per training shard")
    parser.add_argument("--val_tokens", type=int, default=262_144, help="tokens in the validation shard")
    parser.add_argument("--branching", type=int, default=4, help="successors per token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="synthetic", help="shard names start with this")
    a = parser.parse_args()
    if not 2 <= a.vocab_size <= 65536:
        parser.error(f"--vocab_size {a.vocab_size} must lie in [2, 65536] (shards hold uint16 tokens)")
    paths = generate(a.out, a.vocab_size, a.train_shards, a.shard_tokens, a.val_tokens, a.branching, a.seed, a.prefix)
    rate = MarkovLanguage(a.vocab_size, a.branching, a.seed).entropy_rate()
    print(f"wrote {len(paths)} shards to {a.out}; the language's entropy rate is {rate:.3f} nats/token "
          f"(ln vocab = {np.log(a.vocab_size):.3f})")


if __name__ == "__main__":
    main()
