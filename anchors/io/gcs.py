"""gs:// paths: one quick check before any work, and storage errors in words.

Beam's GCS client is patient by design: without credentials it looks for them with retries
(about 18 s per process) before connecting anonymously, and it retries each request for up to
120 s. A command that cannot reach a bucket should say so in seconds, so every command checks its
gs:// paths first (one credential lookup, bounded retries) and tells Beam what it found.

With STORAGE_EMULATOR_HOST set (a local emulator), access is anonymous and no credentials are
looked up. Off Google Cloud, NO_GCE_CHECK=true keeps google-auth from probing the metadata
server at its link-local address."""

from __future__ import annotations

import contextlib
import functools
import logging
import os

from anchorscan.anchors.errors import EnvironmentFailure, MissingFileError
from anchorscan.anchors.io.uris import Location, glob_prefix

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
CHECK_SECONDS = 10.0  # all attempts of one check together
REQUEST_TIMEOUT = (3.05, 5.0)  # connect, read (seconds)
CREDENTIALS_HINT = (
    "set up Application Default Credentials (`gcloud auth application-default "
    "login`, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json), or point "
    "STORAGE_EMULATOR_HOST at a local emulator"
)


class GcsSetupError(EnvironmentFailure):
    """gs:// paths cannot be used as this machine is set up (no credentials, access denied,
    storage unreachable): the environment's, exit status 3; the message says what to set."""


def bucket_and_prefix(uri: str) -> tuple[str, str]:
    """The bucket of a gs:// path or pattern, and the object prefix before any glob character."""
    bucket, _, name = uri[len("gs://") :].partition("/")
    return bucket, glob_prefix(name)


# Seconds to connect and between two reads of a transfer (not the whole transfer).
TRANSFER_TIMEOUT = (10.0, 60.0)
# Called once per process when no credentials are found: the Beam layer registers one that tells
# Beam's own GCS client the same answer (transforms/listing.py).
ANONYMOUS_HOOKS: list = []


def _credentials():
    return _credentials_for(os.environ.get(EMULATOR_VARIABLE))[0]


@functools.cache
def _credentials_for(emulator: str | None):
    """(Application Default Credentials or None for anonymous access, their project), looked
    up once per process and without retries; Beam's GCS client in this process then uses the
    same answer."""
    credentials = project = None
    if not emulator:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, project = google.auth.default()
        except DefaultCredentialsError:
            logging.warning(
                "no Google Cloud credentials found; gs:// paths are read anonymously "
                "(public buckets only). To use yours, %s",
                CREDENTIALS_HINT,
            )
    if credentials is None:
        for hook in ANONYMOUS_HOOKS:
            hook()
    return credentials, project


def client():
    return _client_for(os.environ.get(EMULATOR_VARIABLE))


@functools.cache
def _client_for(emulator: str | None):
    """A storage client for checks and error messages (the endpoint follows the emulator)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[attr-defined]  # a namespace package

    credentials, project = _credentials_for(emulator)
    if credentials is None:
        return storage.Client(project="<none>", credentials=AnonymousCredentials())
    return storage.Client(project=project, credentials=credentials)


def _bucket_and_object(uri: str) -> tuple[str, str]:
    bucket, _, name = uri[len("gs://") :].partition("/")
    if not name:
        raise MissingFileError(f"{uri}: names a bucket, not an object")
    return bucket, name


def blob(uri: str):
    """The object a gs:// URI names (not fetched)."""
    bucket, name = _bucket_and_object(uri)
    return client().bucket(bucket).blob(name)


def existing_blob(uri: str):
    """The object with its metadata (size), or None where it does not exist."""
    bucket, name = _bucket_and_object(uri)
    return client().bucket(bucket).get_blob(name, timeout=TRANSFER_TIMEOUT)


def _bounded_retry():
    from google.api_core.retry import Retry
    from google.cloud.storage.retry import _should_retry

    return Retry(predicate=_should_retry, initial=0.25, maximum=2.0, multiplier=2.0, timeout=CHECK_SECONDS)


def _endpoint() -> str:
    # The storage client's own order: the emulator, then an endpoint override, then Google's.
    return (
        os.environ.get(EMULATOR_VARIABLE)
        or os.environ.get("API_ENDPOINT_OVERRIDE")
        or "storage.googleapis.com"
    )


def _innermost(error: BaseException) -> BaseException:
    """The storage error inside Beam's BeamIOError wrappers (one per path of a batch)."""
    details = getattr(error, "exception_details", None)
    while details:
        error = next(iter(details.values()))
        details = getattr(error, "exception_details", None)
    return error


def _bucket_exists(bucket: str) -> bool:
    from google.api_core.exceptions import NotFound

    try:
        list(client().list_blobs(bucket, max_results=1, timeout=REQUEST_TIMEOUT, retry=_bounded_retry()))
    except NotFound:
        return False
    except Exception:  # not knowable from here; the caller reports the first error
        return True
    return True


def describe(uri: str, error: BaseException, is_listing: bool = False) -> Exception:
    """The exception to raise for a storage ``error`` on gs:// ``uri``: FileNotFoundError for a
    missing bucket or object, GcsSetupError for access and connection problems, with a sentence
    that names the path and what to do."""
    from google.api_core import exceptions
    from google.auth.exceptions import InvalidOperation

    error = _innermost(error)
    bucket, _ = bucket_and_prefix(uri)
    if isinstance(error, (FileNotFoundError, GcsSetupError)):
        return error
    if isinstance(error, exceptions.NotFound):
        if is_listing or not _bucket_exists(bucket):
            return MissingFileError(
                f"{uri}: bucket '{bucket}' does not exist (or is not visible to these credentials)"
            )
        return MissingFileError(f"{uri}: no such object")
    # A 401 makes the client refresh its credentials, which anonymous ones cannot.
    if isinstance(error, (exceptions.Forbidden, exceptions.Unauthorized, InvalidOperation)):
        if _credentials() is None and not os.environ.get(EMULATOR_VARIABLE):
            return GcsSetupError(
                f"{uri}: access denied to anonymous requests, and no Google "
                f"Cloud credentials were found: {CREDENTIALS_HINT}"
            )
        return GcsSetupError(
            f"{uri}: access denied for the credentials in use (they need e.g. "
            f"roles/storage.objectViewer to read, objectAdmin to write): {error}"
        )
    cause = getattr(error, "cause", None) or error  # a RetryError says what it last saw
    return GcsSetupError(
        f"{uri}: cannot reach Google Cloud Storage at {_endpoint()} "
        f"({type(cause).__name__}: {cause}); check the network, a proxy "
        f"(HTTPS_PROXY) or {EMULATOR_VARIABLE}"
    )


@contextlib.contextmanager
def storage_errors(uri: str):
    """Storage errors on a gs:// ``uri`` raised as ``describe`` words them; others as they are."""
    try:
        yield
    except Exception as error:
        if not Location.parse(uri).is_gcs:
            raise
        raise describe(uri, error) from None


def check_paths(uris) -> None:
    """Fails within seconds, with a sentence, when a gs:// path among ``uris`` (files, prefixes
    or patterns; None is skipped) lies in a bucket that does not exist, cannot be reached or is
    not readable; one request per bucket."""
    buckets: dict[str, str] = {}
    for uri in uris:
        if uri and Location.parse(uri).is_gcs:
            buckets.setdefault(bucket_and_prefix(uri)[0], uri)
    for bucket, uri in sorted(buckets.items()):
        try:
            list(
                client().list_blobs(
                    bucket,
                    prefix=bucket_and_prefix(uri)[1],
                    max_results=1,
                    timeout=REQUEST_TIMEOUT,
                    retry=_bounded_retry(),
                )
            )
        except Exception as error:
            raise describe(uri, error, is_listing=True) from None
