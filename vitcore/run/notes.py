"""What a run tells the user it passed over or stored empty, counted (torch-free, so a torchrun
launch can add up its ranks' counts and say them once)."""

from __future__ import annotations

from vitcore.imaging.video import VIDEO_EXTENSIONS
from vitcore.inputs.base import ENTRY_KINDS


def counted_notes(missing_meta: dict[str, int], passed_over: dict[str, int],
                  entries: dict[str, int] | None = None, nonfinite_meta: dict[str, int] | None = None,
                  reads_clips: bool = False) -> list[str]:
    """What was stored empty or passed over, counted, for the summary (--json has the counts too):
    rows without a kept text, files by extension, and entries that are not files by kind."""
    notes = [f"{count} row{' has' if count == 1 else 's have'} no {name} text (stored as \"\", marked in "
             f"meta_absent/{name}): no such sidecar beside them, or a null value (a tar sample's or loose "
             "file's sidecars share its name up to the first dot, as in WebDataset: 'a.b.jpg' goes with 'a.txt')"
             for name, count in missing_meta.items()]
    notes += [f"{count} row{'s' * (count != 1)} of --columns {name} held NaN or infinite numbers, stored as JSON null"
              for name, count in (nonfinite_meta or {}).items()]
    # Clips once, as clips, for a family that reads pictures only (--ext would not take them); for one
    # that reads clips (``reads_clips``) they were left out by --ext, like any other extension.
    clips = {ext: n for ext, n in passed_over.items() if ext in VIDEO_EXTENSIONS and not reads_clips}
    others = {ext: n for ext, n in passed_over.items() if ext not in clips}
    if others:
        files = sum(others.values())
        notes.append(f"{files} file{'s' * (files != 1)} in the folders (or members of tars) passed over by extension "
                     f"({_by_count(others)}); --ext takes other image extensions, --keep stores sidecar text")
    if clips:
        files = sum(clips.values())
        notes.append(f"{files} video clip{'s' * (files != 1)} passed over ({_by_count(clips)}): clips are read by the "
                     "Qwen-VL families only (--weights a Qwen-VL checkpoint)")
    if entries:
        notes.append("passed over, not files: " + "; ".join(f"{ENTRY_KINDS[kind]}: {n}" for kind, n in sorted(entries.items())))
    return notes


def _by_count(counts: dict[str, int]) -> str:
    """'avif 3, heic 1': most first, then by name."""
    return ", ".join(f"{ext} {n}" for ext, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
