"""Typed errors: every problem a user can fix has its own class, and each class names its API error code.

All of them are ValueErrors whose message is one line that names the problem and the fix. Callers
that need to tell them apart (the engine and the API map them to OpenAI error codes; the CLI prints
them as one line and exits 2) match the type or read `code`, never the wording.
"""

from __future__ import annotations


class MLLMError(ValueError):
    """Base class: a request, an input or a file the user can fix."""

    code = "invalid_request"


class ImageError(MLLMError):
    """An image that cannot be used. The message is one line: `<name>: <problem>; <fix>`."""

    code = "invalid_image"


class MessageError(MLLMError):
    """Messages that are not a well-formed conversation (roles, content parts, image placeholders)."""


class TooManyImagesError(MLLMError):
    """More images in one conversation than the model takes (`max_images`)."""

    code = "too_many_images"


class ContextLengthError(MLLMError):
    """A conversation longer than the model's context length."""

    code = "context_length_exceeded"


class CheckpointError(MLLMError):
    """A model directory that is not a loadable checkpoint, or whose files disagree with its config."""

    code = "invalid_model"


class UnexportableError(CheckpointError):
    """A model part an export format cannot express (the message names the part and what does export)."""


class GrammarError(MLLMError):
    """A schema that cannot constrain a reply (not a valid JSON Schema, or a keyword the grammar engine lacks)."""

    code = "invalid_schema"
