"""No command writes over what it reads or replaces what a user did not ask it to: a sheet onto the
file it draws from, a run's output onto one of its inputs, an existing sheet without --overwrite, a
link replaced instead of its target. Each refused in one line before any work, nothing changed."""

import hashlib
import os

import h5py
import numpy as np
import pytest

from tests.helpers import TINY
from vitcore.errors import UsageError

RUN = ["--model", TINY, "--dtype", "float32", "--workers", "0", "-q"]


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _made(cli, photos, out, *extra):
    result = cli("run", photos, "-o", out, *RUN, *extra)
    assert result.exit_code == 0, result.output
    return out


def test_sheets_never_replace_the_file_they_read_nor_an_existing_file_unasked(cli, photos, tmp_path):
    tokens = _made(cli, photos, tmp_path / "tokens.h5")
    pooled = _made(cli, photos, tmp_path / "pooled.h5", "--pool", "mean")
    query = sorted(photos.iterdir())[0]
    before = {p: _digest(p) for p in (tokens, pooled, query)}
    refused = [
        (["show", tokens, "-o", tokens], "which this command reads"),
        (["show", tokens, "-o", tokens, "--overwrite"], "which this command reads"),
        (["similar", pooled, query, "--sheet", pooled], "which this command reads"),
        (["similar", pooled, query, "--sheet", query, "--overwrite"], "which this command reads"),
        (["show", tokens, "-o", tmp_path / "missing" / "s.png"], "does not exist"),
    ]
    for args, words in refused:
        result = cli(*args)
        assert result.exit_code == 2 and words in result.output and result.output.count("\n") == 1, (args, result.output)
    assert {p: _digest(p) for p in before} == before
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"someone's picture")
    result = cli("show", tokens, "-o", sheet)
    assert result.exit_code == 2 and "already exists" in result.output and sheet.read_bytes() == b"someone's picture"
    assert cli("show", tokens, "-o", sheet, "--overwrite").exit_code == 0 and sheet.read_bytes()[:4] == b"\x89PNG"
    result = cli("similar", pooled, query, "--sheet", sheet)
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_sheet_never_replaces_the_original_of_a_row(cli, photos, tmp_path):
    tokens = _made(cli, photos, tmp_path / "tokens.h5")
    pooled = _made(cli, photos, tmp_path / "pooled.h5", "--pool", "mean")
    victim = photos / "coffee.jpg"
    os.symlink(victim, tmp_path / "link.png")
    before = _digest(victim)
    for args in (["show", tokens, "coffee.jpg", "-o", victim, "--overwrite"],
                 ["show", tokens, "-o", victim, "--overwrite"],  # the first rows, coffee.jpg among them
                 ["show", tokens, "rocket.jpg", "-o", victim, "--overwrite"],  # not drawn, still an original
                 ["show", tokens, "rocket.jpg", "-o", tmp_path / "link.png", "--overwrite"],  # through a link
                 ["similar", pooled, "rocket.jpg", "-k", "1", "--sheet", victim, "--overwrite"]):
        result = cli(*args)
        assert result.exit_code == 2 and "is the original of a row of" in result.stderr, (args, result.output)
    assert _digest(victim) == before


def test_a_run_refuses_an_output_that_is_one_of_its_inputs(cli, photos, tmp_path):
    victim = sorted(photos.iterdir())[0]
    before = _digest(victim)
    result = cli("run", photos, "-o", victim, "--overwrite", *RUN)
    assert result.exit_code == 2 and "is one of this run's inputs" in result.output
    assert _digest(victim) == before
    listed = _made(cli, photos, tmp_path / "made.h5")  # an output listed among the inputs by name
    result = cli("run", photos, listed, "-o", listed, "--overwrite", *RUN)
    assert result.exit_code == 2 and "is one of this run's inputs" in result.output


def test_no_file_a_command_reads_is_its_output_even_with_overwrite(cli, photos, tmp_path):
    """Not only pictures: the --files-from list, the weights file (or a file in the checkpoint
    folder), and for index the file being indexed as its sidecar (-o data → data.json)."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'coffee.jpg'}\n")
    weights = tmp_path / "w.safetensors"
    assert cli("init-weights", "--model", TINY, "-o", weights).exit_code == 0
    before = {p: _digest(p) for p in (listing, weights)}
    os.symlink(weights, tmp_path / "link.h5")  # the weights, through a link
    for args in (["run", "--files-from", listing, "-o", listing],
                 ["run", photos / "coffee.jpg", "-o", weights, "--weights", weights],
                 ["run", photos / "coffee.jpg", "-o", tmp_path / "link.h5", "--weights", weights]):
        result = cli(*args, "--overwrite", "-q")
        assert result.exit_code == 2 and "which this run reads; writing it would destroy it" in result.stderr, \
            (args, result.output)
    assert {p: _digest(p) for p in before} == before
    data = tmp_path / "data.json"  # a pooled output that happens to be named .json
    assert cli("run", photos, "-o", data, *RUN, "--pool", "mean", "--overwrite").exit_code == 0
    kept = _digest(data)
    result = cli("index", data, "-o", tmp_path / "data", "--overwrite")
    assert result.exit_code == 2 and "would be the file to index itself" in result.stderr and _digest(data) == kept


def test_overwrite_through_a_link_writes_its_target_and_keeps_the_link(cli, photos, tmp_path):
    (tmp_path / "big").mkdir()
    target = _made(cli, photos, tmp_path / "big" / "tokens.h5")
    link = tmp_path / "tokens.h5"
    link.symlink_to(target)
    _made(cli, photos, link, "--overwrite", "--seed", "3")
    assert link.is_symlink() and os.readlink(link) == str(target)
    again = _made(cli, photos, tmp_path / "seed3.h5", "--seed", "3")
    with h5py.File(target) as f, h5py.File(again) as g:
        np.testing.assert_array_equal(f["tokens"][:], g["tokens"][:])  # the target holds the new run
    dangling = tmp_path / "dangling.h5"
    dangling.symlink_to(tmp_path / "nowhere" / "x.h5")
    result = cli("run", photos, "-o", dangling, "--overwrite", *RUN)
    assert result.exit_code == 2 and "does not exist" in result.output and dangling.is_symlink()


def test_a_file_list_with_a_byte_order_mark_reads_its_first_path(cli, photos, tmp_path):
    first = sorted(photos.iterdir())[0]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + str(first).encode() + b"\r\n")  # as Windows editors save it
    out = tmp_path / "x.h5"
    result = cli("run", "--files-from", listing, "-o", out, *RUN, "--json")
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert f.attrs["committed"] == 1 and f.attrs["failed_committed"] == 0


def test_a_pipe_or_a_device_is_never_an_output_nor_read_as_a_file(cli, photos, tmp_path):
    """`-o /dev/null --overwrite` as root replaced the system's /dev/null with an HDF5 file, and a
    named pipe as -o or FILE hung for ever: neither is a file, refused at once even with --overwrite."""
    from vitcore.inputs.base import special_file

    assert special_file(os.devnull) == "a character device"  # (only looked at: a test must not risk it)
    assert special_file(str(photos)) is None and special_file(str(tmp_path / "missing")) is None
    pipe = tmp_path / "pipe.h5"
    os.mkfifo(pipe)
    for extra in ([], ["--overwrite"], ["--resume"], ["--dry-run"]):
        result = cli("run", photos, "-o", pipe, *RUN, *extra)
        assert result.exit_code == 2 and "is a named pipe, not a regular file" in result.stderr, (extra, result.output)
    made = _made(cli, photos, tmp_path / "made.h5")
    for args in (["info", pipe], ["show", pipe, "-o", tmp_path / "s.png"], ["similar", pipe, "x.jpg"],
                 ["merge", pipe, "-o", tmp_path / "m.h5"]):
        result = cli(*args)  # (each would block on the pipe, were it opened)
        assert result.exit_code == 2 and "named pipe" in result.stderr and result.stderr.count("\n") == 1, (args, result.output)
    for beside in ("lock", "creating"):  # a pipe left where a run writes its own files beside the output
        os.mkfifo(tmp_path / f"new.h5.{beside}")
        for extra in ([], ["--dry-run"], ["--overwrite"]):
            result = cli("run", photos, "-o", tmp_path / "new.h5", *RUN, *extra)
            assert result.exit_code == 2 and f"new.h5.{beside} is a named pipe, where a run writes" in result.stderr, \
                (beside, extra, result.output)
        os.unlink(tmp_path / f"new.h5.{beside}")
    from vitcore.store.lock import run_holding

    os.mkfifo(tmp_path / "made.h5.lock")  # read by a reading command's "who holds it?": refused, never waited on
    with pytest.raises(UsageError, match="is not a regular file"):
        run_holding(str(made))
    sheet_pipe = tmp_path / "sheet.png"
    os.mkfifo(sheet_pipe)
    result = cli("show", made, "-o", sheet_pipe, "--overwrite")
    assert result.exit_code == 2 and "is a named pipe, not a regular file" in result.stderr, result.output
    assert special_file(str(pipe)) == special_file(str(sheet_pipe)) == "a named pipe"
