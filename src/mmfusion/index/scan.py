"""Walk the folders of a collection: image files with their size and mtime, and what was passed over, with why.

Hidden files and folders (and so macOS AppleDouble ``._*`` files) are skipped. Symbolic links are followed
only while they stay inside the roots being indexed, and a folder reached twice (a link loop, or a link to a
folder already walked) is walked once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import IMAGE_EXTENSIONS

HEIC_EXTENSIONS = (".heic", ".heif")


def heic_supported() -> bool:
    """Whether HEIC/HEIF photos can be decoded (the optional ``pillow-heif`` package registers a decoder)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def image_extensions() -> tuple[str, ...]:
    return IMAGE_EXTENSIONS + (HEIC_EXTENSIONS if heic_supported() else ())


@dataclass
class FileEntry:
    path: str  # absolute path as the OS gives it (may hold surrogate escapes for non-UTF-8 names)
    root: str  # the root it was found under
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    files: list[FileEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    missing_roots: list[str] = field(default_factory=list)  # roots that do not exist or hold no images
    roots: list[str] = field(default_factory=list)  # roots that exist and hold at least one image


def _inside(real: str, real_roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in real_roots)


def scan(roots: list[str | os.PathLike], extensions: tuple[str, ...] | None = None) -> ScanResult:
    """Every image file under ``roots`` (absolute paths), with what was skipped and why.

    Args:
        roots: folders (or single files) to index.
        extensions: lower-case suffixes to accept; default: the decodable image formats.
    """
    exts = tuple(e.lower() for e in (extensions or image_extensions()))
    out = ScanResult()
    abs_roots = [os.path.abspath(os.path.expanduser(os.fspath(r))) for r in roots]
    real_roots = [os.path.realpath(r) for r in abs_roots]
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for root in abs_roots:
        before = len(out.files)
        if os.path.isfile(root):
            _add_file(root, root, exts, out, seen_files, real_roots, explicit=True)
        elif os.path.isdir(root):
            _walk(root, root, exts, out, seen_dirs, seen_files, real_roots)
        (out.roots if len(out.files) > before else out.missing_roots).append(root)
    return out


def _add_file(path: str, root: str, exts, out: ScanResult, seen: set[str], real_roots, explicit=False) -> None:
    name = os.path.basename(path)
    if not explicit and name.startswith("."):
        return  # hidden files, AppleDouble ._* files
    if not name.lower().endswith(exts):
        if explicit:
            out.skipped.append((path, f"not an image extension ({', '.join(exts)})"))
        return
    if path in seen:
        return
    try:
        if os.path.islink(path) and not _inside(os.path.realpath(path), real_roots):
            out.skipped.append((path, "symbolic link to a file outside the indexed folders"))
            return
        st = os.stat(path)  # follows a link inside the roots
    except OSError as e:
        out.skipped.append((path, f"cannot stat: {e.strerror or e}"))
        return
    seen.add(path)
    out.files.append(FileEntry(path, root, st.st_size, st.st_mtime_ns))


def _walk(top: str, root: str, exts, out: ScanResult, seen_dirs, seen_files, real_roots) -> None:
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as e:
            out.skipped.append((folder, f"cannot open folder: {e.strerror or e}"))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            if folder != top:
                out.skipped.append((folder, "folder already walked (a symbolic link loop or a second link to it)"))
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.skipped.append((folder, f"cannot list folder: {e.strerror or e}"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_link, is_dir = e.is_symlink(), e.is_dir()  # is_dir follows links
            except OSError:
                is_link, is_dir = False, False
            if is_link and is_dir and not _inside(os.path.realpath(e.path), real_roots):
                out.skipped.append((e.path, "symbolic link to a folder outside the indexed folders"))
            elif is_dir:
                subdirs.append(e.path)
            elif is_link and not os.path.exists(e.path):
                if e.name.lower().endswith(exts):
                    out.skipped.append((e.path, "broken symbolic link"))
            else:
                _add_file(e.path, root, exts, out, seen_files, real_roots)
        stack.extend(reversed(subdirs))


def display_path(path: str) -> str:
    """A printable form of a path whose name may not be valid UTF-8."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def path_key(path: str) -> bytes:
    """The exact bytes of a path, as stored (names that are not UTF-8 survive the round trip)."""
    return os.fsencode(path)


def path_from_key(key: bytes) -> str:
    return os.fsdecode(key)


def is_under(path: str, root: str) -> bool:
    return Path(path) == Path(root) or str(path).startswith(root.rstrip(os.sep) + os.sep)
