"""The one command-line and YAML parser of train, evaluate and plan.

`parse_args` reads `[--config FILE.yaml] [--key value ...]` into a validated TrainConfig: flags
override the file, which overrides the caller's defaults. A YAML file gives keys flat or grouped
under the section names. Every value is typed from the schema (`parse_value`), and errors name the
key. `add_keys` lends the same typed, documented keys to another command's argparse parser (the
planner's and the evaluator's), beside their own options.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
import warnings

import yaml

from bco_jax.argv import join_negative_values, parse_bool, parse_mesh
from bco_jax.config.schema import KEY_ALIASES, SECTIONS, TrainConfig, field_type, help_text, key_table
from bco_jax.config.validate import validate
from bco_jax.errors import ConfigError, clip, short


def parse_value(key: str, raw, annotation):
    """Turn a CLI string (or a YAML value) into the field's type; errors name the key."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else ()
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if union else annotation
    if isinstance(raw, str) and optional and raw.lower() in ("none", "null"):
        return None
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"--{key}: a value is required")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(raw, str):
                raw = [] if raw.strip() in ("", "[]") else [x.strip() for x in raw.split(",")]
            return [parse_value(key, x, item) for x in raw]
        if base is bool:
            return parse_bool(raw)
        if isinstance(raw, bool) and base in (int, float):
            raise ValueError("expected a number")
        if base is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError("expected an integer")
            return int(raw)
        if base is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--{key}: cannot read {short(raw)} ({clip(str(err))})") from None


def unknown_key(key: str) -> str:
    """The message for a key no section has, with close matches."""
    close = [k for k in key_table() if k.startswith(key[:4])][:3]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown config key {short(key)}{hint}"


def build_config(values: dict) -> TrainConfig:
    """A validated, resolved TrainConfig from key -> value (already typed or strings)."""
    table = key_table()
    sections = {name: {} for name in SECTIONS}
    for key, raw in values.items():
        if key in KEY_ALIASES:
            warnings.warn(f"config key {key!r} is now {KEY_ALIASES[key]!r}", DeprecationWarning, stacklevel=2)
            key = KEY_ALIASES[key]
        if key not in table:
            raise ConfigError(unknown_key(key))
        section, _ = table[key]
        sections[section][key] = parse_value(key, raw, field_type(section, key))
    try:
        built = {name: SECTIONS[name](**kw) for name, kw in sections.items()}
    except ValueError as err:  # DataConfig's own checks
        raise ConfigError(str(err)) from None
    return validate(TrainConfig(**built))


# -------------------------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {short(key)} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _flatten_yaml(doc: dict, where: str) -> dict:
    """Grouped sections into one namespace: a key under the wrong section, or given twice with
    different values (flat and grouped, or in two sections), is refused naming it."""
    table = key_table()
    flat, origin = {}, {}
    for key, value in (doc or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            items = [(k, v, key) for k, v in value.items()]
        else:
            items = [(key, value, None)]
        for k, v, section in items:
            if not isinstance(k, str):
                raise ConfigError(f"--config {where}: key {short(k)} is not a name")
            name = KEY_ALIASES.get(k, k)
            if name in SECTIONS and name not in table:
                raise ConfigError(f"--config {where}: section {name}: must be a mapping of keys")
            if name not in table:
                raise ConfigError(f"--config {where}: {unknown_key(name)}")
            if section is not None and name in table and table[name][0] != section:
                raise ConfigError(f"--config {where}: key {short(k)} is under {section}:, but belongs to "
                                  f"{table[name][0]}:")
            if name in flat and flat[name] != v:
                raise ConfigError(f"--config {where}: key {short(name)} is given twice with different values "
                                  f"({origin[name]}: {short(flat[name])}, {section or 'top level'}: {short(v)})")
            flat[name], origin[name] = v, section or "top level"
    return flat


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; anything near this is not one
MAX_CONFIG_NODES = 10_000  # values after YAML's aliases are expanded (an anchor bomb stops here)


def read_yaml(path: str) -> dict:
    """The keys of a YAML config file, flat; ConfigError naming the file (and key or line). The
    file's size and its size once aliases are expanded are bounded."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
        text = raw.decode("utf-8")
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start})") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot read ({clip(_one_line(err))})") from None
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {err}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys")
    if _count_nodes(doc, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
        raise ConfigError(f"--config {path}: more than {MAX_CONFIG_NODES} values once its aliases are expanded: "
                          "not a config file")
    return _flatten_yaml(doc, path)


def _count_nodes(doc, limit: int) -> int:
    """Values in `doc` with every alias expanded, counted up to just past `limit` (a recursive or
    exponentially aliased document stops there)."""
    count, stack = 0, [doc]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)
    return count


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# ------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None, prog: str = "python -m bco_jax.train",
               defaults: dict | None = None) -> TrainConfig:
    """`[--config FILE.yaml] [--key value ...]`: flags override the file, which overrides `defaults`
    (e.g. the embedded demo's settings); --help lists every key."""
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog=prog, description="Align a causal LM with BCO (or DPO, IPO, NCA, "
                                     "KTO, BCE) from thumbs-up / thumbs-down feedback.",
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of keys (flat, or grouped under model/loss/optim/run/data)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{f.name}", metavar="VALUE", help=help_text(f))
    for old in KEY_ALIASES:
        parser.add_argument(f"--{old}", metavar="VALUE", help=argparse.SUPPRESS)
    parsed, unknown = parser.parse_known_args(argv)
    for token in unknown:
        if token.startswith("--"):
            build_config({token[2:].split("=")[0]: None})  # raises, naming the key and close matches
        raise ConfigError(f"unexpected argument {token!r}: keys are given as --key value")
    args = vars(parsed)
    values = dict(defaults or {})
    config_file = args.pop("config", None)
    if config_file:
        values.update(read_yaml(config_file))
    values.update(args)
    return build_config(values)


def add_keys(parser: argparse.ArgumentParser, defaults: dict, *, helps: dict | None = None,
             required: tuple[str, ...] = ()) -> None:
    """Add trainer keys (`name -> default`) to another command's `parser`, typed, checked and
    documented from the schema: a Literal key takes its choices, a list key a comma-separated list,
    `mesh` is read as its (data, fsdp, tensor) tuple. `helps` replaces a key's help text. Give the
    command's argv through `join_negative_values` first (`--mesh -1,8,1`)."""
    table = key_table()
    for name, default in defaults.items():
        section, f = table[name]
        annotation = field_type(section, name)
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        doc = (helps or {}).get(name) or f.metadata["help"]
        parser.add_argument(f"--{name}", type=_typed(name, annotation), default=default, choices=choices,
                            required=name in required, help=doc if default is None else f"{doc} (here: {default})")


def _typed(name: str, annotation):
    """An argparse `type` for key `name`: its errors are argparse's usage errors."""
    def convert(raw):
        try:
            return parse_mesh(raw) if name == "mesh" else parse_value(name, raw, annotation)
        except ConfigError as err:
            # argparse names the argument itself
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"--{name}: ").removeprefix(f"{name}: ")) from None
    convert.__name__ = name
    return convert
