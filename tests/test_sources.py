"""Tests for vitcore.inputs (loose files and discovery): finding inputs, keys, de-duplication and reversible key escaping."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from vitcore.errors import UsageError
from vitcore.inputs.base import escape_key, unescape_key
from vitcore.inputs.discover import discover
from vitcore.inputs.files import read_file_list
from vitcore.options import DEFAULT_EXTENSIONS, parse_extensions


# --------------------------------------------------------------------------- helpers


def touch(base: Path | bytes, *rels: str | bytes) -> None:
    """Create (empty-ish) files under base, making parent folders; names may be bytes."""
    for rel in rels:
        path = os.path.join(os.fsencode(base), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"x")


def keys(found) -> list[str]:
    return [s.key for s in found.sources]


def same_path(a, b) -> bool:
    return os.path.samefile(a, b)


def assert_consistent(found) -> None:
    """Invariants every discovery meets: roots absolute; sorted keys per root, roots in order; unique."""
    assert all(os.path.isabs(r) for r in found.roots)
    indices = [s.root_index for s in found.sources]
    assert indices == sorted(indices)
    for index in set(indices):
        names = [unescape_key(s.key) for s in found.sources if s.root_index == index]
        assert names == sorted(names)
    identities = {os.path.normpath(os.path.abspath(s.path)) for s in found.sources}
    assert len(identities) == len(found.sources)


def reversed_scandir(monkeypatch) -> None:
    """Make os.scandir list entries in the reverse of its normal order."""
    real = os.scandir

    def scandir(path="."):
        with real(path) as it:
            return list(it)[::-1]

    monkeypatch.setattr(os, "scandir", scandir)


TREE = ["b.jpg", "a.png", "sub/c.jpg", "sub/deeper/d.gif", "z/e.jpeg", "a/b.jpg", "a.b/c.bmp", "notes.txt", "sub/readme.md"]
TREE_IMAGES = [n for n in TREE if not n.endswith((".txt", ".md"))]


# --------------------------------------------------------------------------- folders


def test_recursive_sorted_keys_relative_to_root(tmp_path):
    """A folder is walked recursively; keys are relative to it, sorted; paths are root/key."""
    root = tmp_path / "imgs"
    touch(root, *TREE)
    found = discover([root])
    assert keys(found) == sorted(TREE_IMAGES)
    assert len(found.roots) == 1 and same_path(found.roots[0], root)
    for source in found.sources:
        assert source.root_index == 0
        assert not os.path.isabs(source.key)
        assert same_path(source.path, os.path.join(found.roots[0], source.key))
    assert found.skipped_duplicates == 0
    assert_consistent(found)


def test_order_does_not_depend_on_directory_listing_order(tmp_path, monkeypatch):
    """Same tree, folders listed in reverse order: identical result (deterministic)."""
    root = tmp_path / "imgs"
    touch(root, *TREE)
    first = discover([root])
    reversed_scandir(monkeypatch)
    assert discover([root]) == first


def test_roots_in_order_given(tmp_path):
    """Roots keep the order given (not sorted); each root's files are grouped and sorted."""
    touch(tmp_path / "b_root", "y.jpg", "x.jpg")
    touch(tmp_path / "a_root", "w.jpg", "v/u.jpg")
    found = discover([tmp_path / "b_root", tmp_path / "a_root"])
    assert [os.path.basename(r) for r in found.roots] == ["b_root", "a_root"]
    assert [(s.root_index, s.key) for s in found.sources] == [(0, "x.jpg"), (0, "y.jpg"), (1, "v/u.jpg"), (1, "w.jpg")]
    assert_consistent(found)


def test_relative_folder_recorded_as_absolute_root(tmp_path, monkeypatch):
    """A folder given relative to the working directory is recorded as an absolute root; keys omit it."""
    touch(tmp_path / "imgs", "p/q.jpg")
    monkeypatch.chdir(tmp_path)
    found = discover(["imgs"])
    assert os.path.isabs(found.roots[0]) and same_path(found.roots[0], tmp_path / "imgs")
    assert keys(found) == ["p/q.jpg"]


def test_unicode_keys_sorted(tmp_path):
    """Valid UTF-8 names are kept as is and sorted (code-point order = UTF-8 byte order)."""
    names = ["zebra.jpg", "日本.jpg", "été.png", "Apple.jpg", "a.jpg"]
    touch(tmp_path, *names)
    assert keys(discover([tmp_path])) == sorted(names)


# --------------------------------------------------------------------------- extensions


def test_default_extensions_case_insensitive(tmp_path):
    """Every default extension is found in any case; other files (and bare names) are ignored."""
    images = [f"f{i}.{ext}" for i, ext in enumerate(DEFAULT_EXTENSIONS)]
    images += ["upper.JPG", "mixed.JpEg", "shout.PNG"]
    others = ["a.txt", "b.jpgx", "c.json", "jpg", "d.jpg.bak", "e.heic_", "png"]
    touch(tmp_path, *images, *others)
    assert keys(discover([tmp_path])) == sorted(images)


@pytest.mark.parametrize("ext, wanted", [("png", {"png"}), (".PNG,jpg", {"png", "jpg"}), ([" Gif", ".TIF"], {"gif", "tif"})])
def test_extension_option_filters(tmp_path, ext, wanted):
    """--ext limits which files a folder walk takes, case-insensitively."""
    names = ["a.jpg", "b.PNG", "c.png", "d.gif", "e.tif", "f.webp"]
    touch(tmp_path, *names)
    found = keys(discover([tmp_path], extensions=ext))
    assert found == sorted(n for n in names if n.rsplit(".", 1)[1].lower() in wanted)


def test_parse_extensions():
    """parse_extensions: lower-cased, dots and spaces stripped, duplicates merged; None → defaults."""
    assert parse_extensions("png") == ("png",)
    assert set(parse_extensions(".PNG,jpg")) == {"png", "jpg"}
    assert set(parse_extensions(" .Jpg , jpeg,JPG,")) == {"jpg", "jpeg"}
    assert set(parse_extensions(["TIF", ".webp"])) == {"tif", "webp"}
    assert parse_extensions(None) == DEFAULT_EXTENSIONS


@pytest.mark.parametrize("bad", ["", ",", " . , ", []])
def test_empty_extension_list_is_usage_error(tmp_path, bad):
    """An --ext with no extension in it is a UsageError, both directly and through discover."""
    with pytest.raises(UsageError):
        parse_extensions(bad)
    touch(tmp_path, "a.jpg")
    with pytest.raises(UsageError):
        discover([tmp_path], extensions=bad)


# --------------------------------------------------------------------------- files named directly


def test_named_files_taken_whatever_extension(tmp_path, monkeypatch):
    """Named files bypass the extension filter; key = path as given; root = working directory."""
    touch(tmp_path, "notes.txt", "imgs/a.jpg", "noext")
    monkeypatch.chdir(tmp_path)
    found = discover(["notes.txt", "imgs/a.jpg", "./noext"], extensions="png")
    assert keys(found) == sorted(["notes.txt", "imgs/a.jpg", "./noext"])
    assert [s.path for s in found.sources] == keys(found)
    assert len(found.roots) == 1 and same_path(found.roots[0], tmp_path)
    assert {s.root_index for s in found.sources} == {0}


def test_named_files_and_folders_mixed(tmp_path, monkeypatch):
    """The working-directory root takes its place in the order inputs are given."""
    touch(tmp_path, "one.jpg", "dir/two.jpg")
    monkeypatch.chdir(tmp_path)
    found = discover(["dir", "one.jpg"])
    assert same_path(found.roots[0], tmp_path / "dir") and same_path(found.roots[1], tmp_path)
    assert [(s.root_index, s.key) for s in found.sources] == [(0, "two.jpg"), (1, "one.jpg")]
    assert_consistent(found)


def test_missing_positional_path_is_usage_error(tmp_path, monkeypatch):
    """A named path that does not exist is a UsageError (a typo, not a failed image)."""
    touch(tmp_path, "a.jpg")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError):
        discover(["a.jpg", "nope.jpg"])


def test_no_inputs_is_usage_error():
    """No paths and no list: UsageError."""
    with pytest.raises(UsageError):
        discover([])


# --------------------------------------------------------------------------- duplicates


def test_same_file_twice_taken_once(tmp_path, monkeypatch):
    """The same file named twice (also spelt differently) is taken once, duplicates counted."""
    touch(tmp_path, "a.jpg", "b.jpg")
    monkeypatch.chdir(tmp_path)
    found = discover(["a.jpg", "b.jpg", "a.jpg", "./a.jpg", str(tmp_path / "a.jpg")])
    assert len(found.sources) == 2
    assert sorted(os.path.basename(s.path) for s in found.sources) == ["a.jpg", "b.jpg"]
    assert found.skipped_duplicates == 3
    assert_consistent(found)


def test_file_and_its_folder_taken_once(tmp_path, monkeypatch):
    """A file named directly and found again in a named folder is taken once."""
    touch(tmp_path, "imgs/a.jpg", "imgs/b.jpg")
    monkeypatch.chdir(tmp_path)
    for inputs in (["imgs/a.jpg", "imgs"], ["imgs", "imgs/a.jpg"]):
        found = discover(inputs)
        real = sorted(os.path.realpath(s.path) for s in found.sources)
        assert real == sorted(os.path.realpath(tmp_path / "imgs" / n) for n in ("a.jpg", "b.jpg")), inputs
        assert found.skipped_duplicates == 1, inputs


def test_folder_twice_and_nested_folder_list_each_file_once(tmp_path):
    """A folder given twice, or with one of its sub-folders, still lists every file once."""
    touch(tmp_path / "imgs", "a.jpg", "sub/b.jpg")
    root, sub = tmp_path / "imgs", tmp_path / "imgs" / "sub"
    for inputs in ([root, root], [root, sub], [sub, root]):
        found = discover(inputs)
        real = sorted(os.path.realpath(os.path.join(found.roots[s.root_index], s.path)) for s in found.sources)
        assert real == sorted(os.path.realpath(root / n) for n in ("a.jpg", "sub/b.jpg")), inputs


# --------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("link, target", [("sub/loop", ".."), ("sub/deep/self", "."), ("sub/deep/up2", "../..")])
def test_symlink_loop_terminates(tmp_path, link, target):
    """A link back to an ancestor (or to its own folder) does not loop; each file is listed once."""
    root = tmp_path / "imgs"
    touch(root, "a.jpg", "sub/b.jpg", "sub/deep/c.jpg")
    os.symlink(target, root / link)
    found = discover([root])
    assert keys(found) == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg"]
    assert found.skipped_duplicates == 0
    assert found.entries_passed_over == {"folder_link_walked": 1}  # said in the summary, not skipped silently


def test_symlinked_folder_followed(tmp_path):
    """A link to a folder outside the root is followed; its files appear under the link's name."""
    touch(tmp_path / "elsewhere", "x.jpg")
    touch(tmp_path / "imgs", "a.jpg")
    os.symlink(tmp_path / "elsewhere", tmp_path / "imgs" / "link")
    assert keys(discover([tmp_path / "imgs"])) == ["a.jpg", "link/x.jpg"]


def test_two_links_to_one_folder_deterministic(tmp_path, monkeypatch):
    """A folder reachable by two names is listed once, under the same key whatever the listing order."""
    root = tmp_path / "imgs"
    touch(root, "real/x.jpg", "top.jpg")
    os.symlink("real", root / "alias")
    first = discover([root])
    assert keys(first) == ["real/x.jpg", "top.jpg"]  # its own name, though the link's sorts first
    assert first.entries_passed_over == {"folder_link_walked": 1}
    reversed_scandir(monkeypatch)
    second = discover([root])
    assert keys(second) == keys(first)


def test_broken_symlink_listed(tmp_path):
    """A dangling link named x.jpg is listed (it becomes a failure record when decoded)."""
    root = tmp_path / "imgs"
    touch(root, "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", root / "x.jpg")
    found = discover([root])
    assert keys(found) == ["ok.jpg", "x.jpg"]
    dangling = found.sources[1].path
    assert os.path.lexists(dangling) and not os.path.exists(dangling)


def test_broken_symlink_named_directly_is_taken(tmp_path, monkeypatch):
    """A dangling link named as an argument exists as a link, so it is taken (not a UsageError)."""
    os.symlink(tmp_path / "gone.jpg", tmp_path / "x.jpg")
    monkeypatch.chdir(tmp_path)
    found = discover(["x.jpg"])
    assert keys(found) == ["x.jpg"] and not os.path.exists(found.sources[0].path)


# --------------------------------------------------------------------------- --files-from


def test_files_from_list_file(tmp_path, monkeypatch):
    """A list file: blank and whitespace-only lines ignored, CRLF handled, missing files kept, folders walked."""
    touch(tmp_path, "a.jpg", "b.txt", "dir/c.png")
    (tmp_path / "list.txt").write_bytes(b"a.jpg\r\n\n   \nb.txt\nmissing.jpg\n\ndir\n")
    monkeypatch.chdir(tmp_path)
    found = discover(files_from="list.txt")
    cwd_index = next(i for i, r in enumerate(found.roots) if same_path(r, tmp_path))
    dir_index = next(i for i, r in enumerate(found.roots) if same_path(r, tmp_path / "dir"))
    pairs = {(s.root_index, s.key) for s in found.sources}
    assert pairs == {(cwd_index, "a.jpg"), (cwd_index, "b.txt"), (cwd_index, "missing.jpg"), (dir_index, "c.png")}
    assert not os.path.exists(next(s.path for s in found.sources if s.key == "missing.jpg"))
    assert_consistent(found)


def test_listed_lines_that_look_like_comments_or_are_padded_are_said_once_with_their_cause(tmp_path, monkeypatch):
    """A list's line is a path taken whole (a name may start with # or hold spaces): one that names no
    file and looks like a comment or has spaces at an end is still a failure record, and the summary
    says why once; a name that does exist so is taken, and a plain missing name draws no such note."""
    touch(tmp_path, "a.jpg", "#1.jpg", " b.jpg")
    (tmp_path / "list.txt").write_bytes(b"# my pictures\na.jpg\n a.jpg\na.jpg \n#1.jpg\n b.jpg\nmissing.jpg\n")
    monkeypatch.chdir(tmp_path)
    found = discover(files_from="list.txt")
    assert keys(found) == [" a.jpg", " b.jpg", "# my pictures", "#1.jpg", "a.jpg", "a.jpg ", "missing.jpg"]
    (note,) = found.input_notes
    assert note == ("4 listed paths name no file ('# my pictures', ' a.jpg', 'a.jpg ' …), each a failure record: "
                    "1 starting with # (a list has no comments); 2 with spaces at an end (kept: a name may hold them)")
    assert found.notes == []  # nothing passed over: each is an input, and fails as one
    assert discover(files_from="-", stdin=io.BytesIO(b"a.jpg\n")).input_notes == []
    # a list elsewhere, its paths relative to its own folder; quoted paths; file:// URLs
    (tmp_path / "lists").mkdir()
    touch(tmp_path / "lists", "near.jpg")
    (tmp_path / "lists" / "l.txt").write_text('near.jpg\n"a.jpg"\nfile:///srv/a.jpg\n')
    (note,) = discover(files_from=tmp_path / "lists" / "l.txt").input_notes
    assert note.endswith("each a failure record: 1 quoted (quotes are kept: give bare paths); 1 file:// URLs (give the "
                         f"path itself); 1 found beside the list, in {tmp_path / 'lists'} (relative paths are taken from "
                         f"the working directory, {tmp_path})"), note


def test_a_utf16_or_nul_separated_list_is_read_as_what_it_is(tmp_path, monkeypatch):
    """PowerShell's `>` writes UTF-16 (with a byte-order mark; some tools without one), and
    `find -print0` separates paths with NUL bytes (so a name may hold a newline): a list with NUL
    bytes crashed the run at its first write ("VLEN strings do not support embedded NULLs")."""
    touch(tmp_path, "été.jpg", "b.jpg", "two\nlines.jpg")
    monkeypatch.chdir(tmp_path)
    text = "été.jpg\r\nb.jpg\r\n"
    for data in (text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-16-be"),
                 "\ufeff".encode("utf-8") + text.encode("utf-8")):
        assert keys(discover(files_from="-", stdin=io.BytesIO(data))) == ["b.jpg", "été.jpg"], data[:8]
    found = discover(files_from="-", stdin=io.BytesIO(b"b.jpg\0two\nlines.jpg\0"))
    assert keys(found) == ["b.jpg", "two\nlines.jpg"] and all(os.path.exists(s.path) for s in found.sources)
    touch(tmp_path, "東京.jpg", "x", "y")
    cjk = "東京.jpg\nb.jpg\n".encode("utf-16-le")  # no byte-order mark, and no byte of it NUL-free
    assert keys(discover(files_from="-", stdin=io.BytesIO(cjk))) == ["b.jpg", "東京.jpg"]
    assert keys(discover(files_from="-", stdin=io.BytesIO(b"./x\0./y\0"))) == ["./x", "./y"]  # find -print0
    # One UTF-16 name without a mark or a newline: split at its NULs it was i, m, g, s, /, … and the
    # "/" and "." were walked as folders (a dry run counted the whole disk).
    for data in ("imgs/b.jpg".encode("utf-16-le"), "imgs/b.jpg".encode("utf-16-be")):
        assert keys(discover(files_from="-", stdin=io.BytesIO(data))) == ["imgs/b.jpg"]
    with pytest.raises(UsageError, match="looks like UTF-16 text without a byte-order mark"):
        discover(files_from="-", stdin=io.BytesIO("東京.jpg".encode("utf-16-le")))
    with pytest.raises(UsageError, match="NUL bytes inside its lines"):  # a stray NUL: not a list to guess at
        discover(files_from="-", stdin=io.BytesIO(b"b.jpg\nwh\0at.jpg\nx\n"))


def test_a_file_listed_under_two_spellings_keeps_the_first_given(tmp_path, monkeypatch):
    """README: a named file is keyed by the path as you gave it; given twice, read once, under the
    first spelling (it was the one that sorted first: an absolute path before a relative one)."""
    touch(tmp_path, "imgs/c0.jpg", "imgs/c1.jpg")
    monkeypatch.chdir(tmp_path)
    listed = f"imgs/c0.jpg\n{tmp_path}/imgs/c0.jpg\n./imgs/c0.jpg\n{tmp_path}/imgs/c1.jpg\nimgs/c1.jpg\n"
    found = discover(files_from="-", stdin=io.BytesIO(listed.encode()))
    assert sorted(keys(found)) == sorted(["imgs/c0.jpg", f"{tmp_path}/imgs/c1.jpg"]) and found.skipped_duplicates == 3


def test_files_from_stdin(tmp_path, monkeypatch):
    """files_from="-" reads the list from the given stdin (bytes), combined with positional inputs."""
    touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    monkeypatch.chdir(tmp_path)
    found = discover(["c.jpg"], files_from="-", stdin=io.BytesIO(b"\nb.jpg\n\na.jpg"))
    assert keys(found) == ["a.jpg", "b.jpg", "c.jpg"]


def test_files_from_stdin_empty_and_no_paths_is_usage_error():
    """An empty list on stdin with no other inputs is 'no inputs'."""
    with pytest.raises(UsageError):
        discover(files_from="-", stdin=io.BytesIO(b"\n\n  \n"))


def test_missing_list_file_is_usage_error(tmp_path):
    """A --files-from file that cannot be read is a UsageError."""
    with pytest.raises(UsageError):
        discover(files_from=tmp_path / "no_such_list.txt")


def test_read_file_list_keeps_any_bytes():
    """read_file_list: one path per line, non-UTF-8 bytes survive (surrogate escapes), spaces inside kept."""
    lines = read_file_list(io.BytesIO(b"caf\xe9.jpg\r\n\n with space.jpg\n"))
    assert [os.fsencode(x) for x in lines] == [b"caf\xe9.jpg", b" with space.jpg"]


# --------------------------------------------------------------------------- non-UTF-8 names and keys


def test_non_utf8_file_name_discovered(tmp_path):
    """A file whose name has bytes that are not UTF-8 is found; its key is valid UTF-8 and unescapes to
    the original bytes; its path opens the file."""
    raw_names = [b"caf\xe9.jpg", b"\xff\xfe.png", b"dir\xff/inner\xe9.jpg"]
    touch(tmp_path, *raw_names)
    found = discover([tmp_path])
    assert len(found.sources) == 3
    for source in found.sources:
        source.key.encode("utf-8")  # must not raise
        assert os.path.exists(source.path)
    assert sorted(unescape_key(k) for k in keys(found)) == sorted(raw_names)
    assert_consistent(found)


def test_non_utf8_name_in_file_list(tmp_path, monkeypatch):
    """A listed non-UTF-8 name keeps its bytes through the list, the key and unescape_key."""
    touch(tmp_path, b"na\xefve.jpg")
    (tmp_path / "list").write_bytes(b"na\xefve.jpg\n")
    monkeypatch.chdir(tmp_path)
    found = discover(files_from="list")
    assert len(found.sources) == 1
    assert unescape_key(found.sources[0].key) == b"na\xefve.jpg"
    assert os.path.exists(found.sources[0].path)


def test_backslash_in_real_name_round_trips(tmp_path):
    """A name with a literal backslash is escaped in the key and restored by unescape_key."""
    touch(tmp_path, b"a\\x41.jpg", b"b\\\\.jpg")
    found = discover([tmp_path])
    assert sorted(unescape_key(k) for k in keys(found)) == [b"a\\x41.jpg", b"b\\\\.jpg"]


ROUND_TRIP_NAMES = [
    "plain.jpg",
    "日本.jpg",
    "emoji 🙂.png",
    "",
    "back\\slash.jpg",
    "\\x41.jpg",
    "\\\\",
    "\\",
    "ends\\",
    "\\xff",
    os.fsdecode(b"caf\xe9.jpg"),
    os.fsdecode(b"\xff\xfe"),
    os.fsdecode(b"caf\xe9\\x.jpg"),
    os.fsdecode(b"\\\xff"),
    os.fsdecode(b"\xed\xa0\x80.jpg"),  # UTF-8-encoded surrogate: not valid UTF-8
    os.fsdecode(b"\xc3"),  # a truncated UTF-8 sequence
    "dir/sub/x.jpg",
]


def test_escape_unescape_round_trip():
    """For every name: the key is valid UTF-8, unescape_key(key) is the original bytes, keys are distinct."""
    escaped = []
    for name in ROUND_TRIP_NAMES:
        key = escape_key(name)
        key.encode("utf-8")
        assert unescape_key(key) == os.fsencode(name), name
        escaped.append(key)
    assert len(set(escaped)) == len(ROUND_TRIP_NAMES)


def test_valid_names_without_backslash_unchanged():
    """Valid UTF-8 names without a backslash are stored unchanged."""
    for name in ["plain.jpg", "日本.jpg", "emoji 🙂.png", "été/x.jpg", ""]:
        assert escape_key(name) == name
    assert escape_key("a\\b") != "a\\b"
    assert escape_key(os.fsdecode(b"\xff")) != os.fsdecode(b"\xff")


def test_escape_round_trip_random_bytes():
    """Round trip over many random byte names built from escape-prone pieces (seeded)."""
    rng = random.Random(1234)
    pieces = [b"\\", b"x", b"f", b"0", b"a", b"\xff", b"\xc3", b"\xa9", b"\xc3\xa9", b"\xe6\x97\xa5", b"/", b".", b"\x80"]
    seen = {}
    for _ in range(2000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        key = escape_key(os.fsdecode(raw))
        key.encode("utf-8")
        assert unescape_key(key) == raw, raw
        assert seen.setdefault(key, raw) == raw  # injective
