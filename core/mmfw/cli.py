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
@click.option("--task", type=click.Choice(["retrieval", "zeroshot"]), default="retrieval",
              show_default=True, help="retrieval: Recall@K by eval.protocol; zeroshot: "
              "zero-shot classification by [eval.zeroshot] (--split names its labelled split).")
@click.option("--zeroshot", "zeroshot", multiple=True, metavar="KEY=VALUE",
              help="Override an [eval.zeroshot] key, e.g. --zeroshot dataset=labelled "
              "--zeroshot options.path=imagenet/val.")
@_friendly
def eval_(run_dirs: tuple[Path, ...], split: str | None, data: tuple[str, ...],
          batch_size: int | None, task: str, zeroshot: tuple[str, ...]) -> None:
    """Evaluate the model in a run directory: Recall@1/5/10 both ways and rsum, as JSON.

    Several RUN_DIRS (or one ensemble directory) are evaluated as an ensemble: their cosine
    similarities are averaged, on the first run's data. --task zeroshot gives top-1, top-5
    and mean per-class accuracy of zero-shot classification instead.
    """
    from .run.loaded import evaluate

    target = run_dirs[0] if len(run_dirs) == 1 else list(run_dirs)
    click.echo(json.dumps(evaluate(target, split=split, data=data, batch_size=batch_size,
                                   task=task, zeroshot=zeroshot), indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the page (default: RUN_DIR/report.html).")
@click.option("--failures", type=click.IntRange(min=0), default=None, metavar="N",
              help="Worst-ranked test queries shown each way, with thumbnails (default 10; "
              "0: none, and the model is not loaded).")
@_friendly
def report(run_dir: Path, out: Path | None, failures: int | None) -> None:
    """Write a self-contained HTML report of RUN_DIR: recipe, metrics, diagnostics, plots,
    and the worst-ranked queries of the test split."""
    from .tools.report import write_report

    extra = {} if failures is None else {"failures": failures}
    click.echo(str(write_report(run_dir, out, **extra)))


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


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--last", "last", type=int, required=True, metavar="N",
              help="Average the newest N checkpoints (uniform weights).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to write (default: RUN_DIR-avg<N>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output run directory.")
@_friendly
def average(run_dir: Path, last: int, output: Path | None, overwrite: bool) -> None:
    """Average the last N checkpoints of RUN_DIR into a new run directory; compare it on val
    with each of them (table in average.md / average.json)."""
    from .tools.weights import average_run

    average_run(run_dir, last, output, overwrite=overwrite, say=click.echo)


@main.command()
@click.argument("run_a", type=click.Path(file_okay=False, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, path_type=Path))
@click.option("--alpha", "alpha", default="0,0.25,0.5,0.75,1", show_default=True,
              help="Comma-separated weights of RUN_B, in [0, 1].")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the interpolated runs (default: RUN_A-to-<RUN_B name>).")
@click.option("--overwrite", is_flag=True, help="Replace existing interpolated run directories.")
@_friendly
def interpolate(run_a: Path, run_b: Path, alpha: str, output: Path | None,
                overwrite: bool) -> None:
    """WiSE-FT: theta = (1-alpha) RUN_A + alpha RUN_B for each alpha, each written as a run
    directory and compared on val (table in interpolate.md / interpolate.json)."""
    from .tools.weights import interpolate_runs, parse_alphas

    interpolate_runs(run_a, run_b, parse_alphas(alpha), output, overwrite=overwrite,
                     say=click.echo)


# ------------------------------------------------------------------------------------------
# using a trained model: export, push, embed, search (docs/using-a-model.md)

_checkpoint = click.option("--checkpoint", type=click.Choice(["auto", "latest", "best"]),
                           default="auto", show_default=True,
                           help="Which checkpoint: the one metrics.json was made with (auto), "
                           "the latest, or the best on val.")


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", default="mmfw", show_default=True, metavar="FORMAT",
              help="mmfw (opens with mmfw.load), hf, open_clip or onnx (`mmfw list exporter`).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write (default: RUN_DIR/export/<format>).")
@_checkpoint
@_friendly
def export(run_dir: Path, fmt: str, output: Path | None, checkpoint: str) -> None:
    """Export the model of RUN_DIR in one format, with a model card (README.md)."""
    from .inference.exporting import export_run

    click.echo(str(export_run(run_dir, fmt, output, checkpoint=checkpoint)))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--format", "fmt", default="mmfw", show_default=True, metavar="FORMAT",
              help="Export format to upload (see mmfw export).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the export is written first (default: RUN_DIR/export/<format>).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@_checkpoint
@_friendly
def push(run_dir: Path, repo_id: str, fmt: str, output: Path | None, private: bool,
         checkpoint: str) -> None:
    """Export RUN_DIR and upload it to the Hugging Face Hub model repository REPO_ID."""
    from .inference.exporting import push_run

    click.echo(push_run(run_dir, repo_id, fmt, output=output, private=private,
                        checkpoint=checkpoint))


_device = click.option("--device", default=None,
                       help="torch device (default: the run's backend where available, else cpu).")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default=None, help="A split of the run's dataset (test, val, ...).")
@click.option("--modality", type=click.Choice(["image", "text"]), default="image",
              show_default=True, help="With --split: embed its images or its captions.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="A folder of image files (sub-folders included).")
@click.option("--texts", type=click.Path(path_type=Path), default=None,
              help="A text file, one caption per line.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="OUT.safetensors (embeddings, ids + metadata) or OUT.npy (+ OUT.ids.json).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@_device
@_friendly
def embed(run_dir: Path, split: str | None, modality: str, images: Path | None,
          texts: Path | None, output: Path, batch_size: int, device: str | None) -> None:
    """Embed a split, a folder of images or a file of captions with the model of RUN_DIR
    (a run, an ensemble or an mmfw export) into a collection for `mmfw search`."""
    from .inference.collection import SUFFIXES
    from .inference.embedding import embed_collection
    from .inference.model import load

    if output.suffix not in SUFFIXES:
        raise click.UsageError(f"--output must end in {' or '.join(SUFFIXES)}")
    model = load(run_dir, device=device)
    coll = embed_collection(model, split=split, modality=modality, images=images, texts=texts,
                            batch_size=batch_size)
    path = coll.save(output)
    click.echo(f"{path}: {len(coll)} {coll.modality} embeddings of width {coll.embed_dim}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--collection", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A file written by `mmfw embed`.")
@click.option("--text", default=None, help="A caption to search with.")
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An image file to search with.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--faiss-above", type=click.IntRange(min=0), default=200_000, show_default=True,
              help="Collections with more rows use faiss's exact IndexFlatIP (when faiss is "
              "installed); smaller ones a matrix product.")
@_device
@_friendly
def search(run_dir: Path, collection: Path, text: str | None, image: Path | None, k: int,
           faiss_above: int, device: str | None) -> None:
    """The K rows of a collection most similar to a caption or an image: rank, cosine score,
    id and label (path or caption)."""
    from .inference.embedding import search_collection
    from .inference.model import load

    if (text is None) == (image is None):
        raise click.UsageError("give exactly one of --text, --image")
    model = load(run_dir, device=device)
    hits = search_collection(model, collection, text=text, image=image, k=k,
                             faiss_above=faiss_above)
    for rank, score, ident, label in hits:
        click.echo(f"{rank:>4}  {score:+.4f}  {ident:>6}  {label}")
