"""Shared checks for the readers: one-line reasons, bounded reprs, and a zip's central
directory checked against the archive before any member is read.

A member may not claim more bytes than the archive can hold: a stored member's data must
fit between its offset and the central directory with the same size compressed and not; a
deflated member can expand at most deflate's maximum ratio (1032:1); members may not
overlap (the "many entries over one blob" zip bomb); anything else (bzip2, lzma,
encryption) is refused. Shared by the npz and the PyTorch (zip) readers.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from ..errors import SourceError

DEFLATE_MAX_RATIO = 1032
LOCAL_HEADER_SIZE = 30


class ExactFile:
    """A file read at given offsets, exactly the bytes asked for: no buffering and no kernel
    read-ahead (``POSIX_FADV_RANDOM``), so reading headers never pulls in tensor data (a
    buffered ``open`` reads 8 KiB at a time; zipfile reads members 4 KiB at a time)."""

    def __init__(self, path: Path, headers_only: bool = True):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if headers_only and hasattr(os, "posix_fadvise"):  # bulk data reads keep the kernel's read-ahead
            try:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:  # advice only
                pass

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
        parts = []
        while length > 0:
            part = os.pread(self.fd, length, offset)
            if not part:
                break
            parts.append(part)
            offset, length = offset + len(part), length - len(part)
        return b"".join(parts)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` (ValueError if the file ends first)."""
        filled = 0
        while filled < len(buffer):
            got = os.preadv(self.fd, [buffer[filled:]], offset + filled)
            if not got:
                raise ValueError(f"truncated: {filled} of {len(buffer)} bytes")
            filled += got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ExactFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when the message is empty), cut to ``limit``."""
    try:
        lines = str(exc).strip().splitlines()
    except Exception:  # a message that cannot even be rendered
        lines = []
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: file contents end up in one-line messages."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_checked_zip(path: Path, what: str) -> zipfile.ZipFile:
    """``path`` opened as a zip whose directory is consistent with its size, or a SourceError."""
    try:
        archive = zipfile.ZipFile(path)
        members = archive.infolist()
    except Exception as exc:  # zipfile raises many types on garbage (BadZipFile, EOFError, ValueError, struct.error...)
        raise SourceError(f"not a readable {what}: corrupt or truncated zip archive ({reason(exc)})", path=str(path)) from exc
    try:
        check_members(archive, members, path, what)
    except BaseException:
        archive.close()
        raise
    return archive


def check_members(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], path: Path, what: str) -> None:
    archive_size = path.stat().st_size
    data_end = min(getattr(archive, "start_dir", archive_size), archive_size)

    def fail(member: zipfile.ZipInfo, problem: str) -> SourceError:
        return SourceError(f"not a readable {what}: zip member {short(member.filename)} {problem}", path=str(path))

    position = 0
    for member in sorted(members, key=lambda m: m.header_offset):
        if member.flag_bits & 0x1:
            raise fail(member, "is encrypted")
        if member.compress_type == zipfile.ZIP_STORED:
            if member.compress_size != member.file_size:
                raise fail(member, f"is stored but claims {member.file_size} bytes from {member.compress_size}")
        elif member.compress_type == zipfile.ZIP_DEFLATED:
            if member.file_size > max(member.compress_size, 1) * DEFLATE_MAX_RATIO:
                raise fail(member, f"claims {member.file_size} bytes from {member.compress_size} compressed (beyond deflate's limit)")
        else:
            raise fail(member, f"uses an unsupported compression method ({member.compress_type})")
        start = member.header_offset
        if start < position:
            raise fail(member, "overlaps the previous member")
        end = start + LOCAL_HEADER_SIZE + member.compress_size
        if end > data_end:
            raise fail(member, f"claims {member.compress_size} bytes at offset {start}, beyond the archive's {archive_size} bytes (truncated or corrupt)")
        position = end


def stored_data_offset(read, member: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start, from its local header (``read(offset, n)``, e.g. an
    ``ExactFile``'s, so that no byte of the data is read); ValueError if the header is not one."""
    local = bytes(read(member.header_offset, LOCAL_HEADER_SIZE))
    if len(local) != LOCAL_HEADER_SIZE or not local.startswith(b"PK\x03\x04"):
        raise ValueError("bad local file header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    name = bytes(read(member.header_offset + LOCAL_HEADER_SIZE, name_length)).decode("utf-8" if member.flag_bits & 0x800 else "cp437", errors="replace")
    if name != member.orig_filename:
        raise ValueError(f"file name in directory and header differ ({short(member.orig_filename)} vs {short(name)})")
    return member.header_offset + LOCAL_HEADER_SIZE + name_length + extra_length
