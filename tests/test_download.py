"""data/cached_fineweb.py (and the seed's data/cached_fineweb10B.py), their real code path (huggingface_hub)
against a loopback stand-in for the Hub."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from helpers.fake_hub import FakeHub
from shards import write_shard
from train_gpt2 import load_shard

REPO = "kjj0/fineweb10B-gpt2"


def shard_bytes(tmp_path, name, tokens) -> bytes:
    write_shard(tmp_path / name, tokens)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).unlink()
    return data


@pytest.fixture
def hub(tmp_path):
    rng = np.random.default_rng(0)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in (1, 2, 3)]
    files = {n: shard_bytes(tmp_path, n, rng.integers(0, 50257, size=3000 + i)) for i, n in enumerate(names)}
    hub = FakeHub(REPO, files)
    yield hub
    hub.close()


def download(hub, out_dir, *args, script="cached_fineweb10B.py"):
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(out_dir.parent / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, str(ROOT / "data" / script), *args, "--dir", str(out_dir)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_downloads_the_val_shard_and_the_first_n_train_shards(hub, tmp_path):
    out = tmp_path / "fineweb10B"
    result = download(hub, out, "2")
    assert result.returncode == 0, result.stderr[-2000:]
    got = sorted(p.name for p in out.glob("*.bin"))
    assert got == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    for name in got:
        assert (out / name).read_bytes() == hub.files[name]
        assert len(load_shard(str(out / name))) > 0
    assert "3 downloaded, 0 already present" in result.stdout
    assert any(f"/datasets/{REPO}/resolve/" in path for _, path in hub.requests)


def test_valid_shards_are_skipped_and_broken_ones_fetched_again(hub, tmp_path):
    out = tmp_path / "fineweb10B"
    assert download(hub, out, "2").returncode == 0
    hub.requests.clear()
    result = download(hub, out, "2")
    assert result.returncode == 0 and "0 downloaded, 3 already present" in result.stdout
    assert hub.requests == []  # nothing asked of the network
    broken = out / "fineweb_train_000002.bin"
    broken.write_bytes(broken.read_bytes()[:-10])  # a download cut short
    result = download(hub, out, "2")
    assert result.returncode == 0 and "1 downloaded, 2 already present" in result.stdout
    assert broken.read_bytes() == hub.files[broken.name]


def test_a_missing_file_names_it_and_keeps_what_was_fetched(hub, tmp_path):
    out = tmp_path / "fineweb10B"
    del hub.files["fineweb_train_000002.bin"]
    result = download(hub, out, "3")
    assert result.returncode == 1
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "fineweb_train_000002.bin: download from kjj0/fineweb10B-gpt2 failed" in line
    assert (out / "fineweb_train_000001.bin").exists() and not (out / "fineweb_train_000003.bin").exists()


def test_a_corrupt_download_is_removed_and_named(hub, tmp_path):
    out = tmp_path / "fineweb10B"
    hub.files["fineweb_train_000001.bin"] = b"<html>not a shard</html>" * 100
    result = download(hub, out, "1")
    assert result.returncode == 1
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "downloaded a bad shard, removed it" in line and "fineweb_train_000001.bin: magic number" in line
    assert not (out / "fineweb_train_000001.bin").exists()


def test_shard_count_out_of_range_is_refused(hub, tmp_path):
    result = download(hub, tmp_path / "d", "104")
    assert result.returncode == 2 and "num_train_shards must lie in [0, 103] for fineweb10B, got 104" in result.stderr


def test_finewebedu_by_its_flag_with_the_trainer_flags_that_read_it(tmp_path):
    rng = np.random.default_rng(1)
    names = ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin"]
    hub = FakeHub("kjj0/finewebedu10B-gpt2", {n: shard_bytes(tmp_path, n, rng.integers(0, 50257, size=2000))
                                              for n in names})
    try:
        out = tmp_path / "edu"
        result = download(hub, out, "--dataset", "finewebedu10B", "1", script="cached_fineweb.py")
        assert result.returncode == 0, result.stderr[-2000:]
        assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
        assert all((out / n).read_bytes() == hub.files[n] for n in names)
        assert f"--input_bin '{os.path.relpath(out)}/finewebedu_train_*.bin' --input_val_bin " in result.stdout
    finally:
        hub.close()
    refused = download(hub, tmp_path / "big", "--dataset", "fineweb100B", "1031", script="cached_fineweb.py")
    assert refused.returncode == 2 and "num_train_shards must lie in [0, 1030] for fineweb100B, got 1031" in refused.stderr
