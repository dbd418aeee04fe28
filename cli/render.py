"""What the user sees: the live progress display (stderr) and the summaries and tables (stdout)."""

from __future__ import annotations

import os
import time
from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vitcore.system.units import shown_size

FAILURES_SHOWN = 10


PROGRESS_MODES = ("auto", "bar", "lines", "none")


def progress_display(console: Console, mode: str, every: float, shown: bool = True):
    """The display --progress asks for: auto is a bar on a terminal and lines elsewhere (a log
    file, Slurm, nohup, CI); ``shown`` False (--quiet, --json, a torchrun rank other than 0) shows none."""
    if mode == "auto":
        mode = "bar" if console.is_terminal else "lines"
    if mode == "lines":
        return ProgressLines(console, every, enabled=shown)
    return ProgressDisplay(console, enabled=shown and mode == "bar")


class ProgressLines:
    """Plain progress lines for logs: one every ``every`` seconds while images are done, and one at the end."""

    def __init__(self, console: Console, every: float, enabled: bool):
        self.console, self.every, self.enabled = console, every, enabled
        self.last: float | None = None  # when the last line was written
        self.latest = None  # the latest Progress, written at the end if not yet

    def __enter__(self) -> "ProgressLines":
        return self

    def update(self, p) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self.latest = p
        if self.last is None:
            self.last = now  # the first call: the run has started (nothing done yet)
        elif now - self.last >= self.every:
            self._write(p)
            self.last = now

    def _write(self, p) -> None:
        rate = p.done / p.elapsed if p.elapsed > 0 else 0.0
        eta = f", ETA {_duration((p.total - p.done) / rate)}" if rate > 0 and p.done < p.total else ""
        share = f" ({100 * p.done / p.total:.0f} %)" if p.total else ""
        units = f", units {p.units_done}/{p.units}" if hasattr(p, "units") else ""  # --engine ray
        self.console.print(f"progress: {p.done}/{p.total} {p.noun}{share}{units}, {rate:.1f} {p.noun}/s, "
                           f"elapsed {_duration(p.elapsed)}{eta}, {p.failed} failed", markup=False, highlight=False)
        self.latest = None

    def __exit__(self, *exc) -> None:
        if self.enabled and self.latest is not None and self.latest.done:
            self._write(self.latest)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def stopping(console: Console, signal_number: int) -> None:
    """Said as soon as a run is asked to stop: the batch in flight is finished first (seconds on a CPU)."""
    import signal

    name = signal.Signals(signal_number).name
    again = "; Ctrl-C again stops at once (--resume then redoes that batch)" if name == "SIGINT" else ""
    console.print(f"stopping ({name}): committing what is done first (a batch being encoded is finished){again}",
                  markup=False, highlight=False)


class ProgressDisplay:
    """A rich progress bar fed by extract()'s progress callback; a spinner until the first call."""

    def __init__(self, console: Console, enabled: bool):
        self.console = console
        self.enabled = enabled
        self.status = None
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled:
            self.status = self.console.status("finding images and building the encoder…")
            self.status.start()
        return self

    def update(self, p) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.status.stop()
            self.bar = Progress(
                TextColumn("extracting"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("[red]{task.fields[failed]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("extract", total=p.total, rate="", failed="")
        unit = "img" if p.noun == "images" else p.noun
        rate = f"{p.done / p.elapsed:.1f} {unit}/s" if p.elapsed > 0 and p.done else ""
        failed = f"{p.failed} failed" if p.failed else ""
        self.bar.update(self.task, completed=p.done, total=p.total, rate=rate, failed=failed)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.status is not None:
            self.status.stop()


def _print(console: Console, table) -> None:
    """A table; off a terminal (a file, a pipe) without the spaces rich pads its cells with."""
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _inputs(shard: dict) -> str:
    """A shard's inputs, both ends included ([start, stop) in the record)."""
    start, stop = shard["start"], shard["stop"]
    return f"inputs {start} to {stop - 1}" if stop > start else "no inputs"


def _on_one_line(name: str) -> str:
    """A key as one line of a list: a newline, tab or other control character in a file name shown
    as its escape (\\n), so that one name never reads as two entries."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in name)


def _duplicates(n: int, verb: str) -> str:
    """The summary's (and the dry run's) line for inputs named more than once."""
    return f"{_counted(n, 'repeated mention')} of an input already named (each input {verb} read once)"


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_summary(console: Console, result) -> None:
    """One screen after a run: what was written, with what, how fast, and what failed."""
    shape = "×".join("varying" if n == -1 else str(n) for n in result.token_shape)
    head = "done" if result.complete else "stopped"
    pictures = result.written - result.clips
    what, each = _counted(pictures, "image"), "image"
    if result.clips:  # a run that read video clips says so
        what, each = f"{what} and " * bool(pictures) + _counted(result.clips, "clip"), "image or clip"
    console.print(
        f"[bold]{head}:[/] {what} → {escape(result.output)} "
        f"({_counted(result.rows, 'row')}, tokens {shape} {result.out_dtype} per {each})"
    )
    table = Table.grid(padding=(0, 2))
    table.add_row("encoder", f"{result.encoder}")
    weights = escape(result.weights)
    if result.untrained:
        weights = (
            f"[bold yellow]{weights}[/]: these tokens carry no learned meaning; "
            "pass trained weights (--weights) for real features"
        )
    table.add_row("weights", weights)
    compute = f"{result.compute_dtype} on {result.device}"
    if result.batch_size is not None:
        compute += f", batch {result.batch_size}, " + (
            result.decoding or f"{result.workers} decoding worker{'s' * (result.workers != 1)}")
    table.add_row("compute", compute)
    if result.dtype_reason:
        table.add_row("dtype", f"auto → {escape(result.dtype_reason)} (--dtype overrides)")
    if result.compile_reason:
        table.add_row("compile", f"auto → {escape(result.compile_reason)} (--compile on/off overrides)")
    time_text = f"{result.seconds:.1f} s, {result.images_per_second:.1f} {'inputs' if result.clips else 'images'}/s"
    if "compile" in result.timings:
        time_text += f" (including {result.timings['compile']:.1f} s of torch.compile)"
    table.add_row("time", time_text)
    if result.skipped:
        table.add_row("resumed", f"{_counted(result.skipped, 'input')} already in the file (as rows or failures) "
                      f"{'was' if result.skipped == 1 else 'were'} skipped")
    if result.duplicates_dropped:
        table.add_row("duplicates", _duplicates(result.duplicates_dropped, "is"))
    failed = f"[red]{len(result.failures)}[/]" if result.failures else "0"
    if result.failed_earlier:
        failed += (f" this run; {result.failed_earlier} recorded by earlier runs "
                   "(vit-extract info lists them; --resume --retry-failed tries them again)")
    table.add_row("failed", failed)
    for warning in result.warnings:
        table.add_row("[yellow]note[/]", escape(warning))
    _print(console, table)
    for key, error in result.failures[:FAILURES_SHOWN]:
        console.print(f"  [red]✗[/] {escape(_on_one_line(key))}: {escape(error)}")
    if len(result.failures) > FAILURES_SHOWN:
        more = len(result.failures) - FAILURES_SHOWN
        console.print(f"  … and {more} more: vit-extract info {escape(result.output)} --failures {len(result.failures)}")


def info_table(console: Console, s: dict) -> None:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("file", escape(s["file"]))
    if s.get("being_written") and s.get("written_by") == "another program":
        state = "  [yellow](another program has it open for writing: the rows committed before it)[/]"
    elif s.get("being_written"):
        state = "  [yellow](a run is writing it now: the rows committed so far)[/]"
    else:
        state = "" if s["complete"] else "  [yellow](incomplete: finish with run … --resume)[/]"
    clips = f" ({s['clips']} of them video clips)" if s.get("clips") else ""
    table.add_row("rows", f"{s['rows']}{clips}{state}")
    shape = s["token_shape"]
    shape_text = f"varying × {shape[-1]} (num_tokens)" if shape[0] == -1 else "×".join(map(str, shape))
    compressed = "" if s.get("compression", "none") == "none" else f", {s['compression']}-compressed"
    each = "image or clip" if s.get("clips") else "image"
    table.add_row("tokens", f"{shape_text} per {each}, {s['out_dtype']}{compressed}, pooling {s['pooling']}")
    for name, feature_shape, ragged in s.get("features") or ():
        table.add_row("feature", f"features/{name}: " + (f"varying × {feature_shape[-1]}" if ragged else "×".join(map(str, feature_shape))))
    if s.get("meta"):
        table.add_row("meta", ", ".join(f"meta/{name}" for name in s["meta"]) + " (text per row)")
    if s.get("image_columns_used"):
        table.add_row("images from", "Parquet column " + ", ".join(escape(c) for c in s["image_columns_used"]))
    if s["layers"]:
        table.add_row("layers", ", ".join(f"layers/{k}" for k in s["layers"]))
    table.add_row("encoder", escape(s["summary"]["encoder"]))
    from vitcore.store.schema import describe_weights  # h5py: not for --help

    table.add_row("weights", escape(describe_weights(s["weights"])).replace("UNTRAINED", "[yellow]UNTRAINED[/]", 1))
    if s["weights"].get("sha256"):
        table.add_row("sha256", s["weights"]["sha256"])
    table.add_row("preprocess", escape(s["summary"]["preprocessing"]))
    table.add_row("compute", f"{s['compute_dtype']} on {s['device']}")
    table.add_row("made", f"{s['created']} by vit-extract {s['vit_extract_version']} (schema {s['schema_version']})")
    table.add_row("roots", "\n".join(escape(r) for r in s["roots"]) or "-")
    if s.get("shard"):
        shard = s["shard"]
        table.add_row("shard", f"{shard['index']} of {shard['count']}: {_inputs(shard)} of {shard['total']}")
    for shard in s.get("shards") or ():
        table.add_row("shard", f"{escape(shard['file'])}: {shard['rows']} rows, {_inputs(shard)}, {shard['state']}")
    table.add_row("failed", f"[red]{s['failed']}[/]" if s["failed"] else "0")
    _print(console, table)
    counts = Counter(f["path"] for f in s["failures"])  # one pass: --failures may list thousands
    for f in s["failures"]:  # a key recorded under two roots is shown with its root
        shown = os.path.join(f["root"], f["path"]) if counts[f["path"]] > 1 else f["path"]
        console.print(f"  [red]✗[/] {escape(_on_one_line(shown))}: {escape(f['error'])}")
    if s["failed"] > len(s["failures"]):
        console.print(f"  … and {s['failed'] - len(s['failures'])} more (--failures N shows more)")


def models_table(console: Console, rows: list[dict]) -> None:
    table = Table("preset", "dim", "depth", "heads", "patch", "input", "parameters", "tokens/image")
    for r in rows:
        table.add_row(
            r["name"], str(r["dim"]), str(r["depth"]), str(r["heads"]), str(r["patch"]),
            str(r["image_size"]), f"{r['parameters'] / 1e6:.1f}M", str(r["tokens_per_image"]),
        )
    _print(console, table)


def hits_table(console: Console, hits, query: str) -> None:
    table = Table("rank", "key", "score", title=f"nearest to {escape(_on_one_line(query))}", title_justify="left")
    for hit in hits:
        table.add_row(str(hit.rank), escape(_on_one_line(hit.key)), f"{hit.score:.4f}")
    _print(console, table)


_ONE = {"image files": "image file", "tar members": "tar member", "Parquet rows": "Parquet row", "video clips": "video clip"}


def dry_run(console: Console, r) -> None:
    """--dry-run: what the run would read and store, and what it would cost."""
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("dry run", f"nothing written; {escape(r.output)} as a run would make it")
    kinds = ", ".join(f"{n} {kind if n != 1 else _ONE.get(kind, kind)}" for kind, n in r.inputs.items()) or "nothing"
    table.add_row("would read", f"{_counted(r.to_read, 'input')} ({kinds})")
    if r.already_done:
        table.add_row("already done", f"{r.already_done} inputs the file holds (skipped)")
    if r.duplicates_dropped:
        table.add_row("duplicates", _duplicates(r.duplicates_dropped, "would be"))
    for note in r.passed_over_notes:
        table.add_row("passed over", escape(note))
    tokens = ", ".join(f"{name} {count:g}" for name, count in r.tokens_per_image.items())
    counted = "" if r.tokens_counted_from == "fixed" else f" (mean of {r.tokens_counted_from})"
    table.add_row("tokens/image", f"{tokens}{counted}")
    table.add_row("encoder", f"{r.encoder}, {r.compute_dtype} on {r.device}; stored {r.out_dtype}, "
                  f"compression {r.compression}")
    if r.untrained:
        table.add_row("weights", f"[bold yellow]{escape(r.weights)}[/]: the tokens would carry no learned meaning; "
                      "pass trained weights (--weights) for real features")
    table.add_row("bytes/image", shown_size(r.bytes_per_image))
    table.add_row("output size", f"{shown_size(r.projected_bytes)} projected")
    if r.calibration_images:
        failed = (f"; {r.calibration_failures} more could not be decoded (a run records them as failures)"
                  if r.calibration_failures else "")
        table.add_row("calibration", f"{r.calibration_images} images{failed}: decode {r.decode_seconds_per_image * 1000:.0f} ms/image "
                      f"(one worker), encode {r.encode_seconds_per_image * 1000:.0f} ms/image "
                      f"(batch size {r.batch_size}, {r.workers} decoding worker{'s' * (r.workers != 1)})")
        table.add_row("time", f"about {_duration(r.estimated_seconds)} on this machine")
    for note in r.notes:
        table.add_row("note", escape(note))
    _print(console, table)


def index_summary(console: Console, report) -> None:
    """What `vit-extract index` built: the kind and why, its size, the tuned parameter and the measured recall."""
    console.print(f"wrote {escape(report.output)} ({shown_size(report.index_bytes)}) and {escape(report.sidecar)}: "
                  f"{report.kind} index of {report.rows:,} × {report.dim} ({report.dataset}) in {_duration(report.build_seconds)}")
    console.print(f"  chosen: {escape(report.reason)}")
    tuned = ", ".join(f"{name} {value}" for name, value in report.params.items())
    if report.kind == "flat":
        console.print("  search: exact (inner product of the normalised vectors)")
    else:
        console.print(f"  search: {escape(tuned)}; recall@{report.k} {report.recall:.3f} measured on "
                      f"{report.queries:,} of the file's rows (target {report.target_recall})")
        if report.recall < report.target_recall:
            advice = "--kind ivf or flat" if report.kind == "hnsw" else "--kind flat, or a larger --max-index-memory"
            console.print("  [yellow]the target was not reached at the parameter's ceiling[/]"
                          + (" (many identical vectors, such as duplicate pictures, break HNSW graphs)"
                             if report.kind == "hnsw" else "") + f": choose {advice}")
    if report.excluded:
        console.print(f"  left out: {report.excluded:,} rows that are not finite (inf or NaN)")
