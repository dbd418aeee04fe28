"""--resume: read what an existing output holds, and refuse one made with other settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

from vitcore.errors import ResumeMismatchError
from vitcore.inputs.base import identity_of
from vitcore.store.reader import HDF5_SIGNATURE, BeingWritten, DamagedFile, open_for_reading
from vitcore.store.schema import REQUIRED, SCHEMA_VERSION, StoreSettings, compared, stored_value


@dataclass
class ResumeState:
    done: set[bytes]  # inputs (inputs.base.identity_of) of the committed rows
    failed: list[bytes]  # inputs of the recorded failures, in the table's order
    roots: list[str]
    committed: int
    failed_committed: int


def check_resumable(path: str, settings: StoreSettings) -> ResumeState:
    """Read an existing output and refuse, naming the difference, when its settings differ."""
    with open_for_reading(path, "resume") as h5:
        attrs = h5.attrs
        _refuse_unresumable(path, attrs)
        _refuse_differences(path, attrs, [(attribute, attribute.value(settings)) for attribute in compared()])
        roots = json.loads(attrs["roots"])
        committed = int(attrs["committed"])
        failed_committed = int(attrs["failed_committed"])
        keys = h5["paths"].asstr()[:committed] if committed else []
        index = h5["root_index"][:committed]
        done = {identity_of(roots[i], k) for i, k in zip(index, keys)}
        failed = []
        if failed_committed:
            keys = h5["failed/paths"].asstr()[:failed_committed]
            index = h5["failed/root_index"][:failed_committed]
            failed = [identity_of(roots[i], k) for i, k in zip(index, keys)]
        return ResumeState(done=done, failed=failed, roots=roots, committed=committed,
                           failed_committed=failed_committed)


def check_resumable_file(path: str) -> None:
    """A file --resume cannot continue whatever the settings (not HDF5, not ours, damaged, unreadable,
    a virtual merge, another schema): refused torch-free, before the run's settings are known."""
    problem = existing_file_problem(path)
    if problem is not None:
        kind, words = problem
        if kind == "not ours":
            raise _not_ours(path, words)
        raise ResumeMismatchError(f"cannot resume {path}: it is {words}; give another -o"
                                  + (" (or --overwrite to replace it)" if kind == "damaged" else ""))
    with open_for_reading(path, "resume") as h5:
        _refuse_unresumable(path, h5.attrs)


def existing_file_problem(path: str) -> tuple[str, str] | None:
    """Why an existing ``path`` cannot be continued, as (kind, words): ("not ours", "an empty file" /
    "not an HDF5 file" / "an HDF5 file of another program"), ("damaged", "a damaged HDF5 file (…)")
    or ("unreadable", "a file this user may not read"). Somebody else's file must not be advised
    --resume, nor --overwrite first. None: an output of vit-extract (complete or not), or a file
    that cannot be told now (held open for writing)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
    except PermissionError:
        return "unreadable", "a file this user may not read (permission denied)"
    except OSError:
        return None
    if not head:
        return "not ours", "an empty file"
    if head != HDF5_SIGNATURE:  # (an output never has a user block before its signature)
        return "not ours", "not an HDF5 file"
    try:
        with open_for_reading(path, "read") as h5:
            return None if _written_by_us(h5.attrs) else ("not ours", "an HDF5 file of another program")
    except BeingWritten:
        return None
    except DamagedFile as err:  # its signature is there, and it does not open: cut short or overwritten
        return "damaged", f"a damaged HDF5 file ({err.detail})"
    except Exception:  # noqa: BLE001 - damage met past the opening: said where it is met
        return None


def _written_by_us(attrs) -> bool:
    return "vit_extract_version" in attrs


def _not_ours(path: str, words: str) -> ResumeMismatchError:
    return ResumeMismatchError(f"cannot resume {path}: it is not a vit-extract output ({words}); give another -o "
                               "(--overwrite would replace what it holds)")


def _refuse_unresumable(path: str, attrs) -> None:
    if not _written_by_us(attrs):
        raise _not_ours(path, "an HDF5 file of another program")
    if any(name not in attrs for name in REQUIRED):
        raise ResumeMismatchError(f"cannot resume {path}: it is not a complete vit-extract output file; use --overwrite")
    if attrs.get("merged") == "virtual":
        raise ResumeMismatchError(
            f"cannot resume {path}: it is a virtual view over shard files; rerun the launch that made "
            "the shards (they resume) and merge again, or merge without --virtual into a file that can grow"
        )
    if int(attrs["schema_version"]) != SCHEMA_VERSION:
        raise ResumeMismatchError(
            f"cannot resume {path}: schema version {attrs['schema_version']} "
            f"(this vit-extract writes {SCHEMA_VERSION}); use --overwrite or a new output"
        )


def check_known_settings(path: str, known: dict) -> None:
    """Refuse a resume on the settings known before the encoder's record is (a family that needs
    torch to make its record; check_resumable compares everything later): ``known`` maps some of
    StoreSettings' fields, each named as the attribute that records it, to their values."""
    with open_for_reading(path, "resume") as h5:
        attrs = h5.attrs
        _refuse_unresumable(path, attrs)
        settings = SimpleNamespace(**known)
        _refuse_differences(path, attrs, [(a, a.value(settings)) for a in compared() if a.name in known])


def _refuse_differences(path: str, attrs, pairs) -> None:
    """(attribute, this run's value) pairs against the file's: the first that differs, named."""
    for attribute, now in pairs:
        then = stored_value(attrs, attribute)
        if attribute.differs(then, now):
            raise ResumeMismatchError(
                f"cannot resume {path}: the {attribute.compare} setting differs ({_difference(attribute.key(then), attribute.key(now))}); "
                "rerun with the file's settings or use --overwrite"
            )


def recorded_compute_dtype(path: str) -> str | None:
    """The compute dtype an existing output was made with (None: no such file, or not ours), so
    that --dtype auto resuming it keeps it rather than deciding afresh."""
    return _recorded(path, "compute_dtype")


def recorded_clips(path: str) -> bool | None:
    """Whether an existing output records clips' video settings (None: no such file, or not ours),
    so that a resume goes on with them whatever its inputs are."""
    preprocessing = _recorded(path, "preprocessing")
    return None if preprocessing is None else "video" in json.loads(preprocessing)


def finished_shard(path: str) -> dict | None:
    """The shard record of a finished shard file (None: unfinished, not a shard, not ours): a part an
    earlier run completed is kept as it is."""
    return recorded_shard(path) if _recorded(path, "complete") else None


def recorded_shard(path: str) -> dict | None:
    """The shard record of a shard file, finished or not (None: not a shard, not ours, unreadable)."""
    shard = _recorded(path, "shard")
    try:
        return json.loads(shard) if shard else None
    except ValueError:
        return None


def _recorded(path: str, name: str) -> str | None:
    """An existing output's attribute ``name`` as text, or None (no such file, not ours, no such attribute)."""
    try:
        with open_for_reading(path, "resume") as h5:
            value = h5.attrs.get(name)
    except Exception:  # unreadable: check_resumable says why, later
        return None
    return value.decode() if isinstance(value, bytes) else value


def _difference(then, now) -> str:
    """What differs, by key when both are JSON objects (a long record cut short would hide it)."""
    try:
        before, after = json.loads(then), json.loads(now)
    except (TypeError, ValueError):
        before = after = None
    if isinstance(before, dict) and isinstance(after, dict):
        if before.get("family", after.get("family")) != after.get("family", before.get("family")):
            return (f"the file was made by the {before.get('family')} encoder family, this run uses {after.get('family')}: "
                    "give the file's --model / --weights")
        return "; ".join(_differences(before, after)[:4])
    return f"file: {_short(then)}; this run: {_short(now)}"


def _differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """'key: file A, this run B' for each key whose values differ; nested objects key by key."""
    out = []
    for k in sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)):
        then, now = before.get(k), after.get(k)
        if isinstance(then, dict) and isinstance(now, dict):
            out += _differences(then, now, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: file {_short(then)}{_option_for(k, before) if not prefix else ''}, "
                       f"this run {_short(now)}")
    return out


# Preprocessing keys a user sets with an option of the same run (the rest come from the weights).
OPTION_OF = {"backend": "--processor", "decode": "--decode", "resolution": "--resolution", "resize": "--resize"}


def _option_for(key: str, before: dict) -> str:
    """' (--processor pil)': the option that gives the file's value, where one does."""
    option = OPTION_OF.get(key)
    return f" ({option} {before[key]})" if option and isinstance(before.get(key), str) else ""


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "…"
