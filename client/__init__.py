"""The modelpress Python SDK (``Client``, ``Job``) and its typed errors; the CLI lives in ``client.cli``."""

from client.errors import (
    APIBadRequest,
    APIError,
    APIServerError,
    APIUnavailable,
    APIValidationError,
    AuthenticationFailed,
    ChecksumMismatch,
    ConnectionFailed,
    JobFailed,
    JobWasCancelled,
    ModelpressError,
    PayloadTooLarge,
    ResourceConflict,
    ResourceNotFound,
    WaitTimeout,
)
from client.jobs import Job
from client.sdk import Client, infer_dataset_format, infer_model_format
from client.transport import RetryPolicy

__all__ = [
    "APIBadRequest",
    "APIError",
    "APIServerError",
    "APIUnavailable",
    "APIValidationError",
    "AuthenticationFailed",
    "ChecksumMismatch",
    "Client",
    "ConnectionFailed",
    "Job",
    "JobFailed",
    "JobWasCancelled",
    "ModelpressError",
    "PayloadTooLarge",
    "ResourceConflict",
    "ResourceNotFound",
    "RetryPolicy",
    "WaitTimeout",
    "infer_dataset_format",
    "infer_model_format",
]
