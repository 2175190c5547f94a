#!/usr/bin/env python3
"""Finds import cycles between evictd's modules; exits 1 if there is one.

    module-cycles.py [--depth 1|2] [--graph] [ROOT]

ROOT is the repository (default: this script's). The modules are the `mod`
declarations of ROOT/src/lib.rs; a module's code is src/<m>.rs and
src/<m>/**.rs. Module A *uses* module B when A's code names B through a path:
`use crate::B::...`, `use crate::{B, ...}`, `crate::B::x` anywhere in code, or
`super::` climbing to the crate root (`super::super::B`). Test code does not
count: files named tests.rs or under a tests/ directory, and every item marked
`#[cfg(test)]` (a `mod tests { ... }`, a test-only `use` or fn).

A cycle is a strongly connected component of more than one module. Each is
printed with, for every edge inside it, where the code takes it (file:line
and the path), so that the edge to cut is plain to see.

--depth 2 splits the modules that are directories into their own files
(`sink`) and their submodules (`sink::redis`, `sink::multi`), so that a
cycle shows which submodules take it. A module and its submodules naming
each other (`pub use redis::RedisSink` in sink, `super::Sink` in
sink::redis) is the module tree, not a cycle: at this depth only the
components spanning two top-level modules or more count.

--graph also prints every edge (with its first place).

Comments, strings and char literals are skipped; paths hidden in macros
that build them from pieces are not seen. Python 3 standard library only.
"""

import os
import re
import sys
from collections import defaultdict

# --- tokens -------------------------------------------------------------------

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tokens(text):
    """Yields (token, line) for Rust source, without comments and literals.

    Identifiers (raw `r#x` as `x`), `::`, and single punctuation characters
    come out; string, byte-string, raw-string and char literals come out as
    the one token '"'; lifetimes are dropped.
    """
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += text[i] == "\n"
                    i += 1
        elif re.match(r'b?r#*"', text[i:i + 260]):
            m = re.match(r'b?r(#*)"', text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            line += text.count("\n", i, j)
            yield '"', line
            i = j
        elif c == '"' or text.startswith('b"', i):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            line += text.count("\n", i, j)
            yield '"', line
            i = j + 1
        elif c == "'" or text.startswith("b'", i):
            j = i + (2 if c == "b" else 1)
            if j < n and text[j] == "\\":
                k = text.find("'", j + 2)
                i = n if k < 0 else k + 1
                yield '"', line
            elif j + 1 < n and text[j + 1] == "'":
                i = j + 2
                yield '"', line
            else:  # a lifetime or a label: 'a
                m = IDENT.match(text, j)
                i = m.end() if m else j
        elif text.startswith("r#", i) and IDENT.match(text, i + 2):
            m = IDENT.match(text, i + 2)
            yield m.group(0), line
            i = m.end()
        elif IDENT.match(text, i):
            m = IDENT.match(text, i)
            yield m.group(0), line
            i = m.end()
        elif text.startswith("::", i):
            yield "::", line
            i += 2
        else:
            yield c, line
            i += 1


OPEN, CLOSE = "([{", ")]}"


def attribute_end(toks, i):
    """toks[i] is '#' of an attribute: index after its closing ']'."""
    j = i + 1
    if j < len(toks) and toks[j][0] == "!":
        j += 1
    depth = 0
    while j < len(toks):
        t = toks[j][0]
        if t in OPEN:
            depth += 1
        elif t in CLOSE:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return j


def is_test_only(attr):
    """`#[cfg(test)]`, `#[cfg(all(test, ...))]`; not `#[cfg(not(test))]`."""
    words = [t for t, _ in attr]
    return (len(words) > 3 and words[2] == "cfg" and "test" in words
            and "not" not in words)


def item_end(toks, i):
    """Index after the item starting at toks[i] (after its attributes): its
    `;`, or the `}` closing its first top-level block, or the closer of the
    enclosing group (a struct field, a match arm)."""
    depth = 0
    while i < len(toks):
        t = toks[i][0]
        if t == "#" and depth == 0:
            i = attribute_end(toks, i)
            continue
        if t in OPEN:
            depth += 1
        elif t in CLOSE:
            depth -= 1
            if depth < 0:
                return i
            if depth == 0 and t == "}":
                return i + 1
        elif t == ";" and depth == 0:
            return i + 1
        i += 1
    return i


def without_tests(toks):
    """The tokens without the items marked #[cfg(test)]."""
    out, i = [], 0
    while i < len(toks):
        if toks[i][0] == "#" and i + 1 < len(toks) and toks[i + 1][0] in "[!":
            j = attribute_end(toks, i)
            if is_test_only(toks[i:j]):
                if toks[i + 1][0] == "!":  # #![cfg(test)]: the whole file
                    return []
                i = item_end(toks, j)
                continue
            out.extend(toks[i:j])
            i = j
            continue
        out.append(toks[i])
        i += 1
    return out


# --- paths --------------------------------------------------------------------

def use_tree(toks, i, prefix, out):
    """Reads a path or use tree at toks[i] (after `prefix::`); appends each
    full path (a list of segments) to out, returns the index after it."""
    if i < len(toks) and toks[i][0] == "{":
        i += 1
        while i < len(toks) and toks[i][0] != "}":
            if toks[i][0] == ",":
                i += 1
                continue
            before = i
            i = use_tree(toks, i, prefix, out)
            if i == before:
                i += 1
        return i + 1
    if i < len(toks) and (IDENT.fullmatch(toks[i][0]) or toks[i][0] == "*"):
        seg = toks[i][0]
        if seg == "self":
            out.append(list(prefix))
            return i + 1
        if seg == "*":
            out.append(list(prefix))
            return i + 1
        path = prefix + [seg]
        if i + 2 < len(toks) and toks[i + 1][0] == "::" and toks[i + 2][0] != "<":
            return use_tree(toks, i + 2, path, out)
        out.append(path)
        if i + 2 < len(toks) and toks[i + 1][0] == "as":  # `x as y`
            return i + 3
        return i + 1
    out.append(list(prefix))
    return i


def module_paths(toks, base):
    """Yields (absolute path, line, text) for every crate-, super- or
    self-relative path in the tokens of a file whose module is `base`."""
    stack = []  # inline modules: (name, brace depth inside them)
    # Submodules declared in this file (`mod redis;`): `redis::x` here is
    # `self::redis::x`.
    children = {toks[k + 1][0] for k in range(len(toks) - 2)
                if toks[k][0] == "mod" and toks[k + 2][0] == ";"}
    depth = 0
    i = 0
    while i < len(toks):
        t, line = toks[i]
        prev = toks[i - 1][0] if i else ""
        if (t in children and prev not in ("::", "mod", ".")
                and i + 1 < len(toks) and toks[i + 1][0] == "::"):
            here = base + [name for name, _ in stack]
            found = []
            end = use_tree(toks, i, here, found)
            text = " ".join(tok for tok, _ in toks[i:min(end, i + 24)])
            for path in found:
                yield path, line, text
            i = max(end, i + 1)
            continue
        if t == "{":
            depth += 1
        elif t == "}":
            if stack and stack[-1][1] == depth:
                stack.pop()
            depth -= 1
        elif (t == "mod" and i + 2 < len(toks) and toks[i + 2][0] == "{"
              and IDENT.fullmatch(toks[i + 1][0])):
            stack.append((toks[i + 1][0], depth + 1))
        elif (t in ("crate", "super", "self") and prev not in ("::", "$")
              and i + 1 < len(toks) and toks[i + 1][0] == "::"):
            here = base + [name for name, _ in stack]
            j = i
            if t == "crate":
                root, j = [], i + 2
            elif t == "self":
                root, j = here, i + 2
            else:
                ups = 0
                while (j + 1 < len(toks) and toks[j][0] == "super"
                       and toks[j + 1][0] == "::"):
                    ups, j = ups + 1, j + 2
                root = here[:max(len(here) - ups, 0)]
            found = []
            end = use_tree(toks, j, root, found)
            text = " ".join(tok for tok, _ in toks[i:min(end, i + 24)])
            for path in found:
                yield path, line, text
            i = max(end, i + 1)
            continue
        i += 1


# --- modules ------------------------------------------------------------------

def top_modules(src):
    text = open(os.path.join(src, "lib.rs"), encoding="utf-8").read()
    toks = without_tests(list(tokens(text)))
    names = []
    for k in range(len(toks) - 2):
        if toks[k][0] == "mod" and toks[k + 2][0] == ";":
            names.append(toks[k + 1][0])
    return names


def is_test_file(rel):
    parts = rel.split(os.sep)
    return parts[-1] == "tests.rs" or "tests" in parts[:-1]


def files_of(src, top):
    """(relative path, module path) of each non-test file of module top."""
    out = []
    single = os.path.join(src, top + ".rs")
    if os.path.isfile(single):
        out.append((single, [top]))
    folder = os.path.join(src, top)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in sorted(filenames):
            if not f.endswith(".rs"):
                continue
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src)
            if is_test_file(rel):
                continue
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            out.append((full, parts))
    return out


def submodules(src, top):
    """The file submodules of a directory module: sink -> {redis, multi}."""
    folder = os.path.join(src, top)
    if not os.path.isdir(folder):
        return set()
    subs = set()
    for f in os.listdir(folder):
        name = f[:-3] if f.endswith(".rs") else f
        if name not in ("mod", "tests") and (
                f.endswith(".rs") or os.path.isdir(os.path.join(folder, f))):
            subs.add(name)
    return subs


def node(path, tops, subs, depth):
    if not path or path[0] not in tops:
        return None
    if depth >= 2 and len(path) > 1 and path[1] in subs[path[0]]:
        return path[0] + "::" + path[1]
    return path[0]


def edges(root, depth):
    src = os.path.join(root, "src")
    tops = top_modules(src)
    subs = {t: submodules(src, t) for t in tops}
    found = defaultdict(list)  # (from, to) -> [(file:line, text)]
    nodes = set()
    for top in tops:
        for full, base in files_of(src, top):
            here = node(base, tops, subs, depth)
            nodes.add(here)
            text = open(full, encoding="utf-8").read()
            toks = without_tests(list(tokens(text)))
            for path, line, snippet in module_paths(toks, base):
                there = node(path, tops, subs, depth)
                if there is None or there == here:
                    continue
                found[(here, there)].append(
                    (f"{os.path.relpath(full, root)}:{line}", snippet))
    return sorted(nodes), found


def strongly_connected(nodes, found):
    succ = defaultdict(set)
    for a, b in found:
        succ[a].add(b)
    index, low, on, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    # Within one top-level module (depth 2), parent and submodules may name
    # each other: only components across top-level modules are cycles.
    return sorted(c for c in comps
                  if len({m.split("::")[0] for m in c}) > 1)


def main(argv):
    depth, show_graph, root = 1, False, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--depth":
            depth = int(args.pop(0))
        elif a.startswith("--depth="):
            depth = int(a.split("=", 1)[1])
        elif a == "--graph":
            show_graph = True
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            root = a
    if root is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
    nodes, found = edges(root, depth)
    if show_graph:
        for (a, b), places in sorted(found.items()):
            where, text = places[0]
            print(f"{a} -> {b}  ({len(places)}x, first {where}: {text})")
    cycles = strongly_connected(nodes, found)
    print(f"module-cycles: {len(nodes)} modules, {len(found)} edges, "
          f"{len(cycles)} cycle(s) (depth {depth})")
    for k, comp in enumerate(cycles, 1):
        print(f"cycle {k}: {', '.join(comp)}")
        members = set(comp)
        inside = 0
        for (a, b), places in sorted(found.items()):
            if a in members and b in members:
                if a.split("::")[0] == b.split("::")[0]:
                    inside += 1  # the module tree (depth 2): not listed
                    continue
                where, text = places[0]
                more = f" (+{len(places) - 1} more)" if len(places) > 1 else ""
                print(f"  {a} -> {b}: {where}: {text}{more}")
        if inside:
            print(f"  (and {inside} edge(s) within one top-level module)")
    return 1 if cycles else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `| head`
        sys.exit(1)
