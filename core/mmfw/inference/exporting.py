"""``mmfw export`` and ``mmfw push``: a run's model into a folder in one format (with its model
card), and that folder onto the Hugging Face Hub."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..registry import create
from ..run.loaded import LoadedRun, ensemble_members, load_run
from ..spi.capabilities import MergesAdapters
from ..spi.errors import MmfwError
from .card import write_card

#: the marker of a folder ``mmfw export`` wrote (so a second export may replace it)
MARKER = ".mmfw-export"
DEFAULT_FORMAT = "mmfw"


def merge_adapters(run: LoadedRun) -> list[str]:
    """Fold trainable adapters (LoRA) into the towers' weights of this loaded copy, so the
    export is plain modules; returns the towers merged."""
    merged = []
    for section, enc in (("vision", run.model.vision), ("text", run.model.text)):
        if isinstance(enc, MergesAdapters):
            enc.merge_adapters()
            merged.append(section)
    return merged


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise MmfwError(f"the export folder {output} is a file")
    if output.is_dir() and any(output.iterdir()):
        if not (output / MARKER).is_file():
            raise MmfwError(f"the export folder {output} is not empty and was not written by "
                            "`mmfw export`: choose another --output or empty it")
        shutil.rmtree(output)  # a previous export of ours: replaced whole, no stale files
    output.mkdir(parents=True, exist_ok=True)


def export_run(run_dir: str | Path, fmt: str = DEFAULT_FORMAT, output: str | Path | None = None,
               *, checkpoint: str = "auto") -> Path:
    """Export the model of ``run_dir`` as ``fmt`` into ``output`` (default
    ``RUN_DIR/export/<fmt>``) with a model card (``README.md``); returns the folder.

    The run is loaded (:func:`mmfw.load_run`), adapters are merged (:func:`merge_adapters`),
    and the exporter's ``refuse(run)`` is asked first: its reason becomes the MmfwError.
    """
    d = Path(run_dir).expanduser()
    members = ensemble_members(d)
    if members is not None:
        raise MmfwError(f"{d} is an ensemble directory: the averaged similarity of "
                        f"{len(members)} models is not one model any format holds; export a "
                        f"member ({members[0] if members else 'seed-N'}), or use "
                        f"mmfw.load({str(d)!r}) to embed with the ensemble")
    exporter = create("exporter", fmt)  # an unknown format lists the installed ones
    run = load_run(d, checkpoint=checkpoint)
    merge_adapters(run)
    reason = exporter.refuse(run)
    if reason:
        raise MmfwError(f"cannot export {d} as '{fmt}': {reason}")
    out = Path(output).expanduser() if output is not None else d / "export" / fmt
    _prepare_output(out)
    # marked first: an export that fails half-way is still ours to replace next time
    (out / MARKER).write_text(f"{fmt}\n", encoding="utf-8")
    exporter.export(run, out)
    write_card(run, out, fmt)
    return out


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the Hub could not be reached (offline, DNS, refused, timeout)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(err).__mro__}
    # requests' and httpx's connection errors (huggingface_hub uses one or the other)
    return bool(names & {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException",
                         "TransportError", "NetworkError", "ProxyError", "SSLError"})


def push_run(run_dir: str | Path, repo_id: str, fmt: str = DEFAULT_FORMAT, *,
             output: str | Path | None = None, private: bool = False,
             checkpoint: str = "auto") -> str:
    """Export ``run_dir`` (as :func:`export_run`) and upload the folder to the Hugging Face
    Hub model repository ``repo_id`` (created if missing); returns the repository's URL.

    A Hub that cannot be reached (offline, ``HF_HUB_OFFLINE=1``) or that refuses the upload
    (not logged in, no write access) is one MmfwError saying so.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    out = export_run(run_dir, fmt, output, checkpoint=checkpoint)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model",
                          commit_message=f"mmfw export ({fmt}) of {Path(run_dir).name}",
                          ignore_patterns=[MARKER])
    except HfHubHTTPError as err:
        if err.response is None:  # no answer at all: the network, not the Hub
            raise MmfwError(_offline_message(repo_id, out, err)) from None
        status = err.response.status_code
        hint = (" (log in with `hf auth login` or set HF_TOKEN, with write access to it)"
                if status in (401, 403) else "")
        raise MmfwError(f"the Hugging Face Hub refused the push to {repo_id!r} (HTTP "
                        f"{status}){hint}; the export is in {out}") from None
    except Exception as err:  # transport errors come from requests or httpx: told by type
        if _unreachable(err):
            raise MmfwError(_offline_message(repo_id, out, err)) from None
        raise
    return str(url)


def _offline_message(repo_id: str, out: Path, err: BaseException) -> str:
    detail = " ".join(str(err).split())[:160].rstrip(".")
    return (f"cannot reach the Hugging Face Hub to push {repo_id!r} (offline?): {detail}. "
            f"The export is in {out}; push it again when online.")


__all__ = ["DEFAULT_FORMAT", "MARKER", "export_run", "merge_adapters", "push_run"]
