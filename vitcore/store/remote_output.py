"""An output in object storage (``-o s3://bucket/out/tokens.h5``): HDF5 needs a file it can seek and
rewrite, and a reader must never see half an object, so the run writes a local staging copy and
uploads it whole when it ends (done, or stopped by a signal with its committed rows: the uploaded
file resumes like a local one).

    stage(url, resume, overwrite)   the local path to write: for --resume the staged copy of an
                                    earlier run here when the store still holds what it uploaded,
                                    else the object downloaded; refusals as for a local output
    upload(local, url, complete)    the staged file → the object (one PUT, or a multipart upload
                                    the store completes at once); a complete run's copy removed
    fetched(url)                    a finished object (a Ray unit's part) → a local copy to read
    discard(local)                  a staged copy no longer wanted

Staging copies live under the cache folder (VIT_EXTRACT_CACHE_DIR), one folder per output URL. A
run killed outright (SIGKILL, power) uploads nothing: its staged copy is where ``--resume`` on
this machine goes on from, as a local output would.
"""

from __future__ import annotations

import hashlib
import json
import os

from vitcore.errors import OutputExistsError, UsageError, VitExtractError, one_line
from vitcore.inputs.remote import filesystem, public_url, scheme_of, secret_free, url_version
from vitcore.system.cache import cache_dir

UPLOADED = ".uploaded.json"  # beside the staged copy: the object's version when this machine last uploaded or downloaded it


def staging_path(url: str) -> str:
    name = public_url(url)
    folder = os.path.join(cache_dir(), "staging", hashlib.sha256(name.encode()).hexdigest()[:16])
    return os.path.join(folder, name.rstrip("/").rpartition("/")[2] or "tokens.h5")


def stage(url: str, resume: bool, overwrite: bool) -> str:
    try:
        return _stage(url, resume, overwrite)
    except VitExtractError:
        raise
    except Exception as err:  # the store refused or failed: one line, no secret
        raise VitExtractError(f"cannot write {public_url(url)} ({type(err).__name__}: "
                              f"{one_line(secret_free(str(err), url), 200)})") from None


def _stage(url: str, resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    if scheme_of(url) in ("http", "https"):
        raise UsageError(f"cannot write {public_url(url)}: http(s) is read-only here; write to s3://, gs://, az:// "
                         "or a local file")
    if scheme_of(url) in ("s3", "s3a") and "?versionId=" in url:  # s3fs reads it as a version, not a name
        raise UsageError(f"the output {public_url(url)} names a version of an object: give the object's name alone")
    fs, path = filesystem(url)
    bucket = path.split("/")[0]
    if not fs.exists(bucket):
        raise UsageError(f"cannot write {public_url(url)}: the bucket (or container) {bucket} does not exist or "
                         "cannot be seen with these credentials")
    if url.endswith("/") or fs.isdir(path):
        raise UsageError(f"the output {public_url(url)} is a prefix (a folder); give an object name such as "
                         f"{public_url(url).rstrip('/')}/tokens.h5")
    exists = fs.exists(path)
    if exists and not (resume or overwrite):
        raise OutputExistsError(f"{public_url(url)} already exists; add --resume to continue it or --overwrite to replace it")
    local = staging_path(url)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    if not resume:
        if os.path.exists(local) and not overwrite:  # a run killed before it could upload
            raise OutputExistsError(f"an unfinished run of {public_url(url)} was killed before its upload; its rows "
                                    f"are in {local}: add --resume to continue it or --overwrite to start again")
        return local  # (--overwrite: the run replaces it)
    if exists and not _staged_is_current(local, url):
        _remove(local)
        fs.get_file(path, local)  # the store's copy: what the last upload (from anywhere) holds
        _mark_current(local, url)
    return local


def fetched(url: str) -> str:
    """A finished object (a Ray unit's part) → a local copy in the staging folder, to read: the staged
    copy when it is the object's current one (a part the driver checked, kept), else downloaded."""
    local = staging_path(url)
    if _staged_is_current(local, url):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fs, path = filesystem(url)
    try:
        fs.get_file(path, local)
    except Exception as err:
        raise VitExtractError(f"could not download {public_url(url)} ({type(err).__name__}: {secret_free(str(err), url)})") from None
    return local


def _staged_is_current(local: str, url: str) -> bool:
    """A staged copy from this machine that the object has not changed since: it holds all that was
    uploaded and perhaps more (a run killed outright after its last upload)."""
    try:
        with open(local + UPLOADED) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return False
    return os.path.exists(local) and list(url_version(url)) == recorded


def upload(local: str, url: str, complete: bool) -> None:
    """The staged file → the object, whole. VitExtractError (in one line) when the store refuses it: the
    staged copy is kept, so nothing is lost."""
    fs, path = filesystem(url)
    try:
        fs.put_file(local, path)
    except Exception as err:
        raise VitExtractError(f"could not upload {local} to {public_url(url)} ({type(err).__name__}: {err}); the file is "
                      f"kept there: rerun with --resume to try again") from None
    if complete:
        _remove(local)
        return
    _mark_current(local, url)


def _mark_current(local: str, url: str) -> None:
    """The staged copy holds what the object holds now (just uploaded, or just downloaded)."""
    with open(local + UPLOADED, "w") as handle:
        json.dump(list(url_version(url)), handle)


def discard(local: str) -> None:
    """A staged copy no longer wanted (a part read for a merge), with its mark."""
    _remove(local)


def _remove(local: str) -> None:
    for name in (local, local + UPLOADED):
        if os.path.exists(name):
            os.remove(name)
