"""Finding a checkpoint: a local folder in the Hugging Face layout, or a hub id downloaded once
into the Hugging Face cache with `huggingface_hub.snapshot_download`.

Only the files this package reads are fetched (config, safetensors weights, tokenizer and
preprocessor files). Where the hub cannot be reached, the error is one line that says so and
names the local-folder alternative. HF_HUB_OFFLINE=1 (read at call time) uses the cache only;
HF_ENDPOINT (read at call time) points at a mirror.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import MissingDependencyError, MultimodalError

# The files read by multimodal_models.pretrained; nothing else is downloaded.
ALLOW_PATTERNS = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "spiece.model",  # SigLIP (v1) ships its tokenizer only as a SentencePiece model
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)

# "org/name": what the hub calls a model id (a local path that exists wins).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


class HubDownloadError(MultimodalError, OSError):
    """A hub id could not be fetched (no network, unknown or gated repository)."""


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~"))


def hub_commands() -> tuple[str, str]:
    """The download and login commands of the installed huggingface_hub's CLI: `hf download` and
    `hf auth login` since 0.34 (huggingface-cli is deprecated there and gone from 1.0), else
    huggingface-cli's."""
    try:
        from huggingface_hub import __version__
    except ImportError:
        __version__ = "1"
    major, minor = (int(part) if part.isdigit() else 0 for part in (__version__.split(".") + ["0"])[:2])
    if (major, minor) >= (0, 34):
        return "hf download", "hf auth login"
    return "huggingface-cli download", "huggingface-cli login"


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as it is set now (huggingface_hub reads it only once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a checkpoint: `name_or_path` itself if it is a local folder with a config.json,
    else the hub id's snapshot in the Hugging Face cache (downloaded if need be)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a checkpoint folder")
        return path
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"'{text}' is neither a local folder nor a Hugging Face hub id (like 'org/name')")
    folder = _download(text, revision=revision, cache_dir=cache_dir)
    if not (folder / "config.json").is_file():
        raise HubDownloadError(f"'{text}' on the Hugging Face hub has no config.json: not a checkpoint this "
                               f"package reads")
    return folder


def _download(repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingDependencyError(
            f"downloading '{repo_id}' needs huggingface_hub (pip install huggingface_hub), or download it elsewhere "
            f"and pass the folder"
        ) from None
    offline = offline_mode()
    download, login = hub_commands()
    fallback = f"Download it elsewhere ({download} {repo_id} --local-dir DIR) and pass DIR."
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=list(ALLOW_PATTERNS),
            local_files_only=offline,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except hub_errors.GatedRepoError:
        raise HubDownloadError(
            f"cannot download '{repo_id}': it is gated; accept its licence on huggingface.co and log in "
            f"({login}). {fallback}"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise HubDownloadError(
            f"cannot download '{repo_id}': no such model on the Hugging Face hub (or it is private: "
            f"{login}). {fallback}"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise HubDownloadError(f"cannot download '{repo_id}': it has no revision {revision!r}") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as exc:
        if offline:
            reason = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
        else:
            cause = exc.__cause__ or exc.__context__ or exc
            detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            reason = f"no network ({type(cause).__name__}: {detail})"
        raise HubDownloadError(f"cannot download '{repo_id}': {reason}. {fallback}") from None
    return Path(folder)
