"""Run paths on a local disk or in a bucket: the one path type of moejax.

Everything moejax reads or writes by name (the workdir's `config.json`, checkpoints,
`metrics.jsonl`, TensorBoard events and base references; `data.data_dir`, data-source globs,
tokenizer files, Hugging Face directories, sweep workdirs) goes through `etils.epath.Path`,
the path type orbax uses. A name with a URL scheme (`gs://bucket/run`, `s3://...`) is an
object-store path, read and written through fsspec (`gcsfs` for gs://, the `tpu` extra), and
orbax writes its arrays there through tensorstore; any other name is a local path, made
absolute (`~` expanded) so every message shows where a file really is.

Object stores have no directories, no rename and no append, so this module offers the few
operations that differ between the two, written once:

  - `as_path`/`resolve`: the epath.Path / string of a name (local: absolute);
  - `write_text`: a whole file at once (local: a temporary file renamed over the target, so a
    reader never sees half of it; bucket: one object upload, atomic by itself);
  - `glob_files`: the files a glob matches (`**` recursive), sorted, as strings;
  - `move_command`: the shell command that moves a directory aside (`mv` or `gcloud storage
    mv`), for messages that tell the user how to fix a run directory.

Clients find a storage emulator through the usual variables: `STORAGE_EMULATOR_HOST`
(gcsfs, google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` (tensorstore, i.e. orbax's
arrays); `tests/storage_emulator.py` starts one for the tests.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import uuid

import fsspec
from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")
WILDCARDS = "*?["

# Other processes (the other hosts, a rerun after a kill) write the same run directory: a
# listing gcsfs cached earlier in this process would hide their checkpoints, so bucket
# listings are always read afresh (fsspec's per-protocol defaults, read when epath first
# builds its gcsfs filesystem).
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names an object in a bucket (gs://, s3://) rather than a local file."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def resolve(path: str | os.PathLike[str]) -> str:
    """The full name of `path`: a bucket URL as given (trailing '/' dropped), a local path
    absolute with `~` expanded."""
    name = os.fspath(path)
    if is_remote(name):
        return name.rstrip("/") if name.count("/") > 2 else name
    return os.path.abspath(os.path.expanduser(name))


def as_path(path: str | os.PathLike[str]) -> epath.Path:
    """`resolve(path)` as an `etils.epath.Path`."""
    return epath.Path(resolve(path))


def join(path: str | os.PathLike[str], *parts: str) -> str:
    """`path / part / ...` as a string (the URL of a bucket path, absolute for a local one)."""
    return str(as_path(path).joinpath(*parts))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` as the whole content of `path`, creating its parent directory. A reader
    sees the old content or the new one, never part of it."""
    target = as_path(path)
    if is_remote(target):
        target.write_text(text)  # one object upload: atomic on GCS and S3
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    temporary.write_text(text)
    os.replace(temporary, target)


def glob_files(pattern: str) -> list[str]:
    """The files (not directories) matching `pattern`, sorted; `**` matches any depth. Local
    patterns expand `~`; bucket patterns are listed through fsspec (`**` by walking the
    fixed prefix, which epath's own glob refuses on GCS)."""
    if not is_remote(pattern):
        found = globlib.glob(os.path.expanduser(pattern), recursive=True)
        return sorted(p for p in found if os.path.isfile(p))
    fixed, rest = split_glob(pattern)
    if not rest:
        return [pattern] if epath.Path(pattern).is_file() else []
    if "**" not in rest:
        return sorted(str(p) for p in epath.Path(fixed).glob(rest) if p.is_file())
    matches = re.compile(_glob_regex(rest)).fullmatch
    found = []
    scheme = fixed[: fixed.index("://") + 3]
    for directory, _, files in epath.Path(fixed).walk():
        directory = str(directory)  # fsspec walks without the scheme
        directory = directory if is_remote(directory) else scheme + directory
        for name in files:
            path = f"{directory}/{name}"
            if matches(path[len(fixed) + 1 :]):
                found.append(path)
    return sorted(found)


def _glob_regex(pattern: str) -> str:
    """A regex for a relative glob: `**/` any number of directories, `*` and `?` within one
    path component, `[...]` a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def split_glob(pattern: str) -> tuple[str, str]:
    """(the fixed directory prefix of a glob, the rest): `gs://b/data/web-*.parquet` ->
    (`gs://b/data`, `web-*.parquet`); a pattern without wildcards -> (its parent, "")."""
    scheme = next((s for s in REMOTE_SCHEMES if pattern.startswith(s)), "")
    parts = pattern[len(scheme) :].split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in WILDCARDS):
            return scheme + "/".join(parts[:i]), "/".join(parts[i:])
    return scheme + "/".join(parts[:-1]), ""


def move_command(source: str, target: str) -> str:
    """The shell command that moves the directory `source` to `target`."""
    if is_remote(source):
        return f"gcloud storage mv {source} {target}"
    return f"mv {source} {target}"
