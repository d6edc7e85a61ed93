"""glibc's dynamic loader, simulated on an image at rest: which file a library name resolves to,
by which step, and the chain of loaders that led there.

The search order for a name without a slash (ld.so(8), dlopen(3); glibc elf/dl-load.c
`_dl_map_object`, summarised in ../shared/reference/jax-stack-and-gpu-judgement.md §2):
1. an object with that SONAME that is loaded already is reused, without any search;
2. the caller's DT_RPATH if it has no DT_RUNPATH, then the DT_RPATH of its loader, and on up the
   chain of loaders;
3. LD_LIBRARY_PATH (the image's ENV);
4. the caller's DT_RUNPATH (its own: unlike RPATH, not its children's);
5. /etc/ld.so.cache (ldcache.py; glibc-hwcaps entries first, as the cache orders them);
6. the default directories.
`$ORIGIN` is the directory of the object holding the tag; paths are folded lexically (`..`).
Libraries whose ELF facts the layer scan read (elf.py: the CUDA and JAX ones) are followed into
their DT_NEEDED; others (libc, libstdc++) are resolved but not followed.
"""

from __future__ import annotations

import dataclasses
import posixpath

import msgspec

from envcheck.image.elf import ElfFacts
from envcheck.image.filetree import MergedView
from envcheck.image.ldcache import LdCache

DEFAULT_DIRS = {"amd64": ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64",
                          "/usr/lib64", "/lib", "/usr/lib"),
                "arm64": ("/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib",
                          "/usr/lib")}
DEPTH_MAX = 32  # loaders in one chain; a longer one is a loop of NEEDED (ld.so stops there too)


class Load(msgspec.Struct, kw_only=True):
    """One library name, as the loader would resolve it."""

    name: str  # as asked for (a SONAME, or an absolute path)
    path: str | None  # the file it resolves to (symlinks followed); None: not found
    via: str  # "path" | "loaded" | "DT_RPATH of X" | "LD_LIBRARY_PATH" | "DT_RUNPATH of X" |
    #           "ld.so.cache" | "default directory" | "not found"
    chain: list[str]  # the loaders, outermost first, that led to this name
    version: str | None = None  # from the owning wheel or the file name (jaxstack.py)


@dataclasses.dataclass
class Loader:
    """A process's view of the image's libraries: what is loaded so far, and the search."""

    view: MergedView
    cache: LdCache | None
    ld_library_path: list[str]
    arch: str
    elf: dict[str, ElfFacts]  # by "/" + path
    loaded: dict[str, str] = dataclasses.field(default_factory=dict)  # SONAME or name -> path
    loads: list[Load] = dataclasses.field(default_factory=list)

    def open_path(self, path: str, chain: list[str]) -> Load:
        """dlopen(path) (ctypes with an absolute path): no search; then what it needs."""
        found = self.exists(path)
        load = Load(name=path, path=found, via="path" if found else "not found", chain=chain)
        self._record(load)
        return load

    def open_name(self, name: str, caller: str, chain: list[str]) -> Load:
        """dlopen(name) from `caller` (or a DT_NEEDED of it): the search, then what it needs."""
        if name in self.loaded:
            load = Load(name=name, path=self.loaded[name], via="loaded", chain=chain + [caller])
            self.loads.append(load)
            return load
        path, via = self.search(name, caller, chain)
        load = Load(name=name, path=path, via=via, chain=chain + [caller])
        self._record(load)
        return load

    def search(self, name: str, caller: str, chain: list[str]) -> tuple[str | None, str]:
        facts = self.elf.get(caller)
        if facts is None or facts.runpath is None:
            for loader in [caller, *reversed(chain)]:
                found = self._in_dirs(name, _rpath(self.elf.get(loader)), loader)
                if found:
                    return found, f"DT_RPATH of {loader}"
        found = self._in_dirs(name, self.ld_library_path, None)
        if found:
            return found, "LD_LIBRARY_PATH"
        found = self._in_dirs(name, (facts.runpath or []) if facts else [], caller)
        if found:
            return found, f"DT_RUNPATH of {caller}"
        for entry in self.cache.lookup(name, self.arch) if self.cache else []:
            found = self.exists(entry.path)
            if found:
                return found, "ld.so.cache"
        found = self._in_dirs(name, DEFAULT_DIRS.get(self.arch, ()), None)
        return (found, "default directory") if found else (None, "not found")

    def _record(self, load: Load) -> None:
        self.loads.append(load)
        if load.path is None:
            return
        facts = self.elf.get(load.path)
        self.loaded[load.name] = load.path
        if facts and facts.soname:
            self.loaded.setdefault(facts.soname, load.path)
        if facts and len(load.chain) < DEPTH_MAX:
            for needed in facts.needed:
                self.open_name(needed, load.path, load.chain)

    def _in_dirs(self, name: str, directories, origin_of: str | None) -> str | None:
        for directory in directories:
            if origin_of is not None:
                directory = directory.replace("${ORIGIN}", "$ORIGIN").replace(
                    "$ORIGIN", posixpath.dirname(origin_of))
            if not directory.startswith("/"):
                continue  # relative entries resolve against the process's working directory
            found = self.exists(posixpath.join(directory, name))
            if found:
                return found
        return None

    def exists(self, path: str) -> str | None:
        """The file `path` leads to (symlinks followed), as an absolute path, or None."""
        found = self.view.resolve(posixpath.normpath(path).lstrip("/"))
        if found is None:
            return None
        info = self.view.files.get(found)
        return "/" + found if info is not None and info.kind == "file" else None


def _rpath(facts: ElfFacts | None) -> list[str]:
    """An object's DT_RPATH, which ld.so ignores when the object has a DT_RUNPATH too."""
    return (facts.rpath or []) if facts is not None and facts.runpath is None else []
