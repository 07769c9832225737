"""Hugging Face Hub ids without a network: one line naming the flag to use, within seconds.

``transformers`` and ``datasets`` retry an unreachable Hub for 30-60 s and print pages of warnings before
failing. Before the first download, ``hub_local_only`` asks once per process whether the Hub answers (a
request to ``HF_ENDPOINT`` with a 3 s limit; ``HF_HUB_OFFLINE=1`` skips it) and, when it does not, either
reads the id from the local Hugging Face cache (``local_files_only=True``) or refuses with a ``UserError``
naming the flag that takes a local folder or file instead.
"""

from __future__ import annotations

import functools
import sys
import threading
import urllib.error
import urllib.request

from cache.util import UserError

PROBE_TIMEOUT_S = 3.0


def hub_offline_by_env() -> bool:
    """``HF_HUB_OFFLINE`` (or the older ``TRANSFORMERS_OFFLINE``) is set: no request may be made."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when the Hub endpoint answers an HTTP request within ``timeout`` seconds (any status counts);
    otherwise why not. Asked once per process; DNS lookups that hang are cut off too (a worker thread)."""
    from huggingface_hub import constants

    if hub_offline_by_env():
        return "HF_HUB_OFFLINE is set"
    url = constants.ENDPOINT.rstrip("/") + "/api/models?limit=1"
    result: list[str | None] = [f"no answer from {constants.ENDPOINT} within {timeout:g} s"]

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result[0] = None
        except urllib.error.HTTPError:
            result[0] = None  # it answered
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            result[0] = f"{constants.ENDPOINT} unreachable: {reason}"

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0]


def is_cached(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
    except ValueError:  # not a valid repo id
        return False


def hub_local_only(name: str, *, flag: str, what: str, filename: str = "config.json",
                   repo_type: str = "model") -> bool:
    """For a Hub id about to be loaded: ``False`` to load it normally (the Hub answers); ``True`` to load it
    with ``local_files_only=True`` (no network, but ``filename`` is in the local cache); otherwise a
    ``UserError`` that names ``flag``, e.g. ``--teacher path/to/folder``."""
    reason = hub_unreachable_reason()
    if reason is None:
        if not sys.stderr.isatty():  # download bars redraw with carriage returns: one huge line in a log
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        return False
    if is_cached(name, filename, repo_type):
        return True
    if repo_type == "dataset":
        local, example = "path", "path/to/test.jsonl"
    else:
        local = "tokenizer or model folder" if what == "tokenizer" else "model folder"
        example = "path/to/folder"
    raise UserError(f"{what} {name!r} is a Hugging Face Hub id, but the Hub cannot be reached ({reason}) and "
                    f"it is not in the local Hugging Face cache; pass a local {local} with {flag} {example}")
