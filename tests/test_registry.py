"""The plugin registry: entry-point discovery, available(), create(), and its errors."""

from __future__ import annotations

import types
from collections.abc import Iterator
from importlib.metadata import entry_points

import attrs
import pytest

import mmfw
from mmfw.registry import KINDS, plugin_manager, provider, unregister

BUILT_INS = {
    "loss": ["infonce"],
    "dataset": ["synthetic"],
    "encoder": ["scratch-vision", "scratch-text"],
    "sampler": ["random"],
    "backend": ["cpu", "auto", "cuda", "mps"],
    "scheduler": ["warmup-cosine", "constant"],
    "adapter": ["linear", "identity"],
    "exporter": ["mmfw", "hf", "open_clip", "onnx"],
}


def _loss_plugin(module_name: str, factories: dict) -> types.ModuleType:
    """A throwaway plugin module implementing ``mmfw_losses``, as a third party would."""
    module = types.ModuleType(module_name)

    @mmfw.hookimpl
    def mmfw_losses():
        return dict(factories)

    module.mmfw_losses = mmfw_losses
    return module


@pytest.fixture
def registered() -> Iterator[list[object]]:
    """Plugins appended to the yielded list are unregistered after the test, whatever happens."""
    plugins: list[object] = []
    yield plugins
    for plugin in plugins:
        if plugin_manager().is_registered(plugin):
            unregister(plugin)
    # the registry is usable again for the other tests
    assert "infonce" in mmfw.available("loss")


def _register(plugins: list[object], plugin: object, name: str) -> None:
    plugins.append(plugin)
    mmfw.register(plugin, name=name)


# discovery --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILT_INS))
def test_built_in_names_are_available(kind: str) -> None:
    names = mmfw.available(kind)
    assert isinstance(names, list)
    assert names == sorted(names)
    for name in BUILT_INS[kind]:
        assert name in names


def test_available_without_kind_is_a_dict_of_every_kind() -> None:
    everything = mmfw.available()
    assert set(everything) == set(KINDS)
    assert set(KINDS) == {"encoder", "adapter", "loss", "sampler", "backend", "scheduler",
                          "dataset", "callback", "exporter"}
    for kind, names in everything.items():
        assert names == mmfw.available(kind)


def test_built_ins_come_through_the_mmfw_entry_point_group() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="mmfw")}
    assert eps, "no entry points in group 'mmfw': is mmfw installed?"
    registered_names = {name for name, _ in plugin_manager().list_name_plugin()}
    assert set(eps) <= registered_names
    # the provider of a built-in names the entry point and the distribution
    label = provider("loss", "infonce")
    assert "mmfw_losses" in label
    assert "distribution mmfw" in label


def test_wildcard_filter() -> None:
    assert mmfw.available("backend", "c*") == ["cpu", "cuda"]
    assert mmfw.available("loss", "*nce") == [n for n in mmfw.available("loss")
                                                if n.endswith("nce")]
    assert mmfw.available("loss", "no-such-*") == []
    by_kind = mmfw.available(None, "c*")
    assert by_kind["backend"] == ["cpu", "cuda"]
    assert all(n.startswith("c") for names in by_kind.values() for n in names)


# create -----------------------------------------------------------------------------------


def test_create_builds_with_options() -> None:
    loss = mmfw.create("loss", "infonce", temperature=0.05, learn_temperature=False)
    assert loss.options.temperature == 0.05
    assert loss.options.learn_temperature is False
    assert loss.temperature.value == pytest.approx(0.05)
    default = mmfw.create("loss", "infonce")
    assert default.options.temperature == pytest.approx(0.07)


def test_create_passes_context_keywords() -> None:
    adapter = mmfw.create("adapter", "linear", in_dim=12, out_dim=5)
    assert (adapter.in_dim, adapter.out_dim) == (12, 5)
    identity = mmfw.create("adapter", "identity", in_dim=7, out_dim=7)
    assert identity.out_dim == 7
    sched = mmfw.create("scheduler", "constant", total_steps=10)
    assert sched.lr_factor(3) == 1.0


def test_create_accepts_built_options_but_not_both() -> None:
    cls = mmfw.registry.options_class("loss", "infonce")
    options = cls(temperature=0.2)
    assert mmfw.create("loss", "infonce", options=options).options is options
    with pytest.raises(TypeError):
        mmfw.create("loss", "infonce", options=options, temperature=0.1)


# errors -----------------------------------------------------------------------------------


def test_unknown_name_lists_close_matches_and_installed_names() -> None:
    with pytest.raises(mmfw.PluginError) as info:
        mmfw.create("loss", "infonse")
    message = str(info.value)
    assert "infonse" in message
    assert "Did you mean 'infonce'" in message
    for name in mmfw.available("loss"):
        assert name in message
    assert "losss" not in message  # plural of the kind spelled properly


def test_unknown_name_without_close_match_still_lists_installed() -> None:
    with pytest.raises(mmfw.PluginError) as info:
        mmfw.create("backend", "quantum-annealer")
    message = str(info.value)
    assert "Did you mean" not in message
    for name in mmfw.available("backend"):
        assert name in message


def test_unknown_kind() -> None:
    with pytest.raises(mmfw.PluginError) as info:
        mmfw.available("losses")
    message = str(info.value)
    assert "unknown kind 'losses'" in message
    assert "'loss'" in message
    for kind in KINDS:
        assert kind in message
    with pytest.raises(mmfw.PluginError):
        mmfw.create("optimiser", "adamw")


def test_bad_option_name_is_a_recipe_error_naming_the_key() -> None:
    with pytest.raises(mmfw.RecipeError) as info:
        mmfw.create("loss", "infonce", temperatur=0.05)
    err = info.value
    assert err.key == "temperatur"
    assert "temperatur" in str(err)
    assert "'temperature'" in str(err)  # close match
    assert err.given == 0.05


def test_bad_option_type_and_value() -> None:
    with pytest.raises(mmfw.RecipeError) as info:
        mmfw.create("loss", "infonce", temperature="hot")
    assert info.value.key == "temperature"
    assert info.value.expected == "float"
    assert info.value.given == "hot"
    with pytest.raises(mmfw.RecipeError) as info:
        mmfw.create("loss", "infonce", temperature=0)
    assert info.value.key == "temperature"


def test_factory_without_options_rejects_options() -> None:
    with pytest.raises(mmfw.RecipeError) as info:
        mmfw.create("adapter", "identity", in_dim=4, out_dim=4, scale=2)
    assert info.value.key == "scale"
    assert "takes no options" in str(info.value)


# run-time registration --------------------------------------------------------------------


@attrs.frozen
class _ScaleOptions:
    factor: float = 1.0


class _ScaleLoss:
    Options = _ScaleOptions

    def __init__(self, options: _ScaleOptions | None = None) -> None:
        self.options = options or _ScaleOptions()


def test_register_adds_and_unregister_removes_a_component(registered: list[object]) -> None:
    plugin = _loss_plugin("third_party_losses", {"test-scale": _ScaleLoss})
    _register(registered, plugin, "third-party")
    assert "test-scale" in mmfw.available("loss")
    built = mmfw.create("loss", "test-scale", factor=3)
    assert isinstance(built, _ScaleLoss)
    assert built.options.factor == 3.0
    assert "third_party_losses" in provider("loss", "test-scale")
    unregister(plugin)
    assert "test-scale" not in mmfw.available("loss")
    with pytest.raises(mmfw.PluginError):
        mmfw.create("loss", "test-scale")


def test_duplicate_name_names_both_plugins(registered: list[object]) -> None:
    first = _loss_plugin("dup_plugin_one", {"dup-x": _ScaleLoss})
    second = _loss_plugin("dup_plugin_two", {"dup-x": _ScaleLoss})
    _register(registered, first, "dup-one")
    _register(registered, second, "dup-two")
    with pytest.raises(mmfw.PluginError) as info:
        mmfw.available("loss")
    message = str(info.value)
    assert "dup-x" in message
    assert "registered twice" in message
    for label in ("dup-one", "dup-two", "dup_plugin_one", "dup_plugin_two"):
        assert label in message


def test_duplicate_of_a_built_in_name(registered: list[object]) -> None:
    _register(registered, _loss_plugin("shadowing_plugin", {"infonce": _ScaleLoss}), "shadow")
    with pytest.raises(mmfw.PluginError) as info:
        mmfw.create("loss", "infonce")
    message = str(info.value)
    assert "'losses'" in message  # the built-in plugin's entry-point name
    assert "'shadow'" in message


def test_plugin_returning_a_non_dict_is_reported(registered: list[object]) -> None:
    module = types.ModuleType("broken_plugin")

    @mmfw.hookimpl
    def mmfw_losses():
        return ["infonce"]

    module.mmfw_losses = mmfw_losses
    _register(registered, module, "broken")
    with pytest.raises(mmfw.PluginError) as info:
        mmfw.available("loss")
    assert "broken" in str(info.value)
    assert "mmfw_losses" in str(info.value)


def test_a_misspelt_hook_name_is_refused_with_the_known_hooks() -> None:
    import types

    from mmfw.errors import PluginError
    from mmfw.hookspecs import hookimpl
    from mmfw.registry import available, register

    mod = types.ModuleType("typo_plugin")

    @hookimpl
    def mmfw_loss():  # should be mmfw_losses
        return {}

    mod.mmfw_loss = mmfw_loss
    with pytest.raises(PluginError, match="mmfw_losses"):
        register(mod, name="typo-plugin")
    assert "infonce" in available("loss")  # the manager is still usable
