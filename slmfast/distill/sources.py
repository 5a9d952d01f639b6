"""Text sources for training: documents as (name, text) pairs, read deterministically.

Sources:
  * "stdlib": the .py files of the running interpreter's standard library (sysconfig's stdlib
    directory), sorted by relative path. Third-party packages installed under it
    (site-packages/, dist-packages/) are not the standard library and are left out, and the
    report says how many. Files that are not UTF-8 (4 in CPython 3.11's tree) are decoded with
    the encoding their PEP 263 coding line declares, else as Latin-1 (every byte kept); the
    report names each one and how it was decoded. Nothing is dropped silently.
  * a text file, or a directory of text files (sorted; NUL-containing files skipped, reported);
  * a .jsonl file with one JSON object per line and a text field;
  * "hf:<name or saved path>": a Hugging Face `datasets` dataset (when the package is installed).

Every source also yields a fingerprint (sha256 over names and contents) that keys the
tokenized-data cache, and a report of what was skipped or decoded differently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".toml", ".yaml", ".yml", ".html", ".tex")


@dataclass
class Corpus:
    names: list[str]
    texts: list[str]
    fingerprint: str                                  # sha256 hex over names and raw bytes
    description: str
    report: dict = field(default_factory=dict)        # skipped / decoded entries and counts

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode("utf-8", "surrogatepass")) for t in self.texts)


def decode_source(raw: bytes, name: str, decoded: list) -> str:
    """UTF-8, else the PEP 263 declared encoding, else Latin-1; every fallback is recorded."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if name.endswith(".py"):
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
            text = raw.decode(encoding)
            decoded.append({"name": name, "decoded_as": encoding, "why": "declared coding line"})
            return text
        except (SyntaxError, LookupError, UnicodeDecodeError):
            pass
    decoded.append({"name": name, "decoded_as": "latin-1",
                    "why": "not valid UTF-8 and no usable declared encoding"})
    return raw.decode("latin-1")


def _py_files(root: Path, prune: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Relative posix paths of the .py files under root, sorted; and how many lie in `prune`d
    top-level directories (counted, not read)."""
    found, pruned = [], 0
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == ".":
            for name in [d for d in dirs if d in prune]:
                dirs.remove(name)
                pruned += sum(f.endswith(".py") for _, _, fs in os.walk(root / name) for f in fs)
            rel_dir = ""
        dirs.sort()
        found += [f"{rel_dir}/{f}" if rel_dir else f for f in files if f.endswith(".py")]
    return sorted(p.replace(os.sep, "/") for p in found), pruned


def stdlib_corpus(max_documents: int = 0) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels, third_party = _py_files(root, prune=("site-packages", "dist-packages"))
    names, texts, decoded = [], [], []
    digest = hashlib.sha256()
    for name in rels[:max_documents] if max_documents else rels:
        path = root / name
        if not path.is_file():
            continue
        raw = path.read_bytes()
        digest.update(name.encode() + b"\0" + raw + b"\0")
        names.append(name)
        texts.append(decode_source(raw, name, decoded))
    report = {"root": str(root), "files": len(names), "decoded_differently": decoded,
              "skipped": ([{"name": "site-packages/ and dist-packages/", "files": third_party,
                            "why": "third-party packages, not the standard library"}] if third_party else [])}
    if max_documents and len(rels) > max_documents:
        report["skipped"].append({"name": "the rest of the standard library",
                                  "files": len(rels) - max_documents,
                                  "why": f"data.max_documents = {max_documents}"})
    description = f"Python {sysconfig.get_python_version()} stdlib at {root}"
    return Corpus(names, texts, digest.hexdigest(), description, report)


def text_corpus(path: Path, pattern: str = "*") -> Corpus:
    files = [path] if path.is_file() else sorted(
        (p for p in path.rglob(pattern) if p.is_file() and (pattern != "*" or p.suffix in TEXT_SUFFIXES)),
        key=lambda p: p.relative_to(path).as_posix())
    names, texts, decoded, skipped = [], [], [], []
    digest = hashlib.sha256()
    for file in files:
        name = file.name if path.is_file() else file.relative_to(path).as_posix()
        raw = file.read_bytes()
        if b"\0" in raw:
            skipped.append({"name": name, "why": "binary (contains NUL bytes)"})
            continue
        digest.update(name.encode() + b"\0" + raw + b"\0")
        names.append(name)
        texts.append(decode_source(raw, name, decoded))
    if not names:
        raise ValueError(f"data.source: no text files found in {path}")
    return Corpus(names, texts, digest.hexdigest(), f"text files at {path}",
                  {"files": len(names), "decoded_differently": decoded, "skipped": skipped})


def jsonl_corpus(path: Path, text_field: str) -> Corpus:
    names, texts = [], []
    raw = path.read_bytes()
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.source: {path}:{lineno} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"data.source: {path}:{lineno} has no field {text_field!r} (data.text_field)")
        if not isinstance(record[text_field], str):
            raise ValueError(f"data.source: {path}:{lineno}: field {text_field!r} is not a string")
        names.append(f"line{lineno}")
        texts.append(record[text_field])
    if not names:
        raise ValueError(f"data.source: {path} holds no records")
    digest = hashlib.sha256(text_field.encode() + b"\0" + raw).hexdigest()
    return Corpus(names, texts, digest, f"JSONL {path} (field {text_field!r})",
                  {"records": len(names), "decoded_differently": [], "skipped": []})


def hf_corpus(spec: str, text_field: str, split: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.source {spec!r} needs the `datasets` package "
                         "(pip install datasets)") from None
    name = spec[3:]
    saved = Path(name)
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if saved.is_dir() and any((saved / f).exists() for f in markers):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field: dataset {name!r} has no column {text_field!r}; "
                         f"columns: {ds.column_names}")
    texts = [t for t in ds[text_field]]
    names = [str(i) for i in range(len(texts))]
    fingerprint = hashlib.sha256(f"{name}\0{split}\0{text_field}\0{ds._fingerprint}".encode()).hexdigest()
    return Corpus(names, texts, fingerprint, f"datasets {name!r} split {split!r}",
                  {"records": len(texts), "decoded_differently": [], "skipped": []})


def load_corpus(source: str, text_field: str = "text", hf_split: str = "train", pattern: str = "*",
                max_documents: int = 0) -> Corpus:
    """The documents of `source`; with max_documents, the first that many (in the source's order)."""
    if source == "stdlib":
        return stdlib_corpus(max_documents)
    if source.startswith("hf:"):
        return truncate(hf_corpus(source, text_field, hf_split), max_documents)
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data.source: {source!r} is neither 'stdlib', 'hf:<name>' nor an existing path")
    if path.is_file() and path.suffix == ".jsonl":
        return truncate(jsonl_corpus(path, text_field), max_documents)
    return truncate(text_corpus(path, pattern), max_documents)


def truncate(corpus: Corpus, max_documents: int) -> Corpus:
    if max_documents and len(corpus.names) > max_documents:
        dropped = len(corpus.names) - max_documents
        corpus.names, corpus.texts = corpus.names[:max_documents], corpus.texts[:max_documents]
        corpus.fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{max_documents}".encode()).hexdigest()
        corpus.report.setdefault("skipped", []).append(
            {"name": "the rest of the source", "files": dropped,
             "why": f"data.max_documents = {max_documents}"})
    return corpus


def describe_report(corpus: Corpus) -> list[str]:
    """Human-readable lines: what was skipped or decoded differently."""
    lines = []
    for entry in corpus.report.get("skipped", []):
        count = f" ({entry['files']} files)" if "files" in entry else ""
        lines.append(f"skipped {entry['name']}{count}: {entry['why']}")
    for entry in corpus.report.get("decoded_differently", []):
        lines.append(f"decoded {entry['name']} as {entry['decoded_as']}: {entry['why']}")
    return lines
