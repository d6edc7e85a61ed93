"""The image's filesystem as a container sees it: each layer's entries over the ones below, with
whiteouts and opaque directories applied.

The table is a tree with one node per path component. That keeps it small (an entry costs its
last name, not its whole path: big ML images have hundreds of thousands of files), makes a
whiteout cost what it removes (not every file times every whiteout), and lets a file that
replaces a directory take the directory's entries with it, as overlayfs does.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Protocol


@dataclasses.dataclass(frozen=True, slots=True)
class FileInfo:
    size: int
    mode: int
    kind: str  # file | dir | symlink | hardlink | other
    link: str | None
    layer: int


@dataclasses.dataclass(slots=True)
class Dir:
    info: FileInfo | None  # None: only implied by the entries below it (tars may omit dirs)
    children: dict[str, Node] = dataclasses.field(default_factory=dict)


Node = Dir | FileInfo


def _entries(node: Node) -> int:
    """How many tar entries a subtree holds (its implied directories are not entries)."""
    count, stack = 0, [node]
    while stack:
        node = stack.pop()
        if isinstance(node, Dir):
            count += node.info is not None
            stack.extend(node.children.values())
        else:
            count += 1
    return count


class FileTree(Mapping[str, FileInfo]):
    """Root-relative path ("usr/lib/x", no leading slash) -> FileInfo of every entry."""

    def __init__(self) -> None:
        self.root = Dir(None)
        self._count = 0

    def node(self, path: str) -> Node | None:
        """The node at `path` ("" is the root), following no symlinks."""
        node: Node = self.root
        for name in path.split("/") if path else ():
            if not isinstance(node, Dir) or (node := node.children.get(name)) is None:
                return None
        return node

    def __getitem__(self, path: str) -> FileInfo:
        node = self.node(path)
        info = node.info if isinstance(node, Dir) else node
        if info is None:
            raise KeyError(path)
        return info

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        return (path for path, _ in self.items())

    def items(self) -> Iterator[tuple[str, FileInfo]]:  # type: ignore[override]
        stack: list[tuple[str, Dir]] = [("", self.root)]
        while stack:
            prefix, directory = stack.pop()
            for name, child in directory.children.items():
                path = prefix + name
                info = child.info if isinstance(child, Dir) else child
                if info is not None:
                    yield path, info
                if isinstance(child, Dir):
                    stack.append((path + "/", child))

    def relabeled(self, layer: int) -> FileTree:
        """A copy whose entries say `layer` wrote them: for a layer read before its place in
        the image was known (a `docker save` stream), or used at two places."""
        def moved(info: FileInfo | None) -> FileInfo | None:
            return info and FileInfo(info.size, info.mode, info.kind, info.link, layer)

        copy = FileTree()
        copy.root, copy._count = Dir(moved(self.root.info)), self._count
        stack = [(self.root, copy.root)]
        while stack:
            old, new = stack.pop()
            for name, child in old.children.items():
                if isinstance(child, Dir):
                    new.children[name] = twin = Dir(moved(child.info))
                    stack.append((child, twin))
                else:
                    new.children[name] = moved(child)
        return copy

    def add(self, path: str, info: FileInfo) -> int:
        """Record one entry; returns how many nodes that made (its implied parents included)."""
        *parents, name = path.split("/")
        directory, made = self.root, 0
        for parent in parents:
            child = directory.children.get(parent)
            if not isinstance(child, Dir):  # a non-directory on the way is replaced, as unpacking
                self._count -= child is not None  # the layer would replace it
                child = directory.children[parent] = Dir(None)
                made += 1
            directory = child
        old = directory.children.get(name)
        if isinstance(old, Dir) and info.kind == "dir":
            self._count += old.info is None  # a directory entry after its contents keeps them
            old.info = info
            return made
        self._count += 1 - (_entries(old) if old is not None else 0)
        directory.children[name] = Dir(info) if info.kind == "dir" else info
        return made + 1

    def remove(self, path: str) -> None:
        """A whiteout: the path and everything below it."""
        parent, _, name = path.rpartition("/")
        directory = self.node(parent)
        if isinstance(directory, Dir) and (gone := directory.children.pop(name, None)):
            self._count -= _entries(gone)

    def clear(self, path: str) -> None:
        """An opaque directory: everything below it (the directory itself stays)."""
        directory = self.node(path)
        if isinstance(directory, Dir):
            self._count -= sum(_entries(child) for child in directory.children.values())
            directory.children = {}

    def resolve(self, path: str, hops_max: int = 40) -> str | None:
        """Follow symlinks (inside the image) to a path that exists, or None."""
        parts = [p for p in reversed(path.split("/")) if p]  # a stack: the next name is last
        directory, done, hops = self.root, [], 0
        while parts:
            part = parts.pop()
            node = directory.children.get(part)
            if node is None:
                return None
            if isinstance(node, Dir):
                directory = node
            elif node.kind == "symlink":
                hops += 1
                if hops > hops_max or not node.link:
                    return None
                base = "" if node.link.startswith("/") else "/".join(done)
                target = posixpath.normpath(posixpath.join("/" + base, node.link)).strip("/")
                parts += [p for p in reversed(target.split("/")) if p]
                directory, done = self.root, []
                continue
            elif parts:
                return None  # a file where a directory should be
            done.append(part)
        return "/".join(done)

    def glob(self, pattern: str) -> list[tuple[str, FileInfo]]:
        """Entries matching a shell pattern, sorted by path: `*`, `?` and `[...]` match within
        one name (dot names too), and a `**` name any number of directories, none included; a
        final `**` matches the directory and all below it. A symlink a name matches leads on to
        its target; `**` matches real directories only, never a symlink to one."""
        names = [name for name in pattern.split("/") if name]
        found: dict[str, FileInfo] = {}
        # (path as matched so far, where matching goes on, the entry at that path, next name)
        stack: list[Step] = [("", self.root, None, 0)] if names else []
        while stack:
            path, node, info, index = stack.pop()
            if index == len(names):
                if info is not None:
                    found[path] = info
            elif isinstance(node, Dir):
                stack += _steps(path, node, info, names[index], index, index + 1 == len(names))
            elif node.kind == "symlink":  # a name before the last: go on in the directory it
                target = self.resolve(path)  # leads to, as a shell does
                if target is not None and isinstance(directory := self.node(target), Dir):
                    stack.append((path, directory, info, index))
        return sorted(found.items(), key=lambda match: match[0])

    def overlay(self, upper: FileTree) -> None:
        """Put `upper`'s entries over these. The nodes move: `upper` is left empty."""
        self._count += len(upper) - _merge(self.root, upper.root)
        upper.root, upper._count = Dir(None), 0


def _info(node: Node) -> FileInfo | None:
    return node.info if isinstance(node, Dir) else node


Step = tuple[str, Node, FileInfo | None, int]


def _steps(path: str, directory: Dir, info: FileInfo | None, name: str, index: int,
           last: bool) -> list[Step]:
    """Where matching pattern name `index` against `directory`'s children leads."""
    prefix = path + "/" if path else ""
    if name == "**":  # the next name matches here or in a subdirectory; a final ** matches all
        deeper = [(prefix + child_name, child, _info(child),
                   index if isinstance(child, Dir) else index + 1)
                  for child_name, child in directory.children.items()
                  if last or isinstance(child, Dir)]
        return [(path, directory, info, index + 1), *deeper]
    if not _MAGIC.search(name):
        child = directory.children.get(name)
        return [] if child is None else [(prefix + name, child, _info(child), index + 1)]
    return [(prefix + child_name, child, _info(child), index + 1)
            for child_name, child in directory.children.items()
            if fnmatch.fnmatchcase(child_name, name)]


_MAGIC = re.compile(r"[*?\[]")


def _merge(lower: Dir, upper: Dir) -> int:
    """Move upper's nodes into lower; returns how many of lower's entries they replaced."""
    replaced, stack = 0, [(lower, upper)]
    while stack:
        lower, upper = stack.pop()
        if upper.info is not None:
            replaced += lower.info is not None
            lower.info = upper.info
        for name, node in upper.children.items():
            old = lower.children.get(name)
            if isinstance(old, Dir) and isinstance(node, Dir):
                stack.append((old, node))
            else:
                replaced += _entries(old) if old is not None else 0
                lower.children[name] = node
    return replaced


class LayerContent(Protocol):
    """What the merged view takes of a layer (layers.LayerScan has it): its file tree, the paths
    its whiteouts remove, its opaque directories and the small files kept from it."""

    files: FileTree
    whiteouts: list[str]
    opaque_dirs: list[str]
    kept: dict[str, bytes]
    elf: dict  # path -> elf.ElfFacts


class MergedView:
    """The files of all layers applied so far, and the small files kept from them."""

    def __init__(self) -> None:
        self.files = FileTree()
        self.kept: dict[str, bytes] = {}
        self.elf: dict = {}  # path -> elf.ElfFacts of the layer that wrote it

    def apply(self, scan: LayerContent) -> None:
        """Put one layer over the ones applied before it; its file tree moves into the view."""
        # Whiteouts hide only what lower layers wrote, so apply them before this layer's files.
        for path in scan.whiteouts:
            self.files.remove(path)
        for directory in scan.opaque_dirs:
            self.files.clear(directory)
        if scan.whiteouts or scan.opaque_dirs:
            self.kept = {p: data for p, data in self.kept.items() if not _hidden(p, scan)}
            self.elf = {p: facts for p, facts in self.elf.items() if not _hidden(p, scan)}
        self.files.overlay(scan.files)
        self.kept.update(scan.kept)
        self.elf.update(scan.elf)

    def shared_objects(self) -> list:
        """The ELF facts of the files still there as the layer that was read wrote them (a
        later layer may have put another file, or a link, at the path)."""
        found = []
        for path, facts in sorted(self.elf.items()):
            info = self.files.get(path)
            if info is not None and info.kind == "file" and info.layer == facts.layer:
                found.append(facts)
        return found

    def resolve(self, path: str) -> str | None:
        return self.files.resolve(path)

    def glob(self, pattern: str) -> list[tuple[str, FileInfo]]:
        return self.files.glob(pattern)


def _hidden(path: str, scan: LayerContent) -> bool:
    for gone in scan.whiteouts:
        if path == gone or path.startswith(gone + "/"):
            return True
    return any(path.startswith(directory + "/") if directory else True
               for directory in scan.opaque_dirs)
