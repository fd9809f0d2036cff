"""Model paths: a local directory or a hub id, resolved the way transformers resolves them.

Contract:
    is_local(path)                                      # an existing directory: used as it is, the hub is not asked
    resolve_file(path_or_id, "config.json", "model.vision_path", revision=None)   # -> local file path (str)
    resolve_file(path_or_id, "preprocessor_config.json", key, required=False)    # -> None when the model lacks it
    check_model(path_or_id, key, revision=None)         # a ConfigError now, instead of one deep in from_pretrained
    cached_file(path_or_id, filename, revision=None)    # the file if it is already here; never asks the network
    write_snapshot(cache, repo_id, source, revision="main")   # a local model placed in a hub cache (tests, smoke)

Anything that is not a local directory is a hub id, fetched with ``huggingface_hub.hf_hub_download``, the function
transformers' ``from_pretrained`` uses: the same cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``), the same
offline switch (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``: only the cache is read) and the same revision
pinning (a branch, tag or commit hash; ``None`` = ``main``). So a cache filled by ``hf download ID`` (or by an
earlier online run) lets a run with the hub ids of ``configs/sft.yaml`` start offline.

Every failure is a :class:`~refvllm.errors.ConfigError` of one line naming the config key and the id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from refvllm.errors import ConfigError

DEFAULT_REVISION = "main"


def is_local(path: str | os.PathLike | None) -> bool:
    """True for an existing local directory (what transformers loads from disk); anything else is a hub id."""
    return bool(path) and os.path.isdir(path)


def resolve_file(path_or_id: str, filename: str, key: str, revision: str | None = None,
                 required: bool = True) -> str | None:
    """The local path of ``filename`` of the model ``path_or_id`` (a local directory or a hub id).

    A hub id is looked up (and downloaded into the cache unless offline) at ``revision``. A file the model does
    not have returns None when not ``required``; a model that cannot be found at all is always an error.
    Raises ConfigError naming ``key`` and ``path_or_id``.
    """
    if is_local(path_or_id):
        file = Path(path_or_id) / filename
        if file.is_file():
            return str(file)
        if required:
            raise ConfigError(f"{key}: no {filename} in '{path_or_id}'")
        return None
    if not path_or_id:
        raise ConfigError(f"config key '{key}' is empty; set it to a local directory or a hub id")
    return _hub_file(path_or_id, filename, key, revision, required)


def check_model(path_or_id: str, key: str, revision: str | None = None) -> None:
    """Fail early with a clear line when a hub id cannot be had (every HF model repo has ``config.json``).
    A local directory is left to the loader, which knows which files it needs."""
    if not is_local(path_or_id):
        resolve_file(path_or_id, "config.json", key, revision)


def cached_file(path_or_id: str, filename: str, revision: str | None = None) -> str | None:
    """``filename`` of a local directory or of a hub id's cached snapshot, else None; no network request."""
    if is_local(path_or_id):
        file = Path(path_or_id) / filename
        return str(file) if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(path_or_id, filename, revision=revision)
    except HFValidationError:  # not a hub id either (e.g. a local path that does not exist yet)
        return None
    return found if isinstance(found, str) else None


def write_snapshot(cache: str | os.PathLike, repo_id: str, source: str | os.PathLike,
                   revision: str = DEFAULT_REVISION) -> str:
    """Place the local model directory ``source`` in the hub cache ``cache`` as ``repo_id`` at ``revision``
    (a branch or tag: ``refs/<revision>`` names a made-up commit whose snapshot holds the files, hard-linked to
    ``source`` where the file system allows, else copied). That is huggingface_hub's cache layout, which an
    offline run reads like a cache filled by ``hf download``. Returns the commit hash; an existing snapshot of
    the same commit is replaced."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    folder = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(source, snapshot, copy_function=_link_or_copy)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return commit


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # a real-shaped 7B checkpoint is gigabytes: no second copy on disk
    except OSError:
        shutil.copy2(src, dst)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors often add advice over several lines)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ------------------------------------------------------------------------------------------------ internals


def _hub_file(repo_id: str, filename: str, key: str, revision: str | None, required: bool) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision '{revision}'" if revision else ""
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except HFValidationError:
        raise ConfigError(f"{key}: '{repo_id}' is not a local directory, and not a hub id ('org/name') "
                          "either") from None
    except LocalEntryNotFoundError:
        # Offline, or the hub is unreachable: only the cache counts. A cached snapshot without the file means
        # the model lacks it (or it was not downloaded); no snapshot at all means the model is not here.
        if _cached_snapshot(repo_id, revision) is None:
            raise ConfigError(f"{key}: '{repo_id}'{at} is neither a local directory nor in the hub cache "
                              f"({_why_cache_only()}; looked in {_cache_dir()})") from None
        return _missing(f"{key}: '{repo_id}'{at} has no {filename} in the hub cache ({_cache_dir()})", required)
    except GatedRepoError:
        raise ConfigError(f"{key}: '{repo_id}' is a gated hub repository: accept its terms on the hub and log in "
                          "(hf auth login), or point the key at a local copy") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: '{repo_id}' is neither a local directory nor a hub repository you can read "
                          "(a typo, or a private repository: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: '{repo_id}' has no revision '{revision}'") from None
    except EntryNotFoundError:  # the repository exists but has no such file
        return _missing(f"{key}: '{repo_id}'{at} has no {filename}", required)
    except OSError as e:  # HTTP errors, a cache that cannot be written, ...
        raise ConfigError(f"{key}: cannot get {filename} of '{repo_id}'{at}: {first_line(e)}") from None


def _missing(message: str, required: bool) -> None:
    if required:
        raise ConfigError(message)
    return None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _why_cache_only() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub could not be reached"


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache's snapshot directory of ``repo_id`` at ``revision`` (a commit hash, or a branch/tag whose
    commit ``refs/<revision>`` names), or None. The layout is huggingface_hub's documented cache layout."""
    repo = Path(_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or DEFAULT_REVISION
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def config_revision(model, which: str) -> str | None:
    """The revision pinning ``model.{which}_path`` (``which``: "vision" or "llm"; ``model``: the model config,
    ``cfg.model``): its ``{which}_revision`` where it has that key, else None (the hub's ``main``)."""
    return getattr(model, f"{which}_revision", None) or None
