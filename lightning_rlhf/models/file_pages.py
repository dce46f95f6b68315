"""Give back the memory of a frozen model between uses, where its weights are pages of its checkpoint file.

Transformers loads safetensors weights by mapping the file (private, copy-on-write) when the dtype matches, so
a frozen model's weights are file pages: resident once read, counted in the process's RSS, and identical to
the file as long as nothing writes to them. `release_file_pages(model)` tells the kernel to drop them
(`madvise(MADV_DONTNEED)`); the next forward reads them back from the page cache (or the disk, if the kernel
has evicted the file meanwhile). An RL stage's reference runs once per step, before the update, so with
`release_ref_pages: true` its weights are not resident during the update (SmolLM2-135M in fp32: 0.5 GB; reading
them back cost one forward about 0.2 s of page faults, and the GRPO step's peak RSS fell by 0.1 GB only).

Dropping a page of a private file mapping that was written to would put the file's bytes back in its place, so
the function checks every page first (`/proc/self/pagemap`: a written page is anonymous) and releases nothing,
with a warning, unless every resident page of every weight is an unwritten file page. Weights in anonymous
memory (another dtype than the file's, a GGUF checkpoint, a model built in memory) are never touched: they
count as not releasable.

Simplified: Linux only (elsewhere it returns 0); whole pages only (a weight's first and last partial pages
stay); buffers are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from bisect import bisect_right

import torch

log = logging.getLogger(__name__)
MADV_DONTNEED = 4
_FILE_BIT = 61  # pagemap entry: bit 63 present, bit 61 a file page (or shared anonymous)


def _file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's private mappings of regular files, sorted by start."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end, fields[5].strip()))
    return sorted(spans)


def _weight_ranges(model: torch.nn.Module, page: int) -> list[tuple[int, int]]:
    """Page-aligned [start, end) of each distinct parameter storage's whole pages."""
    seen, ranges = set(), []
    for p in model.parameters():
        storage = p.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if p.device.type != "cpu" or ptr in seen or size == 0:
            continue
        seen.add(ptr)
        start, end = -(-ptr // page) * page, (ptr + size) // page * page
        if end > start:
            ranges.append((start, end))
    return ranges


def _unwritten_file_pages(ranges: list[tuple[int, int]], page: int) -> bool:
    """Every range lies in a private file mapping and none of its resident pages is anonymous (written)."""
    spans = _file_mappings()
    starts = [s for s, _, _ in spans]
    with open("/proc/self/pagemap", "rb") as pagemap:
        for start, end in ranges:
            i = bisect_right(starts, start) - 1
            if i < 0 or spans[i][1] < end:
                return False
            pagemap.seek(start // page * 8)
            entries = torch.frombuffer(bytearray(pagemap.read((end - start) // page * 8)), dtype=torch.int64)
            present, file_page = entries < 0, ((entries >> _FILE_BIT) & 1) == 1  # bit 63 is int64's sign bit
            if bool((present & ~file_page).any()):
                return False
    return True


def release_file_pages(model: torch.nn.Module) -> int:
    """Drop the resident pages of `model`'s weights (see the module docstring); returns the bytes released
    (0 when not every weight is unwritten file pages, or off Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    ranges = _weight_ranges(model, page)
    try:
        if not ranges or not _unwritten_file_pages(ranges, page):
            log.warning("release_ref_pages: the reference's weights are not all unwritten pages of its checkpoint "
                        "file (another dtype, a GGUF file, or written since loading); they stay in memory")
            return 0
    except OSError as err:
        log.warning("release_ref_pages: cannot read this process's memory map (%s); the weights stay", err)
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end in ranges:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            released += end - start
    return released
