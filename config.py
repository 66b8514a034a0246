"""Configuration: dataclass defaults -> YAML file -> `key=value` overrides on the command line.

Every script in this repo is run the same way:

    python SCRIPT.py [CONFIG.yaml] [key=value ...]        # e.g. model.num_hidden_layers=6 lr=3e-4
    python SCRIPT.py --help                               # every key, its default and meaning

A script's settings are one dataclass (fields may themselves be dataclasses: nested keys are
dotted, `model.hidden_size=256`). A section whose class has `preset_values(name) -> dict` also takes a
name: `model=0.5B` (or `model: 0.5B` in YAML) fills the whole section from that preset first, and
`model.KEY=VALUE` changes one key on top. The comment written after a field in the source becomes its
`--help` text, so the dataclass stays the single place that documents a setting.

Rules (ARCHITECTURE.md, contract 1):
- later sources win: defaults < YAML < command line;
- unknown keys are rejected with a "did you mean" suggestion, values are converted to the field's
  type (and refused when they do not convert), then each dataclass's `validate()` may add errors;
- every problem is collected and reported together in one short message, before any work starts,
  with a non-zero exit and no traceback (`run_cli`);
- YAML is read with `yaml.safe_load` only; the resolved config is saved as JSON next to outputs.

No Hydra, no registries, no exec: a dataclass is the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import os
import sys
import tokenize
import types
import typing
from typing import Any


class ConfigError(Exception):
    """A user mistake in the configuration (file, key or value). Shown as one line, no traceback."""


class UserError(Exception):
    """A user mistake found while working (bad data file, missing checkpoint). Shown as one line."""


# ----------------------------------------------------------------------------- field help


def field_help(cls) -> dict[str, str]:
    """{field name: the comment written after it in the class body} for one dataclass."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # base classes first so subclasses can override
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):  # built in a REPL: no source, no help text
            continue
        # Tokenize rather than regex so that '#' inside a string default is not read as a comment.
        last_name, depth = None, 0
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.NEWLINE or tok.type == tokenize.NL:
                last_name = None if tok.type == tokenize.NEWLINE else last_name
            if tok.type == tokenize.INDENT:
                depth += 1
            elif tok.type == tokenize.DEDENT:
                depth -= 1
            elif tok.type == tokenize.NAME and last_name is None and depth == 1 and tok.start[1] == 4:
                last_name = tok.string
            elif tok.type == tokenize.COMMENT and last_name is not None:
                helps[last_name] = tok.string.lstrip("#").strip()
                last_name = None
    return helps


# ----------------------------------------------------------------------------- type conversion


def _resolved_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    """Optional[X] / X | None -> (True, X)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp) -> str:
    optional, inner = _is_optional(tp)
    name = getattr(inner, "__name__", str(inner)).replace("typing.", "")
    if typing.get_origin(inner) in (list, tuple):
        name = str(inner).replace("typing.", "")
    return name + (" or null" if optional else "")


def convert(value: Any, tp, from_cli: bool) -> Any:
    """Convert `value` (a YAML value, or a string from the command line) to type `tp`.

    Raises ValueError with a short reason when it does not fit.
    """
    optional, tp = _is_optional(tp)
    # On the command line "null"/"none" mean None only for a field that may be None: parallel=none stays a string.
    if value is None or (optional and from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError("may not be null")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:  # allow 1e6 and 1_000_000 on the command line
                f = float(value.replace("_", ""))
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return str(value)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        if from_cli and isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [s.strip() for s in text.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        items = [convert(v, item_tp, from_cli) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"expected a mapping, got {value!r}")
    return value  # Any / unannotated


# ----------------------------------------------------------------------------- building a config


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, nested dataclasses expanded."""
    keys = []
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _apply(cfg, values: dict, errors: list[str], where: str, from_cli: bool, prefix: str = "") -> None:
    """Set fields of `cfg` from a (possibly nested) dict, collecting problems in `errors`."""
    hints = _resolved_types(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, value in values.items():
        full = prefix + str(key)
        if key not in names:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key the user wrote
                ((sub, value),) = value.items()
                full += f".{sub}"
            options = all_keys(type(cfg), prefix) + [prefix + n for n in names]
            errors.append(f"{where}: unknown key '{full}'{_suggest(full, options)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, str) and hasattr(tp, "preset_values"):
            # A section given a name is a preset: `model=0.5B` sets every key of the section from that file,
            # starting from the class defaults, so nothing of an earlier preset survives. Keys given after it
            # (`model.num_hidden_layers=6`, or a later source) change single values on top.
            try:
                preset = tp.preset_values(value)
            except ValueError as e:
                errors.append(f"{where}: '{full}' {e}")
                continue
            setattr(cfg, key, tp())
            _apply(getattr(cfg, key), preset, errors, f"{where}: preset {value!r}", from_cli=False, prefix=full + ".")
            continue
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errors.append(f"{where}: '{full}' is a section; give its keys, e.g. {full}.<key>=...")
                continue
            _apply(getattr(cfg, key), value, errors, where, from_cli, full + ".")
            continue
        try:
            setattr(cfg, key, convert(value, tp, from_cli))
        except ValueError as e:
            errors.append(f"{where}: '{full}' {e} (type {_type_name(tp)})")


def _nest(dotted: dict[str, str]) -> dict:
    """{'model.n_layers': '4'} -> {'model': {'n_layers': '4'}}."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}' conflicts with another override")
        node[leaf] = value
    return out


def _validate(cfg, prefix: str = "") -> list[str]:
    """Run `validate()` of every (nested) dataclass; each returns a list of messages."""
    errors = []
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
            errors += _validate(sub, prefix + f.name + ".")
    if hasattr(cfg, "validate"):
        errors += [f"{prefix}{msg}" if prefix and not msg.startswith(prefix) else msg for msg in cfg.validate()]
    return errors


def load_yaml(path: str) -> dict:
    """Read a YAML mapping with safe_load; a bad file is a ConfigError naming it."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{line} is not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def parse_args(cls, argv: list[str] | None = None):
    """Build a `cls` instance from argv = [CONFIG.yaml] [key=value ...]. Raises ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = cls()
    errors: list[str] = []
    yaml_paths = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    for path in yaml_paths:
        if path.startswith("-"):
            errors.append(f"command line: unknown option '{path}' (use key=value, or --help)")
            continue
        try:
            _apply(cfg, load_yaml(path), errors, path, from_cli=False)
        except ConfigError as e:
            errors.append(str(e))
    dotted = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not key:
            errors.append(f"command line: '{item}' has no key (use key=value)")
            continue
        dotted[key.strip()] = value
    # A section's preset (`model=0.5B`) is applied before that section's single keys (`model.dim=...`), whatever
    # their order on the command line.
    presets = {k: v for k, v in dotted.items() if "." not in k and any(d.startswith(k + ".") for d in dotted)}
    for group in (presets, {k: v for k, v in dotted.items() if k not in presets}):
        try:
            _apply(cfg, _nest(group), errors, "command line", from_cli=True)
        except ConfigError as e:
            errors.append(str(e))
    errors += _validate(cfg)  # a value that did not convert kept its default, so validation still makes sense
    if errors:
        more = f" (+{len(errors) - 1} more: " + "; ".join(errors[1:]) + ")" if len(errors) > 1 else ""
        raise ConfigError(errors[0] + more)
    return cfg


# ----------------------------------------------------------------------------- output


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str) -> None:
    """Write the resolved config as JSON (atomically: temp file then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(to_dict(cfg), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def help_text(cls, description: str = "") -> str:
    """`--help`: every key with its type, default and the comment from the dataclass."""
    lines = [description.strip(), ""] if description else []
    lines.append(f"usage: python {os.path.basename(sys.argv[0])} [CONFIG.yaml] [key=value ...]")
    lines.append("")

    def walk(klass, obj, prefix):
        helps = field_help(klass)
        hints = _resolved_types(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"  [{prefix}{f.name}]  {helps.get(f.name, '')}".rstrip())
                walk(tp, getattr(obj, f.name), prefix + f.name + ".")
                continue
            default = json.dumps(getattr(obj, f.name))
            lines.append(f"  {prefix + f.name:<32} {default:<14} {helps.get(f.name, '')}")

    walk(cls, cls(), "")
    return "\n".join(lines)


def format_config(cfg) -> str:
    """The resolved config as one `key=value` per line, dotted, for the start of a run."""
    flat = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and dataclasses.is_dataclass(getattr_path(cfg, prefix + k)):
                walk(v, prefix + k + ".")
            else:
                flat.append(f"{prefix}{k}={json.dumps(v)}")

    walk(to_dict(cfg), "")
    return "\n".join(flat)


def getattr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def run_cli(main, cls, description: str = "", argv: list[str] | None = None, show_config: bool = True):
    """The entry point of every script: parse, print the config, run, turn user mistakes into one line.

    `--dry-run` is spelled `dry_run=true` for the training scripts (planner.dry_run).
    ConfigError / UserError -> `error: <message>` on stderr, exit 2, no traceback.
    Ctrl-C that the script did not handle itself -> exit 130.
    """
    argv = ["dry_run=true" if a == "--dry-run" else a for a in (sys.argv[1:] if argv is None else argv)]
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, description))
        sys.exit(0)
    try:
        cfg = parse_args(cls, argv)
        if show_config and int(os.environ.get("RANK", "0")) == 0:
            print(format_config(cfg), flush=True)
        return main(cfg)
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
