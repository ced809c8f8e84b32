"""The ``smoothpurify`` command. Reaches modalities only through the plugin registry."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from smoothpurify import SmoothPurifyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Backdoor purification toolkit: prepare data, train/attack, evaluate, purify.")

ModalityOpt = typer.Option("image", "--modality", "-m", help="modality plugin name (see `smoothpurify list`)")
ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="parameters file")
ProfileOpt = typer.Option(None, "--profile", help="params.yaml profile (default: the file's `profile`)")


def _params(params: Path, profile: Optional[str]) -> dict:
    from smoothpurify.params import load_params

    return load_params(params, profile)


@app.command("list")
def list_plugins() -> None:
    """Installed modalities with their models and attacks."""
    from smoothpurify.modality import available_modalities, get_modality

    for name in available_modalities():
        mod = get_modality(name)
        typer.echo(f"{name}: models {', '.join(mod.model_names())}; attacks {', '.join(mod.attack_names())}")


@app.command()
def prepare(modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
            force: bool = typer.Option(False, help="rebuild even if current")) -> None:
    """Build the train / clean-validation / test splits under runs/<modality>/data."""
    from smoothpurify import pipeline

    meta = pipeline.prepare(modality, _params(params, profile), force=force)
    typer.echo(f"data from {meta['source']}: {meta['sizes']}")


@app.command()
def attack(name: str = typer.Argument(..., help="attack name, or 'benign' for the clean reference model"),
           modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt,
           force: bool = typer.Option(False, help="retrain even if current")) -> None:
    """Train a model backdoored by NAME (or the benign model) on the prepared data."""
    from smoothpurify import pipeline

    p = _params(params, profile)
    mod_names = _modality(modality).attack_names()
    if name != pipeline.BENIGN and name not in mod_names:
        raise SmoothPurifyError(f"unknown attack {name!r}; choose benign or one of: {', '.join(mod_names)}")
    meta = pipeline.train_attack(modality, p, name, force=force)
    typer.echo(f"trained {name}: final loss {meta['train_loss'][-1]:.4f} in {meta['train_seconds']} s")


@app.command()
def evaluate(name: str = typer.Argument(..., help="attack whose model and trigger to evaluate"),
             modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """ACC / ASR / RA of the benign and the NAME-backdoored model, under NAME's trigger."""
    from smoothpurify import pipeline
    from smoothpurify.report import ATTACK_COLUMNS, attack_rows, print_table

    p = _params(params, profile)
    pipeline.evaluate(modality, p, name)
    print_table(attack_rows(pipeline.run_root(p, modality) / "metrics", [name]), f"{modality}: {name}", ATTACK_COLUMNS)


@app.command("fetch-data")
def fetch_data(modality: str = ModalityOpt, params: Path = ParamsOpt, profile: Optional[str] = ProfileOpt) -> None:
    """Locate (or fetch from the Debian package) the embedded default dataset; same as `prepare`."""
    prepare(modality=modality, params=params, profile=profile, force=False)


def _modality(name: str):
    from smoothpurify.modality import get_modality

    return get_modality(name)


def main() -> None:
    try:
        app()
    except SmoothPurifyError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
