"""Named exceptions for bad input. Each message says what was expected and what was found.

This module imports nothing of moeinf, so every floor (models, loaders, runtime) may raise them.
"""


class MoeinfError(Exception):
    """Base class of every error moeinf raises on purpose."""


class ConfigError(MoeinfError, ValueError):
    """config.json is missing, unreadable, or holds a value of the wrong kind."""


class UnsupportedArchitectureError(MoeinfError, ValueError):
    """config.json names an architecture (or a variant of one) that moeinf cannot run."""


class CheckpointError(MoeinfError):
    """Base class of errors about the weight files of a checkpoint."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """A safetensors file named by the index (or the single model file) does not exist."""


class TruncatedShardError(CheckpointError):
    """A safetensors file is shorter than its own header says, or its header is cut off."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the model needs is in none of the checkpoint's files."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TensorShapeError(CheckpointError, ValueError):
    """A tensor on disk does not have the shape the model spec expects."""


class TensorDtypeError(CheckpointError, ValueError):
    """A tensor on disk has a dtype moeinf cannot compute with."""


class CacheDirError(MoeinfError):
    """The cache directory ($MOEINF_CACHE_DIR, else $XDG_CACHE_HOME/moeinf or ~/.cache/moeinf) is
    not a folder moeinf can use: it is a file, lies under one, or cannot be created."""


class TokenizerError(MoeinfError, ValueError):
    """Text was given but the checkpoint has no usable tokenizer.json."""


class RequestError(MoeinfError, ValueError):
    """A prompt or sampling parameter is out of range for this model."""


class LLMClosedError(MoeinfError):
    """An LLM was used (generate, submit, logits) after its close()."""


class StoreError(MoeinfError):
    """Base class of errors about the packed expert store (the disk tier)."""


class StoreChecksumError(StoreError):
    """A record of the packed expert store does not match the crc32 its header recorded."""


class StoreBufferError(StoreError, ValueError):
    """A buffer given to the packed expert store is too small, read-only or not contiguous."""


class StoreRecordError(StoreError, IndexError):
    """A (layer, expert) pair outside the model the store was built for."""


class OffloadConfigError(MoeinfError, ValueError):
    """An offloading setting is malformed: a budget (or one too small for a layer's active
    experts), a policy name, a store folder."""


class TraceFormatError(MoeinfError, ValueError):
    """A trace file (or a trace being built) is malformed: a missing array or meta key, a shape
    or dtype that disagrees with the others, sequence offsets out of order, an expert id out of
    range."""


class ReplayConfigError(MoeinfError, ValueError):
    """A trace replay is set up wrongly: an unknown link profile or model, a capacity too small
    for one layer's experts, a policy built for another model shape or another trace."""


class EAMCError(MoeinfError, ValueError):
    """An EAM, an EAM collection file or a routing trace does not have the shape or content expected."""
