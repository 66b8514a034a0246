"""hf_checkpoint.resolve_checkpoint: base=/checkpoint=hf:ORG/NAME through huggingface_hub's cache, offline.

No network: a cache is laid out by hand exactly as huggingface_hub writes one (HF_HUB_CACHE/models--ORG--NAME/
blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main holding the commit), and the hub
library runs in offline mode (HF_HUB_OFFLINE). The reference is the same checkpoint loaded from its plain dir.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_hf_checkpoint.py
"""

import hashlib
import os

import pytest
import torch
import yaml
from conftest import MICRO_MODEL

import finetune
import sample
from config import UserError, run_cli
from generation import load_for_inference
from hf_checkpoint import resolve_checkpoint
from model import ModelConfig, Transformer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ckpt(tiny_data_dir, tmp_path_factory):
    torch.manual_seed(0)
    with open(MICRO_MODEL) as f:
        model = Transformer(ModelConfig(**yaml.safe_load(f)))
    path = str(tmp_path_factory.mktemp("hub") / "micro")
    model.save_pretrained(path, tokenizer_dir=tiny_data_dir)
    return path


@pytest.fixture
def offline_cache(ckpt, tmp_path, monkeypatch):
    """HF_HUB_CACHE holding zts/micro at COMMIT (refs/main points at it), with the hub library offline."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--zts--micro"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in os.listdir(ckpt):
        data = open(os.path.join(ckpt, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), repo / "snapshots" / COMMIT / name)
    # Set where huggingface_hub reads them (its constants are read from the environment at import).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_hub_id_resolves_to_the_cached_snapshot_offline(offline_cache, ckpt):
    snapshot = str(offline_cache / "snapshots" / COMMIT)
    assert resolve_checkpoint("hf:zts/micro") == snapshot  # refs/main -> the commit
    assert resolve_checkpoint(f"hf:zts/micro@{COMMIT}") == snapshot
    assert resolve_checkpoint(ckpt) == ckpt  # a plain dir is left alone
    assert finetune.resolve_base("hf:zts/micro") == snapshot  # the training side (train_sft, train_dpo)
    hub_model, hub_tok = load_for_inference("hf:zts/micro", device="cpu")
    local_model, local_tok = load_for_inference(ckpt, device="cpu")
    idx = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hub_model(idx), local_model(idx), rtol=0, atol=0)  # the same bytes
    assert hub_tok.encode("the cat") == local_tok.encode("the cat")


def test_sample_cli_reads_a_hub_id_offline(offline_cache, ckpt, capsys):
    args = ["prompt=The cat", "temperature=0", "max_new_tokens=6", "stream=false"]
    from_hub = run_cli(sample.main, sample.SampleConfig, argv=["checkpoint=hf:zts/micro", *args], show_config=False)
    from_dir = run_cli(sample.main, sample.SampleConfig, argv=[f"checkpoint={ckpt}", *args], show_config=False)
    assert from_hub == from_dir


def test_model_missing_offline_is_one_line_naming_the_download_command(offline_cache, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, sample.SampleConfig, argv=["checkpoint=hf:zts/absent", "prompt=x"], show_config=False)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err
    assert "hf:zts/absent" in err and "offline" in err and "`hf download zts/absent`" in err
    with pytest.raises(UserError, match="base: .*hf download zts/absent"):
        finetune.resolve_base("hf:zts/absent")
    with pytest.raises(ValueError, match="hf:ORG/NAME"):
        resolve_checkpoint("hf:no-slash")
