"""Finding inputs: files, folders (recursive), file lists and stdin → one sorted, de-duplicated list.

Loose files are files.py's; the files that hold many images are each a container kind, a module
listed in CONTAINERS that answers

    claims(name)                                  is a file of this name mine?
    scan(path, key, root_index, exts, options, not_taken)
                                                  → (its inputs in its own order, an Unlisted
                                                    record of what could not be read, or None);
                                                    what it holds but passes over, counted in not_taken
    holds_nothing(path, exts)                     → the words for a file of it with no image
    open_inside(container, inner, options)        → the bytes of one input read back by its key
    passed_over_note(keys)                        (only a kind whose scan raises PassedOver)
    close_readers()                               close what this process keeps open to read forward

A new kind of input is one module and one entry here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

from vitcore.errors import UsageError
from vitcore.inputs import parquet, tar
from vitcore.inputs.base import (Discovery, NotTaken, PassedOver, Unlisted, escape_key, input_exists, input_is_dir, input_is_file,
                                 open_input, path_identity, source_path, unescape_key)
from vitcore.inputs.files import Source, read_file_list, walk, walk_prefix
from vitcore.inputs.remote import is_url, public_url, url_exists, url_is_dir, url_is_file
from vitcore.options import ContainerOptions, parse_extensions

CONTAINERS = (tar, parquet)


def container_for(name: str):
    """The container kind (module) that takes a file of this name, or None (a loose file)."""
    return next((kind for kind in CONTAINERS if kind.claims(name)), None)


def discover(
    paths: Iterable[str | os.PathLike] = (),
    files_from: str | os.PathLike | None = None,
    extensions: Iterable[str] | str | None = None,
    stdin: BinaryIO | None = None,
    containers: ContainerOptions | None = None,
) -> Discovery:
    """Every input image, in a deterministic order: roots in the order given, keys sorted within
    each, the images inside a container file in the container's order, where its name sorts.

    Directories are walked recursively (symlinked directories followed once; loops are harmless)
    and filtered by extension; files named directly are taken whatever their extension. Container
    files (tar shards, Parquet), named or found in folders, give one input per image inside;
    ``containers`` says which sidecars and columns travel with them. A name with braces that does
    not exist as written is expanded (``{00000..00099}.tar``).
    """
    found = _Found(parse_extensions(extensions), containers or ContainerOptions())
    if files_from is not None and os.fspath(files_from) != "-":
        found.list_folder = os.path.dirname(os.path.abspath(files_from))
    seen_dirs: set[str] = set()
    for given, listed in named_inputs(paths, files_from, stdin):
        if is_url(given):
            _take_url(found, given, listed)
        elif os.path.isdir(given):
            root = os.path.abspath(given)
            index = found.root_index(root)
            files, unreadable = walk(root, found.exts, seen_dirs, lambda name: container_for(name) is not None,
                                     found.not_taken)
            for rel in files:
                found.take(index, rel, os.path.join(root, rel), named=False)
            found.unlisted += [Unlisted(escape_key(os.path.join(rel, "") if rel else "./"), index, reason)
                               for rel, reason in unreadable]
        elif (exists := os.path.lexists(given)) or listed:
            # Named files are taken as given; a listed one that is missing becomes a failure record.
            found.take(found.root_index(os.getcwd()), given, given, named=True)
            if not exists:
                found.missing_listed.append(given)
        else:
            raise UsageError(f"input {given} does not exist")
    return found.discovery()


def _take_url(found: "_Found", given: str, listed: bool) -> None:
    """A URL: an object (even where other keys also start with its name and a slash), else a prefix,
    walked as a folder is. An object named in a list is taken without a request (a list may name
    millions; a missing one becomes its failure record); one named on the command line must exist."""
    public = public_url(given)
    folder, _, name = public.rstrip("/").rpartition("/")

    def take_object() -> None:
        found.take(found.root_index(folder), name, given, named=True)

    if listed and container_for(name) is None:
        take_object()
    elif not given.endswith("/") and url_is_file(given):
        take_object()
    elif url_is_dir(given):
        root = public.rstrip("/")
        index = found.root_index(root)
        for rel in walk_prefix(given, found.exts, lambda n: container_for(n) is not None, found.not_taken):
            found.take(index, rel, f"{given.rstrip('/')}/{rel}", named=False)
    elif listed:
        take_object()
    else:
        raise UsageError(f"input {public} does not exist (no object and no prefix of that name)")


def named_inputs(paths, files_from, stdin) -> list[tuple[str, bool]]:
    """(path, came from a list) for every path given or listed, brace ranges expanded."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]  # one path, not a sequence of characters
    named = [(os.fspath(p), False) for p in paths]
    if files_from is not None:
        if os.fspath(files_from) == "-":
            listed = read_file_list(stdin or sys.stdin.buffer)
        else:
            try:
                with open(files_from, "rb") as handle:
                    listed = read_file_list(handle)
            except OSError as err:
                raise UsageError(f"cannot read --files-from {files_from}: {err.strerror}") from None
        named += [(p, True) for p in listed]
    if not named:
        raise UsageError("no inputs: give image files or folders, or --files-from FILE (- for stdin)")
    return [(name, listed) for given, listed in named for name in expand_braces(given)]


@dataclass
class _Found:
    """What discovery has found so far, in the order found."""

    exts: tuple[str, ...]
    options: ContainerOptions
    roots: list[str] = field(default_factory=list)
    items: list[tuple] = field(default_factory=list)  # (root index, key as bytes, place in its container, input)
    unlisted: list[Unlisted] = field(default_factory=list)
    containers: set[bytes] = field(default_factory=set)
    empty: list[str] = field(default_factory=list)
    passed_over_by_kind: dict = field(default_factory=dict)  # container kind → keys of its files with no images
    not_taken: NotTaken = field(default_factory=NotTaken)  # files (and tar members) not taken, counted
    missing_listed: list[str] = field(default_factory=list)  # listed paths that name no file (failure records)
    list_folder: str | None = None  # the folder of the --files-from file (None: stdin, or no list)

    def root_index(self, root: str) -> int:
        if root not in self.roots:
            self.roots.append(root)
        return self.roots.index(root)

    def take(self, index: int, key: str, path: str, named: bool) -> None:
        """One file: an image, or a container whose images are taken in its order."""
        kind = container_for(path)
        if kind is None or (input_is_dir(path) and not input_is_file(path)) or not input_exists(path):  # gone:
            self.items.append((index, os.fsencode(key), 0, Source(path=path, key=escape_key(key), root_index=index)))
            return                                                                 # its own failure record
        self.containers.add(path_identity(path))
        try:
            inside, problem = kind.scan(path, key, index, self.exts, self.options, self.not_taken)
        except PassedOver:
            if named:
                raise
            self.passed_over_by_kind.setdefault(kind, []).append(key)
            return
        self.items.extend((index, os.fsencode(key), place, source) for place, source in enumerate(inside))
        if problem is not None:
            self.unlisted.append(problem)
        elif not inside:
            self.empty.append(kind.holds_nothing(path, self.exts))

    def discovery(self) -> Discovery:
        """The inputs sorted (roots in order, keys within each), each input once: under the first
        spelling given (a file listed as a.jpg and later as /abs/a.jpg keeps the key a.jpg)."""
        firsts, seen, duplicates = [], set(), 0
        for item in self.items:  # in the order given
            if item[-1].identity in seen:
                duplicates += 1
                continue
            seen.add(item[-1].identity)
            firsts.append(item)
        sources = [source for *_, source in sorted(firsts, key=lambda item: item[:3])]
        notes = [kind.passed_over_note(keys) for kind, keys in self.passed_over_by_kind.items()]
        if self.empty:  # container files with no image in them: nothing read, said rather than left out
            n = len(self.empty)
            notes.append(f"{n} container file{'s' * (n != 1)} with no image: " + "; ".join(self.empty[:3])
                         + (" …" if n > 3 else ""))
        by_extension = {ext: n for ext, n in self.not_taken.by_extension.items()
                        if ext not in self.options.keep}  # sidecars are used
        return Discovery(sources=sources, roots=self.roots, skipped_duplicates=duplicates, unlisted=self.unlisted,
                         containers=self.containers, empty=self.empty, notes=notes, passed_over=by_extension,
                         entries_passed_over=dict(self.not_taken.entries),
                         input_notes=[_missing_listed_note(self.missing_listed, self.list_folder)] if self.missing_listed else [],
                         image_columns=tuple(sorted({s.column for s in sources if hasattr(s, "column")})))


LOOKED_BESIDE = 1000  # missing listed paths looked for beside the list, at most


def _missing_listed_note(paths: list[str], list_folder: str | None) -> str:
    """Listed paths that name no file, said once with what likely went wrong: a list's line is a
    path taken whole (a name may start with # or hold spaces or quotes), relative to the working
    directory. Each is a failure record as well; this says why, where a record says only "missing"."""
    n = len(paths)
    shown = ", ".join(repr(p) for p in paths[:3]) + (" …" if n > 3 else "")
    causes = []
    for test, words in ((lambda p: p.startswith("#"), "starting with # (a list has no comments)"),
                        (lambda p: p != p.strip(), "with spaces at an end (kept: a name may hold them)"),
                        (lambda p: p[:1] in "\"'" and p[-1:] == p[:1], "quoted (quotes are kept: give bare paths)"),
                        (lambda p: p.startswith("file://"), "file:// URLs (give the path itself)")):
        hits = sum(map(test, paths))
        if hits:
            causes.append(f"{hits} {words}")
    beside = list_folder is not None and list_folder != os.getcwd()
    looked = paths[:LOOKED_BESIDE] if beside else []  # (a list of millions: a sample says it as well)
    found_beside = sum(1 for p in looked if not os.path.isabs(p) and os.path.lexists(os.path.join(list_folder, p)))
    if found_beside:
        at_least = "at least " if len(paths) > len(looked) else ""
        causes.append(f"{at_least}{found_beside} found beside the list, in {list_folder} (relative paths are taken "
                      f"from the working directory, {os.getcwd()})")
    return (f"{n} listed path{'s' * (n != 1)} name{'s' * (n == 1)} no file ({shown}), each a failure record"
            + (f": {'; '.join(causes)}" if causes else ""))


def close_readers() -> None:
    """Close what the container kinds keep open in this process to read their inputs forward."""
    for kind in CONTAINERS:
        kind.close_readers()


def expand_braces(given: str) -> list[str]:
    """``data/{00000..00099}.tar`` → the 100 names, as WebDataset expands shard lists (the braceexpand
    package); a name that exists as written, or has no braces, is taken as it is."""
    if "{" not in given or (url_exists(given) if is_url(given) else os.path.lexists(given)):
        return [given]
    from braceexpand import braceexpand  # only for names with braces

    try:
        names = list(braceexpand(given))
    except Exception:  # unbalanced braces: a literal name after all
        return [given]
    return names or [given]


def open_original(root: str, key: str, image_column: str | None = None) -> BinaryIO:
    """The bytes of the input a stored (root, key) names: a loose file, or an input inside a
    container (the key's first part that is a container file says which; ``image_column`` the
    file's --image-column). OSError when it is gone."""
    path = source_path(root, key)
    if input_is_file(os.fsdecode(path)):
        return open_input(os.fsdecode(path))
    parts = unescape_key(key).split(b"/")
    for cut in range(1, len(parts)):
        container = os.path.join(os.fsencode(root), b"/".join(parts[:cut]))
        kind = container_for(os.fsdecode(container))
        if kind is not None and input_is_file(os.fsdecode(container)):
            inner = os.fsdecode(b"/".join(parts[cut:]))
            return kind.open_inside(os.fsdecode(container), inner, ContainerOptions(image_column=image_column))
    raise FileNotFoundError(f"{os.fsdecode(path)} is gone")
