"""The ``mmfw`` command line. User mistakes print one clear message and exit 2."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .parallel.distributed import world_from_env
from .spi.errors import MmfwError, PluginError, RecipeError
from .spi.trust import ALLOW_ENV


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MmfwError as err:
            rank = world_from_env().rank
            if rank == 0:
                click.secho(f"error: {err}", fg="red", err=True)
            elif not isinstance(err, (RecipeError, PluginError)):  # those, rank 0 has said
                click.secho(f"error (rank {rank}): {err}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmfw")
@click.option("--allow-code", is_flag=True,
              help="Let the recipe (or the run directory's recipe) run code on this machine: "
              "pipe: shard URLs (shell commands) and trust_remote_code (Python from a model's "
              f"repository). Refused without it. Same as {ALLOW_ENV}=1; torchrun ranks and "
              "sweep subprocesses inherit it.")
def main(allow_code: bool) -> None:
    """Train and evaluate image-text dual encoders from TOML recipes.

    A recipe is input, not code: values that would run code (a pipe: shard URL, a model's
    trust_remote_code) are refused unless you pass --allow-code.
    """
    if allow_code:
        os.environ[ALLOW_ENV] = "1"  # inherited by torchrun ranks and sweep subprocesses


_set = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                    help="Override a recipe key, e.g. --set loss.temperature=0.05 (repeatable).")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_set
@click.option("--resume", is_flag=True, help="Continue the run in the run directory.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run directory first.")
@_friendly
def run(recipe: Path, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train RECIPE and evaluate it; writes <run.output_dir>/<run.name>/."""
    from .config.recipe import load_recipe
    from .run.dispatch import train

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    from .parallel.distributed import world_from_env

    result = train(load_recipe(recipe, overrides), resume=resume, overwrite=overwrite)
    if world_from_env().is_main:  # under torchrun, one copy of the result
        click.echo(json.dumps(result.metrics, indent=2))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_set
@_friendly
def check(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE (keys, types, plugin names and options) without training."""
    from .config.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    click.echo(f"{recipe}: ok")
    click.echo(r.to_toml())


@main.command("list")
@click.argument("kind", required=False)
@click.option("--filter", "pattern", default=None, help="Wildcard on names, e.g. '*contrast*'.")
@click.option("--options", "show_options", is_flag=True, help="Show each component's options.")
@click.option("--models", "show_models", is_flag=True,
              help="With KIND encoder: known pretrained models (true widths) and size presets.")
@_friendly
def list_(kind: str | None, pattern: str | None, show_options: bool, show_models: bool
          ) -> None:
    """List installed plugins (all kinds, or one KIND: encoder, loss, ...)."""
    from .registry import KINDS, options_class, provider
    from .registry import available as avail
    from .spi.options import describe

    if show_models:
        if kind not in (None, "encoder"):
            raise click.UsageError("--models lists encoder models: mmfw list encoder --models")
        _list_models(pattern)
        return
    kinds = [kind] if kind else list(KINDS)
    for k in kinds:
        names = avail(k, pattern)
        click.secho(f"{k} ({len(names)})", bold=True)
        for n in names:
            click.echo(f"  {n:<22} {provider(k, n)}")
            if show_options:
                for row in describe(options_class(k, n)):
                    click.echo(f"      {row['name']} = {row['default']}  ({row['type']}) "
                               f"{row['doc']}")


def _list_models(pattern: str | None) -> None:
    """The known-model table (``mmfw_models`` hook) and the size presets (``mmfw_presets``)."""
    import fnmatch

    from .registry import known_models, presets

    rows = [r for r in known_models() if not pattern or fnmatch.fnmatch(r.name, pattern)]
    click.secho(f"models ({len(rows)}): widths are the models' real output widths", bold=True)
    click.echo(f"  {'name':<42} {'encoder':<12} {'modality':<8} {'width':>5} {'input':>9}  note")
    for r in rows:
        unit = "px" if r.modality == "image" else "tok"
        click.echo(f"  {r.name:<42} {r.encoder:<12} {r.modality:<8} {r.width:>5} "
                   f"{f'{r.input_size} {unit}':>9}  {r.note}")
    table = presets()
    click.secho(f"presets ({len(table)}): model.preset = \"<name>\"", bold=True)
    for p in sorted(table.values(), key=lambda p: p.width):
        click.echo(f"  {p.name:<8} {p.width:>5}  vision {p.vision.get('name')} "
                   f"{p.vision.get('model', '')}  +  text {p.text.get('name')} "
                   f"{p.text.get('model', '')}  ({p.note})")


@main.command("eval")
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default=None, help="Split to evaluate (default: the recipe's).")
@click.option("--data", "data", multiple=True, metavar="KEY=VALUE",
              help="Override a [data] key of the run's recipe, e.g. --data test_images=5000.")
@click.option("--batch-size", type=int, default=None)
@_friendly
def eval_(run_dirs: tuple[Path, ...], split: str | None, data: tuple[str, ...],
          batch_size: int | None) -> None:
    """Evaluate the model in a run directory: Recall@1/5/10 both ways and rsum, as JSON.

    Several RUN_DIRS (or one ensemble directory) are evaluated as an ensemble: their cosine
    similarities are averaged, on the first run's data.
    """
    from .run.loaded import evaluate

    target = run_dirs[0] if len(run_dirs) == 1 else list(run_dirs)
    click.echo(json.dumps(evaluate(target, split=split, data=data, batch_size=batch_size),
                          indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the page (default: RUN_DIR/report.html).")
@_friendly
def report(run_dir: Path, out: Path | None) -> None:
    """Write a self-contained HTML report of RUN_DIR: recipe, metrics, diagnostics, plots."""
    from .tools.report import write_report

    click.echo(str(write_report(run_dir, out)))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="A recipe key and its values (repeatable; every combination runs).")
@_set
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Settings trained at once, each in its own `python -m mmfw run` process.")
@click.option("--resume", is_flag=True, help="Keep settings that already finished; rerun the "
              "rest.")
@click.option("--overwrite", is_flag=True, help="Rerun every setting, deleting its run directory.")
@_friendly
def sweep(recipe: Path, grid: tuple[str, ...], overrides: tuple[str, ...], jobs: int,
          resume: bool, overwrite: bool) -> None:
    """Train RECIPE once per combination of --grid values; compare them in one table and plot."""
    from .tools.sweep import plan_sweep, run_sweep

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    run_sweep(plan_sweep(recipe, grid, overrides), jobs=jobs, resume=resume, overwrite=overwrite)
