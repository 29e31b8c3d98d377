"""Resident memory of a process and everything below it, read from /proc."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            stat = (PROC / entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may itself contain spaces or ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    children = _children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _kib(pid: int, field: str) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> dict[str, float]:
    """RSS summed over the tree, and PSS, which does not count pages shared after fork twice."""
    pids = descendants(root)
    return {
        "processes": float(len(pids)),
        "rss_mib": sum(_kib(p, "VmRSS") for p in pids) / 1024.0,
        "pss_mib": sum(_pss_kib(p) for p in pids) / 1024.0,
    }
