"""User-facing errors. Anything raised as a RefvllmError is printed without a traceback by the CLI."""

from __future__ import annotations


class RefvllmError(Exception):
    """Base class of errors caused by user input (data, config, paths), shown as one clear message."""


class ConfigError(RefvllmError):
    """A config file, key or value is wrong. The message names the key."""


class DataError(RefvllmError):
    """A sample is malformed. Carries the sample's index in its file, its id and a specific reason."""

    def __init__(self, reason: str, index: int | None = None, sample_id: str | None = None,
                 category: str | None = None):
        self.reason = reason
        self.index = index
        self.sample_id = sample_id
        self.category = category  # short key for summaries (e.g. 'rle_malformed'); see docs/data-format.md
        super().__init__(self._render())

    def __reduce__(self):
        # Pickle by fields (DataLoader workers and process pools send errors between processes).
        return (DataError, (self.reason, self.index, self.sample_id, self.category))

    def _render(self) -> str:
        where = []
        if self.index is not None:
            where.append(f"sample {self.index}")
        if self.sample_id is not None:
            where.append(f"id {self.sample_id!r}")
        return f"{' '.join(where)}: {self.reason}" if where else self.reason

    def with_sample(self, index: int | None, sample_id: str | None) -> DataError:
        """The same error, naming the sample (used where the low-level code did not know it)."""
        return DataError(
            self.reason,
            self.index if self.index is not None else index,
            self.sample_id if self.sample_id is not None else sample_id,
            self.category,
        )


class ModelInputError(RefvllmError):
    """The model's inputs disagree with each other (e.g. placeholder count vs. feature rows)."""


def unexpected_error(e: BaseException) -> DataError:
    """A DataError (category ``internal``) for an exception that the data checks did not foresee, naming its type
    (the training loader skips such a sample, ``refvllm validate`` reports it; either way the run goes on)."""
    text = str(e).strip().splitlines()
    detail = f": {ascii(text[0])[1:-1][:300]}" if text else ""
    return DataError(f"unexpected {type(e).__name__}{detail} (a refvllm bug or an input it does not check yet; "
                     "please report it)", category="internal")
