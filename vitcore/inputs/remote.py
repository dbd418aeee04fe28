"""Inputs in object storage (``s3://``, ``gs://``, ``az://``, ``hf://``, ``https://``…) through fsspec
and each backend's own package, installed as extras (``pip install 'vit-extract[s3]'``).

    is_url(name)              a URL of a backend (not a local path, not file://)
    public_url(url)           the URL as it is recorded: no credentials (nor an http(s) query string;
                              in an object store's URL, ? and # are characters of the key)
    open_url(url)             its bytes as a seekable binary file (range requests), retried when the
                              store fails for a moment; OSError when it is missing or keeps failing
    url_version(url)          (size, version tag): a cache of what was read from it is keyed by these
    url_is_dir / url_is_file / url_exists
                              a prefix with objects under it / an object / either (a failure
                              other than a missing object: a one-line usage error)
    scrub(text)               the URLs in a message as public_url writes them
    list_prefix(url)          the objects under a prefix, relative to it, sorted

Credentials come from each backend's standard sources (environment, profiles, instance roles);
none is printed or stored. fsspec is imported only when a URL is met, so a local run keeps its
start-up time. A custom S3 endpoint (MinIO, a test server) is set as for any AWS tool
(AWS_ENDPOINT_URL) or as fsspec's FSSPEC_S3_ENDPOINT_URL.
"""

from __future__ import annotations

import re
import time
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

from vitcore.errors import UsageError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# scheme → the extra that installs its backend
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure", "hf": "hf", "http": "http", "https": "http"}
TRIES = 4  # a transient failure is tried again after 0.5, 1, 2 s, then becomes the input's failure record
BACKOFF = 0.5


def scheme_of(name: str) -> str | None:
    match = _SCHEME.match(name)
    return match.group(1).lower() if match else None


def is_url(name) -> bool:
    return isinstance(name, str) and scheme_of(name) not in (None, "file")


# Where ``?`` and ``#`` are URL syntax (a query, perhaps a signature; a fragment). In an object
# store's URL they are characters of the key (``s3://bucket/a#1.jpg`` is the object ``a#1.jpg``).
QUERY_SCHEMES = ("http", "https")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@]*@)?(.*)$", re.S)


def public_url(url: str) -> str:
    """What a file may record and print of a URL: ``s3://KEY:SECRET@bucket/a#1.jpg`` →
    ``s3://bucket/a#1.jpg``; ``https://u:p@host/a.jpg?X-Amz-Signature=…`` → ``https://host/a.jpg``."""
    if scheme_of(url) in QUERY_SCHEMES:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    match = _USERINFO.match(url)
    return match.group(1) + match.group(3) if match else url


def userinfo_of(url: str) -> str:
    """The ``user:password`` written into a URL ("" when none)."""
    match = _USERINFO.match(url)
    return (match.group(2) or "")[:-1] if match else ""


def filesystem(url: str):
    """(fsspec file system, path inside it) for ``url``; a one-line error naming the extra to install
    when the backend is missing."""
    scheme = scheme_of(url)
    extra = EXTRAS.get(scheme)
    if userinfo_of(url) and scheme not in QUERY_SCHEMES:  # s3fs would take "KEY:SECRET@bucket" as the bucket's name
        raise UsageError(f"{public_url(url)}: a user or password written into an {scheme}:// URL is not used; give "
                         "credentials as the store's own settings (environment variables, a profile, a login)")
    try:
        import fsspec  # an extra: only where a URL is met
    except ImportError:
        raise UsageError(_missing(url, extra)) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        raise UsageError(_missing(url, extra)) from None
    except ValueError as err:  # fsspec knows no such protocol
        raise UsageError(f"{public_url(url)}: {scheme}:// is not a storage vit-extract can read ({err})") from None


def _missing(url: str, extra: str | None) -> str:
    if extra is None:
        return f"{public_url(url)}: reading {scheme_of(url)}:// needs fsspec and that protocol's package"
    return f"{public_url(url)}: reading {scheme_of(url)}:// needs the {extra} extra: pip install 'vit-extract[{extra}]'"


def _transient(err: BaseException) -> bool:
    """A failure worth another try: not a missing object or a refusal, which stay as they are."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UsageError)):
        return False
    return isinstance(err, (OSError, TimeoutError, ConnectionError)) or "Timeout" in type(err).__name__


_URL_IN_TEXT = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/@'\"<>]*@)?([^\s?#'\"<>]*)([?#][^\s'\"<>]*)?")


def scrub(text: str) -> str:
    """``text`` with every URL in it as public_url gives it: no user, password or query string (a
    signed URL's signature, a token) — what a message or a failure record may hold."""
    def public(m) -> str:
        keyed = m.group(1)[:-3].lower() not in QUERY_SCHEMES  # an object store's ? and #: part of the key
        return m.group(1) + m.group(3) + (m.group(4) or "" if keyed else "")

    return _URL_IN_TEXT.sub(public, text)


def _without_secrets(text: str, url: str) -> str:
    """``text`` without the user, password, query and fragment of ``url`` wherever they stand (a
    backend may quote them outside any URL: 'Invalid bucket name "user:secret@bucket"')."""
    parts = urlsplit(url)
    secrets = (userinfo_of(url), parts.query, parts.fragment) if scheme_of(url) in QUERY_SCHEMES else (userinfo_of(url),)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "…")
    return text


def secret_free(text: str, url: str) -> str:
    """A message about ``url`` as it may be shown: no URL's credentials or query, nor ``url``'s anywhere."""
    return scrub(_without_secrets(text, url))


def _retried(what, url: str):
    """``what()``, tried again after a transient failure; the last failure in one line without secrets:
    FileNotFoundError, PermissionError, IsADirectoryError as they are, anything else an OSError."""
    for attempt in range(TRIES):
        try:
            return what()
        except UsageError:
            raise
        except Exception as err:
            if _transient(err) and attempt < TRIES - 1:
                time.sleep(BACKOFF * 2 ** attempt)
                continue
            kind = type(err) if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)) else OSError
            text = scrub(_without_secrets(" ".join(str(err).split()), url))[:300] or type(err).__name__
            prefix = "" if kind is not OSError or isinstance(err, OSError) else f"{type(err).__name__}: "
            raise kind(f"{public_url(url)}: {prefix}{text}") from None


def _listed(what, url: str):
    """``what()`` for discovery (is it a prefix, an object, what is under it): a failure other than a
    missing object is a usage error in one line — credentials, a refusal, a store that does not answer
    — since nothing of the run could be read."""
    try:
        return _retried(what, url)
    except FileNotFoundError:
        return None
    except OSError as err:
        hint = ""
        if "credential" in str(err).lower() or isinstance(err, PermissionError) or "AccessDenied" in str(err):
            hint = " (credentials come from the store's usual sources: environment variables, profiles, instance roles)"
        raise UsageError(f"cannot read {err}{hint}") from None


def open_url(url: str) -> BinaryIO:
    """The object's bytes, read by range requests as they are asked for; ``.name`` is its public URL
    (decoders name a file by it). FileNotFoundError when it is missing."""
    fs, path = filesystem(url)

    def opened():
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError:
            if fs.isdir(path):
                raise IsADirectoryError(f"{public_url(url)} is a prefix (a folder), not an object") from None
            raise
        handle.name = public_url(url)  # (some backends name a file by its bare path)
        return handle

    return _retried(opened, url)


def url_version(url: str) -> tuple[int, str]:
    """(size, version tag: ETag, generation or modification time) of an object."""
    fs, path = filesystem(url)
    info = _retried(lambda: fs.info(path), url)
    tag = next((str(info[k]) for k in ("ETag", "etag", "generation", "md5Hash", "LastModified", "mtime", "last_modified")
                if info.get(k) is not None), "")
    return int(info.get("size") or 0), tag


def url_exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(_listed(lambda: fs.exists(path), url))


def url_is_dir(url: str) -> bool:
    """A prefix with objects under it (an object of the same name may exist too: url_is_file)."""
    fs, path = filesystem(url)
    return bool(_listed(lambda: fs.isdir(path), url))


def url_is_file(url: str) -> bool:
    """An object (a key), whether or not other keys also start with its name and a slash."""
    fs, path = filesystem(url)
    return bool(_listed(lambda: fs.isfile(path), url))


def list_prefix(url: str) -> list[str]:
    """The objects under a prefix (recursively), as paths relative to it, sorted bytewise."""
    fs, path = filesystem(url)
    base = path.rstrip("/") + "/"
    found = _listed(lambda: fs.find(base, withdirs=False), url) or []
    return sorted((p[len(base):] for p in found if p.startswith(base) and not p.endswith("/")),
                  key=lambda rel: rel.encode())
