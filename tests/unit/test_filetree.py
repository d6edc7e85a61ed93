"""The merged file table (filetree.py): generated layer stacks against a flat model of what
unpacking them does; whiteouts, replaced directories and implied directories by name; what
the table costs in memory per file; and the per-image limit on its size."""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envcheck.image.filetree import FileInfo, MergedView
from envcheck.image.layers import FileBudget, LayerError, LayerScan, scan_layer


def layer(index: int, entries=(), whiteouts=(), opaque=()) -> LayerScan:
    scan = LayerScan(index, whiteouts=list(whiteouts), opaque_dirs=list(opaque))
    for path, kind in entries:
        scan.files.add(path, FileInfo(len(path), 0o644, kind, None, index))
    return scan


def below(path: str, top: str) -> bool:
    return top == "" or path == top or path.startswith(top + "/")


def flat_apply(model: dict[str, FileInfo], scan: LayerScan, entries) -> None:
    """Unpack one layer onto a flat path -> FileInfo table, entry by entry."""
    for gone in scan.whiteouts:
        for path in [p for p in model if below(p, gone)]:
            del model[path]
    for directory in scan.opaque_dirs:
        for path in [p for p in model if below(p, directory) and p != directory]:
            del model[path]
    for path, kind in entries:
        parts = path.split("/")
        for parent in ("/".join(parts[:i]) for i in range(1, len(parts))):
            if parent in model and model[parent].kind != "dir":
                del model[parent]  # a file on the way becomes the directory the entry needs
        old = model.get(path)
        a_directory = old.kind == "dir" if old else any(below(p, path) for p in model)
        if not (a_directory and kind == "dir"):
            for gone in [p for p in model if below(p, path)]:
                del model[gone]
        model[path] = FileInfo(len(path), 0o644, kind, None, scan.index)


NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)


def valid(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One path once, and nothing below a non-directory: a state a filesystem can be in."""
    kinds = dict(entries)
    return [(p, k) for p, k in kinds.items()
            if all(kinds.get(p[:i], "dir") == "dir" for i, c in enumerate(p) if c == "/")]


LAYERS = st.lists(st.tuples(
    st.lists(st.tuples(PATHS, st.sampled_from(["file", "dir", "symlink"])), max_size=8).map(valid),
    st.lists(PATHS, max_size=2), st.lists(st.one_of(st.just(""), PATHS), max_size=1)),
    min_size=1, max_size=4)


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(LAYERS)
def test_layer_stacks_merge_as_unpacking_them_would(stack):
    view, model = MergedView(), {}
    for index, (entries, whiteouts, opaque) in enumerate(stack):
        scan = layer(index, entries, whiteouts, opaque)
        assert len(scan.files) == len(entries)
        flat_apply(model, scan, entries)
        view.apply(scan)
        assert dict(view.files.items()) == model
        assert len(view.files) == len(model) and len(scan.files) == 0  # the nodes moved


def test_a_file_over_a_directory_takes_the_directory_with_it():
    view = MergedView()
    view.apply(layer(0, [("opt/d/x", "file"), ("opt/d/y/z", "file")]))
    view.apply(layer(1, [("opt/d", "file")]))
    assert sorted(view.files) == ["opt/d"] and view.files["opt/d"].layer == 1


def test_a_directory_entry_after_its_contents_keeps_them():
    scan = layer(0, [("usr/lib/x", "file"), ("usr/lib", "dir"), ("usr", "dir")])
    assert sorted(scan.files) == ["usr", "usr/lib", "usr/lib/x"] and len(scan.files) == 3


def test_directories_only_implied_by_their_entries_resolve():
    view = MergedView()
    view.apply(layer(0, [("usr/local/cuda-12.8/compat/libcuda.so.1", "file")]))
    assert view.resolve("/usr/local/cuda-12.8/compat") == "usr/local/cuda-12.8/compat"
    assert "usr/local/cuda-12.8/compat" not in view.files  # not an entry of its own
    assert view.resolve("/usr/local/cuda-12.8/compat/libcuda.so.1/x") is None


def test_whiteouts_and_an_opaque_root():
    view = MergedView()
    view.apply(layer(0, [("etc/a", "file"), ("etc/b", "file"), ("var/x/y", "file")]))
    view.apply(layer(1, [("etc/a", "file")], whiteouts=["etc/a", "var/x", "missing/z"]))
    assert sorted(view.files) == ["etc/a", "etc/b"] and view.files["etc/a"].layer == 1
    view.apply(layer(2, [("new", "file")], opaque=[""]))
    assert sorted(view.files) == ["new"]


TREE_NAMES = st.sampled_from(["a", "b", "ab", ".h", "x.so.1"])
TREES = st.lists(st.tuples(st.lists(TREE_NAMES, min_size=1, max_size=3).map("/".join),
                           st.sampled_from(["file", "dir"])), max_size=10).map(valid)
PATTERNS = st.lists(st.sampled_from(["a", "b", ".h", "*", "?", "**", "a*", "*b", "[ab]", "x.so.*",
                                     "[!a]*", "nothere"]), min_size=1, max_size=4).map("/".join)


def on_disk(root: str, entries: list[tuple[str, str]], links: dict[str, str] | None = None):
    for path, kind in entries:
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        if kind == "dir":
            os.makedirs(os.path.join(root, path), exist_ok=True)
        elif kind == "symlink":
            os.symlink((links or {})[path], os.path.join(root, path))
        else:
            open(os.path.join(root, path), "w").close()


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(TREES, PATTERNS)
def test_globs_match_what_python_glob_finds_on_disk(entries, pattern):
    """`*` stays within one name and `**` spans directories, as in a shell with globstar: the
    oracle is glob.glob on the same tree unpacked to disk (without the directories that are
    only implied, which --files does not list)."""
    view = MergedView()
    view.apply(layer(0, entries))
    with tempfile.TemporaryDirectory() as root:
        on_disk(root, entries)
        found = glob.glob(pattern, root_dir=root, recursive=True, include_hidden=True)
        # glob.glob answers "a/**" with "a/" where a is a file; a shell finds nothing there
        expected = {p.rstrip("/") for p in found
                    if not p.endswith("/") or os.path.isdir(os.path.join(root, p))}
    expected &= set(view.files)
    assert [path for path, _ in view.glob(pattern)] == sorted(expected)
    assert view.glob("/" + pattern) == view.glob(pattern)


LINKED_TREES = st.lists(st.tuples(
    st.lists(TREE_NAMES, min_size=1, max_size=3).map("/".join),
    st.sampled_from(["file", "dir", "symlink"]),
    st.sampled_from(["a", "a/b", "b", "ab/a", "x.so.1", "nowhere", "."])), max_size=10)


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(LINKED_TREES, PATTERNS.filter(lambda pattern: any(c in pattern for c in "*?[")
                                     and "**" not in pattern.split("/")[:-1]))
def test_globs_through_symlinks_match_bash_globstar(raw, pattern):
    """A name before the last follows a symlink to its directory; a final `**` lists symlinks
    but does not descend into them. The oracle is bash (globstar, dotglob, nullglob) on the
    tree unpacked to disk, symlinks as relative links to paths of the tree (or to nothing).
    (A `**` before the last name is left out: bash then goes one level through a symlink when
    it follows a literal name, "l/**/x", but not at the top, "**/x".)"""
    if shutil.which("bash") is None:
        pytest.skip("bash is the oracle here")
    targets = {path: target for path, _, target in raw}
    entries = valid([(path, kind) for path, kind, _ in raw])
    named = {path for path, _ in entries}
    parents = {path[:i] for path in named for i, c in enumerate(path) if c == "/"}
    entries += [(parent, "dir") for parent in sorted(parents - named)]  # no implied directories
    view, links = MergedView(), {}
    for path, kind in entries:
        link = None
        if kind == "symlink":
            link = links[path] = os.path.relpath(targets[path], os.path.dirname(path) or ".")
        view.files.add(path, FileInfo(0, 0o777, kind, link, 0))
    with tempfile.TemporaryDirectory() as root:
        on_disk(root, entries, links)
        listed = subprocess.run(["bash", "-O", "globstar", "-O", "dotglob", "-O", "nullglob",
                                 "-c", 'printf "%s\\n" $PATTERN'], cwd=root, check=True,
                                env={"PATTERN": pattern}, capture_output=True, text=True).stdout
    expected = {found.rstrip("/") for found in listed.splitlines()} - {""}
    assert [path for path, _ in view.glob(pattern)] == sorted(expected)


def test_a_star_stays_within_one_name():
    view = MergedView()
    view.apply(layer(0, [("usr/local/cuda-12.8/compat/libcuda.so.1", "file"),
                         ("usr/local/cuda-12.8/targets/x86_64-linux/lib/stubs/libcuda.so", "file"),
                         ("usr/lib/nostubs/libcuda.so", "file")]))
    assert [p for p, _ in view.glob("usr/local/cuda*/compat/*")] == [
        "usr/local/cuda-12.8/compat/libcuda.so.1"]
    assert view.glob("usr/*") == [] and view.glob("*") == []  # only implied directories
    assert [p for p, _ in view.glob("**/stubs/libcuda.so*")] == [
        "usr/local/cuda-12.8/targets/x86_64-linux/lib/stubs/libcuda.so"]
    assert len(view.glob("usr/**")) == 3 and view.glob("") == []
    view.files.add("usr/local/cuda", FileInfo(0, 0o777, "symlink", "cuda-12.8", 1))
    assert [p for p, _ in view.glob("usr/local/cuda/compat/*")] == [
        "usr/local/cuda/compat/libcuda.so.1"]  # a symlink on the way is followed
    assert [p for p, _ in view.glob("**/compat/libcuda.so.1")] == [
        "usr/local/cuda-12.8/compat/libcuda.so.1"]  # ** does not go through it
    assert [p for p, info in view.glob("usr/local/cuda/**") if info.kind == "symlink"] == [
        "usr/local/cuda"]


def many_files_tar(count: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(count):
            info = tarfile.TarInfo(f"usr/lib/python3/dist-packages/pkg{i // 500:04d}/"
                                   f"mod{(i // 50) % 10}/file_{i:07d}.py")
            info.size, info.mode = 0, 0o644
            tar.addfile(info)
    return raw.getvalue()


def test_the_file_table_costs_under_200_bytes_a_file():
    """A big ML image has hundreds of thousands of files; a flat table of full paths cost
    about 380 bytes each (a 500k-file image: 190 MB)."""
    data = many_files_tar(50_000)
    tracemalloc.start()
    try:
        scan = scan_layer(io.BytesIO(data), 0)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.file_count == 50_000
    assert held / 50_000 < 200, f"{held / 50_000:.0f} bytes a file"


def test_the_table_has_one_limit_for_all_layers_of_an_image():
    budget = FileBudget(limit=1000)
    data = many_files_tar(400)  # 400 files and 12 directories
    scan_layer(io.BytesIO(data), 0, budget=budget)
    scan_layer(io.BytesIO(data), 1, budget=budget)
    with pytest.raises(LayerError, match=r"layer 2: more than 1,000 files and directories in "
                                         r"the image: .* --no-layers"):
        scan_layer(io.BytesIO(data), 2, budget=budget)


def test_one_deep_path_counts_each_directory_it_makes():
    deep = "/".join(["d"] * 2000) + "/x"
    info = tarfile.TarInfo(deep)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    with pytest.raises(LayerError, match="more than 1,000"):
        scan_layer(io.BytesIO(raw.getvalue()), 0, budget=FileBudget(limit=1000))


def test_files_globs_list_each_path_once_and_say_which_match_nothing():
    from envcheck.image.inspect import files_matching

    view = MergedView()
    view.apply(layer(0, [("etc/ld.so.cache", "file"), ("etc/ld.so.conf", "file"),
                         ("usr/lib/libcuda.so.1", "file")]))
    rows, unmatched = files_matching(view, ("etc/ld.so.c?che", "/etc/ld.so.*", "/opt/*", "",
                                            "usr/lib/*"))
    assert [row.path for row in rows] == ["/etc/ld.so.cache", "/etc/ld.so.conf",
                                             "/usr/lib/libcuda.so.1"]
    assert unmatched == ["/opt/*", ""]
