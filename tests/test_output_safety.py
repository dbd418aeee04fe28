"""No command writes over what it reads or replaces what a user did not ask it to: a sheet onto the
file it draws from, a run's output onto one of its inputs, an existing sheet without --overwrite, a
link replaced instead of its target. Each refused in one line before any work, nothing changed."""

import hashlib
import os

import h5py
import numpy as np

from tests.helpers import TINY

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


def test_a_run_refuses_an_output_that_is_one_of_its_inputs(cli, photos, tmp_path):
    victim = sorted(photos.iterdir())[0]
    before = _digest(victim)
    result = cli("run", photos, "-o", victim, "--overwrite", *RUN)
    assert result.exit_code == 2 and "is one of this run's inputs" in result.output
    assert _digest(victim) == before
    listed = _made(cli, photos, tmp_path / "made.h5")  # an output listed among the inputs by name
    result = cli("run", photos, listed, "-o", listed, "--overwrite", *RUN)
    assert result.exit_code == 2 and "is one of this run's inputs" in result.output


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
