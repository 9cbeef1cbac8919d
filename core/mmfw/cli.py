"""The ``mmfw`` command line. User mistakes print one clear message and exit 2."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import MmfwError


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MmfwError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmfw")
def main() -> None:
    """Train and evaluate image-text dual encoders from TOML recipes."""


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
    from .engine import train
    from .recipe import load_recipe

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    result = train(load_recipe(recipe, overrides), resume=resume, overwrite=overwrite)
    click.echo(json.dumps(result.metrics, indent=2))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_set
@_friendly
def check(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE (keys, types, plugin names and options) without training."""
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    click.echo(f"{recipe}: ok")
    click.echo(r.to_toml())


@main.command("list")
@click.argument("kind", required=False)
@click.option("--filter", "pattern", default=None, help="Wildcard on names, e.g. '*contrast*'.")
@click.option("--options", "show_options", is_flag=True, help="Show each component's options.")
@_friendly
def list_(kind: str | None, pattern: str | None, show_options: bool) -> None:
    """List installed plugins (all kinds, or one KIND: encoder, loss, ...)."""
    from .options import describe
    from .registry import KINDS, options_class, provider
    from .registry import available as avail

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


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default=None, help="Split to evaluate (default: the recipe's).")
@click.option("--data", "data", multiple=True, metavar="KEY=VALUE",
              help="Override a [data] key of the run's recipe, e.g. --data test_images=5000.")
@click.option("--batch-size", type=int, default=None)
@_friendly
def eval_(run_dir: Path, split: str | None, data: tuple[str, ...], batch_size: int | None
          ) -> None:
    """Evaluate the model in RUN_DIR: Recall@1/5/10 both ways and rsum, as JSON."""
    from .runs import evaluate

    click.echo(json.dumps(evaluate(run_dir, split=split, data=data, batch_size=batch_size),
                          indent=2))
