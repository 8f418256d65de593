"""The canary of RAM kept in place: a cheap, sampled proof that a RAM file is what the save left.

A save that keeps a guest's RAM in its file (``x-ignore-shared``, see `plan`) writes only device state to
the state file, and the restore maps the same file again. The state file's digests (`statefile`,
`ramdigest`) do not cover that RAM. A file whose writes were lost in a host crash (storage that acknowledged
a flush it did not make), restored from an old backup, edited, truncated or replaced between the save and
the restore would be run as it is, and a guest whose RAM no longer matches its device state and its disks
panics, hangs, or corrupts its own filesystems.

So at the save, once the guest is stopped and the file has its final content (after its last flush), cprctl
records the file's size and the xxh3-64 digests of a sample of its 4 KiB pages: the first, the last, and
`sample_size` pages drawn at random from a seed that is new at each save (recorded with them). The restore
reads the same pages BEFORE QEMU starts (the new QEMU must not have touched the file: under KVM a load
rewrites the guest's clock records in its RAM) and refuses a file that is missing, of another size, or
whose sampled pages differ (`check`).

The odds: a file of N pages of which k are stale escapes a sample of n random pages with a probability of
about (1 - k/N)^n. n is N/256, at least `MIN_SAMPLES` and at most `MAX_SAMPLES`: 4-16 MiB of reads.
Measured in the host VM, a power cut after a save without its flushes left 215-406 stale pages of a
128 MiB file (N = 32768, n = 1024): caught with a probability of 1 - 1.2e-3 and 1 - 3e-6. A file from
an old backup or another guest differs in most pages and is always caught; a few stale pages in a large
file can escape (400 of 16 GiB: caught with a probability of about 1/3): the canary is a net, not a proof.

A QEMU that had the file mapped but never ran the guest (a trial load, a restore that failed or was
interrupted before ``cont``) may have written KVM's clock records into it: once it is gone the file is
flushed and the same pages are read again (`retake`). The check passed when that QEMU started, and only it
wrote the file since.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import msgspec
import xxhash

from .._qemu.argv import ram_layout
from ..errors import CheckpointError
from . import statefile
from .record import Checkpoint, RamCanary

PAGE = 4096
#: Bytes of one page's digest (xxh3-64, canonical big-endian form).
DIGEST = 8
#: Random pages sampled: 1/`SHARE` of the file's pages, at least `MIN_SAMPLES`, at most `MAX_SAMPLES`.
SHARE = 256
MIN_SAMPLES = 1024
MAX_SAMPLES = 4096
#: How the pages are drawn and hashed (`RamCanary.scheme`); change it with the drawing or the digest.
SCHEME = "xxh3_64-4k-1"


# -- pure ---------------------------------------------------------------------------------------------


def pages_of(size: int) -> int:
    """How many pages a file of *size* bytes has (the last one may be partial)."""
    return -(-size // PAGE)


def sampled(canary: RamCanary) -> int:
    """How many pages *canary* sampled."""
    return len(canary.digests) // DIGEST


def sample_size(pages: int) -> int:
    """How many pages of a file of *pages* pages are drawn at random (besides the first and the last)."""
    return min(pages, max(MIN_SAMPLES, min(MAX_SAMPLES, pages // SHARE)))


def sample_pages(size: int, seed: int) -> list[int]:
    """The sorted page indexes sampled in a file of *size* bytes: the first, the last and `sample_size`
    distinct others drawn from *seed* (xxh3 as the generator: the same pages from any Python version);
    every page of a small file."""
    pages = pages_of(size)
    want = min(pages, sample_size(pages) + 2)
    if want == pages:
        return list(range(pages))
    chosen, i = {0, pages - 1}, 0
    while len(chosen) < want:
        chosen.add(xxhash.xxh3_64_intdigest(i.to_bytes(8, "little"), seed) % pages)
        i += 1
    return sorted(chosen)


def differing(want: bytes, got: bytes) -> int:
    """How many page digests differ between *want* and *got* (`DIGEST` bytes each; a missing one differs)."""
    return sum(want[i : i + DIGEST] != got[i : i + DIGEST] for i in range(0, max(len(want), len(got)), DIGEST))


def ram_path(cwd: str, mem_path: str) -> str:
    """A RAM backend's ``mem-path`` as an absolute, normalised path (a relative one is QEMU's, from *cwd*)."""
    return os.path.normpath(os.path.join(cwd, mem_path))


def shared_files(argv: Sequence[str], cwd: str = "/") -> list[str]:
    """The named shared RAM files of *argv* (`ram_path`), each once."""
    backends = ram_layout(argv).backends
    return list(dict.fromkeys(ram_path(cwd, b.path) for b in backends if b.named_shared_file and b.path))


def kept_files(argv: Sequence[str], capabilities: Mapping[str, bool], cwd: str = "/") -> list[str]:
    """The RAM files a save with *capabilities* keeps in place (``x-ignore-shared``: every named shared file)."""
    return shared_files(argv, cwd) if capabilities.get("x-ignore-shared") else []


# -- reading the file ---------------------------------------------------------------------------------


def _digests(fd: int, pages: list[int]) -> bytes:
    """The digests of *pages* of open file *fd*. Every read is asked for first (``WILLNEED``): after a reboot
    the page cache is cold, and the disk then gets them all at once rather than one after the other."""
    try:
        for p in pages:
            os.posix_fadvise(fd, p * PAGE, PAGE, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # only a hint: the reads below are the check
    return b"".join(xxhash.xxh3_64_digest(os.pread(fd, PAGE, p * PAGE)) for p in pages)


def take(path: str, seed: int | None = None) -> RamCanary:
    """The canary of RAM file *path* as it is now, drawn from *seed* (default: a new random one).

    :raise OSError: the file cannot be read.
    """
    seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed  # (secrets: not at boot)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return RamCanary(path, size, seed, _digests(fd, sample_pages(size, seed)), SCHEME)
    finally:
        os.close(fd)


def take_kept(argv: Sequence[str], capabilities: Mapping[str, bool], cwd: str = "/") -> list[RamCanary]:
    """The canary of every RAM file a save keeps in place (`kept_files`). A device DAX (a character device:
    it takes no ``read``) has none: it is persistent memory, with no page cache to lose.

    :raise OSError: a file cannot be read.
    """
    return [take(p) for p in kept_files(argv, capabilities, cwd) if os.path.isfile(p)]


def problem(canary: RamCanary) -> str | None:
    """Why the RAM file is not what the save left (it is missing, of another size, sampled pages differ), or
    None: it is, or the canary is of a scheme this cprctl does not know (not checked)."""
    if canary.scheme != SCHEME:
        return None
    try:
        fd = os.open(canary.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "it is missing (deleted or moved since the save)"
    except OSError as exc:
        return f"it cannot be opened ({exc.strerror})"
    try:
        size = os.fstat(fd).st_size
        if size != canary.size:
            return f"it is {size} bytes, the save left {canary.size} (truncated or replaced since)"
        got = _digests(fd, sample_pages(canary.size, canary.seed))
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    finally:
        os.close(fd)
    if n := differing(canary.digests, got):
        return (
            f"{n} of {sampled(canary)} sampled pages differ (writes lost in a host crash, or the file was put back "
            "from an older copy, edited or replaced since the save)"
        )
    return None


def refusal(name: str, canary: RamCanary, why: str) -> str:
    """The one line that refuses VM *name*'s restore from RAM file *canary.path* (`problem`: *why*)."""
    return f"{name}: RAM file {canary.path} is not what the save left: {why}; the guest cannot resume from it"


def refusals(name: str, checkpoint: Checkpoint) -> Iterator[str]:
    """A `refusal` line for each of *checkpoint*'s kept RAM files that is not what the save left, one file
    checked at a time (VM *name*)."""
    for canary in checkpoint.kept_ram:
        if why := problem(canary):
            yield refusal(name, canary, why)


def check(name: str, checkpoint: Checkpoint) -> None:
    """Refuse a restore of VM *name* whose kept RAM files are not what *checkpoint*'s save left.

    :raise CheckpointError: naming the file and what differs; nothing is touched.
    """
    if first := next(refusals(name, checkpoint), None):
        raise CheckpointError(first)


def retake(checkpoint: Checkpoint) -> None:
    """After a QEMU that mapped *checkpoint*'s kept RAM files but never ran the guest is gone: flush each file
    and record its sampled pages as they are now (see the module's docstring). A file that is gone or of
    another size keeps its canary (the next restore refuses it)."""
    kept = []
    for canary in checkpoint.kept_ram:
        if canary.scheme != SCHEME:
            kept.append(canary)
            continue
        try:
            statefile.flush(canary.path)
            again = take(canary.path, canary.seed)
        except OSError:
            again = canary
        kept.append(msgspec.structs.replace(canary, digests=again.digests) if again.size == canary.size else canary)
    checkpoint.kept_ram = kept
