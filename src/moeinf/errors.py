"""The one exception tree of moeinf.

Every error a user can cause or meet derives from `MoeinfError`; its `str()` is a one-line message the
CLI prints on stderr (no traceback) before exiting with `exit_code`. Any module may add a subclass
here (additive edits only); programming errors stay ordinary Python exceptions.
"""

from __future__ import annotations


class MoeinfError(Exception):
    """Base of every user-facing error. The message is one line, written for the user."""

    exit_code: int = 1


# --- model references and the catalog -----------------------------------------------------------


class InvalidModelName(MoeinfError):
    """A model reference or store name that cannot be parsed (empty, `..`, spaces, bad revision)."""

    exit_code = 2


class UnknownAlias(MoeinfError):
    """A bare name that is neither a catalog alias nor a local directory."""

    exit_code = 2


# --- download -----------------------------------------------------------------------------------


class DownloadError(MoeinfError):
    """Base for failures while fetching a checkpoint from the hub."""


class RepoNotFound(DownloadError):
    """The hub has no such repository (or revision)."""


class RevisionNotFound(DownloadError):
    """The repository exists but the requested revision does not."""


class GatedRepo(DownloadError):
    """The repository needs an accepted licence and a token (HF_TOKEN)."""


class NetworkError(DownloadError):
    """The hub could not be reached."""


class DiskFull(MoeinfError):
    """Not enough free disk space for the operation."""


class UnsafeCheckpoint(MoeinfError):
    """A checkpoint that only ships pickle weights (`*.bin`, `*.pt`): refused, never unpickled."""


class InvalidCheckpoint(MoeinfError):
    """A checkpoint folder or repo missing required files (config.json, weights) or malformed."""


# --- architectures and resharding ---------------------------------------------------------------


class UnsupportedArchitecture(MoeinfError):
    """A config whose model_type no adapter handles; the message lists the supported families."""


class InvalidSpec(MoeinfError):
    """A config with a setting the runtime does not understand (unknown routing, attention, ...)."""


class UnmappedTensor(MoeinfError):
    """A checkpoint tensor no adapter rule accounts for; the message names the tensor."""


class ReshardError(MoeinfError):
    """Resharding could not account for the checkpoint (missing, duplicated or mis-shaped tensors)."""


# --- the store ----------------------------------------------------------------------------------


class StoreError(MoeinfError):
    """Base for problems with the local model store."""


class ModelNotFound(StoreError):
    """No complete model of that name in the store."""


class IncompleteModel(StoreError):
    """A model folder exists but its pull did not finish (no manifest)."""


class UnsupportedStoreVersion(StoreError):
    """A manifest written by a different store format version: `moeinf pull` again."""


class CorruptModel(StoreError):
    """Files in the store do not match their manifest (size or sha256)."""


class StoreLocked(StoreError):
    """Another process holds the lock on this model (a concurrent pull or rm)."""


# --- options and the expert cache ---------------------------------------------------------------


class BadOption(MoeinfError):
    """A command-line option or API parameter with a value moeinf cannot use."""

    exit_code = 2


class BudgetTooSmall(MoeinfError):
    """A memory budget that cannot hold what one decode step needs (one layer's top-k experts)."""

    exit_code = 2


class BudgetTooLarge(MoeinfError):
    """A memory budget larger than the memory available for it: honouring it would swap or get the
    process killed, so it is refused before anything is allocated."""

    exit_code = 2


class KVCacheDoesNotFit(MoeinfError):
    """The KV cache of the requested context length exceeds the memory left beside the dense weights."""

    exit_code = 2


class DenseDoesNotFit(MoeinfError):
    """The dense (non-expert) weights alone exceed the memory available on the compute device."""


class CorruptExpertFile(StoreError):
    """An expert file met during a run is truncated or malformed; the message names the file."""


# --- generation (tokenizer, chat template, context) ---------------------------------------------


class TokenizerError(MoeinfError):
    """The checkpoint's tokenizer files are missing or unusable."""


class ChatTemplateError(MoeinfError):
    """The chat template failed to render (it may call raise_exception on an unsupported conversation)."""


class ContextTooLong(MoeinfError):
    """A prompt (or conversation) longer than the context the model was loaded with."""


class ModelExists(StoreError):
    """A different model already has the requested store name."""


# --- routing traces and the trace library -------------------------------------------------------


class InvalidTrace(MoeinfError):
    """A routing trace file (.npz) that is missing fields or has inconsistent shapes or values."""

    exit_code = 2


class QuantizedCheckpoint(UnsupportedArchitecture):
    """A checkpoint with a quantization_config (FP8, GPTQ, AWQ, ...): moeinf reads bf16/fp16/fp32 weights."""


# --- the HTTP server (moeinf serve) -------------------------------------------------------------


class BadRequest(MoeinfError):
    """An HTTP API request the server cannot use: malformed JSON, a missing or mistyped field."""

    exit_code = 2


class RequestTooLarge(BadRequest):
    """An HTTP request body over the server's limit."""


class QueueFull(MoeinfError):
    """The server's request queue is full: try again later (HTTP 503 with Retry-After)."""


class MissingDependency(MoeinfError):
    """An optional dependency a command needs is not installed; the message says how to install it."""


class BenchRunFailed(MoeinfError):
    """A measured `moeinf bench` run (its worker process) failed; the message says which and why, `kind`
    names the worker's error class when it raised one."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
