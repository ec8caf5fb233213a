"""Flags generated from the typed config: declared once in tunelab.config, with their type, default and help."""
from __future__ import annotations

import argparse

from tunelab import config as config_mod
from tunelab.config import Config, fields_by_key, iter_fields
from tunelab.errors import UserError


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting: `--section.field`, plus the short contract flag where the field declares one."""
    parser.add_argument("config", nargs="?", help="YAML config file; flags and --set override it.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="Set any config key, e.g. --set train.lr=3e-5 (repeatable).")
    for key, f, tp in iter_fields():
        if key in skip:
            continue
        names = [f"--{key}"] + ([f.metadata["flag"]] if f.metadata.get("flag") and f.metadata["flag"] != f"--{key}" else [])
        inner, _ = config_mod._base_type(tp)
        extra = dict(nargs="?", const="true") if inner is bool else {}
        default = f.default if not callable(getattr(f, "default_factory", None)) else f.default_factory()
        allowed = config_mod.choices(tp)
        valid = f"; valid: {f.metadata['range']}" if f.metadata["range"] else \
            f"; one of: {', '.join(allowed)}" if allowed else ""
        parser.add_argument(*names, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V",
                            help=f"{f.metadata['help']} (default: {default}{valid})".replace("%", "%%"), **extra)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = config_mod.load_yaml(args.config) if args.config else Config()
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            config_mod.set_value(cfg, key[4:], value, f"--{key[4:]}")
    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"--set needs KEY=VALUE, got '{item}'", "--set")
        key, value = item.split("=", 1)
        config_mod.set_value(cfg, key.strip(), value, "--set")
    return cfg



def _flag(key: str, f) -> str:
    """The field's short flag where it declares one (--max-length), else its name as a flag (--text-column)."""
    return f.metadata.get("flag") or "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def add_section_flags(parser: argparse.ArgumentParser, section: str, names: tuple[str, ...]) -> None:
    """Flags for a few settings of one config section (`data`), for commands that take only those: each flag's
    type, default and help come from the field, so they cannot drift from the training command's."""
    for name in names:
        key = f"{section}.{name}"
        f, _ = fields_by_key()[key]
        parser.add_argument(_flag(key, f), dest=f"{section}:{name}", default=f.default, metavar="V",
                            help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))


def section_from_args(args: argparse.Namespace, section: str):
    """The config section (a DataConfig for `data`) with the values of the flags `add_section_flags` added,
    each checked against its field's type and range."""
    cfg = Config()
    for dest, value in vars(args).items():
        if dest.startswith(f"{section}:"):
            key = f"{section}.{dest.split(':', 1)[1]}"
            config_mod.set_value(cfg, key, value, _flag(key, fields_by_key()[key][0]))
    return getattr(cfg, section)
