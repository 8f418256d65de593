"""State files: their digest and the QEMU migration stream header.

Digest: xxh3-128 over 4 MiB chunks. Measured here on a 3 GiB file in page
cache, 8 MiB reads: xxh3-128 15 GB/s, sha1 2.0 GB/s, sha256 1.9 GB/s, blake2b
1.2 GB/s. A state file is guarded against corruption, not against an attacker
(the folder is 0700), so the fastest well-mixed hash wins; hashing then costs
less than reading, so chunks are read by several threads at once and holes
are not read at all.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import xxhash

from ..errors import CheckpointError

ALGORITHM = "xxh3_128c"
#: QEMU_VM_FILE_MAGIC ('QEVM') and QEMU_VM_FILE_VERSION (3), big-endian.
HEADER = b"QEVM\x00\x00\x00\x03"
#: The digest is the xxh3-128 of the xxh3-128 digests of the file's 4 MiB chunks, in order.
CHUNK = 4 << 20
#: Chunks read at once (each one O_DIRECT request of 4 MiB, the disk's largest here): the queue depth.
#: Measured here on a 1.1 GB mapped-ram state file, GB/s of data read: 4 threads 1.05-1.37, 8 threads
#: 1.08-1.45, 16 threads 1.16-1.50, ``dd iflag=direct bs=4M`` 0.99-1.1 (machine under load; ±20 % from
#: run to run). Hashing is not the limit: xxh3 runs at 11 GiB/s on one core and releases the GIL
#: (2 threads hash 2x as fast).
THREADS = 8


class Pace(NamedTuple):
    """How a digest reads: *threads* reads at once, each of *request* bytes (O_DIRECT requests)."""

    threads: int
    request: int


#: As fast as the disk goes: nothing else reads it (a save's read-back).
FULL = Pace(THREADS, CHUNK)
#: Beside a QEMU loading the same file (a restore verifies while QEMU loads): one 1 MiB read at a time.
#: The file is then read twice at once, and QEMU's load slows by what the digest takes of the disk.
#: Measured here (2 GiB guest, 1 GB state file, 3 rounds each, alternating; whole restore, ms):
#: 2 x 1 MiB 2832-3537, 1 x 1 MiB 2461-3069, 1 x 256 KiB 2424-2772; 1 x 1 MiB still ends 1 s before
#: the load (1.0-1.3 s against 2.0-2.6 s), 256 KiB reads take 1.5-2.0 s.
BESIDE_LOAD = Pace(1, 1 << 20)


def flush(path: Path | str) -> None:
    """Flush file *path* to disk (fsync), so that a host crash after it loses nothing of it. A file written
    with O_DIRECT is past the page cache but not past the disk's own write cache, which only a flush
    empties: on this machine's virtual disk, whose cache is its host's page cache, 1.1-1.7 s for 1.1 GB,
    longer than QEMU's write itself.

    :raise OSError: the file cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_chunks(fd: int, size: int) -> set[int]:
    """Indexes of the chunks that hold data; chunks wholly inside holes are known to be zeros."""
    chunks: set[int] = set()
    offset = 0
    try:
        while offset < size:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            chunks.update(range(start // CHUNK, (end - 1) // CHUNK + 1))
            offset = end
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data past offset
            return set(range((size + CHUNK - 1) // CHUNK))
    return chunks


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    """A read-only fd on *path*, with O_DIRECT if asked and the filesystem takes it; and whether it has."""
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False


#: Called with (bytes read so far, bytes to read), from any thread.
Progress = Callable[[int, int], None]


class _Stopped(Exception):
    """A digest reader saw that another one failed, and read no further."""


def no_progress(done: int, total: int) -> None:
    pass


def digest(
    path: Path,
    direct: bool = False,
    progress: Progress = no_progress,
    pace: Pace | None = None,
) -> tuple[int, str]:
    """``(size, "xxh3_128c:<hex>")`` of *path*.

    Holes are not read (mapped-ram state files are sparse); a file's digest
    depends only on its bytes, not on how sparse it is. With *direct*, the file
    is read with O_DIRECT (where the filesystem allows): straight from the disk,
    through no page cache, which matters when the file was just written with
    O_DIRECT and is not cached anyway. *progress* hears of every chunk read; an
    exception it raises stops the digest (no further chunk is read) and is raised.
    *pace*: how many reads of what size are in flight (default `FULL`).
    """
    threads, request = pace or FULL
    fd, direct = _open(path, direct)
    buffers = threading.local()
    try:
        size = os.fstat(fd).st_size
        count = (size + CHUNK - 1) // CHUNK
        wanted = sorted(_data_chunks(fd, size))
        to_read, done, lock = len(wanted) * CHUNK, 0, threading.Lock()

        def read(i: int) -> memoryview | bytes:
            if not direct:
                return os.pread(fd, CHUNK, i * CHUNK)
            if (buf := getattr(buffers, "buf", None)) is None:
                buf = buffers.buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
            view, got = memoryview(buf), 0
            while got < CHUNK:
                n = os.preadv(fd, [view[got : got + request]], i * CHUNK + got)
                got += n
                if n < request:
                    break  # the end of the file
            return view[:got]

        failed: list[BaseException] = []  # the first error of any reader (or of *progress*) stops the rest

        @contextlib.contextmanager
        def noted() -> Iterator[None]:
            try:
                yield
            except _Stopped:
                raise
            except BaseException as exc:
                failed.append(exc)
                raise

        def one(i: int) -> bytes:
            nonlocal done
            if failed:
                raise _Stopped
            with noted():
                hashed = bytes(xxhash.xxh3_128(read(i)).digest())
            with lock, noted():  # noted() exits first: a failure is noted before the next reader may report
                if failed:
                    raise _Stopped
                done += CHUNK
                progress(done, to_read)
            return hashed

        pool = ThreadPoolExecutor(threads)
        try:
            found = dict(zip(wanted, pool.map(one, wanted), strict=True))
        except _Stopped:
            raise failed[0] from None
        finally:
            pool.shutdown(cancel_futures=True)  # on an error (or *progress* raising), read no further
    finally:
        os.close(fd)
    zero = bytes(xxhash.xxh3_128(bytes(CHUNK)).digest())
    total = xxhash.xxh3_128()
    for i in range(count):
        part = found.get(i)
        if part is None:
            length = min(CHUNK, size - i * CHUNK)
            part = zero if length == CHUNK else bytes(xxhash.xxh3_128(bytes(length)).digest())
        total.update(part)
    return size, f"{ALGORITHM}:{total.hexdigest()}"


def stored_bytes(path: Path) -> int:
    """Bytes *path* takes on disk: what reading its data (not its holes) costs."""
    return path.stat().st_blocks * 512


def identity(path: Path) -> tuple[int, int]:
    """``(inode, mtime_ns)`` of *path*: unchanged means nobody replaced or wrote the file."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def verify(
    path: Path,
    size: int,
    expected: str,
    same_as: tuple[int, int] | None = None,
    direct: bool = False,
    progress: Progress = no_progress,
) -> None:
    """Refuse a state file that is missing, of the wrong size, not a QEMU stream, or altered.

    `check_file`, then `check_digest`; the arguments are theirs.

    :raise CheckpointError: naming what is wrong; the file is left as it is.
    """
    check_file(path, size)
    check_digest(path, expected, same_as, direct, progress)


def check_file(path: Path, size: int) -> None:
    """Refuse a state file that is missing, of the wrong size or not a QEMU stream (cheap: no digest).

    :raise CheckpointError: naming what is wrong; the file is left as it is.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"state file {path} is missing") from None
    if st.st_size != size:
        raise CheckpointError(
            f"state file {path} is {st.st_size} bytes, the checkpoint recorded {size}: truncated or replaced"
        )
    with open(path, "rb") as f:
        head = f.read(len(HEADER))
    if head != HEADER:
        raise CheckpointError(f"state file {path} does not start with a QEMU migration header (QEVM, version 3)")


def check_digest(
    path: Path,
    expected: str,
    same_as: tuple[int, int] | None = None,
    direct: bool = False,
    progress: Progress = no_progress,
    pace: Pace | None = None,
) -> None:
    """Refuse a state file whose digest is not *expected*.

    With *same_as* (the ``identity`` taken when the digest was computed, in this
    same process), an unchanged identity stands for the digest: ``update``
    restores a file it hashed a moment ago without reading it twice.
    *direct*, *progress* and *pace* are as for `digest`.

    :raise CheckpointError: naming the mismatch (or a missing file); the file is left as it is.
    """
    try:
        if same_as is not None and identity(path) == same_as:
            return
        actual = digest(path, direct=direct, progress=progress, pace=pace)[1]
    except FileNotFoundError:
        raise CheckpointError(f"state file {path} is missing") from None
    if actual != expected:
        raise CheckpointError(f"state file {path} is corrupt: digest {actual} != recorded {expected}")


#: The digest of a mapped-ram state file's bytes outside its RAM pages (header, device state, the
#: pages' bitmaps): xxh3-128 over those bytes in file order.
DEVICE_ALGORITHM = "xxh3_128d"
#: The "ram" section's start: its name, instance 0, version 4, then the first setup word (the
#: RAM's total size, page-aligned, with RAM_SAVE_FLAG_MEM_SIZE 0x04 in its low bits).
_RAM_SECTION = b"\x03ram" + (0).to_bytes(4, "big") + (4).to_bytes(4, "big")
#: mapped-ram: each block's MappedRamHeader (version 1, page size, bitmap and pages offsets, big-endian,
#: packed: 28 bytes) sits in the stream after its name and size; its pages start 1 MiB-aligned.
_MAPPED_HEADER = 28
_ALIGN = 1 << 20


class MappedBlock(NamedTuple):
    """One RAM block of a mapped-ram state file: its pages are ``[pages, pages + used)``; *pages* is 0
    for a block left in place (``x-ignore-shared``, QEMU >= 11)."""

    name: str
    used: int
    pages: int
    bitmap: int = 0


def mapped_ram_layout(path: Path) -> list[MappedBlock]:
    """The RAM blocks of mapped-ram state file *path*, in file order.

    :raise CheckpointError: the file is not a mapped-ram stream that cprctl can read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_ALIGN)
        at = head.find(_RAM_SECTION)
        if at < 0:
            raise CheckpointError(f"state file {path} has no mapped-ram RAM section")
        p = at + len(_RAM_SECTION) + 8
        remaining = int.from_bytes(head[p - 8 : p], "big") & ~0xFFF
        blocks: list[MappedBlock] = []
        while remaining > 0:
            f.seek(p)
            entry = f.read(256 + 8 + 16 + _MAPPED_HEADER)
            n = entry[0] if entry else 0
            name = entry[1 : 1 + n].decode(errors="replace")
            used = int.from_bytes(entry[1 + n : 9 + n], "big")
            found = _mapped_header(entry, 9 + n, p)
            if not n or used <= 0 or used > remaining or found is None:
                raise CheckpointError(f"state file {path}: unreadable mapped-ram block at offset {p}")
            header_end, pages = found
            if pages and pages + used > size:
                raise CheckpointError(f"state file {path}: RAM block {name} ends past the end of the file")
            blocks.append(MappedBlock(name, used, pages, p + header_end if pages else 0))
            p = pages + used if pages else p + header_end
            remaining -= used
    return blocks


def _mapped_header(entry: bytes, start: int, base: int) -> tuple[int, int] | None:
    """``(end of the header in *entry*, pages offset)`` of the MappedRamHeader found at *start* (or 8 or
    16 bytes later, past optional fields): the one whose bitmap offset is its own end."""
    for at in (start, start + 8, start + 16):
        h = entry[at : at + _MAPPED_HEADER]
        if len(h) < _MAPPED_HEADER or int.from_bytes(h[:4], "big") != 1:
            continue
        page = int.from_bytes(h[4:12], "big")
        bitmap, pages = int.from_bytes(h[12:20], "big"), int.from_bytes(h[20:28], "big")
        if page and page & (page - 1) == 0:
            if bitmap == pages == 0:
                return at + _MAPPED_HEADER, 0
            if bitmap == base + at + _MAPPED_HEADER and pages >= bitmap and pages % _ALIGN == 0:
                return at + _MAPPED_HEADER, pages
    return None


def device_regions(size: int, blocks: list[MappedBlock]) -> list[tuple[int, int]]:
    """``(start, end)`` of the bytes of a file of *size* bytes outside the RAM pages of *blocks*."""
    regions, start = [], 0
    for b in sorted((b for b in blocks if b.pages), key=lambda b: b.pages):
        regions.append((start, b.pages))
        start = b.pages + b.used
    regions.append((start, size))
    return [(s, e) for s, e in regions if e > s]


def device_digest(path: Path, blocks: list[MappedBlock]) -> str:
    """``"xxh3_128d:<hex>"`` of *path*'s bytes outside the RAM pages of *blocks*.

    :raise FileNotFoundError: the file is gone.
    """
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end in device_regions(os.fstat(fd).st_size, blocks):
            while start < end:
                data = os.pread(fd, min(CHUNK, end - start), start)
                if not data:
                    break
                h.update(data)
                start += len(data)
    finally:
        os.close(fd)
    return f"{DEVICE_ALGORITHM}:{h.hexdigest()}"


def loaded_chunks(path: Path, block: MappedBlock, page: int = 4096) -> Iterator[bytes]:
    """RAM block *block* as QEMU loads it from *path*, CHUNK bytes at a time: its pages whose bit is set in
    the block's bitmap, zeros elsewhere.

    :raise FileNotFoundError: the file is gone.
    """
    pages = block.used // page
    with open(path, "rb") as f:
        bitmap = os.pread(f.fileno(), (pages + 63) // 64 * 8, block.bitmap)
        for off in range(0, block.used, CHUNK):
            buf = bytearray(os.pread(f.fileno(), min(CHUNK, block.used - off), block.pages + off))
            buf.extend(bytes(min(CHUNK, block.used - off) - len(buf)))
            first = off // page
            for i in range(len(buf) // page):
                n = first + i
                if not bitmap[n // 8] >> (n % 8) & 1:
                    buf[i * page : (i + 1) * page] = bytes(page)
            yield bytes(buf)


def loaded_digest(path: Path, block: MappedBlock) -> str:
    """``"xxh3_128c:<hex>"`` of RAM block *block* as QEMU loads it from *path* (`loaded_chunks`: what
    `ramdigest.digests` finds in the loading QEMU's memory).

    :raise FileNotFoundError: the file is gone.
    """
    total = xxhash.xxh3_128()
    for chunk in loaded_chunks(path, block):
        total.update(xxhash.xxh3_128(chunk).digest())
    return f"{ALGORITHM}:{total.hexdigest()}"


def verify_mapped(path: Path, size: int, device: str, ram: dict[str, tuple[int, str]]) -> None:
    """Refuse a mapped-ram state file whose RAM blocks (*ram*: name -> used bytes, digest as QEMU will
    load them) or other bytes (*device*: `device_digest`) are not those recorded; it reads the whole file
    (``check``; a restore verifies the RAM in the loaded QEMU instead).

    :raise CheckpointError: naming what is wrong; the file is left as it is.
    """
    check_file(path, size)
    blocks = check_layout(path, ram)
    if (actual := device_digest(path, blocks)) != device:
        raise CheckpointError(f"state file {path} is corrupt: digest {actual} != recorded {device}")
    for b in blocks:
        if b.pages and (actual := loaded_digest(path, b)) != ram[b.name][1]:
            raise CheckpointError(
                f"state file {path} is corrupt: digest of RAM block {b.name} {actual} != recorded {ram[b.name][1]}"
            )


def check_layout(path: Path, ram: dict[str, tuple[int, str]]) -> list[MappedBlock]:
    """The RAM blocks of mapped-ram state file *path*, once they are those recorded (*ram*, as for
    `verify_mapped`).

    :raise CheckpointError: the file's blocks are not the recorded ones.
    """
    try:
        blocks = mapped_ram_layout(path)
    except FileNotFoundError:
        raise CheckpointError(f"state file {path} is missing") from None
    found = {b.name: b.used for b in blocks if b.pages}
    if found != {name: used for name, (used, _) in ram.items()}:
        raise CheckpointError(f"state file {path} is corrupt: its RAM blocks are not those recorded")
    return blocks
