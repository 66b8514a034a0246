"""config.py: precedence defaults < YAML < command line, types, and every error path."""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest

from config import ConfigError, field_help, help_text, parse_args, save_config


@dataclass
class Inner:
    n_layers: int = 2  # number of blocks
    dropout: float = 0.0  # dropout probability

    def validate(self):
        return [] if 0.0 <= self.dropout < 1.0 else ["dropout must be in [0, 1)"]


@dataclass
class Cfg:
    lr: float = 3e-4  # peak learning rate
    name: str = "run#1"  # run name, with a '#' that is not a comment
    batch_size: int = 8  # sequences per step
    micro_batch_size: int = 4  # sequences per forward
    model: Inner = field(default_factory=Inner)  # the network
    layers: list[int] = field(default_factory=lambda: [0, 1])  # which layers
    seed: Optional[int] = None  # random seed, null for none
    compile: bool = False  # use torch.compile

    def validate(self):
        errors = []
        if self.lr <= 0:
            errors.append("lr must be > 0")
        if self.batch_size % self.micro_batch_size:
            errors.append("batch_size must be a multiple of micro_batch_size")
        return errors


def test_defaults_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nmodel:\n  n_layers: 6\nlayers: [2, 3]\n")
    cfg = parse_args(Cfg, [str(path), "model.n_layers=8", "seed=7", "compile=yes"])
    assert cfg.lr == 0.001  # YAML beats the default
    assert cfg.model.n_layers == 8  # the command line beats YAML
    assert cfg.layers == [2, 3] and cfg.seed == 7 and cfg.compile is True
    assert cfg.model.dropout == 0.0 and cfg.name == "run#1"  # untouched defaults


def test_value_conversion():
    cfg = parse_args(Cfg, ["lr=1e-3", "batch_size=1_6", "layers=[4, 5]", "seed=null", "name=a=b"])
    assert cfg.lr == pytest.approx(1e-3) and cfg.batch_size == 16
    assert cfg.layers == [4, 5] and cfg.seed is None and cfg.name == "a=b"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["lrr=1"], "unknown key 'lrr' (did you mean 'lr'?)"),
        (["model.n_layer=1"], "did you mean 'model.n_layers'?"),
        (["modle.n_layers=1"], "did you mean 'model.n_layers'?"),
        (["batch_size=abc"], "'batch_size' expected an integer"),
        (["batch_size=2.5"], "'batch_size' expected an integer"),
        (["compile=maybe"], "'compile' expected true/false"),
        (["lr=-1"], "lr must be > 0"),
        (["batch_size=6"], "batch_size must be a multiple of micro_batch_size"),
        (["model.dropout=1.5"], "model.dropout must be in [0, 1)"),
        (["model=3"], "'model' is a section"),
        (["--fast"], "unknown option '--fast'"),
        (["missing.yaml"], "config file not found: missing.yaml"),
    ],
)
def test_errors_name_the_key(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(Cfg, argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        parse_args(Cfg, ["lrr=1", "batch_size=x", "model.dropout=2"])
    msg = str(e.value)
    assert "lrr" in msg and "batch_size" in msg and "dropout" in msg and "+2 more" in msg


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlayers: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        parse_args(Cfg, [str(bad)])
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_args(Cfg, [str(top)])


def test_yaml_is_never_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(Cfg, [str(evil)])


def test_help_lists_every_key_with_default_and_comment():
    assert field_help(Cfg)["name"] == "run name, with a '#' that is not a comment"
    text = help_text(Cfg)
    for key in ["lr", "name", "batch_size", "model.n_layers", "model.dropout", "layers", "seed", "compile"]:
        assert key in text
    assert "peak learning rate" in text and "number of blocks" in text and "0.0003" in text


def test_save_config_round_trip(tmp_path):
    cfg = parse_args(Cfg, ["model.n_layers=5"])
    save_config(cfg, str(tmp_path / "out" / "config.json"))
    data = json.loads((tmp_path / "out" / "config.json").read_text())
    assert data["model"]["n_layers"] == 5 and data["lr"] == 3e-4


def test_run_cli_exits_with_one_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "from dataclasses import dataclass\n"
        "from config import run_cli, UserError\n"
        "@dataclass\n"
        "class C:\n"
        "    steps: int = 1  # how many\n"
        "def main(cfg):\n"
        "    if cfg.steps == 3: raise UserError('data.jsonl line 3: not JSON')\n"
        "    print('ran', cfg.steps)\n"
        "run_cli(main, C, 'demo')\n" % str(__import__("config").__file__.rsplit("/", 1)[0])
    )
    ok = subprocess.run([sys.executable, str(script), "steps=2"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ran 2" in ok.stdout
    for argv, needle in [(["stepz=2"], "did you mean 'steps'"), (["steps=3"], "data.jsonl line 3")]:
        bad = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
        assert bad.returncode == 2
        assert bad.stderr.strip().count("\n") == 0 and needle in bad.stderr and "Traceback" not in bad.stderr
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "steps" in helped.stdout and "how many" in helped.stdout


# ----------------------------------------------------------------------------- sections with presets (model=NAME)


def test_model_preset_then_single_keys_in_any_order(tmp_path):
    """train_pretrain's `model` section: a preset fills it from configs/model/NAME.yaml, dotted keys change one key
    on top, whatever their order on the command line; a later preset starts again from the file."""
    import yaml

    from train_pretrain import PretrainConfig

    with open("configs/model/0.5B.yaml") as fh:
        want = yaml.safe_load(fh)  # the file itself is the reference
    no_data = "dry_run=true"  # a missing data/builtin (a fresh clone) is then a note, not an error
    for argv in (["model=0.5B", "model.num_hidden_layers=6"], ["model.num_hidden_layers=6", "model=0.5B"]):
        cfg = parse_args(PretrainConfig, [*argv, no_data])
        assert cfg.model.num_hidden_layers == 6
        assert cfg.model.hidden_size == want["hidden_size"] and cfg.model.vocab_size == want["vocab_size"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hidden_size: 128\n  num_attention_heads: 4\n  num_key_value_heads: 2\n")
    cfg = parse_args(PretrainConfig, [str(recipe), "model=tiny", no_data])  # the later preset resets the YAML's keys
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads) == (256, 8)
    cfg = parse_args(PretrainConfig, [str(recipe), no_data])  # keys without a preset change the default (tiny) shape
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.num_hidden_layers) == (128, 4, 4)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["model=huge"], "'model' unknown model preset 'huge'"),
        (
            ["model.num_hidden_layer=3"],
            "unknown key 'model.num_hidden_layer' (did you mean 'model.num_hidden_layers'?)",
        ),
        (["model.hidden_size=250"], "model: hidden_size=250 is not divisible by num_attention_heads"),
        (["model.attn_impl=naive"], "model.attn_impl is chosen per run: set attn_impl=... instead"),
    ],
)
def test_model_section_errors_are_one_line(argv, needle):
    from train_pretrain import PretrainConfig

    with pytest.raises(ConfigError) as e:
        parse_args(PretrainConfig, [*argv, "data_dir=tests"])  # data_dir: any dir, its meta.json error is listed too
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_empty_model_file_is_an_error_not_the_defaults(tmp_path):
    from train_pretrain import PretrainConfig

    empty = tmp_path / "moe.yaml"
    empty.write_text("")  # e.g. read while another process was rewriting it
    with pytest.raises(ConfigError, match=f"model preset {empty} is empty"):
        parse_args(PretrainConfig, [f"model={empty}", "dry_run=true"])


def test_build_model_config_follows_the_section():
    from train_pretrain import PretrainConfig, build_model_config

    argv = ["model=tiny", "model.num_hidden_layers=2", "model.hidden_size=128", "dropout=0.1", "dry_run=true"]
    cfg = parse_args(PretrainConfig, argv)  # dry_run: a fresh clone has no data/builtin, and none is read here
    mcfg = build_model_config(cfg, vocab_size=5000, attn_impl="naive")
    assert (mcfg.num_hidden_layers, mcfg.hidden_size, mcfg.intermediate_size) == (2, 128, 704)
    assert mcfg.vocab_size == 5000 and mcfg.attn_impl == "naive" and mcfg.dropout == 0.1
    assert build_model_config(cfg, vocab_size=100, attn_impl="sdpa").vocab_size == 4096  # never shrinks below
