"""One exception hierarchy for everything rollwire rejects.

Callers catch `RollwireError` (or a subclass) and get a message that names what is wrong;
rollwire never lets a third-party exception (PIL, tokenizers, the HF processor) escape raw
from input it was handed.
"""

from __future__ import annotations


class RollwireError(Exception):
    """Base of every error rollwire raises on purpose."""


# --- messages -------------------------------------------------------------------------------


class MessageError(RollwireError, ValueError):
    """A chat message is malformed. `index` and `field` say where."""

    def __init__(self, reason: str, *, index: int | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.index = index
        self.field = field
        where = []
        if index is not None:
            where.append(f"messages[{index}]")
        if field is not None:
            where.append(field)
        prefix = ".".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class UnknownRoleError(MessageError):
    """A message has a role outside system/user/assistant/tool."""


class ToolSpecError(MessageError):
    """The `tools` argument is not a list of function specs (`field` says which entry)."""


class MessagesFileError(RollwireError, ValueError):
    """A messages file cannot be read: not a regular file, too large, not UTF-8, not JSON, too deep."""


# --- images ---------------------------------------------------------------------------------


class ImageError(RollwireError, ValueError):
    """An image could not be loaded or is not acceptable."""


class ImageSourceError(ImageError):
    """An image part names no usable source (none given, unknown scheme, bad data URL)."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image path or file:// URL points at nothing."""


class ImageNotRegularFileError(ImageSourceError):
    """An image path names a directory, FIFO, socket or device: only regular files are read
    (a FIFO or `/dev/stdin` would block the reader forever)."""


class ImagePathNotAllowedError(ImageSourceError):
    """An image path resolves (symlinks followed) outside `ImageLimits.allowed_roots`."""


class RemoteImageTimeoutError(ImageSourceError):
    """A remote image fetch (connect, headers and body together) passed its total deadline."""


class RemoteImageNotAllowedError(ImageError):
    """An http(s) image URL was given but remote loading is not enabled."""


class ImageDecodeError(ImageError):
    """The bytes are not a readable image (corrupt, truncated, unknown format)."""


class ImageTooLargeError(ImageError):
    """Encoded bytes or decoded pixels exceed the configured limits (decompression bombs land here)."""


class EmptyImageError(ImageError):
    """The image has zero width or height."""


class UnsupportedImageModeError(ImageError):
    """The image's pixel mode cannot be converted to RGB (the HF processor fails on it too)."""


class ImageSizeUnsupportedError(ImageError):
    """The model's image processor cannot take an image of this size or aspect ratio."""


class ImageRejectedError(ImageError):
    """A Hugging Face image processor (the generic vision path) raised on this image."""


# --- features, rendering, placeholders ------------------------------------------------------


class FeatureError(RollwireError):
    """Image features are missing or inconsistent."""


class UnsupportedProcessorError(FeatureError):
    """A Hugging Face image processor cannot be adapted: its un-normalised output is not uint8
    rows with a per-image grid, or its normalisation cannot be reproduced from those rows."""


class UnknownImageError(FeatureError, KeyError):
    """An image id is not in the feature store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown image id"


class ImageReloadError(FeatureError):
    """An evicted image, recomputed from its archived original, got another id than it had
    (the archive was changed or is not lossless): its features are not trusted."""


class RenderError(RollwireError):
    """A conversation cannot be rendered by this renderer."""


class UnsupportedModelError(RenderError):
    """The model directory names a family rollwire does not support for this operation."""


class PlaceholderError(RollwireError, ValueError):
    """Image placeholder ranges and the token stream disagree (DESIGN invariant 3)."""


class ModelBuildError(RollwireError):
    """A tiny model directory could not be built."""


# --- engines --------------------------------------------------------------------------------


class EngineError(RollwireError):
    """An engine could not serve a request."""


class EngineUnavailableError(EngineError):
    """The engine cannot start: a missing dependency (torch) or a model that does not load."""


class InvalidRequestError(EngineError, ValueError):
    """A generate request is malformed (sampling settings, token ids, images for a text model)."""


class EngineClosedError(EngineError):
    """The engine was closed before or while serving the request."""


class ServerError(EngineError):
    """The server failed the request after every retry, or answered something unreadable."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PromptTooLongError(InvalidRequestError):
    """Prompt plus max_tokens exceed the server's max_model_len; nothing was sent."""


class PixelFormatError(EngineError):
    """The pixel format a server expects could not be determined or does not match rollwire's.

    `probe_answered` is False when the server could not be asked (no render endpoint).
    """

    def __init__(self, message: str, *, probe_answered: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.probe_answered = probe_answered
        self.status = status  # the probe's HTTP status, when it was answered with one


class UnsupportedServerError(InvalidRequestError):
    """The server cannot take what rollwire sends (a wire mode, an endpoint); the message says what
    to change on the server or in rollwire's settings. Nothing was generated."""


class EngineDeadError(ServerError):
    """The server's engine core died (vLLM answers a generic message and does not recover until
    it is restarted); the request was not served."""


class ServerPausedError(ServerError):
    """The server answered "Generation is paused" (vLLM 0.33's 503 during a weight update) for
    longer than the retry deadline."""


class ExpansionMismatchError(ServerError):
    """In `content_parts` mode the server expanded the prompt's images differently from rollwire's
    own render (token ids or placeholder runs differ); its completion is not used."""


class EngineTimeoutError(EngineError, TimeoutError):
    """The request's deadline passed (retries included)."""


class CompletionError(EngineError, ValueError):
    """A sampled completion is not something to continue or train on: an id outside the vocabulary,
    a vision or template-structure token, a stop token before the end, a logprob that is not a
    finite value <= 0. `position` is the completion index of the first offending token."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class WireError(RollwireError, ValueError):
    """A wire payload could not be built, or a payload or response is malformed."""


class MalformedResponseError(ServerError, WireError):
    """The server answered 200 with a body whose shape or types are wrong (a choice without int
    token ids, a finish_reason that is a list, a non-numeric logprob, ...). Nothing of it is used."""

    def __init__(self, message: str, *, status: int | None = 200) -> None:
        super().__init__(message, status=status)


# --- rollouts -------------------------------------------------------------------------------


class EnvError(RollwireError):
    """An environment failed or returned something unusable (recorded on the rollout)."""


class EnvValueError(EnvError, ValueError):
    """An environment returned a value a run directory cannot hold exactly (`problems` names each field)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        more = f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else ""
        super().__init__("; ".join(self.problems[:3]) + more)


class EnvSpecError(EnvError, ValueError):
    """An environment spec (a registered name or `package.module:factory`) names nothing usable,
    or its arguments do not fit the factory."""


class DatasetError(EnvError, ValueError):
    """Dataset rows cannot be read or are unusable (a missing column, a bad image, an unknown format)."""


class ToolError(EnvError):
    """A tool refused a call; its message goes back to the model as the tool result (raise it from
    a tool for an expected failure: a box outside the picture, a file that is not there)."""


class ToolArgumentsError(ToolError, ValueError):
    """A tool call's arguments are not JSON, not an object, or do not fit the tool's signature."""


class ToolDefinitionError(RollwireError, TypeError):
    """A function cannot be a tool: a parameter without a type hint or without a JSON schema."""


# --- transport ------------------------------------------------------------------------------


class CodecError(RollwireError, ValueError):
    """A value cannot be encoded (unsupported type or dtype), or a payload is malformed, truncated
    or corrupted. Nothing is ever decoded by guessing (no pickle)."""


# --- training -------------------------------------------------------------------------------


class SampleError(RollwireError, ValueError):
    """A trajectory cannot become a correct training sample (missing logprobs, a sampled pad token, ...)."""


class RolloutConfigError(RollwireError, ValueError):
    """Rollout or run settings are out of range."""


class ConfigFileError(RolloutConfigError):
    """A config file cannot be read, is not TOML, or holds an unknown key or a value of the wrong type."""


class StoreError(RollwireError):
    """A run directory is corrupted, truncated where it must not be, or a row is not honest JSON."""


class ManifestMismatchError(StoreError):
    """A resume's settings differ from the run's `run.json`; `differences` maps field -> (run, now)."""

    def __init__(self, run_dir: str, differences: dict[str, tuple[object, object]]) -> None:
        self.differences = differences
        listed = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, a, b in
                           ((k, *v) for k, v in differences.items()))
        super().__init__(f"{run_dir} was written with other settings ({listed}); use another --out "
                         "to start a new run")


# --- viewing runs ---------------------------------------------------------------------------


class ViewError(RollwireError, ValueError):
    """A run cannot be shown as asked (an unknown rollout id, an output path that is a folder)."""


class MissingExtraError(RollwireError, ImportError):
    """An optional feature needs a package that is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        self.package, self.extra = package, extra
        super().__init__(f"{feature} needs {package}, which is not installed: pip install 'rollwire[{extra}]'")


# --- the OpenAI-compatible front --------------------------------------------------------------


class FrontRequestError(RollwireError, ValueError):
    """A `/v1/chat/completions` request the front cannot serve as asked; `param` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)
