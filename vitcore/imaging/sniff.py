"""What a file holds by its first bytes, for the word a failure record gives when a file is named
for one kind (a picture, a video clip) and holds the other: inputs are routed by extension, so a
phone's JPEG saved as ``.mp4`` fails as a clip and an MP4 saved as ``.jpg`` fails as a picture;
the record then says which it is, so that renaming it is the obvious fix.

    content_kind(head)      first bytes → ("picture" | "video", format name), or None when unknown
    misnamed_note(name, k)  " (its content is a picture (JPEG), not a video clip: rename it)" or ""
    decodes(format)         whether this installation decodes pictures of that format
"""

from __future__ import annotations

from vitcore.imaging.video import is_video_name

HEAD_BYTES = 16
# ISO base media brands of still pictures (AVIF, HEIF/HEIC): the same "ftyp" box as an MP4 clip.
_PICTURE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}


def content_kind(head: bytes) -> tuple[str, str] | None:
    """("picture" or "video", the format's name) from a file's first HEAD_BYTES bytes."""
    if head.startswith(b"\xff\xd8\xff"):
        return "picture", "JPEG"
    if head.startswith(b"\x89PNG"):
        return "picture", "PNG"
    if head.startswith(b"GIF8"):
        return "picture", "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "picture", "WebP"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video", "AVI"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "picture", "TIFF"
    if head.startswith(b"BM"):
        return "picture", "BMP"
    if head[4:8] == b"ftyp":
        return ("picture", head[8:12].decode("ascii", "replace").upper()) if head[8:12] in _PICTURE_BRANDS \
            else ("video", "MP4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "Matroska/WebM"
    return None


_DECODED = ("JPEG", "PNG", "GIF", "WebP", "TIFF", "BMP")  # by Pillow itself, whatever its build


def decodes(fmt: str) -> bool:
    """Whether this installation decodes pictures of ``fmt`` (content_kind's name): one that fails
    to is damaged; HEIC (no plugin) or AVIF on an old Pillow is a format it cannot read at all."""
    if fmt in _DECODED:
        return True
    if fmt in ("AVIF", "AVIS"):
        from PIL import features

        return bool(features.check("avif"))
    return False


def misnamed_note(name: str, found: tuple[str, str] | None) -> str:
    """A note for a failure record when ``name`` says one kind and its content (``found``:
    content_kind of its first bytes) the other; "" otherwise."""
    if found is None:
        return ""
    kind, fmt = found
    named = "video" if is_video_name(name) else "picture"
    if kind == named:
        return ""
    words = {"video": "video clip", "picture": "picture"}
    return f" (its content is a {words[kind]} ({fmt}), not a {words[named]}: rename it)"
