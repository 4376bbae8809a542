#!/usr/bin/env python3
"""Writes THIRD-PARTY-NOTICES.txt: the license of every crate compiled into `corecast`.

The crates are those `cargo metadata` resolves for the binary on Linux: the `corecast`
package's normal dependencies, transitively (build scripts' and tests' dependencies
are not in the binary). Each crate's license texts are read from its source in the
cargo registry (LICENSE*, LICENCE*, COPYING*, NOTICE*, UNLICENSE*); identical texts are
printed once, under the list of crates that carry them. A crate that ships no license
file is listed with its declared license expression, and the texts of those licenses
(under LICENSES below) apply.

Usage: dist/notices.py [OUTPUT]   (default: THIRD-PARTY-NOTICES.txt on stdout if "-")
Exits 1 naming the crates whose license is not one the project accepts.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT_PACKAGE = "corecast"
TARGET = "x86_64-unknown-linux-gnu"
LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|UNLICENSE)", re.IGNORECASE)
# Every license identifier any crate in the binary may be offered under; anything else
# stops the build so that a new dependency's license is looked at by a person.
ACCEPTED = {
    "MIT",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Unlicense",
    "0BSD",
    "MPL-2.0",
    "MPL-2.0+",
    "CC0-1.0",
    "BSL-1.0",
    "CDLA-Permissive-2.0",
    "OpenSSL",
    "MIT-0",
}


def metadata(repo: Path) -> dict:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", TARGET],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    return json.loads(out.stdout)


def shipped_packages(meta: dict) -> list:
    """The packages linked into the binary: normal dependencies of the root, transitively."""
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == ROOT_PACKAGE and p["source"] is None)
    seen, todo = set(), [root]
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            if any(kind["kind"] is None for kind in dep["dep_kinds"]) and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    return sorted((packages[i] for i in seen), key=lambda p: (p["name"], p["version"]))


def identifiers(expression: str) -> set:
    """The license identifiers in an SPDX expression ("MIT OR Apache-2.0", "MIT/Apache-2.0")."""
    expression = expression.replace("/", " OR ").replace("(", " ").replace(")", " ")
    parts = re.split(r"\s+(?:OR|AND)\s+", expression.strip())
    return {part.strip() for part in parts if part.strip()}


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    meta = metadata(repo)
    crates = shipped_packages(meta)
    texts: dict = {}  # digest -> (text, [crate names])
    without_file = []
    refused = []
    for crate in crates:
        label = f"{crate['name']} {crate['version']}"
        expression = crate.get("license") or ""
        if not expression or not (identifiers(expression) & ACCEPTED):
            refused.append(f"{label} ({expression or 'no license declared'})")
        directory = Path(crate["manifest_path"]).parent
        files = sorted(f for f in directory.iterdir() if f.is_file() and LICENSE_FILE.match(f.name))
        if not files:
            without_file.append(f"{label}: {expression}")
            continue
        for file in files:
            text = file.read_text(encoding="utf-8", errors="replace").strip("\n") + "\n"
            digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
            texts.setdefault(digest, (text, []))[1].append(f"{label} ({file.name})")
    if refused:
        print("dist/notices.py: licenses not in the accepted list: " + ", ".join(refused), file=sys.stderr)
        return 1
    lines = [
        "Third-party software in corecast",
        "================================",
        "",
        "The corecast binary is built from these crates (name, version, declared license).",
        "The source of each, at that version, is on crates.io (https://crates.io/crates/NAME).",
        "",
    ]
    lines += [f"  {c['name']} {c['version']}: {c.get('license')}" for c in crates]
    if without_file:
        lines += [
            "",
            "These crates ship no license file; their declared license's standard text applies",
            "(the MIT and Apache-2.0 texts are corecast's own LICENSE-MIT and LICENSE-APACHE):",
            "",
        ]
        lines += [f"  {entry}" for entry in without_file]
    lines += ["", "The license texts, each followed by the crates that carry it:"]
    for text, users in texts.values():
        lines += ["", "-" * 78, "Used by: " + ", ".join(users), "-" * 78, "", text.rstrip("\n")]
    output = "\n".join(lines) + "\n"
    target = sys.argv[1] if len(sys.argv) > 1 else "THIRD-PARTY-NOTICES.txt"
    if target == "-":
        sys.stdout.write(output)
    else:
        Path(target).write_text(output, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
