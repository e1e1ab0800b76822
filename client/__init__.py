"""The modelpress Python SDK (``Client``, ``Job``) and its typed errors; the CLI lives in ``client.cli``."""

from client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    IntegrityError,
    JobCancelled,
    JobFailed,
    ModelpressError,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    ValidationError,
)
from client.sdk import Client, Job, WaitTimeout, infer_dataset_format, infer_model_format

__all__ = [
    "ApiError",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "IntegrityError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "ModelpressError",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationError",
    "WaitTimeout",
    "infer_dataset_format",
    "infer_model_format",
]
