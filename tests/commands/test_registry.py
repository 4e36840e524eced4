"""The verb registry (tg_verify.commands.VERBS) that lets --help and dispatch skip importing every command:
it names exactly the command modules, with their own VERB, ORDER and one-line help."""

from __future__ import annotations

import importlib
import pkgutil

import tg_verify.commands as package
from tg_verify.cli import _normalise, build_parser
from tg_verify.commands import VERBS


def test_the_registry_names_every_command_module_with_its_order_and_help() -> None:
    modules = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))
    assert sorted(v.module.rsplit(".", 1)[1] for v in VERBS.values()) == modules
    for verb in VERBS.values():
        module = importlib.import_module(verb.module)
        assert (verb.name, verb.order) == (module.VERB, module.ORDER)
        parser = build_parser(verb.name)
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        assert [a.help for a in sub._choices_actions if a.dest == verb.name] == [verb.help]


def test_a_policy_path_is_the_verify_verb_and_a_verb_is_itself() -> None:
    assert _normalise(["release.yml", "--json"]) == ["verify", "release.yml", "--json"]
    assert _normalise(["--debug", "inspect", "m"]) == ["--debug", "inspect", "m"]
    assert list(VERBS) == sorted(VERBS, key=lambda name: (VERBS[name].order, name))
